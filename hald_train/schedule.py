"""Training schedules as data: a list of phases, each a registered phase kind (``soft``, ``hard``:
:mod:`hald_train.phases`) for some epochs.

Write one explicitly (``"soft:75,hard:150,soft:75"``) or name a preset, sized by the total
number of epochs and the number of hard epochs (half the run by default, as HALD does):

==============  ==========================================================
``shs``         soft half of the soft epochs, hard, soft rest (the default)
``hs`` / ``sh`` hard then soft / soft then hard
``hsh``         hard half of the hard epochs, soft, hard rest
``soft-only``   soft labels for every epoch
``hard-only``   hard labels for every epoch
``alt-soft:N``  alternating blocks of N epochs, starting with soft
``alt-hard:N``  alternating blocks of N epochs, starting with hard
==============  ==========================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from hald_store.errors import HaldStoreError

from .phases import PHASE_KINDS

SPLITS = ("shs", "hs", "sh", "hsh")  # presets that split the epochs into soft and hard ones
PRESETS = (*SPLITS, "soft-only", "hard-only", "alt-soft:N", "alt-hard:N")


class ScheduleError(HaldStoreError, ValueError):
    """A schedule that does not parse or does not make sense."""


@dataclass(frozen=True)
class Phase:
    kind: str  # a name in PHASE_KINDS
    epochs: int

    def __post_init__(self) -> None:
        if self.kind not in PHASE_KINDS:
            raise ScheduleError(f"phase kind must be one of {', '.join(PHASE_KINDS)}, got {self.kind!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ScheduleError(f"a {self.kind} phase needs a positive whole number of epochs, got {self.epochs!r}")


class Schedule:
    """An ordered list of phases; epoch ``e`` (0-based) belongs to exactly one phase."""

    def __init__(self, phases: Iterable[Phase | tuple[str, int]]) -> None:
        self.phases = [p if isinstance(p, Phase) else Phase(*p) for p in phases]
        if not self.phases:
            raise ScheduleError("a schedule needs at least one phase")
        merged: list[Phase] = []  # adjacent phases of one kind are one phase
        for p in self.phases:
            if merged and merged[-1].kind == p.kind:
                merged[-1] = Phase(p.kind, merged[-1].epochs + p.epochs)
            else:
                merged.append(p)
        self.phases = merged

    @property
    def epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def kind_at(self, epoch: int) -> str:
        """The kind of epoch ``epoch`` (a name in ``PHASE_KINDS``)."""
        return self.phases[self.phase_at(epoch)].kind

    def phase_at(self, epoch: int) -> int:
        """Index of the phase that epoch ``epoch`` belongs to."""
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} is outside the schedule's {self.epochs} epochs")
        end = 0
        for i, p in enumerate(self.phases):
            end += p.epochs
            if epoch < end:
                return i
        raise AssertionError("unreachable")

    def kinds(self) -> list[str]:
        """The kind of every epoch, in order."""
        return [p.kind for p in self.phases for _ in range(p.epochs)]

    def __str__(self) -> str:
        return ",".join(f"{p.kind}:{p.epochs}" for p in self.phases)

    def __repr__(self) -> str:
        return f"Schedule({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.phases == other.phases


def _split(n: int) -> tuple[int, int]:
    return n // 2, n - n // 2


def preset(name: str, epochs: int, hard_epochs: int | None = None) -> Schedule:
    """A named schedule over ``epochs`` epochs (see the module docstring)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ScheduleError(f"epochs must be a positive whole number, got {epochs!r}")
    if name == "soft-only":
        return Schedule([("soft", epochs)])
    if name == "hard-only":
        return Schedule([("hard", epochs)])
    m = re.fullmatch(r"alt-(soft|hard):(\d+)", name)
    if m:
        first, block = m.group(1), int(m.group(2))
        if block < 1:
            raise ScheduleError(f"{name!r}: the block length must be >= 1")
        other = "hard" if first == "soft" else "soft"
        phases, done = [], 0
        while done < epochs:
            n = min(block, epochs - done)
            phases.append((first if len(phases) % 2 == 0 else other, n))
            done += n
        return Schedule(phases)
    if name not in SPLITS:
        raise ScheduleError(f"unknown schedule preset {name!r}; presets: {', '.join(PRESETS)}")
    hard = epochs // 2 if hard_epochs is None else hard_epochs
    if isinstance(hard, bool) or not isinstance(hard, int) or not 1 <= hard < epochs:
        raise ScheduleError(f"hard epochs must be between 1 and epochs - 1 = {epochs - 1} for {name!r}, got {hard!r}")
    soft = epochs - hard
    if name == "hs":
        phases = [("hard", hard), ("soft", soft)]
    elif name == "sh":
        phases = [("soft", soft), ("hard", hard)]
    elif name == "shs":
        a, b = _split(soft)
        phases = [("soft", a), ("hard", hard), ("soft", b)]
    else:  # hsh
        a, b = _split(hard)
        phases = [("hard", a), ("soft", soft), ("hard", b)]
    return Schedule([p for p in phases if p[1] > 0])


def parse_schedule(spec: str | Sequence[Phase | tuple[str, int]] | Schedule, epochs: int | None = None,
                   hard_epochs: int | None = None) -> Schedule:
    """A :class:`Schedule` from a preset name, a ``kind:epochs,...`` string or a list of phases.

    Presets need ``epochs``; an explicit schedule must agree with ``epochs`` when both are given.
    Errors say where the string stops making sense.
    """
    if isinstance(spec, Schedule):
        sched = spec
    elif not isinstance(spec, str):
        sched = Schedule(spec)
    elif spec.strip() in PRESETS or spec.strip().startswith("alt-"):
        if epochs is None:
            raise ScheduleError(f"schedule={spec.strip()!r} needs epochs=N, the total number of epochs over its "
                                "phases (e.g. epochs=300)", "schedule", "epochs")
        return preset(spec.strip(), epochs, hard_epochs)
    else:
        sched = Schedule(_parse_phases(spec))
    if epochs is not None and epochs != sched.epochs:
        raise ScheduleError(f"the schedule {str(sched)!r} has {sched.epochs} epochs but epochs={epochs} was given")
    return sched


def _parse_phases(spec: str) -> list[Phase]:
    phases, pos = [], 0
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*:\s*(-?\d+)\s*", part)
        where = f"\n  {spec}\n  {' ' * pos}{'^' * max(1, len(part))}"
        if not m:
            raise ScheduleError(
                f"cannot parse schedule {spec!r} at character {pos}: expected "
                f"{' or '.join(repr(k + ':EPOCHS') for k in PHASE_KINDS)} "
                f"(or a preset: {', '.join(PRESETS)}){where}"
            )
        kind, n = m.group(1), int(m.group(2))
        if kind not in PHASE_KINDS:
            raise ScheduleError(f"unknown phase kind {kind!r} at character {pos} of {spec!r}; use "
                                f"{' or '.join(PHASE_KINDS)}{where}")
        if n < 1:
            raise ScheduleError(f"phase {part.strip()!r} at character {pos} of {spec!r} needs epochs >= 1{where}")
        phases.append(Phase(kind, n))
        pos += len(part) + 1
    return phases
