"""Loader sources used directly with a :class:`~hald_store.loader.CropLoader`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hald_store import CropLoader, LabelStore, SoftLabelLoader
from hald_store.render import read_files, renderer_for
from hald_store.sources import FixedCrops

from .conftest import tiny_store


@pytest.fixture(scope="module")
def fixed_store(tmp_path_factory, resnet20):
    """A store over 3 classes x 6 real CIFAR images, 4 crops each."""
    out, root = tiny_store(tmp_path_factory.mktemp("sources"), resnet20, classes=3, per_class=6, num_classes=10,
                           crops_per_image=4, input_size=32)
    return LabelStore.open(out), root


def test_fixed_crops_deliver_crop_zero_of_every_image_every_epoch(fixed_store):
    store, root = fixed_store
    source = FixedCrops(store, store.temperature, True, seed=3)
    loader = CropLoader(source, root, store.manifest(), renderer_for(store.render_spec, "torchvision", "cpu"),
                        batch_size=5, shuffle=True, seed=3, drop_last=False, rank=0, world_size=1)
    paths = store.manifest().paths
    seen = {}
    for epoch in range(2):
        batches = list(loader.iter_epoch(epoch))
        assert len(batches) == len(loader) == 4
        ids = torch.cat([b.image_ids for b in batches]).numpy()
        assert sorted(ids) == list(range(18))  # every image once per epoch
        seen[epoch] = ids
        for b in batches:
            i = b.image_ids.numpy()
            assert (b.crop_seeds == 0).all()
            assert torch.allclose(b.soft, store.soft_labels(i, np.zeros_like(i)))
            assert torch.equal(b.hard, torch.from_numpy(store.hard_labels()[i]))
            boxes, flips = store.boxes(i, np.zeros_like(i))
            assert torch.equal(b.images, loader.renderer(read_files([root / paths[k] for k in i]), boxes, flips))
        if epoch == 0:  # only the 18 crops of seed 0 are kept, and they are all rendered now
            assert loader._crops[1].shape[0] == 18 and bool(loader._crops[2].all())
            loader.stream = None  # epoch 1 is gathered from them: no rendering
    assert not np.array_equal(seen[0], seen[1])  # a new order, the same crops


@pytest.mark.parametrize("values, top_k", [("uint8", 5), ("fp16", 10)])
def test_stored_labels_equal_the_stores_rows_when_decoded_once(tmp_path, resnet20, values, top_k):
    """A small store's dense labels are decoded once for every stored crop and gathered per
    epoch: each delivered label equals, bit for bit, its row decoded from the store alone."""
    out, root = tiny_store(tmp_path, resnet20, classes=3, per_class=6, num_classes=10, crops_per_image=4,
                           input_size=32, values=values, top_k=top_k)
    store = LabelStore.open(out)
    for temperature in (None, 2.0):
        loader = SoftLabelLoader(store, root, batch_size=5, temperature=temperature, backend="pillow", seed=1)
        for epoch in range(3):
            for b in loader.iter_epoch(epoch):
                i, s = b.image_ids.numpy(), b.crop_seeds.numpy()
                assert torch.equal(b.soft, store.soft_labels(i, s, temperature))
        assert loader.source._table is not None and loader.source._table.shape == (18 * 4, 10)
