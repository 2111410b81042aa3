"""Untrusted files: planted checkpoints, crafted store paths, links, crafted arrays (real stores,
real images, a real trainer)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hald_store import HardLabelLoader, LabelStore, Manifest, SoftLabelLoader, build_store, reencode_store, scan_image_folder
from hald_store.errors import HaldStoreError, ImageError, LockError, ManifestMismatchError, SettingsMismatchError, StoreError
from hald_store.safety import run_dir_lock, sibling, store_lock
from hald_store.verify import check_integrity, verify_store
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


def _rewrite_paths(store_path, edits: dict[int, str]) -> None:
    """Rewrite entries of ``images/path`` the way a hostile store would (checksums stay valid)."""
    store = LabelStore.open(store_path, mode="r+")
    paths = store.array("images/path")[:]
    for i, p in edits.items():
        paths[i] = p
    store.array("images/path")[:] = paths


@pytest.mark.parametrize("bad", ["../../outside.jpg", "/etc/passwd", "bird/../../outside.jpg", "bird//0001.jpg",
                                 "./bird/0001.jpg", ""])
def test_store_paths_outside_the_image_folder_are_refused(built, tmp_path, bad, resnet20):
    store, root = built
    (tmp_path / "outside.jpg").write_bytes(b"SECRET CONTENTS")
    _rewrite_paths(store, {5: bad})
    for open_it in (lambda: SoftLabelLoader(store, root, batch_size=8), lambda: HardLabelLoader(store, root),
                    lambda: verify_store(store, root, resnet20, sample=4)):
        with pytest.raises(StoreError, match=rf"store '.*s\.zarr': image path 5 \({re.escape(repr(bad))}\) is not a "
                                             "normalized relative path") as e:
            open_it()
        assert "SECRET" not in str(e.value) and "\n" not in str(e.value)
    report = check_integrity(store)
    assert not report.passed and any("image path 5" in p for p in report.problems)


def test_store_paths_through_a_linked_folder_or_file_are_refused(built, tmp_path):
    store, root = built
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_bytes(b"SECRET CONTENTS")
    os.symlink(tmp_path / "elsewhere", root / "bird" / "sub")
    _rewrite_paths(store, {3: "bird/sub/x.jpg"})
    with pytest.raises(ManifestMismatchError, match=r"store '.*s\.zarr': image path\(s\) 'bird/sub/x\.jpg' lead "
                                                    "outside their class folder") as e:
        SoftLabelLoader(store, root, batch_size=8)
    assert "SECRET" not in str(e.value)
    os.symlink(root / "automobile" / "0000.jpg", root / "bird" / "dup.jpg")  # into another class
    _rewrite_paths(store, {3: "bird/dup.jpg"})
    with pytest.raises(ManifestMismatchError, match="'bird/dup.jpg' lead outside their class folder"):
        HardLabelLoader(store, root)


def test_scan_refuses_a_file_link_into_another_class_or_out_of_the_folder(small_folder, tmp_path):
    link = small_folder / "bird" / "dup.jpg"
    os.symlink(small_folder / "automobile" / "0000.jpg", link)
    with pytest.raises(ImageError, match=r"'bird/dup\.jpg' link\(s\) to a file outside class folder 'bird'"):
        scan_image_folder(small_folder, progress=False)
    link.unlink()
    os.symlink("0001.jpg", link)  # a link inside its own class folder is fine
    assert len(scan_image_folder(small_folder, progress=False)) == 25
    link.unlink()
    os.symlink(small_folder / "automobile", small_folder / "cat")  # a class folder that is another class
    with pytest.raises(ImageError, match="class folders 'automobile' and 'cat' are the same folder"):
        scan_image_folder(small_folder, progress=False)


def test_manifest_file_with_a_bad_path_is_refused(small_folder, tmp_path, resnet20):
    scan_image_folder(small_folder, progress=False).save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        arrays = dict(z)
    arrays["paths"] = arrays["paths"].astype(object)
    arrays["paths"][2] = "../images/bird/0001.jpg"
    np.savez(tmp_path / "m.npz", **{k: v.astype(str) if v.dtype == object else v for k, v in arrays.items()})
    with pytest.raises(StoreError, match=r"manifest file '.*m\.npz': image path 2 \('\.\./images/bird/0001\.jpg'\)"):
        build_store(small_folder, tmp_path / "s2.zarr", resnet20, manifest=tmp_path / "m.npz", **BUILD)
    assert not (tmp_path / "s2.zarr").exists()


def test_deleting_the_integrity_attribute_does_not_turn_damage_into_zeros(built):
    store, _ = built
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["hald_store"]["integrity"]
    (store / "zarr.json").write_text(json.dumps(meta))
    chunk = store / LabelStore.open(store).array("labels/indices").chunk_key((1, 0, 0))
    chunk.unlink()
    opened = LabelStore.open(store)
    assert opened.checksums
    with pytest.raises(StoreError, match=r"array 'labels/indices' chunk \(1, 0, 0\) .* is missing"):
        opened.read(np.arange(8, 16), np.zeros(8, np.int64))
    assert not check_integrity(store).passed


@pytest.mark.parametrize("array, value", [("labels/indices", 200), ("images/label", 12), ("images/label", -1)])
def test_out_of_range_classes_in_a_crafted_store_are_damage(built, array, value):
    store, root = built
    arr = LabelStore.open(store, mode="r+").array(array)
    if array == "labels/indices":
        arr[3, :, 0] = value
    else:
        arr[3] = value
    with pytest.raises(StoreError, match=rf"store '.*s\.zarr': array '{array}' holds class index {value}, outside "
                                         r"\[0, 10\)") as e:
        for _ in SoftLabelLoader(store, root, batch_size=8, shuffle=False).iter_epoch(1):
            pass
    assert "\n" not in str(e.value)
    assert not check_integrity(store).passed


@pytest.mark.parametrize("kind", ["owner", "lock"])
def test_planted_links_at_owner_and_lock_files_are_never_written_through(small_folder, tmp_path, resnet20, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "s.zarr"
    os.symlink(victim, sibling(out, kind))
    if kind == "owner":  # removed like a killed holder's leftover: the link, not its target
        build_store(small_folder, out, resnet20, **BUILD)
        assert LabelStore.open(out).complete
    else:
        with pytest.raises(LockError, match=r"\.hald-store-lock-s\.zarr' is a symbolic link"):
            build_store(small_folder, out, resnet20, **BUILD)
    assert victim.read_text() == "precious"
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / f".hald-train-{kind}")
    if kind == "owner":
        with run_dir_lock(run):
            assert not (run / ".hald-train-owner").is_symlink()
    else:
        with pytest.raises(LockError, match=r"\.hald-train-lock' is a symbolic link"):
            run_dir_lock(run).__enter__()
    assert victim.read_text() == "precious"


def test_a_store_is_locked_by_its_real_location_and_a_linked_store_is_not_written(built, tmp_path, resnet20,
                                                                                  small_folder):
    store, _ = built
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-alias")
    alias = tmp_path.parent / f"{tmp_path.name}-alias" / "s.zarr"  # the same store through a linked folder
    with store_lock(store, False):
        with pytest.raises(LockError, match=f"store '{alias}' is being written by pid {os.getpid()}"):
            build_store(small_folder, alias, resnet20, resume=True, **BUILD)
    link = tmp_path / "link.zarr"
    os.symlink(store, link)
    before = LabelStore.open(store).settings
    with pytest.raises(LockError, match=r"store '.*link\.zarr' is a symbolic link \(to '.*s\.zarr'\).*pass its target"):
        build_store(small_folder, link, resnet20, overwrite=True, **{**BUILD, "crops_per_image": 3})
    assert link.is_symlink() and LabelStore.open(link).settings == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hald-store")) == []


@pytest.mark.parametrize("how", ["build", "convert"])
def test_a_store_replaced_under_a_running_loader_stops_it(built, tmp_path, small_folder, resnet20, how):
    store, root = built
    loader = SoftLabelLoader(store, root, batch_size=8)
    assert len(list(loader.iter_epoch(0))) == 3
    if how == "build":
        build_store(small_folder, store, resnet20, overwrite=True, **{**BUILD, "top_k": 2})
    else:
        reencode_store(store, tmp_path / "copy.zarr", top_k=2, values="uint8", progress=False)
        reencode_store(tmp_path / "copy.zarr", store, top_k=2, values="uint8", overwrite=True, progress=False)
    with pytest.raises(StoreError, match=r"store '.*s\.zarr' was replaced while in use") as e:
        for epoch in (1, 2):  # the next epoch may have been read ahead, from the old store
            list(loader.iter_epoch(epoch))
    assert "\n" not in str(e.value)


def test_store_metadata_rewritten_in_place_under_a_running_loader_stops_it(built):
    """The per-epoch check skips reading a metadata file that is unchanged (same file, size and
    time): one edited in place, keeping its inode, is read again and refused."""
    store, root = built
    loader = SoftLabelLoader(store, root, batch_size=8)
    list(loader.iter_epoch(0))
    meta = Path(store) / "zarr.json"
    ino, text = meta.stat().st_ino, meta.read_text()
    identity = json.loads(text)["attributes"]["hald_store"]["identity"]
    with open(meta, "r+") as f:  # same file, same size, later time
        f.write(text.replace(identity, identity[::-1]))
    assert meta.stat().st_ino == ino and meta.stat().st_size == len(text.encode())
    with pytest.raises(StoreError, match=r"was replaced while in use"):
        for epoch in (1, 2):
            list(loader.iter_epoch(epoch))


def test_resume_refuses_a_store_rebuilt_with_other_settings(built, tmp_path, small_folder, resnet20):
    store, root = built
    cfg = TrainConfig(store=str(store), images=str(root), out_dir=str(tmp_path / "run"), student="cifar_resnet20",
                      schedule="soft:2", batch_size=8, progress=False)
    train(dataclasses.replace(cfg, stop_after=1))
    build_store(small_folder, store, resnet20, overwrite=True, **{**BUILD, "top_k": 2})
    with pytest.raises(SettingsMismatchError, match=r"store '.*s\.zarr' is not the one it trained on"):
        train(cfg, resume=True)
    build_store(small_folder, store, resnet20, overwrite=True, **BUILD)  # rebuilt as it was: resumes
    train(cfg, resume=True)
    assert (tmp_path / "run" / "model.pt").exists()


def _replace_keeping_size(path) -> None:
    """Another image of the same byte size (one byte of its compressed data changed), written later."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mtime = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))


def test_an_image_replaced_by_one_of_the_same_size_is_caught_at_load_and_each_epoch(built):
    store, root = built
    assert LabelStore.open(store).manifest().mtimes is not None
    target = root / "bird" / "0001.jpg"
    os.utime(target, ns=(1, 1))  # touched (a copy): same content, other time: accepted after a hash
    loader = SoftLabelLoader(store, root, batch_size=8)
    assert len(list(loader.iter_epoch(0))) == 3
    _replace_keeping_size(target)
    with pytest.raises(ManifestMismatchError, match=r"does not match the images recorded in store '.*s\.zarr': 1 "
                                                    r"changed \(bird/0001\.jpg\)") as e:
        list(loader.iter_epoch(1))
    assert "\n" not in str(e.value)
    with pytest.raises(ManifestMismatchError, match=r"1 changed \(bird/0001\.jpg\)"):
        HardLabelLoader(store, root)


def test_stores_and_manifests_without_times_are_still_read(built, tmp_path, small_folder):
    store, root = built
    shutil.rmtree(store / "images" / "mtime_ns")  # as written before times were recorded
    old = LabelStore.open(store)
    assert old.manifest().mtimes is None and check_integrity(store).passed
    assert len(list(SoftLabelLoader(old, root, batch_size=8).iter_epoch(0))) == 3
    scan_image_folder(small_folder, progress=False).save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "mtimes"}
    np.savez(tmp_path / "m.npz", **arrays)
    assert Manifest.load(tmp_path / "m.npz").mtimes is None


def test_build_with_a_stale_manifest_is_refused(small_folder, tmp_path, resnet20):
    scan_image_folder(small_folder, progress=False).save(tmp_path / "m.npz")
    _replace_keeping_size(small_folder / "automobile" / "0003.jpg")
    with pytest.raises(ManifestMismatchError, match=r"the images recorded in manifest file '.*m\.npz': 1 changed "
                                                    r"\(automobile/0003\.jpg\)"):
        build_store(small_folder, tmp_path / "s2.zarr", resnet20, manifest=tmp_path / "m.npz", **BUILD)
    assert not (tmp_path / "s2.zarr").exists()
