"""Tests for hald_store.synthetic: layout, determinism, atomic/idempotent writes, scene content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hald_store.errors import HaldStoreError
from hald_store.images import scan_image_folder
from hald_train.scenes import SHAPES, make_shapes_dataset

SMALL = dict(num_classes=3, train_per_class=4, test_per_class=2, size=32)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data")


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_are_many_and_unique():
    assert len(SHAPES) >= 8 and len(set(SHAPES)) == len(SHAPES)


def test_layout_and_counts(default_set):
    meta = json.loads((default_set / "objects.json").read_text())
    assert sorted(p.name for p in default_set.iterdir()) == ["objects.json", "test", "train"]
    for split, per_class in (("train", 40), ("test", 20)):
        class_dirs = sorted((default_set / split).iterdir())
        assert [d.name for d in class_dirs] == meta["classes"]
        for d in class_dirs:
            images = sorted(d.iterdir())
            assert [p.name for p in images] == [f"{i:04d}.jpg" for i in range(per_class)]
            with Image.open(images[0]) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))
        assert len(meta["splits"][split]) == 6 * per_class
    assert not [p for p in default_set.parent.iterdir() if p.name != "data"]  # no temp leftovers


def test_class_folders_sort_in_class_order(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", num_classes=len(SHAPES), train_per_class=1,
                               test_per_class=1, size=16)
    expected = [f"{c:02d}_{s}" for c, s in enumerate(SHAPES)]
    assert sorted(p.name for p in (root / "train").iterdir()) == expected
    assert json.loads((root / "objects.json").read_text())["classes"] == expected


def test_scan_image_folder_accepts_it(default_set):
    manifest = scan_image_folder(default_set / "train", progress=False)
    meta = json.loads((default_set / "objects.json").read_text())["splits"]["train"]
    assert manifest.class_names == [f"{c:02d}_{SHAPES[c]}" for c in range(6)]
    assert manifest.paths == [o["path"] for o in meta]
    assert manifest.labels.tolist() == [o["class"] for o in meta]
    assert set(manifest.heights.tolist()) == set(manifest.widths.tolist()) == {48}


def test_deterministic(tmp_path):
    a = files_of(make_shapes_dataset(tmp_path / "a", **SMALL))
    b = files_of(make_shapes_dataset(tmp_path / "b", **SMALL))
    assert len(a) == 3 * 6 + 1 and a == b
    c = files_of(make_shapes_dataset(tmp_path / "c", **SMALL, seed=1))
    assert c.keys() == a.keys() and c != a


def test_png_format(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", **SMALL, image_format="png")
    with Image.open(root / "test" / "02_triangle" / "0001.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))


def test_second_call_is_a_noop(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", **SMALL)
    image = root / "train" / "00_circle" / "0000.jpg"
    before = (root.stat().st_mtime_ns, image.stat().st_mtime_ns, (root / "objects.json").stat().st_mtime_ns)
    assert make_shapes_dataset(root, **SMALL) == root
    after = (root.stat().st_mtime_ns, image.stat().st_mtime_ns, (root / "objects.json").stat().st_mtime_ns)
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_existing_empty_folder_is_filled(tmp_path):
    (tmp_path / "d").mkdir()
    assert (make_shapes_dataset(tmp_path / "d", **SMALL) / "objects.json").is_file()


def test_foreign_content_is_refused_and_kept(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(HaldStoreError, match=str(root)):
        make_shapes_dataset(root, **SMALL)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert (root / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_other_parameters_are_refused(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", **SMALL)
    before = files_of(root)
    with pytest.raises(HaldStoreError, match=str(root)):
        make_shapes_dataset(root, **{**SMALL, "seed": 3})
    assert files_of(root) == before


def test_objects_json_is_consistent(default_set):
    meta = json.loads((default_set / "objects.json").read_text())
    assert meta["params"]["size"] == 48 and meta["params"]["num_classes"] == 6
    for split in ("train", "test"):
        for obj in meta["splits"][split]:
            assert (default_set / split / obj["path"]).is_file()
            assert obj["path"].startswith(meta["classes"][obj["class"]] + "/")
            assert 0 <= obj["distractor_class"] < 6 and obj["distractor_class"] != obj["class"]
            for top, left, h, w in (obj["box"], obj["distractor_box"]):
                assert top >= 0 and left >= 0 and top + h <= 48 and left + w <= 48
            (_, _, h, w), (_, _, dh, dw) = obj["box"], obj["distractor_box"]
            assert 0.45 * 48 - 1 <= h <= 0.65 * 48 + 1 and 0.22 * 48 - 1 <= dh <= 0.35 * 48 + 1
            assert h * w > dh * dw


def test_objects_are_visible(default_set):
    meta = json.loads((default_set / "objects.json").read_text())
    diffs = []
    for obj in meta["splits"]["train"]:
        with Image.open(default_set / "train" / obj["path"]) as im:
            pixels = np.asarray(im, dtype=np.float32)
        background = np.ones(pixels.shape[:2], bool)
        for top, left, h, w in (obj["box"], obj["distractor_box"]):
            background[top:top + h, left:left + w] = False
        median = np.median(pixels[background], axis=0)
        top, left, h, w = obj["box"]
        diffs.append(np.abs(pixels[top:top + h, left:left + w] - median).mean())
    assert min(diffs) > 10 and np.mean(diffs) > 30


@pytest.mark.parametrize("kwargs, name", [
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": len(SHAPES) + 1}, "num_classes"),
    ({"train_per_class": 0}, "train_per_class"),
    ({"test_per_class": -1}, "test_per_class"),
    ({"size": 15}, "size"),
    ({"seed": -1}, "seed"),
    ({"image_format": "gif"}, "image_format"),
])
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_shapes_dataset(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()
