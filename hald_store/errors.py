"""Exceptions raised by hald-store. Every message names the thing that is wrong."""

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


class LockError(HaldStoreError):
    """Another process is writing the same store or run directory."""


def check_positive_finite(name: str, value: float | None) -> None:
    """Raise :class:`OptionError` unless ``value`` (the parameter ``name``) is None or a finite number > 0."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise OptionError(f"{name} must be a finite number > 0, got {value}", name)


def check_at_least(name: str, value: int | float | None, low: int | float) -> None:
    """Raise :class:`OptionError` unless ``value`` (the parameter ``name``) is None or ``>= low``."""
    if value is not None and not value >= low:
        raise OptionError(f"{name} must be >= {low}, got {value}", name)


def preview(items: Iterable[Any], limit: int = 5) -> str:
    """The first ``limit`` items for a message: ``"a, b, c and 4 more"``."""
    items = [str(i) for i in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
