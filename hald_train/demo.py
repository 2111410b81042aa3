"""The embedded end-to-end demo: generated scenes -> a teacher -> a label store -> students
trained with ``shs`` and ``soft-only`` -> a table, a verdict and a plot. No downloads; a few
minutes on two CPU cores.

Each generated image holds a large object of its class and a smaller distractor of another
class, so a random crop can show only the distractor: its soft label then contradicts the
image's class (HALD's "local semantic drift"), which the hard-label phase of ``shs`` is meant
to correct. Whether it does here is measured, not assumed: the printed verdict compares the
two students' test accuracy as they came out, one seed each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hald_store import CropPolicy, EvalLoader, HardLabelLoader, LabelStore, build_store, resolve_model
from hald_store.render import IMAGENET_MEAN, IMAGENET_STD
from hald_train.scenes import make_shapes_dataset

from .optim import lr_factor
from .report import hard_spans
from .trainer import METRICS, TrainConfig, evaluate, train


@dataclass
class DemoSettings:
    """Sizes of the demo (the defaults finish in a few minutes on 2 CPU cores)."""

    num_classes: int = 6
    train_per_class: int = 60
    test_per_class: int = 30
    image_size: int = 48
    input_size: int = 32
    teacher_epochs: int = 40
    teacher_batch_size: int = 16
    teacher_lr: float = 5e-3
    crops_per_image: int = 2
    top_k: int = 3
    values: str = "uint8"
    student_epochs: int = 40
    batch_size: int = 32
    seed: int = 0


def train_teacher(train_dir: Path, test_dir: Path, s: DemoSettings, progress: bool = True) -> tuple[torch.nn.Module, float]:
    """A CIFAR ResNet-20 trained with hard labels on random crops of ``train_dir``: a custom
    loop on the library's loaders. Returns the model and its test top-1."""
    torch.manual_seed(s.seed)
    model = resolve_model("cifar_resnet20", s.num_classes)
    loader = HardLabelLoader.from_folder(train_dir, input_size=s.input_size, crop_policy=CropPolicy(scale=(0.35, 1.0)),
                                         batch_size=s.teacher_batch_size, seed=s.seed + 1, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=s.teacher_lr, weight_decay=5e-4)
    total = s.teacher_epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, len(loader)))
    model.train()
    for epoch in tqdm(range(s.teacher_epochs), desc="train teacher", unit="epoch", disable=not progress):
        for images, labels, _ in loader.iter_epoch(epoch):
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    test = EvalLoader(test_dir, input_size=s.input_size, device="cpu")
    return model.eval(), evaluate(model, test)["top1"]


def run_demo(out: str | Path = "demo-output", settings: DemoSettings = DemoSettings(), progress: bool = True) -> dict:
    """Run every step into ``out`` (steps already done there are reused) and return the results."""
    s, out = settings, Path(out)
    data = make_shapes_dataset(out / "scenes", num_classes=s.num_classes, train_per_class=s.train_per_class,
                               test_per_class=s.test_per_class, size=s.image_size, seed=s.seed)
    train_dir, test_dir = data / "train", data / "test"
    teacher_path = out / "teacher.pt"
    teacher = resolve_model("cifar_resnet20", s.num_classes)
    if teacher_path.exists():
        saved = torch.load(teacher_path, weights_only=True)
        teacher.load_state_dict(saved["model"])
        teacher_top1 = saved["top1"]
    else:
        teacher, teacher_top1 = train_teacher(train_dir, test_dir, s, progress)
        torch.save({"model": teacher.state_dict(), "top1": teacher_top1}, teacher_path)

    store_path = out / "labels.zarr"
    if not (store_path.exists() and LabelStore.open(store_path, allow_incomplete=True).complete):
        build_store(train_dir, store_path, teacher, teacher_name="demo cifar_resnet20", crops_per_image=s.crops_per_image,
                    top_k=s.top_k, values=s.values, input_size=s.input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    resume=store_path.exists(), progress=progress, device="cpu")
    info = LabelStore.open(store_path).info()

    students = {}
    for schedule in ("shs", "soft-only"):
        run = out / f"student-{schedule}"
        final = run / "final.json"
        if not final.exists():
            config = TrainConfig(store=str(store_path), images=str(train_dir), val=str(test_dir), out_dir=str(run),
                                 student="cifar_resnet20", schedule=schedule, epochs=s.student_epochs,
                                 batch_size=s.batch_size, seed=s.seed, device="cpu", eval_every=1, progress=progress)
            train(config, resume=(run / "checkpoint.pt").exists())
        students[schedule] = json.loads(final.read_text())
        students[schedule]["curve"] = [json.loads(ln) for ln in (run / METRICS).read_text().splitlines()]
    results = {
        "teacher_test_top1": teacher_top1,
        "num_crops": info["num_crops"],
        "label_bytes_on_disk": info["label_bytes_on_disk"],
        "label_bytes_per_crop": info["label_bytes_per_crop"],
        "raw_label_bytes_per_crop": info["raw_label_bytes_per_crop"],
        "reference_fp16_bytes_per_crop": info["reference_fp16_bytes_per_crop"],
        "students": {k: {"test_top1": v["val_top1"], "test_top5": v["val_top5"], "schedule": v["schedule"],
                         "curve": [{"epoch": m["epoch"], "kind": m["kind"], "test_top1": m["val_top1"]} for m in v["curve"]]}
                     for k, v in students.items()},
    }
    results["plot"] = str(plot(results, out / "demo.png"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def plot(results: dict, path: Path) -> Path:
    """Left: each schedule's test top-1 per epoch, hard phases shaded. Right: label bytes per
    crop of this store against the reference layout (a full fp16 probability vector)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    for i, (name, r) in enumerate(results["students"].items()):
        for lo, hi in hard_spans(r["curve"]):
            ax.axvspan(lo, hi, color=f"C{i}", alpha=0.12, lw=0)
        ax.plot([m["epoch"] for m in r["curve"]], [100 * m["test_top1"] for m in r["curve"]], color=f"C{i}",
                label=f"{name} ({r['schedule']}): {100 * r['test_top1']:.1f}%")
    ax.axhline(100 * results["teacher_test_top1"], color="gray", ls="--", lw=1, label="teacher")
    ax.set_xlabel("epoch (shaded: hard-label phase)")
    ax.set_ylabel("student test top-1 (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ref, raw = results["reference_fp16_bytes_per_crop"], results["raw_label_bytes_per_crop"]
    bx.bar(["fp16 vector\n(reference)", "this store"], [ref, raw], color=["gray", "C2"])
    bx.set_ylabel("label bytes per crop (raw)")
    bx.set_title(f"{raw / ref:.0%} of the reference", fontsize=9)
    fig.suptitle("hald-store demo (generated scenes, one seed per schedule)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def verdict(r: dict) -> str:
    """What the two students' final test accuracies say, and no more."""
    shs, soft = (100 * r["students"][k]["test_top1"] for k in ("shs", "soft-only"))
    if shs > soft:
        said = f"shs ended {shs - soft:.1f} points above soft-only in this run."
    elif shs < soft:
        said = f"shs ended {soft - shs:.1f} points below soft-only: the hard-label phase did not help in this run."
    else:
        said = "shs and soft-only ended level: the hard-label phase made no difference in this run."
    return (said + " One seed per schedule on generated scenes, so a gap of a few points can be seed noise; for "
            "real CIFAR-10 with seeds and error bars see benchmarks/storage_vs_accuracy.py and the README's "
            "'Storage against accuracy' tables.")


def format_table(r: dict) -> str:
    lines = [
        f"teacher test top-1          {100 * r['teacher_test_top1']:.1f}%",
        f"label store                 {r['label_bytes_on_disk']:,} bytes on disk for {r['num_crops']:,} crops; "
        f"{r['raw_label_bytes_per_crop']} B/crop raw against {r['reference_fp16_bytes_per_crop']} B/crop for a full "
        f"fp16 vector (the reference layout)",
        "",
        f"{'schedule':<12}{'phases':<24}{'test top-1':>10}{'top-5':>8}",
    ]
    for name, s in r["students"].items():
        lines.append(f"{name:<12}{s['schedule']:<24}{100 * s['test_top1']:>9.1f}%{100 * s['test_top5']:>7.1f}%")
    lines += ["", verdict(r), f"\nplot: {r['plot']}"]
    return "\n".join(lines)
