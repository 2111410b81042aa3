"""Import reference soft labels (SRe2L / LPLD / HALD ``epoch_<e>.tar`` files, see
:mod:`hald_store.relabel_files`) into a batch-mode label store.

Each reference epoch becomes one labelling epoch (crop seed) of the store:

* crop windows ``round(coords * (H, W, H, W))`` (checked to be whole pixels inside the
  image, within the rounding of the dtype the coords were saved in: the reference saves
  float16, whose rounding at 224 px is up to ~0.06 px) and flips go to ``crops/box`` /
  ``crops/flip``;
* the batches (members from the epoch's sampler order, ``perm`` = ``mix_index``, ``lam``,
  the CutMix box ``(y0, y1, x0, x1) = (bbx1, bbx2, bby1, bby2)``) go to ``batches/*``, so
  :class:`~hald_store.loader.SoftLabelLoader` replays exactly the batches the teacher saw;
* the fp16 probabilities ``p`` become logits ``T * log(p)`` (zeros, i.e. fp16 underflow, are
  raised to half the smallest positive fp16 value, ``2**-25``) and are re-encoded with the
  label codec (top-k indices + quantized logit gaps).

The store is written beside ``OUT`` and moved into place at the end, so a failed import never
leaves a half-made store, and an ``--overwrite`` keeps the old store until the new one is whole.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .codec import VALUE_CODECS, LabelCodec
from .crop_plan import CropPolicy
from .errors import HaldStoreError, OptionError, check_at_least, check_positive_finite
from .images import Manifest, scan_image_folder
from .mixing import MIXES
from .render import IMAGENET_MEAN, IMAGENET_STD, make_renderer
from .replay import BATCH_ARRAYS
from .relabel_files import SAMPLER_FILE, ReferenceBatch, ReferenceLabels, open_reference
from .schema import TEACHER_MODES, LabellingPlan, RenderSpec, StoreSettings, TeacherInfo, check_choice
from .store import LabelStore
from .writer import StoreWriter

__all__ = ["ImportSummary", "import_reference"]

# Probability that replaces an exact 0 before the log: half the smallest positive value of the
# source dtype (the true probability rounded to 0 was below it).
_ZERO_FLOOR = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
_ZERO_FLOOR_DEFAULT = 2.0**-150  # float32 / float64 sources
_PIXEL_TOLERANCE = 0.02  # coords * size must be this close to whole pixels (more where the dtype is coarser)


@dataclass
class ImportSummary:
    """What an import did; ``str()`` gives the summary the CLI prints (sizes before/after)."""

    path: str
    labels_dir: str
    num_images: int
    epochs: int
    batches_per_epoch: int
    batch_size: int
    num_classes: int
    mix: str
    top_k: int
    values: str
    source_bytes: int  # the epoch files
    sampler_bytes: int  # sampler_indices_dict.pt (0 without it)
    bytes_on_disk: int  # the whole store
    label_bytes_on_disk: int  # the store's labels/ arrays
    max_prob_error: float  # max |p_store - p_reference| over all crops and classes at T
    top1_agreement: float  # share of crops whose stored top-1 class is the reference's
    seconds: float

    @property
    def num_crops(self) -> int:
        return self.num_images * self.epochs

    @property
    def label_ratio(self) -> float:
        """Epoch files' bytes / store label bytes."""
        return self.source_bytes / max(self.label_bytes_on_disk, 1)

    @property
    def total_ratio(self) -> float:
        """Epoch files' bytes / whole store bytes (manifest, crops, batches included)."""
        return self.source_bytes / max(self.bytes_on_disk, 1)

    def __str__(self) -> str:
        crops = max(self.num_crops, 1)
        sampler = f" (+ {self.sampler_bytes:,} in {SAMPLER_FILE})" if self.sampler_bytes else ""
        return (
            f"store            {self.path}\n"
            f"imported         {self.epochs} epochs x {self.num_images:,} images = {self.num_crops:,} crops "
            f"({self.batches_per_epoch} batches of {self.batch_size}, mix {self.mix}, {self.num_classes} classes) "
            f"in {self.seconds:.1f} s\n"
            f"before           {self.source_bytes:,} bytes in {self.epochs} epoch files{sampler}, "
            f"{self.source_bytes / crops:.1f} B/crop\n"
            f"after            {self.bytes_on_disk:,} bytes ({self.label_bytes_on_disk:,} of them labels), "
            f"{self.bytes_on_disk / crops:.1f} B/crop (labels {self.label_bytes_on_disk / crops:.1f})\n"
            f"size ratio       {_ratio(self.label_ratio)} (labels), {_ratio(self.total_ratio)} (whole store)\n"
            f"label error      max |p - p_reference| {self.max_prob_error:.2e}, top-1 kept on "
            f"{100 * self.top1_agreement:.2f}% of crops (top-{self.top_k}, {self.values})"
        )


def _ratio(before_over_after: float) -> str:
    """``"4.2x smaller"`` / ``"1.3x larger"`` for a before/after byte ratio."""
    r = before_over_after
    return f"{r:.1f}x smaller" if r >= 1 else f"{1 / r:.1f}x larger" if r > 0 else "n/a"


def _logits(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T * log(p)`` in float64, exact zeros raised to the source dtype's floor."""
    floor = _ZERO_FLOOR.get(p.dtype, _ZERO_FLOOR_DEFAULT)
    q = p.double()
    return temperature * torch.log(torch.where(q > 0, q, torch.full_like(q, floor)))


def _resolve_mix(requested: str | None, batch: ReferenceBatch, resolved: str | None, where: str) -> str:
    kind = batch.mix_kind
    if requested is None:
        if resolved is not None and kind != resolved:
            raise HaldStoreError(f"{where} records mix {kind!r} but earlier batches record {resolved!r}; "
                                 "every batch must use the same mix")
        return kind
    if requested == "none" and kind != "none":
        raise OptionError(f"{where} records a mix (mix_index is set) but mix='none' was given: "
                          "its soft labels belong to mixed images", "mix")
    if requested != "none" and kind == "none":
        raise OptionError(f"{where} records no mix (mix_index is None) but mix={requested!r} was given", "mix")
    if requested == "cutmix" and kind == "mixup":
        raise OptionError(f"{where} has no mix_bbox (a MixUp entry) but mix='cutmix' was given", "mix")
    return requested


def _pixel_tolerance(coords: np.ndarray, bits: int, sizes: np.ndarray) -> np.ndarray:
    """How far ``coords * size`` may lie from the true whole pixel: half a unit in the last place
    of the saved dtype (``bits`` significand bits) times the size, at least ``_PIXEL_TOLERANCE``."""
    exponent = np.floor(np.log2(np.where(coords > 0, np.abs(coords), 1.0)))
    half_ulp = np.where(coords > 0, 2.0 ** (exponent - bits), 0.0)
    return np.maximum(_PIXEL_TOLERANCE, half_ulp * sizes * (1 + 1e-6))


def _pixel_boxes(batch: ReferenceBatch, manifest: Manifest, ids: np.ndarray, where: str) -> np.ndarray:
    """(B, 4) int32 (top, left, height, width) from fractional coords: the nearest whole pixels,
    checked to lie within the saved dtype's rounding (fp16 coords at 224 px: up to ~0.06 px)."""
    h, w = manifest.heights[ids].astype(np.float64), manifest.widths[ids].astype(np.float64)
    sizes = np.stack([h, w, h, w], axis=1)
    scaled = batch.coords * sizes
    px = np.rint(scaled)
    top, left, ch, cw = px.T
    off = np.abs(scaled - px) > _pixel_tolerance(batch.coords, batch.coords_bits, sizes)
    bad = (top < 0) | (left < 0) | (ch < 1) | (cw < 1) | (top + ch > h) | (left + cw > w) | off.any(axis=1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        i = int(ids[j])
        raise HaldStoreError(
            f"{where}: the crop window of image {manifest.paths[i]!r} (index {i}, {int(h[j])}x{int(w[j])} pixels) "
            f"is coords {np.round(batch.coords[j], 6).tolist()} x image size = {np.round(scaled[j], 3).tolist()} "
            f"(top, left, height, width), not a whole-pixel window inside the image ({int(bad.sum())} such crops "
            "in the batch); is IMAGES_DIR the folder these labels were made from?"
        )
    return px.astype(np.int32)


def _cutmix_box(batch: ReferenceBatch, input_size: int, where: str) -> np.ndarray:
    bbx1, bby1, bbx2, bby2 = (int(v) for v in batch.mix_bbox)
    box = np.array([bbx1, bbx2, bby1, bby2], dtype=np.int32)  # (y0, y1, x0, x1)
    if box.max() > input_size:
        raise OptionError(f"{where}: mix_bbox {[bbx1, bby1, bbx2, bby2]} reaches beyond the {input_size}x{input_size} "
                          "crops; pass the input_size the labels were made with", "input_size")
    return box


def _epoch_order(ref: ReferenceLabels, epoch: int, total: int, n: int, images_root: str) -> np.ndarray:
    """The epoch's image order, checked to visit every image of the folder exactly once."""
    name = ref.files[epoch].name
    if ref.sampler_indices is None:
        if total != n:
            raise HaldStoreError(
                f"{name} labels {total:,} images but {images_root!r} holds {n:,} images (without {SAMPLER_FILE} "
                f"every epoch visits images 0..N-1 in order); is IMAGES_DIR the folder these labels were made from?"
            )
        return np.arange(n, dtype=np.int64)
    order = ref.sampler_indices[epoch]
    if order.size and int(order.max()) >= n:
        raise HaldStoreError(
            f"{SAMPLER_FILE} (epoch {epoch}) refers to image index {int(order.max())}, so the labels need at least "
            f"{int(order.max()) + 1:,} images, but {images_root!r} holds {n:,}"
        )
    if len(order) != n or len(np.unique(order)) != n:
        raise HaldStoreError(
            f"{SAMPLER_FILE} (epoch {epoch}) lists {len(order):,} image indices ({len(np.unique(order)):,} distinct) "
            f"but {images_root!r} holds {n:,} images; every epoch must label each image exactly once"
        )
    return order


def import_reference(
    labels_dir: str | os.PathLike,
    images_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_classes: int | None = None,
    top_k: int = 5,
    values: str = "uint8",
    temperature: float = 20.0,
    input_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    mix: str | None = None,
    teacher_mode: str = "train",
    crop_policy: CropPolicy = CropPolicy(),
    chunk_images: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportSummary:
    """Convert the reference label directory ``labels_dir`` (labels of the images in
    ``images_root``) into a batch-mode store at ``out``.

    ``temperature``, ``input_size``, ``mean`` and ``std`` must be the ones the labels were made
    with (the soft labels are ``softmax(z / temperature)`` of ``input_size`` crops normalized
    with ``mean``/``std``; replay renders crops with them). ``num_classes`` defaults to the
    label width (a given value must match it). ``mix`` defaults to what the files record
    (``none`` without ``mix_index``, ``mixup`` without ``mix_bbox``, else ``cutmix``).
    ``teacher_mode`` and ``crop_policy`` are recorded only (how the teacher ran, and the crop
    policy fresh hard-label crops use). Returns an :class:`ImportSummary`.
    """
    t_start = time.perf_counter()
    out = os.fspath(out)
    images_root = os.fspath(images_root)
    if "://" in out:
        raise HaldStoreError(f"import writes local stores only, got {out!r}")
    if mix is not None:
        check_choice("mix", mix, MIXES)
    check_choice("teacher_mode", teacher_mode, TEACHER_MODES)
    check_choice("values", values, VALUE_CODECS)
    check_positive_finite("temperature", temperature)
    check_at_least("input_size", input_size, 1)
    check_at_least("chunk_images", chunk_images, 1)
    with StoreWriter(out, overwrite=overwrite, resumable=False) as writer:  # fails early if OUT exists
        renderer = make_renderer("torchvision", size=input_size, mean=mean, std=std, device="cpu")  # checks mean/std
        ref = open_reference(labels_dir, num_classes=num_classes)
        manifest = scan_image_folder(images_root, progress=progress)
        n, s = len(manifest), ref.epochs

        boxes = np.zeros((n, s, 4), dtype=np.int32)
        flips = np.zeros((n, s), dtype=bool)
        plan: dict[str, list[np.ndarray]] = {k: [] for k in BATCH_ARRAYS}
        fields_per_epoch: list[dict[str, np.ndarray]] = []
        codec: LabelCodec | None = None
        resolved: str | None = None
        batch_size = num_batches = 0
        max_err, agree = 0.0, 0
        for e in tqdm(range(s), desc="import epochs", unit="epoch", disable=not progress, dynamic_ncols=True):
            batches = ref.load_epoch(e)
            name = ref.files[e].name
            if codec is None:
                c = int(ref.num_classes)
                if c < len(manifest.class_names):
                    raise HaldStoreError(f"{name}: the soft labels have {c} classes but {images_root!r} has "
                                         f"{len(manifest.class_names)} class folders")
                codec = LabelCodec.checked(values, top_k, c, temperature)
                batch_size, num_batches = batches[0].size, len(batches)
            elif len(batches) != num_batches or batches[0].size != batch_size:
                raise HaldStoreError(
                    f"{name} holds {len(batches)} batches of {batches[0].size} but {ref.files[0].name} holds {num_batches} "
                    f"of {batch_size}; every epoch must be cut into the same batches"
                )
            order = _epoch_order(ref, e, sum(x.size for x in batches), n, images_root)
            members = np.full((num_batches, batch_size), -1, dtype=np.int64)
            perm = np.full((num_batches, batch_size), -1, dtype=np.int64)
            lam = np.ones(num_batches, dtype=np.float32)
            mix_box = np.zeros((num_batches, 4), dtype=np.int32)
            logits = torch.empty((n, codec.num_classes), dtype=torch.float64)
            source = torch.empty((n, codec.num_classes), dtype=torch.float32)
            for b, batch in enumerate(batches):
                where = f"{name} batch {b}"
                k = batch.size
                ids = order[b * batch_size : b * batch_size + k]
                resolved = _resolve_mix(mix, batch, resolved, where)
                boxes[ids, e] = _pixel_boxes(batch, manifest, ids, where)
                flips[ids, e] = batch.flips
                members[b, :k] = ids
                perm[b, :k] = np.arange(k) if batch.mix_index is None else batch.mix_index
                lam[b] = 1.0 if batch.mix_lam is None else batch.mix_lam
                if resolved == "cutmix":
                    mix_box[b] = _cutmix_box(batch, input_size, where)
                t_ids = torch.from_numpy(ids)
                logits[t_ids] = _logits(batch.soft_label, temperature)
                source[t_ids] = batch.soft_label.float()
            fields = codec.encode(logits)
            decoded = codec.decode(fields).probs(temperature)
            max_err = max(max_err, float((decoded - source).abs().max()))
            agree += int((decoded.argmax(1) == source.argmax(1)).sum())
            fields_per_epoch.append(fields)
            for key, value in zip(BATCH_ARRAYS, (members, perm, lam, mix_box)):
                plan[key].append(value)
        assert codec is not None and resolved is not None

        settings = StoreSettings(
            num_images=n, crops_per_image=s, num_classes=codec.num_classes, class_names=tuple(manifest.class_names),
            plan_seed=0, crop_policy=crop_policy, render_spec=RenderSpec.of(renderer),
            teacher=TeacherInfo("imported", None, teacher_mode), codec=codec,
            manifest_blake2b=manifest.fingerprint(), skipped=tuple(manifest.skipped),
            labelling=LabellingPlan(teacher_mode, n, s, batch_size, None, resolved, None, int(input_size)),
            imported_from={"format": "fkd-reference", "labels_dir": str(Path(labels_dir).resolve()),
                           "epoch_files": s, "source_bytes": ref.source_bytes,
                           "sampler_indices": ref.sampler_indices is not None})
        batch_arrays = {k: np.stack(v) for k, v in plan.items()}

        store = writer.open(manifest, lambda a, b: (boxes[a:b], flips[a:b]), settings, chunk_images,
                            batches=batch_arrays)
        for e in writer.todo():
            store.write_block(e, fields_per_epoch[e])
    store = LabelStore.open(out)  # the old store was replaced only once the new one was whole
    return ImportSummary(
        path=out, labels_dir=str(labels_dir), num_images=n, epochs=s, batches_per_epoch=num_batches,
        batch_size=batch_size, num_classes=codec.num_classes, mix=resolved, top_k=top_k, values=values,
        source_bytes=ref.source_bytes, sampler_bytes=ref.sampler_bytes, bytes_on_disk=store.bytes_on_disk(),
        label_bytes_on_disk=store.bytes_on_disk("labels"), max_prob_error=max_err,
        top1_agreement=agree / max(n * s, 1), seconds=time.perf_counter() - t_start,
    )
