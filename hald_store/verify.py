"""Check a store: its chunks (integrity) and, with a teacher, its labels (deep check).

:func:`check_integrity` reads and decodes every chunk (checksums included), and reports
missing and damaged chunks and impossible values, each named by array, chunk and file.

:func:`verify_store` re-renders sampled crops, re-runs the teacher and compares. The codec
itself loses a little (top-k truncation, quantization); that loss is measured on the fresh
outputs (encode, decode, KL to the full distribution) and a store passes when its stored
labels are no further from the fresh teacher than that, within a small slack. Stores of
batch-specific labels are checked the way they were built: whole recorded batches are
replayed (members, mix) through the teacher in the recorded mode.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .build import batch_stats_teacher
from .devices import resolve_device
from .errors import OptionError, StoreError, check_at_least, check_positive_finite
from .render import read_files, renderer_for
from .replay import batch_path, replay_batches
from .safety import output_lock
from .store import LabelStore


@dataclass
class IntegrityReport:
    """What :func:`check_integrity` found; ``problems`` name array, chunk and file."""

    path: str
    arrays: int
    chunks_read: int
    checksums: bool
    complete: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged_blocks: list[int] = field(default_factory=list)  # blocks with a bad label chunk
    only_label_damage: bool = True  # every problem is a bad label chunk or an unfinished block

    @property
    def passed(self) -> bool:
        return self.complete and not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        sums = "their CRC32C checksums verified" if self.checksums else "no checksums (store made before them)"
        lines = [f"integrity {verdict}: {self.arrays} arrays, {self.chunks_read:,} chunk files read and decoded, {sums}"]
        lines += [f"  problem: {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more problems")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def check_integrity(store: LabelStore | str | os.PathLike, *, storage_options: dict | None = None) -> IntegrityReport:
    """Read every chunk of every array of ``store``: missing and undecodable chunks (checksum
    mismatch, truncated, empty), missing arrays, class indices out of range, unfinished blocks."""
    if not isinstance(store, LabelStore):
        store = LabelStore.open(store, allow_incomplete=True, storage_options=storage_options)
    report = IntegrityReport(store.path, 0, 0, store.checksums, True)
    try:
        done = store.block_done()
    except StoreError as e:
        report.problems.append(str(e))
        done = np.zeros(0, dtype=bool)
    if not done.size:
        report.only_label_damage = False
    report.complete = bool(done.size) and bool(done.all())
    if done.size and not report.complete:
        report.problems.append(f"store {store.path!r} is incomplete: {int(done.sum())} of {done.size} blocks written "
                               "(finish it with `hald-store build ... --resume`)")
    if not store.checksums:
        report.notes.append("this store has no checksums: flipped bytes that still decode cannot be detected, and "
                            "missing all-zero chunks are legal; `hald-store convert` writes a copy with checksums")
    for name in store.array_names()[:-1]:
        try:
            arr = store.array(name)
            chunks = list(np.ndindex(*arr.grid_shape))
        except StoreError as e:
            report.problems.append(str(e))
            report.only_label_damage = False
            continue
        report.arrays += 1
        for coords in chunks:
            block = store.block_of_chunk(name, coords)
            if block is not None and (block >= done.size or not done[block]):
                continue  # not written yet (reported as incomplete)
            if not store.checksums and not arr.chunk_exists(coords):
                continue  # older stores leave out chunks that hold only fill values
            try:  # a missing chunk raises too
                data = arr.read_chunk(coords)
                report.chunks_read += 1
            except StoreError as e:
                report.problems.append(str(e))
                _damaged(report, block)
                continue
            if name == f"labels/{store.codec.index_field}" and data.size and int(data.max()) >= store.num_classes:
                report.problems.append(f"store {store.path!r}: array {name!r} chunk {coords} (file "
                                       f"{arr.chunk_key(coords)}) holds class index {int(data.max())} of a "
                                       f"{store.num_classes}-class store: the chunk is damaged")
                _damaged(report, block)
    report.arrays += 1  # progress/block_done, read above
    try:  # the image paths are what a loader would open
        store.manifest()
    except StoreError as e:
        report.problems.append(str(e))
        report.only_label_damage = False
    return report


def _damaged(report: IntegrityReport, block: int | None) -> None:
    if block is None:  # written at creation: only a new build restores it
        report.only_label_damage = False
    elif block not in report.damaged_blocks:
        report.damaged_blocks.append(block)


def reopen_damaged_blocks(store: str | os.PathLike, report: IntegrityReport, *,
                          storage_options: dict | None = None) -> list[int]:
    """Mark the blocks of ``report``'s damaged label chunks unfinished, so that
    ``build_store(..., resume=True)`` (``hald-store build --resume``) rewrites exactly them.

    Only for stores a teacher built whose damage is all in label chunks; holds the store's
    write lock. Returns the blocks reopened.
    """
    path = os.fspath(store)
    opened = LabelStore.open(path, allow_incomplete=True, storage_options=storage_options)
    settings = opened.settings
    if settings.imported_from is not None or settings.reencoded_from is not None:
        made_by = "import" if settings.imported_from is not None else "convert"
        raise StoreError(f"store {path!r} was written by `hald-store {made_by}`, which cannot resume: run it again "
                         "with --overwrite to replace the damaged store")
    if not report.only_label_damage:
        raise StoreError(f"store {path!r} is damaged outside its label blocks (see the problems above): rebuild it "
                         "with `hald-store build ... --overwrite`")
    with output_lock(path):
        LabelStore.open(path, mode="r+", allow_incomplete=True,
                        storage_options=storage_options).reopen_blocks(report.damaged_blocks)
    return sorted(report.damaged_blocks)


@dataclass
class VerifyReport:
    num_crops: int
    temperature: float
    top1_agreement: float  # stored top-1 == fresh teacher top-1
    mean_kl: float  # KL(fresh || stored) at `temperature`, nats (per crop, clipped at 0: rounding)
    codec_mean_kl: float  # KL(fresh || encode-decode(fresh)): the codec's own error, the bound
    max_kl: float
    min_agreement: float
    kl_tolerance: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"teacher   {verdict}: {self.num_crops:,} stored crops re-rendered and re-labelled, compared at "
            f"T={self.temperature:g}\n"
            f"  top-1 agreement  {100 * self.top1_agreement:.2f}% (needs >= {100 * self.min_agreement:.2f}%)\n"
            f"  mean KL          {self.mean_kl:.2e} nats, stored vs fresh (the codec's own error on the fresh "
            f"labels: {self.codec_mean_kl:.2e}; passes up to {self.kl_tolerance:.2e}); max {self.max_kl:.2e}"
        )


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q), clipped at 0 (float rounding can make a true ~0 slightly negative)."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=1).clamp_min(0)


def teacher_logits(
    store: LabelStore,
    images: str | os.PathLike,
    teacher: nn.Module,
    image_ids: np.ndarray,
    seeds: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """Fresh teacher logits (n, C) float32 on CPU for stored crops ``(image_ids[i], seeds[i])``,
    re-rendered as the store records (:attr:`LabelStore.render_spec`)."""
    dev = resolve_device(device)
    renderer = renderer_for(store.render_spec, device=dev)
    paths = store.manifest().paths
    boxes, flips = store.boxes(image_ids, seeds)
    teacher = teacher.to(dev).eval()
    out = []
    bar = tqdm(total=len(image_ids), desc="verify: teacher", unit="crop", disable=not progress, leave=False)
    for b0 in range(0, len(image_ids), batch_size):
        sel = slice(b0, b0 + batch_size)
        x = renderer(read_files([Path(images, paths[i]) for i in image_ids[sel]]), boxes[sel], flips[sel])
        with torch.inference_mode():
            out.append(teacher(x.to(dev)).float().cpu())
        bar.update(len(x))
    bar.close()
    return torch.cat(out) if out else torch.empty(0, store.num_classes)


def replayed_teacher_logits(
    store: LabelStore,
    images: str | os.PathLike,
    teacher: nn.Module,
    sample: int,
    rng: np.random.Generator,
    *,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Batch-specific stores: replay randomly chosen recorded batches (at least ``sample`` crops)
    through ``teacher`` in the recorded mode (BatchNorm on batch statistics for
    ``teacher_mode="train"``) with the recorded mix; returns (image ids, crop seeds, logits)."""
    dev = resolve_device(device)
    renderer = renderer_for(store.render_spec, device=dev)
    files = [Path(images, p) for p in store.manifest().paths]

    def render(requests: list) -> Iterator[torch.Tensor]:
        return (renderer(read_files([files[i] for i in ids]), bx, fl) for ids, bx, fl in requests)

    labelling = store.settings.labelling
    model = teacher.to(dev).eval()
    if labelling.teacher_mode == "train":
        model = batch_stats_teacher(model)
    per_epoch = store.array(batch_path("members")).shape[1]
    ids, seeds, out = [], [], []
    bar = tqdm(total=sample, desc="verify: teacher (replayed batches)", unit="crop", disable=not progress, leave=False)
    for pick in rng.permutation(store.crops_per_image * per_epoch):
        if sum(len(i) for i in ids) >= sample:
            break
        epoch, b = divmod(int(pick), per_epoch)
        boxes, flips = store.array("crops/box")[:, epoch], store.array("crops/flip")[:, epoch]
        [(members, x)] = replay_batches(store.batches(epoch), boxes, flips, labelling.mix, render, [b])
        with torch.inference_mode():
            out.append(model(x.to(dev)).float().cpu())
        ids.append(members)
        seeds.append(np.full(len(members), epoch))
        bar.update(len(members))
    bar.close()
    return np.concatenate(ids), np.concatenate(seeds), torch.cat(out)


def _check_verify_options(sample: int, temperature: float | None, min_agreement: float) -> None:
    check_at_least("sample", sample, 1)
    check_positive_finite("temperature", temperature)
    if not 0 <= min_agreement <= 1:
        raise OptionError(f"min_agreement must be a fraction in [0, 1], got {min_agreement}", "min_agreement")


def verify_store(
    store: LabelStore | str | os.PathLike,
    images: str | os.PathLike,
    teacher: nn.Module,
    *,
    sample: int = 256,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    temperature: float | None = None,
    min_agreement: float = 0.99,
    kl_factor: float = 2.0,
    kl_slack: float = 1e-3,
    check_hashes: bool = True,
    progress: bool = False,
) -> VerifyReport:
    """Compare ``sample`` random stored crops with a fresh teacher pass on regenerated pixels
    (for batch-specific stores: whole recorded batches, replayed as built).

    The image folder must match the manifest (sizes, and content hashes unless
    ``check_hashes=False``). Passes when top-1 agreement >= ``min_agreement`` and the mean KL
    is at most ``kl_factor * codec_mean_kl + kl_slack``. ``progress`` shows a bar over the crops.
    """
    _check_verify_options(sample, temperature, min_agreement)
    if not isinstance(store, LabelStore):
        store = LabelStore.open(store)
    store.check_images(images, check_hashes=check_hashes)
    temperature = store.temperature if temperature is None else float(temperature)
    rng = np.random.default_rng(seed)
    if store.batch_mode:
        img, seeds, fresh_logits = replayed_teacher_logits(store, images, teacher, sample, rng, device=device,
                                                            progress=progress)
    else:
        flat = rng.choice(store.num_crops, size=min(sample, store.num_crops), replace=False)
        img, seeds = np.divmod(flat, store.crops_per_image)
        fresh_logits = teacher_logits(store, images, teacher, img, seeds, batch_size=batch_size, device=device,
                                      progress=progress)
    fresh_log = torch.log_softmax(fresh_logits / temperature, dim=1)
    stored = store.read(img, seeds)
    kl = _kl(fresh_log, stored.log_probs(temperature))
    codec_kl = _kl(fresh_log, store.codec.decode(store.codec.encode(fresh_logits)).log_probs(temperature))
    agreement = float((stored.indices[:, 0] == fresh_logits.argmax(dim=1)).double().mean())
    tolerance = kl_factor * float(codec_kl.mean()) + kl_slack
    return VerifyReport(
        num_crops=len(img), temperature=temperature, top1_agreement=agreement, mean_kl=float(kl.mean()),
        codec_mean_kl=float(codec_kl.mean()), max_kl=float(kl.max()), min_agreement=min_agreement,
        kl_tolerance=tolerance, passed=agreement >= min_agreement and float(kl.mean()) <= tolerance,
    )
