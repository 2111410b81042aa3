"""torchrun: a 2-process build equals a 1-process build; mismatched ranks are refused; 2-process
DDP training runs. CPU only (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from hald_store import LabelStore, build_store

from .conftest import reevaluate, require_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_two_process_build_equals_one_process(tmp_path, small_folder, resnet20):
    ckpt = require_data("teachers", "cifar10-resnet20.th")
    one = tmp_path / "one.zarr"
    build_store(small_folder, one, resnet20, teacher_name="cifar_resnet20", num_classes=10, crops_per_image=3,
                top_k=4, input_size=32, chunk_images=5, batch_size=7, progress=False)
    two = tmp_path / "two.zarr"
    r = torchrun(2, "-m", "hald_store", "build", str(small_folder), str(two), "--teacher", "cifar_resnet20",
                 "--checkpoint", str(ckpt), "--num-classes", "10", "-s", "3", "--top-k", "4", "--input-size", "32",
                 "--chunk-images", "5", "--batch-size", "7", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("crops written") == 1 and "72 this run (5 blocks" in r.stdout  # rank 0 reports all
    assert "images scanned   24 " in r.stdout  # each of the 24 images read once over both ranks
    a, b = LabelStore.open(one), LabelStore.open(two)
    assert a.num_blocks == 5 and b.complete
    for name in ("labels/indices", "labels/codes", "labels/scale", "crops/box", "crops/flip", "images/blake2b"):
        assert np.array_equal(a.array(name)[:], b.array(name)[:]), name
    assert a.settings == b.settings


def test_ranks_with_different_settings_are_refused(tmp_path, small_folder):
    ckpt = require_data("teachers", "cifar10-resnet20.th")
    script = tmp_path / "mismatch.py"
    script.write_text(
        "import os, sys\n"
        "from hald_store import build_store, load_teacher\n"
        "from hald_store.errors import HaldStoreError\n"
        f"t = load_teacher('cifar_resnet20', {str(ckpt)!r}, 10)\n"
        "k = 3 + int(os.environ['RANK'])\n"
        "try:\n"
        f"    build_store({str(small_folder)!r}, {str(tmp_path / 'x.zarr')!r}, t, num_classes=10, crops_per_image=2,\n"
        "                top_k=k, input_size=32, progress=False)\n"
        "except HaldStoreError as e:\n"
        "    print('ERROR', e)\n"
        "    sys.exit(3)\n"
    )
    r = torchrun(2, str(script))
    assert r.returncode != 0
    assert "ranks were launched with different build settings" in r.stdout and "'top_k': 3" in r.stdout
    assert not (tmp_path / "x.zarr").exists()


def test_two_process_ddp_training(tmp_path, small_folder, resnet20):
    store = tmp_path / "s.zarr"
    build_store(small_folder, store, resnet20, num_classes=10, crops_per_image=2, top_k=3, input_size=32,
                progress=False)
    out = tmp_path / "run"
    r = torchrun(2, "-m", "hald_train", str(store), str(small_folder), "--out", str(out), "--schedule",
                 "soft:1,hard:1", "--batch-size", "4", "--val", str(small_folder), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["kind"] for ln in lines] == ["soft", "hard"]  # written once, by rank 0
    final = json.loads((out / "final.json").read_text())
    assert final["epoch"] == 2 and final["val_top1"] == reevaluate(out, store, small_folder)["top1"]
    assert r.stdout.count("trained soft:1,hard:1 (2 epochs)") == 1  # the summary, printed by rank 0 only
