"""Data-path throughput, side by side in interleaved rounds: our loader against the bare DALI
graph doing the same work (the physical limit), FFCV (raw pixels and JPEG, when installed: see
``requirements-ffcv.txt``), the reference PIL loop and a DataLoader with workers; how the loader
scales with the cores it may use (``--cores``); and build speed.

    python benchmarks/throughput.py            # 32 px, 64 px and 224 px workloads (~10 min on 2 cores)
    python benchmarks/throughput.py --quick    # fewer images and rounds
    python benchmarks/throughput.py --workloads cifar-32px photo-224px   # the issue-19 table
    python benchmarks/throughput.py --workloads cifar-32px --scaling-only --scaling-kinds rendering bare \
        --cores 1 2 4 --baseline /tmp/main-copy     # children pinned to 1, 2, 4 cores, this vs another version
    python benchmarks/throughput.py --child rendering --child-store S --child-images DIR --profile p.txt
                                                    # cProfile + main-thread CPU per batch of one child

Workloads: cifar10-mini (500 real 32x32 JPEGs, 32-px crops, ResNet-56 teacher); the first
``--tiny-classes`` classes of Tiny-ImageNet (64x64, 64-px crops); and ``--photo-images``
Tiny-ImageNet images upscaled to 400x300 and saved as JPEG quality 90 (224-px crops). The
last two have no trained teacher, so untrained networks label them (label values do not
change speed). Every contender renders the same windows of the same files, one crop and one
label per image; images/s is the median over ``--rounds`` rounds (after a warm-up round), and
each round runs every contender once, so a shared machine's load hits all alike.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import itertools
import json
import pstats
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hald_store import LabelStore, SoftLabelLoader, build_store, load_teacher, resolve_model
from hald_store.render import cuda_available, default_threads
from hald_store.testing import shared_data_path

from common import busy_cpu_seconds
from reference_baseline import ReferenceEpoch, write_epoch_file

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- data
def tiny_members(tar_path: Path, classes: int, per_class: int):
    """(class, name, file object) of the first ``per_class`` images of the first ``classes`` classes."""
    counts: dict[str, int] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) < 3 or not member.isfile():
                continue
            if parts[1] not in counts:
                if len(counts) == classes:
                    return
                counts[parts[1]] = 0
            if counts[parts[1]] < per_class:
                counts[parts[1]] += 1
                yield parts[1], Path(parts[-1]).stem, tar.extractfile(member)


def make_folder(dst: Path, classes: int, per_class: int, size: tuple[int, int] | None) -> Path:
    """Tiny-ImageNet images in ImageFolder layout (resized to ``size`` = (W, H) and saved as
    JPEG quality 90, or copied as they are), made once."""
    done = dst / ".complete"
    if done.exists():
        return dst
    for cls, name, f in tiny_members(shared_data_path("tiny-imagenet", "tiny-imagenet-train.tar.gz"), classes, per_class):
        (dst / cls).mkdir(parents=True, exist_ok=True)
        if size is None:
            (dst / cls / f"{name}.jpg").write_bytes(f.read())
        else:
            Image.open(f).convert("RGB").resize(size, Image.BICUBIC).save(dst / cls / f"{name}.jpg", quality=90)
    done.touch()
    return dst


# ----------------------------------------------------------------------------- contenders
def bare_dali(store: LabelStore, root: Path, batch: int, threads: int):
    """The physical limit: DALI's own file reader over the epoch's files plus one
    ``decoders.image_slice`` -> ``resize`` -> ``crop_mirror_normalize`` graph on the same
    windows, nothing of ours in the loop. Returns ``epoch(e)`` (one pass; e is ignored)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    loader = SoftLabelLoader(store, root, batch_size=batch, cache_decoded=False)
    order = loader.epoch_order(0)
    order = order[: len(order) // batch * batch]
    _, boxes, flips = store.read_one_crop_per_image(loader.crop_seeds(0))
    paths = store.manifest().paths
    spec, gpu = store.render_spec, loader.renderer.device == "gpu"
    size, mean, std = spec.size, [255 * m for m in spec.mean], [255 * s for s in spec.std]

    def windows(info):
        ids = order[info.iteration * batch : (info.iteration + 1) * batch]
        if len(ids) == 0:
            raise StopIteration
        return (np.ascontiguousarray(boxes[ids, :2], np.int32), np.ascontiguousarray(boxes[ids, 2:], np.int32),
                flips[ids].astype(np.int32))

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if gpu else None, exec_dynamic=True,
                  prefetch_queue_depth=2)
    def graph():
        data, _ = fn.readers.file(files=[str(root / paths[i]) for i in order], name="files")
        anchor, shape, flip = fn.external_source(source=windows, num_outputs=3, batch=True, batch_info=True,
                                                 dtype=[types.INT32] * 3)
        img = fn.decoders.image_slice(data, anchor, shape, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                      axis_names="HW", normalized_anchor=False, normalized_shape=False)
        img = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(img, mirror=flip, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

    pipe = graph()
    pipe.build()

    def epoch(e: int) -> int:
        for _ in range(len(order) // batch):
            (x,) = pipe.run()
        pipe.reset()
        return len(order)
    return epoch


class _Images:
    """``(HWC uint8 pixels, class)`` of a store's images, for FFCV's writer."""

    def __init__(self, root: Path, manifest) -> None:
        self.paths, self.labels, self.root = manifest.paths, manifest.labels, root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return np.asarray(Image.open(self.root / self.paths[i]).convert("RGB")), int(self.labels[i])


def ffcv_epochs(store: LabelStore, root: Path, work: Path, name: str, batch: int, threads: int, mode: str):
    """FFCV 1.0 (the optional ``benchmarks/requirements-ffcv.txt``) over the same images written to
    a ``.beton`` as raw pixels (``mode="raw"``) or JPEG quality 90 (``"jpg"``): its
    ``RandomResizedCropRGBImageDecoder`` (fresh random crops: it cannot replay stored windows),
    flip, normalize, on ``threads`` threads, ``os_cache``, random order, delivered as its default
    channels-last view (no copy). Returns ``epoch(e)``, or a string saying why FFCV is skipped."""
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
        from ffcv.writer import DatasetWriter
    except Exception as exc:  # ImportError, or a broken numba/llvmlite
        return f"FFCV skipped ({type(exc).__name__}: {exc}); install benchmarks/requirements-ffcv.txt to compare"
    beton = work / f"{name}-{mode}.beton"
    if not beton.exists():
        tmp = beton.with_suffix(".tmp")
        DatasetWriter(str(tmp), {"image": RGBImageField(write_mode=mode, jpeg_quality=90), "label": IntField()},
                      num_workers=threads).from_indexed_dataset(_Images(root, store.manifest()))
        tmp.rename(beton)
    spec = store.render_spec
    mean, std = np.array(spec.mean) * 255, np.array(spec.std) * 255
    loader = Loader(str(beton), batch_size=batch, num_workers=threads, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=False, seed=0, pipelines={
                        "image": [RandomResizedCropRGBImageDecoder((spec.size, spec.size)), RandomHorizontalFlip(),
                                  NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()],
                        "label": [IntDecoder(), ToTensor(), Squeeze()]})

    def epoch(e: int) -> int:
        return sum(len(x) for x, _ in loader)
    return epoch


def loader_epochs(loader, first: int = 0) -> callable:
    """``epoch(_)`` runs the loader's next epoch (epochs follow each other, as in training: a
    loader may render the next one ahead); with ``first`` > 0, epochs ``0 .. first - 1`` run
    once now (a cycle of stored crops: the crop cache's steady state)."""
    following = itertools.count()

    def epoch(_: int) -> int:
        return sum(len(b.images) for b in loader.iter_epoch(next(following)))
    for _ in range(first):
        epoch(0)
    return epoch


def reference_epochs(epoch_file: Path, store: LabelStore, root: Path, workers: int) -> callable:
    spec = store.render_spec
    def epoch(e: int) -> int:
        ds = ReferenceEpoch(epoch_file, root, store.manifest().paths, spec.size, spec.mean, spec.std)
        it = ds if workers == 0 else torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        return sum(len(x) for x, _ in it)
    return epoch


ROUND_SECONDS, SETTLE = 2.0, 0.3  # a contender's round runs epochs for at least this long; the pause after it


def interleaved(contenders: dict[str, callable], rounds: int, loads: list | None = None,
                seconds: float = ROUND_SECONDS) -> dict[str, list[float]]:
    """images/s of each contender per round (round 0 is a warm-up and is dropped); each
    measured round's 1-minute load average is appended to ``loads``. A contender's round runs
    epochs until ``seconds`` have passed, then everything pauses for :data:`SETTLE` s: a
    loader that renders its next epoch ahead finishes that work before the next contender
    starts (it must not take their cores), and what it rendered ahead is then a small part of
    its next round (with one short epoch per round, it was most of it: 2x at 32 px)."""
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(rounds + 1):
        for name, fn in contenders.items():
            n, t0 = 0, time.perf_counter()
            while not n or time.perf_counter() - t0 < seconds:
                n += fn(r)
            if r:
                rates[name].append(n / (time.perf_counter() - t0))
            time.sleep(SETTLE)
        if r and loads is not None:
            loads.append(os.getloadavg()[0])
    return rates


# ----------------------------------------------------------------------------- scaling
def child(args) -> None:
    """Run pinned to some cores: images/s of our loader or of the bare graph, printed as JSON
    (with ``--profile``: a cProfile of the main thread written there instead)."""
    store, root = LabelStore.open(args.child_store), Path(args.child_images)
    if args.child == "bare":
        fn = bare_dali(store, root, args.batch_size, default_threads())
    elif args.child == "ffcv":  # the peer, on the .beton the contenders table wrote (or writes it)
        fn = ffcv_epochs(store, root, Path(args.work), Path(args.child_store).stem, args.batch_size,
                         default_threads(), "raw")
        if isinstance(fn, str):
            sys.exit(fn)
    elif args.child == "machine":
        fn = machine_epochs(default_threads())
    else:  # loader (crops cached), rendering (DALI every epoch), pillow (the pillow renderer every epoch)
        crops = args.child == "loader"
        backend = "pillow" if args.child == "pillow" else "auto"
        fn = loader_epochs(SoftLabelLoader(store, root, batch_size=args.batch_size, cache_crops=crops, backend=backend),
                           store.crops_per_image if crops else 0)
    if args.profile:
        return profile(fn, args, store)
    rates = interleaved({"x": fn}, args.child_epochs)["x"]
    print(json.dumps({"rate": float(np.median(rates)), "threads": default_threads()}))


def machine_epochs(threads: int, products: int = 64) -> callable:
    """The cores' own ceiling, no data path at all: ``threads`` torch threads multiplying
    512x512 float32 matrices (``epoch(e)`` returns ``products``; its rate is products/s)."""
    torch.set_num_threads(threads)
    a = torch.randn(512, 512)

    def epoch(e: int) -> int:
        for _ in range(products):
            torch.mm(a, a)
        return products
    return epoch


def profile(fn: callable, args, store: LabelStore) -> None:
    """cProfile of ``--child-epochs`` epochs after a warm-up one, with the main thread's CPU
    time per batch (``time.thread_time``: what the one Python thread spends, waits excluded)."""
    fn(0)
    prof, cpu0, t0 = cProfile.Profile(), time.thread_time(), time.perf_counter()
    prof.enable()
    n = sum(fn(e) for e in range(1, args.child_epochs + 1))
    prof.disable()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    batches = args.child_epochs * -(-store.num_images // args.batch_size)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    head = (f"# throughput.py --child {args.child}: {store.num_images} images, {store.render_spec.size} px, batch "
            f"{args.batch_size}, {args.child_epochs} epochs ({batches} batches), {default_threads()} core(s)\n"
            f"# {n / wall:,.0f} img/s; main thread CPU {1e3 * cpu / batches:.2f} ms per batch "
            f"(wall {1e3 * wall / batches:.2f} ms per batch); load average {os.getloadavg()}\n")
    Path(args.profile).write_text(head + text.getvalue())
    print(head, end="")


def pinned_rate(kind: str, store: str | Path, root: Path, cores: int, batch_size: int, epochs: int,
                library: str | None = None, env: dict[str, str] | None = None, work: Path = HERE / "results" / "work") -> float:
    """images/s of ``throughput.py --child kind`` in a child process pinned to the first ``cores``
    of this process's cores (``os.sched_setaffinity``; torch at as many threads), importing
    ``hald_store`` from ``library`` when given (a copy of another version), else this one;
    ``env`` is added to the child's environment."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), **(env or {})}
    if library:
        env["PYTHONPATH"] = library
    out = subprocess.run(
        [sys.executable, str(HERE / "throughput.py"), "--child", kind, "--child-store", str(store),
         "--child-images", str(root), "--batch-size", str(batch_size), "--child-epochs", str(epochs),
         "--work", str(work)],
        check=True, capture_output=True, text=True, cwd=HERE, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores]))
    return json.loads(out.stdout.strip().splitlines()[-1])["rate"]


def scaling(store: LabelStore, root: Path, args) -> dict[str, list[float]]:
    """Our loader (crops cached, after a cycle), the loader rendering every epoch (cache_crops
    off) and the bare graph (``--scaling-kinds``), pinned to each of ``--cores``, interleaved;
    with ``--baseline DIR``, the same children importing that copy of the library too."""
    libraries = {"": None, **({" [baseline]": args.baseline} if args.baseline else {})}
    kinds = [k for k in args.scaling_kinds if k != "ffcv" or importlib.util.find_spec("ffcv")]
    if len(kinds) < len(args.scaling_kinds):
        print("  FFCV skipped in the scaling runs (not installed: see benchmarks/requirements-ffcv.txt)")
    rates: dict[str, list[float]] = {}
    for _ in range(args.scaling_rounds):
        for kind in kinds:
            for cores in args.cores:
                for tag, library in libraries.items():
                    busy0, own0 = busy_cpu_seconds()
                    rate = pinned_rate(kind, store.path, root, cores, args.batch_size, args.child_epochs, library,
                                       work=Path(args.work))
                    busy1, own1 = busy_cpu_seconds()
                    rates.setdefault(f"{kind}{tag} on {cores} core(s)", []).append(rate)
                    rates.setdefault(OTHER_CPU, []).append(max(0.0, busy1 - busy0 - (own1 - own0)))
        rates.setdefault(SCALING_LOAD, []).append(os.getloadavg()[0])
    return rates


CHILD_KINDS = ("loader", "rendering", "pillow", "bare", "ffcv", "machine")
OTHER_CPU, SCALING_LOAD = "other processes' CPU-s per scaling run", "load average (1 min) after each scaling round"


def scaling_rows(name: str, rates: dict[str, list[float]], args) -> list[dict]:
    """Speed-ups over the fewest cores, and (with ``--baseline``) this version over the baseline."""
    rows, other, loads = [], rates.pop(OTHER_CPU, [0.0]), rates.pop(SCALING_LOAD, [])
    first = args.cores[0]
    for kind in args.scaling_kinds:
        for tag in ("", " [baseline]") if args.baseline else ("",):
            base = rates.get(f"{kind}{tag} on {first} core(s)")
            for cores in args.cores[1:] if base else ():
                ratio = float(np.median(rates[f"{kind}{tag} on {cores} core(s)"]) / np.median(base))
                rows.append({"workload": name, "what": f"{kind}{tag}: {cores} cores / {first}", "ratio": ratio})
        for cores in args.cores if args.baseline else ():
            now, then = (rates.get(f"{kind}{tag} on {cores} core(s)") for tag in ("", " [baseline]"))
            if now and then:  # the median of the per-round ratios: each round runs both under the same load
                ratio = float(np.median(np.array(now) / np.array(then)))
                rows.append({"workload": name, "what": f"{kind} on {cores} core(s): this / baseline", "ratio": ratio})
    for row in rows:
        print(f"  {row['what']:<60}{row['ratio']:6.2f}x")
    print(f"  other processes took up to {max(other):.1f} CPU-s per scaling run; load average after each round: "
          f"{', '.join(f'{x:.1f}' for x in loads)}")
    rows.append({"workload": name, "what": "scaling load", "other_processes_cpu_s_per_run": other, "loads": loads})
    return rows


# ----------------------------------------------------------------------------- main
def workload(name: str, root: Path, teacher: torch.nn.Module, work: Path, args, **build_kw) -> list[dict]:
    path = work / f"{name}.zarr"
    summary = build_store(root, path, teacher, overwrite=True, progress=False, **build_kw)
    store = LabelStore.open(path)
    b = min(args.batch_size, store.num_images)
    rows = [{"workload": name, "what": "build", "crops_per_s": summary.crops_per_second,
             "outside_teacher": summary.outside_teacher_fraction, "crops": store.num_crops}]
    print(f"\n{name}: {store.num_images} images, input {store.render_spec.size} px, batch {b}; build "
          f"{summary.crops_per_second:,.0f} crops/s, {100 * summary.outside_teacher_fraction:.1f}% outside the teacher")
    if args.scaling_only:
        rates = scaling(store, root, args)
        other = {k: rates.pop(k) for k in (OTHER_CPU, SCALING_LOAD)}
        for what, r in rates.items():
            rows.append({"workload": name, "what": what, "images_per_s": float(np.median(r)), "rounds": r})
            print(f"  {what:<60}{np.median(r):>9,.0f} /s  (rounds: {', '.join(f'{x:,.0f}' for x in r)})")
        return rows + scaling_rows(name, {**rates, **other}, args)
    epoch_file = work / f"{name}-epoch.pt"
    write_epoch_file(store, root, epoch_file, epoch=0, batch_size=b)
    threads = default_threads()
    default = SoftLabelLoader(store, root, batch_size=b)
    rendering = SoftLabelLoader(store, root, batch_size=b, cache_crops=False)
    cached = default._crop_cache() is not None
    other_cache = not rendering.stream.cache_decoded
    contenders = {
        f"hald-store loader (default: crops cached {'on' if cached else 'off'}; epochs after the first cycle)":
            loader_epochs(default, store.crops_per_image),
        f"hald-store loader, crop cache off (DALI, decoded cache {'on' if not other_cache else 'off'})":
            loader_epochs(rendering),
        f"hald-store loader, crop cache off (DALI, decoded cache {'on' if other_cache else 'off'})":
            loader_epochs(SoftLabelLoader(store, root, batch_size=b, cache_decoded=other_cache, cache_crops=False)),
        f"hald-store loader, pillow renderer, {threads} threads, crop cache off (decoded cache on)":
            loader_epochs(SoftLabelLoader(store, root, batch_size=b, backend="pillow", cache_decoded=True,
                                          cache_crops=False)),
        f"hald-store loader, torchvision, {threads} worker processes, crop cache off":
            loader_epochs(SoftLabelLoader(store, root, batch_size=b, backend="torchvision", cache_crops=False)),
        "bare DALI graph (physical limit)": bare_dali(store, root, b, threads),
        "reference PIL loop, 1 process": reference_epochs(epoch_file, store, root, 0),
        f"reference DataLoader, {threads} workers": reference_epochs(epoch_file, store, root, threads),
    }
    for mode in ("raw", "jpg"):
        ffcv = ffcv_epochs(store, root, work, name, b, threads, mode)
        if isinstance(ffcv, str):
            print(f"  {ffcv}")
            break
        contenders[f"FFCV, {'raw pixels' if mode == 'raw' else 'JPEG'}, {threads} threads (channels-last view)"] = ffcv
    loads: list[float] = []
    rates = interleaved(contenders, args.rounds, loads)
    print(f"  load average (1 min) per round: {', '.join(f'{x:.1f}' for x in loads)}")
    rows.append({"workload": name, "what": "load average (1 min) per round", "loads": loads})
    scaled = scaling(store, root, args) if name in args.scaling else {}
    extra = {k: scaled.pop(k) for k in (OTHER_CPU, SCALING_LOAD) if k in scaled}
    rates.update(scaled)
    bare = np.median(rates["bare DALI graph (physical limit)"])
    ref = np.median(rates["reference PIL loop, 1 process"])
    ffcv = next((r for k, r in rates.items() if k.startswith("FFCV, raw")), None)
    for what, r in rates.items():
        med = float(np.median(r))
        # against FFCV raw: the median of the per-round ratios (each round runs both under the same load)
        vs_ffcv = float(np.median(np.array(r) / np.array(ffcv))) if ffcv is not None and len(r) == len(ffcv) else None
        rows.append({"workload": name, "what": what, "images_per_s": med, "rounds": r,
                     "vs_bare_dali": med / bare, "vs_reference_loop": med / ref, "vs_ffcv_raw_per_round": vs_ffcv})
        print(f"  {what:<92}{med:>9,.0f} /s  {med / bare:6.2f}x bare  {med / ref:6.2f}x PIL loop  "
              f"{'' if vs_ffcv is None else f'{vs_ffcv:5.2f}x FFCV raw  '}(rounds: {', '.join(f'{x:,.0f}' for x in r)})")
    if scaled:
        rows += scaling_rows(name, {**scaled, **extra}, args)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and rounds (a smoke run)")
    ap.add_argument("--tiny-classes", type=int, default=10)
    ap.add_argument("--photo-images", type=int, default=1000, help="400x300 images of the 224-px workload")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", nargs="*", default=["cifar-32px", "tiny-64px", "photo-224px"])
    ap.add_argument("--scaling", nargs="*", default=["cifar-32px", "photo-224px"], help="workloads to pin to --cores")
    ap.add_argument("--cores", nargs="+", type=int, default=[1, 2], help="core counts the scaling children are pinned to")
    ap.add_argument("--scaling-kinds", nargs="+", choices=CHILD_KINDS, default=list(CHILD_KINDS),
                    help="what the scaling children run: our loader (crops cached), our loader rendering every "
                         "epoch with DALI and with the pillow renderer, the bare DALI graph, FFCV raw, and the "
                         "machine's own ceiling (torch matmul)")
    ap.add_argument("--scaling-rounds", type=int, default=3)
    ap.add_argument("--scaling-only", action="store_true", help="only the scaling children (no contenders table)")
    ap.add_argument("--baseline", help="a copy of another version of the repository (e.g. `git archive main`): "
                                       "the scaling children run against it too, interleaved")
    ap.add_argument("--work", default=str(HERE / "results" / "work"))
    ap.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    ap.add_argument("--child", choices=CHILD_KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--child-store", help=argparse.SUPPRESS)
    ap.add_argument("--child-images", help=argparse.SUPPRESS)
    ap.add_argument("--child-epochs", type=int, default=2, help="epochs each scaling child times (after a warm-up)")
    ap.add_argument("--profile", help="with --child: write a cProfile of the main thread to this file")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.tiny_classes, args.photo_images, args.rounds, args.scaling_rounds = 2, 200, 2, 1
    for need in (("cifar10-mini", "train"), ("tiny-imagenet", "tiny-imagenet-train.tar.gz"), ("teachers",)):
        if shared_data_path(*need) is None:
            sys.exit(f"needs the shared data: {'/'.join(need)} is missing (set HALD_DATA)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    busy0, own0, t0 = *busy_cpu_seconds(), time.perf_counter()
    print(f"{default_threads()} cores for this process, torch threads {torch.get_num_threads()}, CUDA {cuda_available()}")

    rows = []
    if "cifar-32px" in args.workloads:
        rows += workload("cifar-32px", shared_data_path("cifar10-mini", "train"),
                         load_teacher("cifar_resnet56", shared_data_path("teachers", "cifar10-resnet56.th"), 10), work,
                         args, teacher_name="cifar_resnet56", crops_per_image=8, input_size=32, batch_size=256)
    if "tiny-64px" in args.workloads:
        tiny = make_folder(work / f"tiny-{args.tiny_classes}cls", args.tiny_classes, 500, None)
        rows += workload("tiny-64px", tiny, resolve_model("cifar_resnet20", 200), work, args,
                         teacher_name="untrained cifar_resnet20", num_classes=200, crops_per_image=2, input_size=64,
                         batch_size=256)
    if "photo-224px" in args.workloads:
        per_class = max(1, args.photo_images // 10)
        photo = make_folder(work / f"photo-400x300-{per_class}", 10, per_class, (400, 300))
        rows += workload("photo-224px", photo, resolve_model("resnet18", 200), work, args,
                         teacher_name="untrained resnet18", num_classes=200, crops_per_image=2, input_size=224,
                         batch_size=64)

    busy1, own1 = busy_cpu_seconds()
    wall = time.perf_counter() - t0
    other = max(busy1 - busy0 - (own1 - own0), 0.0)
    print(f"\nwall {wall:.0f} s; CPU by this benchmark {own1 - own0:.0f} s, by other processes {other:.0f} s "
          f"(of {wall * os.cpu_count():.0f} CPU-s available)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "cores": default_threads(), "python": sys.executable, "torch_threads": torch.get_num_threads(),
                               "cuda": cuda_available(), "wall_s": wall, "own_cpu_s": own1 - own0,
                               "other_processes_cpu_s": other, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
