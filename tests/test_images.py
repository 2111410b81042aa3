"""Image folder edge cases: disguised formats, 16-bit PNGs, symlink loops, empty classes, a store
inside the image folder (real images, real renderers)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hald_store import LabelStore, build_store, scan_image_folder
from hald_store.errors import ImageError
from hald_store.render import dali_available, make_renderer

from .conftest import SMALL


def test_gif_named_jpg_is_caught_by_the_scan(small_folder, tmp_path, resnet20):
    disguised = small_folder / "bird" / "0004.jpg"
    with Image.open(disguised) as im:
        im.save(disguised, format="GIF")
    out = tmp_path / "s.zarr"
    with pytest.raises(ImageError, match=r"bird/0004\.jpg.*a GIF file despite its name"):
        scan_image_folder(small_folder, progress=False)
    with pytest.raises(ImageError, match=r"bird/0004\.jpg"):
        build_store(small_folder, out, resnet20, **{**SMALL, "backend": "auto"})
    assert not out.exists()
    build_store(small_folder, out, resnet20, skip_bad=True, **{**SMALL, "backend": "auto"})  # DALI when installed
    store = LabelStore.open(out)
    assert store.num_images == 23 and store.attrs["skipped"][0]["path"] == "bird/0004.jpg"


def test_16_bit_grayscale_png_renders_like_its_8_bit_version(small_folder):
    with Image.open(next((small_folder / "bird").iterdir())) as im:
        gray = np.asarray(im.convert("L"))
    encoded = []
    for arr in (gray, gray.astype(np.uint16) * 257):  # the same picture at 8 and 16 bits
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        encoded.append(np.frombuffer(buf.getvalue(), np.uint8))
    with Image.open(io.BytesIO(encoded[1].tobytes())) as im:
        assert im.mode.startswith("I;16")
    boxes, flips = np.array([[2, 3, 24, 20]] * 2, np.int32), np.zeros(2, bool)
    tv = make_renderer("torchvision", size=32, device="cpu").render_uint8(encoded, boxes, flips)
    assert torch.equal(tv[0], tv[1]) and tv[1].float().mean() < 250  # it used to come out pure white
    if dali_available():
        dali = make_renderer("dali", size=32, device="cpu").render_uint8(encoded, boxes, flips)
        assert (dali[1].int() - tv[1].int()).abs().max() <= 2


@pytest.mark.parametrize("target", ["..", "../automobile", "."])
def test_symlink_loops_and_links_into_other_classes_are_refused(small_folder, target):
    os.symlink(target, small_folder / "airplane" / "loop")
    with pytest.raises(ImageError, match=r"'airplane/loop' links to .*loop or lies outside class folder 'airplane'"):
        scan_image_folder(small_folder, progress=False)


def test_link_to_a_folder_outside_the_root_is_followed(small_folder, tmp_path):
    extra = tmp_path / "extra"
    (small_folder / "bird").rename(extra)
    os.symlink(extra, small_folder / "bird")
    manifest = scan_image_folder(small_folder, progress=False)
    assert len(manifest) == 24 and manifest.class_names == ["airplane", "automobile", "bird"]


def test_empty_class_folder_is_an_error(small_folder):
    (small_folder / "cat").mkdir()
    (small_folder / "cat" / "notes.txt").write_text("no images")
    with pytest.raises(ImageError, match=r"class folder\(s\) 'cat' hold no images"):
        scan_image_folder(small_folder, progress=False)


def test_store_inside_the_image_folder_is_not_a_class(small_folder, resnet20):
    out = small_folder / "labels.zarr"
    build_store(small_folder, out, resnet20, **SMALL)
    again = build_store(small_folder, out, resnet20, resume=True, **SMALL)
    assert again.crops_written == 0
    assert LabelStore.open(out).class_names == ["airplane", "automobile", "bird"]
    assert scan_image_folder(small_folder, progress=False).class_names == ["airplane", "automobile", "bird"]
