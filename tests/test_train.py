"""hald_train: schedules, losses, which loader each phase uses, exact resume, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hald_store import LabelStore, build_store
from hald_store.errors import HaldStoreError, OptionError, SettingsMismatchError, TrainingDivergedError
from hald_store.sources import one_torch_thread
from hald_store import resolve_model
from hald_train import (TRAIN_PRESETS, ScheduleError, TrainConfig, Trainer, cutmix, lr_factor, make_optimizer, param_groups,
                        parse_schedule, smooth_one_hot, soft_kl_loss, soft_target_cross_entropy, train)
from hald_train.cli import main as train_cli

from .conftest import copy_subset, needs_cuda, reevaluate, require_data, tiny_store


# ------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("spec,epochs,hard,expect", [
    ("shs", 10, None, "soft:2,hard:5,soft:3"),
    ("shs", 300, 150, "soft:75,hard:150,soft:75"),
    ("hs", 10, 4, "hard:4,soft:6"),
    ("sh", 10, None, "soft:5,hard:5"),
    ("hsh", 10, 5, "hard:2,soft:5,hard:3"),
    ("soft-only", 7, None, "soft:7"),
    ("hard-only", 7, None, "hard:7"),
    ("alt-soft:3", 10, None, "soft:3,hard:3,soft:3,hard:1"),
    ("alt-hard:2", 5, None, "hard:2,soft:2,hard:1"),
    ("soft:75,hard:150,soft:75", None, None, "soft:75,hard:150,soft:75"),
    (" soft : 2 , soft:1,hard:1", 4, None, "soft:3,hard:1"),
])
def test_schedules(spec, epochs, hard, expect):
    s = parse_schedule(spec, epochs, hard)
    assert str(s) == expect
    assert len(s.kinds()) == s.epochs == sum(int(p.split(":")[1]) for p in expect.split(","))
    assert [s.kind_at(e) for e in range(s.epochs)] == s.kinds()


def test_schedule_from_python_list():
    s = parse_schedule([("soft", 2), ("hard", 1)])
    assert s.phase_at(2) == 1 and s.kind_at(0) == "soft"
    with pytest.raises(IndexError):
        s.phase_at(3)


@pytest.mark.parametrize("spec,epochs,hard,match", [
    ("soft:5,medium:3", None, None, r"unknown phase kind 'medium' at character 7"),
    ("soft:5,hard", None, None, r"cannot parse schedule 'soft:5,hard' at character 7"),
    ("soft:5,,hard:1", None, None, r"at character 7"),
    ("soft:0", None, None, r"needs epochs >= 1"),
    ("hard:-3", None, None, r"needs epochs >= 1"),
    ("shs", None, None, r"schedule='shs' needs epochs=N, the total number of epochs"),
    ("shs", 0, None, r"epochs must be a positive whole number"),
    ("shs", -5, None, r"epochs must be a positive whole number"),
    ("shs", 10, 10, r"hard epochs must be between 1 and epochs - 1 = 9"),
    ("alt-soft:0", 10, None, r"block length must be >= 1"),
    ("soft:3,hard:3", 10, None, r"has 6 epochs but epochs=10"),
    ("sohs", 10, None, r"cannot parse"),
])
def test_bad_schedules(spec, epochs, hard, match):
    with pytest.raises(ScheduleError, match=match):
        parse_schedule(spec, epochs, hard)


def test_schedule_error_points_at_the_culprit():
    with pytest.raises(ScheduleError) as e:
        parse_schedule("soft:5,hard:x,soft:1")
    assert "soft:5,hard:x,soft:1\n         ^^^^^^" in str(e.value)


# --------------------------------------------------------------------------- losses
def test_soft_kl_loss_is_zero_on_the_teacher_and_positive_elsewhere():
    z = torch.randn(16, 10)
    assert soft_kl_loss(z, torch.softmax(z / 4, 1), 4.0).abs() < 1e-6
    assert soft_kl_loss(torch.zeros(16, 10), torch.softmax(z / 4, 1), 4.0) > 0


def test_smoothing_and_soft_cross_entropy():
    t = smooth_one_hot(torch.tensor([2, 0]), 5, 0.8)
    assert torch.allclose(t.sum(1), torch.ones(2)) and torch.isclose(t[0, 2], torch.tensor(0.2 + 0.16))
    logits = torch.randn(2, 5)
    onehot = smooth_one_hot(torch.tensor([2, 0]), 5, 0.0)
    assert torch.isclose(soft_target_cross_entropy(logits, onehot),
                         nn.functional.cross_entropy(logits, torch.tensor([2, 0])))


def test_cutmix_mixes_pixels_and_targets_by_area():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    targets = torch.eye(4)
    mixed, t = cutmix(x, targets, 1.0, np.random.default_rng(3))
    again, t2 = cutmix(x, targets, 1.0, np.random.default_rng(3))
    assert torch.equal(mixed, again) and torch.equal(t, t2)
    assert torch.allclose(t.sum(1), torch.ones(4))
    for i in range(4):  # each image's own-class weight is the fraction of its own pixels kept
        assert torch.isclose(t[i, i], (mixed[i, 0] == i).float().mean()) or t[i].max() == 1
    assert cutmix(x, targets, 0.0, np.random.default_rng(0))[0] is x


def test_cutmix_pairs_with_the_reversed_batch_and_drops_the_last_of_an_odd_one():
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 16, 16).contiguous()
    for seed in range(20):
        mixed, t = cutmix(x, torch.eye(5), 1.0, np.random.default_rng(seed))
        assert mixed.shape == (4, 3, 16, 16) and t.shape == (4, 5) and t[:, 4].sum() == 0  # sample 4 dropped
        pasted = mixed[:, 0] != x[:4, 0]
        assert (pasted == pasted[0]).all()  # one box for the batch
        lam = 1 - pasted[0].float().mean()
        for i in range(4):  # image i holds image 3 - i inside the box, itself outside
            assert (mixed[i, 0][pasted[0]] == 3 - i).all() and (mixed[i, 0][~pasted[0]] == i).all()
            assert torch.allclose(t[i], lam * torch.eye(5)[i] + (1 - lam) * torch.eye(5)[3 - i])
    one, t1 = cutmix(x[:1], torch.eye(5)[:1], 1.0, np.random.default_rng(0))
    assert len(one) == len(t1) == 0


def test_lr_schedule_spans_the_run():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(10, 100, 10) == 1.0 and lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0) == pytest.approx(0.0)


@pytest.mark.parametrize("eta,expect", [  # 300 epochs: the reference's 0.5 * (1 + cos(pi * epoch / epochs / eta))
    (1, {0: 1.0, 75: 0.8535534, 150: 0.5, 225: 0.1464466, 299: 0.0000274, 300: 0.0}),
    (2, {0: 1.0, 75: 0.9619398, 150: 0.8535534, 225: 0.6913417, 299: 0.5026180, 300: 0.5}),
])
def test_lr_curve_is_the_references(eta, expect):
    for epoch, factor in expect.items():
        assert lr_factor(epoch, 300, 0, eta) == pytest.approx(factor, abs=1e-7)
        assert lr_factor(epoch, 300, 0, eta) == pytest.approx(0.5 * (1 + math.cos(math.pi * epoch / 300 / eta)))


# ---------------------------------------------------------------------- optimiser
@pytest.mark.parametrize("name,convs,head", [("resnet18", 20, "fc"), ("cifar_resnet20", 19, "linear")])
def test_weight_decay_only_on_conv_and_linear_weights(name, convs, head):
    model = resolve_model(name, 10)
    by_type = {"decay": set(), "none": set()}  # the expected split, from module types rather than names
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            by_type["decay"].add(module.weight)
            by_type["none"].update([module.bias] if module.bias is not None else [])
        elif isinstance(module, nn.BatchNorm2d):
            by_type["none"].update([module.weight, module.bias])
    decay, none = param_groups(model, 0.01)
    assert {id(p) for _, p in decay["params"]} == {id(p) for p in by_type["decay"]} and decay["weight_decay"] == 0.01
    assert {id(p) for _, p in none["params"]} == {id(p) for p in by_type["none"]} and none["weight_decay"] == 0.0
    assert len(decay["params"]) == convs + 1 and f"{head}.weight" in dict(decay["params"])
    assert [n for n, _ in none["params"]][:2] == ["bn1.weight", "bn1.bias"] and f"{head}.bias" in dict(none["params"])

    opt = make_optimizer(model, "adamw", lr=0.1, weight_decay=0.5)  # zero gradients: only decay moves a parameter
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, old in zip(model.parameters(), before):
        assert torch.allclose(p, old * (0.95 if p in by_type["decay"] else 1.0))
    assert len(param_groups(model, 0.01, "all")) == 1


def test_optimizer_bad_input():
    with pytest.raises(HaldStoreError, match="decay_params must be one of"):
        param_groups(nn.Linear(2, 2), 0.01, "bias")
    with pytest.raises(HaldStoreError, match=r"optimizer must be one of \('adamw', 'sgd'\), got 'adam'"):
        make_optimizer(nn.Linear(2, 2), "adam", 1e-3, 0.01)


# ------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, resnet20):
    return tiny_store(tmp_path_factory.mktemp("train"), resnet20, classes=10, per_class=2, crops_per_image=3, top_k=4,
                      input_size=32)


def _config(tiny, out, **kw) -> TrainConfig:
    store, root = tiny
    base = dict(store=str(store), images=str(root), out_dir=str(out), student="cifar_resnet20",
                schedule="soft:1,hard:1,soft:1", batch_size=8, progress=False)
    return TrainConfig(**{**base, **kw})


def test_each_phase_feeds_its_own_loader_and_loss(tiny, tmp_path):
    trainer = Trainer(_config(tiny, tmp_path / "run", cutmix_alpha=0.0, label_smoothing=0.0))
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.01, 0.0]
    assert "bn1.weight" in trainer.optimizer.param_groups[1]["param_names"]
    seen: list[torch.Tensor] = []
    trainer.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    trainer.run()
    per_epoch = len(trainer.loaders["soft"])
    assert len(trainer.loaders["hard"]) == per_epoch and len(seen) == 3 * per_epoch
    soft0 = [b.images for b in trainer.loaders["soft"].iter_epoch(0)]
    hard1 = [b.images for b in trainer.loaders["hard"].iter_epoch(1)]
    soft2 = [b.images for b in trainer.loaders["soft"].iter_epoch(2)]
    for got, want in zip(seen, soft0 + hard1 + soft2):
        assert torch.equal(got, want)
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["kind"] for ln in lines] == ["soft", "hard", "soft"] and [ln["phase"] for ln in lines] == [0, 1, 2]
    assert lines[0]["loss"] < 0.2 < lines[1]["loss"]  # KL at T=20 vs cross-entropy
    assert [ln["lr"] for ln in lines] == pytest.approx([1e-3 * lr_factor(e, 3, 0, 2.0) for e in range(3)])
    assert (tmp_path / "run" / "model.pt").exists() and json.loads((tmp_path / "run" / "final.json").read_text())


@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_lr_is_stepped_once_per_epoch_over_all_phases(tiny, tmp_path, eta):
    trainer = Trainer(_config(tiny, tmp_path / "run", schedule="soft:2,hard:1,soft:1", lr=2e-3, lr_eta=eta))
    used: list[list[float]] = []  # the LR of every group at every training forward
    trainer.model.register_forward_pre_hook(
        lambda m, args: used.append([g["lr"] for g in trainer.optimizer.param_groups]) if m.training else None)
    trainer.run()
    per_epoch = len(trainer.loaders["soft"])
    want = [2e-3 * 0.5 * (1 + math.cos(math.pi * e / 4 / eta)) for e in range(4)]
    assert used == [[pytest.approx(w)] * len(used[0]) for w in want for _ in range(per_epoch)]
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["lr"] for ln in lines] == pytest.approx(want)


def test_hard_phases_use_their_own_batch_size(tiny, tmp_path):
    trainer = Trainer(_config(tiny, tmp_path / "run", batch_size=8, hard_batch_size=7))
    seen: list[torch.Tensor] = []
    trainer.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    trainer.run()
    assert [len(x) for x in seen] == [8, 8, 4] + [6, 6, 6] + [8, 8, 4]  # 20 images; odd hard batches lose one
    batches = list(trainer.loaders["hard"].iter_epoch(1))
    assert [len(b.images) for b in batches] == [7, 7, 6]
    rng = np.random.default_rng([0, 1])  # the trainer's CutMix draws for epoch 1
    for got, batch in zip(seen[3:6], batches):
        want, _ = cutmix(batch.images, smooth_one_hot(batch.hard, 10, 0.8), 1.0, rng)
        assert torch.equal(got, want)


@pytest.mark.parametrize("reset, hard, last", [
    (False, [6, 7, 8], [9, 10, 11]), ("never", [6, 7, 8], [9, 10, 11]), (True, [0, 1, 2], [0, 1, 2]),
    ("every", [0, 1, 2], [0, 1, 2]), ("to-hard", [0, 1, 2], [3, 4, 5]), ("to-soft", [6, 7, 8], [0, 1, 2])])
def test_optimizer_moments_carry_over_phases_unless_reset(tiny, tmp_path, reset, hard, last):
    trainer = Trainer(_config(tiny, tmp_path / "run", schedule="soft:2,hard:1,soft:1", reset_optimizer=reset))
    weight = trainer.optimizer.param_groups[0]["params"][0]
    steps: list[int] = []  # Adam's step count for that weight before every training forward
    trainer.model.register_forward_pre_hook(
        lambda m, args: steps.append(int(trainer.optimizer.state.get(weight, {}).get("step", 0))) if m.training else None)
    trainer.run()
    assert steps == [0, 1, 2, 3, 4, 5] + hard + last  # the reference keeps one state ("never")


def test_adam_beta2_reaches_the_optimizer_and_is_checked(tiny, tmp_path):
    trainer = Trainer(_config(tiny, tmp_path / "run", adam_beta2=0.9))
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.9)
    with pytest.raises(OptionError, match="adam_beta2 must be in"):
        Trainer(_config(tiny, tmp_path / "run2", adam_beta2=1.0))
    with pytest.raises(OptionError, match="reset_optimizer must be one of"):
        Trainer(_config(tiny, tmp_path / "run3", reset_optimizer="sometimes"))


def _precision_probe(trainer: Trainer) -> list[tuple]:
    """Per training forward: (autocast on, input channels-last, conv weight channels-last, logits dtype)."""
    seen: list[tuple] = []
    conv = trainer.net.conv1.weight

    def hook(m, args, out):
        if m.training:
            x = args[0]
            seen.append((torch.is_autocast_enabled(x.device.type), x.is_contiguous(memory_format=torch.channels_last),
                         conv.is_contiguous(memory_format=torch.channels_last), out.dtype))
    trainer.model.register_forward_hook(hook)
    return seen


def test_mixed_precision_is_off_on_cpu(tiny, tmp_path):
    trainer = Trainer(_config(tiny, tmp_path / "amp", device="cpu", amp=True))
    seen = _precision_probe(trainer)
    trainer.run()
    assert not trainer.amp and seen and set(seen) == {(False, False, False, torch.float32)}
    train(_config(tiny, tmp_path / "fp32", device="cpu", amp=False))
    a, b = (torch.load(tmp_path / d / "model.pt") for d in ("amp", "fp32"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same code, the same numbers


@needs_cuda
def test_mixed_precision_and_channels_last_on_cuda(tiny, tmp_path):
    trainer = Trainer(_config(tiny, tmp_path / "run", device="cuda", backend="torchvision"))
    seen = _precision_probe(trainer)
    last = trainer.run()
    assert trainer.amp and set(seen) == {(True, True, True, torch.bfloat16)} and math.isfinite(last["loss"])


def test_resume_gives_identical_weights(tiny, tmp_path):
    kw = dict(schedule="soft:1,hard:2,soft:1", eval_every=1, val=str(tiny[1]))
    full = _config(tiny, tmp_path / "full", **kw)
    train(full)
    part = _config(tiny, tmp_path / "part", stop_after=2, **kw)
    train(part)
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "part" / "model.pt").exists()
    train(_config(tiny, tmp_path / "part", **kw), resume=True)
    a = torch.load(tmp_path / "full" / "model.pt")
    b = torch.load(tmp_path / "part" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k not in ("images_per_s", "seconds")}  # noqa: E731
                       for ln in p.read_text().splitlines()]
    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "part" / "metrics.jsonl")


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    train(_config(tiny, tmp_path / "run", stop_after=1))
    with pytest.raises(SettingsMismatchError, match=r"lr: 0.001 -> 0.002(.|\n)*batch_size: 8 -> 4|batch_size: 8 -> 4"):
        train(_config(tiny, tmp_path / "run", lr=0.002, batch_size=4), resume=True)
    with pytest.raises(HaldStoreError, match="already holds a run; pass resume=True"):
        train(_config(tiny, tmp_path / "run"))


def seven_class_net() -> nn.Module:
    """A factory that ignores num_classes (for the class-mismatch test)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))


@pytest.mark.parametrize("kw,match", [
    (dict(hard_batch_size=21), r"hard_batch_size of hard phases must be between 2 .* and the 20 images .* got 21"),
    (dict(hard_batch_size=1), r"hard_batch_size of hard phases must be between 2 \(CutMix pairs images\)"),
    (dict(batch_size=1), r"batch_size of hard phases must be between 2"),
    (dict(hard_batch_size=0), r"hard_batch_size must be > 0, got 0"),
    (dict(lr_eta=0), r"lr_eta must be a finite number > 0, got 0"),
])
def test_bad_trainer_settings_name_the_parameter(tiny, tmp_path, kw, match):
    with pytest.raises(HaldStoreError, match=match):
        Trainer(_config(tiny, tmp_path / "run", **kw))


def test_student_and_validation_class_mismatch(tiny, tmp_path):
    with pytest.raises(HaldStoreError, match="student 'tests.test_train:seven_class_net' outputs 7 classes but the store has 10"):
        Trainer(_config(tiny, tmp_path / "a", student="tests.test_train:seven_class_net"))
    val = copy_subset(require_data("cifar10-mini", "test"), tmp_path / "val", classes=9, per_class=1)
    with pytest.raises(HaldStoreError, match="classes of .* differ .*missing: 'truck'"):
        Trainer(_config(tiny, tmp_path / "b", val=str(val)))


def test_cli_reports_bad_schedule_and_trains(tiny, tmp_path):
    store, root = tiny
    r = CliRunner().invoke(train_cli, [str(store), str(root), "--out", str(tmp_path / "x"), "--schedule", "soft:2,hadr:1"])
    assert r.exit_code == 1 and "unknown phase kind 'hadr' at character 7" in r.output
    r = CliRunner().invoke(train_cli, [str(store), str(root), "--out", str(tmp_path / "x"), "--schedule", "shs"])
    assert r.exit_code == 1 and "--schedule shs needs --epochs N, the total number of epochs" in r.output
    r = CliRunner().invoke(train_cli, [str(store), str(root), "--out", str(tmp_path / "x"), "--schedule", "hs",
                                       "--epochs", "2", "--batch-size", "10", "--val", str(root), "-q"])
    assert r.exit_code == 0, r.output
    final = json.loads((tmp_path / "x" / "final.json").read_text())
    assert final["schedule"] == "hard:1,soft:1" and final["val_top1"] == reevaluate(tmp_path / "x", store, root)["top1"]
    assert LabelStore.open(store).complete


def test_hald_reference_preset_pins_the_reference_settings():
    assert TRAIN_PRESETS["hald-reference"] == {
        "schedule": "shs", "epochs": 300, "batch_size": 16, "hard_batch_size": 16, "optimizer": "adamw", "lr": 1e-3,
        "lr_eta": 2.0, "weight_decay": 0.01, "decay_params": "weights", "warmup_epochs": 0, "temperature": 20.0,
        "cutmix_alpha": 1.0, "label_smoothing": 0.8, "reset_optimizer": "never", "adam_beta2": 0.999,
    }
    c = TrainConfig.from_preset("hald-reference", store="s", images="i", out_dir="o", lr=5e-4)
    assert c.lr == 5e-4 and c.hard_batch == 16 and c.amp
    assert str(parse_schedule(c.schedule, c.epochs, c.hard_epochs)) == "soft:75,hard:150,soft:75"  # S6, 150 + 150
    with pytest.raises(HaldStoreError, match="unknown preset 'hald'; presets: hald-reference"):
        TrainConfig.from_preset("hald", store="s", images="i", out_dir="o")


def test_cli_preset_sets_defaults_and_flags_override_it(tiny, tmp_path):
    store, root = tiny
    r = CliRunner().invoke(train_cli, [str(store), str(root), "--out", str(tmp_path / "x"), "--preset", "hald-reference",
                                       "--epochs", "3", "--lr-eta", "1", "-q"])
    assert r.exit_code == 0, r.output
    config = torch.load(tmp_path / "x" / "checkpoint.pt", weights_only=False)["config"]
    want = TrainConfig.from_preset("hald-reference", store=str(store), images=str(root), out_dir=str(tmp_path / "x"),
                                   epochs=3, lr_eta=1.0).settings()
    assert config == want and config["batch_size"] == 16 and config["temperature"] == 20.0
    assert json.loads((tmp_path / "x" / "final.json").read_text())["schedule"] == "soft:1,hard:1,soft:1"


def test_demo_end_to_end_small(tmp_path):
    """The embedded demo's whole chain on a tiny budget; a second call reuses every step."""
    from hald_train.demo import DemoSettings, format_table, run_demo

    s = DemoSettings(num_classes=3, train_per_class=8, test_per_class=4, teacher_epochs=1, student_epochs=4,
                     batch_size=8, teacher_batch_size=8, train_teacher=True)
    r = run_demo(tmp_path / "demo", s, progress=False)
    assert set(r["students"]) == {"shs", "soft-only"} and r["num_crops"] == 3 * 8 * s.crops_per_image
    assert r["students"]["shs"]["schedule"] == "soft:1,hard:2,soft:1"
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0
    assert [m["kind"] for m in r["students"]["shs"]["curve"]] == ["soft", "hard", "hard", "soft"]  # evaluated each epoch
    table = format_table(r)
    assert "shs" in table and "soft-only" in table and "B/crop" in table and "storage_vs_accuracy.py" in table
    shs, soft = (r["students"][k]["test_top1"] for k in ("shs", "soft-only"))
    assert ("did not help" in table) == (shs < soft) and ("above soft-only" in table) == (shs > soft)  # says what it measured
    mtime = (tmp_path / "demo" / "teacher.pt").stat().st_mtime
    assert run_demo(tmp_path / "demo", s, progress=False)["students"] == r["students"]
    assert (tmp_path / "demo" / "teacher.pt").stat().st_mtime == mtime


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0])
def test_non_finite_temperature_is_refused(value):
    with pytest.raises(HaldStoreError, match="temperature must be a finite number > 0"):
        TrainConfig(store="s.zarr", images="img", out_dir="run", temperature=value).check()


def test_config_errors_name_parameters_and_the_cli_names_flags(tmp_path):
    with pytest.raises(HaldStoreError, match="label_smoothing must be in"):
        TrainConfig(store="s", images="i", out_dir=str(tmp_path), label_smoothing=1.0).check()
    for extra, message in ((["--batch-size", "0"], "--batch-size must be > 0, got 0"),
                           (["--workers", "-1"], "--workers must be >= 0, got -1"),
                           (["--stop-after", "0"], "--stop-after must be >= 1, got 0")):
        r = CliRunner().invoke(train_cli, ["nostore", str(tmp_path), "--out", str(tmp_path / "x"), *extra])
        assert r.exit_code == 1 and f"Error: {message}" in r.output, r.output


# ------------------------------------------------------------- the run's ends, kills
# Trains in a real process that kills itself (SIGKILL) at an exact point: when it opens the n-th
# FILE for appending, or once it wrote the first 11 bytes of the n-th FILE it writes whole
# (through open(), or torch.save to a path).
KILLED_RUN = """
import builtins, json, os, signal, sys, torch
from hald_train import TrainConfig, train
config, target, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seen = [0]
def hit(path):
    if isinstance(path, (str, os.PathLike)) and os.path.basename(path).startswith(target):
        seen[0] += 1
        return seen[0] == n
def die():
    os.kill(os.getpid(), signal.SIGKILL)
class Dies:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        self.f.write(data[:11])
        self.f.flush()
        die()
real_open, real_save = builtins.open, torch.save
def open_(file, mode="r", *args, **kw):
    if "a" in mode and hit(file):
        die()
    f = real_open(file, mode, *args, **kw)
    return Dies(f) if "w" in mode and hit(file) else f
def save(obj, f, *args, **kw):
    real_save(obj, f, *args, **kw)
    if hit(f):
        os.truncate(f, 11)
        die()
builtins.open, torch.save = open_, save
train(TrainConfig(**config))
"""


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in rows]


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = torch.load(a), torch.load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run that killed-and-resumed runs must equal."""
    out = tmp_path_factory.mktemp("full") / "run"
    with one_torch_thread():  # as the killed runs' processes (other counts round differently)
        train(_config(tiny, out, val=str(tiny[1])))
    return out


@pytest.mark.parametrize("target,n", [("metrics.jsonl", 2), ("checkpoint.pt", 2), ("model.pt", 1)])
def test_a_kill_at_the_runs_ends_loses_nothing(tiny, tmp_path, full_run, target, n):
    """Killed just before epoch 2's metrics line, while writing epoch 2's checkpoint, or while
    writing model.pt: --resume ends with the uninterrupted run's metrics, model.pt and final.json."""
    config = _config(tiny, tmp_path / "run", val=str(tiny[1]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(config.__dict__), target, str(n)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "final.json").exists()
    store, root = tiny
    with one_torch_thread():  # as the killed runs' processes (other counts round differently)
        r = CliRunner().invoke(train_cli, [str(store), str(root), "--out", str(tmp_path / "run"), "--val", str(root),
                                           "--schedule", "soft:1,hard:1,soft:1", "--batch-size", "8", "--resume", "-q"])
    assert r.exit_code == 0, r.output
    assert ("had already finished" in r.output) == (target == "model.pt"), r.output
    assert _strip(_rows(tmp_path / "run")) == _strip(_rows(full_run))
    assert _same_weights(tmp_path / "run" / "model.pt", full_run / "model.pt")
    final, want = (json.loads((d / "final.json").read_text()) for d in (tmp_path / "run", full_run))
    assert _strip([final]) == _strip([want]) and final["best_epoch"] == 3
    assert (tmp_path / "run" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_without_a_checkpoint_starts_the_run(tiny, tmp_path):
    store, root = tiny
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1, "kind": "so')  # killed before any checkpoint
    r = CliRunner().invoke(train_cli, [str(store), str(root), "--out", str(tmp_path / "run"), "--schedule", "soft:1",
                                       "--batch-size", "8", "--resume", "-q"])
    assert r.exit_code == 0, r.output
    assert "no checkpoint" in r.output and "started the run" in r.output
    assert [row["epoch"] for row in _rows(tmp_path / "run")] == [1]
    assert json.loads((tmp_path / "run" / "final.json").read_text())["epoch"] == 1


def test_partial_last_metrics_line_is_dropped_on_resume(tiny, tmp_path, full_run):
    with one_torch_thread():  # as the killed runs' processes (other counts round differently)
        train(_config(tiny, tmp_path / "run", val=str(tiny[1]), stop_after=1))
        with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
            f.write('{"epoch": 2, "phase": 1, "ki')  # a kill while writing epoch 2's line (its checkpoint never came)
        train(_config(tiny, tmp_path / "run", val=str(tiny[1])), resume=True)
    assert _strip(_rows(tmp_path / "run")) == _strip(_rows(full_run))


@pytest.mark.parametrize("damage", ["checkpoint", "metrics"])
def test_damaged_run_files_give_one_line_errors(tiny, tmp_path, damage):
    store, root = tiny
    args = [str(store), str(root), "--out", str(tmp_path / "run"), "--schedule", "soft:1,hard:1,soft:1",
            "--batch-size", "8", "-q"]
    assert CliRunner().invoke(train_cli, [*args, "--stop-after", "2"]).exit_code == 0
    if damage == "checkpoint":
        path = tmp_path / "run" / "checkpoint.pt"
        os.truncate(path, path.stat().st_size // 2)
        message = "is damaged or truncated"
    else:
        path = tmp_path / "run" / "metrics.jsonl"
        path.write_text("not json\n" + path.read_text())
        message = "line 1 is not a metrics row"
    before = path.read_bytes()
    r = CliRunner().invoke(train_cli, [*args, "--resume"])
    assert r.exit_code == 1 and message in r.output and str(path) in r.output, r.output
    assert r.output.count("\n") == 1 and path.read_bytes() == before  # one line, nothing touched


def test_non_finite_loss_stops_the_run(tiny, tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"epoch \d \(\w+\): the loss became (nan|inf) at batch \d of 3"):
        train(_config(tiny, tmp_path / "run", lr=1e20))
    assert not (tmp_path / "run" / "model.pt").exists()
    store, root = tiny
    r = CliRunner().invoke(train_cli, [str(store), str(root), "--out", str(tmp_path / "cli"), "--schedule", "soft:3",
                                       "--batch-size", "8", "--lr", "1e20", "-q"])
    assert r.exit_code == 1 and "training diverged" in r.output and "try a smaller --lr" in r.output, r.output
    assert r.output.count("\n") == 1


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
    ("--momentum", "nan", "--momentum must be in [0, 1), got nan"),
    ("--cutmix-alpha", "inf", "--cutmix-alpha must be a finite number >= 0, got inf"),
    ("--lr-eta", "inf", "--lr-eta must be a finite number > 0, got inf"),
    ("--eval-crop-fraction", "nan", "--eval-crop-fraction must be in [0, 1], got nan"),
    ("--seed", "-1", "--seed must be a whole number from 0 to 2**63 - 1, got -1"),
    ("--seed", "12345678901234567890", "--seed must be a whole number from 0 to 2**63 - 1, got 12345678901234567890"),
])
def test_float_and_seed_flags_must_be_finite_and_in_range(tmp_path, flag, value, message):
    r = CliRunner().invoke(train_cli, ["nostore", str(tmp_path), "--out", str(tmp_path / "x"), flag, value])
    assert r.exit_code == 1 and r.output == f"Error: {message}\n", r.output


def test_the_end_of_a_run_is_a_human_summary(tiny, tmp_path):
    store, root = tiny
    args = [str(store), str(root), "--schedule", "soft:1,hard:1,soft:1", "--batch-size", "8", "--eval-every", "1",
            "--val", str(root)]
    r = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    final = json.loads((out / "final.json").read_text())
    assert "{" not in r.output and "trained soft:1,hard:1,soft:1 (3 epochs) in" in r.output
    assert (f"best {100 * final['best_val_top1']:.2f}% (epoch {final['best_epoch']})" in r.output
            and f"val top-1 {100 * final['val_top1']:.2f}% at the end (epoch 3)" in r.output)
    for name in ("model.pt", "metrics.jsonl", "learning_curve.png"):
        assert str(out / name) in r.output and (out / name).stat().st_size > 0
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    q = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "q"), "-q"])
    assert q.exit_code == 0 and len(q.output.splitlines()) == 2 and str(tmp_path / "q" / "model.pt") in q.output


def test_an_image_replaced_by_random_bytes_is_one_line_not_a_segfault(tmp_path, resnet20):
    """DALI 2.4 crashes the process (SIGSEGV, in 3 of 4 runs before the fix) when one image of a
    60-image batch fails to decode; the loader now checks the files' hashes before DALI sees them."""
    pytest.importorskip("nvidia.dali", reason="the crash is DALI's")
    root = copy_subset(require_data("cifar10-mini", "train"), tmp_path / "images", classes=10, per_class=7)
    build_store(root, tmp_path / "s.zarr", resnet20, crops_per_image=1, top_k=4, input_size=32, progress=False)
    bad = sorted((root / "airplane").iterdir())[5]
    stat = bad.stat()
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, stat.st_size, dtype=np.uint8).tobytes())
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same time: only the content changed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for run in range(3):
        proc = subprocess.run([sys.executable, "-m", "hald_train", str(tmp_path / "s.zarr"), str(root), "--out",
                               str(tmp_path / f"run{run}"), "--schedule", "soft:2", "--batch-size", "60",
                               "--workers", "1", "--backend", "dali", "-q"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr and "changed since the store was built" in proc.stderr
