"""Training loaders: one :class:`CropLoader`, several sources.

Per epoch the loader asks its source (:mod:`hald_store.sources`) for every image's crop window,
cuts the seeded, rank-sharded image order (:mod:`hald_store.order`) into batches, and hands
the batches to a render stream (:mod:`hald_store.stream`): a DALI pipeline that reads,
decodes, resizes and normalizes on all the process's cores, ahead of the consumer (or, without
DALI, torchvision in worker processes). The source then attaches labels to each rendered
batch. The public constructors are thin:

* :class:`SoftLabelLoader` -- stored crops with their soft labels (or recorded batches,
  replayed, for batch-specific stores);
* :class:`HardLabelLoader` -- fresh crops with the image's class;
* :class:`EvalLoader` -- centred crops in folder order, for evaluation.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .buffers import BufferPool
from .crop_plan import CropPolicy
from .errors import HaldStoreError, OptionError, preview
from .images import Manifest, check_image_root, scan_image_folder
from .options import LoaderOptions
from .order import epoch_crop_seeds, samples_per_rank
from .render import IMAGENET_MEAN, IMAGENET_STD, CropRenderer, make_renderer, renderer_for
from .replay import replay_epoch
from .sources import (HARD_CROP_STREAM, CentreCrops, CropSource, Delivery, EpochCrops, EpochPlan, FreshCrops,
                      HardBatch, RecordedBatches, Sampling, SoftBatch, StoredCrops, one_torch_thread)
from .store import LabelStore
from .stream import CropStream, fits_cache, open_stream

__all__ = ["CropLoader", "LoaderOptions", "SoftLabelLoader", "HardLabelLoader", "EvalLoader", "SoftBatch", "HardBatch",
           "HARD_CROP_STREAM", "epoch_crop_seeds", "replay_epoch"]


class CropLoader:
    """Batches of crops from a :class:`~hald_store.sources.CropSource`: seeded, sharded by
    ``rank``/``world_size`` like ``DistributedSampler``, rendered ``prefetch`` batches ahead on
    ``workers`` threads (DALI) or processes (torchvision); see the module docstring.

    Batches are NCHW float32, with channels-last strides when the renderer's
    ``memory_format`` is ``"channels_last"`` (a loader keyword passed on to the renderer; DALI
    then writes HWC and the loader hands out a view, no copy; same values).

    ``cache_decoded`` keeps every image decoded in memory (DALI on the CPU; same pixels):
    ``"auto"`` does so for small images (see :func:`hald_store.stream.cache_decoded_default`).
    ``cache_crops`` keeps every crop the loader renders, for sources that draw from a fixed set
    of crops (stored crops, centred crops): once an epoch's crops have all been rendered, its
    batches are gathered from memory (one ``index_select`` per batch, the same pixels) instead
    of rendered again. ``"auto"`` does so on the CPU when all the source's crops, float32,
    fit :func:`hald_store.stream.fits_cache`.
    """

    def __init__(
        self,
        source: CropSource,
        images_root: str | os.PathLike,
        manifest: Manifest,
        renderer: CropRenderer,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        prefetch: int = 2,
        workers: int | None = None,
        cache_decoded: bool | str = "auto",
        cache_crops: bool | str = "auto",
        check_batch_size: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise HaldStoreError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise HaldStoreError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.root = Path(images_root)
        self.manifest = manifest
        self.renderer = renderer
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.hard = torch.from_numpy(np.asarray(manifest.labels, dtype=np.int64))
        n = len(manifest)
        self.samples_per_rank = samples_per_rank(n, world_size, drop_last)
        if check_batch_size and self.batch_size > self.samples_per_rank:
            raise OptionError(
                f"batch_size {self.batch_size} is larger than the {self.samples_per_rank} images each of "
                f"{world_size} rank(s) gets from {n} images; use a batch size <= {self.samples_per_rank}", "batch_size"
            )
        if cache_crops not in (True, False, "auto"):
            raise HaldStoreError(f"cache_crops must be True, False or 'auto', got {cache_crops!r}")
        self.cache_crops = cache_crops
        self._crops: tuple[CropSource, torch.Tensor, torch.Tensor] | None = None  # (source, crops, filled)
        self._buffers = BufferPool()  # batches gathered from the crop cache, written again once let go of
        self._ahead: tuple[CropSource, int, Callable[[], EpochPlan]] | None = None  # (source, epoch, its plan)
        self._checks: queue.SimpleQueue | None = None  # FileCheck jobs for the file-check thread
        self._check: FileCheck | None = None  # the latest
        self.stream: CropStream = open_stream(renderer, [self.root / p for p in manifest.paths], manifest.heights,
                                              manifest.widths, batch_size=self.batch_size, prefetch=prefetch,
                                              workers=workers, cache_decoded=cache_decoded, digests=manifest.digests)

    @property
    def device(self) -> torch.device:
        """Where batches are delivered."""
        return self.renderer.torch_device

    @property
    def sampling(self) -> Sampling:
        """Which share of each epoch this loader delivers, in which order."""
        return Sampling(self.seed, self.shuffle, self.rank, self.world_size, self.drop_last)

    @property
    def delivery(self) -> Delivery:
        """What the source is told about the batches (values: a plan must not keep the loader alive)."""
        return Delivery(self.sampling, self.batch_size, self.device, self.hard)

    def num_batches(self) -> int:
        return self.source.num_batches(len(self.manifest), self.delivery)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.num_batches()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that the next ``iter(loader)`` yields."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator:
        """Yield the batches of the current epoch, then advance to the next epoch."""
        yield from self.iter_epoch(self.epoch)
        self.epoch += 1

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator:
        """Batches ``start_batch, ...`` of ``epoch`` (resume mid-epoch with ``start_batch``)."""
        if not 0 <= start_batch <= len(self):
            raise HaldStoreError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        return self._produce(int(epoch), int(start_batch))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's image indices for ``epoch``, in delivery order."""
        return self.source.epoch_order(len(self.manifest), epoch, self.sampling)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """``epoch``'s crops, batches and render requests; for sources that read the store (or
        plan every image), the next epoch's plan is then made ahead -- on a background thread
        while this one trains when it is slow (at FKD scale the pass over the store takes tens
        of seconds) -- and its requests are queued on the stream before this epoch ends.
        Errors surface here."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is self.source and ahead[1] == epoch:
            plan = ahead[2]()
        else:
            plan = self._plan(self.source, epoch)
        if self.source.plan_ahead:
            later = in_background if self.source.slow_crops(self.manifest) else when_asked
            self._ahead = (self.source, epoch + 1, later(self._plan, self.source, epoch + 1))
        return plan

    def epoch_crops(self, epoch: int) -> EpochCrops:
        """The source's crops of ``epoch`` (see :meth:`epoch_plan`)."""
        return self.epoch_plan(epoch).crops

    def _plan(self, source: CropSource, epoch: int) -> EpochPlan:
        delivery, crops = self.delivery, source.crops(self.manifest, epoch)
        batches = source.batches(len(self.manifest), epoch, crops, delivery)
        requests = [(ids, crops.boxes[ids], crops.flips[ids]) for ids in batches]
        return EpochPlan(crops, batches, requests, source.batch_labels(crops, batches, delivery))

    def _next_requests(self) -> list | None:
        """The stream's look-ahead: the requests of the plan being made for the next epoch
        (none when that epoch's crops are all in the crop cache)."""
        ahead = self._ahead
        if ahead is None or ahead[0] is not self.source:
            return None
        plan, cache = ahead[2](), self._crop_cache()
        if cache is not None and bool(cache[1][torch.from_numpy(self.source.crop_keys(plan.crops))].all()):
            return None
        return plan.requests

    def _crop_cache(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rendered crops, filled mask) of the current source, see ``cache_crops``; None when off."""
        if self._crops is not None and self._crops[0] is self.source:
            return self._crops[1:]
        count, size = self.source.crop_count(self.manifest), self.renderer.size
        on = count > 0 and (self.cache_crops is True or (
            self.cache_crops == "auto" and self.renderer.device == "cpu" and fits_cache(count * 12 * size * size)))
        if not on:
            return None
        dev = self.device
        crops = (torch.empty((count, size, size, 3), device=dev).permute(0, 3, 1, 2)  # channels-last strides
                 if self.renderer.memory_format == "channels_last" else torch.empty((count, 3, size, size), device=dev))
        self._crops = (self.source, crops, torch.zeros(count, dtype=torch.bool, device=dev))
        return self._crops[1:]

    def _check_files(self, batches: Sequence[np.ndarray]) -> FileCheck:
        """Queue the check of the files of ``batches`` on the loader's file-check thread."""
        if self._checks is None:
            self._checks = queue.SimpleQueue()
            threading.Thread(target=serve_checks, args=(self._checks,), name="hald-file-check", daemon=True).start()
            weakref.finalize(self, self._checks.put, None)  # the thread ends with the loader
        if self._check is not None:
            self._check.cancelled = True  # its epoch was left or is over
        self._check = FileCheck(self.manifest, self.root, batches, self.source.check_unchanged)
        self._checks.put(self._check)
        return self._check

    def _produce(self, epoch: int, start_batch: int) -> Iterator:
        plan = self.epoch_plan(epoch)
        make, cache = self.source.make_batch, self._crop_cache()
        if cache is not None:
            crops, filled = cache
            keys = torch.from_numpy(self.source.crop_keys(plan.crops)).to(crops.device)
            rows = [keys[torch.from_numpy(ids).to(crops.device)] for ids in plan.batches]
            if all(bool(filled[r].all()) for r in rows[start_batch:]):  # every crop rendered before: gather
                check = self._check_files([])  # no file is read (each was checked when its crops were rendered)
                for k in range(start_batch, len(rows)):
                    with one_torch_thread():
                        images = gather(crops, rows[k], self._buffers)
                    check.wait(None)
                    yield make(images, plan, k)
                return
        # files are checked where this epoch reads them (not once a decoded cache holds them all: decoded from
        # files checked then, against their hashes where the manifest has them)
        reads = self.stream.reads_files
        files = self._check_files(plan.batches[start_batch:] if reads else [])
        requests = plan.requests[start_batch:] if start_batch else plan.requests
        for k, images in enumerate(self.stream(requests, self._next_requests if self._ahead else None), start_batch):
            if cache is not None:
                crops.index_copy_(0, rows[k], images)
                filled[rows[k]] = True
            files.wait(k - start_batch if reads else None)
            yield make(images, plan, k)


class FileCheck:
    """An epoch's check that no image file changed under a running loader (sizes and times,
    :func:`~hald_store.images.check_image_root`), run by the loader's file-check thread
    (:func:`serve_checks`), in delivery order: the images of batch ``k`` are checked after the
    epoch started and before :meth:`wait` ``(k)`` returns, so a changed file is refused (the
    error names it) before a batch with its pixels is handed out, while the consumer's thread
    spends nothing on it. ``before`` (the source's :meth:`~hald_store.sources.CropSource.check_unchanged`)
    runs first. Pieces of batches grow from one batch to :data:`CHECK_PIECE` images (the first
    batch waits for little); ``cancelled`` stops it (an epoch left early)."""

    def __init__(self, manifest: Manifest, root: Path, batches: Sequence[np.ndarray],
                 before: Callable[[], None] = lambda: None) -> None:
        self.manifest, self.root, self.before = manifest, root, before
        self.ends = np.cumsum([len(b) for b in batches], dtype=np.int64)
        self.order = np.concatenate(batches) if len(batches) else np.zeros(0, np.int64)
        self.done, self.error, self.cancelled = -1, None, False  # images checked in delivery order (-1: not
        # even ``before``); the error
        self._cond = threading.Condition()

    def run(self) -> None:
        try:
            self.before()
            with self._cond:
                self.done = 0
                self._cond.notify_all()
            start, piece = 0, int(self.ends[0]) if len(self.ends) else 1
            while start < len(self.order) and not self.cancelled:
                end = min(start + piece, len(self.order))
                check_image_root(self.manifest, self.root, rows=self.order[start:end])
                with self._cond:
                    self.done = start = end
                    self._cond.notify_all()
                piece = min(2 * piece, CHECK_PIECE)
        except BaseException as e:  # handed to the consumer by wait()
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def wait(self, k: int | None) -> None:
        """Return once ``before`` ran and the images of batches ``0..k`` are checked (``None``:
        ``before`` only); raise the check's error if one failed."""
        need = 0 if k is None else int(self.ends[k])
        with self._cond:
            self._cond.wait_for(lambda: self.done >= need or self.error is not None)
            if self.done < need:
                raise self.error


def serve_checks(jobs: queue.SimpleQueue) -> None:
    """A loader's file-check thread (one per loader, not one per epoch: under load, starting
    a thread took milliseconds): runs the :class:`FileCheck` jobs in turn, until ``None``."""
    for job in iter(jobs.get, None):
        job.run()


CHECK_PIECE = 16384  # images checked per call at most (each call resolves the class folders' real paths)


def gather(crops: torch.Tensor, rows: torch.Tensor, buffers: BufferPool | None = None) -> torch.Tensor:
    """``crops[rows]`` in the memory format of ``crops`` (contiguous or channels-last NCHW),
    written into a free buffer of ``buffers`` when given and the crops are on the CPU."""
    nhwc = not crops.is_contiguous()
    src = crops.permute(0, 2, 3, 1) if nhwc else crops
    if buffers is None or src.device.type != "cpu":
        out = src.index_select(0, rows)
    else:
        out = torch.from_numpy(buffers.empty((len(rows), *src.shape[1:]), src.new_empty(0).numpy().dtype))
        torch.index_select(src, 0, rows, out=out)
    return out.permute(0, 3, 1, 2) if nhwc else out


def in_background(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start ``fn(*args)`` on a daemon thread (it never holds up the interpreter's exit);
    the returned function waits for it and returns its result or raises its error."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=run, name=f"hald-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["result"]

    return result


def when_asked(method: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``method(*args)``, computed when the returned function is first called (then kept). The
    method's object is held weakly: a loader must not keep itself (and its busy pipeline) alive."""
    ref = weakref.WeakMethod(method)
    return functools.cache(lambda: ref()(*args))


def _open(store: LabelStore | str | os.PathLike) -> LabelStore:
    return store if isinstance(store, LabelStore) else LabelStore.open(store)


class SoftLabelLoader(CropLoader):
    """Stored crops with their soft labels: one stored crop per image and epoch, cycling
    through all of an image's crops before repeating one (:func:`epoch_crop_seeds`).

    ``options`` (:class:`~hald_store.options.LoaderOptions`, or its fields as keywords:
    ``SoftLabelLoader(store, root, batch_size=64, device="cpu")``; other keywords go to the
    renderer) say how crops are rendered, sampled and delivered. ``soft`` is dense ``(B, C)``
    probabilities at ``temperature`` (the store's by default) or, with ``dense=False``,
    :class:`~hald_store.codec.TopKLabels`. A store of batch-specific labels is read in *replay*
    mode (:class:`~hald_store.sources.RecordedBatches`): ``batch_size`` must equal the labelling
    batch size, ``shuffle`` shuffles the order of the recorded batches and ranks get whole batches.
    """

    def __init__(
        self,
        store: LabelStore | str | os.PathLike,
        images_root: str | os.PathLike,
        options: LoaderOptions | None = None,
        *,
        temperature: float | None = None,
        dense: bool = True,
        replay: bool | None = None,
        **keywords: Any,
    ) -> None:
        o, renderer_kw = LoaderOptions.of(options, keywords)
        self.options = o
        self.store = _open(store)
        check_image_root(self.store.manifest(), images_root, check_hashes=o.check_hashes)
        self.replay = self.store.batch_mode if replay is None else bool(replay)
        if self.replay != self.store.batch_mode:
            raise HaldStoreError(
                f"store {self.store.path!r} holds batch-specific labels: read it with replay=True"
                if self.store.batch_mode else f"store {self.store.path!r} has no recorded labelling batches to replay"
            )
        labelling = self.store.settings.labelling
        if self.replay and o.batch_size != labelling.batch_size:
            raise HaldStoreError(
                f"replaying {self.store.path!r} needs batch_size = the labelling batch size "
                f"{labelling.batch_size} (its labels depend on the batch), got {o.batch_size}"
            )
        temperature = self.store.temperature if temperature is None else float(temperature)
        loading = o.loading(seed=0)
        sampling = Sampling(loading["seed"], o.shuffle, o.rank, o.world_size, o.drop_last)
        source = (RecordedBatches(self.store, temperature, dense, sampling) if self.replay
                  else StoredCrops(self.store, temperature, dense, sampling.seed, sampling))
        self.temperature = source.temperature
        super().__init__(source, images_root, self.store.manifest(),
                         renderer_for(self.store.render_spec, o.backend, o.device, o.workers, **renderer_kw),
                         **loading, check_batch_size=not self.replay)

    def crop_seeds(self, epoch: int) -> np.ndarray:
        """Stored crop seed of every image in ``epoch``."""
        return self.source.crop_seeds(epoch)

    def batch_order(self, epoch: int) -> np.ndarray:
        """Replay mode: this rank's recorded batch indices for ``epoch``, in delivery order."""
        return self.source.batch_order(epoch)


class HardLabelLoader(CropLoader):
    """Fresh random crops (new ones every epoch, same crop policy) with the image's class.

    Build it from a store (``HardLabelLoader(store, images_root)``: the store's images, crop
    policy, input size and renderer; the store's plan seed unless ``seed`` is given) or from a
    plain image folder with :meth:`from_folder`. ``options`` and keywords as for
    :class:`SoftLabelLoader`.
    """

    def __init__(
        self,
        store: LabelStore | str | os.PathLike,
        images_root: str | os.PathLike,
        options: LoaderOptions | None = None,
        **keywords: Any,
    ) -> None:
        o, renderer_kw = LoaderOptions.of(options, keywords)
        self.options = o
        store = _open(store)
        manifest = store.manifest()
        check_image_root(manifest, images_root, check_hashes=o.check_hashes)
        loading = o.loading(seed=store.settings.plan_seed)
        super().__init__(FreshCrops(store.crop_policy, loading["seed"]), images_root, manifest,
                         renderer_for(store.render_spec, o.backend, o.device, o.workers, **renderer_kw), **loading)

    @property
    def crop_policy(self) -> CropPolicy:
        return self.source.policy

    @classmethod
    def from_folder(
        cls,
        images_root: str | os.PathLike,
        options: LoaderOptions | None = None,
        *,
        input_size: int,
        crop_policy: CropPolicy = CropPolicy(),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        progress: bool = False,
        **keywords: Any,
    ) -> "HardLabelLoader":
        """A hard-label loader over an image folder (scanned now), without a store (seed 0 unless given)."""
        self = cls.__new__(cls)
        self.options, renderer_kw = LoaderOptions.of(options, keywords)
        o, loading = self.options, self.options.loading(seed=0)
        renderer = make_renderer(o.backend, size=input_size, mean=mean, std=std, device=o.device, workers=o.workers,
                                 **renderer_kw)
        CropLoader.__init__(self, FreshCrops(crop_policy, loading["seed"]), images_root,
                            scan_image_folder(images_root, progress=progress, verify=False), renderer, **loading)
        return self


class EvalLoader(CropLoader):
    """Whole images (a centred square covering ``crop_fraction`` of the shorter side, resized
    to ``input_size``), in folder order, with their class: for validation and testing.
    ``options`` and keywords as for :class:`SoftLabelLoader`, less the sampling ones (every
    image once, in order, on one rank)."""

    def __init__(
        self,
        images_root: str | os.PathLike,
        options: LoaderOptions | None = None,
        *,
        input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_fraction: float = 1.0,
        class_names: Sequence[str] | None = None,
        progress: bool = False,
        **keywords: Any,
    ) -> None:
        o, renderer_kw = LoaderOptions.of(options, keywords)
        self.options = o
        source = CentreCrops(crop_fraction)
        manifest = scan_image_folder(images_root, progress=progress, verify=False)  # sizes only
        if class_names is not None and list(class_names) != manifest.class_names:
            extra = sorted(set(manifest.class_names) - set(class_names))
            lacking = sorted(set(class_names) - set(manifest.class_names))
            raise HaldStoreError(
                f"the classes of {str(images_root)!r} differ from the expected ones"
                f"{f'; not expected: {preview(map(repr, extra))}' if extra else ''}"
                f"{f'; missing: {preview(map(repr, lacking))}' if lacking else ''}"
                f"{'; same names in a different order' if not extra and not lacking else ''}"
            )
        renderer = make_renderer(o.backend, size=input_size, mean=mean, std=std, device=o.device, workers=o.workers,
                                 **renderer_kw)
        in_order = replace(o, batch_size=min(o.batch_size, len(manifest)), shuffle=False, seed=0, drop_last=False,
                           rank=0, world_size=1)
        super().__init__(source, images_root, manifest, renderer, **in_order.loading(seed=0))

    @property
    def crop_fraction(self) -> float:
        return self.source.fraction
