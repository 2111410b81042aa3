"""The pillow renderer's kernel: Pillow's own ``Image.resize`` of the exact window, bit for
bit, for every window shape (both pass orders, either pass alone, none), both filters and any
output size; independent of threads and batches; normalized as ``(x / 255 - mean) / std``."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from hald_store.errors import HaldStoreError
from hald_store.render import PillowRenderer, make_renderer, read_files
from hald_store.resample import Pixels, render_crops

from .conftest import photo, require_data

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _pillow(img: np.ndarray, box, size: int, interpolation: str, flip: bool) -> np.ndarray:
    top, left, h, w = (int(v) for v in box)
    out = np.asarray(Image.fromarray(img[top : top + h, left : left + w]).resize((size, size), FILTERS[interpolation]))
    return out[:, ::-1] if flip else out


def _random_boxes(rng, images, ids):
    boxes = []
    for j in ids:
        h, w = images[j].shape[:2]
        bh, bw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        boxes.append((int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw))
    return np.array(boxes, np.int64)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_every_window_shape_equals_pillow(interpolation):
    """Random windows of noise and of photo-like images, 1 to 250 px, to 1..224 px: up- and
    downscaling on either axis, the vertical-first order Pillow picks for tall windows, 1-px
    strips and windows already at the output size."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(rng.integers(1, 250)), int(rng.integers(1, 250)), 3), np.uint8)
              for _ in range(12)] + [photo(int(h), int(w), k) for k, (h, w) in enumerate([(61, 45), (250, 180), (7, 90)])]
    pixels = Pixels(images)
    checked = 0
    for size in (1, 5, 32, 64, 224):
        ids = rng.integers(0, len(images), 60)
        boxes = _random_boxes(rng, images, ids)
        boxes[:4] = [(0, 0, images[ids[0]].shape[0], images[ids[0]].shape[1]), (0, 0, 1, 1),
                     (0, 0, min(size, images[ids[2]].shape[0]), 1), (0, 0, 1, min(size, images[ids[3]].shape[1]))]
        flips = rng.random(60) < 0.5
        got = render_crops(pixels, ids, boxes, flips, size, interpolation)
        for k, j in enumerate(ids):
            np.testing.assert_array_equal(got[k], _pillow(images[j], boxes[k], size, interpolation, flips[k]),
                                          err_msg=f"size {size}, box {boxes[k]} of a {images[j].shape} image")
            checked += 1
    assert checked == 300


def test_same_bits_on_any_thread_count_and_batch_split():
    rng = np.random.default_rng(1)
    images = [photo(32, 32, k) for k in range(20)]
    pixels = Pixels(images)
    ids = rng.integers(0, 20, 200)
    boxes, flips = _random_boxes(rng, images, ids), rng.random(200) < 0.5
    mean, std = np.float32([0.5, 0.4, 0.3]), np.float32([0.2, 0.25, 0.3])
    one = render_crops(pixels, ids, boxes, flips, 32, mean=mean, std=std)
    with ThreadPoolExecutor(2) as pool:
        two = render_crops(pixels, ids, boxes, flips, 32, mean=mean, std=std, pool=pool, threads=3)
    split = np.concatenate([render_crops(pixels, ids[a:a + 7], boxes[a:a + 7], flips[a:a + 7], 32, mean=mean, std=std)
                            for a in range(0, 200, 7)])
    assert np.array_equal(one, two) and np.array_equal(one, split)
    last = render_crops(pixels, ids, boxes, flips, 32, mean=mean, std=std, channels_last=True)
    assert np.array_equal(last, one.transpose(0, 2, 3, 1))
    u8 = render_crops(pixels, ids, boxes, flips, 32)
    want = (u8.astype(np.float32) / np.float32(255) - mean) / std  # float32 throughout
    assert np.array_equal(one, want.transpose(0, 3, 1, 2))


def test_renderer_on_real_jpegs_equals_pillow_decode_and_resize():
    files = sorted(require_data("cifar10-mini", "train").rglob("*.jpg"))[:40]
    data = read_files(files)
    rng = np.random.default_rng(2)
    images = [np.asarray(Image.open(io.BytesIO(d.tobytes())).convert("RGB")) for d in data]
    boxes, flips = _random_boxes(rng, images, range(40)), rng.random(40) < 0.5
    for size, interpolation in ((32, "bilinear"), (24, "bicubic"), (48, "bilinear")):
        r = make_renderer("pillow", size=size, device="cpu", interpolation=interpolation, workers=2)
        assert isinstance(r, PillowRenderer) and r.num_threads == 2
        got = r.render_uint8(data, boxes, flips).numpy()
        for k in range(40):
            np.testing.assert_array_equal(got[k], _pillow(images[k], boxes[k], size, interpolation, flips[k]))
        x = r(data, boxes, flips)
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (r.mean, r.std))
        assert torch.equal(x, (torch.from_numpy(got).permute(0, 3, 1, 2).float() / 255.0 - mean) / std)
    assert make_renderer("pillow", size=8).record() == {
        "backend": "pillow", "interpolation": "bilinear", "antialias": True, "size": 8,
        "mean": list(r.mean), "std": list(r.std), "pillow_version": Image.__version__}


def test_pillow_always_antialiases():
    with pytest.raises(HaldStoreError, match="antialias=False is not available with the pillow renderer"):
        make_renderer("pillow", size=32, antialias=False)
    with pytest.raises(HaldStoreError, match=r"unknown option\(s\) \['max_batch_size'\] for the pillow renderer"):
        make_renderer("pillow", size=32, max_batch_size=8)
