"""The plan of labelling batches for batch-specific soft labels (teacher BatchNorm in train
mode, CutMix/MixUp inside the batch), as the reference pipelines make them.

Labelling epoch ``e`` labels crop seed ``e`` of every image: the images are shuffled with
``(seed, e)`` and cut into batches of ``batch_size`` (the last one may be short); batch ``b``
draws its mix ``(perm, lam, box)`` from ``(seed, e, b)``. Everything is a pure function of
the plan's fields, and the store also records it (:mod:`hald_store.replay`), so a loader replays exactly these batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .mixing import MIXES, draw_mix
from .replay import BATCH_ARRAYS

_MEMBERS_KEY, _MIX_KEY = 0xBA7C4, 0x313


@dataclass(frozen=True)
class BatchPlan:
    num_images: int
    epochs: int  # labelling epochs = crops per image
    batch_size: int
    seed: int = 0
    mix: str = "none"
    mix_alpha: float = 1.0
    size: int = 224  # side of the (square) crops the mix box refers to

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if self.mix != "none" and not self.mix_alpha > 0:
            raise ValueError(f"mix alpha must be > 0 for {self.mix}, got {self.mix_alpha}")
        if not 1 <= self.batch_size <= self.num_images:
            raise ValueError(f"labelling batch size must be between 1 and {self.num_images} images, got {self.batch_size}")

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    def members(self, epoch: int) -> np.ndarray:
        """(num_batches, batch_size) image indices of each batch of ``epoch``, -1 padded."""
        order = np.random.default_rng([self.seed, epoch, _MEMBERS_KEY]).permutation(self.num_images)
        padded = np.full(self.num_batches * self.batch_size, -1, dtype=np.int64)
        padded[: self.num_images] = order
        return padded.reshape(self.num_batches, self.batch_size)

    def arrays(self) -> dict[str, np.ndarray]:
        """The whole plan: ``members``/``perm`` (epochs, batches, batch_size) int64 (-1 padded),
        ``lam`` (epochs, batches) float32 and ``box`` (epochs, batches, 4) int32 ``(y0, y1, x0, x1)``."""
        shape = (self.epochs, self.num_batches)
        out = dict(zip(BATCH_ARRAYS, (np.stack([self.members(e) for e in range(self.epochs)]),
                                      np.full((*shape, self.batch_size), -1, dtype=np.int64),
                                      np.ones(shape, dtype=np.float32), np.zeros((*shape, 4), dtype=np.int32))))
        for e in range(self.epochs):
            for b in range(self.num_batches):
                n = int((out["members"][e, b] >= 0).sum())
                perm, lam, box = draw_mix(self.mix, self.mix_alpha, n, self.size, self.size,
                                          np.random.default_rng([self.seed, e, b, _MIX_KEY]))
                out["perm"][e, b, :n], out["lam"][e, b], out["box"][e, b] = perm, lam, box
        return out
