"""Exceptions raised by hald-store. Every message names the thing that is wrong."""

import math


class HaldStoreError(Exception):
    """Base class for all hald-store errors (the CLI prints these without a traceback)."""


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
    """Raise :class:`HaldStoreError` unless ``value`` (the flag or parameter ``name``) is a finite number > 0."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise HaldStoreError(f"{name} must be a finite number > 0, got {value}")
