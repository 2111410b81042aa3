"""Writes that never destroy a good store, and one writer at a time (real stores, real processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hald_store import LabelStore, build_store
from hald_store.cli import main
from hald_store.errors import LockError, TeacherOutputError
from hald_store.safety import sibling

from .conftest import SMALL, NaNTeacher, assert_stores_equal, copy_subset, kill_after_blocks, require_data

HOLD = ("import sys, time\nfrom hald_store.safety import {fn}\nwith {fn}(sys.argv[1]{extra}):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".hald-store-"))


@pytest.fixture
def holder():
    """Start a second, real process that holds a lock (store or run directory) until killed."""
    procs = []

    def start(fn: str, path: Path, extra: str = "") -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen([sys.executable, "-c", HOLD.format(fn=fn, extra=extra), str(path)],
                                stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_convert_refuses_its_own_source(small_folder, tmp_path, resnet20):
    src = tmp_path / "s.zarr"
    build_store(small_folder, src, resnet20, **SMALL)
    for dst in (str(src), str(src / "inside.zarr"), f"{src}/"):
        r = CliRunner().invoke(main, ["convert", str(src), dst, "--top-k", "2", "--values", "uint8",
                                      "--overwrite", "-q"])
        assert r.exit_code == 1 and "is the source store" in r.output, r.output
    assert LabelStore.open(src).complete and LabelStore.open(src).codec.top_k == 3


def test_failed_overwrite_keeps_the_old_store_and_resume_finishes_it(small_folder, tmp_path, resnet20):
    out, fresh = tmp_path / "s.zarr", tmp_path / "fresh.zarr"
    build_store(small_folder, out, resnet20, **SMALL)
    before = LabelStore.open(out).read_fields(np.arange(24), 0)
    new = {**SMALL, "values": "uint4", "teacher_name": "r20"}
    with pytest.raises(TeacherOutputError, match="finished blocks are kept"):  # breaks mid-way, like a crash
        build_store(small_folder, out, NaNTeacher(resnet20, from_call=4), overwrite=True, **new)
    old = LabelStore.open(out)  # still the old, complete store
    assert old.codec.values == "uint8" and old.complete
    for name, value in old.read_fields(np.arange(24), 0).items():
        np.testing.assert_array_equal(value, before[name])
    staged = LabelStore.open(sibling(out, "new"), allow_incomplete=True)
    assert 0 < staged.block_done().sum() < staged.num_blocks
    summary = build_store(small_folder, out, NaNTeacher(resnet20), overwrite=True, resume=True, **new)
    assert summary.blocks_skipped > 0
    build_store(small_folder, fresh, NaNTeacher(resnet20), **new)
    assert_stores_equal(out, fresh)
    assert leftovers(tmp_path) == []


def test_kill_9_during_overwrite_then_resume(tmp_path, cifar_mini_train):
    images = copy_subset(cifar_mini_train, tmp_path / "images", classes=10, per_class=8)
    ckpt = require_data("teachers", "cifar10-resnet56.th")
    common = [str(images), None, "--teacher", "cifar_resnet56", "--checkpoint", str(ckpt), "--top-k", "4",
              "--input-size", "32", "--chunk-images", "4", "--batch-size", "16", "--quiet"]
    out, whole = tmp_path / "s.zarr", tmp_path / "whole.zarr"
    cmd = [sys.executable, "-m", "hald_store", "build"]

    def args(store: Path, *extra: str) -> list[str]:
        return cmd + [common[0], str(store), *common[2:], *extra]

    subprocess.run(args(out, "-s", "2"), check=True, capture_output=True)
    old_labels = LabelStore.open(out).read_fields(np.arange(80), 1)
    kill_after_blocks(args(out, "-s", "16", "--overwrite"), Path(sibling(out, "new")))
    kept = LabelStore.open(out)  # the old store, whole and readable
    assert kept.crops_per_image == 2 and kept.complete
    for name, value in kept.read_fields(np.arange(80), 1).items():
        np.testing.assert_array_equal(value, old_labels[name])
    resumed = subprocess.run(args(out, "-s", "16", "--overwrite", "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout and " 0 already done" not in resumed.stdout
    subprocess.run(args(whole, "-s", "16"), check=True, capture_output=True)
    assert_stores_equal(out, whole)
    assert leftovers(tmp_path) == []


def test_leftovers_of_killed_creations_and_swaps_are_repaired(small_folder, tmp_path, resnet20):
    out = tmp_path / "s.zarr"
    build_store(small_folder, out, resnet20, **SMALL)
    # a creation killed before its rename: a half-written folder beside the store
    shutil.copytree(out / "images", Path(sibling(out, "tmp")) / "images")
    build_store(small_folder, out, resnet20, resume=True, **SMALL)
    assert leftovers(tmp_path) == [] and LabelStore.open(out).complete
    # an overwrite killed between the two renames of its swap: old moved away, new not yet in place
    other = tmp_path / "other.zarr"
    build_store(small_folder, other, resnet20, **{**SMALL, "crops_per_image": 2})
    os.rename(out, sibling(out, "old"))
    os.rename(other, sibling(out, "new"))
    assert not out.exists()
    build_store(small_folder, out, resnet20, resume=True, **{**SMALL, "crops_per_image": 2})
    assert LabelStore.open(out).crops_per_image == 2 and leftovers(tmp_path) == []


def test_second_writer_of_a_store_is_refused_naming_the_holder(small_folder, tmp_path, resnet20, holder):
    out = tmp_path / "s.zarr"
    build_store(small_folder, out, resnet20, **SMALL)
    proc = holder("store_lock", out, extra=", False")
    pattern = rf"store '{out}' is being written by pid {proc.pid} on host \S+ since .*\(lock file "
    with pytest.raises(LockError, match=pattern):
        build_store(small_folder, out, resnet20, resume=True, **SMALL)
    with pytest.raises(LockError, match=pattern):  # an overwrite cannot replace it under a running writer
        build_store(small_folder, out, resnet20, overwrite=True, **SMALL)
    r = CliRunner().invoke(main, ["convert", str(out), str(tmp_path / "c.zarr"), "--top-k", "2", "--values", "uint8"])
    assert r.exit_code == 0, r.output  # reading is not writing
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "c.zarr"), str(out), "--top-k", "2", "--values", "uint8",
                                  "--overwrite"])
    assert r.exit_code == 1 and f"is being written by pid {proc.pid}" in r.output, r.output
    proc.kill()
    proc.wait()
    assert build_store(small_folder, out, resnet20, resume=True, **SMALL).crops_written == 0  # the lock died with it
    assert leftovers(tmp_path) == []


def test_two_builds_resuming_one_store_in_real_processes(tmp_path, cifar_mini_train):
    images = copy_subset(cifar_mini_train, tmp_path / "images", classes=10, per_class=8)
    ckpt = require_data("teachers", "cifar10-resnet56.th")
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "hald_store", "build", str(images), str(out), "--teacher", "cifar_resnet56",
           "--checkpoint", str(ckpt), "-s", "32", "--input-size", "32", "--chunk-images", "4", "--quiet"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    owner = Path(sibling(out, "owner"))
    deadline = time.time() + 60
    while time.time() < deadline and first.poll() is None and not owner.exists():
        time.sleep(0.05)
    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert first.wait() == 0
    assert second.returncode == 1 and f"is being written by pid {first.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and LabelStore.open(out).complete


def test_second_training_run_in_one_directory_is_refused(tmp_path, small_folder, resnet20, holder):
    from hald_train.cli import main as train_main

    store = tmp_path / "s.zarr"
    build_store(small_folder, store, resnet20, **SMALL)
    run = tmp_path / "run"
    proc = holder("run_dir_lock", run)
    r = CliRunner().invoke(train_main, [str(store), str(small_folder), "--out", str(run), "--schedule", "soft:1",
                                        "--batch-size", "8", "--backend", "torchvision", "--device", "cpu", "-q"])
    assert r.exit_code == 1 and f"run directory '{run}' is being written by pid {proc.pid}" in r.output, r.output
    assert not (run / "metrics.jsonl").exists()
    proc.kill()
    proc.wait()
    r = CliRunner().invoke(train_main, [str(store), str(small_folder), "--out", str(run), "--schedule", "soft:1",
                                        "--batch-size", "8", "--backend", "torchvision", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "final.json", "learning_curve.png", "metrics.jsonl",
                                                     "model.pt"]
