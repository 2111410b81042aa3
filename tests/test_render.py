"""Tests for hald_store.render: exact-window crop rendering with DALI and torchvision.

Real images (the shared test data: ``require_data`` in ``tests/conftest.py``), synthetic images written
with PIL, real DALI CPU pipelines; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hald_store.errors import HaldStoreError, ImageError
from hald_store.render import (
    BACKENDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropRenderer,
    DaliRenderer,
    TorchvisionRenderer,
    cuda_available,
    dali_available,
    image_size,
    make_renderer,
    read_files,
)

from .conftest import needs_cuda, no_cuda, photo, require_data


needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable")

# torchvision 0.29 deprecates its decoders (TorchCodec replaces them); the reference renderer uses them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

CPU_BACKENDS = [pytest.param("dali", marks=needs_dali), "pillow", "torchvision"]


def _files(root: Path, pattern: str, count: int) -> list[Path]:
    files = sorted(root.glob(pattern))
    if len(files) < count:
        pytest.skip(f"expected at least {count} images matching {pattern} under {root}, found {len(files)}")
    return files


@pytest.fixture(scope="module")
def cifar_files() -> list[Path]:
    return _files(require_data("cifar10-mini", "train"), "*/*.jpg", 500)


@pytest.fixture(scope="module")
def cifar(cifar_files) -> list[np.ndarray]:
    return read_files(cifar_files)


@pytest.fixture(scope="module")
def dc_png() -> list[np.ndarray]:
    return read_files(_files(require_data("cifar10-dc-ipc50"), "*/*.png", 500))


# --------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def _coord_rgb(h: int, w: int) -> np.ndarray:
    """R = x mod 256, G = y mod 256, B mixes both: every pixel names its position."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 256, y % 256, (7 * x + 13 * y + 5) % 256], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (encoded bytes read back from a file, expected decoded RGB (H, W, 3) uint8)."""
    folder = tmp_path_factory.mktemp("synthetic")
    out = {}

    def add(name: str, img: Image.Image, fmt: str, expected: np.ndarray | None = None, **kw):
        path = folder / name
        img.save(path, format=fmt, **kw)
        if expected is None:  # lossy: the reference decode is PIL's (libjpeg-turbo)
            with Image.open(path) as im:
                expected = np.asarray(im.convert("RGB"))
        out[name] = (read_files([path])[0], expected)

    coord = _coord_rgb(375, 500)
    add("coord_375x500.png", Image.fromarray(coord), "PNG", coord)
    odd = _coord_rgb(37, 37)
    add("coord_37x37.png", Image.fromarray(odd), "PNG", odd)
    rgba = np.concatenate([_coord_rgb(64, 48), np.random.default_rng(1).integers(0, 256, (64, 48, 1), np.uint8)], -1)
    add("rgba_64x48.png", Image.fromarray(rgba, "RGBA"), "PNG", rgba[..., :3])
    gray = ((np.add.outer(np.arange(53) * 3, np.arange(41) * 5)) % 256).astype(np.uint8)  # 53 x 41
    add("gray_53x41.png", Image.fromarray(gray, "L"), "PNG", np.repeat(gray[..., None], 3, -1))
    add("gray_48x64.jpg", Image.fromarray(photo(48, 64)[..., 0], "L"), "JPEG", quality=90)
    add("photo_375x500.jpg", Image.fromarray(photo(375, 500)), "JPEG", quality=90)  # 4:2:0 chroma
    add("photo_61x45_444.jpg", Image.fromarray(photo(61, 45, 2)), "JPEG", quality=95, subsampling=0)
    return out


def _window_cases(h: int, w: int) -> list[tuple[tuple[int, int, int, int], int]]:
    """(box, output size) pairs that need no resampling along any axis with >1 pixel."""
    s = min(h, w)
    cases = []
    for side in sorted({s, s - 1 if s > 1 else 1, 7, 1}):  # full extent, odd, 1x1
        if side > s:
            continue
        for top, left in [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side), ((h - side) // 2 | 1, 3)]:
            top, left = min(top, h - side), min(left, w - side)
            cases.append(((top, left, side, side), side))
    # 1-pixel-wide / 1-pixel-tall strips at the edges and at odd positions
    cases += [((0, 0, h, 1), h), ((0, w - 1, h, 1), h), ((1, w // 2 | 1, h - 2, 1), h - 2)]
    cases += [((0, 0, 1, w), w), ((h - 1, 0, 1, w), w), ((h // 2 | 1, 1, 1, w - 2), w - 2)]
    return cases


def _expected_window(img: np.ndarray, box, size: int, flip: bool) -> np.ndarray:
    top, left, h, w = box
    win = img[top : top + h, left : left + w]
    if h == 1 and w != 1:  # a 1-pixel-tall strip upsampled vertically: rows replicate
        win = np.repeat(win, size, axis=0)
    elif w == 1 and h != 1:
        win = np.repeat(win, size, axis=1)
    elif h == 1 and w == 1:
        win = np.broadcast_to(win, (size, size, 3))
    assert win.shape == (size, size, 3)
    return win[:, ::-1] if flip else win


_RENDERERS: dict[tuple, CropRenderer] = {}


def _renderer(backend: str, size: int, **kw) -> CropRenderer:
    key = (backend, size, tuple(sorted(kw.items())))
    if key not in _RENDERERS:
        _RENDERERS[key] = make_renderer(backend, size=size, device="cpu", **kw)
    return _RENDERERS[key]


def _normalize(u8_nhwc: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = u8_nhwc.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------
# exact windows
# --------------------------------------------------------------------------------------


def test_header_size_matches_pil(synthetic, cifar, dc_png):
    for name, (data, expected) in synthetic.items():
        assert image_size(data) == expected.shape[:2], name
    for data in cifar[::25] + dc_png[::25]:
        w, h = Image.open(io.BytesIO(data.tobytes())).size
        assert image_size(data) == (h, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_window_synthetic(backend, synthetic):
    """size == window size: the uint8 output is exactly the source slice (mirrored on flip)."""
    checked = 0
    for name, (data, img) in synthetic.items():
        h, w = img.shape[:2]
        by_size: dict[int, list] = {}
        for box, size in _window_cases(h, w):
            for flip in (False, True):
                by_size.setdefault(size, []).append((box, flip))
        for size, items in by_size.items():
            boxes = np.array([b for b, _ in items], dtype=np.int32)
            flips = np.array([f for _, f in items], dtype=bool)
            r = _renderer(backend, size)
            got = r.render_uint8([data] * len(items), boxes, flips)
            assert got.dtype == torch.uint8 and got.shape == (len(items), size, size, 3)
            for k, (box, flip) in enumerate(items):
                want = _expected_window(img, box, size, flip)
                np.testing.assert_array_equal(got[k].numpy(), want, err_msg=f"{backend} {name} box={box} flip={flip}")
                checked += 1
            # the float output is the same pixels, normalized
            torch.testing.assert_close(r(([data] * len(items)), boxes, flips), _normalize(got), rtol=0, atol=1e-6)
    assert checked > 200


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_window_every_small_box_jpeg420(backend):
    """Every 1x1, 2x2 and 3x3 window and every 1-px-wide column of a 4:2:0 JPEG.

    DALI's ROI decode of a 1-px-wide window at left == 0 of a 4:2:0 JPEG is off by one in
    chroma; the renderer decodes such windows 2 px wide and slices (this test guards that).
    """
    h, w = 19, 23
    buf = io.BytesIO()
    Image.fromarray(photo(h, w, 7)).save(buf, format="JPEG", quality=90, subsampling=2)
    data = np.frombuffer(buf.getvalue(), np.uint8).copy()
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    cases = [((t, l, s, s), s) for s in (1, 2, 3) for t in range(h - s + 1) for l in range(w - s + 1)]
    cases += [((t, l, h - t, 1), h - t) for t in (0, 5) for l in range(w)]
    by_size: dict[int, list] = {}
    for k, (box, size) in enumerate(cases):
        by_size.setdefault(size, []).append((box, k % 3 == 0))
    for size, items in by_size.items():
        boxes = np.array([b for b, _ in items], np.int32)
        flips = np.array([f for _, f in items], bool)
        got = _renderer(backend, size).render_uint8([data] * len(items), boxes, flips).numpy()
        for k, (box, flip) in enumerate(items):
            np.testing.assert_array_equal(got[k], _expected_window(full, box, size, flip), err_msg=f"box={box}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_window_mixed_batch_real_png(backend, dc_png):
    """Different images in one batch, real lossless PNGs, random square windows at their own size."""
    rng = np.random.default_rng(3)
    for side in (32, 17, 5, 1):
        idx = rng.choice(len(dc_png), 24, replace=False)
        tops, lefts = rng.integers(0, 33 - side, 24), rng.integers(0, 33 - side, 24)
        boxes = np.stack([tops, lefts, np.full(24, side), np.full(24, side)], 1).astype(np.int32)
        flips = rng.random(24) < 0.5
        got = _renderer(backend, side).render_uint8([dc_png[i] for i in idx], boxes, flips).numpy()
        for k, i in enumerate(idx):
            src = np.asarray(Image.open(io.BytesIO(dc_png[i].tobytes())).convert("RGB"))
            want = _expected_window(src, tuple(boxes[k]), side, bool(flips[k]))
            np.testing.assert_array_equal(got[k], want)


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------


def _plan(n_images: int, h: int, w: int, crops: int = 1, seed: int = 0):
    try:
        from hald_store.crop_plan import plan_crops
    except ImportError:  # pragma: no cover - crop_plan is part of the package
        rng = np.random.default_rng(seed)
        n = n_images * crops
        hh, ww = rng.integers(1, h + 1, n), rng.integers(1, w + 1, n)
        boxes = np.stack([rng.integers(0, h - hh + 1), rng.integers(0, w - ww + 1), hh, ww], 1).astype(np.int32)
        return np.repeat(np.arange(n_images), crops), boxes, rng.random(n) < 0.5
    img = np.repeat(np.arange(n_images), crops)
    boxes, flips = plan_crops(seed, img, np.tile(np.arange(crops), n_images), h, w)
    return img, boxes, flips


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bit_exact_run_to_run_and_batch_split(backend, cifar):
    img, boxes, flips = _plan(10, 32, 32, seed=11)
    flips[:5] = ~flips[:5]  # make sure both flip states occur
    enc = [cifar[i * 37] for i in img]
    r = _renderer(backend, 32)
    a = r(enc, boxes, flips)
    b = r(enc, boxes, flips)
    assert a.dtype == torch.float32 and a.shape == (10, 3, 32, 32)
    assert torch.equal(a, b)
    split = torch.cat([r(enc[:3], boxes[:3], flips[:3]), r(enc[3:], boxes[3:], flips[3:])])
    assert torch.equal(a, split)
    u = r.render_uint8(enc, boxes, flips)
    assert torch.equal(u, torch.cat([r.render_uint8(enc[:7], boxes[:7], flips[:7]), r.render_uint8(enc[7:], boxes[7:], flips[7:])]))
    # a fresh renderer (new pipeline) gives the same bits
    assert torch.equal(make_renderer(backend, size=32, device="cpu")(enc, boxes, flips), a)


@needs_dali
def test_dali_internal_batch_split_is_invisible(cifar):
    img, boxes, flips = _plan(10, 32, 32, crops=3, seed=5)
    enc = [cifar[i] for i in img]
    whole = DaliRenderer(32, max_batch_size=256)
    tiny = DaliRenderer(32, max_batch_size=4)  # 30 crops -> 8 pipeline runs, the last one short
    assert torch.equal(whole(enc, boxes, flips), tiny(enc, boxes, flips))
    assert torch.equal(whole.render_uint8(enc, boxes, flips), tiny.render_uint8(enc, boxes, flips))
    # pickling drops the pipelines; the copy rebuilds and agrees
    clone = pickle.loads(pickle.dumps(tiny))
    assert torch.equal(clone(enc, boxes, flips), whole(enc, boxes, flips))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_request(backend):
    r = _renderer(backend, 32)
    assert r([], np.zeros((0, 4), np.int32), np.zeros(0, bool)).shape == (0, 3, 32, 32)
    assert r.render_uint8([], np.zeros((0, 4), np.int32), np.zeros(0, bool)).shape == (0, 32, 32, 3)


# --------------------------------------------------------------------------------------
# DALI vs torchvision
# --------------------------------------------------------------------------------------


def _diffs(a_u8: torch.Tensor, b_u8: torch.Tensor, a_f: torch.Tensor, b_f: torch.Tensor) -> tuple[int, float, float]:
    d = (a_u8.to(torch.int16) - b_u8.to(torch.int16)).abs()
    return int(d.max()), float(d.float().mean()), float((a_f - b_f).abs().max())


@needs_dali
def test_dali_matches_torchvision_cifar_jpeg(cifar):
    """Real cifar10-mini JPEGs, RandomResizedCrop plans (mostly upscaling) resized to 32.

    Measured (DALI 2.4.0 CPU vs torchvision 0.29.2, 1,000 crops): decoding is identical,
    resize kernels differ by rounding: max |uint8 diff| = 1, mean = 0.158,
    max |normalized diff| = 0.0175 (= 1/255/0.224).
    """
    img, boxes, flips = _plan(500, 32, 32, crops=2, seed=1)
    enc = [cifar[i] for i in img]
    dali, tv = _renderer("dali", 32), _renderer("torchvision", 32)
    du, tu = dali.render_uint8(enc, boxes, flips), tv.render_uint8(enc, boxes, flips)
    mx, mean, fmax = _diffs(du, tu, dali(enc, boxes, flips), tv(enc, boxes, flips))
    assert mx <= 1 and mean <= 0.25 and fmax <= 0.018, (mx, mean, fmax)
    # full-image boxes need no resize: both are the identical decode
    full = np.tile(np.array([[0, 0, 32, 32]], np.int32), (len(cifar), 1))
    nof = np.zeros(len(cifar), bool)
    assert torch.equal(dali.render_uint8(cifar, full, nof), tv.render_uint8(cifar, full, nof))


@needs_dali
def test_dali_matches_torchvision_downscale(synthetic):
    """A 375x500 photo-like JPEG, RandomResizedCrop windows (~100-500 px) downscaled to 64.

    The antialiasing filters of the two resize kernels differ slightly. Measured (DALI 2.4.0
    CPU vs torchvision 0.29.2, 200 crops, scale factors 1.6-7.8): max |uint8 diff| = 5
    (99.4% of values equal or off by 1), mean = 0.132, max |normalized diff| = 0.0856.
    (At size 224 on the same crops: max 2, mean 0.172.)
    """
    data, _ = synthetic["photo_375x500.jpg"]
    _, boxes, flips = _plan(1, 375, 500, crops=200, seed=2)
    enc = [data] * len(boxes)
    dali, tv = _renderer("dali", 64), _renderer("torchvision", 64)
    du, tu = dali.render_uint8(enc, boxes, flips), tv.render_uint8(enc, boxes, flips)
    mx, mean, fmax = _diffs(du, tu, dali(enc, boxes, flips), tv(enc, boxes, flips))
    assert mx <= 6 and mean <= 0.2 and fmax <= 0.11, (mx, mean, fmax)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_unknown_backend_and_device():
    with pytest.raises(HaldStoreError, match="unknown renderer backend 'opencv'"):
        make_renderer("opencv")
    with pytest.raises(HaldStoreError, match="device='tpu': not a device"):
        make_renderer("auto", device="tpu")
    with pytest.raises(HaldStoreError, match="interpolation"):
        make_renderer("torchvision", interpolation="lanczos")
    with pytest.raises(HaldStoreError, match="size"):
        make_renderer("torchvision", size=0)
    with pytest.raises(HaldStoreError, match="unknown option"):
        make_renderer("torchvision", num_threads=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("box", [(20, 0, 13, 8), (0, 25, 8, 8), (-1, 0, 8, 8), (0, 0, 0, 8), (0, 0, 33, 32)])
def test_box_out_of_bounds_names_sample(backend, cifar, box):
    boxes = np.array([[0, 0, 32, 32], [4, 4, 8, 8], box], dtype=np.int32)
    with pytest.raises(HaldStoreError) as err:
        _renderer(backend, 16)(cifar[:3], boxes, np.zeros(3, bool))
    msg = str(err.value)
    assert "sample 2" in msg and "top={}, left={}, height={}, width={}".format(*box) in msg and "32x32" in msg


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_corrupt_image_names_sample(backend, cifar):
    boxes = np.array([[0, 0, 32, 32]] * 3, dtype=np.int32)
    flips = np.zeros(3, bool)
    r = _renderer(backend, 32)
    garbage = np.frombuffer(b"this is not an image file " * 8, dtype=np.uint8)
    truncated = cifar[1][: len(cifar[1]) // 2].copy()  # valid header, missing scan data
    for bad in (garbage, truncated):
        with pytest.raises(ImageError, match="sample 1"):
            r([cifar[0], bad, cifar[2]], boxes, flips)
    with pytest.raises(ImageError, match="sample 0"):
        r([np.zeros(0, np.uint8)], boxes[:1], flips[:1])
    # the renderer still works after a failure, with the same bits as before
    assert torch.equal(r(cifar[:3], boxes, flips), _renderer(backend, 32)(cifar[:3], boxes, flips))
    assert torch.equal(r(cifar[:3], boxes, flips), make_renderer(backend, size=32, device="cpu")(cifar[:3], boxes, flips))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_argument_shapes(backend, cifar):
    r = _renderer(backend, 32)
    with pytest.raises(HaldStoreError, match="boxes must have shape"):
        r(cifar[:2], np.zeros((3, 4), np.int32), np.zeros(2, bool))
    with pytest.raises(HaldStoreError, match="flips must have shape"):
        r(cifar[:2], np.zeros((2, 4), np.int32), np.zeros(3, bool))
    with pytest.raises(HaldStoreError, match="integers"):
        r(cifar[:2], np.zeros((2, 4), np.float32), np.zeros(2, bool))
    with pytest.raises(HaldStoreError, match="1-D uint8"):
        r([cifar[0].astype(np.int16)], np.zeros((1, 4), np.int32), np.zeros(1, bool))


def test_read_files_missing(tmp_path):
    with pytest.raises(ImageError, match="nope.jpg"):
        read_files([tmp_path / "nope.jpg"])


@no_cuda
def test_gpu_without_cuda_raises():
    for backend in ("auto", "torchvision") + ((("dali",)) if dali_available() else ()):
        with pytest.raises(HaldStoreError, match="device='gpu'.*torch.cuda.is_available"):
            make_renderer(backend, size=32, device="gpu")
    with pytest.raises(HaldStoreError, match="device='cpu'"):
        TorchvisionRenderer(32, device="gpu")
    if dali_available():
        with pytest.raises(HaldStoreError, match="device='cpu'"):
            DaliRenderer(32, device="gpu")


def test_auto_works_here(cifar):
    r = make_renderer("auto", size=32)
    assert r.backend == ("dali" if dali_available() else "torchvision")
    assert r.device == ("gpu" if (cuda_available() and dali_available()) else "cpu")
    x = r(cifar[:4], np.array([[0, 0, 32, 32]] * 4, np.int32), np.array([0, 1, 0, 1], bool))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    d = r.describe()
    assert json.loads(json.dumps(d)) == d
    assert {"backend", "device", "interpolation", "antialias", "size"} <= set(d)
    assert set(BACKENDS) == {"dali", "pillow", "torchvision"}


def test_without_dali(monkeypatch, cifar):
    """With DALI not importable: explicit 'dali' fails clearly, 'auto' falls back to torchvision."""
    from hald_store import render as pipeline

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    pipeline._dali_import_error.cache_clear()
    try:
        assert not dali_available()
        with pytest.raises(HaldStoreError, match="backend='dali'.*install nvidia-dali"):
            make_renderer("dali", size=32)
        r = make_renderer("auto", size=32, device="cpu", num_threads=4, max_batch_size=8)
        assert isinstance(r, TorchvisionRenderer)
        assert r(cifar[:1], np.array([[0, 0, 32, 32]], np.int32), np.zeros(1, bool)).shape == (1, 3, 32, 32)
    finally:
        monkeypatch.undo()
        pipeline._dali_import_error.cache_clear()


# --------------------------------------------------------------------------------------
# GPU (DALI "mixed" decode); run only where CUDA is available
# --------------------------------------------------------------------------------------


@needs_cuda
def test_gpu_torchvision_moves_outputs_only(cifar):
    img, boxes, flips = _plan(20, 32, 32, seed=6)
    enc = [cifar[i] for i in img]
    gpu = make_renderer("torchvision", size=32, device="gpu")
    x = gpu(enc, boxes, flips)
    assert x.is_cuda and gpu.describe()["device"] == "gpu"
    assert torch.equal(x.cpu(), _renderer("torchvision", 32)(enc, boxes, flips))
    assert torch.equal(gpu.render_uint8(enc, boxes, flips).cpu(), _renderer("torchvision", 32).render_uint8(enc, boxes, flips))


@needs_cuda
@needs_dali
def test_gpu_exact_window_png(synthetic):
    data, img = synthetic["coord_375x500.png"]
    r = make_renderer("dali", size=7, device="gpu")
    boxes = np.array([[0, 0, 7, 7], [368, 493, 7, 7], [101, 33, 7, 7]], np.int32)
    flips = np.array([False, True, False])
    got = r.render_uint8([data] * 3, boxes, flips)
    assert got.is_cuda
    for k in range(3):
        np.testing.assert_array_equal(got[k].cpu().numpy(), _expected_window(img, tuple(boxes[k]), 7, bool(flips[k])))


@needs_cuda
@needs_dali
def test_gpu_deterministic_and_close_to_cpu(cifar):
    img, boxes, flips = _plan(100, 32, 32, crops=2, seed=4)
    enc = [cifar[i] for i in img]
    gpu = make_renderer("dali", size=32, device="gpu", max_batch_size=64)
    a = gpu(enc, boxes, flips)
    assert a.is_cuda and a.shape == (200, 3, 32, 32)
    assert torch.equal(a, gpu(enc, boxes, flips))
    assert torch.equal(a, torch.cat([gpu(enc[:50], boxes[:50], flips[:50]), gpu(enc[50:], boxes[50:], flips[50:])]))
    # GPU JPEG decoding (nvJPEG) may differ from libjpeg-turbo; not measured on the dev machine
    cpu_u8 = _renderer("dali", 32).render_uint8(enc, boxes, flips)
    d = (gpu.render_uint8(enc, boxes, flips).cpu().to(torch.int16) - cpu_u8.to(torch.int16)).abs()
    assert float(d.float().mean()) < 2.0, (int(d.max()), float(d.float().mean()))
