"""Shared fixtures and helpers: small real stores, a teacher that breaks, the CLI runner, and data.

Real data: tests that need real images or pretrained teachers read them from the project's
shared data folder, ``../shared/data`` beside the repository or ``$HALD_DATA`` (CIFAR-10 JPEGs,
a distilled CIFAR-10 set, Tiny-ImageNet and two pretrained CIFAR ResNet teachers; see
``docs/testing.md``). Without it they skip with one reason, :data:`DATA_REASON`, and the end of
the run prints one line per skip reason with its count. The correctness tests that matter
most (build round trip, rebuild and resume identity, exact replay) also run on generated
images with a seeded random teacher (:func:`small_set`, :func:`replay_set`), so a fresh clone
exercises them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

from hald_store import EvalLoader, LabelStore, build_store
from hald_store.cli import main
from hald_store.devices import cuda_available
from hald_store.models import load_teacher, resolve_model
from hald_store.testing import shared_data_dir, shared_data_path
from hald_train.scenes import make_shapes_dataset
from hald_train.trainer import evaluate

DATA_WHAT = ("the shared test data (real CIFAR-10 JPEGs, a distilled CIFAR-10 set, pretrained CIFAR ResNet "
             "teachers; what and why: docs/testing.md)")
DATA_REASON = (f"needs {DATA_WHAT}, looked for at {shared_data_dir()} (../shared/data beside the repository, or "
               "$HALD_DATA): absent")
# A small, fast build: 4 crops of 32 px per image, top-3 uint8, blocks of 8 images.
SMALL = dict(num_classes=10, crops_per_image=4, top_k=3, values="uint8", input_size=32, batch_size=16, chunk_images=8,
             backend="torchvision", progress=False)


# The two CUDA markers every test file uses (one wording each in the skip summary).
needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
no_cuda = pytest.mark.skipif(cuda_available(), reason="checks the no-CUDA error (a CUDA device is present)")


def require_data(*parts: str) -> Path:
    """``shared_data_dir()/parts``, or skip the test: with :data:`DATA_REASON` when the folder is
    absent (every such test the same reason, so the summary counts them on one line), naming the
    missing part when the folder is there without it."""
    path = shared_data_path(*parts)
    if path is None:
        if not shared_data_dir().is_dir():
            pytest.skip(DATA_REASON)
        pytest.skip(f"needs {'/'.join(parts)} of {DATA_WHAT} in {shared_data_dir()}: absent (an incomplete copy?)")
    return path


def pytest_terminal_summary(terminalreporter) -> None:
    """One line per skip reason with its count (instead of a line per skipped test)."""
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reasons[report.longrepr[2].removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped tests, by reason")
        for reason, n in reasons.most_common():
            terminalreporter.write_line(f"{n:5d}  {reason}")


def random_teacher(num_classes: int = 10, seed: int = 0, spec: str = "cifar_resnet20") -> nn.Module:
    """A model with seeded random weights: exactness tests need a fixed teacher, not a good one."""
    torch.manual_seed(seed)
    return resolve_model(spec, num_classes).eval()


def generated_images(root: Path, classes: int, per_class: int) -> Path:
    """A writable ImageFolder of generated 32x32 JPEG scenes (``hald_train.scenes``)."""
    data = make_shapes_dataset(root, num_classes=classes, train_per_class=per_class, test_per_class=1, size=32)
    return data / "train"


@dataclass
class SmallSet:
    """An image folder (writable), a teacher for it and the teacher's recorded name."""

    folder: Path
    teacher: nn.Module
    teacher_name: str
    class_names: list[str]


@pytest.fixture(params=["generated", "cifar10-mini"])
def small_set(request, tmp_path) -> SmallSet:
    """24 images (3 classes x 8) and a 10-class teacher: generated scenes with a seeded random
    ResNet-20, or real CIFAR JPEGs with the pretrained ResNet-20 (skipped without the data)."""
    if request.param == "generated":
        folder = generated_images(tmp_path / "generated", classes=3, per_class=8)
        return SmallSet(folder, random_teacher(), "cifar_resnet20", sorted(p.name for p in folder.iterdir()))
    folder = copy_subset(request.getfixturevalue("cifar_mini_train"), tmp_path / "images", classes=3, per_class=8)
    return SmallSet(folder, request.getfixturevalue("resnet20"), "cifar_resnet20", ["airplane", "automobile", "bird"])


def build_replay_store(images: Path, teacher: nn.Module, out: Path) -> LabelStore:
    """``images`` labelled by ``teacher`` with BatchNorm batch statistics and CutMix, 3 crops per image."""
    build_store(images, out, teacher, crops_per_image=3, top_k=5, input_size=32, teacher_mode="train",
                mix="cutmix", labelling_batch_size=64, progress=False)
    return LabelStore.open(out)


@pytest.fixture(scope="module", params=["generated", "cifar10-dc-ipc50"])
def replay_set(request, tmp_path_factory) -> tuple[LabelStore, Path, nn.Module]:
    """A batch-specific store, its images and its teacher: 500 generated scenes (10 classes) with a
    seeded random ResNet-20, or the distilled cifar10-dc-ipc50 with the pretrained ResNet-56."""
    out = tmp_path_factory.mktemp("replay") / "r.zarr"
    if request.param == "generated":
        images, teacher = generated_images(out.parent / "generated", classes=10, per_class=50), random_teacher()
    else:
        images, teacher = require_data("cifar10-dc-ipc50"), request.getfixturevalue("resnet56")
    return build_replay_store(images, teacher, out), images, teacher


@pytest.fixture(scope="session")
def cifar_mini_train() -> Path:
    return require_data("cifar10-mini", "train")


@pytest.fixture(scope="session")
def resnet56():
    return load_teacher("cifar_resnet56", require_data("teachers", "cifar10-resnet56.th"), 10)


@pytest.fixture(scope="session")
def resnet20():
    return load_teacher("cifar_resnet20", require_data("teachers", "cifar10-resnet20.th"), 10)


def copy_subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    """Copy the first ``per_class`` images of the first ``classes`` class folders of ``src``."""
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(f, dst / class_dir.name / f.name)
    return dst


@pytest.fixture
def small_folder(tmp_path, cifar_mini_train) -> Path:
    """24 real CIFAR JPEGs: 3 classes x 8 images, in a writable copy."""
    return copy_subset(cifar_mini_train, tmp_path / "images", classes=3, per_class=8)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured, photo-like RGB array (what JPEG is made for)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 90 * np.sin(x / 23.0 + y / 41.0) + 20 * np.sin(x / 3.1)
    g = 128 + 80 * np.cos(y / 17.0) * np.sin(x / 57.0) + 15 * np.cos((x + y) / 4.3)
    b = 128 + 100 * np.sin((x - 2 * y) / 35.0)
    arr = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
    return arr.clip(0, 255).astype(np.uint8)


def agreeing(teacher, batch) -> int:
    """How many crops of a SoftBatch the teacher, re-run on its images, gives the stored top-1."""
    with torch.inference_mode():
        fresh = teacher(batch.images.to(next(teacher.parameters()).device)).argmax(1).cpu()
    return int((fresh == batch.soft.argmax(1).cpu()).sum())


def kill_after_blocks(cmd: list[str], store: Path, blocks: int = 3) -> None:
    """Run a build ``cmd`` writing ``store`` and ``kill -9`` it once ``blocks`` block markers exist."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    markers = store / "progress" / "block_done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(list(markers.iterdir())) >= blocks:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "build finished before it could be killed: " + proc.stdout.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def tiny_store(root: Path, teacher: nn.Module, classes: int, per_class: int, **options) -> tuple[Path, Path]:
    """Copy ``classes`` x ``per_class`` real cifar10-mini images to ``root/images`` and label them
    with ``teacher`` into ``root/s.zarr`` (``options``: :class:`~hald_store.BuildConfig` keywords);
    returns (store, images)."""
    images = copy_subset(require_data("cifar10-mini", "train"), root / "images", classes, per_class)
    build_store(images, root / "s.zarr", teacher, **{"progress": False, **options})
    return root / "s.zarr", images


class NaNTeacher(nn.Module):
    """A real teacher that breaks (NaN outputs) from its ``from_call``-th forward pass on (a build's
    probe is call 1) and for images whose mean pixel exceeds ``bright_from``; None: never."""

    def __init__(self, teacher: nn.Module, from_call: int | None = None, bright_from: float | None = None) -> None:
        super().__init__()
        self.teacher, self.from_call, self.bright_from, self.calls = teacher, from_call, bright_from, 0

    def forward(self, x):
        self.calls += 1
        out = self.teacher(x)
        if self.from_call is not None and self.calls >= self.from_call:
            return out * float("nan")
        if self.bright_from is not None:
            return torch.where(x.mean(dim=(1, 2, 3))[:, None] > self.bright_from, out * float("nan"), out)
        return out


def run_cli(*args):
    """``hald-store ARGS`` in-process (arguments may be paths)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_stores_equal(a: Path, b: Path) -> None:
    """Same attributes, same arrays, same values."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    names_a = sorted(name for name, _ in ga.arrays()) + sorted(f"{g}/{n}" for g, sub in ga.groups() for n, _ in sub.arrays())
    names_b = sorted(name for name, _ in gb.arrays()) + sorted(f"{g}/{n}" for g, sub in gb.groups() for n, _ in sub.arrays())
    assert names_a == names_b and names_a
    for name in names_a:
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)


def reevaluate(run: Path, store: Path, val: Path, student: str = "cifar_resnet20") -> dict[str, float]:
    """Top-1/top-5 of a finished run's ``model.pt`` on ``val``, computed anew (to check ``final.json``)."""
    s = LabelStore.open(store)
    spec = s.render_spec
    net = resolve_model(student, s.num_classes)
    net.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    return evaluate(net, EvalLoader(val, input_size=spec.size, mean=spec.mean, std=spec.std,
                                    class_names=s.class_names, device="cpu"))
