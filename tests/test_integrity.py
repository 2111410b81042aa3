"""Damaged stores: checksums, missing chunks and metadata, and `hald-store verify`'s modes.

Every test tampers with a real store built from real images by a real teacher, the way a
disk, a sync tool or a careless `rm` would, and checks that readers, loaders, `info` and
`verify` fail with a message naming the array, the chunk and its file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from hald_store import LabelStore, SoftLabelLoader, build_store
from hald_store.errors import StoreError
from hald_store.store import ATTR_KEY, default_compressor
from hald_store.verify import check_integrity

from .conftest import SMALL, require_data, run_cli, tiny_store
CHUNK = "labels/indices/c/1/0/0"  # the label chunk of block 1 (images 8..15)


@pytest.fixture(scope="module")
def built(tmp_path_factory, resnet20):
    return tiny_store(tmp_path_factory.mktemp("integrity"), resnet20, classes=3, per_class=8, **SMALL)


@pytest.fixture
def store_copy(built, tmp_path) -> tuple[Path, Path]:
    good, images = built
    shutil.copytree(good, tmp_path / "s.zarr")
    return tmp_path / "s.zarr", images


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPER = {
    "deleted": lambda p: p.unlink(),
    "flipped": _flip,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero-length": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("how", list(TAMPER))
def test_damaged_chunk_is_named_by_readers_loaders_info_and_verify(store_copy, how):
    out, images = store_copy
    TAMPER[how](out / CHUNK)
    word = "missing" if how == "deleted" else "damaged"
    where = rf"array 'labels/indices' chunk \(1, 0, 0\) \(file {CHUNK}\) is {word}"
    store = LabelStore.open(out)
    store.read([0], [0])  # other blocks still read
    with pytest.raises(StoreError, match=where):
        store.read([9], [0])
    loader = SoftLabelLoader(store, images, batch_size=8, backend="torchvision", device="cpu")
    with pytest.raises(StoreError, match=where):
        list(loader.iter_epoch(0))
    r = run_cli("verify", out)
    assert r.exit_code == 1 and "integrity FAIL" in r.output and CHUNK in r.output, r.output
    info = json.loads(run_cli("info", out, "--json").output)
    if how == "deleted":  # info lists files; damaged bytes need `verify`, which reads them
        assert info["missing_chunks"] == 1 and not info["complete"]


def test_damaged_chunk_fails_hald_train(store_copy, tmp_path):
    from hald_train.cli import main as train_main

    out, images = store_copy
    _flip(out / CHUNK)
    r = CliRunner().invoke(train_main, [str(out), str(images), "--out", str(tmp_path / "run"), "--epochs", "2",
                                        "--schedule", "soft-only", "--batch-size", "8", "--backend", "torchvision",
                                        "--device", "cpu", "-q"])
    assert r.exit_code == 1 and f"(file {CHUNK}) is damaged" in r.output, r.output


def test_every_array_is_checksummed_and_every_chunk_written(built):
    good, _ = built
    store = LabelStore.open(good)
    assert store.checksums and store.attrs["integrity"] == {"checksum": "crc32c", "every_chunk_written": True}
    for name in store.array_names():
        codecs = [c.to_dict()["name"] for c in zarr.open_array(str(good / name), mode="r").metadata.codecs]
        assert codecs[-1] == "crc32c", (name, codecs)
    # crops/flip of a block where no crop is flipped, labels of class 0, ...: all-fill chunks are written too
    assert store.missing_chunks() == []
    report = check_integrity(store)
    assert report.passed and report.chunks_read == sum(1 for _ in store.expected_chunks())
    r = run_cli("verify", good)
    assert r.exit_code == 0 and "integrity PASS" in r.output and "CRC32C" in r.output


@pytest.mark.parametrize("what", ["labels/indices/zarr.json", "progress", "crops/box/zarr.json"])
def test_deleted_metadata_is_a_clear_error(store_copy, what):
    out, _ = store_copy
    target = out / what
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    name = what.removesuffix("/zarr.json") if what.endswith("zarr.json") else "progress/block_done"
    for args in (["info", out], ["verify", out]):
        r = run_cli(*args)
        assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
        assert f"has no array '{name}'" in r.output, r.output
        assert "Traceback" not in r.output


def test_index_out_of_range_is_caught_in_stores_without_checksums(store_copy, tmp_path):
    """A store written before checksums (format 1, no `integrity` attribute) still reads, and
    verify reports what it cannot check; a class index beyond the classes is still caught."""
    out, images = store_copy
    old = tmp_path / "old.zarr"
    src, dst = zarr.open_group(str(out), mode="r"), zarr.open_group(str(old), mode="w")
    store = LabelStore.open(out)
    for name in store.array_names():
        a = src[name]
        fill = {"fill_value": 0} if name.startswith(("labels/", "progress/")) else {}
        b = dst.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.chunks,
                             compressors=None if name.startswith("progress/") else default_compressor(), **fill)
        b[...] = a[...]
    dst.attrs[ATTR_KEY] = {k: v for k, v in src.attrs[ATTR_KEY].items() if k != "integrity"}
    v1 = LabelStore.open(old)
    assert not v1.checksums and v1.info()["complete"]
    np.testing.assert_array_equal(v1.read_fields(np.arange(24), 1)["indices"],
                                  store.read_fields(np.arange(24), 1)["indices"])
    r = run_cli("verify", old, images)
    assert r.exit_code == 0 and "no checksums" in r.output and "24 files match" in r.output, r.output
    idx = zarr.open_array(str(old / "labels/indices"), mode="r+")
    idx[9, 0, 0] = 11  # a class that does not exist in a 10-class store
    r = run_cli("verify", old)
    assert r.exit_code == 1 and "class index 11 of a 10-class store" in r.output and CHUNK in r.output
    # convert writes a copy with checksums
    r = run_cli("convert", out, tmp_path / "upgraded.zarr", "--top-k", "3", "--values", "uint8", "-q")
    assert r.exit_code == 0 and LabelStore.open(tmp_path / "upgraded.zarr").checksums


def test_verify_modes_and_image_hashes(built, tmp_path, cifar_mini_train):
    good, images = built
    ckpt = require_data("teachers", "cifar10-resnet20.th")
    r = run_cli("verify", good, images, "--deep", "--teacher", "cifar_resnet20", "--checkpoint", ckpt,
                "--sample", "96", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["passed"] and report["integrity"]["passed"] and report["images_checked"] == 24
    assert report["num_crops"] == 96 and report["top1_agreement"] == 1.0
    # a same-size, different image: sizes match, content hashes do not
    swapped = tmp_path / "swapped"
    shutil.copytree(images, swapped)
    _flip(swapped / "bird" / "0002.jpg")
    r = run_cli("verify", good, swapped)
    assert r.exit_code == 1 and "1 changed (bird/0002.jpg)" in r.output, r.output
    r = run_cli("verify", good, swapped, "--no-check-hashes")  # its modification time gives it away
    assert r.exit_code == 1 and "1 changed (bird/0002.jpg)" in r.output, r.output
    manifest = LabelStore.open(good).manifest()
    recorded = int(manifest.mtimes[manifest.paths.index("bird/0002.jpg")])
    os.utime(swapped / "bird" / "0002.jpg", ns=(recorded, recorded))  # a forger who keeps the time: only hashes see it
    assert run_cli("verify", good, swapped, "--no-check-hashes").exit_code == 0
    assert run_cli("verify", good, swapped).exit_code == 1
    r = run_cli("verify", good, swapped, "--deep", "--teacher", "cifar_resnet20", "--checkpoint", ckpt)
    assert r.exit_code == 1 and "bird/0002.jpg" in r.output
    # flags that need --deep, and bad numbers
    r = run_cli("verify", good, images, "--teacher", "cifar_resnet20")
    assert r.exit_code == 2 and "are used by --deep only" in r.output
    assert "--deep needs IMAGES_DIR" in run_cli("verify", good, "--deep").output
    deep = ["verify", good, images, "--deep", "--teacher", "cifar_resnet20", "--checkpoint", ckpt]
    for flag, value, message in (("--sample", "0", "--sample must be >= 1"),
                                 ("--temperature", "nan", "--temperature must be a finite number > 0"),
                                 ("--temperature", "inf", "--temperature must be a finite number > 0"),
                                 ("--min-agreement", "2", "--min-agreement must be a fraction in [0, 1]")):
        r = run_cli(*deep, flag, value)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (flag, r.output)


def test_repair_reopens_the_damaged_block_and_a_resumed_build_rewrites_it(store_copy, built, resnet20):
    out, images = store_copy
    _flip(out / CHUNK)
    r = run_cli("verify", out, "--repair")
    assert r.exit_code == 1 and "repair: block(s) 1 marked unfinished" in r.output, r.output
    with pytest.raises(StoreError, match="incomplete"):
        LabelStore.open(out)  # nobody trains on it meanwhile
    build_store(images, out, resnet20, resume=True, **SMALL)
    assert check_integrity(out).passed
    good, rebuilt = LabelStore.open(built[0]), LabelStore.open(out)
    for name in good.codec.fields():
        assert np.array_equal(good.array(f"labels/{name}")[:], rebuilt.array(f"labels/{name}")[:]), name


def test_repair_refuses_damage_outside_the_label_blocks(store_copy):
    out, _ = store_copy
    chunk = next(p for p in sorted(out.rglob("c/*")) if p.is_file() and "labels" not in p.parts
                 and "progress" not in p.parts)
    _flip(chunk)
    r = run_cli("verify", out, "--repair")
    assert r.exit_code == 1 and "repair: not possible" in r.output and "--overwrite" in r.output, r.output
    assert LabelStore.open(out, allow_incomplete=True).complete  # nothing was reopened
