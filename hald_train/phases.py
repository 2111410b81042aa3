"""Phase kinds: what one epoch of a schedule trains on and how, one registered class per kind.

A kind owns its options (a dataclass: defaults, checks and ``hald-train`` help declared once),
its loader and its loss. ``schedule.py`` accepts the registered names, :class:`TrainConfig`
takes every kind's options as keywords and ``hald-train`` as flags. A new kind is one
``@register_phase_kind`` class here (see ``docs/extending.md``).

This module imports without torch (``hald-train --help`` reads it); the loaders and losses
are imported when a phase is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from hald_store.errors import OptionError, check_at_least, check_in_range, check_positive_finite
from hald_store.registry import Registry

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hald_store import HardLabelLoader, LabelStore, SoftLabelLoader

Model = Callable[["torch.Tensor"], "torch.Tensor"]  # images -> logits (the trainer's forward)


def option(default: Any, help: str, flag_type: type = float, *aliases: str) -> Any:
    """A phase option field: its default, its ``hald-train`` help and flag type, and extra flag names."""
    return dataclasses.field(default=default, metadata={"help": help, "type": flag_type, "aliases": aliases})


@dataclass(frozen=True)
class NoOptions:
    """A kind without options."""

    def check(self) -> None:
        """Raise :class:`OptionError` naming the bad option."""


class PhaseKind:
    """One kind of phase: :meth:`build` makes its loader, :meth:`loss` scores a batch.

    Subclasses set ``name`` (the schedule's ``name:EPOCHS``) and ``Options`` (a frozen dataclass
    of :func:`option` fields whose names are unique across kinds unless shared with one meaning).
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options
        self.loader: SoftLabelLoader | HardLabelLoader | None = None

    def build(self, store: LabelStore, images: str, **common: Any) -> None:
        """Make ``self.loader`` over ``images`` (``common``: the loaders' shared keywords, ``batch_size``,
        ``world_size``, ``device``, ...)."""
        raise NotImplementedError

    def loss(self, model: Model, batch: Any, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits, loss)`` of one batch (``rng``: this epoch's draws), or None to skip it."""
        raise NotImplementedError


PHASE_KINDS: Registry[type[PhaseKind]] = Registry("phase kind")  # name -> class, in registration order


def register_phase_kind(cls: type[PhaseKind]) -> type[PhaseKind]:
    """Class decorator: make ``cls`` the phase kind named ``cls.name`` (its options may not clash with another's)."""
    mine = {f.name: f.default for f in dataclasses.fields(cls.Options)}
    for other in PHASE_KINDS.values():
        for f in dataclasses.fields(other.Options):
            if f.name in mine and mine[f.name] != f.default:
                raise ValueError(f"phase option {f.name!r} of {cls.name!r} clashes with {other.name!r}'s")
    PHASE_KINDS.register(cls)
    return cls


def option_fields() -> list[dataclasses.Field]:
    """Every registered kind's option fields, each name once, in registration order."""
    seen: dict[str, dataclasses.Field] = {}
    for kind in PHASE_KINDS.values():
        for f in dataclasses.fields(kind.Options):
            seen.setdefault(f.name, f)
    return list(seen.values())


def options_dataclass() -> type:
    """A keyword-only dataclass with every registered kind's options (the base of ``TrainConfig``)."""
    return dataclasses.make_dataclass("PhaseOptions", [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata)) for f in option_fields()
    ], kw_only=True)


def options_of(name: str, settings: Any) -> Any:
    """Kind ``name``'s options read from ``settings`` (an object with every option as an attribute)."""
    cls = PHASE_KINDS[name].Options
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


# ------------------------------------------------------------------------------ soft
@dataclass(frozen=True)
class SoftOptions:
    temperature: float | None = option(None, "Soft-label temperature [default: the store's].", float, "-T")

    def check(self) -> None:
        check_positive_finite("temperature", self.temperature)


@register_phase_kind
class SoftPhase(PhaseKind):
    """The stored crops and their soft labels; KL at the temperature (no ``T**2``, as the reference)."""

    name = "soft"
    Options = SoftOptions

    def build(self, store: LabelStore, images: str, **common: Any) -> None:
        from hald_store import SoftLabelLoader

        self.loader = SoftLabelLoader(store, images, temperature=self.options.temperature, **common)

    def loss(self, model: Model, batch: Any, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from .losses import soft_kl_loss

        logits = model(batch.images)
        return logits, soft_kl_loss(logits, batch.soft, self.loader.temperature)


# ------------------------------------------------------------------------------ hard
@dataclass(frozen=True)
class HardOptions:
    cutmix_alpha: float = option(1.0, "Hard phases: CutMix Beta(alpha, alpha); 0 turns it off.")
    label_smoothing: float = option(0.8, "Hard phases: label smoothing.")
    hard_batch_size: int | None = option(None, "Hard phases' batch size [default: --batch-size].", int)

    def check(self) -> None:
        check_at_least("cutmix_alpha", self.cutmix_alpha, 0)
        check_in_range("label_smoothing", self.label_smoothing, 0, 1)
        if self.hard_batch_size is not None and not self.hard_batch_size > 0:
            raise OptionError(f"hard_batch_size must be > 0, got {self.hard_batch_size}", "hard_batch_size")

    def batch(self, batch_size: int) -> int:
        """The hard phases' batch size when the others use ``batch_size``."""
        return batch_size if self.hard_batch_size is None else self.hard_batch_size


@register_phase_kind
class HardPhase(PhaseKind):
    """Fresh random crops with the image's class; soft cross-entropy on smoothed, CutMixed targets."""

    name = "hard"
    Options = HardOptions

    def build(self, store: LabelStore, images: str, **common: Any) -> None:
        from hald_store import HardLabelLoader

        o, batch_size = self.options, self.options.batch(common["batch_size"])
        world_size = common["world_size"]
        per_rank, low = -(-store.num_images // world_size), 2 if o.cutmix_alpha > 0 else 1
        if not low <= batch_size <= per_rank:
            name = "batch_size" if o.hard_batch_size is None else "hard_batch_size"
            raise OptionError(f"{name} of hard phases must be between {low} (CutMix pairs images) and the "
                              f"{per_rank} images each of {world_size} rank(s) gets, got {batch_size}", name)
        self.num_classes = store.num_classes
        self.loader = HardLabelLoader(store, images, **{**common, "batch_size": batch_size})

    def loss(self, model: Model, batch: Any, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        from .losses import cutmix, smooth_one_hot, soft_target_cross_entropy

        target = smooth_one_hot(batch.hard, self.num_classes, self.options.label_smoothing)
        images, target = cutmix(batch.images, target, self.options.cutmix_alpha, rng)  # an odd batch loses its last
        if not len(images):
            return None
        logits = model(images)
        return logits, soft_target_cross_entropy(logits, target)


# ----------------------------------------------------------------------------- mixed
@dataclass(frozen=True)
class MixedOptions(SoftOptions):
    mixed_weight: float = option(0.5, "Mixed phases: the soft KL's weight; the hard cross-entropy gets 1 - it.")

    def check(self) -> None:
        super().check()
        check_in_range("mixed_weight", self.mixed_weight, 0, 1, high_open=False)


@register_phase_kind
class MixedPhase(SoftPhase):
    """The stored crops; per batch ``w * KL(soft) + (1 - w) * CE(hard label)`` on the same images."""

    name = "mixed"
    Options = MixedOptions

    def loss(self, model: Model, batch: Any, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.nn.functional import cross_entropy

        logits, soft = super().loss(model, batch, rng)
        w = self.options.mixed_weight
        return logits, w * soft + (1 - w) * cross_entropy(logits.float(), batch.hard)
