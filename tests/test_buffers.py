"""Batch buffers written again: never one a consumer still holds (the tensor, a view of it,
or a NumPy array of it), always a free one of the same shape (no new pages per batch)."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from hald_store.buffers import BufferPool
from hald_store.render import make_renderer
from hald_store.resample import Pixels

from .conftest import photo


def _request(rng, n=6, size=40):
    ids = rng.integers(0, 4, n)
    h = rng.integers(8, size, n)
    w = rng.integers(8, size, n)
    boxes = np.stack([rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w], 1)
    return ids, boxes, rng.random(n) < 0.5


def test_a_held_batch_is_never_written_again_and_free_ones_are():
    renderer = make_renderer("pillow", size=24, device="cpu", workers=2)
    pixels = Pixels([photo(40, 40, k) for k in range(4)])
    rng = np.random.default_rng(0)
    requests = [_request(rng) for _ in range(5)]
    batches = [renderer.render_pixels(pixels, *r) for r in requests[:3]]
    held = [batches[0], batches[1].permute(0, 2, 3, 1)[1:], batches[2].numpy()]  # a tensor, a view, an array
    want = [h.copy() if isinstance(h, np.ndarray) else h.clone() for h in held]
    held_pointers = {b.data_ptr() for b in batches}
    del batches
    written = [renderer.render_pixels(pixels, *r).data_ptr() for r in requests[3:] * 3]  # each let go at once
    for h, w in zip(held, want):
        assert (np.array_equal(h, w) if isinstance(h, np.ndarray) else torch.equal(h, w))
    assert not held_pointers & set(written)  # no held batch was written into
    assert set(written) <= {b.ctypes.data for b in renderer._buffers._buffers}  # let-go batches written again, none
    assert len(set(written)) < len(written)  # made outside the pool (which one is taken: see the pool test)


def test_pool_keeps_at_most_keep_buffers_and_pickles_empty():
    pool = BufferPool(keep=2)
    held = [pool.empty((3, 4), np.float32) for _ in range(3)]  # the third is not kept: the pool is full
    assert len(pool._buffers) == 2 and all(b.shape == (3, 4) for b in held)
    other = pool.empty((5,), np.uint8)
    assert other.shape == (5,) and other.dtype == np.uint8 and len(pool._buffers) == 2
    del other  # the pool's copy was not kept (no room): nothing changes
    first = id(held[0])
    del held[0]
    got = pool.empty((3, 4), np.float32)
    assert id(got) == first
    bigger = pool.empty((6, 4), np.float32)  # takes no free slot: none is free, and the pool is full
    assert bigger.shape == (6, 4) and len(pool._buffers) == 2
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.keep == 2 and copy._buffers == []
