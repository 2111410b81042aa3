"""One options dataclass for every loader (and the build's rendering options): an options
object and the same keywords give the same loader, keywords override an options object, and the
CLIs offer the choices and defaults it declares."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from hald_store import (BuildConfig, EvalLoader, HardLabelLoader, LabelStore, LoaderOptions, RenderOptions,
                        SoftLabelLoader)
from hald_store.cli import main as store_cli
from hald_store.errors import HaldStoreError
from hald_store.render import dali_available
from hald_train.cli import main as train_cli

from .conftest import tiny_store


@pytest.fixture(scope="module")
def options_store(tmp_path_factory, resnet20):
    """A store over 2 classes x 6 real CIFAR images, 3 crops each."""
    out, root = tiny_store(tmp_path_factory.mktemp("options"), resnet20, classes=2, per_class=6, num_classes=10,
                           crops_per_image=3, input_size=32)
    return LabelStore.open(out), root


def _same(a, b) -> None:  # (workers=0 below: rendered in this process, no forked workers)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.image_ids, y.image_ids)


def test_an_options_object_and_keywords_give_the_same_loader(options_store):
    store, root = options_store
    o = LoaderOptions(backend="torchvision", device="cpu", workers=0, batch_size=4, seed=5, shuffle=True)
    by_object = SoftLabelLoader(store, root, o)
    by_keywords = SoftLabelLoader(store, root, backend="torchvision", device="cpu", workers=0, batch_size=4, seed=5)
    assert by_object.options == by_keywords.options == o
    _same(list(by_object.iter_epoch(1)), list(by_keywords.iter_epoch(1)))
    other_seed = SoftLabelLoader(store, root, o, seed=6)  # a keyword overrides the options object
    assert other_seed.options == dataclasses.replace(o, seed=6) and other_seed.seed == 6
    hard = HardLabelLoader(store, root, o, batch_size=3)
    assert (hard.batch_size, hard.seed, hard.renderer.backend) == (3, 5, "torchvision")
    assert HardLabelLoader(store, root, backend="torchvision", batch_size=4).seed == store.settings.plan_seed


def test_eval_loader_takes_the_options_but_delivers_every_image_in_order(options_store):
    _, root = options_store
    ev = EvalLoader(root, LoaderOptions(backend="torchvision", workers=0, shuffle=True, seed=9, rank=1, world_size=2,
                                        batch_size=5), input_size=32)
    assert (ev.shuffle, ev.rank, ev.world_size, ev.batch_size) == (False, 0, 1, 5)
    ids = torch.cat([b.image_ids for b in ev.iter_epoch(0)])
    assert ids.tolist() == list(range(12))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_workers_and_other_keywords_reach_the_renderer(options_store):
    store, root = options_store
    loader = SoftLabelLoader(store, root, backend="dali", device="cpu", workers=2, batch_size=4, max_batch_size=16)
    assert (loader.renderer.num_threads, loader.renderer.max_batch_size) == (2, 16)
    with pytest.raises(HaldStoreError, match=r"unknown option\(s\) \[.no_such_option.\]"):
        SoftLabelLoader(store, root, backend="torchvision", batch_size=4, no_such_option=1)


def test_build_and_the_clis_share_the_rendering_options():
    assert {f.name for f in dataclasses.fields(RenderOptions)} <= {f.name for f in dataclasses.fields(BuildConfig)}
    assert {f.name for f in dataclasses.fields(RenderOptions)} <= {f.name for f in dataclasses.fields(LoaderOptions)}
    for cli, command in ((store_cli, ["build", "--help"]), (train_cli, ["--help"])):
        text = CliRunner().invoke(cli, command, terminal_width=200).output
        assert "[auto|dali|pillow|torchvision]" in text, text
