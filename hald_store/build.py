"""Build a label store: run a teacher over the planned crops of an image folder.

The work is split into blocks of ``chunk_images`` images (all their crops). Each block is
rendered, labelled, encoded and written as one chunk per array, then marked done; a killed
build resumed with ``resume=True`` redoes only unfinished blocks, in the same batches, so
the result is identical to an uninterrupted build.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from copy import deepcopy
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batch_plan import BatchPlan
from .codec import VALUE_CODECS, LabelCodec, check_logits
from .crop_plan import CropPolicy, plan_image_crops
from .devices import resolve_device
from .errors import HaldStoreError, OptionError, check_at_least, check_positive_finite, check_seed, preview
from .images import Manifest, check_image_root, class_names, scan_image_folder
from .mixing import MIXES
from .models import model_name, weights_sha256
from .options import RenderOptions
from .render import IMAGENET_MEAN, IMAGENET_STD, make_renderer, read_files
from .replay import replay_batches
from .schema import LAYOUTS, TEACHER_MODES, LabellingPlan, RenderSpec, StoreSettings, TeacherInfo, check_choice
from .locations import is_remote
from .store import LabelStore
from .stream import CropStream, open_stream
from .writer import BlockAssembler, StoreWriter


@dataclass
class BuildSummary:
    """What a build did; ``str()`` gives the human summary the CLI prints."""

    path: str
    crops_total: int
    crops_written: int
    blocks_written: int
    blocks_skipped: int
    seconds: float
    teacher_seconds: float
    bytes_on_disk: int
    label_bytes_on_disk: int
    images_scanned: int = 0  # images read, hashed and decoded by the scan, over all ranks

    @property
    def crops_per_second(self) -> float:
        return self.crops_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_crop(self) -> float:
        return self.bytes_on_disk / max(self.crops_total, 1)

    @property
    def outside_teacher_fraction(self) -> float:
        """Share of the wall time not spent in the teacher's forward pass."""
        return 1.0 - self.teacher_seconds / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"store            {self.path}\n"
            f"images scanned   {self.images_scanned:,} (each read, hashed and decoded once)\n"
            f"crops written    {self.crops_written:,} this run ({self.blocks_written} blocks; "
            f"{self.blocks_skipped} already done), {self.crops_total:,} in the store\n"
            f"bytes on disk    {self.bytes_on_disk:,} ({self.label_bytes_on_disk:,} of them labels)\n"
            f"bytes per crop   {self.bytes_per_crop:.2f} (labels {self.label_bytes_on_disk / max(self.crops_total, 1):.2f})\n"
            f"throughput       {self.crops_per_second:,.0f} crops/s over {self.seconds:.1f} s "
            f"({100 * self.outside_teacher_fraction:.0f}% of the time outside the teacher)"
        )


def crops_for_slc(manifest: Manifest, slc: int) -> int:
    """Crops per image giving ``slc`` soft labels per class (needs equal images per class)."""
    per_class = manifest.images_per_class()
    present = per_class[per_class > 0]
    if len(set(present.tolist())) != 1:
        raise OptionError("slc needs the same number of images in every class; use crops_per_image", "slc",
                          "crops_per_image")
    ipc = int(present[0])
    if slc < ipc or slc % ipc:
        raise OptionError(f"slc={slc} is not a positive multiple of the {ipc} images per class; "
                          f"try slc={max(ipc, slc // ipc * ipc)}", "slc")
    return slc // ipc


def _crop_batches(
    store: LabelStore, stream: CropStream, blocks: Sequence[int], batch_size: int,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
    """Rendered crops of the given image blocks in fixed batches: yields
    (block, positions in the block's (images x S) label array, image indices, images)."""
    s = store.crops_per_image
    for block in blocks:
        start, stop_img = store.block_range(block)
        images = np.repeat(np.arange(start, stop_img), s)
        seeds = np.tile(np.arange(s), stop_img - start)
        boxes, flips = store.boxes(images, seeds)
        cuts = [slice(b0, b0 + batch_size) for b0 in range(0, len(images), batch_size)]
        for sel, x in zip(cuts, stream([(images[sel], boxes[sel], flips[sel]) for sel in cuts])):
            yield block, (images[sel] - start) * s + seeds[sel], images[sel], x


def _recorded_batches(
    store: LabelStore, stream: CropStream, epochs: Sequence[int],
) -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
    """The store's recorded labelling batches of the given epochs, rendered and mixed:
    yields (epoch, positions = image indices, image indices, images)."""
    mix = store.settings.labelling.mix
    for epoch in epochs:
        boxes, flips = store.array("crops/box")[:, epoch], store.array("crops/flip")[:, epoch]
        for m, x in replay_batches(store.batches(epoch), boxes, flips, mix, stream):
            yield epoch, m, m, x


def batch_stats_teacher(teacher: nn.Module) -> nn.Module:
    """A copy of ``teacher`` whose BatchNorm layers normalize with each batch's statistics and
    leave their running statistics untouched; every other layer stays in eval mode."""
    copy = deepcopy(teacher).eval()
    for m in copy.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
    return copy


@dataclass(frozen=True)
class BuildConfig(RenderOptions):
    """How to build a store (``hald-store build`` flags map one to one; ``--scale``, ``--ratio``
    and ``--flip-prob`` make ``crop_policy``). Exactly one of ``crops_per_image`` and ``slc``
    (soft labels per class) is given; see the README for the meaning of each option. The
    rendering options (``backend``, ``device`` -- the teacher's too --, ``workers``, also the
    scan's threads, and ``cache_decoded``) are the loaders' (:class:`~hald_store.options.RenderOptions`)."""

    teacher_name: str | None = None  # recorded; default: the spec resolve_model/load_teacher built it from, else its class name
    num_classes: int | None = None  # teacher output width; default: the number of class folders
    crops_per_image: int | None = None
    slc: int | None = None
    top_k: int = 5
    values: str = "uint8"
    temperature: float = 20.0
    input_size: int = 224
    crop_policy: CropPolicy = CropPolicy()
    seed: int = 0  # crop plan seed
    batch_size: int = 256  # teacher batch size
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    manifest: Manifest | str | os.PathLike | None = None  # a scan made earlier: skips the scan
    chunk_images: int = 1024
    layout: str = "block"  # "sharded": an epoch reads ~1/S of the labels (see hald_store.store)
    resume: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    teacher_mode: str = "eval"  # "train": BatchNorm on each labelling batch's statistics
    mix: str = "none"  # cutmix / mixup inside each labelling batch
    mix_alpha: float | None = None  # Beta(alpha, alpha) of the mix; default 1.0
    labelling_batch_size: int | None = None  # default: batch_size
    storage_options: dict | None = None  # for fsspec URLs
    progress: bool = True

    def check(self) -> None:
        """Refuse bad or contradicting options (before any slow work)."""
        if (self.crops_per_image is None) == (self.slc is None):
            raise OptionError("give exactly one of crops_per_image and slc", "crops_per_image", "slc")
        for name in ("crops_per_image", "slc", "batch_size", "input_size", "chunk_images"):
            check_at_least(name, getattr(self, name), 1)
        check_at_least("workers", self.workers, 0)
        check_seed("seed", self.seed)
        check_positive_finite("temperature", self.temperature)
        check_choice("values", self.values, VALUE_CODECS)
        check_choice("teacher_mode", self.teacher_mode, TEACHER_MODES)
        check_choice("mix", self.mix, MIXES)
        check_choice("layout", self.layout, LAYOUTS)
        if self.layout != "block" and self.batch_mode:
            raise OptionError("layout='sharded' is for per-crop labels; batch-specific labels (teacher_mode='train' "
                              "or a mix) are already chunked by crop seed", "layout", "teacher_mode", "mix")
        if self.mix == "none" and self.mix_alpha is not None:
            raise OptionError("mix_alpha needs mix='cutmix' or mix='mixup' (it has no effect with mix='none')",
                              "mix_alpha", "mix")
        check_positive_finite("mix_alpha", self.mix_alpha)
        if self.labelling_batch_size is not None and not self.batch_mode:
            raise OptionError("labelling_batch_size applies to batch-specific labels only (teacher_mode='train' or "
                              "mix='cutmix' or mix='mixup'); use batch_size otherwise", "labelling_batch_size",
                              "teacher_mode", "mix", "batch_size")
        train = self.teacher_mode == "train"
        if self.labelling_batch_size is not None and self.labelling_batch_size < (2 if train else 1):
            raise OptionError(f"labelling_batch_size={self.labelling_batch_size} is too small"
                              f"{' for BatchNorm batch statistics (need >= 2)' if train else ''}", "labelling_batch_size")

    @property
    def batch_mode(self) -> bool:
        """True when labels are batch-specific (teacher in train mode, or mixed batches)."""
        return self.teacher_mode == "train" or self.mix != "none"


def build_store(images: str | os.PathLike, out: str | os.PathLike, teacher: nn.Module,
                config: BuildConfig | None = None, **options: Any) -> BuildSummary:
    """Label ``crops_per_image`` planned crops of every image in ``images`` with ``teacher``.

    ``images`` is an ImageFolder-style directory; ``out`` the store directory or an fsspec URL
    (``s3://bucket/labels.zarr``). The settings are ``config`` or the :class:`BuildConfig`
    keywords ``options`` (which also override a given ``config``)::

        build_store("train/", "labels.zarr", teacher, crops_per_image=10, top_k=5)

    ``teacher_mode="train"`` (BatchNorm on batch statistics) or ``mix="cutmix"|"mixup"`` make
    labels batch-specific: crop seed ``e`` of every image is labelled in labelling epoch ``e``,
    in batches of ``labelling_batch_size`` (default ``batch_size``) planned by
    :class:`~hald_store.batch_plan.BatchPlan` and recorded in the store for replay.

    ``manifest`` (a :class:`~hald_store.images.Manifest` or a file from ``hald-store scan``)
    skips the scan. Crops are rendered by a :mod:`~hald_store.stream` (``workers`` threads for DALI,
    processes for torchvision; ``cache_decoded`` as for the loaders) ahead of the teacher.
    """
    c = BuildConfig(**options) if config is None else replace(config, **options)
    c.check()
    # the codec against the class folders before the scan, which reads every image
    LabelCodec.checked(c.values, c.top_k, c.num_classes or len(class_names(images)), c.temperature)
    t_start = time.perf_counter()
    root, out = Path(images), os.fspath(out)
    ranks = distributed.context()
    with StoreWriter(out, resume=c.resume, overwrite=c.overwrite, storage_options=c.storage_options,
                     ranks=ranks) as writer:
        progress = c.progress and ranks.is_main
        dev = ranks.device() if ranks.active and c.device == "auto" else resolve_device(c.device)

        if c.manifest is None:
            manifest = scan_image_folder(root, skip_bad=c.skip_bad, progress=progress, workers=c.workers or None,
                                         ranks=ranks)
        else:  # a scan made earlier (hald-store scan): its files must still be there, at their sizes
            manifest = c.manifest if isinstance(c.manifest, Manifest) else Manifest.load(c.manifest)
            check_image_root(manifest, root)
        num_classes = len(manifest.class_names) if c.num_classes is None else c.num_classes
        if num_classes < len(manifest.class_names):
            raise OptionError(f"num_classes={num_classes} is smaller than the {len(manifest.class_names)} class "
                              f"folders in {str(root)!r}", "num_classes")
        s = c.crops_per_image or crops_for_slc(manifest, c.slc)
        codec = LabelCodec.checked(c.values, c.top_k, num_classes, c.temperature)
        check_resources(out, len(manifest), s, c.chunk_images, codec, "crops_per_image" if c.crops_per_image else "slc",
                        disk=not (c.resume or is_remote(out)))
        renderer = make_renderer(c.backend, size=c.input_size, mean=c.mean, std=c.std, device=dev, workers=c.workers)
        teacher = teacher.to(dev).eval()
        n = len(manifest)
        plan = None
        if c.batch_mode:
            try:
                plan = BatchPlan(num_images=n, epochs=s, batch_size=c.labelling_batch_size or min(c.batch_size, n),
                                 seed=c.seed, mix=c.mix, mix_alpha=1.0 if c.mix_alpha is None else c.mix_alpha,
                                 size=c.input_size)
            except ValueError as e:
                raise HaldStoreError(str(e)) from e
        settings = StoreSettings(
            num_images=n, crops_per_image=s, num_classes=num_classes, class_names=tuple(manifest.class_names),
            plan_seed=int(c.seed), crop_policy=c.crop_policy, render_spec=RenderSpec.of(renderer),
            teacher=TeacherInfo(c.teacher_name or model_name(teacher), weights_sha256(teacher), c.teacher_mode),
            codec=codec, manifest_blake2b=manifest.fingerprint(), skipped=tuple(manifest.skipped),
            labelling=None if plan is None else LabellingPlan.of(plan, c.teacher_mode), layout=c.layout)

        def crops(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            return plan_image_crops(c.seed, start, stop, s, manifest.heights, manifest.widths, c.crop_policy)

        # Probe the teacher on one crop, so a wrong teacher fails before anything is written.
        boxes, flips = crops(0, 1)
        probe = renderer(read_files([root / manifest.paths[0]]), boxes[0, :1], flips[0, :1])
        with torch.inference_mode():
            _check_logits(teacher(probe.to(dev)).float().cpu(), np.zeros(1, np.int64), manifest, num_classes)

        ranks.check_same(settings.to_dict(), "build settings")
        store = writer.open(manifest, crops, settings, c.chunk_images,
                            batches=None if plan is None else plan.arrays(), source=f"the images in {str(root)!r}")
        todo = writer.todo()
        stream = open_stream(renderer, [root / p for p in manifest.paths], manifest.heights, manifest.widths,
                             batch_size=c.batch_size if plan is None else plan.batch_size, workers=c.workers,
                             cache_decoded=c.cache_decoded, digests=manifest.digests)
        if plan is not None:
            batches = _recorded_batches(store, stream, todo)
            if c.teacher_mode == "train":
                teacher = batch_stats_teacher(teacher)
        else:
            batches = _crop_batches(store, stream, todo, c.batch_size)
        remaining = sum(int(np.prod(store.block_shape(b))) for b in todo)
        pbar = tqdm(total=store.num_crops, initial=store.num_crops - remaining, desc="label crops", unit="crop",
                    disable=not progress, dynamic_ncols=True)
        teacher_seconds, written = 0.0, 0
        blocks = BlockAssembler(store)
        try:
            for block, positions, idx, x in batches:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    logits = teacher(x.to(dev, non_blocking=True)).float().cpu()
                teacher_seconds += time.perf_counter() - t0
                _check_logits(logits, idx, manifest, num_classes)
                written += blocks.add(block, positions, logits)
                pbar.update(len(idx))
        finally:
            pbar.close()
        written, blocks_written = int(ranks.sum(written)), int(ranks.sum(len(todo)))
    final = LabelStore.open(out, allow_incomplete=True, storage_options=c.storage_options)  # swapped in, if staged
    return BuildSummary(
        path=out, crops_total=final.num_crops, crops_written=written, blocks_written=blocks_written,
        blocks_skipped=final.num_blocks - blocks_written, seconds=time.perf_counter() - t_start,
        teacher_seconds=teacher_seconds, bytes_on_disk=final.bytes_on_disk(),
        label_bytes_on_disk=final.bytes_on_disk("labels"), images_scanned=int(ranks.sum(manifest.inspected_here)),
    )


# Peak bytes per crop of planning a block's crops (measured with tracemalloc: 93 for 10**6 crops).
_PLAN_BYTES_PER_CROP = 96


def _available_memory() -> int:
    """Bytes of memory the system can give without swapping (``MemAvailable``; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_resources(out: str, num_images: int, crops_per_image: int, chunk_images: int, codec: LabelCodec,
                    name: str = "crops_per_image", disk: bool = True) -> None:
    """Refuse, before any work, a build whose block of crops cannot fit in the memory available
    now or whose labels (raw codec bytes) cannot fit on ``out``'s disk (``disk``); ``name`` is
    the parameter that set ``crops_per_image``."""
    block = min(chunk_images, num_images) * crops_per_image
    memory = block * (_PLAN_BYTES_PER_CROP + 2 * codec.bytes_per_crop())
    available = _available_memory()
    value = f"{crops_per_image:,} crops per image ({name})"
    if memory > available:
        raise OptionError(f"{value} need about {memory / 2**30:,.1f} GiB of memory for one block of "
                          f"{min(chunk_images, num_images):,} images, but {available / 2**30:,.1f} GiB are available: "
                          f"lower {name} or chunk_images", name, "chunk_images")
    if disk:
        labels = num_images * crops_per_image * codec.bytes_per_crop()
        parent = Path(os.path.abspath(out)).parent
        while not parent.exists():
            parent = parent.parent
        free = shutil.disk_usage(parent).free
        if labels > free:
            raise OptionError(f"{value} need about {labels / 2**30:,.1f} GiB on disk for the labels of "
                              f"{num_images * crops_per_image:,} crops, but {str(parent)!r} has {free / 2**30:,.1f} "
                              f"GiB free: lower {name} or write elsewhere", name)


def _keyword_signature(fn: Any, config: type) -> inspect.Signature:
    """``fn``'s signature with ``**options`` spelled out as ``config``'s fields (for help(), IDEs
    and ``inspect.signature``)."""
    sig = inspect.signature(fn)
    fixed = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    return sig.replace(parameters=fixed + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                                             annotation=f.type) for f in fields(config)])


build_store.__signature__ = _keyword_signature(build_store, BuildConfig)


def _check_logits(logits: torch.Tensor, idx: np.ndarray, manifest: Manifest, num_classes: int) -> None:
    """:func:`~hald_store.codec.check_logits`, naming the images of broken crops."""
    check_logits(logits, num_classes, lambda rows: preview(sorted({manifest.paths[i] for i in idx[rows]})),
                 note="; finished blocks are kept")
