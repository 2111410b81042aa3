"""The label store: a Zarr v3 group that anyone with zarr alone can open and understand.

Layout (N images, S crops per image, chunks of ``chunk_images`` images)::

    zarr.json                 attributes under "hald_store" (format, version, settings)
    images/path    (N,)       str     relative path in the image folder
    images/label   (N,)       int32   hard label (class index)
    images/nbytes  (N,)       int64   file size in bytes
    images/blake2b (N, 16)    uint8   BLAKE2b-128 of the file
    images/mtime_ns (N,)      int64   modification time in ns (absent in older stores: unknown)
    images/height, images/width (N,) int32
    crops/box      (N, S, 4)  int32   (top, left, height, width) in image pixels
    crops/flip     (N, S)     bool    horizontal flip
    labels/<field> (N, S, ...)        the label codec's fields (indices, gaps/codes, scale)
    progress/block_done (B,)  uint8   1 once block b (images b*chunk .. (b+1)*chunk) is written

Label arrays are chunked ``(chunk_images, S, ...)`` and compressed with Blosc/zstd: one
chunk file per block, so a block is written by exactly one writer and a resumed build
redoes only blocks whose ``block_done`` marker is missing. With the ``"sharded"`` layout
(attribute ``layout``) the per-crop arrays (labels, boxes, flips) keep one file per block, a
Zarr v3 shard, made of one inner chunk per crop seed ``(chunk_images, 1, ...)``: an epoch, whose
images of a block share one crop seed (:func:`~hald_store.order.epoch_crop_seeds`), reads one
inner chunk per block and array (plus the shard's index) instead of the whole file.

Every chunk carries a CRC32C checksum (Zarr's ``crc32c`` codec) and is written even when it
holds only fill values, so a damaged or missing chunk is an error when read, never zeros. A
store counts as checksummed when its arrays' own metadata lists the codec, whatever its root
attributes say (stores made before checksums, without the codec, are still read).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.indexing import BasicIndexer, CoordinateIndexer, OrthogonalIndexer

from . import safety
from .codec import TopKLabels
from .errors import SettingsMismatchError, StoreError
from .images import Manifest, check_image_root
from .locations import ATTR_KEY, filesystem, is_remote, location_exists, open_group
from .order import epoch_crop_seeds
from .replay import BATCH_ARRAYS, batch_path
from .schema import NOT_SETTINGS, RenderSpec, StoreSettings

FORMAT_NAME = "hald-store"
FORMAT_VERSION = 2  # 2: the label codec is recorded as {"name", "configuration"}
READABLE_FORMAT_VERSIONS = (1, 2)
# Recorded by stores whose chunks all carry a checksum and are all written (fill values too).
INTEGRITY = {"checksum": "crc32c", "every_chunk_written": True}
# Attributes that describe the store but are not build settings (ignored by resume checks).
_NON_SETTINGS = (*NOT_SETTINGS, "library_version")
_WRITE_EMPTY = {"write_empty_chunks": True}  # a missing chunk then always means a lost one


def store_identity(settings: StoreSettings) -> str:
    """The content fingerprint of a store with these settings (which include the images' content
    hashes, the teacher's weights, the codec and the crop plan): written as the ``identity``
    attribute at creation, so every swap brings the new store's; readers and training checkpoints
    compare it to notice a store rebuilt differently under the same path."""
    d = {k: v for k, v in settings.to_dict().items() if k not in _NON_SETTINGS}
    return hashlib.blake2b(json.dumps(d, sort_keys=True).encode(), digest_size=16).hexdigest()


def default_compressor() -> BloscCodec:
    """Blosc/zstd level 5 with bit-shuffle: the compressor of every array in a store."""
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def default_codecs() -> list:
    """The bytes-to-bytes codecs of every array: Blosc/zstd, then a CRC32C checksum."""
    return [default_compressor(), Crc32cCodec()]


def settings_diff(stored: dict, requested: dict) -> list[str]:
    """Human-readable differences between two settings dicts (``key: stored -> requested``)."""
    keys = sorted((set(stored) | set(requested)) - set(_NON_SETTINGS))
    return [
        f"{k}: {stored.get(k)!r} -> {requested.get(k)!r}"
        for k in keys
        if stored.get(k) != requested.get(k)
    ]


class CheckedArray:
    """A store array whose reads fail with a :class:`StoreError` naming the store, the array, the
    chunk and its file when a chunk does not decode (checksum mismatch, truncated, empty) or,
    with ``require_chunks``, is missing. Everything else is the wrapped :class:`zarr.Array`."""

    def __init__(self, array: zarr.Array, store: "LabelStore", name: str, require_chunks: bool) -> None:
        self.zarr = array
        self.store = store
        self.name = name
        self.require_chunks = require_chunks

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.zarr, attr)

    def __getitem__(self, selection: Any) -> Any:
        return self._read(BasicIndexer, selection, self.zarr.__getitem__)

    def get_orthogonal_selection(self, selection: Any) -> Any:
        return self._read(OrthogonalIndexer, selection, self.zarr.get_orthogonal_selection)

    def get_coordinate_selection(self, selection: Any) -> Any:
        return self._read(CoordinateIndexer, selection, self.zarr.get_coordinate_selection)

    def __setitem__(self, selection: Any, value: Any) -> None:
        self.zarr[selection] = value

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Chunks (shards, for a sharded array) along each dimension: the files of the array."""
        return tuple(-(-n // c) for n, c in zip(self.zarr.shape, self.zarr.metadata.chunk_grid.chunk_shape))

    def chunk_key(self, coords: tuple[int, ...]) -> str:
        """The chunk's path relative to the store root, e.g. ``labels/indices/c/3/0/0``."""
        return f"{self.zarr.path}/{self.zarr.metadata.encode_chunk_key(coords)}"

    def chunk_exists(self, coords: tuple[int, ...]) -> bool:
        fs, root = filesystem(self.store.path, self.store.storage_options)
        return fs.exists(f"{root.rstrip('/')}/{self.chunk_key(coords)}")

    def _where(self, coords: tuple[int, ...]) -> str:
        return (f"store {self.store.path!r}: array {self.name!r} chunk {tuple(int(c) for c in coords)} "
                f"(file {self.chunk_key(coords)})")

    def missing_error(self, coords: tuple[int, ...]) -> StoreError:
        return StoreError(f"{self._where(coords)} is missing: the store is damaged (rebuild it, or restore it "
                          "from a copy); `hald-store verify STORE` lists every damaged chunk")

    def read_chunk(self, coords: tuple[int, ...]) -> np.ndarray:
        """The decoded chunk at grid position ``coords`` (its checksum checked)."""
        if self.require_chunks and not self.chunk_exists(coords):
            raise self.missing_error(coords)
        try:
            return self.zarr.blocks[tuple(coords)]
        except Exception as e:  # checksum, decompression and shape errors of all kinds
            raise StoreError(f"{self._where(coords)} is damaged: {type(e).__name__}: {e}; rebuild the store, or "
                             "restore it from a copy") from e

    def _touched(self, indexer: type, selection: Any) -> list[tuple[int, ...]]:
        sel = selection if isinstance(selection, tuple) else (selection,)
        try:
            return sorted({p.chunk_coords for p in indexer(sel, self.zarr.shape, self.zarr.metadata.chunk_grid)})
        except Exception:  # a selection the indexer does not take: assume every chunk
            return [tuple(c) for c in np.ndindex(*self.grid_shape)]

    def _read(self, indexer: type, selection: Any, read: Any) -> Any:
        coords = self._touched(indexer, selection)
        if self.require_chunks:
            for c in coords:
                if not self.chunk_exists(c):
                    raise self.missing_error(c)
        try:
            return read(selection)
        except Exception as e:
            for c in coords:  # name the damaged chunk
                self.read_chunk(c)
            raise StoreError(f"store {self.store.path!r}: reading array {self.name!r} failed: {e}") from e


class LabelStore:
    """Read (and, for the builder, write) a hald-store label store."""

    def __init__(self, group: zarr.Group, path: str, storage_options: dict | None = None) -> None:
        self.group = group
        self.path = path
        self.storage_options = storage_options
        self.attrs: dict[str, Any] = dict(group.attrs[ATTR_KEY])  # the raw JSON
        try:
            self.settings = StoreSettings.from_dict(self.attrs)
        except StoreError as e:
            raise StoreError(f"store {path!r}: {e}") from e
        self.codec = self.settings.codec
        self.crop_policy = self.settings.crop_policy
        self.identity: str = self.attrs.get("identity") or store_identity(self.settings)
        self._done_cache: np.ndarray | None = None
        self._identity_stamp: tuple[int, int, int] | None = None  # see check_identity
        self._arrays: dict[str, CheckedArray] = {}
        self._manifest: Manifest | None = None
        # every chunk carries a checksum and is written (older stores read the same, without these guarantees)
        self.checksums = self.attrs.get("integrity") == INTEGRITY or self._crc32c_codec()

    def _crc32c_codec(self) -> bool:
        """Whether the arrays' own metadata lists the crc32c codec (so deleting the ``integrity``
        attribute does not turn damaged chunks into zeros)."""
        for name in ("crops/box", "images/path"):
            try:
                return any(isinstance(c, Crc32cCodec) for c in self.group[name].metadata.codecs)
            except Exception:  # a missing array is reported by whoever reads it
                continue
        return False

    def array(self, name: str) -> CheckedArray:
        """The array ``name`` (e.g. ``"labels/indices"``), opened once and cached; its reads
        raise :class:`StoreError` naming any damaged or missing chunk."""
        if name not in self._arrays:
            try:
                arr = self.group[name]
            except KeyError as e:
                raise StoreError(f"store {self.path!r} has no array {name!r} (its {name}/zarr.json is missing): the "
                                 "store is damaged; rebuild it, or restore it from a copy") from e
            except Exception as e:
                raise StoreError(f"store {self.path!r}: cannot open array {name!r} ({name}/zarr.json): "
                                 f"{type(e).__name__}: {e}; the store is damaged") from e
            if not isinstance(arr, zarr.Array):
                raise StoreError(f"store {self.path!r}: {name!r} is not an array; the store is damaged")
            required = self.checksums and name != "progress/block_done"  # a missing marker means "not done"
            self._arrays[name] = CheckedArray(arr.with_config(_WRITE_EMPTY), self, name, required)
        return self._arrays[name]

    def array_names(self) -> list[str]:
        """Every array a store of this kind holds."""
        names = [f"images/{k}" for k in ("path", "label", "nbytes", "blake2b", "height", "width")]
        names += ["images/mtime_ns"] if "images/mtime_ns" in self.group else []
        names += ["crops/box", "crops/flip"] + [f"labels/{k}" for k in self.codec.fields()]
        if self.batch_mode:
            names += [batch_path(k) for k in BATCH_ARRAYS]
        return names + ["progress/block_done"]

    def block_of_chunk(self, name: str, coords: tuple[int, ...]) -> int | None:
        """The block whose writing fills chunk ``coords`` of array ``name`` (labels only; None for
        arrays written when the store is created)."""
        if not name.startswith("labels/"):
            return None
        return int(coords[1] if self.batch_mode else coords[0])

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, allow_incomplete: bool = False,
             storage_options: dict | None = None) -> "LabelStore":
        """Open a store (a local path or an fsspec URL such as ``s3://bucket/labels.zarr``);
        refuses unknown formats and versions, and incomplete builds unless allowed."""
        path = os.fspath(path)
        if not location_exists(path, storage_options):
            raise StoreError(f"store {path!r} does not exist")
        try:
            group = open_group(path, mode, storage_options)
        except Exception as e:
            raise StoreError(f"{path!r} is not a Zarr group: {e}") from e
        attrs = group.attrs.get(ATTR_KEY)
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{path!r} is a Zarr group but not a hald-store store (no '{ATTR_KEY}' attributes)")
        version = attrs.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise StoreError(
                f"store {path!r} has format version {version!r}; this hald-store reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))} (upgrade hald-store, or rebuild the store)"
            )
        store = cls(group, path, storage_options)
        if not allow_incomplete and not store.complete:
            done = int(store.block_done().sum())
            raise StoreError(
                f"store {path!r} is incomplete ({done} of {store.num_blocks} blocks written); "
                "finish it with `hald-store build ... --resume`"
            )
        return store

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        manifest: Manifest,
        crops: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
        settings: StoreSettings,
        chunk_images: int,
        batches: dict[str, np.ndarray] | None = None,
        storage_options: dict | None = None,
    ) -> "LabelStore":
        """Write a new, empty store (manifest, crop boxes, attributes) atomically at ``path``.

        ``crops(start, stop)`` gives the boxes ``(stop - start, S, 4)`` and flips of images
        ``start .. stop - 1``; it is called one chunk of images at a time, so a store of any
        size is planned in bounded memory.

        Everything is written into a sibling directory ``.hald-store-tmp-<name>`` that is renamed
        into place at the end, so a killed creation never leaves a half-made store at ``path``
        (the next writer removes the leftover). Object stores
        cannot rename: there the attributes are written last, so an interrupted creation is
        not a valid store (``--overwrite`` replaces it). With
        ``batches`` (a :meth:`~hald_store.batch_plan.BatchPlan.arrays` dict) the store holds
        batch-specific labels: they are written one labelling epoch (crop seed) at a time.
        """
        path = os.fspath(path)
        n, s, codec = len(manifest), settings.crops_per_image, settings.codec
        remote = is_remote(path)
        if remote:
            tmp = path
        else:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            tmp = safety.sibling(path, "tmp")  # fixed name: the next writer removes a killed creation's
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        try:
            g = open_group(tmp, "w", storage_options)

            def put(name: str, data: np.ndarray, chunks: tuple[int, ...], dtype: Any = None) -> None:
                arr = g.create_array(name, shape=data.shape, dtype=dtype or data.dtype, chunks=chunks,
                                     compressors=default_codecs(), config=_WRITE_EMPTY)
                arr[...] = data

            def per_crop(name: str, dtype: Any, tail: tuple[int, ...], seeds: int, **kw: Any) -> zarr.Array:
                """A (N, S, *tail) array: one chunk of ``seeds`` crop seeds per block, or a shard per block."""
                grid = dict(chunks=(ci, 1, *tail), shards=(ci, s, *tail)) if sharded else dict(chunks=(ci, seeds, *tail))
                return g.create_array(name, shape=(n, s, *tail), dtype=dtype, compressors=default_codecs(),
                                      config=_WRITE_EMPTY, **grid, **kw)

            ci = min(chunk_images, n)
            sharded = settings.layout == "sharded"
            if sharded and batches is not None:
                raise StoreError("the sharded layout is for per-crop labels; batch-specific labels are already "
                                 "chunked by crop seed")
            put("images/path", np.array(manifest.paths, dtype=object), (ci,), dtype=str)
            put("images/label", manifest.labels.astype(np.int32), (ci,))
            put("images/nbytes", manifest.nbytes.astype(np.int64), (ci,))
            put("images/blake2b", manifest.digests, (ci, manifest.digests.shape[1]))
            put("images/height", manifest.heights.astype(np.int32), (ci,))
            put("images/width", manifest.widths.astype(np.int32), (ci,))
            if manifest.mtimes is not None:
                put("images/mtime_ns", manifest.mtimes.astype(np.int64), (ci,))
            box, flip = per_crop("crops/box", np.int32, (4,), s), per_crop("crops/flip", bool, (), s)
            for start in range(0, n, ci):
                stop = min(start + ci, n)
                box[start:stop], flip[start:stop] = crops(start, stop)
            label_seeds = s if batches is None else 1  # crop seeds per label chunk
            for name, (dtype, shape) in codec.fields().items():
                per_crop(f"labels/{name}", dtype, tuple(shape), label_seeds, fill_value=0)
            for name, data in (batches or {}).items():
                put(batch_path(name), data, (1, *data.shape[1:]))
            blocks = math.ceil(n / ci) if batches is None else s
            g.create_array("progress/block_done", shape=(blocks,), dtype=np.uint8, chunks=(1,),
                           fill_value=0, compressors=[Crc32cCodec()])
            g.attrs[ATTR_KEY] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **settings.to_dict(),
                                 "integrity": INTEGRITY, "identity": store_identity(settings)}
            if not remote:
                os.rename(tmp, path)
        except BaseException:
            if not remote:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path, mode="r+", allow_incomplete=True, storage_options=storage_options)

    # -------------------------------------------------------------- properties
    @property
    def render_spec(self) -> RenderSpec:
        """How the crops were rendered; ``render.renderer_for(store.render_spec)`` reproduces them."""
        return self.settings.render_spec

    @property
    def num_images(self) -> int:
        return self.settings.num_images

    @property
    def crops_per_image(self) -> int:
        return self.settings.crops_per_image

    @property
    def num_crops(self) -> int:
        return self.num_images * self.crops_per_image

    @property
    def num_classes(self) -> int:
        return self.settings.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.settings.class_names)

    @property
    def temperature(self) -> float:
        return float(self.codec.temperature)

    @property
    def chunk_images(self) -> int:
        return int(self.array("crops/box").metadata.chunk_grid.chunk_shape[0])

    @property
    def layout(self) -> str:
        """``"block"`` or ``"sharded"`` (see the module docstring)."""
        return self.settings.layout

    def epoch_crop_seeds(self, epoch: int, seed: int = 0) -> np.ndarray:
        """The crop seed each image uses in ``epoch`` (:func:`~hald_store.order.epoch_crop_seeds`;
        a sharded store's blocks share one)."""
        blk = self.chunk_images if self.layout == "sharded" else 1
        return epoch_crop_seeds(self.num_images, self.crops_per_image, epoch, seed, blk)

    @property
    def num_blocks(self) -> int:
        return int(self.array("progress/block_done").shape[0])

    @property
    def batch_mode(self) -> bool:
        """True for batch-specific labels (written and replayed by labelling batch)."""
        return self.settings.labelling is not None

    def batches(self, epoch: int) -> dict[str, np.ndarray]:
        """The recorded labelling batches of crop seed ``epoch``: ``members``, ``perm``
        ((batches, batch_size), -1 padded), ``lam`` (batches,), ``box`` (batches, 4)."""
        if not self.batch_mode:
            raise StoreError(f"store {self.path!r} has per-crop labels, not recorded labelling batches")
        return {k: self.array(batch_path(k))[epoch] for k in BATCH_ARRAYS}

    def block_range(self, block: int) -> tuple[int, int]:
        """Image index range ``[start, stop)`` of a block (per-crop stores)."""
        start = block * self.chunk_images
        return start, min(start + self.chunk_images, self.num_images)

    def block_done(self) -> np.ndarray:
        """Boolean array: which blocks are fully written."""
        if self._done_cache is None or not self._done_cache.all():
            self._done_cache = self.array("progress/block_done")[:].astype(bool)
        return self._done_cache

    @property
    def complete(self) -> bool:
        return bool(self.block_done().all())

    def check_settings(self, requested: StoreSettings) -> None:
        """Raise :class:`SettingsMismatchError` listing every setting that differs."""
        diff = settings_diff(self.settings.to_dict(), requested.to_dict())
        if diff:
            raise SettingsMismatchError(
                f"store {self.path!r} was built with different settings:\n  " + "\n  ".join(diff)
                + "\nuse the original settings with resume=True, or overwrite=True to rebuild", "resume", "overwrite"
            )

    # ---------------------------------------------------------------- manifest
    def check_classes(self, name: str, values: np.ndarray) -> np.ndarray:
        """``values`` (class indices read from array ``name``), or a :class:`StoreError` naming the
        store and the array when one lies outside ``[0, num_classes)``."""
        if values.size and (int(values.min()) < 0 or int(values.max()) >= self.num_classes):
            bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
            raise StoreError(f"store {self.path!r}: array {name!r} holds class index {bad}, outside [0, "
                             f"{self.num_classes}) of this store: the store is damaged; rebuild it, or restore it "
                             "from a copy")
        return values

    def manifest(self) -> Manifest:
        """The images the store was built from (read once, then cached)."""
        if self._manifest is None:
            a = self.array
            self._manifest = Manifest(
                paths=[str(p) for p in a("images/path")[:]],
                labels=self.check_classes("images/label", a("images/label")[:].astype(np.int64)),
                class_names=self.class_names,
                nbytes=a("images/nbytes")[:],
                digests=a("images/blake2b")[:],
                heights=a("images/height")[:],
                widths=a("images/width")[:],
                mtimes=a("images/mtime_ns")[:] if "images/mtime_ns" in self.group else None,
                skipped=[dict(s) for s in self.settings.skipped],
                source=f"store {self.path!r}",
            )
        return self._manifest

    def hard_labels(self) -> np.ndarray:
        """(N,) int64 class index per image."""
        return self.manifest().labels.copy()

    def check_images(self, root: str | os.PathLike, *, check_hashes: bool = False) -> None:
        """Raise :class:`~hald_store.errors.ManifestMismatchError` unless ``root`` matches the manifest."""
        check_image_root(self.manifest(), root, check_hashes=check_hashes)

    # -------------------------------------------------------------- label I/O
    def _coords(self, images, seeds) -> tuple[np.ndarray, np.ndarray]:
        images, seeds = np.broadcast_arrays(np.asarray(images, dtype=np.int64), np.asarray(seeds, dtype=np.int64))
        images, seeds = images.ravel(), seeds.ravel()
        if images.size and (images.min() < 0 or images.max() >= self.num_images):
            raise IndexError(f"image index out of range [0, {self.num_images})")
        if seeds.size and (seeds.min() < 0 or seeds.max() >= self.crops_per_image):
            raise IndexError(f"crop seed out of range [0, {self.crops_per_image})")
        return images, seeds

    def _gather(self, name: str, images: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Values of array ``name`` at ``(images[i], seeds[i])``: one coordinate selection, so the
        chunks touched are fetched concurrently and, in a sharded store, only the inner chunks
        of those crop seeds."""
        arr = self.array(name)
        tail = arr.shape[2:]
        sel = [images.reshape(-1, *[1] * len(tail)), seeds.reshape(-1, *[1] * len(tail))]
        sel += [np.arange(k).reshape(k, *[1] * (len(tail) - 1 - j)) for j, k in enumerate(tail)]
        return arr.get_coordinate_selection(tuple(sel))

    def read_fields(self, images, seeds) -> dict[str, np.ndarray]:
        """Raw codec fields for crops ``(images[i], seeds[i])``."""
        images, seeds = self._coords(images, seeds)
        fields = {name: self._gather(f"labels/{name}", images, seeds) for name in self.codec.fields()}
        self.check_classes("labels/indices", fields["indices"])
        return fields

    def read(self, images, seeds) -> TopKLabels:
        """Decoded top-k labels for crops ``(images[i], seeds[i])``."""
        return self.codec.decode(self.read_fields(images, seeds))

    def soft_labels(self, images, seeds, temperature: float | None = None) -> torch.Tensor:
        """Dense (n, C) probabilities at ``temperature`` (the build temperature by default)."""
        return self.read(images, seeds).probs(self.temperature if temperature is None else temperature)

    def boxes(self, images, seeds) -> tuple[np.ndarray, np.ndarray]:
        """Stored crop windows (n, 4) int32 ``(top, left, height, width)`` and flips (n,) bool."""
        images, seeds = self._coords(images, seeds)
        return self._gather("crops/box", images, seeds), self._gather("crops/flip", images, seeds)

    def check_identity(self) -> None:
        """Raise :class:`StoreError` if the store at this path is no longer the one opened (rebuilt or
        converted with other settings or images, or removed): its labels would not match. A local
        store whose metadata file is the same file, of the same size and time, as at the last
        check that passed (and older than 2 s then) is not read again (a loader checks every epoch:
        reading took 1 ms). The stamp is taken before the read: a file replaced since is read next time."""
        stamp = self._metadata_stamp()
        if stamp is not None and stamp == self._identity_stamp:
            return
        try:
            now = LabelStore(open_group(self.path, "r", self.storage_options), self.path, self.storage_options).identity
        except Exception as e:  # gone, mid-swap, or no longer a store
            now = f"unreadable ({type(e).__name__})"
        if now != self.identity:
            raise StoreError(f"store {self.path!r} was replaced while in use (identity {self.identity} is now {now}): "
                             "the labels read so far belong to the old store; restart with the new one")
        if stamp is not None and time.time_ns() - stamp[2] > 2 * 10**9:  # file times are coarse: a file
            self._identity_stamp = stamp  # written in the last 2 s may change again keeping its time (as git's "racy clean")

    def _metadata_stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, modification time in ns) of a local store's ``zarr.json``; None if remote or unreadable."""
        if is_remote(self.path):
            return None
        try:
            st = os.stat(os.path.join(self.path, "zarr.json"))
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read_one_crop_per_image(self, seeds, images=None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Codec fields, boxes and flips of crop ``seeds[i]`` of every image ``i`` (rows of images
        outside ``images``, when given, are left zero), reading each block that holds one of those
        images once, and of it only the crop seeds from the smallest to the largest used there
        (one inner chunk per block of a sharded store): how a loader fetches an epoch. The
        store's identity is checked before and after (:meth:`check_identity`)."""
        self.check_identity()
        try:
            out = self._read_one_crop_per_image(seeds, images)
        except StoreError:
            self.check_identity()  # a store swapped under the read looks damaged: say what happened
            raise
        self.check_identity()
        return out

    def _read_one_crop_per_image(self, seeds, images) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        seeds = np.asarray(seeds, dtype=np.int64)
        if seeds.shape != (self.num_images,):
            raise ValueError(f"need one crop seed per image ({self.num_images}), got shape {seeds.shape}")
        self._coords(np.arange(self.num_images), seeds)
        images = np.arange(self.num_images) if images is None else np.unique(self._coords(images, 0)[0])
        names = [f"labels/{f}" for f in self.codec.fields()] + ["crops/box", "crops/flip"]
        out = {name: np.zeros((self.num_images, *self.array(name).shape[2:]), self.array(name).dtype) for name in names}
        for block in np.unique(images // self.chunk_images):
            start, stop = self.block_range(int(block))
            ids = images[slice(*np.searchsorted(images, [start, stop]))]
            lo, hi = int(seeds[ids].min()), int(seeds[ids].max()) + 1
            for name in names:
                out[name][ids] = self.array(name)[start:stop, lo:hi][ids - start, seeds[ids] - lo]
        fields = {f: out[f"labels/{f}"] for f in self.codec.fields()}
        self.check_classes("labels/indices", fields["indices"])
        return fields, out["crops/box"], out["crops/flip"]

    def block_shape(self, block: int) -> tuple[int, ...]:
        """Leading shape of a block's label arrays: (images in block, S), or (N,) in batch mode."""
        if self.batch_mode:
            return (self.num_images,)
        start, stop = self.block_range(block)
        return (stop - start, self.crops_per_image)

    def write_block(self, block: int, fields: dict[str, np.ndarray]) -> None:
        """Write the labels of one block, then mark it done. A block is a range of images
        (arrays shaped (images in block, S, ...)) or, in batch mode, one crop seed of every
        image (arrays shaped (N, ...))."""
        for name in self.codec.fields():
            if self.batch_mode:
                self.array(f"labels/{name}")[:, block] = fields[name]
            else:
                start, stop = self.block_range(block)
                self.array(f"labels/{name}")[start:stop] = fields[name]
        self.array("progress/block_done")[block] = 1
        self._done_cache = None

    def reopen_blocks(self, blocks: Sequence[int]) -> None:
        """Mark ``blocks`` unfinished: a resumed build writes them again (see ``verify --repair``)."""
        for block in blocks:
            self.array("progress/block_done")[int(block)] = 0
        self._done_cache = None

    def expected_chunks(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """``(array, chunk coordinates)`` of every chunk that must exist: all chunks of arrays
        written at creation and the label chunks of blocks marked done (markers excluded)."""
        done = self.block_done()
        for name in self.array_names()[:-1]:
            for coords in np.ndindex(*self.array(name).grid_shape):
                block = self.block_of_chunk(name, coords)
                if block is None or done[block]:
                    yield name, coords

    def missing_chunks(self) -> list[str]:
        """Chunk files (keys) that should exist but do not; found by listing, nothing is read."""
        fs, root = filesystem(self.path, self.storage_options)
        root = root.rstrip("/")
        present: dict[str, set[str]] = {}
        for name in self.array_names()[:-1]:
            prefix = f"{root}/{name}/"
            present[name] = {p[len(root) + 1 :] for p in fs.find(prefix)} if fs.exists(prefix) else set()
        return [key for name, coords in self.expected_chunks()
                if (key := self.array(name).chunk_key(coords)) not in present[name]]

    # -------------------------------------------------------------------- size
    def bytes_on_disk(self, prefix: str = "") -> int:
        """Bytes of all files (objects) under the store, or under ``prefix`` (e.g. ``'labels'``)."""
        fs, root = filesystem(self.path, self.storage_options)
        root = f"{root.rstrip('/')}/{prefix}" if prefix else root
        return int(fs.du(root)) if fs.exists(root) else 0

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (what ``hald-store info --json`` prints)."""
        total = self.bytes_on_disk()
        label_bytes = self.bytes_on_disk("labels")
        done = self.block_done()
        missing = self.missing_chunks() if self.checksums else []
        return {
            "path": self.path,
            "format_version": self.attrs["format_version"],
            "complete": bool(done.all()) and not missing,
            "checksums": self.checksums,
            "missing_chunks": len(missing),
            "blocks_done": int(done.sum()),
            "num_blocks": self.num_blocks,
            "layout": self.layout,
            "num_images": self.num_images,
            "crops_per_image": self.crops_per_image,
            "num_crops": self.num_crops,
            "num_classes": self.num_classes,
            "top_k": self.codec.top_k,
            "values": self.codec.values,
            "temperature": self.temperature,
            "teacher": self.settings.teacher.to_dict(),
            "input_size": self.render_spec.size,
            "backend": self.render_spec.backend,
            "seed": self.settings.plan_seed,
            "bytes_on_disk": total,
            "bytes_per_crop": total / max(self.num_crops, 1),
            "label_bytes_on_disk": label_bytes,
            "label_bytes_per_crop": label_bytes / max(self.num_crops, 1),
            "raw_label_bytes_per_crop": self.codec.bytes_per_crop(),
            "reference_fp16_bytes_per_crop": 2 * self.num_classes,
            "skipped_images": len(self.settings.skipped),
        }
