"""Batch buffers used again once nothing refers to them.

A 224-px float32 batch of 128 is 77 MB, above glibc's largest ``mmap`` threshold (32 MB), so
each fresh one is mapped from the kernel and every page is faulted in and zeroed as it is first
written. Writing into a batch made before gathered the crop cache's 224-px batches 5x faster
and rendered the pillow renderer's 1.1-1.2x faster
(``benchmarks/results/profiles/batch-buffers-224px.txt``). A :class:`BufferPool` hands out a
buffer it made before when no one else holds it: the tensors built on it by
``torch.from_numpy`` hold the array (and every view of them holds the tensor's storage), so
its reference count says exactly when the consumer has let go of the batch. Batches a
consumer keeps are never written again; the pool then makes new ones.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["BufferPool"]

_FREE = 2  # references to a buffer no one else holds: the pool's list and getrefcount's argument


class BufferPool:
    """At most ``keep`` buffers, each handed out again by :meth:`empty` once it is free."""

    def __init__(self, keep: int = 6) -> None:
        self.keep = int(keep)
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"])

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialized array of ``shape`` and ``dtype``: a free one of the pool's, else a
        new one (kept in place of a free one of another shape, or while the pool has room)."""
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        with self._lock:
            free = [i for i in range(len(self._buffers)) if sys.getrefcount(self._buffers[i]) <= _FREE]
            for i in free:
                if self._buffers[i].shape == shape and self._buffers[i].dtype == dtype:
                    return self._buffers[i]
            out = np.empty(shape, dtype)
            if free:
                self._buffers[free[0]] = out
            elif len(self._buffers) < self.keep:
                self._buffers.append(out)
            return out

