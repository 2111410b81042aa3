"""Render streams: epoch after epoch of crop batches from one fixed list of image files.

A stream is what loaders and ``build`` use to turn requests ``(ids, boxes, flips)`` -- rows
of the file list, their integer windows and flip bits -- into rendered batches, in order,
while the consumer works on the previous ones:

* :class:`DaliStream` -- one DALI pipeline that reads the files itself (``io.file.read``
  on the file names), decodes only the window, resizes, mirrors and normalizes on
  ``num_threads`` threads, ``prefetch`` batches ahead, and hands out batches through DALI's
  PyTorch iterator without a copy. Small image sets can be decoded once and kept in memory
  (``cache_decoded``), which gives the same pixels (see :func:`cache_decoded_default`).
* :class:`WorkerStream` -- the torchvision fallback: a ``torch.utils.data.DataLoader`` whose
  worker processes each render whole batches.

Both render exactly what ``renderer(read_files(files[ids]), boxes, flips)`` returns for the
same request; box checks happen once per epoch, vectorized, against the manifest's sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import itertools
import importlib
import multiprocessing
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import HaldStoreError, ImageError, preview
from .images import DIGEST_SIZE
from .render import (CropRenderer, DaliRenderer, DaliRunner, PillowRenderer, TorchvisionRenderer, check_boxes,
                     default_threads, object_rows, pillow_decode, read_files, render_chunk, thin_boxes)

if TYPE_CHECKING:
    from .resample import Pixels

__all__ = ["Request", "CropStream", "DaliStream", "PillowStream", "WorkerStream", "open_stream", "cache_decoded_default", "fits_cache"]

Request = tuple[np.ndarray, np.ndarray, np.ndarray]  # (ids into the file list, (B, 4) boxes, (B,) flips)

# Decoded-image cache (DALI on the CPU): measured by benchmarks/throughput.py on 2 cores, keeping
# the images decoded rendered 2.1x faster at 32 px, 1.45x at 64 px and 1.1x for 400x300 JPEGs
# at 224 px than decoding the window again every epoch. "auto" caches whenever the decoded set
# stays within CACHE_MAX_BYTES and an eighth of the machine's memory per local rank.
CACHE_MAX_BYTES = 4 << 30


def fits_cache(nbytes: int) -> bool:
    """Whether a cache of ``nbytes`` fits ``min(CACHE_MAX_BYTES, physical memory / 8 / local ranks)``."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0 < nbytes <= min(CACHE_MAX_BYTES, memory // 8 // local)


def cache_decoded_default(heights: np.ndarray, widths: np.ndarray) -> bool:
    """``cache_decoded="auto"``: cache when every image decoded (H x W x 3 bytes) :func:`fits_cache`."""
    return fits_cache(3 * int(np.sum(np.asarray(heights, np.int64) * np.asarray(widths, np.int64))))


def decoded_cache_on(cache_decoded: bool | str, heights: np.ndarray, widths: np.ndarray, cpu: bool) -> bool:
    """A stream's ``cache_decoded`` (True, False or ``"auto"``: on the CPU, :func:`cache_decoded_default`)."""
    if cache_decoded not in (True, False, "auto"):
        raise HaldStoreError(f"cache_decoded must be True, False or 'auto', got {cache_decoded!r}")
    return cpu and cache_decoded_default(heights, widths) if cache_decoded == "auto" else bool(cache_decoded)


class CropStream:
    """Base class: ``stream(requests)`` yields one rendered batch per request, in order."""

    def __init__(self, renderer: CropRenderer, files: Sequence[str | os.PathLike], heights: np.ndarray,
                 widths: np.ndarray, *, prefetch: int = 2) -> None:
        self.renderer = renderer
        self.files = [os.fspath(f) for f in files]
        self.heights = np.asarray(heights, dtype=np.int64)
        self.widths = np.asarray(widths, dtype=np.int64)
        if not (len(self.files) == len(self.heights) == len(self.widths)):
            raise HaldStoreError(f"files, heights and widths differ in length: {len(self.files)}, "
                                 f"{len(self.heights)}, {len(self.widths)}")
        if int(prefetch) < 1:
            raise HaldStoreError(f"prefetch must be >= 1, got {prefetch}")
        self.prefetch = int(prefetch)
        self._ahead: Sequence[Request] | None = None  # the requests rendered ahead, see __call__

    def __call__(self, requests: Sequence[Request],
                 ahead: Callable[[], Sequence[Request] | None] | None = None) -> Iterator[torch.Tensor]:
        """Rendered ``(B, 3, size, size)`` batches of ``requests``, in order.

        ``ahead`` (optional) returns the requests the caller expects to ask for next (the next
        epoch's, already checked): a stream that can, renders them before this call's batches
        are all consumed, and a next call with that very list continues without a drain.
        """
        if requests is not self._ahead:
            self.check(requests)
        return self._run(requests, ahead)

    def check(self, requests: Sequence[Request]) -> None:
        """Vectorized check that every box lies inside its image; the error names the file."""
        if not len(requests):
            return
        ids = np.concatenate([np.asarray(r[0], np.int64) for r in requests])
        boxes = np.concatenate([np.asarray(r[1], np.int64).reshape(-1, 4) for r in requests])
        check_boxes(boxes, self.heights[ids], self.widths[ids], name_of=lambda i: self.files[ids[i]])

    def culprit(self, *requests: Request) -> ImageError | None:
        """Render failed requests one sample at a time: an error naming the first bad file."""
        for ids, boxes, flips in requests:
            for k, i in enumerate(ids):
                try:
                    self.renderer(read_files([self.files[i]]), np.asarray(boxes)[k : k + 1],
                                  np.asarray(flips)[k : k + 1])
                except HaldStoreError as exc:
                    return ImageError(f"cannot render {self.files[i]}: {exc}")
        return None

    @property
    def reads_files(self) -> bool:
        """Whether rendering reads the image files (False once a decoded cache holds them all)."""
        return True

    def close(self) -> None:
        """Release threads and processes (a stream is also cleaned up when garbage-collected)."""

    def _check_digests(self, data: list[np.ndarray]) -> None:
        if self.digests is None:
            return
        known = np.flatnonzero(np.asarray(self.digests).any(axis=1))  # zeros: not recorded (a header-only scan)
        changed = [self.files[i] for i in known
                   if hashlib.blake2b(data[i], digest_size=DIGEST_SIZE).digest() != bytes(self.digests[i])]
        if changed:
            raise ImageError(f"{len(changed)} image file(s) changed since the store was built (their content differs "
                             f"from the manifest's hash): {preview(changed)}; restore them or rebuild the store")

    def _run(self, requests: Sequence[Request], ahead: Callable[[], Sequence[Request] | None] | None
             ) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class DaliStream(CropStream):
    """A DALI pipeline over the files, kept across epochs (see the module docstring)."""

    def __init__(self, renderer: DaliRenderer, files: Sequence[str | os.PathLike], heights: np.ndarray,
                 widths: np.ndarray, *, batch_size: int, prefetch: int = 2, cache_decoded: bool | str = "auto",
                 digests: np.ndarray | None = None) -> None:
        super().__init__(renderer, files, heights, widths, prefetch=prefetch)
        self.digests = digests
        self.batch_size = int(batch_size)
        self.cache_decoded = decoded_cache_on(cache_decoded, self.heights, self.widths, renderer.device == "cpu")
        self._names = object_rows([np.frombuffer(os.fsencode(f), dtype=np.uint8) for f in self.files])
        self._decoded: np.ndarray | None = None
        self._runner: DaliRunner | None = None

    @property
    def reads_files(self) -> bool:
        return self._decoded is None

    def _get_runner(self) -> DaliRunner:
        if self._runner is None or self._runner.broken:
            kind = "decoded" if self.cache_decoded else "path"
            self._runner = DaliRunner(self.renderer, kind, "normalized", self.batch_size, self.prefetch,
                                      chunk=render_chunk(self.batch_size, self.renderer.size))
        return self._runner

    def decoded(self) -> np.ndarray:
        """Every image decoded (HWC uint8), once: the cache of ``cache_decoded`` (one
        ``(N, H, W, 3)`` array when all images have the same size, else an object array). The files are read here and,
        given ``digests`` (the manifest's BLAKE2b-128; rows of zeros are not checked), checked before DALI sees them: DALI 2.4
        often crashes the process (SIGSEGV) when one image of a large batch fails to decode."""
        if self._decoded is None:
            data = read_files(self.files)
            self._check_digests(data)
            n, step = len(self.files), self.batch_size
            zeros = np.zeros_like(self.heights)
            full = np.stack([zeros, zeros, self.heights, self.widths], 1)
            requests = [(np.arange(a, min(a + step, n)), full[a : a + step], zeros[a : a + step].astype(bool))
                        for a in range(0, n, step)]
            runner = DaliRunner(self.renderer, "encoded", "raw", step, self.prefetch)
            images = [img for batch in self._named(runner.run(data, self.widths, requests), requests)
                      for img in batch]
            # Same-size images (the usual distilled set) go in one array: a batch is then one gather.
            self._decoded = np.stack(images) if len({im.shape for im in images}) == 1 else object_rows(images)
        return self._decoded

    def _named(self, batches: Iterator, requests: list[Request], chunk: int = 1) -> Iterator:
        """``batches``, with a failure (of a chunk of up to ``chunk`` requests rendered together)
        turned into an error naming the bad file."""
        done = 0
        try:
            for batch in batches:
                done += 1
                yield batch
        except Exception as exc:
            if done >= len(requests):
                raise
            found = self.culprit(*requests[done : done + chunk])
            if found is not None:
                raise found from exc
            names = preview(self.files[i] for r in requests[done : done + chunk] for i in r[0])
            raise HaldStoreError(f"the DALI pipeline failed on a batch of {names}: {exc}") from exc

    def _run(self, requests, ahead):
        largest = max((len(r[0]) for r in requests), default=0)
        if largest > self.batch_size:
            raise HaldStoreError(f"a request of {largest} crops exceeds the stream's batch_size {self.batch_size}")
        runner = self._get_runner()
        if requests is not self._ahead and runner.outstanding:  # batches rendered for something else
            runner.broken = True
            runner = self._get_runner()
        if requests is not self._ahead or not runner.outstanding:
            runner.feeder.start(self.decoded() if self.cache_decoded else self._names, self.widths)
            runner.queue(requests)
        self._ahead = None
        runner.feeder.more = None if ahead is None else functools.partial(
            self._queue_ahead, weakref.ref(runner), weakref.WeakMethod(ahead) if hasattr(ahead, "__self__") else lambda: ahead)
        batches = self._named(runner.take(len(requests)), requests, runner.chunk)
        return batches if self.cache_decoded else self._fix_thin(batches, requests)

    def _queue_ahead(self, runner: weakref.ref, ahead: weakref.WeakMethod) -> Sequence[Request]:
        """The feeder ran dry: queue the caller's next requests, checked (none if that failed:
        the error surfaces when they are asked for). Held weakly: a stream or its pipeline
        never keeps its caller alive."""
        runner, ahead = runner(), ahead()
        try:
            self._ahead = (ahead() or None) if runner is not None and ahead is not None else None
            self.check(self._ahead or ())
        except Exception:
            self._ahead = None
        if runner is not None:
            runner.outstanding += len(self._ahead or ())
        return self._ahead or ()

    def _fix_thin(self, batches: Iterator[torch.Tensor], requests: list[Request]) -> Iterator[torch.Tensor]:
        """Re-render the (rare) 1-px-wide boxes with the renderer's exact path."""
        for (ids, boxes, flips), x in zip(requests, batches):
            rows = np.flatnonzero(thin_boxes(boxes, self.widths[ids]))
            if len(rows):
                x = x.clone()
                x[torch.from_numpy(rows).to(x.device)] = self.renderer(
                    read_files([self.files[ids[r]] for r in rows]), np.asarray(boxes)[rows], np.asarray(flips)[rows])
            yield x

    def close(self) -> None:
        self._runner, self._ahead = None, None


class PillowStream(CropStream):
    """The pillow renderer's stream: every image decoded once by Pillow and kept
    (``cache_decoded``; otherwise each chunk's files are decoded as it is rendered), and
    chunks of batches (:func:`~hald_store.render.render_chunk`: 16 batches of 128 at 32 px, one
    at 224 px) rendered by one call of the compiled kernel each (:mod:`hald_store.resample`,
    without the GIL) and handed out as slices, ``prefetch`` chunks ahead, min(``prefetch``,
    threads) chunks at once on as many render threads, each call on its share of the renderer's
    threads. Given ``ahead``, the next epoch's first chunks are queued as soon as this one's are
    (no drain)."""

    def __init__(self, renderer: PillowRenderer, files: Sequence[str | os.PathLike], heights: np.ndarray,
                 widths: np.ndarray, *, prefetch: int = 2, cache_decoded: bool | str = "auto",
                 digests: np.ndarray | None = None) -> None:
        super().__init__(renderer, files, heights, widths, prefetch=prefetch)
        self.cache_decoded = decoded_cache_on(cache_decoded, self.heights, self.widths, cpu=True)  # Pillow decodes on the CPU
        self.digests = digests
        self._pixels: Pixels | None = None
        self._decoding = threading.Lock()
        # chunks rendered at once (at most prefetch), each on its share of the renderer's threads: a render
        # thread's Python between kernel calls then overlaps another's kernel call (at 32 px, one chunk per
        # render thread gained 1.18x on 2 cores against one chunk on both: benchmarks/results/profiles/)
        self._renders = min(self.prefetch, renderer.num_threads)
        self._kernel_threads = -(-renderer.num_threads // self._renders)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._renders, thread_name_prefix="hald-render")
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self._jobs: collections.deque = collections.deque()  # the first chunks of self._ahead, rendering
        self._ahead_chunks: list[Sequence[Request]] = []

    @property
    def reads_files(self) -> bool:
        return self._pixels is None

    def decoded(self) -> Pixels:
        """Every image decoded, once (the cache of ``cache_decoded``; files checked against
        ``digests`` first, as :meth:`DaliStream.decoded` does)."""
        with self._decoding:  # render threads may ask at once
            if self._pixels is None:
                from .resample import Pixels

                data = read_files(self.files)
                self._check_digests(data)
                self._pixels = Pixels(self.renderer.map(lambda i: self._decode(i, data[i]), range(len(data))))
        return self._pixels

    def _decode(self, i: int, data: np.ndarray) -> np.ndarray:
        """Image ``i`` decoded, of the size the boxes were checked against (the kernel does not check bounds)."""
        try:
            image = pillow_decode(i, data)
        except ImageError as exc:
            raise ImageError(f"cannot render {self.files[i]}: {exc}") from exc
        if image.shape[:2] != (self.heights[i], self.widths[i]):
            raise ImageError(f"cannot render {self.files[i]}: it decodes to {image.shape[1]}x{image.shape[0]} pixels, "
                             f"not the {self.widths[i]}x{self.heights[i]} recorded for it")
        return image

    def _batch(self, request: Request) -> torch.Tensor:
        ids, boxes, flips = request
        if self.cache_decoded:
            return self.renderer.render_pixels(self.decoded(), ids, boxes, flips, threads=self._kernel_threads)
        from .resample import Pixels

        data = read_files([self.files[i] for i in ids])
        pixels = Pixels(self.renderer.map(lambda k: self._decode(ids[k], data[k]), range(len(ids))))
        return self.renderer.render_pixels(pixels, np.arange(len(ids)), boxes, flips, threads=self._kernel_threads)

    def _chunks(self, requests: Sequence[Request]) -> list[Sequence[Request]]:
        """``requests`` in chunks rendered by one kernel call each (:func:`render_chunk` requests)."""
        per = render_chunk(len(requests[0][0]), self.renderer.size) if len(requests) else 1
        return [requests[a : a + per] for a in range(0, len(requests), per)]

    def _render_chunk(self, chunk: Sequence[Request]) -> list[torch.Tensor]:
        """The batches of ``chunk``: one render of all their crops, sliced (views)."""
        if len(chunk) == 1:
            return [self._batch(chunk[0])]
        sizes = [len(r[0]) for r in chunk]
        x = self._batch((np.concatenate([np.asarray(r[0], np.int64) for r in chunk]),
                         np.concatenate([np.asarray(r[1], np.int64).reshape(-1, 4) for r in chunk]),
                         np.concatenate([np.asarray(r[2], np.bool_).reshape(-1) for r in chunk])))
        ends = np.cumsum(sizes).tolist()
        return [x[a:b] for a, b in zip([0] + ends[:-1], ends)]

    def _run(self, requests, ahead):
        if requests is self._ahead:  # its first chunks are rendering
            chunks, jobs = self._ahead_chunks, self._jobs
        else:
            chunks, jobs = self._chunks(requests), collections.deque()
            for job in self._jobs:  # chunks rendered ahead for other requests
                job.cancel()
        self._ahead, self._ahead_chunks, self._jobs = None, [], collections.deque()
        later = iter(chunks[len(jobs):])
        try:
            while True:
                for chunk in itertools.islice(later, max(0, self.prefetch - len(jobs))):
                    jobs.append(self._pool.submit(self._render_chunk, chunk))
                if ahead is not None and len(jobs) < self.prefetch:  # room left: this call's chunks are all
                    # queued, so the next call's first ones follow at once (the render thread goes on from one
                    # epoch to the next while this one is handed out)
                    self._render_ahead(ahead, self.prefetch - len(jobs))
                    ahead = None
                if not jobs:
                    return
                yield from jobs.popleft().result()
        finally:
            for job in jobs:
                job.cancel()

    def _render_ahead(self, ahead: Callable[[], Sequence[Request] | None], count: int) -> None:
        """Start the caller's next requests, ``count`` chunks of them (checked; none if that
        failed: the error surfaces when they are asked for)."""
        try:
            nxt = ahead() or None
            self.check(nxt or ())
        except Exception:
            nxt = None
        if nxt:
            self._ahead, self._ahead_chunks = nxt, self._chunks(nxt)
            self._jobs = collections.deque(self._pool.submit(self._render_chunk, c)
                                           for c in self._ahead_chunks[:count])

    def close(self) -> None:
        for job in self._jobs:
            job.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _RenderBatches(torch.utils.data.Dataset):
    """Map-style dataset for :class:`WorkerStream`: item ``i`` is request ``i`` rendered."""

    def __init__(self, stream: "WorkerStream", requests: list[Request]) -> None:
        self.stream, self.requests = stream, requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> torch.Tensor:
        ids, boxes, flips = self.requests[i]
        try:
            return self.stream.cpu_renderer(read_files([self.stream.files[k] for k in ids]), boxes, flips)
        except HaldStoreError as exc:
            raise self.stream.culprit(self.requests[i]) or exc


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def worker_context() -> multiprocessing.context.BaseContext | None:
    """How :class:`WorkerStream` starts its worker processes: forked (the platform default)
    unless DALI is loaded in this process, whose threads' state a forked worker inherits
    (workers died of it: a suite run, tests/test_loader.py); then from a forkserver that
    preloads this module, so each worker starts clean and cheaply."""
    if "nvidia.dali" not in sys.modules:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *TorchvisionRenderer.modules])
    return context


class WorkerStream(CropStream):
    """Batches rendered by ``workers`` processes of a ``torch.utils.data.DataLoader`` (torch at
    one thread each); ``workers=0`` renders in the calling thread."""

    def __init__(self, renderer: TorchvisionRenderer, files: Sequence[str | os.PathLike], heights: np.ndarray,
                 widths: np.ndarray, *, workers: int | None = None, prefetch: int = 2) -> None:
        super().__init__(renderer, files, heights, widths, prefetch=prefetch)
        self.workers = default_threads() if workers is None else int(workers)
        if self.workers < 0:
            raise HaldStoreError(f"workers must be >= 0, got {workers}")
        self.cpu_renderer = TorchvisionRenderer(renderer.size, renderer.mean, renderer.std,
                                                interpolation=renderer.interpolation, antialias=renderer.antialias,
                                                memory_format=renderer.memory_format)
        if self.workers:  # forked workers inherit them (a forkserver preloads them: worker_context)
            for module in TorchvisionRenderer.modules:
                importlib.import_module(module)

    def _run(self, requests, ahead):
        requests = list(requests)
        extra = dict(worker_init_fn=_one_thread, prefetch_factor=self.prefetch,
                     multiprocessing_context=worker_context()) if self.workers else {}
        loader = torch.utils.data.DataLoader(_RenderBatches(self, requests), batch_size=None, shuffle=False,
                                             num_workers=min(self.workers, len(requests)),
                                             pin_memory=self.renderer.device == "gpu", **extra)
        dev = self.renderer.torch_device
        for batch in loader:
            yield batch.to(dev, non_blocking=True)


def open_stream(renderer: CropRenderer, files: Sequence[str | Path], heights: np.ndarray, widths: np.ndarray, *,
                batch_size: int, prefetch: int = 2, workers: int | None = None,
                cache_decoded: bool | str = "auto", digests: np.ndarray | None = None) -> CropStream:
    """The stream for ``renderer``'s backend: :class:`DaliStream` for DALI (``workers`` is
    its renderer's ``num_threads``; ``digests`` see :meth:`DaliStream.decoded`), :class:`WorkerStream` for torchvision."""
    if isinstance(renderer, DaliRenderer):
        return DaliStream(renderer, files, heights, widths, batch_size=batch_size, prefetch=prefetch,
                          cache_decoded=cache_decoded, digests=digests)
    if isinstance(renderer, PillowRenderer):
        return PillowStream(renderer, files, heights, widths, prefetch=prefetch, cache_decoded=cache_decoded,
                            digests=digests)
    return WorkerStream(renderer, files, heights, widths, workers=workers, prefetch=prefetch)
