"""Storage against accuracy on real CIFAR-10: crops per image x label codec x schedule x seed,
with the reference layout (a dense fp16 probability vector per crop) trained as the baseline.

    python benchmarks/storage_vs_accuracy.py --dataset ipc10           # CIFAR-10, 10 images/class
    python benchmarks/storage_vs_accuracy.py --dataset ipc50           # 50 images/class
    python benchmarks/storage_vs_accuracy.py --dataset dc-ipc50        # distilled images (DC, IPC 50)
    python benchmarks/storage_vs_accuracy.py --dataset ipc10 --report  # tables and plot only

Data: the IPC subsets are drawn (fixed seed) from ``cifar10/cifar10-jpg.tar.gz`` among the
train images the tests do not use (cifar10-mini holds the first 50 per class by name);
every student is evaluated on the full 10,000-image test set (``--test-images N``: a fixed
class-balanced subset, for learning curves at ``--eval-every 5``). Both are extracted once under
``benchmarks/results/data/``. Teacher: the pretrained CIFAR ResNet-56; student: ResNet-20,
trained with ``--preset hald-reference`` settings (AdamW 1e-3, eta 2, batch 16/16, T = 20,
CutMix 1, smoothing 0.8) for ``--epochs``.

Per crops-per-image value S one full-precision store (all classes, fp32 gaps) is built; each
codec point is re-encoded from it, so every point trains on the same crops. The baseline
reads, per crop, ``softmax(logits / 20)`` as float16 and feeds it to the KL loss as it is (the
reference's ``epoch_N.tar`` path); that reading path lives here, not in the library.

Every finished run is a line of ``runs.jsonl`` and is skipped when the script is run again;
an interrupted run resumes from its last epoch's checkpoint. Outputs in
``benchmarks/results/storage-<dataset>-e<epochs>/``: ``runs.jsonl``, ``results.csv`` and
``results.json`` (mean +- std per point), ``storage_vs_accuracy.png`` and ``conclusions.txt``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from common import save_figure
from filelock import FileLock

from hald_store import LabelStore, build_store, load_teacher, reencode_store
from hald_store.codec import dense_fp16_probs
from hald_store.testing import shared_data_path
from hald_store.sources import StoredCrops, StoredEpoch
from hald_store.store import default_compressor
from hald_train import TrainConfig
from hald_train.trainer import FINAL, Trainer

RESULTS = Path("benchmarks/results")
DATA = RESULTS / "data"
MINI_PER_CLASS = 50  # cifar10-mini's train images: the first 50 per class by name
SUBSET_SEED = 2026
BASELINE = "fp16-probs"  # the codec name of the reference layout
# Grids per data set, sized for one niced CPU core: a 300-epoch student takes ~100 s at IPC 10
# (60 runs: 2 S x (baseline + 4 codecs) x 2 schedules x 3 seeds, ~1.7 h) and ~5x that at
# IPC 50 (18 runs: S = 1, baseline + 2 codecs, ~2 h; add S values with --crops 1 4).
GRIDS = {
    "ipc10": dict(crops=[1, 16], codecs=["1:uint8", "2:uint4", "5:uint8", "10:fp16"]),
    "ipc50": dict(crops=[1], codecs=["1:uint8", "5:uint8"]),
    "dc-ipc50": dict(crops=[1], codecs=["1:uint8", "5:uint8"]),
    "ipc100": dict(crops=[1], codecs=[]),  # 1,000 images: 63 optimizer steps per epoch at batch 16
}
# How the labels were made: "eval" (teacher in eval mode, one crop at a time, no mix) or
# "reference" (the reference's relabel: teacher in train mode, CutMix inside batches of 16,
# replayed batch by batch in training; relabel/relabel_slc.py).
LABELS = {"eval": {}, "reference": {"teacher_mode": "train", "mix": "cutmix", "labelling_batch_size": 16}}
SCHEDULES = ["shs", "soft-only"]
CONTROL = "soft-only"  # every other schedule is compared with it, paired by seed
# A schedule may carry changes to the preset: "shs+ls0.038" its own hard-phase label smoothing
# (the preset's 0.8 is ImageNet's; 10 / (10 + 251 - 1) = 0.038 keeps ImageNet's true-to-other
# ratio at 10 classes), "shs+reset" fresh optimizer moments at each phase change
# ("+reset-to-hard" / "+reset-to-soft": only at changes into that kind), "shs+b2_0.99" AdamW's beta2.


def schedule_options(spec: str) -> dict:
    """TrainConfig fields of a schedule spec: ``NAME[+lsSMOOTHING][+reset[-to-KIND]][+b2_BETA2]``."""
    name, *changes = spec.split("+")
    options: dict = {"schedule": name}
    for change in changes:
        if change == "reset":
            options["reset_optimizer"] = "every"
        elif change in ("reset-to-hard", "reset-to-soft"):
            options["reset_optimizer"] = change.removeprefix("reset-")
        elif change.startswith("b2_"):
            options["adam_beta2"] = float(change[3:])
        elif change.startswith("ls"):
            options["label_smoothing"] = float(change[2:])
        else:
            raise SystemExit(f"--schedules: unknown change {change!r} in {spec!r} "
                             "(lsSMOOTHING, reset, reset-to-hard, reset-to-soft or b2_BETA2)")
    return options


# ---------------------------------------------------------------------------------- data
def _extract(tar_path: Path, members: dict[str, str], root: Path) -> None:
    """Write tar members (name in the tar -> path under ``root``) into ``root`` atomically."""
    tmp = root.with_name(root.name + ".tmp")
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            if m.name in members:
                dst = tmp / members[m.name]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(m).read())
    tmp.rename(root)


def cifar_folders(ipc: int) -> tuple[Path, Path]:
    """ImageFolder roots of an IPC subset of the CIFAR-10 train images the tests do not use,
    drawn with a fixed seed (IPC 10 is a subset of IPC 50), and of the full test set."""
    tar_path = shared_data_path("cifar10", "cifar10-jpg.tar.gz")
    if tar_path is None:
        raise SystemExit("needs ../shared/data/cifar10/cifar10-jpg.tar.gz (or $HALD_DATA)")
    train, test = DATA / f"cifar10-ipc{ipc}", DATA / "cifar10-test"
    DATA.mkdir(parents=True, exist_ok=True)
    with FileLock(DATA / "extract.lock"):  # shards start together
        if not (train.exists() and test.exists()):
            _extract_subset(tar_path, ipc, train, test)
    return train, test


def _extract_subset(tar_path: Path, ipc: int, train: Path, test: Path) -> None:
    with tarfile.open(tar_path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    if not test.exists():
        _extract(tar_path, {n: n.split("/", 1)[1] for n in names if n.startswith("test/")}, test)
    if not train.exists():
        rng = np.random.default_rng(SUBSET_SEED)
        pick = {}
        for cls in sorted({n.split("/")[1] for n in names if n.startswith("train/")}):
            rest = sorted(n for n in names if n.startswith(f"train/{cls}/"))[MINI_PER_CLASS:]
            pick.update({n: n.split("/", 1)[1] for n in np.asarray(rest)[rng.permutation(len(rest))[:ipc]]})
        _extract(tar_path, pick, train)


def dataset_folders(name: str) -> tuple[Path, Path]:
    """(train images, test images) of a sweep's data set."""
    if name == "dc-ipc50":
        images = shared_data_path("cifar10-dc-ipc50")
        if images is None:
            raise SystemExit("needs ../shared/data/cifar10-dc-ipc50 (or $HALD_DATA)")
        return images, cifar_folders(10)[1]
    return cifar_folders(int(name.removeprefix("ipc")))


def test_subset(test: Path, n: int) -> Path:
    """A fixed class-balanced subset of ``n`` images of the test folder ``test`` (hard links
    beside it), drawn with a fixed seed: learning curves at a fraction of the full set's cost."""
    root = test.parent / f"{test.name}-{n}"
    with FileLock(DATA / "extract.lock"):
        if not root.exists():
            classes = sorted(p for p in test.iterdir() if p.is_dir())
            tmp = root.with_name(root.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            rng = np.random.default_rng(SUBSET_SEED)
            for c in classes:
                files = sorted(c.iterdir())
                (tmp / c.name).mkdir(parents=True)
                for f in np.asarray(files)[rng.permutation(len(files))[: n // len(classes)]]:
                    os.link(f, tmp / c.name / f.name)
            tmp.rename(root)
    return root


# ---------------------------------------------------------------------------------- baseline
class ReferenceProbs(StoredCrops):
    """The reference's soft labels: a stored fp16 ``softmax(z / T)`` vector per crop, used as
    the KL target unchanged (no re-tempering, no top-k)."""

    def __init__(self, store: LabelStore, probs: np.ndarray, seed: int) -> None:
        super().__init__(store, store.temperature, True, seed)
        self.probs = probs  # (N, S, C) float16

    def labels(self, ids: np.ndarray, crops: StoredEpoch, dev: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.probs[ids, crops.seeds[ids]]).to(dev).float()


def chunk_bytes(path: Path) -> int:
    """Compressed chunk bytes under ``path`` (the JSON metadata, ~0.7 KB per array whatever
    the size, is left out: at a few hundred crops it would dominate)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def reference_layout_bytes(probs: np.ndarray, path: Path) -> int:
    """Chunk bytes of the (N, S, C) fp16 vectors, chunked and compressed like a store."""
    arr = zarr.create_array(str(path), shape=probs.shape, dtype=probs.dtype, chunks=(min(1024, len(probs)),) + probs.shape[1:],
                            compressors=default_compressor(), overwrite=True)
    arr[...] = probs
    return chunk_bytes(path)


def fidelity(exact: torch.Tensor, q_log: torch.Tensor, q_top1: torch.Tensor, t: float) -> dict:
    """Mean KL(exact || stored) at T and top-1 agreement over every crop."""
    p_log = torch.log_softmax(exact / t, 1)
    return {"mean_kl": float((p_log.exp() * (p_log - q_log)).sum(1).mean()),
            "top1_agreement": float((q_top1 == exact.argmax(1)).double().mean())}


# ---------------------------------------------------------------------------------- sweep
class Sweep:
    """The stores of one data set and the runs on them (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.images, self.test = dataset_folders(args.dataset)
        suffix = "" if args.labels == "eval" else f"-{args.labels}-labels"
        if args.test_images:
            self.test = test_subset(self.test, args.test_images)
            suffix += f"-curves-t{args.test_images}"  # not replicates: hald_regimes.py plots them only
        self.work = Path(args.out or RESULTS / f"storage-{args.dataset}{suffix}-e{args.epochs}")
        self.work.mkdir(parents=True, exist_ok=True)
        self.runs_file = self.work / "runs.jsonl"
        self.done = {r["key"]: r for r in self.logged()}
        self._teacher = None
        self.stores: dict[tuple[int, str], dict] = {}  # (S, codec) -> store path and label stats

    def teacher(self) -> torch.nn.Module:
        if self._teacher is None:
            self._teacher = load_teacher("cifar_resnet56", shared_data_path("teachers", "cifar10-resnet56.th"), 10)
        return self._teacher

    def prepare(self, s: int) -> None:
        """Build the full-precision store for ``s`` crops per image and every codec's store."""
        full = self.work / "stores" / f"s{s}-full.zarr"
        if not (full.exists() and LabelStore.open(full, allow_incomplete=True).complete):
            build_store(self.images, full, self.teacher(), teacher_name="cifar_resnet56", crops_per_image=s, top_k=10,
                        values="fp32", input_size=32, device=self.args.device, workers=1, resume=full.exists(),
                        progress=False, **LABELS[self.args.labels])
        store = LabelStore.open(full)
        t, n = store.temperature, store.num_crops
        exact = store.read(*np.divmod(np.arange(n), s)).dense_logits()
        if store.settings.labelling is not None:  # batch-specific labels: the lossless full store is the baseline
            self.stores[s, BASELINE] = {"path": full, "probs": None, "label_bytes": chunk_bytes(full / "labels"),
                                        "raw_bytes_per_crop": store.codec.bytes_per_crop(), "mean_kl": 0.0,
                                        "top1_agreement": 1.0}
            return
        probs = dense_fp16_probs(exact, t)
        q = torch.from_numpy(probs).float()
        nbytes = reference_layout_bytes(probs.reshape(store.num_images, s, -1), self.work / "stores" / f"s{s}-ref.zarr")
        self.stores[s, BASELINE] = {"path": full, "probs": probs.reshape(store.num_images, s, -1), "label_bytes": nbytes,
                                    "raw_bytes_per_crop": 2 * store.num_classes,
                                    **fidelity(exact, q.clamp_min(1e-30).log(), q.argmax(1), t)}
        for codec in self.args.codecs:
            k, values = codec.split(":")
            path = self.work / "stores" / f"s{s}-k{k}-{values}.zarr"
            if not (path.exists() and LabelStore.open(path, allow_incomplete=True).complete):
                reencode_store(store, path, top_k=int(k), values=values, overwrite=True, progress=False)
            enc = LabelStore.open(path)
            stored = enc.read(*np.divmod(np.arange(n), s))
            self.stores[s, codec] = {"path": path, "label_bytes": chunk_bytes(path / "labels"),
                                     "raw_bytes_per_crop": enc.codec.bytes_per_crop(),
                                     **fidelity(exact, stored.log_probs(t), stored.indices[:, 0], t)}

    def run(self, s: int, codec: str, schedule: str, seed: int) -> None:
        """Train one student (or resume it) unless ``runs.jsonl`` has it."""
        key = f"s{s}/{codec}/{schedule}/seed{seed}"
        if key in self.done:
            return
        info = self.stores[s, codec]
        out = self.work / "runs" / key.replace("/", "-").replace(":", "")
        config = TrainConfig.from_preset(
            "hald-reference", store=str(info["path"]), images=str(self.images), val=str(self.test), out_dir=str(out),
            student="cifar_resnet20", **schedule_options(schedule), epochs=self.args.epochs, seed=seed, device=self.args.device,
            workers=1, progress=False, eval_every=self.args.eval_every)
        if not (out / FINAL).exists():
            t0 = time.perf_counter()
            trainer = Trainer(config)
            if codec == BASELINE and info["probs"] is not None and "soft" in trainer.loaders:  # hard-only: no soft phase
                soft = trainer.loaders["soft"]
                soft.source = ReferenceProbs(trainer.store, info["probs"], soft.seed)
            trainer.run(resume=(out / "checkpoint.pt").exists())
            seconds = time.perf_counter() - t0
        else:
            seconds = None
        final = json.loads((out / FINAL).read_text())
        n = LabelStore.open(info["path"]).num_crops
        row = {"key": key, "dataset": self.args.dataset, "crops_per_image": s, "codec": codec, "schedule": schedule,
               "seed": seed, "epochs": self.args.epochs, "num_crops": n, "label_bytes": info["label_bytes"],
               "bytes_per_crop": info["label_bytes"] / n, "raw_bytes_per_crop": info["raw_bytes_per_crop"],
               "mean_kl": info["mean_kl"], "top1_agreement": info["top1_agreement"],
               "test_top1": final["val_top1"], "test_top5": final["val_top5"], "labels": self.args.labels,
               "eval_every": self.args.eval_every, "test_images": self.args.test_images or None, "best_test_top1": final.get("best_val_top1"),
               "best_epoch": final.get("best_epoch"), "train_seconds": seconds}
        self.done[key] = row
        with open(self.runs_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{time.strftime('%H:%M:%S')} {key}: top-1 {100 * row['test_top1']:.2f}%"
              + (f" ({seconds:.0f} s)" if seconds else ""), flush=True)

    def all(self) -> None:
        """S by S, seed by seed within S: a partial sweep has whole S values at every seed.
        With ``--shard K/N`` this process takes every N-th run from the K-th; shards wait for
        each other's store builds (a file lock) and share ``runs.jsonl``."""
        k, n = self.args.shard
        index = 0
        for s in self.args.crops:
            (self.work / "stores").mkdir(exist_ok=True)
            with FileLock(self.work / "stores" / f"s{s}.prepare.lock"):
                self.prepare(s)
            for seed in range(self.args.seeds):
                for codec in [BASELINE, *self.args.codecs]:
                    for schedule in self.args.schedules:
                        if index % n == k:
                            self.run(s, codec, schedule, seed)
                        index += 1
                report(self.work, self.logged())

    def logged(self) -> list[dict]:
        """Every run in ``runs.jsonl``, this shard's and the others'."""
        return [json.loads(line) for line in self.runs_file.read_text().splitlines()] if self.runs_file.exists() else []


# ---------------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (S, codec, schedule): test top-1 mean and std (percent) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["crops_per_image"], r["codec"], r["schedule"]), []).append(r)
    rows = []
    for (s, codec, schedule), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]["bytes_per_crop"], kv[0][2])):
        mean, std = _mean_std([100 * r["test_top1"] for r in rs])
        first = rs[0]
        rows.append({k: first[k] for k in ("dataset", "crops_per_image", "codec", "schedule", "epochs", "num_crops",
                                           "label_bytes", "bytes_per_crop", "raw_bytes_per_crop", "mean_kl",
                                           "top1_agreement")}
                    | {"seeds": len(rs), "top1_mean": mean, "top1_std": std,
                       "top1_per_seed": [round(100 * r["test_top1"], 2) for r in sorted(rs, key=lambda r: r["seed"])]})
    return rows


def paired(runs: list[dict], select, schedule: str = "shs") -> tuple[float, float, int]:
    """Mean, std and count of (``schedule`` - soft-only) test top-1 (points) over runs paired
    by (S, codec, seed), among the pairs ``select(S, codec)`` accepts."""
    by = {(r["crops_per_image"], r["codec"], r["seed"], r["schedule"]): r["test_top1"] for r in runs}
    diffs = [100 * (v - by[s, c, seed, CONTROL]) for (s, c, seed, sch), v in by.items()
             if sch == schedule and (s, c, seed, CONTROL) in by and select(s, c)]
    if not diffs:
        return math.nan, math.nan, 0
    return *_mean_std(diffs), len(diffs)


# two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
       15: 2.13, 20: 2.09, 30: 2.04, 60: 2.00}


def verdict(mean: float, std: float, n: int, schedule: str = "shs") -> str:
    """Plain words for a paired difference: beyond noise when its 95% t interval excludes 0."""
    if n < 2 or math.isnan(std):
        return f"{schedule} - {CONTROL} = {mean:+.2f} points (n={n}: too few pairs to judge)"
    sem = std / math.sqrt(n)
    half = sem * (T95[max(df for df in T95 if df <= n - 1)] if n - 1 <= 60 else 1.96)  # table gaps: next lower df
    word = "within noise" if abs(mean) <= half else (f"{schedule} better" if mean > 0 else f"{CONTROL} better")
    return (f"{schedule} - {CONTROL} = {mean:+.2f} +- {std:.2f} points (std over n={n} pairs; 95% interval "
            f"{mean - half:+.2f} .. {mean + half:+.2f}): {word}")


def conclusions(rows: list[dict], runs: list[dict]) -> str:
    """Per S and schedule the smallest bytes/crop within 0.5 point of the fp16 baseline; the
    verdicts of every schedule against soft-only."""
    out = []
    schedules = sorted({r["schedule"] for r in rows}, key=lambda x: (x != CONTROL, x))
    tried = [x for x in schedules if x != CONTROL]
    for s in sorted({r["crops_per_image"] for r in rows}):
        for schedule in schedules:
            pts = [r for r in rows if r["crops_per_image"] == s and r["schedule"] == schedule]
            base = next((r for r in pts if r["codec"] == BASELINE), None)
            if base is None:
                continue
            ok = [r for r in pts if r["codec"] != BASELINE and r["top1_mean"] >= base["top1_mean"] - 0.5]
            best = min(ok, key=lambda r: r["bytes_per_crop"], default=None)
            head = (f"S={s} {schedule}: baseline fp16 probs {base['top1_mean']:.2f} +- {base['top1_std']:.2f}% "
                    f"({base['bytes_per_crop']:.1f} B/crop, {base['seeds']} seeds)")
            if len(pts) == 1:  # the baseline only
                out.append(head)
                continue
            out.append(head + (f"; smallest within 0.5 point: {best['codec']} at {best['bytes_per_crop']:.1f} B/crop "
                               f"({best['top1_mean']:.2f} +- {best['top1_std']:.2f}%)" if best
                               else "; no codec point within 0.5 point"))
        out += [f"S={s}: " + verdict(*paired(runs, lambda s_, c: s_ == s, x), x) for x in tried]
        for codec in sorted({r["codec"] for r in rows if r["crops_per_image"] == s}):
            for x in tried:
                diff = paired(runs, lambda s_, c: (s_, c) == (s, codec), x)
                if diff[2]:  # the schedule ran at this codec
                    out.append(f"S={s} {codec}: " + verdict(*diff, x))
    out += ["all points: " + verdict(*paired(runs, lambda s_, c: True, x), x) for x in tried]
    out.append(f"({sum('better' in line for line in out)} of {sum('95% interval' in line for line in out)} comparisons beyond "
               "noise; each is a 95% interval, so about 1 in 20 of those on equal schedules would be too)")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    """The per-point table in Markdown."""
    lines = ["| S | codec | B/crop | mean KL | schedule | top-1 % (mean +- std) | seeds |",
             "| ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['crops_per_image']} | {r['codec']} | {r['bytes_per_crop']:.1f} | {r['mean_kl']:.1e} | "
                     f"{r['schedule']} | {r['top1_mean']:.2f} +- {r['top1_std']:.2f} | {r['seeds']} |")
    return "\n".join(lines)


def report(work: Path, runs: list[dict]) -> str:
    """Write results.csv/json, the plot and conclusions.txt; return the printed text."""
    if not runs:
        return ""
    rows = aggregate(runs)
    cols = [k for k in rows[0] if k != "top1_per_seed"] + ["top1_per_seed"]
    with open(work / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({**r, "top1_per_seed": " ".join(map(str, r["top1_per_seed"]))} for r in rows)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, work / "storage_vs_accuracy.png")
    text = table(rows) + "\n\n" + conclusions(rows, runs)
    (work / "conclusions.txt").write_text(text + "\n")
    return text


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against bytes/crop (log), one panel per S, one line per schedule (codec
    points), the fp16 baseline as an open marker with a +-0.5-point band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    crops = sorted({r["crops_per_image"] for r in rows})
    fig, axes = plt.subplots(1, len(crops), figsize=(4.2 * len(crops), 3.8), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], crops):
        for i, schedule in enumerate(sorted({r["schedule"] for r in rows})):
            pts = [r for r in rows if r["crops_per_image"] == s and r["schedule"] == schedule]
            color = f"C{i}"
            line = [r for r in pts if r["codec"] != BASELINE]
            ax.errorbar([r["bytes_per_crop"] for r in line], [r["top1_mean"] for r in line],
                        yerr=[np.nan_to_num(r["top1_std"]) for r in line], fmt="o-", color=color, capsize=3,
                        label=f"{schedule} (top-k codecs)")
            for r in line:
                ax.annotate(r["codec"], (r["bytes_per_crop"], r["top1_mean"]), fontsize=6, xytext=(3, -9),
                            textcoords="offset points", color=color)
            for r in pts:
                if r["codec"] == BASELINE:
                    ax.errorbar([r["bytes_per_crop"]], [r["top1_mean"]], yerr=[np.nan_to_num(r["top1_std"])], fmt="s",
                                mfc="white", color=color, capsize=3, label=f"{schedule} fp16 probs (reference)")
                    ax.axhspan(r["top1_mean"] - 0.5, r["top1_mean"] + 0.5, color=color, alpha=0.1)
        ax.set_xscale("log")
        ax.set_xticks([t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200) if t <= 2 * max(r["bytes_per_crop"] for r in rows)])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{rows[0]['dataset']}, S={s} crops/image, {rows[0]['epochs']} epochs", fontsize=9)
        ax.set_xlabel("label bytes per crop, compressed (log)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("ResNet-20 test top-1 (%), mean +- std over seeds")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(GRIDS), default="ipc10")
    ap.add_argument("--crops", type=int, nargs="+", help="crops per image S [per data set, see GRIDS]")
    ap.add_argument("--codecs", nargs="*", help="top_k:values codecs [per data set]; none: the baseline only")
    ap.add_argument("--schedules", nargs="+", default=SCHEDULES)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--labels", choices=sorted(LABELS), default="eval", help="how the store's labels were made")
    ap.add_argument("--eval-every", type=int, default=25, help="test accuracy every N epochs (best beside final)")
    ap.add_argument("--test-images", type=int, default=0,
                    help="evaluate on a fixed class-balanced subset of N test images (learning curves; not a replicate of full-set runs) [all 10,000]")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="[benchmarks/results/storage-<dataset>-e<epochs>]")
    ap.add_argument("--report", action="store_true", help="only write the tables and plot from runs.jsonl")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th point from the K-th (one process per core)")
    args = ap.parse_args()
    try:
        args.shard = tuple(map(int, args.shard.split("/")))
        assert len(args.shard) == 2 and 0 <= args.shard[0] < args.shard[1]
    except (ValueError, AssertionError):
        ap.error(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    if args.test_images and args.test_images < 10:
        ap.error(f"--test-images must be 0 (all) or at least 10 (one per class), got {args.test_images}")
    for spec in args.schedules:
        schedule_options(spec)  # a bad spec stops here, not after the first runs
    args.crops = args.crops or GRIDS[args.dataset]["crops"]
    args.codecs = GRIDS[args.dataset]["codecs"] if args.codecs is None else args.codecs
    if args.device == "cpu":
        torch.set_num_threads(1)
    sweep = Sweep(args)
    if not args.report:
        t0 = time.perf_counter()
        sweep.all()
        print(f"sweep took {time.perf_counter() - t0:.0f} s")
    print(report(sweep.work, list({r["key"]: r for r in sweep.logged()}.values())))


if __name__ == "__main__":
    main()
