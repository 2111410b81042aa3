"""Phase kinds as registered classes: the schedule, TrainConfig and hald-train read one registry."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from hald_store import build_store
from hald_store.errors import HaldStoreError, OptionError, SettingsMismatchError
from hald_train import (PHASE_KINDS, PhaseKind, TrainConfig, Trainer, parse_schedule, register_phase_kind, soft_kl_loss,
                        train)
from hald_train.cli import main as train_cli
from hald_train.phases import HardOptions, option, option_fields
from hald_train.presets import RESETS

from .conftest import generated_images, random_teacher

# what TrainConfig.settings() held before phase kinds were classes: checkpoints written then must resume
SETTINGS_BEFORE = {
    "store", "images", "out_dir", "val", "student", "schedule", "epochs", "hard_epochs", "batch_size",
    "hard_batch_size", "optimizer", "lr", "lr_eta", "weight_decay", "decay_params", "momentum", "warmup_epochs", "temperature",
    "cutmix_alpha", "label_smoothing", "reset_optimizer", "adam_beta2", "eval_every", "eval_crop_fraction", "seed",
    "backend", "amp",
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A store over 3 x 6 generated scenes labelled by a seeded random ResNet-20; (store, images)."""
    tmp = tmp_path_factory.mktemp("phases")
    images = generated_images(tmp / "data", classes=3, per_class=6)
    build_store(images, tmp / "s.zarr", random_teacher(num_classes=3), crops_per_image=2, top_k=3, input_size=32,
                backend="torchvision", progress=False)
    return tmp / "s.zarr", images


def config(scenes, out, **kw) -> TrainConfig:
    store, images = scenes
    return TrainConfig(**{**dict(store=str(store), images=str(images), out_dir=str(out), schedule="soft:1,hard:1",
                                 batch_size=6, backend="torchvision", device="cpu", workers=0, progress=False), **kw})


@pytest.mark.parametrize("kind", list(PHASE_KINDS))
def test_every_registered_kind_is_a_schedule_phase_and_a_reset_choice(kind):
    assert [p.kind for p in parse_schedule(f"{kind}:2,{kind}:1").phases] == [kind]
    assert f"to-{kind}" in RESETS and kind in RESETS["every"]
    PHASE_KINDS[kind].Options().check()  # the declared defaults pass the kind's own checks


def test_unknown_kind_lists_the_registered_ones():
    with pytest.raises(HaldStoreError, match=f"use {' or '.join(PHASE_KINDS)}"):
        parse_schedule("soft:1,medium:1")


def test_hald_train_has_one_flag_per_phase_option_with_its_declared_default():
    params = {p.name: p for p in train_cli.params}
    for f in option_fields():
        flag = params[f.name]
        assert flag.default == f.default and flag.help == f.metadata["help"] and flag.type.name == {
            float: "float", int: "integer"}[f.metadata["type"]]
        assert f"--{f.name.replace('_', '-')}" in flag.opts
    assert "-T" in params["temperature"].opts


def test_config_groups_each_kinds_options_and_keeps_the_flat_settings(tmp_path):
    c = TrainConfig(store="s", images="i", out_dir="o", cutmix_alpha=0.25, hard_batch_size=4, temperature=3.0)
    assert c.phase_options("hard") == HardOptions(cutmix_alpha=0.25, label_smoothing=0.8, hard_batch_size=4)
    assert c.phase_options("soft").temperature == 3.0 and c.hard_batch == 4
    assert SETTINGS_BEFORE <= set(c.settings()) and {f.name for f in option_fields()} <= set(c.settings())
    assert TrainConfig(**json.loads(json.dumps(c.__dict__))) == c
    with pytest.raises(OptionError, match="cutmix_alpha must be a finite number >= 0, got -1.0"):
        TrainConfig(store="s", images="i", out_dir="o", cutmix_alpha=-1.0).check()


def test_a_kind_whose_option_clashes_or_whose_name_is_taken_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        cutmix_alpha: float = option(0.5, "another meaning")

    class Twice(PhaseKind):
        name = "soft"

    class Other(PhaseKind):
        name, Options = "clash", Clash

    with pytest.raises(ValueError, match="a phase kind named 'soft' is already registered"):
        register_phase_kind(Twice)
    with pytest.raises(ValueError, match="phase option 'cutmix_alpha' of 'clash' clashes with 'hard'"):
        register_phase_kind(Other)
    assert "clash" not in PHASE_KINDS


def test_a_checkpoint_from_before_a_kinds_options_resumes(scenes, tmp_path):
    """A checkpoint lacking a phase option (written before its kind existed) resumes with its default; a
    changed option is still refused."""
    run = tmp_path / "run"
    train(config(scenes, run, stop_after=1))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["config"]["label_smoothing"]
    torch.save(state, run / "checkpoint.pt")
    with pytest.raises(SettingsMismatchError, match="label_smoothing: 0.8 -> 0.5"):
        train(config(scenes, run, label_smoothing=0.5), resume=True)
    assert train(config(scenes, run), resume=True)["epoch"] == 2


def test_mixed_phase_weighs_the_soft_kl_and_the_hard_cross_entropy_of_each_batch(scenes, tmp_path):
    """``mixed`` with weight 1 is ``soft`` bit for bit; with 0.3 its epoch loss is the weighted sum,
    recomputed here from the student's logits and the loader's own batches."""
    train(config(scenes, tmp_path / "soft", schedule="soft:2"))
    train(config(scenes, tmp_path / "w1", schedule="soft:1,mixed:1", mixed_weight=1.0))
    a, b = (torch.load(tmp_path / d / "model.pt") for d in ("soft", "w1"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    trainer = Trainer(config(scenes, tmp_path / "w03", schedule="mixed:1", mixed_weight=0.3, temperature=4.0))
    logits: list[torch.Tensor] = []
    trainer.model.register_forward_hook(lambda m, args, out: logits.append(out.detach()) if m.training else None)
    row = trainer.run()
    batches = list(trainer.loaders["mixed"].iter_epoch(0))
    assert len(batches) == len(logits) == 3 and row["kind"] == "mixed"
    want = [0.3 * soft_kl_loss(z, b.soft, 4.0) + 0.7 * F.cross_entropy(z, b.hard) for z, b in zip(logits, batches)]
    assert row["loss"] == pytest.approx(float(sum(w * len(b.hard) for w, b in zip(want, batches)) / 18), rel=1e-5)
    with pytest.raises(OptionError, match="mixed_weight must be in \\[0, 1\\], got 1.5"):
        Trainer(config(scenes, tmp_path / "bad", schedule="mixed:1", mixed_weight=1.5))
