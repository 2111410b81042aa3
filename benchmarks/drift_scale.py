"""Bounded memory of ``measure_drift`` on SYNTHETIC stores of 1M, 10M and 100M crop records.

Each store is written by ``scale.py``'s write path (the library's writer with synthetic logits in
place of a teacher, ImageNet shape: 1,000 classes, 500 crops per image, uint8 top-5), then one
drift pass (``hald_store.drift.measure_drift``, no gallery) runs in its own spawned process, so
its peak RSS (``VmHWM``; ``ru_maxrss`` beside it) is its own. If the pass holds a chunk of
images, not the store, peak RSS stays flat while the store grows 100-fold.

    .venv/bin/python benchmarks/drift_scale.py --quick        # 2,000 and 20,000 images (1M, 10M records)
    .venv/bin/python benchmarks/drift_scale.py                # also 200,000 images (100M records)
    .venv/bin/python benchmarks/drift_scale.py --keep         # keep the stores (benchmarks/results/scale/)

Results: ``benchmarks/results/drift-scale[-quick].json`` and a table. Reads hit a warm page cache.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from common import busy_cpu_seconds
from scale import BUILD_DEFAULTS, RESULTS, SYNTHETIC_NOTE, disk_usage, in_child, peak_rss_mib, save_results, write_phase

from hald_store import LabelStore
from hald_store.drift import measure_drift


def drift_phase(path: str) -> dict[str, Any]:
    """One drift pass over the store at ``path`` (runs in a child process)."""
    torch.set_num_threads(1)
    store = LabelStore.open(path)
    store.hard_labels()
    rss_open = peak_rss_mib()
    t0 = time.perf_counter()
    report = measure_drift(store, top=16, progress=True)
    wall = time.perf_counter() - t0
    overall = report.summary()["overall"]
    return {"wall_s": wall, "records_per_s": store.num_crops / wall, "peak_rss_mib_after_open": rss_open,
            "peak_rss_mib": peak_rss_mib(), "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tr_cov_mean": overall["tr_cov"]["mean"], "off_class_mean": overall["off_class"]["mean"]}


def run_one(args: argparse.Namespace, num_images: int) -> dict[str, Any]:
    """Write the store (unless ``--keep`` left a complete one), then measure one drift pass."""
    path = RESULTS / "scale" / f"synthetic-{num_images}x{args.crops_per_image}-ci{args.chunk_images}.zarr"
    print(f"\n== {num_images:,} images x {args.crops_per_image} crops -> {path}")
    build = None
    try:
        LabelStore.open(path)
        print("   reusing the complete store there")
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        build = in_child(write_phase, str(path), argparse.Namespace(**{**vars(args), "num_images": num_images}),
                         args.chunk_images, False, None)
    try:
        load = os.getloadavg()
        drift = in_child(drift_phase, str(path))
        disk = disk_usage(path)
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    return {"num_images": num_images, "records": num_images * args.crops_per_image, "disk": disk,
            "build_s": None if build is None else build["encode_write_s"] + build["create_s"],
            "load_before_drift": load, "drift": drift}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1M and 10M records only")
    p.add_argument("--num-images", type=int, nargs="+", default=None)
    p.add_argument("--crops-per-image", type=int, default=500)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=BUILD_DEFAULTS["top_k"])
    p.add_argument("--values", default=BUILD_DEFAULTS["values"])
    p.add_argument("--chunk-images", type=int, default=BUILD_DEFAULTS["chunk_images"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the stores under benchmarks/results/scale/")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.num_images is None:
        args.num_images = [2_000, 20_000] + ([] if args.quick else [200_000])
    if args.json is None:
        args.json = RESULTS / f"drift-scale{'-quick' if args.quick else ''}.json"
    return args


def main() -> None:
    args = parse_args()
    print(SYNTHETIC_NOTE)
    busy0, own0 = busy_cpu_seconds()
    t0 = time.perf_counter()
    runs = [run_one(args, n) for n in args.num_images]
    print(f"\n  {'records':>12} {'store MiB':>10} {'drift s':>8} {'records/s':>11} {'RSS open':>9} {'RSS peak':>9} "
          f"{'load 1m':>8}")
    for r in runs:
        d = r["drift"]
        print(f"  {r['records']:>12,} {r['disk']['bytes'] / 2**20:>10,.0f} {d['wall_s']:>8.1f} "
              f"{d['records_per_s']:>11,.0f} "
              f"{d['peak_rss_mib_after_open']:>8,.0f}M {d['peak_rss_mib']:>8,.0f}M {r['load_before_drift'][0]:>8.2f}")
    save_results(args, runs, t0, busy0, own0)


if __name__ == "__main__":
    main()
