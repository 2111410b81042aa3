"""Exceptions raised by hald-store. Every message names the thing that is wrong."""


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
