"""Helpers for tests and benchmarks (as ``zarr.testing``): where the shared real data lives,
a writer of relabel files in the reference layout made with a real teacher, and a store
opened with every byte it reads counted.

The shared test data (real CIFAR-10 JPEGs, a distilled CIFAR-10 set, pretrained CIFAR ResNet
teachers; what and why: ``docs/testing.md``) is read from ``$HALD_DATA`` or, by default,
``../shared/data`` next to the repository; tests that need it skip through ``require_data`` in
``tests/conftest.py``, all with one reason. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import zarr
from torch import nn
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .build import batch_stats_teacher
from .crop_plan import CropPolicy, plan_crops
from .batch_plan import BatchPlan
from .errors import HaldStoreError
from .images import scan_image_folder
from .mixing import MIXES
from .render import IMAGENET_MEAN, IMAGENET_STD, make_renderer, read_files
from .relabel_files import SAMPLER_FILE
from .replay import replay_batches
from .locations import is_remote
from .store import LabelStore

_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_dir() -> Path:
    """The reference data directory (it may not exist; callers check)."""
    return Path(os.environ.get("HALD_DATA", _DEFAULT))


def shared_data_path(*parts: str) -> Path | None:
    """``shared_data_dir()/parts``, or None when it is absent."""
    path = shared_data_dir().joinpath(*parts)
    return path if path.exists() else None


def write_reference_epochs(
    images_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    teacher: nn.Module,
    *,
    epochs: int,
    batch_size: int,
    temperature: float = 20.0,
    input_size: int,
    mix: str = "cutmix",
    mix_alpha: float = 1.0,
    teacher_mode: str = "train",
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    with_sampler_indices: bool = True,
    crop_policy: CropPolicy = CropPolicy(),
    device: str | torch.device = "cpu",
    coords_dtype: torch.dtype = torch.float16,
) -> list[Path]:
    """Label ``images_root`` with ``teacher`` the way the reference relabel code does and write
    the reference layout into ``out_dir``; returns the epoch files.

    Per epoch: the image order and per-batch mixes of a :class:`~hald_store.batch_plan.BatchPlan`
    (the order recorded in ``sampler_indices_dict.pt``; with ``with_sampler_indices=False`` the
    order is ``0..N-1`` and no sampler file is written), one RandomResizedCrop window and flip
    per image (:func:`~hald_store.crop_plan.plan_crops`, crop seed = epoch), crops rendered by
    the torchvision renderer, CutMix/MixUp inside each batch, the teacher on the mixed batch (BatchNorm on
    batch statistics for ``teacher_mode="train"``) and ``softmax(logits / T)`` saved as fp16;
    the crop coordinates are saved as ``coords_dtype`` (float16, as the reference's
    ``coords_status.half()``).
    """
    if mix not in MIXES:
        raise HaldStoreError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if teacher_mode not in ("eval", "train"):
        raise HaldStoreError(f"teacher_mode must be eval or train, got {teacher_mode!r}")
    if epochs < 1 or batch_size < 1 or not temperature > 0:
        raise HaldStoreError(f"need epochs >= 1, batch_size >= 1 and temperature > 0; got {epochs}, {batch_size}, "
                             f"{temperature}")
    root, out = Path(images_root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = scan_image_folder(root, progress=False)
    n = len(manifest)
    files = [root / p for p in manifest.paths]
    encoded = read_files(files)
    renderer = make_renderer("torchvision", size=input_size, mean=mean, std=std, device="cpu")
    dev = torch.device(device)
    model = teacher.to(dev).eval()
    if teacher_mode == "train":
        model = batch_stats_teacher(model)
    try:
        plan = BatchPlan(num_images=n, epochs=epochs, batch_size=batch_size, seed=seed, mix=mix, mix_alpha=mix_alpha,
                         size=input_size).arrays()
    except ValueError as exc:
        raise HaldStoreError(str(exc)) from exc
    hw = np.stack([manifest.heights, manifest.widths, manifest.heights, manifest.widths], 1).astype(np.float64)
    sampler: dict[int, torch.Tensor] = {}
    written = []

    def render(requests: list) -> Iterator[torch.Tensor]:
        return (renderer([encoded[i] for i in ids], bx, fl) for ids, bx, fl in requests)

    for e in range(epochs):
        batches = {k: v[e] for k, v in plan.items()}
        if not with_sampler_indices:  # the images in folder order, cut as the recorded batches
            members = np.arange(batches["members"].size)
            batches["members"] = np.where(members < n, members, -1).reshape(batches["members"].shape)
        order = batches["members"][batches["members"] >= 0]
        boxes, flips = plan_crops(seed, np.arange(n), e, manifest.heights, manifest.widths, crop_policy)
        coords = boxes / hw
        entries = []
        for b, (ids, x) in enumerate(replay_batches(batches, boxes, flips, mix, render)):
            perm, lam, box = batches["perm"][b, : len(ids)], float(batches["lam"][b]), batches["box"][b]
            with torch.inference_mode():
                probs = torch.softmax(model(x.to(dev)).float() / temperature, dim=1).half().cpu()
            y0, y1, x0, x1 = (int(v) for v in box)
            entries.append([
                torch.from_numpy(coords[ids]).float().to(coords_dtype),
                torch.from_numpy(flips[ids].copy()),
                None if mix == "none" else torch.from_numpy(np.asarray(perm, dtype=np.int64)),
                None if mix == "none" else float(lam),
                [y0, x0, y1, x1] if mix == "cutmix" else None,  # (bbx1, bby1, bbx2, bby2)
                probs,
            ])
        path = out / f"epoch_{e}.tar"
        torch.save(entries, path)
        written.append(path)
        sampler[e] = torch.from_numpy(order.astype(np.int64))
    if with_sampler_indices:
        torch.save(sampler, out / SAMPLER_FILE)
    return written


class CountingStore(WrapperStore):
    """A Zarr store that counts what is read through it: bytes and the keys (files) touched."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.reset()

    def reset(self) -> None:
        self.bytes_read = 0
        self.keys: dict[str, int] = {}  # key -> bytes read from it

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.bytes_read += len(buf)
            self.keys[key] = self.keys.get(key, 0) + len(buf)
        return buf


def open_counted(path: str | os.PathLike, storage_options: dict | None = None) -> tuple[LabelStore, CountingStore]:
    """Open a store for reading with every byte it reads counted (local path or fsspec URL)."""
    path = os.fspath(path)
    inner = (FsspecStore.from_url(path, storage_options=storage_options or {}, read_only=True) if is_remote(path)
             else LocalStore(path, read_only=True))
    counter = CountingStore(inner)
    return LabelStore(zarr.open_group(store=counter, mode="r"), path, storage_options), counter
