"""The optimiser and learning-rate curve, as the HALD reference trainer builds them."""

from __future__ import annotations

import math


def lr_factor(t: float, total: int, warmup: int = 0, eta: float = 1.0) -> float:
    """Learning-rate multiplier at tick ``t`` (the trainer ticks once per epoch).

    Linear warm-up over ``warmup`` ticks, then ``0.5 * (1 + cos(pi * p / eta))`` with ``p``
    going from 0 to 1 at ``total``: ``eta = 1`` decays to 0, ``eta = 2`` to half the peak. With
    no warm-up this is the reference's ``0.5 * (1 + cos(pi * epoch / epochs / eta))``.
    """
    if t < warmup:
        return (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress / eta))
