"""The embedded end-to-end demo: generated scenes -> a teacher -> a label store -> students
trained with ``shs`` and ``soft-only`` -> a table, a verdict and a plot. No downloads.

The teacher is the one shipped in ``hald_train/assets/`` (:func:`make_teacher` trained it on
these very scenes: same generator, same seed, checked by the scenes' sha256), loaded after
checking its sha256; ``train_teacher=True`` (``hald-demo --train-teacher``) trains one here
instead. Two sizes: :data:`QUICK` (the default; its measured time is in
``docs/demo/summary.json``) and :data:`FULL` (``hald-demo --full``: 40-epoch students). Each
step says what it does and where it writes; a step already finished in the output folder with
the same settings is reused and said to be (``fresh=True`` / ``hald-demo --fresh`` starts over).

Each generated image holds a large object of its class and a smaller distractor of another
class, so a random crop can show only the distractor: its soft label then contradicts the
image's class (HALD's "local semantic drift"), which the hard-label phase of ``shs`` is meant
to correct. Whether it does here is measured, not assumed: the printed verdict compares the
two students' test accuracy as they came out, one seed each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hald_store import CropPolicy, EvalLoader, HardLabelLoader, LabelStore, build_store, resolve_model
from hald_store.errors import HaldStoreError
from hald_store.render import IMAGENET_MEAN, IMAGENET_STD
from hald_train.scenes import make_shapes_dataset

from .optim import lr_factor
from .report import hard_spans
from .trainer import METRICS, TrainConfig, evaluate, train


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults are :data:`QUICK`."""

    num_classes: int = 6
    train_per_class: int = 60
    test_per_class: int = 30
    image_size: int = 48
    input_size: int = 32
    teacher_epochs: int = 12
    teacher_batch_size: int = 16
    teacher_lr: float = 5e-3
    crops_per_image: int = 2
    top_k: int = 3
    values: str = "uint8"
    student_epochs: int = 12
    batch_size: int = 32
    seed: int = 0
    train_teacher: bool = False  # False: the shipped teacher (teacher_* settings unused)


QUICK = DemoSettings()
FULL = replace(QUICK, teacher_epochs=40, student_epochs=40)
SETTINGS_FILE = "demo-settings.json"
ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_TEACHER, SHIPPED_TEACHER_INFO = "demo_teacher.pt", "demo_teacher.json"
SHIPPED_TEACHER_EPOCHS = 80
# The settings the shipped teacher depends on: the scenes it was trained on and its input size.
SCENE_FIELDS = ("num_classes", "train_per_class", "test_per_class", "image_size", "input_size", "seed")
# Everything the demo writes under its folder (what ``fresh`` removes; nothing else is touched).
OUTPUTS = ("scenes", "teacher.pt", "labels.zarr", "student-shs", "student-soft-only", "results.json",
           "summary.json", "summary.md", "demo.png", SETTINGS_FILE)


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


def scenes_sha256(root: Path) -> str:
    """sha256 over every file of a generated scenes folder (relative path and bytes, sorted)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def demo_scenes(root: Path, s: DemoSettings) -> Path:
    """The scenes of ``s`` under ``root`` (generated once; seeded, so the same bytes every time)."""
    return make_shapes_dataset(root, num_classes=s.num_classes, train_per_class=s.train_per_class,
                               test_per_class=s.test_per_class, size=s.image_size, seed=s.seed)


def make_teacher(assets: str | Path = ASSETS, settings: DemoSettings = QUICK, epochs: int = SHIPPED_TEACHER_EPOCHS,
                 progress: bool = True) -> dict:
    """Train the shipped demo teacher on ``settings``' scenes (deterministic: seeded scenes,
    seeded training, one torch thread) and write its fp16 state dict and a JSON record
    (settings, test top-1 of the fp16 weights, sha256s, training time) into ``assets``."""
    assets, s = Path(assets), replace(settings, teacher_epochs=epochs, train_teacher=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = demo_scenes(Path(tmp) / "scenes", s)
            t0 = time.perf_counter()
            model, top1_fp32 = train_teacher(data / "train", data / "test", s, progress)
            seconds = time.perf_counter() - t0
            half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.load_state_dict(half)  # back to fp32 values the fp16 file holds
            top1 = evaluate(model.eval(), EvalLoader(data / "test", input_size=s.input_size, device="cpu"))["top1"]
            digest = scenes_sha256(data)
    finally:
        torch.set_num_threads(threads)
    assets.mkdir(parents=True, exist_ok=True)
    tmp_file = assets / f".{SHIPPED_TEACHER}.partial"
    torch.save(half, tmp_file)
    os.replace(tmp_file, assets / SHIPPED_TEACHER)
    info = {"model": "cifar_resnet20", "settings": {k: asdict(s)[k] for k in SCENE_FIELDS},
            "training": {k: asdict(s)[k] for k in ("teacher_epochs", "teacher_batch_size", "teacher_lr")},
            "test_top1": top1, "test_top1_fp32": top1_fp32, "train_seconds": round(seconds, 1),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "bytes": (assets / SHIPPED_TEACHER).stat().st_size,
            "sha256": hashlib.sha256((assets / SHIPPED_TEACHER).read_bytes()).hexdigest(), "scenes_sha256": digest}
    (assets / SHIPPED_TEACHER_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return info


def load_shipped_teacher(s: DemoSettings, assets: str | Path = ASSETS) -> tuple[torch.nn.Module, dict]:
    """The shipped teacher (its sha256 checked, loaded with ``weights_only=True``) and its record;
    refuses settings whose scenes differ from those it was trained on."""
    assets = Path(assets)
    info = json.loads((assets / SHIPPED_TEACHER_INFO).read_text())
    ours = {k: asdict(s)[k] for k in SCENE_FIELDS}
    if ours != info["settings"]:
        raise HaldStoreError(f"the shipped demo teacher was trained on scenes {info['settings']}, these settings "
                             f"ask for {ours}; train one here instead (--train-teacher)", "train_teacher")
    blob = (assets / SHIPPED_TEACHER).read_bytes()
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise HaldStoreError(f"{assets / SHIPPED_TEACHER} does not match the sha256 in {SHIPPED_TEACHER_INFO} "
                             "(damaged?); reinstall it or train one here (--train-teacher)", "train_teacher")
    model = resolve_model(info["model"], s.num_classes)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in
                           torch.load(assets / SHIPPED_TEACHER, weights_only=True).items()})
    return model.eval(), info


def _prepare(out: Path, s: DemoSettings, fresh: bool, log: Callable[[str], None]) -> None:
    """Make ``out`` ready for ``s``: remove the demo's own outputs if ``fresh``; refuse a folder
    whose earlier demo used other settings (its steps would not match)."""
    if fresh:
        removed = [name for name in OUTPUTS if (out / name).exists()]
        for name in removed:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        if removed:
            log(f"--fresh: removed the earlier demo's {', '.join(removed)} from {out}")
    recorded = out / SETTINGS_FILE
    if recorded.exists():
        if json.loads(recorded.read_text()) != asdict(s):
            raise HaldStoreError(f"{str(out)!r} holds a demo made with other settings ({recorded}); pass --fresh to "
                                 "replace it or --out to write elsewhere", "fresh", "out")
    elif any((out / name).exists() for name in OUTPUTS):
        raise HaldStoreError(f"{str(out)!r} holds demo files without {SETTINGS_FILE} (an older demo?); pass --fresh "
                             "to replace them or --out to write elsewhere", "fresh", "out")
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(asdict(s), indent=1))


def _chunk_bytes(path: Path) -> int:
    """Bytes of the chunk files under ``path`` (zarr's JSON metadata left out)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def run_demo(out: str | Path = "demo-output", settings: DemoSettings = QUICK, progress: bool = True,
             fresh: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Run every step into ``out`` and return the results (also written to ``out/summary.json``
    and ``out/summary.md``). Steps already finished there with the same settings are reused;
    ``fresh`` removes the demo's earlier outputs first. ``log`` receives one line per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine 2 threads were 10.5x slower (benchmarks/demo_time.py)
    try:
        return _run(Path(out), settings, progress, fresh, log or (lambda line: None))
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, s: DemoSettings, progress: bool, fresh: bool, say: Callable[[str], None]) -> dict:
    t_start, seconds, reused = time.perf_counter(), {}, []
    _prepare(out, s, fresh, say)
    teacher = f"a {s.teacher_epochs}-epoch teacher trained here" if s.train_teacher else "the shipped teacher"
    say(f"hald-demo: {teacher}, {s.student_epochs}-epoch students; writing to {out.resolve()}")

    def step(name: str, done: bool, what: str) -> float:
        say(f"[{len(seconds) + 1}/5] {what}" + (" (reused from an earlier run; --fresh starts over)" if done else ""))
        if done:
            reused.append(name)
        return time.perf_counter()

    t = step("scenes", (out / "scenes" / "objects.json").exists(),
             f"scenes: {s.num_classes} shape classes, {s.train_per_class} train + {s.test_per_class} test images each, "
             f"{s.image_size}x{s.image_size} -> {out / 'scenes'}")
    data = demo_scenes(out / "scenes", s)
    train_dir, test_dir = data / "train", data / "test"
    seconds["scenes"] = time.perf_counter() - t

    teacher_path = out / "teacher.pt"
    if s.train_teacher:
        t = step("teacher", teacher_path.exists(),
                 f"teacher: CIFAR ResNet-20, {s.teacher_epochs} epochs on hard labels -> {teacher_path}")
        teacher = resolve_model("cifar_resnet20", s.num_classes)
        if teacher_path.exists():
            saved = torch.load(teacher_path, weights_only=True)
            teacher.load_state_dict(saved["model"])
            teacher_top1 = saved["top1"]
        else:
            teacher, teacher_top1 = train_teacher(train_dir, test_dir, s, progress)
            torch.save({"model": teacher.state_dict(), "top1": teacher_top1}, teacher_path)
        teacher_source = f"trained here, {s.teacher_epochs} epochs"
    else:
        t = time.perf_counter()
        teacher, shipped = load_shipped_teacher(s)
        step("teacher", False, f"teacher: using the shipped demo teacher ({shipped['bytes'] / 1024:.0f} KB, top-1 "
             f"{100 * shipped['test_top1']:.1f}% on the demo test set, sha256 checked); --train-teacher to train "
             "one here")
        teacher_top1 = evaluate(teacher, EvalLoader(test_dir, input_size=s.input_size, device="cpu"))["top1"]
        teacher_source = f"the shipped teacher, {shipped['training']['teacher_epochs']} epochs"
        if scenes_sha256(data) != shipped["scenes_sha256"]:
            say("note: these scenes are not byte-identical to those the shipped teacher was trained on (another "
                "Pillow or libjpeg?)")
        if teacher_top1 != shipped["test_top1"]:
            say(f"note: the shipped teacher's test top-1 here is {100 * teacher_top1:.1f}% (recorded: "
                f"{100 * shipped['test_top1']:.1f}%)")
    seconds["teacher"] = time.perf_counter() - t

    store_path = out / "labels.zarr"
    done = store_path.exists() and LabelStore.open(store_path, allow_incomplete=True).complete
    t = step("store", done, f"label store: {s.crops_per_image} crops per image, top-{s.top_k} {s.values} -> {store_path}")
    if not done:
        build_store(train_dir, store_path, teacher, crops_per_image=s.crops_per_image, top_k=s.top_k,
                    values=s.values, input_size=s.input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resume=store_path.exists(), progress=progress,
                    device="cpu")
    info = LabelStore.open(store_path).info()
    seconds["store"] = time.perf_counter() - t

    students = {}
    for schedule in ("shs", "soft-only"):
        run = out / f"student-{schedule}"
        final = run / "final.json"
        t = step(f"student-{schedule}", final.exists(),
                 f"student ({schedule}): CIFAR ResNet-20, {s.student_epochs} epochs, tested every epoch -> {run}")
        if not final.exists():
            config = TrainConfig(store=str(store_path), images=str(train_dir), val=str(test_dir), out_dir=str(run),
                                 student="cifar_resnet20", schedule=schedule, epochs=s.student_epochs,
                                 batch_size=s.batch_size, seed=s.seed, device="cpu", eval_every=1, progress=progress)
            train(config, resume=(run / "checkpoint.pt").exists())
        students[schedule] = json.loads(final.read_text())
        students[schedule]["curve"] = [json.loads(ln) for ln in (run / METRICS).read_text().splitlines()]
        seconds[f"student-{schedule}"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    results = {
        "settings": asdict(s),
        "teacher": teacher_source,
        "teacher_test_top1": teacher_top1,
        "num_crops": info["num_crops"],
        "label_chunk_bytes": _chunk_bytes(store_path / "labels"),
        "label_bytes_on_disk": info["label_bytes_on_disk"],
        "raw_label_bytes_per_crop": info["raw_label_bytes_per_crop"],
        "reference_fp16_bytes_per_crop": info["reference_fp16_bytes_per_crop"],
        "students": {k: {"test_top1": v["val_top1"], "test_top5": v["val_top5"], "schedule": v["schedule"],
                         "curve": [{"epoch": m["epoch"], "kind": m["kind"], "test_top1": m["val_top1"]} for m in v["curve"]]}
                     for k, v in students.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "reused": reused,
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
    }
    results["plot"] = str(plot(results, out / "demo.png"))
    (out / "results.json").write_text(json.dumps(results, indent=2))  # the full record, curves included
    summary = {k: v for k, v in results.items() if k != "students"}
    summary["students"] = {k: {f: v[f] for f in ("schedule", "test_top1", "test_top5")}
                           for k, v in results["students"].items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    say(f"wrote {out / 'results.json'}, {out / 'summary.json'}, {out / 'summary.md'} and {out / 'demo.png'}")
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
    bx.set_ylabel("label bytes per crop (uncompressed)")
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
    """The demo's final screen: teacher, store bytes, the two students, the verdict, time."""
    chunks, n = r["label_chunk_bytes"], r["num_crops"]
    sec, m = r["seconds"], r["machine"]
    lines = [
        f"teacher test top-1   {100 * r['teacher_test_top1']:.1f}% ({r['teacher']}; "
        f"chance {100 / r['settings']['num_classes']:.1f}%)",
        f"label store          {n:,} crops, {r['raw_label_bytes_per_crop']} B/crop of labels before compression "
        f"(a full fp16 vector: {r['reference_fp16_bytes_per_crop']} B/crop)",
        f"                     on disk: {chunks:,} B of label chunks ({chunks / n:.1f} B/crop, compressed) "
        f"+ {r['label_bytes_on_disk'] - chunks:,} B of zarr metadata (fixed per array)",
        "",
        f"{'schedule':<12}{'phases':<24}{'test top-1':>10}{'top-5':>8}",
    ]
    for name, s in r["students"].items():
        lines.append(f"{name:<12}{s['schedule']:<24}{100 * s['test_top1']:>9.1f}%{100 * s['test_top5']:>7.1f}%")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in sec.items() if k != "total")
    lines += ["", verdict(r), "",
              f"time: {sec['total']:.0f} s ({steps}) on {m['cpu_cores']} cores, torch at {m['torch_threads']} "
              f"thread(s), load average {m['load_average_1min_at_end']} at the end"
              + (f"; reused: {', '.join(r['reused'])}" if r["reused"] else ""),
              f"plot: {r['plot']}"]
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """``summary.md``: the final screen as a Markdown block (the README quotes it verbatim)."""
    return f"```text\n{format_table(summary)}\n```\n"


README_BEGIN, README_END = "<!-- demo-summary:begin -->", "<!-- demo-summary:end -->"


def publish(out: str | Path, docs: str | Path = "docs/demo", readme: str | Path = "README.md") -> None:
    """Copy a finished demo's ``summary.json``, ``summary.md`` and ``demo.png`` from ``out`` into
    ``docs`` and its ``summary.md`` between the README's demo-summary markers (figures are
    never hand-copied)."""
    out, docs, readme = Path(out), Path(docs), Path(readme)
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md", "demo.png"):
        shutil.copyfile(out / name, docs / name)
    text = readme.read_text()
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    readme.write_text(f"{head}{README_BEGIN}\n{(docs / 'summary.md').read_text()}{README_END}{tail}")


if __name__ == "__main__":  # from the repository root
    import sys

    if sys.argv[1:2] == ["publish"] and len(sys.argv) == 3:
        publish(sys.argv[2])
    elif sys.argv[1:] == ["make-teacher"]:
        print(json.dumps(make_teacher(), indent=1))
    else:
        sys.exit("usage: python -m hald_train.demo publish DEMO_OUTPUT_DIR | make-teacher")
