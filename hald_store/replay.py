"""Recorded-batch replay: the one home of a batch-specific store's labelling batches.

A store of batch-specific labels records, for every labelling epoch (= crop seed) ``e``, the
batches the teacher saw, as the arrays ``batches/<name>`` for ``name`` in :data:`BATCH_ARRAYS`:
``members`` and ``perm`` ``(epochs, batches, batch_size)`` int64 (-1 padded), ``lam``
``(epochs, batches)`` float32 and ``box`` ``(epochs, batches, 4)`` int32 ``(y0, y1, x0, x1)``.
``plan`` below is one labelling epoch of them (a :meth:`~hald_store.store.LabelStore.batches`
dict). Training epoch ``t`` replays labelling epoch :func:`replay_epoch`, its batches dealt to
ranks by :func:`replay_batch_order`; :func:`replay_batches` renders and mixes recorded batches
exactly as when they were labelled (build, verify and the reference-file writer use it, the
loader's :class:`~hald_store.sources.RecordedBatches` its two halves).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .errors import HaldStoreError
from .mixing import apply_mix
from .order import epoch_order, samples_per_rank

__all__ = ["BATCH_ARRAYS", "batch_path", "replay_epoch", "replay_batch_order", "batch_members", "mix_recorded",
           "replay_batches"]

BATCH_ARRAYS = ("members", "perm", "lam", "box")

Plan = Mapping[str, np.ndarray]
Request = tuple[np.ndarray, np.ndarray, np.ndarray]  # (image ids, boxes, flips) of one batch


def batch_path(name: str) -> str:
    """The store array of the batch array ``name`` (one of :data:`BATCH_ARRAYS`)."""
    return f"batches/{name}"


def replay_epoch(crops_per_image: int, epoch: int, seed: int = 0) -> int:
    """The labelling epoch whose recorded batches training epoch ``epoch`` replays: the pool of
    ``crops_per_image`` labelling epochs is drawn without replacement, reshuffled every cycle."""
    cycle, e = divmod(int(epoch), int(crops_per_image))
    return int(np.random.default_rng([int(seed), cycle, 0xE90C]).permutation(crops_per_image)[e])


def replay_batch_order(num_batches: int, epoch: int, seed: int, *, shuffle: bool = True, rank: int = 0,
                       world_size: int = 1, drop_last: bool = False) -> np.ndarray:
    """This rank's recorded batch indices for ``epoch``: whole batches dealt to ranks."""
    if samples_per_rank(num_batches, world_size, drop_last) == 0:
        raise HaldStoreError(f"{num_batches} recorded batches cannot feed {world_size} ranks with drop_last")
    return epoch_order(num_batches, epoch, seed, shuffle=shuffle, rank=rank, world_size=world_size,
                       drop_last=drop_last)


def batch_members(plan: Plan, b: int) -> np.ndarray:
    """Image indices of recorded batch ``b`` of ``plan``."""
    members = plan["members"][b]
    return members[members >= 0]


def mix_recorded(kind: str, images: torch.Tensor, plan: Plan, b: int) -> torch.Tensor:
    """Recorded batch ``b``'s rendered ``images``, mixed exactly as when it was labelled."""
    return apply_mix(kind, images, plan["perm"][b][: len(images)], float(plan["lam"][b]), plan["box"][b])


def replay_batches(plan: Plan, boxes: np.ndarray, flips: np.ndarray, mix: str,
                   render: Callable[[Sequence[Request]], Iterable[torch.Tensor]],
                   batches: Iterable[int] | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The recorded batches ``batches`` (all by default) of ``plan``, their crops (every image's
    ``boxes``/``flips`` of this labelling epoch) rendered by ``render`` (requests -> images, one
    tensor per request, e.g. a :class:`~hald_store.stream.CropStream`) and mixed as recorded:
    yields (members, images)."""
    picks = list(range(len(plan["members"])) if batches is None else batches)
    members = [batch_members(plan, b) for b in picks]
    for b, m, x in zip(picks, members, render([(m, boxes[m], flips[m]) for m in members])):
        yield m, mix_recorded(mix, x, plan, b)
