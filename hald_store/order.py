"""Pure visiting orders: which images and crops an epoch uses (recorded batches: :mod:`hald_store.replay`).

Everything here is a function of its arguments (seeds, epoch, rank), so every process and
every resumed run computes the same order without talking to the others -- the role FFCV
gives its ``traversal_order`` strategies.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["samples_per_rank", "epoch_order", "block_epoch_order", "epoch_crop_seeds"]


def samples_per_rank(num_samples: int, world_size: int, drop_last: bool) -> int:
    """Samples each rank gets: ``DistributedSampler``'s rule (pad by wrapping, or drop)."""
    return num_samples // world_size if drop_last else math.ceil(num_samples / world_size)


def epoch_order(num_samples: int, epoch: int, seed: int, *, shuffle: bool = True, rank: int = 0,
                world_size: int = 1, drop_last: bool = False) -> np.ndarray:
    """This rank's sample indices for ``epoch``, in delivery order.

    A permutation seeded by ``(seed, epoch)`` (or ``arange`` without ``shuffle``), padded by
    wrapping around or truncated to a multiple of ``world_size``, then dealt round-robin.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples) if shuffle else np.arange(num_samples)
    total = samples_per_rank(num_samples, world_size, drop_last) * world_size
    return np.resize(order, total)[rank::world_size]


def block_epoch_order(num_samples: int, epoch: int, seed: int, block: int, *, shuffle: bool = True,
                      rank: int = 0, world_size: int = 1, drop_last: bool = False) -> np.ndarray:
    """This rank's sample indices for ``epoch`` when ranks take whole blocks of ``block``
    consecutive samples (so each rank reads only its blocks of a ``"sharded"`` store).

    The blocks are permuted by ``(seed, epoch)``, their samples laid end to end, padded by
    wrapping or truncated as :func:`epoch_order` does, and cut into one contiguous span per rank
    (a rank shares at most its two end blocks); each span is then shuffled by ``(seed, epoch, rank)``.
    """
    n, blk = int(num_samples), int(block)
    if shuffle:
        blocks = np.random.default_rng([int(seed), int(epoch), 0xB10C]).permutation(-(-n // blk))
        order = (blocks[:, None] * blk + np.arange(blk)).ravel()
        order = order[order < n]
    else:
        order = np.arange(n)
    per = samples_per_rank(n, world_size, drop_last)
    span = np.resize(order, per * world_size)[rank * per : (rank + 1) * per]
    return np.random.default_rng([int(seed), int(epoch), int(rank)]).permutation(span) if shuffle else span


def epoch_crop_seeds(num_images: int, crops_per_image: int, epoch: int, seed: int = 0,
                     images_per_block: int = 1) -> np.ndarray:
    """Stored crop seed that each image uses in ``epoch``.

    Epochs come in cycles of ``crops_per_image``; within a cycle every image uses each of its
    crops exactly once, in an order ``(a * e + b) mod S`` with ``a`` coprime to ``S`` and ``a, b``
    drawn per cycle and per block of ``images_per_block`` consecutive images from ``seed``
    (per image by default; a ``"sharded"`` store's blocks share one seed, so an epoch reads one
    inner chunk per block).
    """
    s, blk = int(crops_per_image), int(images_per_block)
    cycle, e = divmod(int(epoch), s)
    units = np.array([a for a in range(1, s) if math.gcd(a, s) == 1] or [1], dtype=np.int64)
    rng = np.random.default_rng([int(seed), cycle, 0x5EED])
    blocks = -(-int(num_images) // blk)
    a = units[rng.integers(len(units), size=blocks)]
    b = rng.integers(s, size=blocks)
    return np.repeat((a * e + b) % s, blk)[:num_images]
