"""Exceptions raised by hald-store. Every message names the thing that is wrong."""

import errno
import math
from typing import Any, Iterable


class HaldStoreError(Exception):
    """Base class for all hald-store errors (the CLI prints these without a traceback).

    ``options`` are the parameter names the message mentions, as ``name`` or ``name=value``;
    the CLIs show them as flags (``--name value``)."""

    def __init__(self, message: str = "", *options: str) -> None:
        super().__init__(message)
        self.options = options


class OptionError(HaldStoreError):
    """A parameter has a bad value, or parameters contradict each other."""


class ImageError(HaldStoreError):
    """An image folder or image file is missing, empty, unreadable or corrupt."""


class ModelError(HaldStoreError):
    """A model name cannot be resolved or a checkpoint does not fit the model."""


class StoreError(HaldStoreError):
    """A store is missing, of an unknown format, incomplete or inconsistent."""


class SettingsMismatchError(StoreError):
    """A store exists with different build settings than the ones requested."""


class ManifestMismatchError(StoreError):
    """An image folder does not match the manifest recorded in a store."""


class TeacherOutputError(HaldStoreError):
    """The teacher produced NaN/Inf or an output of the wrong width."""


class TrainingDivergedError(HaldStoreError):
    """A training loss became NaN or infinite."""


class LockError(HaldStoreError):
    """Another process is writing the same store or run directory."""


class EnvironmentFailure(HaldStoreError):
    """The machine failed an operation: disk full, read-only file system, too many open files, out of memory."""


_ENVIRONMENT = {
    errno.ENOSPC: "no space left on the device of {path}: free space there or write to another disk",
    errno.EDQUOT: "disk quota exceeded writing {path}: free space there or write to another disk",
    errno.EROFS: "{path} is on a read-only file system: write to a writable location",
    errno.EMFILE: "too many open files (at {path}): raise the limit (ulimit -n) or use fewer workers",
    errno.ENFILE: "the system ran out of open files (at {path}): close other programs or use fewer workers",
}


def environment_failure(exc: BaseException, path: str | None = None) -> EnvironmentFailure | None:
    """A one-line :class:`EnvironmentFailure` for a full disk, read-only file system, too many
    open files or ``MemoryError`` (``path``: what was being written when the error names no file);
    None for any other exception."""
    if isinstance(exc, MemoryError):
        return EnvironmentFailure(f"out of memory{f' writing {path}' if path else ''}: lower batch_size or workers, "
                                  "or run where more memory is free; finished work is kept", "batch_size", "workers")
    template = _ENVIRONMENT.get(getattr(exc, "errno", None)) if isinstance(exc, OSError) else None
    if template is None:
        return None
    where = exc.filename or exc.filename2 or path or "the output"
    return EnvironmentFailure(template.format(path=repr(str(where))) + "; finished work is kept", "workers")


def check_positive_finite(name: str, value: float | None) -> None:
    """Raise :class:`OptionError` unless ``value`` (the parameter ``name``) is None or a finite number > 0."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise OptionError(f"{name} must be a finite number > 0, got {value}", name)


def check_at_least(name: str, value: int | float | None, low: int | float) -> None:
    """Raise :class:`OptionError` unless ``value`` (the parameter ``name``) is None or a finite ``>= low``."""
    if value is not None and not (value >= low and math.isfinite(value)):
        kind = "a finite number " if isinstance(value, float) else ""
        raise OptionError(f"{name} must be {kind}>= {low}, got {value}", name)


def check_in_range(name: str, value: float | None, low: float, high: float, high_open: bool = True) -> None:
    """Raise :class:`OptionError` unless ``value`` (the parameter ``name``) is None or in
    ``[low, high)`` (``[low, high]`` with ``high_open=False``); NaN is never in range."""
    if value is not None and not (low <= value < high if high_open else low <= value <= high):
        raise OptionError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}", name)


SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence both take it


def check_seed(name: str, value: int | None) -> None:
    """Raise :class:`OptionError` unless ``value`` (the parameter ``name``) is None or a whole number in [0, 2**63 - 1]."""
    if value is not None and not (isinstance(value, int) and 0 <= value <= SEED_MAX):
        raise OptionError(f"{name} must be a whole number from 0 to 2**63 - 1, got {value}", name)


def preview(items: Iterable[Any], limit: int = 5) -> str:
    """The first ``limit`` items for a message: ``"a, b, c and 4 more"``."""
    items = [str(i) for i in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
