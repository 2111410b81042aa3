"""Build a label store: run a teacher over the planned crops of an image folder.

The work is split into blocks of ``chunk_images`` images (all their crops). Each block is
rendered, labelled, encoded and written as one chunk per array, then marked done; a killed
build resumed with ``resume=True`` redoes only unfinished blocks, in the same batches, so
the result is identical to an uninterrupted build.
"""

from __future__ import annotations

import os
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .batch_plan import BatchPlan, batch_members, mix_recorded
from .codec import LabelCodec
from .crop_plan import CropPolicy, plan_image_crops
from .errors import HaldStoreError, TeacherOutputError, check_positive_finite
from .images import Manifest, check_image_root, scan_image_folder
from .mixing import MIXES
from .models import weights_sha256
from .render import IMAGENET_MEAN, IMAGENET_STD, make_renderer, read_files, threads_option
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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` picks CUDA when available, else CPU; asking for CUDA without it is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise HaldStoreError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise HaldStoreError(f"--device {device}: unsupported device type {dev.type!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HaldStoreError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return dev


def crops_for_slc(manifest: Manifest, slc: int) -> int:
    """Crops per image giving ``slc`` soft labels per class (needs equal images per class)."""
    per_class = manifest.images_per_class()
    present = per_class[per_class > 0]
    if len(set(present.tolist())) != 1:
        raise HaldStoreError("--slc needs the same number of images in every class; use --crops-per-image")
    ipc = int(present[0])
    if slc < ipc or slc % ipc:
        raise HaldStoreError(
            f"--slc {slc} is not a positive multiple of the {ipc} images per class; "
            f"try --slc {max(ipc, slc // ipc * ipc)}"
        )
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
    mix = store.attrs["labelling"]["mix"]
    for epoch in epochs:
        plan = store.batches(epoch)
        boxes, flips = store.array("crops/box")[:, epoch], store.array("crops/flip")[:, epoch]
        members = [batch_members(plan, b) for b in range(len(plan["members"]))]
        for b, (m, x) in enumerate(zip(members, stream([(m, boxes[m], flips[m]) for m in members]))):
            yield epoch, m, m, mix_recorded(mix, x, plan, b)


def batch_stats_teacher(teacher: nn.Module) -> nn.Module:
    """A copy of ``teacher`` whose BatchNorm layers normalize with each batch's statistics and
    leave their running statistics untouched; every other layer stays in eval mode."""
    copy = deepcopy(teacher).eval()
    for m in copy.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
    return copy


def build_store(
    images: str | os.PathLike,
    out: str | os.PathLike,
    teacher: nn.Module,
    *,
    teacher_name: str | None = None,
    num_classes: int | None = None,
    crops_per_image: int | None = None,
    slc: int | None = None,
    top_k: int = 5,
    values: str = "uint8",
    temperature: float = 20.0,
    input_size: int = 224,
    crop_policy: CropPolicy = CropPolicy(),
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    backend: str = "auto",
    workers: int | None = None,
    cache_decoded: bool | str = "auto",
    manifest: Manifest | str | os.PathLike | None = None,
    chunk_images: int = 1024,
    resume: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
    teacher_mode: str = "eval",
    mix: str = "none",
    mix_alpha: float | None = None,
    labelling_batch_size: int | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> BuildSummary:
    """Label ``crops_per_image`` planned crops of every image in ``images`` with ``teacher``.

    ``images`` is an ImageFolder-style directory; ``out`` the store directory or an fsspec URL
    (``s3://bucket/labels.zarr``; ``storage_options`` go to fsspec). Exactly one of
    ``crops_per_image`` and ``slc`` (soft labels per class) is given. See the README for the
    meaning of each option; the CLI ``hald-store build`` maps its flags one to one.

    ``teacher_mode="train"`` (BatchNorm on batch statistics) or ``mix="cutmix"|"mixup"`` make
    labels batch-specific: crop seed ``e`` of every image is labelled in labelling epoch ``e``,
    in batches of ``labelling_batch_size`` (default ``batch_size``) planned by
    :class:`~hald_store.batch_plan.BatchPlan` and recorded in the store for replay.

    ``manifest`` (a :class:`~hald_store.images.Manifest` or a file from ``hald-store scan``)
    skips the scan. Crops are rendered by a :mod:`~hald_store.stream` (``workers`` threads for DALI,
    processes for torchvision; ``cache_decoded`` as for the loaders) ahead of the teacher.
    """
    t_start = time.perf_counter()
    root, out = Path(images), os.fspath(out)
    if (crops_per_image is None) == (slc is None):
        raise HaldStoreError("give exactly one of --crops-per-image and --slc")
    for name, value in (("--batch-size", batch_size), ("--input-size", input_size), ("--chunk-images", chunk_images)):
        if value < 1:
            raise HaldStoreError(f"{name} must be >= 1, got {value}")
    check_positive_finite("--temperature", temperature)
    if workers is not None and workers < 0:
        raise HaldStoreError(f"--workers must be >= 0, got {workers}")
    batch_mode = _check_labelling_mode(teacher_mode, mix, mix_alpha, labelling_batch_size)
    ranks = distributed.context()
    with StoreWriter(out, resume=resume, overwrite=overwrite, storage_options=storage_options, ranks=ranks) as writer:
        progress = progress and ranks.is_main
        dev = ranks.device() if ranks.active and device == "auto" else resolve_device(device)

        if manifest is None:
            manifest = scan_image_folder(root, skip_bad=skip_bad, progress=progress, workers=workers or None,
                                         ranks=ranks)
        else:  # a scan made earlier (hald-store scan): its files must still be there, at their sizes
            manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
            check_image_root(manifest, root)
        num_classes = len(manifest.class_names) if num_classes is None else num_classes
        if num_classes < len(manifest.class_names):
            raise HaldStoreError(
                f"--num-classes {num_classes} is smaller than the {len(manifest.class_names)} class folders in {str(root)!r}"
            )
        if crops_per_image is None:
            crops_per_image = crops_for_slc(manifest, slc)
        if crops_per_image < 1:
            raise HaldStoreError(f"--crops-per-image must be >= 1, got {crops_per_image}")
        if not 1 <= top_k <= num_classes:
            raise HaldStoreError(f"--top-k {top_k} must be between 1 and the number of classes ({num_classes})")
        codec = LabelCodec(values=values, top_k=top_k, num_classes=num_classes, temperature=float(temperature))
        renderer = make_renderer(backend, size=input_size, mean=mean, std=std,
                                 device="gpu" if dev.type == "cuda" else "cpu", **threads_option(backend, workers))
        teacher = teacher.to(dev).eval()
        renderer_info = renderer.record()
        attrs = {
            "library_version": __version__,
            "num_images": len(manifest),
            "crops_per_image": int(crops_per_image),
            "num_classes": int(num_classes),
            "class_names": manifest.class_names,
            "plan_seed": int(seed),
            "crop_policy": crop_policy.to_dict(),
            "input_size": int(input_size),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "renderer": renderer_info,
            "teacher": {"name": teacher_name or type(teacher).__name__, "weights_sha256": weights_sha256(teacher),
                        "mode": teacher_mode},
            "codec": codec.to_dict(),
            "manifest_blake2b": manifest.fingerprint(),
            "skipped": manifest.skipped,
        }

        n, s = len(manifest), int(crops_per_image)
        plan = None
        if batch_mode:
            try:
                plan = BatchPlan(num_images=n, epochs=s, batch_size=labelling_batch_size or min(batch_size, n), seed=seed,
                                 mix=mix, mix_alpha=1.0 if mix_alpha is None else mix_alpha, size=input_size)
            except ValueError as e:
                raise HaldStoreError(str(e)) from e
            attrs["labelling"] = {"mode": "batch", "teacher_mode": teacher_mode, **plan.to_dict()}

        def crops(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            return plan_image_crops(seed, start, stop, s, manifest.heights, manifest.widths, crop_policy)

        # Probe the teacher on one crop, so a wrong teacher fails before anything is written.
        boxes, flips = crops(0, 1)
        probe = renderer(read_files([root / manifest.paths[0]]), boxes[0, :1], flips[0, :1])
        with torch.inference_mode():
            _check_logits(teacher(probe.to(dev)).float().cpu(), np.zeros(1, np.int64), manifest, num_classes)

        ranks.check_same(attrs, "build settings")
        store = writer.open(manifest, crops, attrs, codec, chunk_images,
                            batches=None if plan is None else plan.arrays(), source=f"the images in {str(root)!r}")
        todo = writer.todo()
        stream = open_stream(renderer, [root / p for p in manifest.paths], manifest.heights, manifest.widths,
                             batch_size=plan.batch_size if batch_mode else batch_size, workers=workers,
                             cache_decoded=cache_decoded)
        if batch_mode:
            batches = _recorded_batches(store, stream, todo)
            if teacher_mode == "train":
                teacher = batch_stats_teacher(teacher)
        else:
            batches = _crop_batches(store, stream, todo, batch_size)
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
    final = LabelStore.open(out, allow_incomplete=True, storage_options=storage_options)  # swapped in, if staged
    return BuildSummary(
        path=out, crops_total=final.num_crops, crops_written=written, blocks_written=blocks_written,
        blocks_skipped=final.num_blocks - blocks_written, seconds=time.perf_counter() - t_start,
        teacher_seconds=teacher_seconds, bytes_on_disk=final.bytes_on_disk(),
        label_bytes_on_disk=final.bytes_on_disk("labels"), images_scanned=int(ranks.sum(manifest.inspected_here)),
    )


def _check_labelling_mode(teacher_mode: str, mix: str, mix_alpha: float | None,
                          labelling_batch_size: int | None) -> bool:
    """Validate the batch-labelling options together; True when labels are batch-specific."""
    if teacher_mode not in ("eval", "train"):
        raise HaldStoreError(f"--teacher-mode must be eval or train, got {teacher_mode!r}")
    if mix not in MIXES:
        raise HaldStoreError(f"--mix must be one of {', '.join(MIXES)}, got {mix!r}")
    batch_mode = teacher_mode == "train" or mix != "none"
    if mix == "none" and mix_alpha is not None:
        raise HaldStoreError("--mix-alpha needs --mix cutmix or --mix mixup (it has no effect with --mix none)")
    if mix_alpha is not None and not mix_alpha > 0:
        raise HaldStoreError(f"--mix-alpha must be > 0, got {mix_alpha}")
    if labelling_batch_size is not None and not batch_mode:
        raise HaldStoreError("--labelling-batch-size applies to batch-specific labels only "
                             "(--teacher-mode train or --mix cutmix|mixup); use --batch-size otherwise")
    if labelling_batch_size is not None and labelling_batch_size < (2 if teacher_mode == "train" else 1):
        raise HaldStoreError(f"--labelling-batch-size {labelling_batch_size} is too small"
                             f"{' for BatchNorm batch statistics (need >= 2)' if teacher_mode == 'train' else ''}")
    return batch_mode


def _check_logits(logits: torch.Tensor, idx: np.ndarray, manifest: Manifest, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise TeacherOutputError(
            f"the teacher returned shape {tuple(logits.shape)}; expected (batch, {num_classes}) "
            "(check --num-classes against the teacher)"
        )
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        names = sorted({manifest.paths[i] for i in idx[bad.numpy()]})
        raise TeacherOutputError(
            f"the teacher returned NaN/Inf for {int(bad.sum())} crops of {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}; finished blocks are kept"
        )
