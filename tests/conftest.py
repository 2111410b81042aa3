"""Shared fixtures: real data from ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hald_store.models import load_teacher
from hald_store.testing import shared_data_dir, shared_data_path


def require_data(*parts: str) -> Path:
    path = shared_data_path(*parts)
    if path is None:
        pytest.skip(f"reference data {'/'.join(parts)} not found under {shared_data_dir()} (set HALD_DATA)")
    return path


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


def agreeing(teacher, batch) -> int:
    """How many crops of a SoftBatch the teacher, re-run on its images, gives the stored top-1."""
    with torch.inference_mode():
        fresh = teacher(batch.images).argmax(1)
    return int((fresh == batch.soft.argmax(1)).sum())


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
