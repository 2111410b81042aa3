"""Storage against accuracy: sweep crops per image, top-k, value codec and schedule on a real
data set with a real teacher; for each point report label bytes, label fidelity against the
full-precision teacher outputs, and the student's top-1 on held-out images. The reference
layout (full fp16 probability vector per crop) is measured on the same crops.

    python benchmarks/storage_vs_accuracy.py --quick     # ~10 min on 2 CPU cores
    python benchmarks/storage_vs_accuracy.py             # the full sweep (meant for a GPU)

Per crops-per-image value one full-precision store (top-k = all classes, fp32) is built with
the teacher; every codec point is re-encoded from it (``hald_store.reencode_store``), so all
points share the crops and the exact teacher outputs are the fidelity reference. Finished
points are kept in ``points.jsonl`` and not re-run.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from hald_store import LabelStore, build_store, load_teacher, reencode_store
from hald_store.codec import dense_fp16_probs
from hald_store.testing import shared_data_path
from hald_store.store import default_compressor
from hald_train import TrainConfig, train

QUICK = dict(crops=[2, 8], codecs=["2:uint4", "5:uint8", "10:fp16"], schedules=["shs", "soft-only"], epochs=20)
FULL = dict(crops=[1, 2, 4, 8, 16, 32], codecs=["1:uint8", "2:uint4", "2:uint8", "5:uint4", "5:uint8", "5:fp16",
                                               "10:uint8", "10:fp16"],
            schedules=["shs", "soft-only"], epochs=300)


def fidelity(exact: torch.Tensor, store: LabelStore, t: float) -> dict:
    """Mean KL(exact || stored) at T and top-1 agreement over every crop."""
    ids, seeds = np.divmod(np.arange(store.num_crops), store.crops_per_image)
    stored = store.read(ids, seeds)
    p_log = torch.log_softmax(exact / t, 1)
    kl = (p_log.exp() * (p_log - stored.log_probs(t))).sum(1)
    return {"mean_kl": float(kl.mean()), "top1_agreement": float((stored.indices[:, 0] == exact.argmax(1)).double().mean())}


def reference_layout(exact: torch.Tensor, t: float, tmp: Path) -> dict:
    """Bytes and fidelity of the full fp16 probability vector per crop, compressed like a store."""
    probs = dense_fp16_probs(exact, t)
    arr = zarr.create_array(str(tmp), shape=probs.shape, dtype=probs.dtype, chunks=(min(1024 * 8, len(probs)), probs.shape[1]),
                            compressors=default_compressor(), overwrite=True)
    arr[...] = probs
    nbytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file() and f.name != "zarr.json")
    p_log = torch.log_softmax(exact / t, 1)
    q_log = torch.log(torch.from_numpy(probs).float().clamp_min(1e-30))
    return {"label_bytes": nbytes, "bytes_per_crop": nbytes / len(probs),
            "mean_kl": float((p_log.exp() * (p_log - q_log)).sum(1).mean()),
            "top1_agreement": float((torch.from_numpy(probs).float().argmax(1) == exact.argmax(1)).double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sweep for a CPU (~10 min)")
    ap.add_argument("--images", default=str(shared_data_path("cifar10-dc-ipc50")))
    ap.add_argument("--val", default=str(shared_data_path("cifar10-mini", "test")))
    ap.add_argument("--teacher", default="cifar_resnet56")
    ap.add_argument("--checkpoint", default=str(shared_data_path("teachers", "cifar10-resnet56.th")))
    ap.add_argument("--student", default="cifar_resnet20")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=None, help="student epochs [quick: 20, full: 300]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=None, help="[benchmarks/results/storage-quick or -full]")
    args = ap.parse_args()
    sweep = QUICK if args.quick else FULL
    epochs = args.epochs or sweep["epochs"]
    work = Path(args.work or f"benchmarks/results/storage-{'quick' if args.quick else 'full'}")
    work.mkdir(parents=True, exist_ok=True)
    points_file = work / "points.jsonl"
    done = {p["key"]: p for p in map(json.loads, points_file.read_text().splitlines())} if points_file.exists() else {}
    teacher = load_teacher(args.teacher, args.checkpoint, 10)
    t0 = time.perf_counter()

    def record(point: dict) -> None:
        done[point["key"]] = point
        with open(points_file, "a") as f:
            f.write(json.dumps(point) + "\n")
        print(json.dumps({k: v for k, v in point.items() if k != "key"}))

    for s in sweep["crops"]:
        full = work / f"full-s{s}.zarr"
        if not (full.exists() and LabelStore.open(full, allow_incomplete=True).complete):
            build_store(args.images, full, teacher, teacher_name=args.teacher, crops_per_image=s,
                        top_k=10, values="fp32", input_size=args.input_size, device=args.device,
                        resume=full.exists(), progress=False)
        full_store = LabelStore.open(full)
        t = full_store.temperature
        ids, seeds = np.divmod(np.arange(full_store.num_crops), s)
        exact = full_store.read(ids, seeds).dense_logits()
        key = f"reference/s{s}"
        if key not in done:
            record({"key": key, "layout": "reference fp16 probs", "crops_per_image": s, "top_k": 10,
                    "values": "fp16-probs", "num_crops": full_store.num_crops, **reference_layout(exact, t, work / "ref.zarr")})
        for codec in sweep["codecs"]:
            k, values = codec.split(":")
            path = work / f"s{s}-k{k}-{values}.zarr"
            if not (path.exists() and LabelStore.open(path, allow_incomplete=True).complete):
                reencode_store(full_store, path, top_k=int(k), values=values, overwrite=True, progress=False)
            store = LabelStore.open(path)
            label_bytes = store.bytes_on_disk("labels")
            for schedule in sweep["schedules"]:
                key = f"s{s}/k{k}/{values}/{schedule}/e{epochs}"
                if key in done:
                    continue
                run = work / "runs" / key.replace("/", "-")
                config = TrainConfig(store=str(path), images=args.images, val=args.val, out_dir=str(run),
                                     student=args.student, schedule=schedule, epochs=epochs, batch_size=args.batch_size,
                                     device=args.device, progress=False)
                final = train(config, resume=(run / "checkpoint.pt").exists())
                if not final:  # the run had finished before: read its result
                    final = json.loads((run / "final.json").read_text())
                record({"key": key, "layout": "hald-store", "crops_per_image": s, "top_k": int(k), "values": values,
                        "schedule": schedule, "epochs": epochs, "num_crops": store.num_crops,
                        "label_bytes": label_bytes, "bytes_per_crop": label_bytes / store.num_crops,
                        **fidelity(exact, store, t), "student_top1": final["val_top1"], "student_top5": final["val_top5"]})
    write_outputs(work, list(done.values()))
    print(f"sweep took {time.perf_counter() - t0:.0f} s; results in {work}")


def write_outputs(work: Path, points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["layout", "crops_per_image", "top_k", "values", "schedule", "epochs", "num_crops", "label_bytes",
            "bytes_per_crop", "mean_kl", "top1_agreement", "student_top1", "student_top5"]
    with open(work / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(points)
    (work / "results.json").write_text(json.dumps(points, indent=2))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for schedule in sorted({p["schedule"] for p in points if "schedule" in p}):
        pts = sorted((p for p in points if p.get("schedule") == schedule), key=lambda p: p["label_bytes"])
        ax.plot([p["label_bytes"] / 1024 for p in pts], [100 * p["student_top1"] for p in pts], "o-", label=schedule)
    for p in points:
        if p["layout"].startswith("reference"):
            ax.axvline(p["label_bytes"] / 1024, color="gray", ls=":", lw=1)
            ax.text(p["label_bytes"] / 1024, ax.get_ylim()[0], f" fp16 ref S={p['crops_per_image']}", rotation=90,
                    va="bottom", fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("label storage on disk (KiB, log)")
    ax.set_ylabel("student top-1 on held-out images (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(work / "storage_vs_accuracy.png", dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
