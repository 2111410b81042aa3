"""Rendering and loading options, declared once (importable without torch, so the CLIs read
their defaults and choices from here): :class:`RenderOptions` are how this machine renders
crops (the build and every loader), :class:`LoaderOptions` add how a loader samples and
delivers them. What a store records about its pixels is the :class:`~hald_store.schema.RenderSpec`."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

__all__ = ["BACKENDS", "RenderOptions", "LoaderOptions"]

BACKENDS = ("dali", "pillow", "torchvision")  # renderer backends; "auto" picks one (see hald_store.render.make_renderer)
_NOT_LOADING = ("backend", "device", "check_hashes")  # they make the renderer and check the images


@dataclass(frozen=True)
class RenderOptions:
    """How crops are rendered here (none of these change the pixels).

    ``backend``: ``"auto"`` (a store's recorded backend, else DALI where importable), ``"dali"``,
    ``"pillow"`` or ``"torchvision"``; ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or a torch
    device); ``workers``: rendering threads (DALI, pillow) or processes (torchvision), None for this
    process's cores; ``cache_decoded``: keep decoded images in memory (``"auto"``: small ones,
    see :func:`hald_store.stream.cache_decoded_default`)."""

    backend: str = "auto"
    device: Any = "auto"
    workers: int | None = None
    cache_decoded: bool | str = "auto"


@dataclass(frozen=True)
class LoaderOptions(RenderOptions):
    """A loader's options (see :class:`~hald_store.loader.CropLoader`): the rendering ones, then
    ``batch_size``, sampling (``shuffle``, ``seed`` -- None: the loader's default, 0, or a store's
    plan seed for fresh crops --, ``drop_last``, ``rank``, ``world_size``), ``prefetch`` batches
    rendered ahead, ``cache_crops`` and ``check_hashes`` (re-hash every image file at start)."""

    batch_size: int = 256
    shuffle: bool = True
    seed: int | None = None
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    prefetch: int = 2
    cache_crops: bool | str = "auto"
    check_hashes: bool = False

    @classmethod
    def of(cls, options: "LoaderOptions | None", keywords: Mapping[str, Any]) -> tuple["LoaderOptions", dict]:
        """``options`` (the defaults when None) with the ``keywords`` that name its fields
        replaced, and the other keywords (a loader passes them to its renderer)."""
        names = {f.name for f in fields(cls)}
        chosen = {k: v for k, v in keywords.items() if k in names}
        return replace(options or cls(), **chosen), {k: v for k, v in keywords.items() if k not in names}

    def loading(self, seed: int) -> dict[str, Any]:
        """The :class:`~hald_store.loader.CropLoader` keywords (every field but those that make
        the renderer or check the images), with ``seed`` where :attr:`seed` is None."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_LOADING}
        return {**out, "seed": seed if self.seed is None else self.seed}
