"""Store layouts: a "sharded" store holds the same labels as a "block" one in as many files,
its epochs read about 1/S of the label bytes, and each rank reads only its own blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hald_store import LabelStore, SoftLabelLoader, build_store
from hald_store.order import block_epoch_order
from hald_store.render import read_files
from hald_store.testing import open_counted

from .conftest import copy_subset, require_data

S, CHUNK = 20, 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory, resnet20):
    """The same build (4 classes x 10 real CIFAR images, S crops each) in both layouts."""
    src = require_data("cifar10-mini", "train")
    root = copy_subset(src, tmp_path_factory.mktemp("layout") / "images", classes=4, per_class=10)
    out = {}
    for layout in ("block", "sharded"):
        build_store(root, root.parent / f"{layout}.zarr", resnet20, num_classes=10, crops_per_image=S, top_k=3,
                    values="uint8", input_size=32, chunk_images=CHUNK, layout=layout, progress=False)
        out[layout] = LabelStore.open(root.parent / f"{layout}.zarr")
    return out, root


def test_same_labels_and_boxes_in_as_many_files(stores):
    block, sharded = stores[0]["block"], stores[0]["sharded"]
    images, seeds = np.divmod(np.arange(block.num_crops), S)
    assert sharded.layout == "sharded" and block.layout == "block" and "layout" not in block.attrs
    for name in block.codec.fields():
        assert np.array_equal(block.read_fields(images, seeds)[name], sharded.read_fields(images, seeds)[name])
    assert all(np.array_equal(a, b) for a, b in zip(block.boxes(images, seeds), sharded.boxes(images, seeds)))
    for name in sharded.array_names()[:-1]:
        assert sharded.array(name).grid_shape == block.array(name).grid_shape  # one file per block, as before
    assert sharded.missing_chunks() == [] and sharded.info()["complete"]


def test_block_images_share_a_crop_seed_and_cycle_through_all(stores):
    sharded = stores[0]["sharded"]
    seen = np.stack([sharded.epoch_crop_seeds(e, seed=3) for e in range(S)])
    assert (np.sort(seen, axis=0) == np.arange(S)[:, None]).all()  # each crop once per cycle
    blocks = seen.reshape(S, -1, CHUNK)
    assert (blocks == blocks[..., :1]).all() and len(np.unique(blocks[0, :, 0])) > 1
    assert not np.array_equal(seen[:1], sharded.epoch_crop_seeds(S, seed=3)[None])  # a new order next cycle


@pytest.mark.parametrize("n,world,drop_last", [(40, 2, False), (37, 3, False), (37, 2, True)])
def test_block_epoch_order_deals_whole_blocks(n, world, drop_last):
    orders = [block_epoch_order(n, 5, 1, CHUNK, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    assert len({len(o) for o in orders}) == 1
    flat = np.concatenate(orders)
    if drop_last:
        assert len(set(flat)) == len(flat) == n // world * world
    else:
        assert set(flat) == set(range(n))
    blocks = [set(o // CHUNK) for o in orders]
    shared = [len(blocks[r] & blocks[q]) for r in range(world) for q in range(r + 1, world)]
    assert max(shared) <= 1 and not np.array_equal(orders[0], np.sort(orders[0]))  # shuffled, ends shared only


def test_sharded_loader_is_exact_and_each_rank_reads_its_blocks(stores):
    sharded, root = stores[0]["sharded"], stores[1]
    paths = sharded.manifest().paths
    read = {}
    for rank in range(2):
        store, counter = open_counted(sharded.path)
        loader = SoftLabelLoader(store, root, batch_size=5, seed=4, rank=rank, world_size=2, backend="torchvision")
        counter.reset()
        loader.source.crops(loader.manifest, 3)  # what the loader reads for epoch 3 (and, ahead, for 4)
        read[rank] = {k for k in counter.keys if k.startswith(("labels/", "crops/")) and "/c/" in k}
        batches = list(loader.iter_epoch(3))
        ids = torch.cat([b.image_ids for b in batches]).numpy()
        assert np.array_equal(ids, loader.epoch_order(3))
        for b in batches:
            i, s = b.image_ids.numpy(), b.crop_seeds.numpy()
            assert np.array_equal(s, sharded.epoch_crop_seeds(3, seed=4)[i])
            boxes, flips = sharded.boxes(i, s)
            assert torch.equal(b.images, loader.renderer(read_files([root / paths[k] for k in i]), boxes, flips))
            assert torch.allclose(b.soft, sharded.soft_labels(i, s))
        # each rank touches only the shard files of its blocks: 20 images = 2.5 blocks -> 3 of 5 blocks
        blocks = {int(k.split("/c/")[1].split("/")[0]) for k in read[rank]}
        assert blocks == set(loader.epoch_order(3) // CHUNK) and len(blocks) == 3
    assert len({k.split("/c/")[1].split("/")[0] for k in read[0] & read[1]}) == 1  # only the block they split


def chunk_bytes(store: LabelStore) -> int:
    """Bytes of the label arrays' chunk (or shard) files."""
    return sum(p.stat().st_size for p in Path(store.path, "labels").glob("*/c/**/*") if p.is_file())


def test_an_epoch_reads_a_fraction_of_the_label_bytes(stores):
    out, root = stores
    got = {}
    for layout, store in out.items():
        opened, counter = open_counted(store.path)
        loader = SoftLabelLoader(opened, root, batch_size=5, seed=0, backend="torchvision")
        opened.array_names()
        counter.reset()
        loader.source.crops(loader.manifest, 1)
        got[layout] = sum(v for k, v in counter.keys.items() if k.startswith("labels/") and "/c/" in k)
    assert got["block"] == chunk_bytes(out["block"])  # every chunk, whole
    sharded = out["sharded"]
    # per shard: its index (16 bytes per inner chunk, + a checksum), then one inner chunk of S
    fields, blocks = len(sharded.codec.fields()), sharded.num_blocks
    index = fields * blocks * (16 * S + 4)
    data = chunk_bytes(sharded) - index
    assert got["sharded"] - index <= 1.5 * data / S, (got, index, data)
    assert got["sharded"] - index >= 0.5 * data / S  # the labels an epoch uses are read


def test_sharded_layout_is_refused_for_batch_labels(tmp_path, small_folder):
    from click.testing import CliRunner

    from hald_store.cli import main

    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["build", str(small_folder), str(out), "--teacher", "cifar_resnet20", "--checkpoint",
                                  str(require_data("teachers", "cifar10-resnet20.th")), "--num-classes", "10", "-s", "2",
                                  "--input-size", "32", "-q", "--layout", "sharded", "--teacher-mode", "train"])
    assert r.exit_code == 1 and "Error: --layout sharded is for per-crop labels" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("where", ["data", "index"])
def test_a_damaged_shard_is_named_by_readers_loaders_and_verify(stores, tmp_path, where):
    import shutil

    from hald_store.errors import StoreError
    from hald_store.verify import check_integrity

    out = tmp_path / "s.zarr"
    shutil.copytree(stores[0]["sharded"].path, out)
    shard = out / "labels" / "indices" / "c" / "1" / "0" / "0"  # block 1 (images 8..15)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 if where == "data" else -20] ^= 0xFF  # an inner chunk, or the index at the end
    shard.write_bytes(bytes(data))
    store = LabelStore.open(out)
    store.read([0], [0])  # other blocks still read
    with pytest.raises(StoreError, match=r"array 'labels/indices' chunk \(1, 0, 0\) \(file labels/indices/c/1/0/0\)"):
        store.read(np.repeat(np.arange(8, 16), S), np.tile(np.arange(S), 8))  # every inner chunk of block 1
    loader = SoftLabelLoader(store, stores[1], batch_size=8, backend="torchvision")
    with pytest.raises(StoreError, match="labels/indices/c/1/0/0"):
        for e in range(S):  # a cycle reads every inner chunk once
            loader.source.crops(loader.manifest, e)
    report = check_integrity(out)
    assert not report.passed and report.damaged_blocks == [1] and "labels/indices/c/1/0/0" in report.problems[0]
