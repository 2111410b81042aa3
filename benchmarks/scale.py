"""Mechanical scale test of the label store at ImageNet-like shape, with SYNTHETIC logits.

No teacher and no images are involved: a synthetic manifest (fake paths, random sizes and
digests) and synthetic logits (a "true class" peak plus Gaussian noise per crop) exercise the
store's write path, its size on disk and its read paths at 10,000,000 crop records.

    .venv/bin/python benchmarks/scale.py --quick                # 10,000 images x 100 crops (1M records), ~15 s
    .venv/bin/python benchmarks/scale.py                        # 100,000 images x 100 crops (10M records), ~2.5 min
    .venv/bin/python benchmarks/scale.py --compare-chunking     # chunk_images 256/1024/4096, 100,000 x 20 crops, ~2 min
    .venv/bin/python benchmarks/scale.py --keep                 # keep the store afterwards

Stores go to ``benchmarks/results/scale/`` and are deleted at the end unless ``--keep``;
results go to ``benchmarks/results/scale.json`` (``scale-quick.json`` with ``--quick``,
``scale-chunking.json`` with ``--compare-chunking``).

Measured: write (encode + ``write_block``; synthetic logit generation is timed separately and
excluded), encode alone, files and bytes on disk, random batches of ``(image, crop seed)``
pairs through ``LabelStore.read`` + dense ``probs``, one epoch pass through
``read_one_crop_per_image``, and the peak RSS of each phase. The read phase runs in a fresh
process so that its peak RSS is not masked by the write phase. Reads hit a warm page cache
(the store has just been written). Times are from a 2-core machine; the run ends by printing
how much CPU other processes took meanwhile, since a shared machine skews the numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hald_store import CropPolicy, LabelCodec, LabelStore, Manifest, __version__, build_store
from hald_store.crop_plan import plan_image_crops
from hald_store.order import epoch_crop_seeds

from common import busy_cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results"
BUILD_DEFAULTS = {k: p.default for k, p in inspect.signature(build_store).parameters.items()}
OWN_CLASS_FRACTION = 0.8  # share of crops whose logit peak is on the image's own class
PEAK_RANGE = (4.0, 12.0)  # height of the peak above N(0, 1) noise
SYNTHETIC_NOTE = (
    f"SYNTHETIC logits: N(0,1) noise on every class plus a peak of height U{PEAK_RANGE} on a 'true class' "
    f"(the image's class for {OWN_CLASS_FRACTION:.0%} of the crops, a uniformly random class otherwise); "
    "top-2..k indices are therefore random, which makes label compression pessimistic compared with a real teacher"
)


# ------------------------------------------------------------------ synthetic data
def synthetic_manifest(num_images: int, num_classes: int, seed: int) -> Manifest:
    """An ImageFolder-like manifest: balanced classes in folder order, sizes ~300-500 px."""
    rng = np.random.default_rng([seed, 0])
    labels = np.arange(num_images, dtype=np.int64) * num_classes // num_images
    heights = rng.integers(300, 501, num_images).astype(np.int32)
    widths = rng.integers(300, 501, num_images).astype(np.int32)
    return Manifest(
        paths=[f"n{c:05d}/img_{i:07d}.JPEG" for i, c in enumerate(labels)],
        labels=labels,
        class_names=[f"n{c:05d}" for c in range(num_classes)],
        nbytes=(heights.astype(np.int64) * widths * rng.uniform(0.3, 0.9, num_images)).astype(np.int64),
        digests=rng.integers(0, 256, (num_images, 16), dtype=np.uint8),
        heights=heights,
        widths=widths,
    )


def synthetic_logits(labels: np.ndarray, crops: int, num_classes: int, seed: int, block: int) -> torch.Tensor:
    """SYNTHETIC logits (len(labels) * crops, C) float32 of one block's crops, image-major;
    deterministic in ``(seed, block)``."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, block]).generate_state(1)[0]))
    rows = len(labels) * crops
    z = torch.randn(rows, num_classes, generator=g)
    own = torch.from_numpy(np.repeat(labels, crops))
    other = torch.randint(num_classes, (rows,), generator=g)
    true = torch.where(torch.rand(rows, generator=g) < OWN_CLASS_FRACTION, own, other)
    lo, hi = PEAK_RANGE
    z[torch.arange(rows), true] += lo + (hi - lo) * torch.rand(rows, generator=g)
    return z


def store_attrs(manifest: Manifest, crops: int, codec: LabelCodec, policy: CropPolicy, seed: int) -> dict[str, Any]:
    """The attributes a real build writes, with plausible values for a synthetic teacher."""
    return {
        "library_version": __version__,
        "num_images": len(manifest),
        "crops_per_image": crops,
        "num_classes": codec.num_classes,
        "class_names": manifest.class_names,
        "plan_seed": seed,
        "crop_policy": policy.to_dict(),
        "input_size": BUILD_DEFAULTS["input_size"],
        "mean": [float(m) for m in BUILD_DEFAULTS["mean"]],
        "std": [float(s) for s in BUILD_DEFAULTS["std"]],
        "renderer": {"backend": "synthetic", "size": BUILD_DEFAULTS["input_size"]},
        "teacher": {"name": "synthetic-logits", "weights_sha256": None, "mode": "eval", "synthetic": True},
        "codec": codec.to_dict(),
        "manifest_blake2b": manifest.fingerprint(),
        "skipped": manifest.skipped,
    }


# ------------------------------------------------------------------ write phase
def create_store(path: Path, manifest: Manifest, crops: int, codec: LabelCodec, chunk_images: int,
                 seed: int) -> LabelStore:
    """Create the empty store, planned block by block, as ``build_store`` does."""
    policy = CropPolicy()
    attrs = store_attrs(manifest, crops, codec, policy, seed)
    return LabelStore.create(path, manifest, lambda a, b: plan_image_crops(seed, a, b, crops, manifest.heights,
                                                                           manifest.widths, policy),
                             attrs, codec, chunk_images)


def write_labels(store: LabelStore, labels: np.ndarray, seed: int) -> dict[str, float]:
    """Generate, encode and write every block; seconds spent in each step."""
    s, c = store.crops_per_image, store.num_classes
    secs = {"generate": 0.0, "encode": 0.0, "write_block": 0.0}
    with tqdm(total=store.num_crops, desc="write labels", unit="crop", unit_scale=True, dynamic_ncols=True) as bar:
        for block in range(store.num_blocks):
            start, stop = store.block_range(block)
            t0 = time.perf_counter()
            logits = synthetic_logits(labels[start:stop], s, c, seed, block)
            t1 = time.perf_counter()
            fields = store.codec.encode(logits)
            t2 = time.perf_counter()
            store.write_block(block, {k: v.reshape(stop - start, s, *v.shape[1:]) for k, v in fields.items()})
            t3 = time.perf_counter()
            secs["generate"] += t1 - t0
            secs["encode"] += t2 - t1
            secs["write_block"] += t3 - t2
            bar.update((stop - start) * s)
    return secs


def disk_usage(path: Path) -> dict[str, int]:
    """Files and bytes under the store directory, in total and under ``labels/``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    labels = [p for p in files if p.relative_to(path).parts[0] == "labels"]
    return {
        "files": len(files),
        "label_files": len(labels),
        "bytes": sum(p.stat().st_size for p in files),
        "label_bytes": sum(p.stat().st_size for p in labels),
    }


def write_phase(path: Path, args: argparse.Namespace, chunk_images: int) -> dict[str, Any]:
    """Create and fill the store; throughput, size on disk and peak RSS."""
    codec = LabelCodec(values=args.values, top_k=args.top_k, num_classes=args.num_classes,
                       temperature=float(BUILD_DEFAULTS["temperature"]))
    manifest = synthetic_manifest(args.num_images, args.num_classes, args.seed)
    t0 = time.perf_counter()
    store = create_store(path, manifest, args.crops_per_image, codec, chunk_images, args.seed)
    create_s = time.perf_counter() - t0
    rss_create = peak_rss_mib()
    secs = write_labels(store, manifest.labels, args.seed)
    crops = store.num_crops
    disk = disk_usage(path)
    return {
        "crops": crops,
        "blocks": store.num_blocks,
        "create_s": create_s,
        "generate_s": secs["generate"],
        "encode_s": secs["encode"],
        "write_block_s": secs["write_block"],
        "write_crops_per_s": crops / (secs["encode"] + secs["write_block"]),
        "encode_crops_per_s": crops / secs["encode"],
        "write_block_crops_per_s": crops / secs["write_block"],
        **disk,
        "bytes_per_crop": disk["bytes"] / crops,
        "label_bytes_per_crop": disk["label_bytes"] / crops,
        "raw_label_bytes_per_crop": codec.bytes_per_crop(),
        "reference_fp16_bytes_per_crop": 2 * codec.num_classes,
        "peak_rss_mib_after_create": rss_create,
        "peak_rss_mib": peak_rss_mib(),
    }


# ------------------------------------------------------------------ read phase
def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: ``VmHWM`` of /proc/self/status, which,
    unlike ``ru_maxrss``, does not inherit the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB or bytes


def random_batches(store: LabelStore, batches: int, batch_size: int, seed: int) -> dict[str, float]:
    """``batches`` random batches of (image, crop seed) pairs: read, then dense probs at the
    build temperature; one untimed warm-up batch first."""
    rng = np.random.default_rng([seed, 1])
    n, s, ci = store.num_images, store.crops_per_image, store.chunk_images
    store.read(rng.integers(n, size=batch_size), rng.integers(s, size=batch_size)).probs(store.temperature)
    read_s = probs_s = 0.0
    blocks = []
    for _ in range(batches):
        images, seeds = rng.integers(n, size=batch_size), rng.integers(s, size=batch_size)
        t0 = time.perf_counter()
        labels = store.read(images, seeds)
        t1 = time.perf_counter()
        labels.probs(store.temperature)
        probs_s += time.perf_counter() - t1
        read_s += t1 - t0
        blocks.append(len(np.unique(images // ci)))
    arrays = len(store.codec.fields())
    chunk_raw = ci * s * store.codec.bytes_per_crop()
    total = read_s + probs_s
    return {
        "batches": batches,
        "batch_size": batch_size,
        "batches_per_s": batches / total,
        "labels_per_s": batches * batch_size / total,
        "ms_per_batch_read": 1e3 * read_s / batches,
        "ms_per_batch_probs": 1e3 * probs_s / batches,
        "blocks_per_batch": float(np.mean(blocks)),
        "label_arrays": arrays,
        "chunk_reads_per_batch": float(np.mean(blocks)) * arrays,
        "decompressed_mib_per_batch": float(np.mean(blocks)) * chunk_raw / 2**20,
    }


def epoch_pass(store: LabelStore, batch_size: int) -> dict[str, float]:
    """One crop per image via ``read_one_crop_per_image`` (labels, boxes, flips), then its
    labels decoded to dense probs in batches, as the SoftLabelLoader does."""
    n = store.num_images
    seeds = epoch_crop_seeds(n, store.crops_per_image, epoch=0)
    t0 = time.perf_counter()
    fields, _, _ = store.read_one_crop_per_image(seeds)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b0 in range(0, n, batch_size):
        store.codec.decode({k: v[b0 : b0 + batch_size] for k, v in fields.items()}).probs(store.temperature)
    probs_s = time.perf_counter() - t0
    return {"read_s": read_s, "labels_per_s": n / read_s, "decode_probs_s": probs_s,
            "labels_per_s_with_probs": n / (read_s + probs_s)}


def read_phase(path: str, batches: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Both read tests on a freshly opened store (runs in a child process)."""
    t0 = time.perf_counter()
    store = LabelStore.open(path)
    open_s = time.perf_counter() - t0
    rss_open = peak_rss_mib()
    rand = random_batches(store, batches, batch_size, seed)
    rss_random = peak_rss_mib()
    epoch = epoch_pass(store, batch_size)
    return {"open_s": open_s, "random": rand, "epoch": epoch, "peak_rss_mib_after_open": rss_open,
            "peak_rss_mib_after_random": rss_random, "peak_rss_mib_after_epoch": peak_rss_mib()}


def read_in_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`read_phase` in a fresh (spawned) process, so its ``ru_maxrss`` is its own."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(read_phase, str(path), args.batches, args.batch_size, args.seed).result()


# ------------------------------------------------------------------ driver
def run_one(args: argparse.Namespace, chunk_images: int) -> dict[str, Any]:
    """Write, measure and read one store; deletes it unless ``--keep``."""
    path = RESULTS / "scale" / f"synthetic-{args.num_images}x{args.crops_per_image}-ci{chunk_images}.zarr"
    if path.exists():
        shutil.rmtree(path)
    print(f"\n== {args.num_images:,} images x {args.crops_per_image} crops, chunk_images {chunk_images} -> {path}")
    try:
        write = write_phase(path, args, chunk_images)
        read = read_in_child(path, args)
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    return {"chunk_images": chunk_images, "path": str(path), "kept": args.keep, "write": write, "read": read}


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) rows of one run."""
    w, r = result["write"], result["read"]
    rb, ep = r["random"], r["epoch"]
    return [
        ("crop records", f"{w['crops']:,} ({w['blocks']} blocks of {result['chunk_images']} images)"),
        ("create (crop plan + manifest + boxes)", f"{w['create_s']:.1f} s"),
        ("synthetic logit generation (excluded)", f"{w['generate_s']:.1f} s"),
        ("write throughput (encode + write_block)", f"{w['write_crops_per_s']:,.0f} crops/s"),
        ("  encode only", f"{w['encode_crops_per_s']:,.0f} crops/s ({w['encode_s']:.1f} s)"),
        ("  write_block only", f"{w['write_block_crops_per_s']:,.0f} crops/s ({w['write_block_s']:.1f} s)"),
        ("files on disk (labels/)", f"{w['files']:,} ({w['label_files']:,})"),
        ("bytes on disk (labels/)", f"{w['bytes'] / 2**20:,.1f} MiB ({w['label_bytes'] / 2**20:,.1f} MiB)"),
        ("bytes per crop, total", f"{w['bytes_per_crop']:.2f}"),
        ("bytes per crop, labels (raw; fp16 ref)",
         f"{w['label_bytes_per_crop']:.2f} ({w['raw_label_bytes_per_crop']}; {w['reference_fp16_bytes_per_crop']})"),
        ("peak RSS, write process: after create / end",
         f"{w['peak_rss_mib_after_create']:,.0f} / {w['peak_rss_mib']:,.0f} MiB"),
        ("LabelStore.open", f"{1e3 * r['open_s']:.0f} ms"),
        (f"random batches of {rb['batch_size']} (read + probs)",
         f"{rb['batches_per_s']:.2f} batches/s = {rb['labels_per_s']:,.0f} labels/s"),
        ("  ms per batch: read / dense probs", f"{rb['ms_per_batch_read']:.1f} / {rb['ms_per_batch_probs']:.1f}"),
        ("  chunk reads per batch",
         f"{rb['chunk_reads_per_batch']:.0f} ({rb['blocks_per_batch']:.1f} blocks x {rb['label_arrays']} arrays)"),
        ("  decompressed label data per batch", f"{rb['decompressed_mib_per_batch']:.1f} MiB"),
        ("epoch pass read_one_crop_per_image", f"{ep['labels_per_s']:,.0f} labels/s ({ep['read_s']:.2f} s)"),
        ("  + decode to dense probs", f"{ep['labels_per_s_with_probs']:,.0f} labels/s"),
        ("peak RSS, read process: open / random / epoch",
         f"{r['peak_rss_mib_after_open']:,.0f} / {r['peak_rss_mib_after_random']:,.0f} / "
         f"{r['peak_rss_mib_after_epoch']:,.0f} MiB"),
    ]


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def print_comparison(results: list[dict[str, Any]]) -> None:
    """One line per chunking."""
    print(f"\n  {'chunk':>6} {'files':>7} {'B/crop':>7} {'write c/s':>10} {'batch/s':>8} "
          f"{'reads/b':>8} {'MiB/b':>7} {'epoch l/s':>10} {'RSS MiB':>8}")
    for res in results:
        w, r = res["write"], res["read"]
        print(f"  {res['chunk_images']:>6} {w['files']:>7,} {w['bytes_per_crop']:>7.2f} {w['write_crops_per_s']:>10,.0f} "
              f"{r['random']['batches_per_s']:>8.2f} {r['random']['chunk_reads_per_batch']:>8.0f} "
              f"{r['random']['decompressed_mib_per_batch']:>7.1f} {r['epoch']['labels_per_s']:>10,.0f} "
              f"{r['peak_rss_mib_after_epoch']:>8,.0f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10,000 images (1M records), 50 random batches")
    p.add_argument("--compare-chunking", action="store_true",
                   help="compare --chunkings on a smaller store (default 100,000 images x 20 crops: as many "
                        "blocks as the main run, 1/5 of the records) instead of the main run")
    p.add_argument("--chunkings", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--num-images", type=int, default=None, help="default 100,000 (10,000 --quick)")
    p.add_argument("--crops-per-image", type=int, default=None, help="default 100 (20 --compare-chunking)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=BUILD_DEFAULTS["top_k"])
    p.add_argument("--values", default=BUILD_DEFAULTS["values"])
    p.add_argument("--chunk-images", type=int, default=BUILD_DEFAULTS["chunk_images"])
    p.add_argument("--batches", type=int, default=None, help="random batches timed (default 200, 50 --quick)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the store(s) under benchmarks/results/scale/")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/scale[-quick|-chunking].json")
    args = p.parse_args()
    if args.num_images is None:
        args.num_images = 10_000 if args.quick else 100_000
    if args.crops_per_image is None:
        args.crops_per_image = 20 if args.compare_chunking else 100
    if args.batches is None:
        args.batches = 50 if args.quick or args.compare_chunking else 200
    if args.json is None:
        suffix = "-chunking" if args.compare_chunking else "-quick" if args.quick else ""
        args.json = RESULTS / f"scale{suffix}.json"
    return args


def main() -> None:
    args = parse_args()
    print(SYNTHETIC_NOTE)
    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}; reads hit a warm page cache")
    chunkings = args.chunkings if args.compare_chunking else [args.chunk_images]
    busy0, own0 = busy_cpu_seconds()
    t0 = time.perf_counter()
    results = [run_one(args, ci) for ci in chunkings]
    for res in results:
        print(f"\n-- chunk_images {res['chunk_images']}")
        print_table(table(res))
    if args.compare_chunking:
        print_comparison(results)
    wall = time.perf_counter() - t0
    busy1, own1 = busy_cpu_seconds()
    other = max(busy1 - busy0 - (own1 - own0), 0.0)
    print(f"\nwall time {wall:.0f} s; CPU used by this benchmark {own1 - own0:.0f} s, by other processes "
          f"{other:.0f} s (of {wall * os.cpu_count():.0f} CPU-s available; > ~5% means contended numbers)")
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    out = {"synthetic": True, "note": SYNTHETIC_NOTE, "settings": settings, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "own_cpu_s": own1 - own0, "other_processes_cpu_s": other,
           "library_version": __version__, "wall_s": wall, "runs": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
