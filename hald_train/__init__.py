"""hald_train: a thin trainer with HALD's Soft-Hard-Soft schedule, and its building blocks.

    from hald_train import TrainConfig, train, parse_schedule, soft_kl_loss, cutmix

Names are imported on first use (PEP 562), so ``hald-train --help`` does not import torch.
"""

from __future__ import annotations

from hald_store.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("cutmix", "smooth_one_hot", "soft_kl_loss", "soft_target_cross_entropy"), "losses"),
    **dict.fromkeys(("PRESETS", "Phase", "Schedule", "ScheduleError", "parse_schedule", "preset"), "schedule"),
    **dict.fromkeys(("lr_factor", "make_optimizer", "param_groups"), "optim"),
    "TRAIN_PRESETS": "presets",
    **dict.fromkeys(("PHASE_KINDS", "PhaseKind", "register_phase_kind"), "phases"),
    "TrainConfig": "config",
    **dict.fromkeys(("Trainer", "evaluate", "train"), "trainer"),
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
