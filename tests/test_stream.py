"""Render streams: the same pixels as the renderer's exact path for every request (1-px-wide
boxes included), errors that name the file, and reuse after a failure or an early break."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from hald_store import render as render_module
from hald_store.crop_plan import CropPolicy, plan_crops
from hald_store.errors import HaldStoreError, ImageError
from hald_store.images import scan_image_folder
from hald_store.render import DaliRunner, dali_available, make_renderer, read_files
from hald_store.stream import DaliStream, PillowStream, WorkerStream, open_stream

from .conftest import copy_subset, photo, require_data

BACKENDS = ["torchvision", "pillow"] + (["dali"] if dali_available() else [])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    src = require_data("cifar10-mini", "train")
    return copy_subset(src, tmp_path_factory.mktemp("stream") / "images", classes=2, per_class=10)


def _requests(m, batch: int, seed: int):
    n = len(m)
    boxes, flips = plan_crops(seed, np.arange(n), np.zeros(n, int), m.heights, m.widths, CropPolicy())
    boxes[:3] = [[0, 0, 9, 1], [5, 0, 1, 1], [2, 31, 30, 1]]  # 1 px wide: at the left edge, a pixel, the right edge
    order = np.random.default_rng(seed).permutation(n)
    return [(ids, boxes[ids], flips[ids]) for ids in np.array_split(order, range(batch, n, batch))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", [False, True])
def test_stream_equals_the_exact_renderer(folder, backend, cache):
    m = scan_image_folder(folder, progress=False)
    files = [folder / p for p in m.paths]
    renderer = make_renderer(backend, size=24, device="cpu")
    stream = open_stream(renderer, files, m.heights, m.widths, batch_size=6, workers=2, cache_decoded=cache)
    assert isinstance(stream, {"dali": DaliStream, "pillow": PillowStream, "torchvision": WorkerStream}[backend])
    for seed in (0, 1):  # two epochs through one stream
        requests = _requests(m, 6, seed)
        got = list(stream(requests))
        assert [len(x) for x in got] == [6, 6, 6, 2]
        for (ids, boxes, flips), x in zip(requests, got):
            assert torch.equal(x, renderer(read_files([files[i] for i in ids]), boxes, flips))


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_pillow_chunks_and_the_next_epochs_are_exact(folder, monkeypatch, memory_format):
    """The pillow stream renders 2 requests per kernel call here (a 2-batch chunk, then one of
    6 + 2 crops), slices them back, and renders the next epoch's first chunk ahead."""
    monkeypatch.setattr(render_module, "CHUNK_PIXELS", 2 * 6 * 24 * 24)
    m = scan_image_folder(folder, progress=False)
    files = [folder / p for p in m.paths]
    renderer = make_renderer("pillow", size=24, device="cpu", memory_format=memory_format)
    stream = open_stream(renderer, files, m.heights, m.widths, batch_size=6, workers=2, prefetch=1)
    first, second = _requests(m, 6, 0), _requests(m, 6, 1)
    got = list(stream(first, lambda: second))
    assert stream._ahead is second and len(stream._jobs) == 1  # the next epoch's first chunk, rendering
    got += list(stream(second))
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    assert [len(x) for x in got] == [6, 6, 6, 2] * 2 and got[0].data_ptr() != got[1].data_ptr()
    for (ids, boxes, flips), x in zip(first + second, got, strict=True):
        assert x.is_contiguous(memory_format=fmt)
        assert torch.equal(x, renderer(read_files([files[i] for i in ids]), boxes, flips))


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_chunks_of_requests_are_sliced_back_exactly(folder, memory_format):
    """One DALI run renders a chunk of requests (here 3: chunks of 18 and 2 crops per list),
    handed out as views of its output, in the memory format asked for."""
    m = scan_image_folder(folder, progress=False)
    files = [folder / p for p in m.paths]
    exact = make_renderer("dali", size=24, device="cpu")
    runner = DaliRunner(make_renderer("dali", size=24, device="cpu", memory_format=memory_format), "encoded",
                        "normalized", 6, prefetch=1, chunk=3)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    for seed in (0, 1):
        requests = _requests(m, 6, seed)
        got = list(runner.run(read_files(files), m.widths, requests))
        assert [len(x) for x in got] == [6, 6, 6, 2] and got[0].data_ptr() != got[1].data_ptr()
        for (ids, boxes, flips), x in zip(requests, got):
            assert x.is_contiguous(memory_format=fmt)
            assert torch.equal(x, exact(read_files([files[i] for i in ids]), boxes, flips))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_errors_name_the_file_and_the_stream_recovers(folder, tmp_path, backend):
    bad_root = shutil.copytree(folder, tmp_path / "images")
    m = scan_image_folder(bad_root, progress=False)
    files = [bad_root / p for p in m.paths]
    stream = open_stream(make_renderer(backend, size=16, device="cpu"), files, m.heights, m.widths, batch_size=4,
                         workers=1, cache_decoded=False)
    requests = _requests(m, 4, 0)
    victim = requests[2][0][1]
    good = files[victim].read_bytes()
    files[victim].write_bytes(good[: len(good) // 3])  # truncated JPEG
    with pytest.raises(ImageError, match=files[victim].name):
        list(stream(requests))
    files[victim].write_bytes(good)
    assert len(list(stream(requests))) == len(requests)  # a failed pipeline is replaced
    wrong = [(requests[0][0], requests[0][1] + [0, 30, 0, 0], requests[0][2])]
    with pytest.raises(HaldStoreError, match=rf"{files[requests[0][0][0]].name}: box .* does not lie inside"):
        stream(wrong)


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_one_pixel_wide_columns_of_a_420_jpeg(tmp_path):
    """The DALI stream decodes boxes as they are; 1-px-wide ones (which DALI's ROI decoder
    gets wrong at left == 0 of a 4:2:0 JPEG) are re-rendered exactly."""
    from PIL import Image

    h, w = 19, 23
    (tmp_path / "c").mkdir()
    path = tmp_path / "c" / "photo.jpg"
    Image.fromarray(photo(h, w, 7)).save(path, format="JPEG", quality=90, subsampling=2)
    renderer = make_renderer("dali", size=8, device="cpu")
    stream = open_stream(renderer, [path], [h], [w], batch_size=2 * w, cache_decoded=False)
    boxes = np.array([(t, left, h - t, 1) for t in (0, 5) for left in range(w)])
    ids, flips = np.zeros(len(boxes), np.int64), np.arange(len(boxes)) % 3 == 0
    (got,) = stream([(ids, boxes, flips)])
    assert torch.equal(got, renderer(read_files([path] * len(boxes)), boxes, flips))


def test_worker_streams_import_the_renderer_before_their_workers_start():
    """A worker started each epoch must not import torchvision's v2 functional again (seconds:
    it pulls in torch._dynamo); the parent imports it first, so forked workers inherit it."""
    code = ("import json, sys, numpy as np; from hald_store.render import TorchvisionRenderer, make_renderer; "
            "from hald_store.stream import WorkerStream; heavy = 'torchvision.transforms.v2.functional'; "
            "before = heavy in sys.modules; "
            "WorkerStream(make_renderer('torchvision', 32), [], np.zeros(0), np.zeros(0), workers=1); "
            "print(json.dumps([before, [m in sys.modules for m in TorchvisionRenderer.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = json.loads(out.splitlines()[-1])
    assert not before and all(after)


@pytest.mark.parametrize("cache", [False, True])
def test_pillow_stream_refuses_an_image_of_another_size_than_recorded(folder, cache):
    """The pillow kernel reads pixels without bounds checks: boxes are checked against the
    recorded sizes, so an image that decodes to another size is refused, naming it."""
    m = scan_image_folder(folder, progress=False)
    files = [folder / p for p in m.paths]
    heights = m.heights.copy()
    heights[3] += 40  # as a crafted manifest would say
    request = (np.array([3]), np.array([[0, 0, 60, 20]]), np.zeros(1, bool))  # 60 rows: inside the recorded size
    with pytest.raises(ImageError, match=rf"{files[3].name}: it decodes to 32x32 pixels, not the 32x72 recorded"):
        list(open_stream(make_renderer("pillow", size=16, device="cpu"), files, heights, m.widths, batch_size=4,
                         cache_decoded=cache)([request]))
