"""What a new user reads: CLI start-up without torch, info and verify in words, the teacher's
recorded name, and quick-start mistakes caught early with flag names."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from hald_store import LabelStore, build_store, load_teacher
from hald_store.cli import main
from hald_train.cli import main as train_cli
from hald_train.config import TrainConfig
from hald_train.presets import DECAY_PARAMS, OPTIMIZERS

from .conftest import generated_images, random_teacher


@pytest.mark.parametrize("args", [["hald_store", "--version"], ["hald_store", "--help"], ["hald_train", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    code = (f"import runpy, sys; sys.argv = {['x', *args[1:]]!r}\n"
            f"try:\n    runpy.run_module({args[0]!r}, run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
            "heavy = sorted(m for m in ('torch', 'nvidia.dali', 'zarr') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "0.1.0" in r.stdout or "Usage" in r.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store over generated images (5 classes x 8) by a seeded random ResNet-20 saved as a checkpoint."""
    tmp = tmp_path_factory.mktemp("text")
    images = generated_images(tmp / "data", classes=5, per_class=8)
    ckpt = tmp / "t.pt"
    torch.save(random_teacher(num_classes=5).state_dict(), ckpt)
    out = tmp / "cli.zarr"
    r = CliRunner().invoke(main, ["build", str(images), str(out), "--teacher", "cifar_resnet20", "--checkpoint",
                                  str(ckpt), "-s", "2", "--top-k", "3", "--input-size", "32", "--backend",
                                  "torchvision", "-q"])
    assert r.exit_code == 0, r.output
    return out, images, ckpt


def test_api_and_cli_record_the_same_teacher_name(built, tmp_path):
    out, images, ckpt = built
    api = tmp_path / "api.zarr"
    build_store(images, api, load_teacher("cifar_resnet20", ckpt, 5), crops_per_image=2, top_k=3, input_size=32,
                backend="torchvision", progress=False)
    assert LabelStore.open(api).settings.teacher.name == LabelStore.open(out).settings.teacher.name == "cifar_resnet20"


def test_info_is_words_with_class_names_and_teacher(built):
    out, _, _ = built
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0, r.output
    assert "images     40 in 5 classes: 00_circle, 01_square, 02_triangle, 03_cross, 04_ring" in r.output
    assert "teacher    cifar_resnet20 (eval mode; weights SHA-256 " in r.output
    assert "{" not in r.output and "labels     top-3 uint8 at T=20" in r.output


def test_verify_names_its_checks_and_clips_kl(built):
    out, images, ckpt = built
    r = CliRunner().invoke(main, ["verify", str(out)])
    lines = r.output.splitlines()
    assert r.exit_code == 0 and re.match(r"integrity PASS: \d+ arrays, \d+ chunk files read and decoded", lines[0]), r.output
    assert lines[1].startswith("images    not checked (give IMAGES_DIR") and lines[2].startswith("teacher   not checked")
    r = CliRunner().invoke(main, ["verify", str(out), str(images), "--deep", "--teacher", "cifar_resnet20",
                                  "--checkpoint", str(ckpt), "--sample", "40", "-q"])
    assert r.exit_code == 0, r.output
    assert "images    PASS: 40 files" in r.output and "teacher   PASS: 40 stored crops" in r.output
    assert "the codec's own error on the fresh labels" in r.output and "mean KL          -" not in r.output


def test_quick_start_mistakes_name_flags_early(built, tmp_path):
    out, images, ckpt = built
    r = CliRunner().invoke(main, ["build", str(images), str(tmp_path / "k.zarr"), "--teacher", "cifar_resnet20",
                                  "--checkpoint", str(ckpt), "-s", "2", "--top-k", "10", "--input-size", "32"])
    assert r.exit_code == 1 and "--top-k must be between 1 and --num-classes 5, got 10" in r.output, r.output
    assert "scan" not in r.output and not (tmp_path / "k.zarr").exists()  # before the scan
    run = ["--out", str(tmp_path / "run"), "-q"]
    r = CliRunner().invoke(train_cli, [str(out), str(images), *run, "--epochs", "2", "--batch-size", "256"])
    assert r.exit_code == 1 and "--batch-size 256 is larger than the 40 images" in r.output, r.output
    r = CliRunner().invoke(train_cli, [str(out), str(images), *run])
    assert r.exit_code == 1 and "--schedule shs needs --epochs N" in r.output, r.output


def test_hald_train_flags_take_their_defaults_and_choices_from_train_config():
    """Declared once: every hald-train flag that is a TrainConfig field has the field's default
    (and the optimizer/decay choices are presets' tuples)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    flags = {p.name: p for p in train_cli.params if p.name in fields and not p.required}
    assert len(flags) > 20
    for name, param in flags.items():
        if fields[name].default is not dataclasses.MISSING:
            assert param.default == fields[name].default, name
    assert tuple(flags["optimizer"].type.choices) == OPTIMIZERS
    assert tuple(flags["decay_params"].type.choices) == DECAY_PARAMS
