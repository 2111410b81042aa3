"""Store locations: local paths and fsspec URLs, whether something (or a store) is there."""

from __future__ import annotations

import os

import fsspec
import zarr

from .errors import StoreError

__all__ = ["ATTR_KEY", "is_remote", "filesystem", "location_exists", "remove_location", "open_group", "is_store",
           "is_partial_store", "same_location"]

ATTR_KEY = "hald_store"  # the root attribute that makes a Zarr group a hald-store store


def is_remote(path: str | os.PathLike) -> bool:
    """True for an fsspec URL such as ``s3://bucket/labels.zarr`` (False for local paths)."""
    return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def filesystem(path: str | os.PathLike, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and root of a local path or URL (credentials and endpoints come
    from ``storage_options`` or the usual environment, e.g. ``FSSPEC_S3_ENDPOINT_URL``)."""
    try:
        return fsspec.core.url_to_fs(os.fspath(path), **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise StoreError(f"cannot use store location {os.fspath(path)!r}: {e}") from e


def location_exists(path: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """Whether anything is at ``path``; an unreachable remote store is a clear :class:`StoreError`."""
    fs, root = filesystem(path, storage_options)
    try:
        return fs.exists(root)
    except Exception as e:  # network and credential errors, after the client's own retries
        raise StoreError(f"cannot reach store location {os.fspath(path)!r}: {type(e).__name__}: {e}") from e


def remove_location(path: str | os.PathLike, storage_options: dict | None = None) -> None:
    fs, root = filesystem(path, storage_options)
    fs.rm(root, recursive=True)


def open_group(path: str, mode: str, storage_options: dict | None) -> zarr.Group:
    if is_remote(path):
        return zarr.open_group(path, mode=mode, storage_options=storage_options or {})
    return zarr.open_group(path, mode=mode)


def is_store(path: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True when ``path`` holds a hald-store group."""
    try:
        return ATTR_KEY in open_group(os.fspath(path), "r", storage_options).attrs
    except Exception:  # zarr raises several types for "not a group"
        return False


def is_partial_store(path: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True for a remote store whose creation was interrupted (arrays, but no attributes yet)."""
    try:
        group = open_group(os.fspath(path), "r", storage_options)
        return ATTR_KEY not in group.attrs and "images" in group
    except Exception:
        return False


def same_location(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two store locations are the same, or one lies inside the other."""
    a, b = (os.fspath(p).rstrip("/") if is_remote(p) else os.path.realpath(p) for p in (a, b))
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")
