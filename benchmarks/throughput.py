"""Throughput against the reference baseline (per-epoch pickled label lists + PIL crops in a
per-image Python loop), side by side in one run: build (crops/s, share of time outside the
teacher), the label-read path alone (labels/s), and the loaders (images/s) -- our
SoftLabelLoader with DALI CPU (GPU when present) and torchvision.

    python benchmarks/throughput.py                  # cifar10-mini + a Tiny-ImageNet subset
    python benchmarks/throughput.py --tiny-classes 0 # cifar10-mini only

Each loader yields one crop (and one soft label) per image, so images/s == labels/s. Every
loader gets one untimed warm-up epoch (DALI builds its pipeline then), then ``--epochs`` timed.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from hald_store import LabelStore, SoftLabelLoader, build_store, load_teacher, resolve_model
from hald_store.loader import epoch_crop_seeds
from hald_store.pipeline import cuda_available, dali_available
from hald_store.reference_data import shared_data_path

from reference_baseline import ReferenceEpoch, reference_build, write_epoch_file


def timed(fn, epochs: int) -> float:
    """Seconds per epoch of ``fn(epoch)`` after one warm-up call."""
    fn(0)
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        fn(e)
    return (time.perf_counter() - t0) / epochs


def extract_tiny(tar_path: Path, dst: Path, classes: int) -> Path:
    """The first ``classes`` classes of the Tiny-ImageNet training tar, extracted once."""
    done = dst / f".complete-{classes}"
    if done.exists():
        return dst / "train"
    wnids: list[str] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) < 3 or not member.isfile():
                continue
            if parts[1] not in wnids:
                if len(wnids) == classes:
                    break
                wnids.append(parts[1])
            tar.extract(member, dst, filter="data")
    done.touch()
    return dst / "train"


def measure_build(name: str, root: Path, teacher: torch.nn.Module, work: Path, **build_kw) -> tuple[LabelStore, list[dict]]:
    """Build the store (fresh, timed) and the reference epoch file of the same crops."""
    path = work / f"{name}.zarr"
    summary = build_store(root, path, teacher, overwrite=True, progress=False, **build_kw)
    store = LabelStore.open(path)
    seconds, in_teacher = reference_build(store, root, teacher, work / f"{name}-reference-build.pt", build_kw["batch_size"])
    rows = [
        {"dataset": name, "path": "build: hald-store", "crops_per_s": summary.crops_per_second,
         "outside_teacher": summary.outside_teacher_fraction},
        {"dataset": name, "path": "build: reference PIL loop", "crops_per_s": store.num_crops / seconds,
         "outside_teacher": 1 - in_teacher / seconds},
    ]
    print(f"{name}: build {store.num_crops} crops")
    for r in rows:
        print(f"  {r['path']:<34}{r['crops_per_s']:>12,.0f} crops/s  {100 * r['outside_teacher']:.0f}% outside the teacher")
    return store, rows


def measure(name: str, store: LabelStore, root: Path, args, work: Path) -> list[dict]:
    n, b = store.num_images, min(args.batch_size, store.num_images)
    rows = []

    def row(kind: str, sec_per_epoch: float, note: str = "") -> None:
        rate = n / sec_per_epoch
        rows.append({"dataset": name, "path": kind, "images_per_s": rate, "labels_per_s": rate, "note": note})
        print(f"  {kind:<34}{rate:>12,.0f} /s  {note}")

    print(f"{name}: {n} images, {store.crops_per_image} crops each, input {store.attrs['input_size']}, batch {b}")
    # -- labels alone
    def store_epoch(e: int) -> None:
        seeds = epoch_crop_seeds(n, store.crops_per_image, e)
        fields, _, _ = store.read_one_crop_per_image(seeds)
        for b0 in range(0, n, b):
            store.codec.decode({k: v[b0 : b0 + b] for k, v in fields.items()}).probs(store.temperature)
    row("labels: store, epoch pass", timed(store_epoch, args.epochs), "read + decode to dense probs")

    rng = np.random.default_rng(0)
    def store_random(e: int) -> None:
        for _ in range(0, n, b):
            store.read(rng.integers(n, size=b), rng.integers(store.crops_per_image, size=b)).probs(store.temperature)
    row("labels: store, random batches", timed(store_random, args.epochs), "one chunked read per batch")

    epoch_file = work / f"{name}-epoch.pt"
    write_epoch_file(store, root, epoch_file, epoch=0, batch_size=b)
    row("labels: reference torch.load", timed(lambda e: torch.load(epoch_file, weights_only=True), args.epochs),
        f"{epoch_file.stat().st_size / n:.0f} B/crop pickled")

    # -- full loaders
    def run(loader) -> float:
        def epoch(e: int) -> None:
            for batch in loader.iter_epoch(e):
                batch.images.sum()  # touch the data
        return timed(epoch, args.epochs)

    configs = [("torchvision", "cpu")]
    if dali_available():
        configs.insert(0, ("dali", "cpu"))
        if cuda_available():
            configs.insert(0, ("dali", "gpu"))
    for backend, device in configs:
        loader = SoftLabelLoader(store, root, batch_size=b, backend=backend, device=device)
        row(f"loader: {backend} {device}", run(loader))

    paths = store.manifest().paths
    size, mean, std = store.attrs["input_size"], store.attrs["mean"], store.attrs["std"]
    def ref(workers: int):
        def epoch(e: int) -> None:
            ds = ReferenceEpoch(epoch_file, root, paths, size, mean, std)
            it = ds if workers == 0 else torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
            for x, _ in it:
                x.sum()
        return epoch
    row("reference: PIL loop, 1 process", timed(ref(0), args.epochs))
    row(f"reference: DataLoader {args.workers} workers", timed(ref(args.workers), args.epochs))
    base = {r["path"]: r["images_per_s"] for r in rows}
    for r in rows:
        r["vs_reference_1_process"] = r["images_per_s"] / base["reference: PIL loop, 1 process"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=str(shared_data_path("cifar10-mini", "train")))
    ap.add_argument("--checkpoint", default=str(shared_data_path("teachers", "cifar10-resnet56.th")))
    ap.add_argument("--crops-per-image", type=int, default=8)
    ap.add_argument("--tiny-classes", type=int, default=10, help="Tiny-ImageNet classes to add (0: none)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="benchmarks/results/work")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    rows = []
    store, build_rows = measure_build("cifar10-mini", Path(args.images), load_teacher("cifar_resnet56", args.checkpoint, 10),
                                      work, teacher_name="cifar_resnet56", crops_per_image=args.crops_per_image,
                                      input_size=32, batch_size=args.batch_size)
    rows += build_rows + measure("cifar10-mini", store, Path(args.images), args, work)
    tar = shared_data_path("tiny-imagenet", "tiny-imagenet-train.tar.gz")
    if args.tiny_classes and tar is not None:
        root = extract_tiny(tar, work / "tiny", args.tiny_classes)
        name = f"tiny-imagenet-{args.tiny_classes}cls"
        # No Tiny-ImageNet teacher is supplied: an untrained CIFAR ResNet-20 with 200 outputs
        # labels the crops. Label values do not affect speed.
        store, build_rows = measure_build(name, root, resolve_model("cifar_resnet20", 200), work,
                                          teacher_name="untrained cifar_resnet20", num_classes=200, crops_per_image=2,
                                          input_size=64, batch_size=args.batch_size)
        rows += build_rows + measure(name, store, root, args, work)
    out = Path(args.out)
    out.write_text(json.dumps({"settings": vars(args), "torch_threads": torch.get_num_threads(),
                               "cuda": cuda_available(), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
