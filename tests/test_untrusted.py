"""Untrusted files: planted checkpoints, crafted store paths, links, crafted arrays (real stores,
real images, a real trainer)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from hald_store import LabelStore, build_store
from hald_store.errors import HaldStoreError
from hald_train.trainer import TrainConfig, train

BUILD = dict(num_classes=10, crops_per_image=2, top_k=3, values="uint8", input_size=32, batch_size=16, chunk_images=8,
             backend="torchvision", progress=False)


@pytest.fixture
def built(small_folder, tmp_path, resnet20):
    """A real store of the 24 images of ``small_folder``: (store path, image root)."""
    out = tmp_path / "s.zarr"
    build_store(small_folder, out, resnet20, **BUILD)
    return out, small_folder


class Planted:
    """Unpickling this writes a file: what a hostile checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_checkpoint_runs_no_code(built, tmp_path):
    store, root = built
    cfg = dict(store=str(store), images=str(root), out_dir=str(tmp_path / "run"), student="cifar_resnet20",
               schedule="soft:2", batch_size=8, progress=False)
    train(TrainConfig(**cfg, stop_after=1))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)  # what hald-train writes loads under the allow-list
    marker = tmp_path / "pwned"
    torch.save({**state, "extra": Planted(str(marker))}, ckpt)
    with pytest.raises(HaldStoreError, match=r"cannot resume from '.*checkpoint\.pt': it holds objects") as e:
        train(TrainConfig(**cfg), resume=True)
    assert not marker.exists() and "\n" not in str(e.value)
    with open(ckpt, "wb") as f:  # a bare pickle, not even a torch file
        pickle.dump(Planted(str(marker)), f)
    with pytest.raises(HaldStoreError, match="checkpoint.pt"):
        train(TrainConfig(**cfg), resume=True)
    assert not marker.exists()
