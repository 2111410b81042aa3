"""hald_train: a thin trainer with HALD's Soft-Hard-Soft schedule, and its building blocks.

    from hald_train import TrainConfig, train, parse_schedule, soft_kl_loss, cutmix
"""

from .losses import cutmix, smooth_one_hot, soft_kl_loss, soft_target_cross_entropy
from .schedule import PRESETS, Phase, Schedule, ScheduleError, parse_schedule, preset
from .optim import lr_factor, make_optimizer, param_groups
from .trainer import TRAIN_PRESETS, TrainConfig, Trainer, evaluate, train

__all__ = [
    "cutmix", "smooth_one_hot", "soft_kl_loss", "soft_target_cross_entropy", "PRESETS", "Phase", "Schedule",
    "ScheduleError", "parse_schedule", "preset", "TRAIN_PRESETS", "TrainConfig", "Trainer", "evaluate", "lr_factor",
    "make_optimizer", "param_groups", "train",
]
