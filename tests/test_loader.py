"""Loaders: labels belong to the crops handed out, epochs cycle through stored crops, sharding
and resume are exact, and the teacher reproduces stored labels on loader output."""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hald_store import EvalLoader, HardLabelLoader, LabelStore, SoftLabelLoader, build_store, epoch_crop_seeds
from hald_store.errors import HaldStoreError, ManifestMismatchError
from hald_store.images import scan_image_folder
from hald_store.loader import HARD_CROP_STREAM, in_background
from hald_store.crop_plan import plan_crops
from hald_store.render import dali_available, default_threads, read_files

from .conftest import agreeing, needs_cuda, no_cuda, tiny_store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, resnet20):
    """A store over 3 classes x 8 real CIFAR images, 5 crops each (copy of the images alongside)."""
    out, root = tiny_store(tmp_path_factory.mktemp("loader"), resnet20, classes=3, per_class=8, num_classes=10,
                           crops_per_image=5, top_k=3, values="uint8", input_size=32)
    return LabelStore.open(out), root


def _all(loader, epoch=0):
    return list(loader.iter_epoch(epoch))


def test_epoch_crop_seeds_cycle_without_repetition():
    s, n = 6, 1000
    seen = np.stack([epoch_crop_seeds(n, s, e, seed=3) for e in range(2 * s)])
    for cycle in (seen[:s], seen[s:]):
        assert (np.sort(cycle, axis=0) == np.arange(s)[:, None]).all()  # each crop once per cycle
    assert not np.array_equal(seen[:s], seen[s:])  # a new order every cycle
    assert np.array_equal(seen[2], epoch_crop_seeds(n, s, 2, seed=3))
    assert not np.array_equal(seen[0], epoch_crop_seeds(n, s, 0, seed=4))
    assert (epoch_crop_seeds(5, 1, 7) == 0).all()


@pytest.mark.parametrize("backend", ["dali", "pillow", "torchvision"])
def test_labels_and_pixels_belong_to_the_crop_handed_out(small_store, backend):
    store, root = small_store
    loader = SoftLabelLoader(store, root, batch_size=5, seed=7, backend=backend, prefetch=3)
    ref = loader.renderer
    paths = store.manifest().paths
    for epoch in (0, 3):
        batches = _all(loader, epoch)
        ids = torch.cat([b.image_ids for b in batches]).numpy()
        seeds = torch.cat([b.crop_seeds for b in batches]).numpy()
        assert sorted(ids) == list(range(24)) and not np.array_equal(ids, np.arange(24))  # shuffled, all images
        assert np.array_equal(seeds, loader.crop_seeds(epoch)[ids])
        for b in batches:
            i, s = b.image_ids.numpy(), b.crop_seeds.numpy()
            boxes, flips = store.boxes(i, s)
            expect = ref(read_files([root / paths[k] for k in i]), boxes, flips)
            assert torch.equal(b.images, expect)
            assert torch.allclose(b.soft, store.soft_labels(i, s))
            assert torch.equal(b.hard, torch.from_numpy(store.hard_labels()[i]))


def test_each_stored_crop_is_used_once_per_cycle(small_store):
    store, root = small_store
    loader = SoftLabelLoader(store, root, batch_size=8, backend="torchvision")
    used = set()
    for epoch in range(store.crops_per_image):
        for b in loader:
            used.update(zip(b.image_ids.tolist(), b.crop_seeds.tolist()))
    assert loader.epoch == store.crops_per_image
    assert used == {(i, s) for i in range(24) for s in range(store.crops_per_image)}


def test_topk_labels_and_other_temperature(small_store):
    store, root = small_store
    b = next(iter(SoftLabelLoader(store, root, batch_size=6, dense=False, backend="torchvision")))
    stored = store.read(b.image_ids.numpy(), b.crop_seeds.numpy())
    assert torch.equal(b.soft.indices, stored.indices) and b.soft.top_k == 3
    warm = next(iter(SoftLabelLoader(store, root, batch_size=6, temperature=4.0, backend="torchvision")))
    assert torch.allclose(warm.soft, stored.probs(4.0))
    assert (warm.soft.max(1).values > b.soft.probs(20.0).max(1).values).all()  # sharper at lower T


@pytest.mark.parametrize("world,drop_last", [(2, False), (3, False), (5, True)])
def test_sharding_covers_every_image(small_store, world, drop_last):
    store, root = small_store
    shards = [
        SoftLabelLoader(store, root, batch_size=2, seed=1, rank=r, world_size=world, drop_last=drop_last,
                        backend="torchvision")
        for r in range(world)
    ]
    lens = {len(s) for s in shards}
    assert len(lens) == 1  # every rank runs the same number of steps
    got = [torch.cat([b.image_ids for b in _all(s, 2)]).tolist() for s in shards]
    flat = [i for g in got for i in g]
    if drop_last:
        assert len(flat) == len(set(flat)) == (24 // world // 2) * 2 * world
    else:
        assert set(flat) == set(range(24)) and all(len(g) == len(got[0]) for g in got)
    order = shards[0].epoch_order(2)
    assert np.array_equal(got[0], order[: len(got[0])])


def test_resume_mid_epoch(small_store):
    store, root = small_store
    loader = SoftLabelLoader(store, root, batch_size=5, seed=2, backend="torchvision")
    full = _all(loader, 1)
    tail = list(loader.iter_epoch(1, start_batch=3))
    assert len(full) == 5 and len(tail) == 2
    for a, b in zip(full[3:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.soft, b.soft)
    last = full[-1]
    assert len(last.images) == 4  # 24 = 4 * 5 + 4, kept without drop_last
    assert len(SoftLabelLoader(store, root, batch_size=5, drop_last=True, backend="torchvision")) == 4


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_early_break_leaks_nothing_and_next_epoch_is_exact(small_store, backend):
    store, root = small_store
    loader = SoftLabelLoader(store, root, batch_size=2, backend=backend, workers=2, cache_decoded=False)
    reference = [b.images for b in _all(loader, 1)]
    base_threads, base_children = _threads(), len(multiprocessing.active_children())
    for epoch in range(4):
        it = loader.iter_epoch(epoch)
        next(it)
        it.close()  # must return promptly
    gc.collect()
    assert len(multiprocessing.active_children()) == base_children
    assert _threads() <= base_threads + 2  # a broken DALI pipeline is dropped with its threads
    again = [b.images for b in _all(loader, 1)]  # no stale batches of a broken-off epoch
    assert len(again) == len(reference) and all(torch.equal(a, b) for a, b in zip(again, reference))


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.image_ids, y.image_ids)
        assert torch.equal(x.soft, y.soft) and torch.equal(x.crop_seeds, y.crop_seeds)


def test_one_stream_runs_across_epochs_and_stays_exact(small_store):
    store, root = small_store
    kw = dict(batch_size=5, seed=7, cache_crops=False, cache_decoded=False)
    loader = SoftLabelLoader(store, root, **kw)
    _all(loader, 0)
    runner = loader.stream._runner
    assert runner.outstanding > 0  # epoch 1's first batches were queued before epoch 0 ended
    _same_batches(_all(loader, 1), _all(SoftLabelLoader(store, root, **kw), 1))
    assert loader.stream._runner is runner and not runner.broken  # no drain, no new pipeline
    _same_batches(_all(loader, 4), _all(SoftLabelLoader(store, root, **kw), 4))  # not the epoch looked ahead to
    kept = loader.source.crops(loader.manifest, 5)  # a small store is read once, then gathered in memory
    fields, boxes, flips = store.read_one_crop_per_image(loader.crop_seeds(5))
    assert loader.source._kept and np.array_equal(kept.boxes, boxes) and np.array_equal(kept.flips, flips)
    assert all(np.array_equal(kept.fields[k], v) for k, v in fields.items())


def test_cached_crops_are_the_rendered_ones(small_store):
    store, root = small_store
    kw = dict(batch_size=5, seed=7)
    cached, plain = (SoftLabelLoader(store, root, cache_crops=c, **kw) for c in (True, False))
    for epoch in range(store.crops_per_image):  # one cycle renders every stored crop once
        _same_batches(_all(cached, epoch), _all(plain, epoch))
    assert cached._crops[2].all()
    cached.stream = None  # the next cycle is gathered from memory: no rendering
    for epoch in (store.crops_per_image, store.crops_per_image + 3):
        _same_batches(_all(cached, epoch), _all(plain, epoch))
    evaluate = EvalLoader(root, input_size=32, batch_size=7)
    first = [b.images for b in _all(evaluate)]
    evaluate.stream = None
    assert all(torch.equal(a, b.images) for a, b in zip(first, _all(evaluate), strict=True))


@pytest.mark.parametrize("backend", ["dali", "pillow", "torchvision"])
def test_channels_last_delivery_has_the_same_values(small_store, backend):
    store, root = small_store
    kw = dict(batch_size=5, seed=3, backend=backend, device="cpu")
    plain = SoftLabelLoader(store, root, cache_crops=False, **kw)
    for cache_crops in (False, True):
        last = SoftLabelLoader(store, root, cache_crops=cache_crops, memory_format="channels_last", **kw)
        for epoch in range(store.crops_per_image + 1):  # with the crop cache, the last epoch is gathered from it
            got = _all(last, epoch)
            _same_batches(_all(plain, epoch), got)
            assert all(b.images.is_contiguous(memory_format=torch.channels_last) and not b.images.is_contiguous()
                       for b in got)


def test_a_file_changed_under_a_running_loader_is_refused_before_its_batch(small_store, tmp_path):
    store, root = small_store
    images = Path(shutil.copytree(root, tmp_path / "images"))
    loader = SoftLabelLoader(store, images, batch_size=4, cache_decoded=False, cache_crops=False)
    assert len(_all(loader, 0)) == 6
    batches, paths = loader.epoch_plan(1).batches, store.manifest().paths
    victim, other = paths[batches[3][1]], paths[batches[0][0]]
    (images / victim).write_bytes((images / other).read_bytes())  # another valid image: decodes, but not this one
    got = []
    with pytest.raises(ManifestMismatchError, match=rf"1 changed \({victim}\)"):
        for batch in loader.iter_epoch(1):
            got.append(batch)
    assert len(got) <= 3  # batches 0-2 may be handed out (their files are checked first), never batch 3
    (images / victim).write_bytes((root / victim).read_bytes())
    assert len(_all(loader, 2)) == 6  # its own bytes back (a new time): accepted after a hash


def test_an_epoch_gathered_from_the_crop_cache_reads_and_checks_no_file(small_store, tmp_path):
    store, root = small_store
    images = Path(shutil.copytree(root, tmp_path / "images"))
    loader = SoftLabelLoader(store, images, batch_size=4, cache_decoded=False, cache_crops=True)
    s = store.crops_per_image
    for epoch in range(s):  # one cycle renders every stored crop once
        _all(loader, epoch)
    want = _all(SoftLabelLoader(store, root, batch_size=4, cache_decoded=False, cache_crops=False), s)
    victim = store.manifest().paths[0]
    (images / victim).write_bytes(b"not an image any more")
    _same_batches(want, _all(loader, s))  # the pixels rendered (from checked files) before the change
    with pytest.raises(ManifestMismatchError, match=rf"1 changed \({victim}\)"):
        SoftLabelLoader(store, images, batch_size=4)  # a loader that would read the files refuses them


@pytest.mark.parametrize("backend", ["dali", "pillow"])
def test_once_every_image_is_decoded_in_memory_epochs_read_and_check_no_file(small_store, tmp_path, backend):
    """The decoded cache is filled from files checked then (sizes and times at load, hashes as
    they are read): later epochs render from memory, so a file changed afterwards changes no
    pixel and is not looked at (at 32 px, checking 500 files each epoch halved the loader's rate)."""
    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    store, root = small_store
    images = Path(shutil.copytree(root, tmp_path / "images"))
    loader = SoftLabelLoader(store, images, batch_size=4, backend=backend, cache_decoded=True, cache_crops=False)
    assert loader.stream.reads_files
    _all(loader, 0)
    assert not loader.stream.reads_files
    want = _all(SoftLabelLoader(store, root, batch_size=4, backend=backend, cache_decoded=False, cache_crops=False), 1)
    victim = store.manifest().paths[0]
    (images / victim).write_bytes(b"not an image any more")
    _same_batches(want, _all(loader, 1))
    with pytest.raises(ManifestMismatchError, match=rf"1 changed \({victim}\)"):
        SoftLabelLoader(store, images, batch_size=4, backend=backend)


def test_next_epoch_crops_are_read_ahead_and_exact(small_store):
    store, root = small_store
    loader = SoftLabelLoader(store, root, batch_size=8, backend="torchvision", device="cpu")
    _all(loader, 0)
    source, epoch, _ = loader._ahead  # epoch 1's pass over the store runs while epoch 0 trains
    assert source is loader.source and epoch == 1
    ahead, fresh = loader.epoch_crops(1), loader.source.crops(loader.manifest, 1)
    assert np.array_equal(ahead.boxes, fresh.boxes) and np.array_equal(ahead.flips, fresh.flips)
    for name, values in fresh.fields.items():
        assert np.array_equal(ahead.fields[name], values)
    replaced = type(loader.source)(store, 5.0, True, loader.seed)
    loader.source = replaced  # a plan made for the old source is not used
    assert loader._ahead[0] is not replaced
    got, want = loader.epoch_crops(2), replaced.crops(loader.manifest, 2)
    assert np.array_equal(got.boxes, want.boxes) and not np.array_equal(got.boxes, ahead.boxes)
    assert loader._ahead[0] is replaced and loader._ahead[1] == 3


def test_background_work_hands_back_its_error():
    with pytest.raises(ValueError, match="invalid literal"):
        in_background(int, "not a number")()
    assert in_background(int, "12")() == 12


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_workers_and_thread_defaults(small_store, backend):
    store, root = small_store
    cores = len(os.sched_getaffinity(0))
    assert default_threads() == cores
    loader = SoftLabelLoader(store, root, batch_size=4, backend=backend, workers=3)
    if backend == "dali":
        assert loader.renderer.num_threads == 3
        assert SoftLabelLoader(store, root, batch_size=4, backend="dali").renderer.num_threads == cores
    else:
        assert loader.stream.workers == 3
    one = SoftLabelLoader(store, root, batch_size=4, backend=backend, workers=1, seed=3)
    three = SoftLabelLoader(store, root, batch_size=4, backend=backend, workers=3, seed=3)
    assert all(torch.equal(a.images, b.images) for a, b in zip(_all(one, 2), _all(three, 2)))


def test_threads_divided_among_local_ranks(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert default_threads() == 1


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_decoded_cache_gives_the_same_pixels(small_store, backend):
    store, root = small_store
    kw = dict(batch_size=5, seed=4, backend=backend)
    cached = SoftLabelLoader(store, root, cache_decoded=True, **kw)
    plain = SoftLabelLoader(store, root, cache_decoded=False, **kw)
    if backend == "dali":
        assert cached.stream.cache_decoded and not plain.stream.cache_decoded
        assert SoftLabelLoader(store, root, **kw).stream.cache_decoded  # 32x32 images: auto caches
    for epoch in (0, 1):
        for a, b in zip(_all(cached, epoch), _all(plain, epoch)):
            assert torch.equal(a.images, b.images) and torch.equal(a.soft, b.soft)


def test_hard_loader_gives_fresh_crops_with_classes(small_store):
    store, root = small_store
    hard = HardLabelLoader(store, root, batch_size=24, shuffle=False, backend="torchvision")
    b0, b1 = next(iter(hard.iter_epoch(0))), next(iter(hard.iter_epoch(1)))
    assert torch.equal(b0.hard, torch.from_numpy(store.hard_labels()))
    assert not torch.equal(b0.images, b1.images)  # new crops every epoch
    m = store.manifest()
    boxes, flips = plan_crops(store.attrs["plan_seed"], np.arange(24), np.zeros(24, int), m.heights, m.widths,
                              store.crop_policy, stream=HARD_CROP_STREAM)
    expect = hard.renderer(read_files([root / p for p in m.paths]), boxes, flips)
    assert torch.equal(b0.images, expect)
    stored_boxes = store.group["crops/box"][:]
    assert not any((stored_boxes[i] == boxes[i]).all(axis=1).any() for i in range(24))  # not the stored crops
    folder = HardLabelLoader.from_folder(root, input_size=32, batch_size=24, shuffle=False, seed=store.attrs["plan_seed"],
                                         backend="torchvision")
    assert torch.equal(next(iter(folder.iter_epoch(0))).images, b0.images)


def test_header_scan_matches_full_scan(small_store):
    """Loaders over plain folders read only image headers (no hash, no decode)."""
    _, root = small_store
    full, quick = scan_image_folder(root, progress=False), scan_image_folder(root, progress=False, verify=False)
    assert quick.paths == full.paths and quick.class_names == full.class_names
    for name in ("labels", "nbytes", "heights", "widths"):
        assert np.array_equal(getattr(quick, name), getattr(full, name)), name
    assert not quick.digests.any() and full.digests.any()
    assert full.inspected_here == quick.inspected_here == 24


def test_eval_loader_whole_images_in_order(small_store):
    store, root = small_store
    ev = EvalLoader(root, input_size=32, batch_size=10, class_names=store.class_names, backend="torchvision")
    batches = list(ev)
    assert [len(b.images) for b in batches] == [10, 10, 4]
    ids = torch.cat([b.image_ids for b in batches])
    assert torch.equal(ids, torch.arange(24))
    m = store.manifest()
    full = np.tile([0, 0, 32, 32], (24, 1)).astype(np.int32)
    assert torch.equal(torch.cat([b.images for b in batches]),
                       ev.renderer(read_files([root / p for p in m.paths]), full, np.zeros(24, bool)))
    with pytest.raises(HaldStoreError, match="classes of .* differ.*missing: 'zebra'"):
        EvalLoader(root, input_size=32, class_names=store.class_names + ["zebra"])


def test_teacher_reproduces_stored_top1_on_loader_output(tmp_path, cifar_mini_train, resnet56):
    """cifar10-mini/train, 4 stored crops per image: every crop the loader hands out over
    4 epochs goes back through the teacher."""
    out = tmp_path / "mini.zarr"
    build_store(cifar_mini_train, out, resnet56, crops_per_image=4, top_k=5, values="uint8", input_size=32,
                progress=False)
    loader = SoftLabelLoader(out, cifar_mini_train, batch_size=250, seed=5)
    agree = total = 0
    for _ in range(4):
        for b in loader:
            agree += agreeing(resnet56, b)
            total += len(b.images)
    assert total == 2000 and agree / total >= 0.99, agree / total


# ------------------------------------------------------------------------- bad input


def test_missing_and_changed_images_are_named(small_store, tmp_path):
    store, root = small_store
    bad = Path(shutil.copytree(root, tmp_path / "images"))
    paths = store.manifest().paths
    (bad / paths[3]).unlink()
    (bad / paths[5]).write_bytes(b"\xff\xd8" + bytes(10))
    with pytest.raises(ManifestMismatchError, match=rf"1 missing \({paths[3]}\); 1 changed \({paths[5]}\)"):
        SoftLabelLoader(store, bad)
    with pytest.raises(ManifestMismatchError, match="does not match"):
        HardLabelLoader(store, tmp_path / "images" / "..")  # wrong root


def test_batch_size_and_rank_errors(small_store):
    store, root = small_store
    with pytest.raises(HaldStoreError, match="batch_size 25 is larger than the 24 images"):
        SoftLabelLoader(store, root, batch_size=25)
    with pytest.raises(HaldStoreError, match="batch_size 13 is larger than the 12 images each of 2 rank"):
        SoftLabelLoader(store, root, batch_size=13, world_size=2)
    with pytest.raises(HaldStoreError, match="rank must be in"):
        SoftLabelLoader(store, root, rank=2, world_size=2)
    with pytest.raises(HaldStoreError, match="start_batch"):
        SoftLabelLoader(store, root, batch_size=8).iter_epoch(0, start_batch=9)


@no_cuda
def test_gpu_requested_without_cuda(small_store):
    store, root = small_store
    with pytest.raises(HaldStoreError, match="device='cuda' was requested but torch.cuda.is_available"):
        SoftLabelLoader(store, root, device="cuda")
    assert SoftLabelLoader(store, root, batch_size=8, device="auto").device.type == "cpu"


def test_dali_store_without_dali_falls_back_with_warning(small_store, monkeypatch):
    import hald_store.render as render_mod

    store, root = small_store
    assert store.attrs["renderer"]["backend"] == "dali"
    monkeypatch.setattr(render_mod, "_dali_import_error", lambda: "No module named 'nvidia.dali'")
    with pytest.warns(UserWarning, match="DALI is not installed; using the torchvision renderer"):
        auto = SoftLabelLoader(store, root, batch_size=4)
    assert auto.renderer.backend == "torchvision"
    with pytest.raises(HaldStoreError, match="backend='dali' was requested but NVIDIA DALI cannot be imported"):
        SoftLabelLoader(store, root, backend="dali")


@needs_cuda
def test_gpu_loader_matches_cpu_labels(small_store):
    store, root = small_store
    gpu = next(iter(SoftLabelLoader(store, root, batch_size=8, device="cuda")))
    cpu = next(iter(SoftLabelLoader(store, root, batch_size=8, device="cpu")))
    assert gpu.images.is_cuda and torch.equal(gpu.image_ids.cpu(), cpu.image_ids)
    assert torch.allclose(gpu.soft.cpu(), cpu.soft)
    assert (gpu.images.cpu() - cpu.images).abs().max() < 0.1
