"""Batch-specific labels: the batch plan, train-mode/CutMix labelling, exact replay, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hald_store import LabelStore, SoftLabelLoader, build_store, reencode_store
from hald_store.batch_plan import BatchPlan
from hald_store.build import batch_stats_teacher
from hald_store.cli import main
from hald_store.errors import HaldStoreError
from hald_store.replay import replay_epoch
from hald_train import TrainConfig, train

from .conftest import agreeing, build_replay_store, require_data


@pytest.fixture(scope="module")
def replay_store(tmp_path_factory, resnet56):
    """cifar10-dc-ipc50 labelled by ResNet-56 with BatchNorm batch statistics and CutMix."""
    images = require_data("cifar10-dc-ipc50")
    return build_replay_store(images, resnet56, tmp_path_factory.mktemp("replay") / "r.zarr"), images


@pytest.mark.parametrize("mix", ["none", "cutmix", "mixup"])
def test_batch_plan_is_pure_and_complete(mix):
    plan = BatchPlan(num_images=100, epochs=3, batch_size=16, seed=4, mix=mix, size=32)
    a, b = plan.arrays(), BatchPlan(**plan.to_dict()).arrays()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["members"].shape == (3, 7, 16)
    for e in range(3):
        m = a["members"][e]
        assert sorted(m[m >= 0].tolist()) == list(range(100))  # every image once per epoch
        for row, perm, lam, box in zip(m, a["perm"][e], a["lam"][e], a["box"][e]):
            n = int((row >= 0).sum())
            assert sorted(perm[:n].tolist()) == list(range(n)) and (perm[n:] == -1).all()
            assert 0 <= lam <= 1
            if mix == "cutmix" and n > 1:
                y0, y1, x0, x1 = box
                assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 32**2)
            if mix == "none":
                assert lam == 1 and (perm[:n] == np.arange(n)).all()
    assert not np.array_equal(a["members"][0], a["members"][1])


def test_replay_reproduces_stored_labels(replay_set):
    """Done-when of the issue: the teacher re-run in the same mode on replayed, re-mixed batches
    agrees with the stored top-1 on >= 99% of crops."""
    store, images, resnet56 = replay_set
    teacher = batch_stats_teacher(resnet56)
    loader = SoftLabelLoader(store, images, batch_size=64, seed=1)
    assert loader.replay and len(loader) == 8
    agree = total = 0
    used = []
    for epoch in range(3):
        le = replay_epoch(3, epoch, seed=1)
        used.append(le)
        plan = store.batches(le)
        for b, batch in zip(loader.batch_order(epoch), loader.iter_epoch(epoch)):
            members = plan["members"][b]
            assert torch.equal(batch.image_ids.cpu(), torch.from_numpy(members[members >= 0]))
            assert (batch.crop_seeds == le).all()
            agree += agreeing(teacher, batch)
            total += len(batch.images)
    assert sorted(used) == [0, 1, 2]  # the pool of labelling epochs, without replacement
    assert total == 1500 and agree / total >= 0.99, agree / total
    # the running statistics of the caller's teacher were not touched
    fresh_copy = batch_stats_teacher(resnet56)
    assert all(torch.equal(a, b) for a, b in zip(resnet56.state_dict().values(), fresh_copy.state_dict().values()))


def test_verify_deep_replays_batch_specific_stores_as_built(replay_store):
    """A correct train-mode + CutMix store passes `verify --deep` (it used to fail at ~28%: the
    crops were checked one by one by an eval-mode teacher, without their batch and mix)."""
    store, images = replay_store
    ckpt = require_data("teachers", "cifar10-resnet56.th")
    r = CliRunner().invoke(main, ["verify", store.path, str(images), "--deep", "--teacher", "cifar_resnet56",
                                  "--checkpoint", str(ckpt), "--sample", "128", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["passed"] and report["num_crops"] == 128 and report["top1_agreement"] >= 0.99


def test_resume_redoes_only_unfinished_epochs(replay_store, tmp_path, resnet56):
    store, images = replay_store
    copy = tmp_path / "c.zarr"
    shutil.copytree(store.path, copy)
    broken = LabelStore.open(copy, mode="r+")
    broken.array("progress/block_done")[1] = 0  # as if killed during labelling epoch 1
    broken.array("labels/indices")[:, 1] = 0
    summary = build_store(images, copy, resnet56, crops_per_image=3, top_k=5, input_size=32, teacher_mode="train",
                          mix="cutmix", labelling_batch_size=64, resume=True, progress=False)
    assert summary.crops_written == 500 and summary.blocks_skipped == 2
    again = LabelStore.open(copy)
    for name in ("labels/indices", "labels/codes", "labels/scale", "batches/members", "batches/box"):
        assert np.array_equal(again.array(name)[:], store.array(name)[:]), name


def test_convert_keeps_the_recorded_batches(replay_store, tmp_path):
    store, images = replay_store
    out = reencode_store(store, tmp_path / "k2.zarr", top_k=2, values="uint4", progress=False)
    assert out.batch_mode and np.array_equal(out.array("batches/perm")[:], store.array("batches/perm")[:])
    i, s = np.divmod(np.arange(out.num_crops), 3)
    a, b = out.read(i, s).indices, store.read(i, s).indices[:, :2]
    assert torch.equal(a[:, 0], b[:, 0])  # 2nd places can swap where uint8 made two gaps equal
    assert (a == b).all(1).double().mean() > 0.97


def test_hald_train_shs_from_a_replay_store(replay_store, tmp_path):
    store, images = replay_store
    last = train(TrainConfig(store=store.path, images=str(images), out_dir=str(tmp_path / "run"), schedule="shs",
                             epochs=4, batch_size=64, progress=False))
    kinds = [json.loads(ln)["kind"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["soft", "hard", "hard", "soft"] and last["epoch"] == 4
    with pytest.raises(HaldStoreError, match="needs batch_size = the labelling batch size 64"):
        train(TrainConfig(store=store.path, images=str(images), out_dir=str(tmp_path / "r2"), schedule="soft-only",
                          epochs=1, batch_size=32, progress=False))


def test_replay_bad_input(replay_store, tmp_path, small_folder, resnet20):
    store, images = replay_store
    with pytest.raises(HaldStoreError, match="needs batch_size = the labelling batch size 64.*got 100"):
        SoftLabelLoader(store, images, batch_size=100)
    with pytest.raises(HaldStoreError, match="holds batch-specific labels: read it with replay=True"):
        SoftLabelLoader(store, images, batch_size=64, replay=False)
    with pytest.raises(HaldStoreError, match="does not match the images recorded in store"):
        SoftLabelLoader(store, require_data("cifar10-mini", "train"), batch_size=64)
    plain = tmp_path / "plain.zarr"
    build_store(small_folder, plain, resnet20, num_classes=10, crops_per_image=2, input_size=32, progress=False)
    with pytest.raises(HaldStoreError, match="no recorded labelling batches to replay"):
        SoftLabelLoader(plain, small_folder, batch_size=8, replay=True)


@pytest.mark.parametrize("args,match", [
    (["--mix-alpha", "0.5"], "--mix-alpha needs --mix cutmix or --mix mixup"),
    (["--labelling-batch-size", "8"], "--labelling-batch-size applies to batch-specific labels only"),
    (["--teacher-mode", "train", "--labelling-batch-size", "1"], "too small for BatchNorm batch statistics"),
    (["--mix", "cutmix", "--mix-alpha", "0"], "--mix-alpha must be a finite number > 0"),
    (["--mix", "mixup", "--labelling-batch-size", "25"], "labelling batch size must be between 1 and 24 images"),
])
def test_contradicting_labelling_options(args, match, small_folder, tmp_path):
    ckpt = require_data("teachers", "cifar10-resnet20.th")
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["build", str(small_folder), str(out), "--teacher", "cifar_resnet20", "--checkpoint",
                                  str(ckpt), "--num-classes", "10", "-s", "2", "--input-size", "32", "-q", *args])
    assert r.exit_code == 1 and match in r.output, r.output
    assert not out.exists()
