"""The reference soft-label layout (SRe2L / LPLD / HALD "FKD-style" relabel output): read,
validate, and generate it.

Layout
------
A directory ``LABELS_DIR`` with::

    epoch_0.tar, epoch_1.tar, ...   one file per labelling epoch, numbered 0..S-1 without gaps
    sampler_indices_dict.pt         optional: {epoch: image indices in sampler order}

Every ``epoch_<e>.tar`` is written with ``torch.save`` (despite the ``.tar`` name): a list
with one entry per labelling batch, each entry
``[coords, flip, mix_index, mix_lam, mix_bbox, soft_label]``:

``coords``      float tensor (B, 4): ``(top/H, left/W, height/H, width/W)`` of the
                RandomResizedCrop window in the original H x W image, float16 in the
                reference files (so ``coords * H`` is only as exact as float16 allows);
``flip``        bool tensor (B,): horizontal flip after the crop;
``mix_index``   long tensor (B,): the in-batch permutation of the mix (sample ``i`` is mixed
                with sample ``mix_index[i]``), or None without a mix;
``mix_lam``     float (None without a mix);
``mix_bbox``    4 ints ``(bbx1, bby1, bbx2, bby2)`` as the reference ``rand_bbox`` returns
                them: ``bbx`` indexes dim 2 (height) and ``bby`` dim 3 (width) of the
                (B, 3, size, size) batch, so in hald-store terms the box ``(y0, y1, x0, x1)``
                is ``(bbx1, bbx2, bby1, bby2)``; None for MixUp and without a mix;
``soft_label``  float16 tensor (B, C): ``softmax(teacher(mixed batch) / T)``.

The images of epoch ``e``, in batch order, are ``sampler_indices_dict.pt[e]`` (batches are
consecutive slices of it, all of the same size B except a shorter last one); without that
file every epoch visits the images in order ``0..N-1`` (no shuffle). Image indices refer to
the sorted ImageFolder order of the image folder (:func:`~hald_store.images.scan_image_folder`).
The files are unpickled with ``torch.load(weights_only=True)`` (tensors, numbers, lists,
dicts and NumPy scalars/arrays only), never as arbitrary pickles.

Not covered: the original SRe2L per-batch layout ``epoch_<e>/batch_<b>.tar``. Its files hold
raw teacher outputs (logits) and no image order (SRe2L's order comes from a ``RandomSampler``
seeded with ``--fkd-seed``, reproducible only by re-running it with the same torch version),
so its labels cannot be attached to images safely; :func:`open_reference` says so.

:func:`hald_store.testing.write_reference_epochs` produces such files with a real teacher
the way the reference relabel code does; :func:`read_reference_epochs` /
:func:`open_reference` load and validate them, with a :class:`~hald_store.errors.HaldStoreError`
naming the file for every problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .errors import HaldStoreError, preview

__all__ = [
    "SAMPLER_FILE",
    "ReferenceBatch",
    "ReferenceLabels",
    "open_reference",
    "read_reference_epochs",
]

SAMPLER_FILE = "sampler_indices_dict.pt"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.tar$")
_ENTRY = "[coords, flip, mix_index, mix_lam, mix_bbox, soft_label]"
# Significand bits (precision) of the float dtypes coords may be saved in.
_SIGNIFICAND_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53,
                     np.dtype(np.float16): 11, np.dtype(np.float32): 24, np.dtype(np.float64): 53}


class ReferenceBatch(NamedTuple):
    """One validated batch entry of an epoch file (B images, C classes)."""

    coords: np.ndarray  # (B, 4) float64 (top/H, left/W, height/H, width/W)
    flips: np.ndarray  # (B,) bool
    mix_index: np.ndarray | None  # (B,) int64 permutation, None without a mix
    mix_lam: float | None
    mix_bbox: np.ndarray | None  # (4,) int64 (bbx1, bby1, bbx2, bby2), None for MixUp / no mix
    soft_label: torch.Tensor  # (B, C) float (float16 in the reference files)
    coords_bits: int = 53  # significand bits of the coords' dtype as saved (11: float16, the reference)

    @property
    def size(self) -> int:
        return int(self.coords.shape[0])

    @property
    def mix_kind(self) -> str:
        """What the entry records: ``none`` (no permutation), ``mixup`` (no box) or ``cutmix``."""
        if self.mix_index is None:
            return "none"
        return "mixup" if self.mix_bbox is None else "cutmix"


# ---------------------------------------------------------------------------------- loading
def _numpy_safe_globals() -> list:
    """Globals that NumPy scalars and arrays need under ``torch.load(weights_only=True)`` (the
    reference stores ``np.random.beta`` / ``np.clip`` results), under NumPy 1 and 2 names."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    safe: list = [np.ndarray, np.dtype]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(multiarray, name)
        safe += [fn, (fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
              np.uint32, np.uint64, np.bool_):
        safe.append(type(np.dtype(t)))
    return safe


def _load(path: Path) -> Any:
    """``torch.load`` of a reference file, with the failure turned into a clear error."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors of all kinds
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in str(e).lower() or "unsupported global" in str(e).lower():
            raise HaldStoreError(
                f"{str(path)!r} holds Python objects other than tensors, numbers, lists and NumPy "
                f"values; refusing to unpickle it ({text})"
            ) from e
        raise HaldStoreError(
            f"cannot read {str(path)!r} ({path.stat().st_size:,} bytes): truncated or corrupt file? "
            f"torch.load failed: {type(e).__name__}: {text}"
        ) from e


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        return np.asarray([v.item() if isinstance(v, torch.Tensor) else v for v in value])
    return np.asarray(value)


def _validate_batch(entry: Any, where: str, num_classes: int | None) -> ReferenceBatch:
    """Check one ``[coords, flip, mix_index, mix_lam, mix_bbox, soft_label]`` entry."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 6:
        got = f"a {type(entry).__name__} of length {len(entry)}" if isinstance(entry, (list, tuple)) else type(entry).__name__
        raise HaldStoreError(f"{where}: expected an entry {_ENTRY}, got {got}")
    coords, flips, mix_index, mix_lam, mix_bbox, soft = entry
    try:
        bits = _SIGNIFICAND_BITS.get(coords.dtype if isinstance(coords, torch.Tensor) else np.asarray(coords).dtype, 53)
        c = _as_array(coords.float() if isinstance(coords, torch.Tensor) and coords.dtype == torch.bfloat16
                      else coords).astype(np.float64)
    except (TypeError, ValueError) as e:
        raise HaldStoreError(f"{where}: coords is not numeric ({type(coords).__name__}): {e}") from e
    if c.ndim != 2 or c.shape[1] != 4 or c.shape[0] < 1:
        raise HaldStoreError(f"{where}: coords must have shape (batch, 4) = (top/H, left/W, height/H, width/W), "
                             f"got {tuple(c.shape)}")
    b = c.shape[0]
    if not np.isfinite(c).all():
        raise HaldStoreError(f"{where}: coords hold NaN/Inf")
    f = _as_array(flips)
    if f.shape != (b,) or f.dtype.kind not in "biu" or not np.isin(f, (0, 1)).all():
        raise HaldStoreError(f"{where}: flip must be {b} booleans (one per image), got shape {tuple(f.shape)} "
                             f"dtype {f.dtype}")
    perm = None
    if mix_index is not None:
        perm = _as_array(mix_index)
        if perm.shape != (b,) or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(b)):
            raise HaldStoreError(f"{where}: mix_index must be a permutation of 0..{b - 1} (shape ({b},)), "
                                 f"got shape {tuple(perm.shape)} dtype {perm.dtype}")
        perm = perm.astype(np.int64)
    lam = None
    if mix_lam is not None:
        try:
            lam = float(mix_lam.item() if isinstance(mix_lam, (torch.Tensor, np.ndarray)) else mix_lam)
        except (TypeError, ValueError) as e:
            raise HaldStoreError(f"{where}: mix_lam must be a number, got {mix_lam!r}") from e
        if not 0.0 <= lam <= 1.0:
            raise HaldStoreError(f"{where}: mix_lam must be in [0, 1], got {lam}")
    if (mix_lam is None) != (perm is None):
        raise HaldStoreError(f"{where}: mix_index and mix_lam must both be given (a mix) or both be None")
    box = None
    if mix_bbox is not None:
        if perm is None:
            raise HaldStoreError(f"{where}: mix_bbox is given but mix_index is None")
        box = _as_array(mix_bbox)
        if box.shape != (4,) or box.dtype.kind not in "iu":
            raise HaldStoreError(f"{where}: mix_bbox must be 4 integers (bbx1, bby1, bbx2, bby2), got {mix_bbox!r}")
        box = box.astype(np.int64)
        if box.min() < 0 or box[0] > box[2] or box[1] > box[3]:
            raise HaldStoreError(f"{where}: mix_bbox {box.tolist()} is not a box (bbx1 <= bbx2, bby1 <= bby2, >= 0)")
    if not isinstance(soft, torch.Tensor) or not soft.is_floating_point():
        raise HaldStoreError(f"{where}: soft_label must be a float tensor (batch, classes), got "
                             f"{type(soft).__name__}{'' if not isinstance(soft, torch.Tensor) else ' ' + str(soft.dtype)}")
    if soft.ndim != 2 or soft.shape[0] != b:
        raise HaldStoreError(f"{where}: soft_label must have shape ({b}, classes) to match coords, got {tuple(soft.shape)}")
    if num_classes is not None and soft.shape[1] != num_classes:
        raise HaldStoreError(f"{where}: soft labels have {soft.shape[1]} classes, expected {num_classes}")
    p = soft.float()
    if not torch.isfinite(p).all():
        raise HaldStoreError(f"{where}: soft_label holds NaN/Inf")
    sums = p.sum(1)
    if (p < 0).any() or ((sums - 1).abs() > 0.02).any():
        raise HaldStoreError(
            f"{where}: soft_label rows must be probabilities (>= 0, summing to 1); got values in "
            f"[{float(p.min()):.3g}, {float(p.max()):.3g}], row sums in [{float(sums.min()):.3g}, {float(sums.max()):.3g}] "
            "(teacher logits are not supported: store softmax(logits / T))"
        )
    return ReferenceBatch(c, f.astype(bool), perm, lam, box, soft.detach().cpu(), bits)


@dataclass
class ReferenceLabels:
    """An opened reference label directory; epochs are loaded (and validated) one at a time
    with :meth:`load_epoch`, so a large directory never has to fit in memory at once."""

    labels_dir: Path
    files: list[Path]  # epoch_0.tar .. epoch_{S-1}.tar
    sampler_indices: dict[int, np.ndarray] | None  # epoch -> image order, None without the file
    num_classes: int | None = None  # label width: given, or learnt from the first loaded batch
    sampler_bytes: int = 0

    @property
    def epochs(self) -> int:
        return len(self.files)

    @property
    def source_bytes(self) -> int:
        """Bytes of the epoch files (the sampler file is counted in :attr:`sampler_bytes`)."""
        return sum(f.stat().st_size for f in self.files)

    def load_epoch(self, epoch: int) -> list[ReferenceBatch]:
        """The validated batches of ``epoch``; the label width must agree with every batch
        seen so far (and with ``num_classes`` when it was given)."""
        path = self.files[epoch]
        data = _load(path)
        if not isinstance(data, (list, tuple)):
            raise HaldStoreError(f"{str(path)!r}: expected a list of batch entries {_ENTRY}, got {type(data).__name__}")
        if not data:
            raise HaldStoreError(f"{str(path)!r} holds no batches")
        batches = []
        for b, entry in enumerate(data):
            batch = _validate_batch(entry, f"{str(path)!r} batch {b}", self.num_classes)
            if self.num_classes is None:
                self.num_classes = int(batch.soft_label.shape[1])
            batches.append(batch)
        sizes = [x.size for x in batches]
        if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:
            raise HaldStoreError(f"{str(path)!r}: batches must all have the same size except a shorter last one, "
                                 f"got sizes {preview(sizes, 8)}")
        if self.sampler_indices is not None and sum(sizes) != len(self.sampler_indices[epoch]):
            raise HaldStoreError(f"{str(path)!r} labels {sum(sizes)} images but {SAMPLER_FILE} lists "
                                 f"{len(self.sampler_indices[epoch])} for epoch {epoch}")
        return batches

    def order(self, epoch: int, num_images: int) -> np.ndarray:
        """Image indices of ``epoch`` in batch order (``0..num_images-1`` without a sampler file)."""
        if self.sampler_indices is None:
            return np.arange(num_images, dtype=np.int64)
        return self.sampler_indices[epoch]


def _load_sampler(path: Path, epochs: int, files: list[Path]) -> dict[int, np.ndarray]:
    data = _load(path)
    if not isinstance(data, dict):
        raise HaldStoreError(f"{str(path)!r}: expected a dict {{epoch: image indices}}, got {type(data).__name__}")
    out: dict[int, np.ndarray] = {}
    for key, value in data.items():
        try:
            e = int(key.item() if isinstance(key, torch.Tensor) else key)
        except (TypeError, ValueError) as err:
            raise HaldStoreError(f"{str(path)!r}: key {key!r} is not an epoch number") from err
        idx = _as_array(value)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise HaldStoreError(f"{str(path)!r}: epoch {e} must map to a 1-D list of image indices, "
                                 f"got shape {tuple(idx.shape)} dtype {idx.dtype}")
        if idx.size and idx.min() < 0:
            raise HaldStoreError(f"{str(path)!r}: epoch {e} has a negative image index {int(idx.min())}")
        out[e] = idx.astype(np.int64)
    lacking = [e for e in range(epochs) if e not in out]
    if lacking:
        raise HaldStoreError(f"{str(path)!r} has no image order for epoch(s) {preview(lacking)} "
                             f"(it covers {preview(sorted(out))})")
    beyond = sorted(e for e in out if e >= epochs)
    if beyond:
        raise HaldStoreError(
            f"{str(path)!r} lists image orders for epochs up to {beyond[-1]} but the directory holds only "
            f"epoch_0.tar .. {files[-1].name}: missing {preview((f'epoch_{e}.tar' for e in beyond), 3)}"
        )
    return out


def open_reference(labels_dir: str | os.PathLike, *, num_classes: int | None = None) -> ReferenceLabels:
    """Open a reference label directory: find ``epoch_<e>.tar`` (numbered 0..S-1 without gaps)
    and load ``sampler_indices_dict.pt`` when present. Epoch files are read by
    :meth:`ReferenceLabels.load_epoch`."""
    root = Path(labels_dir)
    if not root.is_dir():
        raise HaldStoreError(f"label directory {str(root)!r} does not exist or is not a directory")
    found = {int(m.group(1)): root / name for name in os.listdir(root) if (m := _EPOCH_RE.match(name))}
    if not found:
        if any(p.is_dir() and re.match(r"^epoch_\d+$", p.name) for p in root.iterdir()):
            raise HaldStoreError(
                f"{str(root)!r} uses SRe2L's per-batch layout epoch_<e>/batch_<b>.tar, which cannot be imported: "
                "those files do not record which images each batch holds (SRe2L draws the order from a "
                "RandomSampler seeded with --fkd-seed, reproducible only by re-running that sampler with the same "
                "torch version and image list), so their labels cannot be attached to images safely, and they hold "
                "raw teacher logits; expected one epoch_<e>.tar per epoch (HALD/LPLD layout) with soft labels as "
                f"probabilities and the image order in {SAMPLER_FILE}"
            )
        raise HaldStoreError(f"no epoch_<n>.tar files in {str(root)!r}")
    last = max(found)
    missing = [e for e in range(last + 1) if e not in found]
    if missing:
        raise HaldStoreError(
            f"{str(root)!r}: missing {preview(f'epoch_{e}.tar' for e in missing)} (found {len(found)} epoch files "
            f"numbered up to epoch_{last}.tar; epochs must be numbered 0..{last} without gaps)"
        )
    files = [found[e] for e in range(last + 1)]
    for f in files:
        if not f.is_file():
            raise HaldStoreError(f"{str(f)!r} is not a file")
    sampler_path = root / SAMPLER_FILE
    sampler = _load_sampler(sampler_path, len(files), files) if sampler_path.exists() else None
    if num_classes is not None and num_classes < 1:
        raise HaldStoreError(f"--num-classes must be >= 1, got {num_classes}")
    return ReferenceLabels(root, files, sampler, num_classes,
                           sampler_path.stat().st_size if sampler is not None else 0)


def read_reference_epochs(
    labels_dir: str | os.PathLike, *, num_classes: int | None = None
) -> tuple[list[list[ReferenceBatch]], dict[int, np.ndarray] | None]:
    """Load and validate every epoch of a reference directory at once: ``(epochs, sampler)``
    with ``epochs[e]`` the list of :class:`ReferenceBatch` of ``epoch_<e>.tar`` and ``sampler``
    the image order per epoch (None without ``sampler_indices_dict.pt``). Use
    :func:`open_reference` to stream large directories epoch by epoch."""
    ref = open_reference(labels_dir, num_classes=num_classes)
    return [ref.load_epoch(e) for e in range(ref.epochs)], ref.sampler_indices
