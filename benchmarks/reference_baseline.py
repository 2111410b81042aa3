"""The reference pipelines' label building and loading, re-created as the benchmarks' baseline.

SRe2L-style pipelines save, per epoch, a pickled list of batches (crop coordinates as
fractions of the image, flips, full fp16 soft-label vectors): building crops each image with
PIL in a per-image Python loop, runs the teacher and ``torch.save``s the list; training
``torch.load``s that file and crops each image again with PIL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hald_store import LabelStore, SoftLabelLoader
from hald_store.codec import dense_fp16_probs


def write_epoch_file(store: LabelStore, images_root: str | os.PathLike, path: Path, epoch: int,
                     batch_size: int, seed: int = 0) -> None:
    """The reference layout of one epoch of ``store``: same images, crops and order as our loader."""
    loader = SoftLabelLoader(store, images_root, batch_size=batch_size, seed=seed, backend="torchvision")
    order, seeds = loader.epoch_order(epoch), loader.crop_seeds(epoch)
    m = store.manifest()
    batches = []
    for b0 in range(0, len(order), batch_size):
        ids = order[b0 : b0 + batch_size]
        boxes, flips = store.boxes(ids, seeds[ids])
        hw = np.stack([m.heights[ids], m.widths[ids], m.heights[ids], m.widths[ids]], 1)
        probs = dense_fp16_probs(store.read(ids, seeds[ids]).dense_logits(), store.temperature)
        batches.append([torch.from_numpy(boxes / hw).float(), torch.from_numpy(flips), torch.from_numpy(probs),
                        torch.from_numpy(ids)])
    torch.save(batches, path)


def _crop(path: Path, frac: torch.Tensor, flip: bool, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    top, left, ch, cw = (frac * torch.tensor([h, w, h, w])).round().int().tolist()
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - mean) / std


def reference_build(store: LabelStore, images_root: str | os.PathLike, teacher: torch.nn.Module, path: Path,
                    batch_size: int) -> tuple[float, float]:
    """Label every stored crop the reference way into one pickled epoch file.

    Returns (seconds, seconds inside the teacher's forward pass).
    """
    m = store.manifest()
    files = [Path(images_root, p) for p in m.paths]
    spec = store.render_spec
    size, mean, std = spec.size, torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    ids, seeds = np.divmod(np.arange(store.num_crops), store.crops_per_image)
    boxes, flips = store.boxes(ids, seeds)
    hw = np.stack([m.heights[ids], m.widths[ids], m.heights[ids], m.widths[ids]], 1)
    coords = torch.from_numpy(boxes / hw).float()
    t0, in_teacher, batches = time.perf_counter(), 0.0, []
    teacher = teacher.eval()
    for b0 in range(0, len(ids), batch_size):
        sel = slice(b0, b0 + batch_size)
        x = torch.stack([_crop(files[i], c, bool(f), size, mean, std) for i, c, f in zip(ids[sel], coords[sel], flips[sel])])
        t1 = time.perf_counter()
        with torch.inference_mode():
            probs = torch.softmax(teacher(x) / store.temperature, 1).half()
        in_teacher += time.perf_counter() - t1
        batches.append([coords[sel], torch.from_numpy(flips[sel]), probs, torch.from_numpy(ids[sel])])
    torch.save(batches, path)
    return time.perf_counter() - t0, in_teacher


class ReferenceEpoch(torch.utils.data.Dataset):
    """One epoch file; item ``b`` is batch ``b``: (images, fp16 soft labels) via a PIL loop."""

    def __init__(self, path: Path, images_root: str | os.PathLike, paths: list[str], size: int,
                 mean: list[float], std: list[float]) -> None:
        self.batches = torch.load(path, weights_only=True)
        self.files = [Path(images_root, p) for p in paths]
        self.size = size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords, flips, probs, ids = self.batches[b]
        x = torch.stack([_crop(self.files[i], c, bool(f), self.size, self.mean, self.std)
                         for i, c, f in zip(ids.tolist(), coords, flips)])
        return x, probs.float()
