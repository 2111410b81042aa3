"""hald_train: a thin trainer with HALD's Soft-Hard-Soft schedule, and its building blocks.

    from hald_train import TrainConfig, train, parse_schedule, soft_kl_loss, cutmix

Names are imported on first use (PEP 562), so ``hald-train --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("cutmix", "smooth_one_hot", "soft_kl_loss", "soft_target_cross_entropy"), "losses"),
    **dict.fromkeys(("PRESETS", "Phase", "Schedule", "ScheduleError", "parse_schedule", "preset"), "schedule"),
    **dict.fromkeys(("lr_factor", "make_optimizer", "param_groups"), "optim"),
    "TRAIN_PRESETS": "presets",
    **dict.fromkeys(("TrainConfig", "Trainer", "evaluate", "train"), "trainer"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hald_train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
