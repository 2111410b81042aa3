"""The optimiser and learning-rate curve, as the HALD reference trainer builds them."""

from __future__ import annotations

import math

import torch
from torch import nn

from hald_store.errors import HaldStoreError

from .presets import DECAY_PARAMS, OPTIMIZERS



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


def decays(name: str, param: torch.Tensor) -> bool:
    """The reference's rule: decay a parameter whose name contains ``weight`` and that has more
    than one dimension (conv and linear weights; not biases, not norm-layer scales)."""
    return "weight" in name and param.ndim > 1


def param_groups(model: nn.Module, weight_decay: float, decay_params: str = "weights") -> list[dict]:
    """Named parameter groups ``[decayed, not decayed]`` (empty groups left out).

    ``decay_params="weights"`` applies :func:`decays`; ``"all"`` decays every parameter.
    """
    if decay_params not in DECAY_PARAMS:
        raise HaldStoreError(f"decay_params must be one of {DECAY_PARAMS}, got {decay_params!r}")
    groups: dict[bool, list] = {True: [], False: []}
    for name, p in model.named_parameters():
        groups[decay_params == "all" or decays(name, p)].append((name, p))
    return [{"params": groups[d], "weight_decay": weight_decay if d else 0.0} for d in (True, False) if groups[d]]


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, decay_params: str = "weights",
                   momentum: float = 0.9, beta2: float = 0.999) -> torch.optim.Optimizer:
    """AdamW (betas ``(0.9, beta2)``), or SGD with Nesterov momentum, over :func:`param_groups` of ``model``."""
    groups = param_groups(model, weight_decay, decay_params)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise HaldStoreError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
