"""Batch mixing (CutMix, MixUp) with explicit parameters, so a mix can be recorded and replayed.

A mix of a batch is ``(perm, lam, box)``: sample ``i`` is mixed with sample ``perm[i]``;
CutMix pastes ``box = (y0, y1, x0, x1)`` of ``perm[i]`` into ``i`` (``lam`` is then the kept
area fraction), MixUp blends ``lam * x[i] + (1 - lam) * x[perm[i]]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .choices import MIXES


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The CutMix box for a drawn ``lam`` (side ``sqrt(1 - lam)``, uniform centre, clipped at the
    border) and the kept-area fraction it really leaves."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return np.array([y0, y1, x0, x1], dtype=np.int32), 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def draw_mix(kind: str, alpha: float, n: int, height: int, width: int,
             rng: np.random.Generator) -> tuple[np.ndarray, float, np.ndarray]:
    """Draw ``(perm, lam, box)`` for a batch of ``n`` (identity, 1.0 and an empty box for ``none``)."""
    if kind not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {kind!r}")
    if kind == "none" or n < 2:
        return np.arange(n), 1.0, np.zeros(4, dtype=np.int32)
    lam = float(rng.beta(alpha, alpha))
    perm = rng.permutation(n)
    if kind == "mixup":
        return perm, lam, np.zeros(4, dtype=np.int32)
    box, lam = cutmix_box(lam, height, width, rng)
    return perm, lam, box


def apply_mix(kind: str, images: torch.Tensor, perm: np.ndarray, lam: float, box: np.ndarray) -> torch.Tensor:
    """Mix a batch ``(n, C, H, W)`` as recorded; returns a new tensor (``none``: the input)."""
    if kind == "none":
        return images
    p = torch.as_tensor(np.asarray(perm), device=images.device)
    if kind == "mixup":
        return lam * images + (1.0 - lam) * images[p]
    y0, y1, x0, x1 = (int(v) for v in box)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[p, :, y0:y1, x0:x1]
    return mixed


def mix_targets(targets: torch.Tensor, perm: np.ndarray, lam: float) -> torch.Tensor:
    """``lam * t + (1 - lam) * t[perm]``: the targets of a mixed batch."""
    return lam * targets + (1.0 - lam) * targets[torch.as_tensor(np.asarray(perm), device=targets.device)]
