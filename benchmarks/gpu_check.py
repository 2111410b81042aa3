"""The first-GPU check: one command, a few minutes on one GPU, one JSON.

    python benchmarks/gpu_check.py               # needs CUDA and DALI's CUDA build
    python benchmarks/gpu_check.py --dry-run     # the same steps on the CPU at tiny sizes (a test runs it)

Steps, each recorded in the JSON even when one fails (the run then exits 1):

1. **data** -- a generated shapes data set (``hald_train.scenes``), JPEG 4:4:4, nothing downloaded;
2. **build** -- ``build_store`` with an untrained ResNet-18 teacher on the device (crops/s);
3. **exactness** -- the store's crops rendered by DALI on the device (``"mixed"`` nvJPEG decode on
   a GPU) against the CPU store renderer, same windows: bit-identical, or within
   :data:`TOLERANCE` (8-bit levels, max and mean absolute difference);
4. **throughput** -- our loader against the bare DALI graph, interleaved rounds, median
   images/s (the functions of ``benchmarks/throughput.py``);
5. **train** -- one soft-label epoch of a ResNet-18 student at the store's input size with
   ``hald_train``'s Trainer (bf16 autocast and channels-last on CUDA);
6. **cpu_scaling** -- on the host's CPUs (CUDA hidden), a 32-px store of generated images:
   our loader (crops cached, after a cycle), the loader rendering every epoch (DALI, and the
   pillow renderer) and the bare DALI graph, each in a child process pinned to 1, 2, 4, ... cores (``throughput.py --child``).

The report is rewritten after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hald_store import LabelStore, SoftLabelLoader, build_store, resolve_model
from hald_store.render import cuda_available, dali_available, default_threads, read_files, renderer_for
from hald_train.scenes import make_shapes_dataset
from hald_train.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import bare_dali, interleaved, loader_epochs, pinned_rate  # noqa: E402

HERE = Path(__file__).resolve().parent
TOLERANCE = {"max_levels": 4.0, "mean_levels": 0.5}  # nvJPEG vs libjpeg-turbo IDCT rounding, after resize
SIZES = {  # full run on a GPU / --dry-run on the CPU
    "gpu": dict(classes=10, per_class=100, image_size=320, input_size=224, crops=2, top_k=5, batch=128,
                rounds=5, scaling_per_class=500, scaling_cores=(1, 2, 4, 8, 16), scaling_epochs=4),
    "dry": dict(classes=3, per_class=4, image_size=48, input_size=32, crops=2, top_k=3, batch=4, rounds=1,
                scaling_per_class=4, scaling_cores=(1,), scaling_epochs=2),
}
CHECKS = ("exactness", "throughput", "train", "cpu_scaling")  # --steps; the first three need the data and build steps
SCALING_KINDS = ("loader", "rendering", "pillow", "bare", "machine")  # throughput.py --child: crops cached / cache off (DALI, pillow) / bare graph / matmul (the cores' ceiling)


def exactness(store: LabelStore, root: Path, device: str, batch: int) -> dict[str, Any]:
    """Every stored crop rendered on ``device`` (DALI) and by the CPU store renderer."""
    on_device = renderer_for(store.render_spec, "dali", device)
    on_cpu = renderer_for(store.render_spec, "dali", "cpu")
    paths, (levels_max, diff_sum, count, identical) = store.manifest().paths, (0.0, 0.0, 0, True)
    scale = 255 * torch.tensor(store.render_spec.std).view(1, 3, 1, 1)  # normalized units -> 8-bit levels
    images, seeds = np.divmod(np.arange(store.num_crops), store.crops_per_image)
    for b0 in range(0, len(images), batch):
        i, s = images[b0 : b0 + batch], seeds[b0 : b0 + batch]
        boxes, flips = store.boxes(i, s)
        encoded = read_files([root / paths[k] for k in i])
        a, b = on_device(encoded, boxes, flips).float().cpu(), on_cpu(encoded, boxes, flips)
        diff = (a - b).abs() * scale
        identical &= bool(torch.equal(a, b))
        levels_max, diff_sum, count = max(levels_max, float(diff.max())), diff_sum + float(diff.sum()), count + diff.numel()
    mean = diff_sum / count
    return {"crops": int(store.num_crops), "device_renderer": type(on_device).__name__, "bit_identical": identical,
            "max_abs_levels": levels_max, "mean_abs_levels": mean, "tolerance": TOLERANCE,
            "passed": identical or (levels_max <= TOLERANCE["max_levels"] and mean <= TOLERANCE["mean_levels"])}


def throughput(store: LabelStore, root: Path, batch: int, rounds: int) -> dict[str, Any]:
    """Median images/s of our loader and of the bare DALI graph, interleaved (throughput.py)."""
    loader = SoftLabelLoader(store, root, batch_size=batch)
    contenders = {"hald-store loader (DALI, default)": loader_epochs(loader),
                  "bare DALI graph (physical limit)": bare_dali(store, root, batch, default_threads())}
    rates = interleaved(contenders, rounds)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    bare = med["bare DALI graph (physical limit)"]
    return {"device": str(loader.device), "batch_size": batch, "rounds": rates, "images_per_s": med,
            "loader_vs_bare": med["hald-store loader (DALI, default)"] / bare, "passed": all(v > 0 for v in med.values())}


def train_epoch(store: LabelStore, root: Path, out: Path, device: str, batch: int) -> dict[str, Any]:
    """One soft epoch of a ResNet-18 student (bf16 + channels-last on CUDA)."""
    config = TrainConfig(store=store.path, images=str(root), out_dir=str(out), student="resnet18", schedule="soft:1",
                         batch_size=batch, device=device, amp=True, progress=False)
    trainer = Trainer(config)
    t0 = time.perf_counter()
    result = trainer.run()
    secs = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {"device": str(trainer.device), "amp_bf16": trainer.device.type == "cuda", "seconds": secs,
            "images_per_s": store.num_images / secs, "loss": losses[-1] if losses else None, "result": result,
            "passed": bool(losses) and all(np.isfinite(losses))}


def cpu_scaling(work: Path, size: dict[str, Any], build_device: str) -> dict[str, Any]:
    """Images/s on the CPU against the cores a child process may use (CUDA hidden from it)."""
    root = make_shapes_dataset(work / "shapes-32", num_classes=size["classes"],
                               train_per_class=size["scaling_per_class"], test_per_class=1, size=32) / "train"
    path = work / "store-32.zarr"
    teacher = resolve_model("resnet18", size["classes"]).eval()
    build_store(root, path, teacher, teacher_name="untrained resnet18", num_classes=size["classes"],
                crops_per_image=size["crops"], top_k=size["top_k"], input_size=32, batch_size=256,
                device=build_device, overwrite=True, progress=False)
    batch = min(128, size["classes"] * size["scaling_per_class"])
    cores = [c for c in size["scaling_cores"] if c <= len(os.sched_getaffinity(0))]
    rates: dict[str, dict[int, float]] = {k: {} for k in SCALING_KINDS}
    for n in cores:
        for kind in SCALING_KINDS:
            rates[kind][n] = pinned_rate(kind, path, root, n, batch, size["scaling_epochs"],
                                         env={"CUDA_VISIBLE_DEVICES": ""})
            print(f"    {kind:<9} on {n:>2} core(s): {rates[kind][n]:>9,.0f} images/s", flush=True)
    return {"images": size["classes"] * size["scaling_per_class"], "input_size": 32, "batch_size": batch,
            "images_per_s": rates, "speedup_vs_1_core": {k: {n: r / v[cores[0]] for n, r in v.items()}
                                                        for k, v in rates.items()},
            "passed": all(r > 0 for v in rates.values() for r in v.values())}


def step(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]],
         save: Callable[[], None]) -> dict[str, Any] | None:
    """Run one step into ``report[name]`` (its error recorded, not raised), timing it; then ``save``."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # recorded; the other steps still run
        result = {"passed": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["wall_s"] = time.perf_counter() - t0
    report[name] = result
    print(f"  {name:<11} {'ok' if result['passed'] else 'FAILED'} ({result['wall_s']:.1f} s)"
          + ("" if result["passed"] else f": {result.get('error', '')}"), flush=True)
    save()
    return result if "error" not in result else None


def write_json(path: Path, report: dict[str, Any]) -> None:
    """``report`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def run(dry_run: bool, work: Path, out: Path, checks: tuple[str, ...] = CHECKS) -> dict[str, Any]:
    """The ``checks`` (and the data and build steps they need), the report rewritten to ``out``
    after each; returns it (``report["passed"]``: every step run passed)."""
    size = SIZES["dry" if dry_run else "gpu"]
    device = "cpu" if dry_run else "cuda"
    if not dry_run and not (cuda_available() and dali_available()):
        raise SystemExit("gpu_check needs CUDA and DALI (or run it with --dry-run)")
    report: dict[str, Any] = {"dry_run": dry_run, "device": device, "sizes": size, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                              "cpus": os.cpu_count(), "checks": list(checks), "load_before": os.getloadavg()}
    t0 = time.perf_counter()

    def save() -> None:
        write_json(out, report)

    on_store = {"exactness": lambda: exactness(store, images, device, size["batch"]),
                "throughput": lambda: throughput(store, images, size["batch"], size["rounds"]),
                "train": lambda: train_epoch(store, images, work / "train", device, size["batch"])}
    root = work / "shapes"
    data = any(c in on_store for c in checks) and step(report, "data", lambda: {"root": str(make_shapes_dataset(
        root, num_classes=size["classes"], train_per_class=size["per_class"], test_per_class=1,
        size=size["image_size"])), "images": size["classes"] * size["per_class"], "passed": True}, save)
    images = root / "train"
    store_path = work / "store.zarr"

    def build() -> dict[str, Any]:
        teacher = resolve_model("resnet18", size["classes"]).eval()
        s = build_store(images, store_path, teacher, teacher_name="untrained resnet18", num_classes=size["classes"],
                        crops_per_image=size["crops"], top_k=size["top_k"], input_size=size["input_size"],
                        batch_size=size["batch"],
                        device=device, overwrite=True, progress=False)
        return {"crops": s.crops_written, "crops_per_s": s.crops_per_second, "passed": s.crops_written > 0}

    if data and step(report, "build", build, save):
        store = LabelStore.open(store_path)
        for name in (c for c in checks if c in on_store):
            step(report, name, on_store[name], save)
    if "cpu_scaling" in checks:
        step(report, "cpu_scaling", lambda: cpu_scaling(work, size, device), save)
    names = [*(("data", "build") if any(c in on_store for c in checks) else ()), *checks]
    report["passed"] = all(report.get(n, {}).get("passed", False) for n in names)
    report["wall_s"] = time.perf_counter() - t0
    report["load_after"] = os.getloadavg()
    save()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    ap.add_argument("--work", type=Path, default=HERE / "results" / "gpu-check-work")
    ap.add_argument("--out", type=Path, default=None, help="default results/gpu_check[-dry-run].json")
    ap.add_argument("--steps", nargs="+", choices=CHECKS, default=list(CHECKS), help="the checks to run (default: all)")
    args = ap.parse_args()
    out = args.out or HERE / "results" / f"gpu_check{'-dry-run' if args.dry_run else ''}.json"
    report = run(args.dry_run, args.work, out, tuple(args.steps))
    print(f"{'passed' if report['passed'] else 'FAILED'} in {report['wall_s']:.0f} s; wrote {out}")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
