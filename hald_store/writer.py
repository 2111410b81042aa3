"""The one store writer: lock, create or resume, write blocks, swap an overwrite in safely.

``build``, ``import``, ``convert`` and the scale benchmark share it, the way FFCV's
``DatasetWriter`` serves several sources; they differ only in where a block's labels come
from (a teacher over rendered crops, reference label files, another store, synthetic logits)::

    with StoreWriter(out, resume=resume, overwrite=overwrite) as writer:
        store = writer.open(manifest, crops, settings, chunk_images)
        for block in writer.todo():
            store.write_block(block, fields_of(block))

Under torchrun rank 0 holds the lock and creates (or checks) the store; every rank writes its
share of the unfinished blocks. Leaving the ``with`` normally, with every block written,
moves a staged store into place: an existing store at ``out`` survives until then.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from typing import Callable

import numpy as np

from .distributed import DistContext
from .errors import ManifestMismatchError, SettingsMismatchError, StoreError
from .images import Manifest
from .locations import filesystem, is_partial_store, is_remote, is_store, location_exists, remove_location
from .schema import StoreSettings
from .safety import output_lock, recover, sibling, swap_into_place
from .store import LabelStore

__all__ = ["StoreWriter", "BlockAssembler"]


def check_output(out: str, resume: bool, overwrite: bool, storage_options: dict | None, *,
                 resumable: bool = True) -> None:
    """Refuse, before any slow work, an existing output without ``resume``/``overwrite`` and an
    ``overwrite`` of something that is not a store."""
    if not location_exists(out, storage_options):
        return
    if not (resume or overwrite):
        how = ("pass resume=True to continue it or overwrite=True to replace it" if resumable
               else "pass overwrite=True to replace it")
        raise StoreError(f"output {out!r} already exists; {how}", "resume", "overwrite")
    fs, root = filesystem(out, storage_options)
    if overwrite and not (is_store(out, storage_options) or is_partial_store(out, storage_options)
                          or (fs.isdir(root) and not fs.ls(root))):
        raise StoreError(f"overwrite=True refuses to replace {out!r}: it is not a hald-store store", "overwrite")


def prepare_output(out: str, resume: bool, overwrite: bool, storage_options: dict | None, *,
                   stage: bool = False) -> tuple[str, bool]:
    """Where to write ``out`` and whether to resume there; call it with the output's lock held.

    A new store is created at ``out`` (with ``stage``, for writers that cannot resume, beside
    it). An ``overwrite`` of a local store is written beside it (``.hald-store-new-<name>``) and
    swapped in by :func:`finish_output` once complete, so the old store stays readable until
    then; ``resume`` continues such an interrupted overwrite (with or without ``overwrite``).
    Object stores cannot rename: there the old store is deleted first.
    """
    remote = is_remote(out)
    staging = sibling(out, "new")
    if not remote:
        recover(out, new_is_complete=is_store(staging) and LabelStore.open(staging, allow_incomplete=True).complete)
        if resume and is_store(staging):
            return staging, True
        shutil.rmtree(staging, ignore_errors=True)  # an overwrite killed during its creation
    check_output(out, resume, overwrite, storage_options, resumable=not stage)
    if not location_exists(out, storage_options):
        return (staging if stage and not remote else out), False
    if resume and not overwrite:
        if not is_store(out, storage_options):
            raise StoreError(f"cannot resume: {out!r} exists but is not a hald-store store")
        return out, True
    if remote:
        remove_location(out, storage_options)
        return out, False
    return staging, False


def finish_output(target: str, out: str) -> None:
    """Swap a complete overwrite (``target`` from :func:`prepare_output`) into place at ``out``."""
    if os.path.abspath(target) != os.path.abspath(out):
        swap_into_place(target, out)


class StoreWriter:
    """Write one store at ``out`` (a directory or an fsspec URL); see the module docstring.

    ``resumable=False`` (writers that cannot continue a killed run: ``import``, ``convert``)
    always writes beside ``out`` and swaps in the finished store. Errors that the constructor
    raises (``out`` exists without ``resume``/``overwrite``) come before any slow work.
    """

    def __init__(self, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 storage_options: dict | None = None, resumable: bool = True, ranks: DistContext | None = None) -> None:
        self.out = os.fspath(out)
        self.resume, self.overwrite, self.resumable = bool(resume), bool(overwrite), bool(resumable)
        self.storage_options = storage_options
        self.ranks = ranks or DistContext()
        check_output(self.out, self.resume, self.overwrite, storage_options, resumable=self.resumable)
        self._lock = ExitStack()
        self.target: str | None = None
        self.store: LabelStore | None = None

    def __enter__(self) -> "StoreWriter":
        self.ranks.on_main(lambda: self._lock.enter_context(output_lock(self.out)))
        return self

    def open(self, manifest: Manifest, crops: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
             settings: StoreSettings, chunk_images: int, *,
             batches: dict[str, np.ndarray] | None = None, source: str = "the images") -> LabelStore:
        """Create the store (see :meth:`LabelStore.create` for ``crops`` and ``batches``), or
        check the one being resumed against ``settings``; ``source`` names the images in errors."""
        self.target = self.ranks.on_main(
            lambda: self._open_or_create(manifest, crops, settings, chunk_images, batches, source))
        self.store = LabelStore.open(self.target, mode="r+", allow_incomplete=True,
                                     storage_options=self.storage_options)
        return self.store

    def todo(self) -> list[int]:
        """This rank's unfinished blocks."""
        done = self.store.block_done()
        return [b for b, d in enumerate(done) if not d][self.ranks.rank :: self.ranks.world_size]

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and self.ranks.is_main and not is_remote(self.out):
                # a half-made creation is never resumed, nor is a non-resumable writer's staged store
                staged = [sibling(self.out, "tmp"), sibling(sibling(self.out, "new"), "tmp")]
                for path in staged + ([] if self.resumable else [sibling(self.out, "new")]):
                    shutil.rmtree(path, ignore_errors=True)
            elif exc_type is None and self.store is not None:
                self.ranks.barrier()  # every rank's blocks are on disk
                if self.ranks.is_main and LabelStore.open(self.target, allow_incomplete=True,
                                                          storage_options=self.storage_options).complete:
                    finish_output(self.target, self.out)  # an overwrite replaces the old store only now
                self.ranks.barrier()
        finally:
            self._lock.close()

    def _open_or_create(self, manifest, crops, settings, chunk_images, batches, source) -> str:
        target, resuming = prepare_output(self.out, self.resume, self.overwrite, self.storage_options,
                                          stage=not self.resumable)
        if not resuming:
            LabelStore.create(target, manifest, crops, settings, chunk_images, batches=batches,
                              storage_options=self.storage_options)
            return target
        store = LabelStore.open(target, mode="r+", allow_incomplete=True, storage_options=self.storage_options)
        staged = "" if target == self.out else (f" (an interrupted overwrite=True of {self.out!r} left it; "
                                                "overwrite=True without resume=True starts that overwrite over)")
        if store.settings.manifest_blake2b != settings.manifest_blake2b:
            raise ManifestMismatchError(
                f"cannot resume {target!r}{staged}: {source} differ from the ones it was built from", "resume",
                "overwrite")
        try:
            store.check_settings(settings)
        except SettingsMismatchError as e:
            raise SettingsMismatchError(f"{e}{staged}", *e.options) from e
        return target


class BlockAssembler:
    """Encodes labels batch by batch into their blocks and writes each block once it is full,
    so a block is held encoded (bytes per crop), never as logits."""

    def __init__(self, store: LabelStore) -> None:
        self.store = store
        self._pending: dict[int, dict[str, np.ndarray]] = {}
        self._filled: dict[int, int] = {}

    def add(self, block: int, positions: np.ndarray, logits) -> int:
        """Encode ``logits`` (one row per crop) into ``block`` at flat ``positions``; returns the
        crops written (the block's size when this batch completes it, else 0)."""
        shape = self.store.block_shape(block)
        size = int(np.prod(shape))
        fields = self._pending.setdefault(block, {k: np.empty((size, *s), dtype)
                                                  for k, (dtype, s) in self.store.codec.fields().items()})
        for k, v in self.store.codec.encode(logits).items():
            fields[k][positions] = v
        self._filled[block] = self._filled.get(block, 0) + len(positions)
        if self._filled[block] < size:
            return 0
        del self._filled[block]
        self.store.write_block(block, {k: v.reshape(*shape, *v.shape[1:]) for k, v in self._pending.pop(block).items()})
        return size
