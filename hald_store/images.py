"""Image folders and manifests.

An image folder is laid out like torchvision's ``ImageFolder``: one sub-folder per class,
class indices in sorted folder-name order. A :class:`Manifest` records, per image, its
relative path, class, byte size, modification time, content hash (BLAKE2b-128) and pixel
size; a store keeps it so that training can prove it reads the very files the labels were
computed on: :func:`check_image_root` compares sizes and modification times (one ``stat``
per file) and re-hashes only files whose time differs (or all, on request).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .distributed import DistContext, default_threads
from .errors import HaldStoreError, ImageError, ManifestMismatchError, StoreError, preview

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST_FORMAT = "hald-store-manifest-1"
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP")  # what every crop renderer (DALI, torchvision) decodes
DIGEST_SIZE = 16
# an empty, "." or ".." component, or a leading "/" (one path per line)
_UNSAFE_PATH = re.compile(r"(?:^|/)\.{0,2}(?:/|$)", re.MULTILINE)


@dataclass
class Manifest:
    """Column-wise description of the images a store was built from."""

    paths: list[str]  # relative to the image root, '/'-separated
    labels: np.ndarray  # (N,) int64 class index
    class_names: list[str]
    nbytes: np.ndarray  # (N,) int64 file size
    digests: np.ndarray  # (N, 16) uint8 BLAKE2b-128 of the file
    heights: np.ndarray  # (N,) int32
    widths: np.ndarray  # (N,) int32
    mtimes: np.ndarray | None = None  # (N,) int64 modification time in ns (None: unknown, older manifests)
    skipped: list[dict] = field(default_factory=list)  # [{'path': ..., 'error': ...}]
    inspected_here: int = field(default=0, compare=False)  # files this process read in its scan
    source: str = field(default="a manifest", compare=False)  # where it was read, for errors: "store '...'"

    def __post_init__(self) -> None:
        check_relative_paths(self.paths, self.source)

    def __len__(self) -> int:
        return len(self.paths)

    def images_per_class(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.class_names))

    def save(self, path: str | os.PathLike) -> None:
        """Write the manifest to ``path`` (``.npz``), atomically: what ``hald-store scan`` writes
        and ``build_store(manifest=...)`` reuses."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, format=MANIFEST_FORMAT, paths=np.array(self.paths, dtype=str), labels=self.labels,
                     class_names=np.array(self.class_names, dtype=str), nbytes=self.nbytes, digests=self.digests,
                     heights=self.heights, widths=self.widths, skipped=json.dumps(self.skipped),
                     **({} if self.mtimes is None else {"mtimes": self.mtimes}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Read a manifest written by :meth:`save`; the error names the file if it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != MANIFEST_FORMAT:
                    raise ValueError(f"format {str(z['format'])!r}")
                return cls(paths=[str(p) for p in z["paths"]], labels=z["labels"].astype(np.int64),
                           class_names=[str(c) for c in z["class_names"]], nbytes=z["nbytes"], digests=z["digests"],
                           heights=z["heights"], widths=z["widths"], skipped=json.loads(str(z["skipped"])),
                           mtimes=z["mtimes"].astype(np.int64) if "mtimes" in z.files else None,
                           source=f"manifest file {os.fspath(path)!r}")
        except (OSError, ValueError, KeyError) as e:
            raise ImageError(f"{os.fspath(path)!r} is not a manifest written by 'hald-store scan': {e}") from e

    def fingerprint(self) -> str:
        """One hash over paths, labels, sizes and content hashes (for settings checks)."""
        h = hashlib.blake2b(digest_size=16)
        h.update("\n".join(self.paths).encode())
        for arr in (self.labels.astype(np.int64), self.nbytes.astype(np.int64), self.digests):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def check_relative_paths(paths: Sequence[str], source: str) -> None:
    """Raise :class:`StoreError` naming ``source`` and the first bad entry unless every path is
    relative, '/'-separated and normalized (no empty, ``.`` or ``..`` component): what a store or
    manifest from elsewhere must hold before any file is opened."""
    if not paths:
        return
    joined = "\n".join(paths)
    hit = _UNSAFE_PATH.search(joined)
    if hit is not None:
        i = joined.count("\n", 0, hit.start())
    elif "\x00" in joined or joined.count("\n") != max(len(paths) - 1, 0):
        i = next(i for i, p in enumerate(paths) if "\n" in p or "\x00" in p)
    else:
        return
    raise StoreError(f"{source}: image path {i} ({paths[i][:200]!r}) is not a normalized relative path inside the "
                     "image folder (absolute, '..', '.' or empty part); the file was not opened and the store or "
                     "manifest cannot be used (rebuild it)")


def outside_class_folders(root: str | os.PathLike, paths: Sequence[str]) -> list[str]:
    """The paths (relative to ``root``) whose real location, links resolved, is not inside the real
    location of their class folder (their first part): a link into another class, or out of the
    image folder through a linked folder or file. A class folder itself may be a link anywhere."""
    real: dict[str, str] = {}

    def real_dir(d: str) -> str:
        if d not in real:
            real[d] = os.path.realpath(os.path.join(root, d))
        return real[d]

    bad = []
    for rel in paths:
        parent, _, name = rel.rpartition("/")
        full = os.path.join(real_dir(parent), name) if parent else ""
        if full and os.path.islink(full):
            full = os.path.realpath(full)
        if not full.startswith(real_dir(rel.partition("/")[0]) + os.sep):
            bad.append(rel)
    return bad


def _is_folder(d: Path) -> bool:
    """A directory that may hold images: not hidden, not a Zarr store (e.g. a store written inside
    the image folder)."""
    return d.is_dir() and not d.name.startswith(".") and not (d / "zarr.json").exists()


def _class_files(root: Path, name: str, label: int) -> list[tuple[str, int]]:
    """Images under class folder ``name`` (links followed); a link that loops or leads outside the
    class folder (into another class, or out of the image folder) is an error naming it."""
    top = (root / name).resolve()
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen or top not in (real, *real.parents):
            rel = Path(dirpath).relative_to(root).as_posix()
            raise ImageError(f"image folder {str(root)!r}: {rel!r} links to {str(real)!r}, which is a loop or lies "
                             f"outside class folder {name!r}; its images would be counted again under the wrong "
                             "class (remove the link)")
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if _is_folder(Path(dirpath, d)))
        for fname in sorted(filenames):
            if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                files.append((Path(dirpath, fname).relative_to(root).as_posix(), label))
    outside = outside_class_folders(root, [f for f, _ in files])
    if outside:
        raise ImageError(f"image folder {str(root)!r}: {preview(map(repr, outside))} link(s) to a file outside class "
                         f"folder {name!r}; an image in another class would carry two classes (copy it, or remove "
                         "the link)")
    return files


def _list_class_folders(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    if not root.exists():
        raise ImageError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ImageError(f"image folder {str(root)!r} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if _is_folder(d))
    real = sorted(((root / c).resolve().parts, c) for c in classes)
    for (a, name_a), (b, name_b) in zip(real, real[1:]):  # a folder's first descendant sorts right after it
        if b[: len(a)] == a:
            raise ImageError(f"image folder {str(root)!r}: class folders {name_a!r} and {name_b!r} are the same folder "
                             "or one lies inside the other (through a link); their images would carry two classes")
    if not classes:
        raise ImageError(
            f"image folder {str(root)!r} has no class sub-folders (expected ROOT/<class>/<image>)"
        )
    per_class = [_class_files(root, name, label) for label, name in enumerate(classes)]
    files = [f for group in per_class for f in group]
    if not files:
        raise ImageError(
            f"image folder {str(root)!r} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    empty = [name for name, group in zip(classes, per_class) if not group]
    if empty:
        raise ImageError(
            f"image folder {str(root)!r}: class folder(s) {preview(map(repr, empty))} hold no images with "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}; an empty folder would still take a class index (remove it, "
            "or add its images)"
        )
    return classes, files


def _read(path: Path) -> tuple[bytes, int]:
    """A file's bytes and modification time (ns) of the very file read."""
    with open(path, "rb") as f:
        return f.read(), os.fstat(f.fileno()).st_mtime_ns


def _inspect(path: Path) -> tuple[int, bytes, int, int, int]:
    """Read one file, hash it and fully decode it; returns (nbytes, digest, height, width, mtime)."""
    data, mtime = _read(path)
    digest = hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()
    with Image.open(io.BytesIO(data)) as img:
        if img.format not in DECODABLE_FORMATS:
            raise ValueError(f"it is a {img.format} file despite its name; the crop renderers decode only "
                             f"{', '.join(DECODABLE_FORMATS)} (convert it)")
        width, height = img.size
        img.load()  # a full decode catches truncated and corrupt files
    return len(data), digest, height, width, mtime


def _header(path: Path) -> tuple[int, bytes, int, int, int]:
    """Read one file's header only: (nbytes, zero digest, height, width, mtime)."""
    data, mtime = _read(path)
    height, width = image_size(np.frombuffer(data, dtype=np.uint8))
    return len(data), bytes(DIGEST_SIZE), height, width, mtime


def scan_image_folder(
    root: str | os.PathLike, *, skip_bad: bool = False, progress: bool = True, workers: int | None = None,
    verify: bool = True, ranks: DistContext | None = None,
) -> Manifest:
    """Scan ``root`` (``root/<class>/<image>``), hashing and decoding every image once.

    A corrupt or unreadable image raises :class:`ImageError` naming the file, unless
    ``skip_bad`` is set, in which case it is left out and listed in ``Manifest.skipped``.
    ``workers`` threads (default: this process's cores) share the files; under torchrun pass
    ``ranks`` (:func:`hald_store.distributed.context`) and each rank inspects ``1/world_size``
    of them, then the results are gathered, so every image is read once in total.
    ``verify=False`` reads only each file's header (sizes; ``digests`` are zero): enough to
    evaluate on a folder, much faster than hashing and decoding it.
    """
    root = Path(root)
    classes, files = _list_class_folders(root)
    ranks = ranks or DistContext()
    mine = range(ranks.rank, len(files), ranks.world_size)
    inspect = _inspect if verify else _header

    def work(i: int):
        try:
            return inspect(root / files[i][0])
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, ImageError) as e:
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(workers or default_threads()) as pool:
        local = list(tqdm(pool.map(work, mine), total=len(mine), desc="scan images", unit="img",
                          disable=not progress, leave=False))
    results: list = [None] * len(files)
    for rank, part in enumerate(ranks.gather(local)):
        results[rank :: ranks.world_size] = part

    keep, skipped = [], []
    for i, res in enumerate(results):
        if isinstance(res, str):
            path = str(root / files[i][0])
            if not skip_bad:
                raise ImageError(f"cannot read image {path!r}: {res} (pass skip_bad=True to skip it)", "skip_bad")
            skipped.append({"path": files[i][0], "error": res})
        else:
            keep.append(i)
    if not keep:
        raise ImageError(f"image folder {str(root)!r}: every image is unreadable")
    info = [results[i] for i in keep]
    return Manifest(
        paths=[files[i][0] for i in keep],
        labels=np.array([files[i][1] for i in keep], dtype=np.int64),
        class_names=classes,
        nbytes=np.array([r[0] for r in info], dtype=np.int64),
        digests=np.frombuffer(b"".join(r[1] for r in info), dtype=np.uint8).reshape(-1, DIGEST_SIZE).copy(),
        heights=np.array([r[2] for r in info], dtype=np.int32),
        widths=np.array([r[3] for r in info], dtype=np.int32),
        mtimes=np.array([r[4] for r in info], dtype=np.int64),
        skipped=skipped,
        inspected_here=len(mine),
        source=f"image folder {str(root)!r}",
    )


def check_image_root(manifest: Manifest, root: str | os.PathLike, *, check_hashes: bool = False,
                     rows: np.ndarray | None = None) -> None:
    """Raise :class:`ManifestMismatchError` naming the files unless ``root`` holds the manifest's
    (or its ``rows``: image indices, when given).

    One ``stat`` per file: sizes are compared, and so are modification times where the manifest
    has them; a file whose time differs (a copy, or a replaced file) is re-hashed and accepted
    only if its content is unchanged (its new time is then remembered). ``check_hashes``
    re-hashes every file (slower). Files without a recorded hash (``verify=False`` scans) that
    changed time count as changed.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestMismatchError(f"image root {str(root)!r} is not a directory")
    rows = np.arange(len(manifest)) if rows is None else np.asarray(rows, np.int64)
    paths = [manifest.paths[i] for i in rows]
    outside = outside_class_folders(root, paths)
    if outside:
        raise ManifestMismatchError(f"{manifest.source}: image path(s) {preview(map(repr, outside))} lead outside their "
                                    f"class folder in {str(root)!r} through a link; they were not opened")
    stats = np.full((len(rows), 2), -1, dtype=np.int64)  # size, mtime
    for k, rel in enumerate(paths):
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            continue
        stats[k] = st.st_size, st.st_mtime_ns
    missing = stats[:, 0] < 0
    changed = ~missing & (stats[:, 0] != manifest.nbytes[rows])
    rehash = ~missing & ~changed
    if not check_hashes:
        rehash &= np.zeros(len(rows), bool) if manifest.mtimes is None else stats[:, 1] != manifest.mtimes[rows]
    for k in np.flatnonzero(rehash):
        i = rows[k]
        digest = hashlib.blake2b((root / paths[k]).read_bytes(), digest_size=DIGEST_SIZE).digest()
        changed[k] = digest != manifest.digests[i].tobytes() or not manifest.digests[i].any()
    if manifest.mtimes is not None:
        verified = rehash & ~changed
        manifest.mtimes[rows[verified]] = stats[verified, 1]
    if missing.any() or changed.any():
        parts = [f"{int(mask.sum())} {label} ({preview(paths[k] for k in np.flatnonzero(mask))})"
                 for label, mask in (("missing", missing), ("changed", changed)) if mask.any()]
        raise ManifestMismatchError(
            f"image root {str(root)!r} does not match the images recorded in {manifest.source}: {'; '.join(parts)}"
            " (changed: other size, or other content; the labels would not match these pixels)"
        )


def class_names(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names of an image folder (no files are read)."""
    return _list_class_folders(Path(root))[0]


# ------------------------------------------------------------------------- headers
def as_encoded(sample: Any, index: int) -> np.ndarray:
    """One encoded file as a contiguous, 1-D uint8 array."""
    if isinstance(sample, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(sample, dtype=np.uint8)
    elif isinstance(sample, np.ndarray):
        arr = sample
    else:
        raise HaldStoreError(
            f"sample {index}: encoded image must be a 1-D uint8 numpy array (raw file bytes, "
            f"see read_files), got {type(sample).__name__}"
        )
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise HaldStoreError(
            f"sample {index}: encoded image must be a 1-D uint8 array of raw file bytes, got "
            f"dtype={arr.dtype} shape={arr.shape}; read files with hald_store.render.read_files"
        )
    if arr.size == 0:
        raise ImageError(f"sample {index}: encoded image is empty (0 bytes)")
    return np.ascontiguousarray(arr)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF0..SOF15 minus DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}


def _header_size(buf: memoryview) -> tuple[int, int] | None:
    """(height, width) from a PNG IHDR or a JPEG SOF header, or None if not found."""
    n = len(buf)
    if n >= 24 and bytes(buf[:8]) == _PNG_SIGNATURE and bytes(buf[12:16]) == b"IHDR":
        w = int.from_bytes(buf[16:20], "big")
        h = int.from_bytes(buf[20:24], "big")
        return (h, w) if h > 0 and w > 0 else None
    if n >= 4 and buf[0] == 0xFF and buf[1] == 0xD8:
        pos = 2
        while pos + 4 <= n:
            if buf[pos] != 0xFF:
                return None
            marker = buf[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _JPEG_STANDALONE:
                pos += 2
                continue
            if marker in (0xD9, 0xDA):  # EOI / SOS before any SOF
                return None
            seg_len = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            if marker in _JPEG_SOF:
                if pos + 9 > n:
                    return None
                h = int.from_bytes(buf[pos + 5 : pos + 7], "big")
                w = int.from_bytes(buf[pos + 7 : pos + 9], "big")
                return (h, w) if h > 0 and w > 0 else None
            if seg_len < 2:
                return None
            pos += 2 + seg_len
    return None


def image_size(encoded: np.ndarray | bytes, index: int = 0) -> tuple[int, int]:
    """(height, width) of an encoded image, read from its header without decoding pixels.

    PNG and JPEG headers are parsed directly; anything else goes through PIL. The size is
    that of the stored pixel grid (EXIF orientation is ignored, as the renderers do).
    Raises :class:`ImageError` naming ``index`` when the header cannot be read.
    """
    arr = as_encoded(encoded, index)
    size = _header_size(memoryview(arr))
    if size is not None:
        return size
    try:
        from PIL import Image

        with Image.open(io.BytesIO(arr.tobytes())) as im:
            w, h = im.size
    except Exception as exc:
        raise ImageError(
            f"sample {index}: not a readable image ({len(arr)} bytes): {exc}"
        ) from exc
    return int(h), int(w)
