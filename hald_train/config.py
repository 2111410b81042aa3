"""The training run's settings, :class:`TrainConfig`: importable without torch, so that
``hald-train`` reads its defaults and choices from here (declared once)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from hald_store.errors import (HaldStoreError, OptionError, check_at_least, check_in_range, check_positive_finite,
                               check_seed)
from hald_store.options import RenderOptions

from .phases import PHASE_KINDS, options_dataclass, options_of
from .presets import DECAY_PARAMS, OPTIMIZERS, RESETS, TRAIN_PRESETS

# Settings that may change between a run and its resume without changing the result's meaning.
_RESUME_FREE = ("device", "workers", "progress", "stop_after")


@dataclass
class TrainConfig(options_dataclass()):
    """Everything a run depends on (``hald-train`` flags map one to one).

    Each phase kind's options (:mod:`hald_train.phases`: ``temperature``; ``cutmix_alpha``,
    ``label_smoothing``, ``hard_batch_size``) are keyword fields declared by that kind;
    :meth:`phase_options` gives one kind's as its typed dataclass.
    """

    store: str
    images: str
    out_dir: str
    val: str | None = None
    student: str = "cifar_resnet20"
    schedule: str = "shs"
    epochs: int | None = None  # needed by named schedules (shs, ...); an explicit schedule sums its own
    hard_epochs: int | None = None
    batch_size: int = 64
    optimizer: str = OPTIMIZERS[0]
    lr: float = 1e-3
    lr_eta: float = 2.0  # the LR ends at lr * 0.5 * (1 + cos(pi / lr_eta)): 1 -> 0, 2 -> half (reference)
    weight_decay: float = 0.01
    decay_params: str = DECAY_PARAMS[0]  # "weights": conv/linear weights only, as the reference; "all"
    momentum: float = 0.9
    warmup_epochs: int = 0
    reset_optimizer: str = "never"  # fresh optimizer moments at phase changes: never (reference), every, or
    # to-KIND (only into phases of that kind: to-hard, to-soft, ...); True/False mean every/never
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    eval_every: int = 0  # 0: evaluate at the end only
    eval_crop_fraction: float = 1.0
    seed: int = 0
    backend: str = RenderOptions.backend
    device: str = RenderOptions.device
    workers: int | None = RenderOptions.workers  # data-path threads (DALI) or processes (torchvision); None: this process's cores
    amp: bool = True  # bf16 autocast and channels-last where the device is CUDA (never on CPU)
    progress: bool = True
    stop_after: int | None = None  # stop this call after that many epochs (resume later)

    def __post_init__(self) -> None:
        if isinstance(self.reset_optimizer, bool):
            self.reset_optimizer = "every" if self.reset_optimizer else "never"

    def check(self) -> None:
        if not self.batch_size > 0:
            raise OptionError(f"batch_size must be > 0, got {self.batch_size}", "batch_size")
        for kind in PHASE_KINDS:
            self.phase_options(kind).check()
        for name in ("lr", "lr_eta"):
            check_positive_finite(name, getattr(self, name))
        if self.optimizer not in OPTIMIZERS:
            raise OptionError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}", "optimizer")
        if self.reset_optimizer not in RESETS:
            raise OptionError(f"reset_optimizer must be one of {', '.join(RESETS)}, got {self.reset_optimizer!r}",
                              "reset_optimizer")
        for name in ("adam_beta2", "momentum"):
            check_in_range(name, getattr(self, name), 0, 1)
        check_in_range("eval_crop_fraction", self.eval_crop_fraction, 0, 1, high_open=False)
        for name in ("workers", "warmup_epochs", "eval_every", "weight_decay"):
            check_at_least(name, getattr(self, name), 0)
        check_at_least("stop_after", self.stop_after, 1)
        check_seed("seed", self.seed)

    @classmethod
    def from_preset(cls, name: str, **fields: Any) -> "TrainConfig":
        """A config with the settings of :data:`TRAIN_PRESETS` ``[name]``; ``fields`` override them."""
        if name not in TRAIN_PRESETS:
            raise HaldStoreError(f"unknown preset {name!r}; presets: {', '.join(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[name], **fields})

    def phase_options(self, kind: str) -> Any:
        """Phase kind ``kind``'s options (its ``Options`` dataclass)."""
        return options_of(kind, self)

    @property
    def hard_batch(self) -> int:
        """The hard phases' batch size."""
        return self.phase_options("hard").batch(self.batch_size)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in _RESUME_FREE}


def default(name: str) -> Any:
    """:class:`TrainConfig`'s default for field ``name`` (the CLI's flag defaults)."""
    return next(f.default for f in fields(TrainConfig) if f.name == name)
