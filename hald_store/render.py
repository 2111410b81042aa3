"""Crop renderers: decode exactly a stored integer window, resize, flip, normalize.

A store keeps, per image and crop, an integer box ``(top, left, height, width)`` in pixels
of the full (raw, not EXIF-rotated) image and a horizontal-flip bit. At training time a
renderer turns the encoded image files plus those boxes back into network inputs:

1. decode exactly the window ``image[top:top + height, left:left + width]`` as RGB
   (grayscale is replicated, alpha is dropped, palettes are expanded),
2. resize the window to ``(size, size)`` (bilinear with antialiasing by default),
3. mirror it horizontally where the flip bit is set (the mirror of the cropped window),
4. normalize to ``(pixel / 255 - mean) / std`` per RGB channel, float32, NCHW.

Three backends implement the same contract:

* :class:`DaliRenderer` -- one NVIDIA DALI pipeline (``decoders.image_slice`` ->
  ``resize`` -> ``crop_mirror_normalize``), on the CPU or on the GPU (``"mixed"`` decode).
  ROI decoding means only the window is decoded where the codec allows it.
* :class:`PillowRenderer` -- Pillow's decode and Pillow's resize, reproduced exactly by a
  compiled kernel (:mod:`hald_store.resample`) that runs over decoded images on every core.
* :class:`TorchvisionRenderer` -- the reference path: Pillow decode (as the reference
  pipelines do),
  tensor slicing, ``transforms.v2.functional.resize``; pixel work on the CPU (with
  ``device="gpu"`` the finished tensors are moved to CUDA, bit-identical to CPU).

Both are deterministic run to run and independent of how a request is split into batches.
They decode identically (Pillow and DALI gave the same pixels for every JPEG and
PNG); their resize kernels differ slightly, so a store should record
:meth:`CropRenderer.describe` and replay with the same backend and device for bit-exact
crops (see ``tests/test_render.py`` for the measured differences).

EXIF orientation is ignored by both backends (boxes refer to the stored pixel grid).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .buffers import BufferPool
from .choices import IMAGENET_MEAN, IMAGENET_STD
from .devices import cuda_available, renderer_device, require_cuda
from .distributed import default_threads
from .errors import HaldStoreError, ImageError
from .images import as_encoded, image_size
from .options import BACKENDS
from .schema import RenderSpec

__all__ = [
    "BACKENDS",
    "DEVICES",
    "INTERPOLATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "dali_available",
    "cuda_available",
    "read_files",
    "image_size",
    "check_boxes",
    "default_threads",
    "CropRenderer",
    "TorchvisionRenderer",
    "DaliRenderer",
    "PillowRenderer",
    "make_renderer",
    "renderer_for",
]

DEVICES = ("cpu", "gpu")
INTERPOLATIONS = ("bilinear", "bicubic")

_DALI_ONLY_KWARGS = ("max_batch_size", "num_threads")
_BACKEND_KWARGS = {"dali": _DALI_ONLY_KWARGS, "pillow": ("num_threads",)}  # beyond the common ones
_RUNTIME_KEYS = ("device", "device_id", "memory_format") + _DALI_ONLY_KWARGS
MEMORY_FORMATS = ("contiguous", "channels_last")
_POOL_LOCK = threading.Lock()  # guards the pillow renderers' lazily made thread pools


# ---------------------------------------------------------------------------------------
# availability and small helpers
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def dali_available() -> bool:
    """True when NVIDIA DALI can be imported."""
    return _dali_import_error() is None


def read_files(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Read each file's raw bytes as a 1-D uint8 array (the renderers' input format)."""
    out = []
    for p in paths:
        try:
            out.append(np.fromfile(os.fspath(p), dtype=np.uint8))
        except OSError as exc:
            raise ImageError(f"cannot read image file {os.fspath(p)!r}: {exc}") from exc
    return out


def _check_inputs(encoded: Sequence[Any], boxes: Any, flips: Any) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    if isinstance(encoded, np.ndarray) and encoded.dtype == np.uint8 and encoded.ndim == 1:
        raise HaldStoreError("encoded must be a list of per-image uint8 arrays, got a single array")
    encoded = [as_encoded(e, i) for i, e in enumerate(encoded)]
    n = len(encoded)
    boxes_arr = np.asarray(boxes)
    if boxes_arr.size == 0 and n == 0:
        boxes_arr = boxes_arr.reshape(0, 4)
    if boxes_arr.ndim != 2 or boxes_arr.shape[1] != 4 or boxes_arr.shape[0] != n:
        raise HaldStoreError(
            f"boxes must have shape ({n}, 4) as (top, left, height, width) for {n} images, "
            f"got shape {boxes_arr.shape}"
        )
    if boxes_arr.dtype.kind not in "iu":
        raise HaldStoreError(f"boxes must be integers (pixels), got dtype {boxes_arr.dtype}")
    flips_arr = np.asarray(flips).reshape(-1) if np.ndim(flips) else np.asarray(flips)
    if flips_arr.shape != (n,):
        raise HaldStoreError(f"flips must have shape ({n},), got shape {np.shape(flips)}")
    if flips_arr.dtype != np.bool_:
        if flips_arr.dtype.kind not in "iub" or not np.isin(flips_arr, (0, 1)).all():
            raise HaldStoreError(f"flips must be booleans (or 0/1), got {flips_arr.dtype} {flips_arr[:8]}")
        flips_arr = flips_arr.astype(np.bool_)
    return encoded, boxes_arr.astype(np.int64), flips_arr


def check_boxes(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray, first_index: int = 0,
                name_of: Callable[[int], str] | None = None) -> None:
    """Raise :class:`HaldStoreError` naming the first box that does not lie inside its image
    (``sample <first_index + i>``, or ``name_of(i)``); vectorized: one call checks an epoch."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    top, left, h, w = boxes.T
    bad = (h < 1) | (w < 1) | (top < 0) | (left < 0) | (top + h > heights) | (left + w > widths)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    t, l, bh, bw = (int(v) for v in boxes[i])
    H, W = int(np.broadcast_to(heights, bad.shape)[i]), int(np.broadcast_to(widths, bad.shape)[i])
    raise HaldStoreError(
        f"{name_of(i) if name_of else f'sample {first_index + i}'}: box (top={t}, left={l}, height={bh}, width={bw}) does not lie "
        f"inside the {H}x{W} (height x width) image; boxes must satisfy 0 <= top, "
        f"0 <= left, height >= 1, width >= 1, top + height <= {H}, left + width <= {W} "
        f"(was the store built from different image files?)"
    )


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise HaldStoreError(f"renderer device={device!r} is not one of {DEVICES}")
    if device == "gpu":
        require_cuda(device)


def _check_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3 or not all(np.isfinite(vals)):
        raise HaldStoreError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}")
    if name == "std" and min(vals) <= 0:
        raise HaldStoreError(f"std must be positive, got {values!r}")
    return vals  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# renderers
# ---------------------------------------------------------------------------------------


def pillow_decode(index: int, data: np.ndarray) -> np.ndarray:
    """Sample ``index``'s image decoded by Pillow: HWC uint8 RGB (16-bit grayscale scaled to 8
    bits as DALI does; ``convert`` would clip)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode.startswith("I"):
                im = Image.fromarray(np.round(np.asarray(im, np.float32) / 257.0).clip(0, 255).astype(np.uint8))
            return np.array(im.convert("RGB"))
    except Exception as exc:
        raise ImageError(f"sample {index}: cannot decode image ({len(data)} bytes): {exc}") from exc


class CropRenderer:
    """Base class: ``renderer(encoded, boxes, flips) -> (N, 3, size, size) float32``."""

    backend: str = ""

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        antialias: bool = True,
        device: str = "cpu",
        device_id: int = 0,
        memory_format: str = "contiguous",
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise HaldStoreError(f"size must be a positive integer (output side in pixels), got {size!r}")
        if interpolation not in INTERPOLATIONS:
            raise HaldStoreError(
                f"interpolation={interpolation!r} is not supported; use one of {INTERPOLATIONS}"
            )
        self.size = int(size)
        self.mean = _check_stats("mean", mean)
        self.std = _check_stats("std", std)
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        _check_device(device)
        self.device = device
        self.device_id = int(device_id)
        if memory_format not in MEMORY_FORMATS:
            raise HaldStoreError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
        self.memory_format = memory_format

    # -- public API ---------------------------------------------------------------------

    def __call__(self, encoded: Sequence[np.ndarray], boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """Normalized crops, float32 ``(N, 3, size, size)`` RGB on :attr:`torch_device`, with
        channels-last strides for ``memory_format="channels_last"`` (same values)."""
        encoded, boxes, flips = _check_inputs(encoded, boxes, flips)
        return self._render(encoded, boxes, flips, normalize=True)

    def render_uint8(self, encoded: Sequence[np.ndarray], boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """Crops after resize and flip, before normalization: uint8 ``(N, size, size, 3)``."""
        encoded, boxes, flips = _check_inputs(encoded, boxes, flips)
        return self._render(encoded, boxes, flips, normalize=False)

    def describe(self) -> dict:
        """JSON-able settings that determine the rendered pixels (record them in a store)."""
        return {
            "backend": self.backend,
            "device": self.device,
            "interpolation": self.interpolation,
            "antialias": self.antialias,
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "memory_format": self.memory_format,
        }

    def record(self) -> dict:
        """What a store records: :meth:`describe` without the settings that may change between
        runs without changing the pixels (device, threads, batch limits)."""
        return {k: v for k, v in self.describe().items() if k not in _RUNTIME_KEYS}

    @property
    def torch_device(self) -> torch.device:
        """Where rendered batches are delivered: ``cuda:device_id`` for ``device="gpu"``."""
        return torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")

    def __repr__(self) -> str:
        d = self.describe()
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in d.items()) + ")"

    # -- to implement -------------------------------------------------------------------

    def _render(self, encoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray, normalize: bool) -> torch.Tensor:
        raise NotImplementedError

    def _empty(self, normalize: bool) -> torch.Tensor:
        if normalize:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.float32, device=self.torch_device)
        return torch.empty((0, self.size, self.size, 3), dtype=torch.uint8, device=self.torch_device)


class TorchvisionRenderer(CropRenderer):
    """Reference renderer: torchvision decode, exact slicing, v2 resize.

    All pixel work runs on the CPU. ``device="gpu"`` only moves the finished tensors to
    ``cuda:device_id``, so the values are bit-identical to ``device="cpu"``.
    """

    backend = "torchvision"
    # imported when first rendering (torchvision's v2 functional pulls in torch._dynamo: seconds);
    # a worker stream imports them before its workers start, so each does not pay that again
    modules = ("torchvision.transforms", "torchvision.transforms.v2.functional", "PIL.Image")

    def describe(self) -> dict:
        import torchvision

        d = super().describe()
        d["torchvision_version"] = torchvision.__version__
        return d

    def _render(self, encoded, boxes, flips, normalize):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2.functional import resize

        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[self.interpolation]

        n = len(encoded)
        if n == 0:
            return self._empty(normalize)
        s = self.size
        out = torch.empty((n, 3, s, s), dtype=torch.uint8)
        for i, (data, box) in enumerate(zip(encoded, boxes)):
            img = torch.from_numpy(pillow_decode(i, data)).permute(2, 0, 1)
            check_boxes(box, img.shape[1], img.shape[2], first_index=i)
            top, left, h, w = (int(v) for v in box)
            crop = img[:, top : top + h, left : left + w]
            out[i] = resize(crop, [s, s], interpolation=mode, antialias=self.antialias)
        if flips.any():
            idx = torch.from_numpy(np.flatnonzero(flips))
            out[idx] = out[idx].flip(-1)
        if not normalize:
            return out.permute(0, 2, 3, 1).contiguous().to(self.torch_device)
        x = out.to(torch.float32).div_(255.0)
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (self.mean, self.std))
        x = x.sub_(mean).div_(std)
        if self.memory_format == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.torch_device)


class PillowRenderer(CropRenderer):
    """Pillow's pixels at compiled speed: Pillow decodes, and :mod:`hald_store.resample`
    resizes each window exactly as ``Image.resize`` (Pillow 13, BILINEAR or BICUBIC) would,
    then mirrors and normalizes, in parallel over the crops on ``num_threads`` threads
    (default: this process's cores). Pillow always antialiases, so ``antialias=False`` is
    refused. ``device="gpu"`` moves the finished tensors to CUDA (same values)."""

    backend = "pillow"

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 interpolation: str = "bilinear", antialias: bool = True, device: str = "cpu", device_id: int = 0,
                 memory_format: str = "contiguous", num_threads: int | None = None) -> None:
        super().__init__(size, mean, std, interpolation, antialias, device, device_id, memory_format)
        if not self.antialias:
            raise HaldStoreError("antialias=False is not available with the pillow renderer (Pillow always "
                                 "antialiases); use backend='dali' or 'torchvision'")
        self.num_threads = default_threads() if num_threads is None else int(num_threads)
        if self.num_threads < 1:
            raise HaldStoreError(f"num_threads must be >= 1, got {num_threads}")
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # num_threads threads, made when needed
        self._buffers = BufferPool()  # output batches written again once the consumer let go of them

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}

    def describe(self) -> dict:
        import PIL

        d = super().describe()
        d["pillow_version"] = PIL.__version__
        return d

    def render_pixels(self, pixels: Any, ids: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                      normalize: bool = True, threads: int | None = None) -> torch.Tensor:
        """Crops of decoded images (a :class:`hald_store.resample.Pixels`), boxes already checked,
        on ``threads`` of the renderer's threads (all by default)."""
        from .resample import render_crops

        channels_last = self.memory_format == "channels_last"
        stats = dict(mean=np.float32(self.mean), std=np.float32(self.std), channels_last=channels_last) if normalize else {}
        threads = self.num_threads if threads is None else min(int(threads), self.num_threads)
        x = torch.from_numpy(render_crops(pixels, ids, boxes, flips, self.size, self.interpolation, **stats,
                                          pool=self._threads() if threads > 1 else None, threads=threads,
                                          buffers=self._buffers))
        if normalize and channels_last:
            x = x.permute(0, 3, 1, 2)
        return x.to(self.torch_device)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        """``[fn(x) for x in items]`` on the renderer's threads (Pillow decodes without the GIL)."""
        pool = self._threads()
        return list(pool.map(fn, items)) if pool is not None and len(items) > 1 else [fn(x) for x in items]

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor | None:
        with _POOL_LOCK:  # a stream's render threads may ask at once
            if self._pool is None and self.num_threads > 1:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="hald-pillow")
                weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def _render(self, encoded, boxes, flips, normalize):
        from .resample import Pixels

        images = self.map(lambda i: pillow_decode(i, encoded[i]), range(len(encoded)))
        check_boxes(boxes, np.array([im.shape[0] for im in images]), np.array([im.shape[1] for im in images]))
        return self.render_pixels(Pixels(images), np.arange(len(images)), boxes, flips, normalize)


class DaliRenderer(CropRenderer):
    """NVIDIA DALI renderer: ROI decode + resize + mirror/normalize in one pipeline.

    ``device="cpu"`` runs everything on host threads; ``device="gpu"`` decodes with the
    ``"mixed"`` backend on ``device_id`` and returns CUDA tensors -- the only difference
    between the two pipeline definitions. ``num_threads`` defaults to this process's share
    of the cores (:func:`default_threads`). Pipelines are built lazily, so a renderer can be
    created before DataLoader workers fork; they are dropped when the renderer is pickled.
    Not thread-safe: use one renderer per thread/worker.
    """

    backend = "dali"

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str = "cpu",
        max_batch_size: int = 256,
        num_threads: int | None = None,
        device_id: int = 0,
        interpolation: str = "bilinear",
        antialias: bool = True,
        memory_format: str = "contiguous",
    ) -> None:
        super().__init__(size, mean, std, interpolation, antialias, device, device_id, memory_format)
        if not dali_available():
            raise HaldStoreError(
                f"the DALI renderer needs NVIDIA DALI, which cannot be imported "
                f"({_dali_import_error()}); install nvidia-dali-cuda130 or use backend='torchvision'"
            )
        num_threads = default_threads() if num_threads is None else num_threads
        if int(max_batch_size) < 1 or int(num_threads) < 1:
            raise HaldStoreError(
                f"max_batch_size and num_threads must be >= 1, got {max_batch_size} and {num_threads}"
            )
        self.max_batch_size = int(max_batch_size)
        self.num_threads = int(num_threads)
        self._runners: dict[bool, DaliRunner] = {}

    def describe(self) -> dict:
        import nvidia.dali

        d = super().describe()
        d["dali_version"] = nvidia.dali.__version__
        return d

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_runners"] = {}
        return state

    # -- pipeline -----------------------------------------------------------------------

    def pipeline(self, kind: str, output: str, source: Any, batch_size: int, prefetch: int = 2) -> Any:
        """A built DALI pipeline reading its batches from ``source`` (a :class:`CropFeeder`).

        ``kind`` says what the source hands over: ``"path"`` (file names, read by DALI; the
        window is decoded as it is, so 1-px-wide boxes need :func:`thin_boxes` fixing),
        ``"encoded"`` (file bytes; every box exact) or ``"decoded"`` (HWC uint8 images). ``output`` is
        ``"normalized"`` (float CHW), ``"uint8"`` (HWC after resize and flip) or ``"raw"``
        (the exact window, not resized: what a decoded-image cache keeps).
        """
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = self.device == "gpu"
        interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[self.interpolation]
        size = self.size
        mean = [255.0 * m for m in self.mean]
        std = [255.0 * s for s in self.std]
        n_out = 6 if kind == "encoded" else 4

        @pipeline_def(
            batch_size=int(batch_size),
            num_threads=self.num_threads,
            device_id=self.device_id if gpu else None,
            exec_dynamic=True,
            prefetch_queue_depth=max(1, int(prefetch)),
            seed=0,
        )
        def crops():
            outs = fn.external_source(source=source, num_outputs=n_out, batch=True,
                                      dtype=[types.UINT8] + [types.INT32] * (n_out - 1),
                                      layout=["HWC" if kind == "decoded" else ""] + [""] * (n_out - 1),
                                      no_copy=True)
            decode = functools.partial(
                fn.decoders.image_slice, device="mixed" if gpu else "cpu", output_type=types.RGB, axis_names="HW",
                normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
                **(dict(jpeg_fancy_upsampling=True) if gpu else {}))
            if kind == "decoded":
                img, anchor, shape, flip = outs
                img = fn.slice(img.gpu() if gpu else img, anchor, shape, axis_names="HW", out_of_bounds_policy="error")
            elif kind == "encoded":
                # Decode a window at least 2 px wide (see _decode_windows), then cut the exact box.
                data, dec_anchor, dec_shape, anchor, shape, flip = outs
                img = fn.slice(decode(data, dec_anchor, dec_shape), anchor, shape, axis_names="HW",
                               out_of_bounds_policy="error")
            else:  # "path": decode exactly the box; DaliStream re-renders the rare 1-px-wide ones
                names, anchor, shape, flip = outs
                img = decode(fn.io.file.read(names, dont_use_mmap=True), anchor, shape)
            if output == "raw":
                return img
            img = fn.resize(img, size=[size, size], interp_type=interp, antialias=self.antialias)
            if output == "normalized":
                return fn.crop_mirror_normalize(
                    img, mirror=flip, mean=mean, std=std, dtype=types.FLOAT,
                    output_layout="HWC" if self.memory_format == "channels_last" else "CHW")
            return fn.flip(img, horizontal=flip, vertical=0)

        pipe = crops()
        with warnings.catch_warnings():  # "raw" output has no use for the flip bits
            warnings.filterwarnings("ignore", message=".*is not used.*")
            pipe.build()
        return pipe

    def _runner(self, normalize: bool) -> "DaliRunner":
        runner = self._runners.get(normalize)
        if runner is None or runner.broken:
            runner = self._runners[normalize] = DaliRunner(
                self, "encoded", "normalized" if normalize else "uint8", self.max_batch_size, prefetch=1)
        return runner

    def _find_culprit(self, normalize: bool, encoded, boxes, widths, flips) -> tuple[int, Exception] | None:
        """After a failed batch, run its samples one by one: (index, error) of the first bad one."""
        for i in range(len(encoded)):
            try:
                list(self._runner(normalize).run(encoded[i : i + 1], widths[i : i + 1],
                                                 [(np.zeros(1, np.int64), boxes[i : i + 1], flips[i : i + 1])]))
            except Exception as exc:
                return i, exc
        return None

    def _render(self, encoded, boxes, flips, normalize):
        n = len(encoded)
        if n == 0:
            return self._empty(normalize)
        sizes = np.array([image_size(data, i) for i, data in enumerate(encoded)], dtype=np.int64)
        check_boxes(boxes, sizes[:, 0], sizes[:, 1])
        step = self.max_batch_size
        requests = [(np.arange(a, min(a + step, n)), boxes[a : a + step], flips[a : a + step]) for a in range(0, n, step)]
        try:
            return torch.cat(list(self._runner(normalize).run(encoded, sizes[:, 1], requests)))
        except Exception as exc:
            found = self._find_culprit(normalize, encoded, boxes, sizes[:, 1], flips)
            if found is None:
                raise HaldStoreError(f"the DALI pipeline failed on samples 0..{n - 1}: {short_error(exc)}") from exc
            i, sample_exc = found
            raise ImageError(
                f"sample {i}: cannot decode image ({len(encoded[i])} bytes): {short_error(sample_exc)}"
            ) from exc


class CropFeeder:
    """The external source of a DALI crop pipeline: per call, the inputs of the next chunk of
    up to ``chunk`` requests (one DALI batch; :class:`DaliRunner` slices its output back into
    the requests).

    A request is ``(ids, boxes, flips)``: rows of ``data`` (file names as uint8, file bytes or
    decoded images), their integer windows and flip bits. Requests wait in a queue; when it is
    empty the feeder asks ``more()`` (the next epoch's requests, or None), and raises
    ``StopIteration`` when there are none, which ends the DALI epoch. A chunk never spans two
    of those lists. DALI reads the returned buffers in place, so the last ``keep_alive``
    (> the pipeline's queue depth) are kept referenced.
    """

    def __init__(self, kind: str, keep_alive: int, chunk: int = 1) -> None:
        self.kind, self.chunk = kind, max(1, int(chunk))
        self.data: np.ndarray = np.zeros(0, object)
        self.widths = np.zeros(0, np.int64)
        self.queue: collections.deque = collections.deque()
        self.sizes: collections.deque = collections.deque()  # request sizes of each chunk handed to DALI, in order
        self.more: Callable[[], Sequence | None] | None = None
        self.alive: collections.deque = collections.deque(maxlen=keep_alive)

    def start(self, data: Sequence[np.ndarray] | np.ndarray, widths: np.ndarray) -> None:
        """Render from ``data``: an array (of same-size images, or :func:`object_rows`) or a sequence."""
        self.data = data if isinstance(data, np.ndarray) else object_rows(data)
        self.widths = np.asarray(widths, np.int64)

    def __call__(self) -> tuple:
        if not self.queue and self.more is not None:
            more, self.more = self.more, None
            self.extend(more() or ())
        if not self.queue:
            raise StopIteration
        members = []
        while self.queue and len(members) < self.chunk:
            request, last = self.queue.popleft()
            members.append(request)
            if last:
                break
        self.sizes.append([len(r[0]) for r in members])
        ids = np.concatenate([np.asarray(r[0], np.int64) for r in members])
        boxes = np.concatenate([np.asarray(r[1], np.int64).reshape(-1, 4) for r in members])
        flips = np.concatenate([np.asarray(r[2]).reshape(-1) for r in members]).astype(np.int32)
        data = self.data[ids]
        if data.dtype == object:
            data = data.tolist()
        if self.kind == "encoded":
            dec = _decode_windows(boxes, self.widths[ids])
            out = data, _i32(dec[:, :2]), _i32(dec[:, 2:]), _i32(boxes[:, :2] - dec[:, :2]), _i32(boxes[:, 2:]), flips
        else:
            out = data, _i32(boxes[:, :2]), _i32(boxes[:, 2:]), flips
        self.alive.append(out)  # DALI reads these buffers in place (no_copy) until they are consumed
        return out

    def extend(self, requests: Sequence) -> None:
        """Queue ``requests`` as one list (a chunk stops at its end)."""
        self.queue.extend((r, k == len(requests) - 1) for k, r in enumerate(requests))


def object_rows(items: Sequence[Any]) -> np.ndarray:
    """``items`` as a 1-D object array: a batch of them is then one vectorized gather."""
    rows = np.empty(len(items), object)
    for i, item in enumerate(items):  # item by item: numpy would otherwise stack same-shape arrays
        rows[i] = item
    return rows


# Requests rendered per DALI batch: chunks of about CHUNK_PIXELS output pixels (2,048 crops at
# 32 px, 1 batch at 224 px), so that the per-run cost of the Python thread that drives DALI is
# spread over many small crops and DALI's threads get enough samples per run.
CHUNK_PIXELS = 2048 * 32 * 32


def render_chunk(batch_size: int, size: int) -> int:
    """How many requests of ``batch_size`` crops of ``size`` px one DALI run renders (>= 1)."""
    return max(1, CHUNK_PIXELS // (int(batch_size) * int(size) ** 2))


class DaliRunner:
    """One DALI crop pipeline fed by a :class:`CropFeeder`; batches are handed out without a
    copy (``exec_dynamic`` + DLPack; a chunk's output is sliced into its requests' batches, views).

    Requests are queued (:meth:`queue`) and rendered ``prefetch`` batches ahead (at least two
    chunks) on the pipeline's own threads, ``chunk`` requests per DALI run; :meth:`take` yields
    the next ``n`` batches in order. The pipeline keeps running across calls (no drain between
    epochs) as long as requests are queued in time -- the feeder's ``more`` is asked when the
    queue runs dry. A ``take`` that is left early or fails marks the runner ``broken`` (its
    queue holds stale batches): build a new one. ``channels_last`` (normalized output) hands
    out NCHW views with channels-last strides of DALI's HWC output, no copy.
    """

    def __init__(self, renderer: DaliRenderer, kind: str, output: str, batch_size: int, prefetch: int = 2,
                 chunk: int = 1) -> None:
        self.output, self.chunk = output, max(1, int(chunk))
        self.channels_last = output == "normalized" and renderer.memory_format == "channels_last"
        depth = max(2 if self.chunk > 1 else 1, -(-int(prefetch) // self.chunk))
        self.feeder = CropFeeder(kind, keep_alive=depth + 2, chunk=self.chunk)
        self.pipe = renderer.pipeline(kind, output, self.feeder, batch_size * self.chunk, depth)
        self.broken = False
        self.outstanding = 0  # requests queued or in flight and not yet taken
        self._ready: collections.deque = collections.deque()  # batches of the current chunk not yet taken

    def queue(self, requests: Sequence) -> None:
        """Append ``requests`` to what the pipeline renders."""
        self.feeder.extend(requests)
        self.outstanding += len(requests)

    def run(self, data: Sequence[np.ndarray], widths: np.ndarray, requests: Sequence) -> Iterator[Any]:
        """Rendered batches of ``requests`` over ``data``, in order (lists of HWC arrays for ``"raw"``)."""
        self.feeder.start(data, widths)
        self.queue(requests)
        return self.take(len(requests))

    def take(self, n: int) -> Iterator[Any]:
        """The next ``n`` rendered batches, in order."""
        if self.broken:
            raise HaldStoreError("internal error: a broken DALI runner was reused")
        self.broken = n > 0  # until the n-th batch is handed out (a consumer may stop right after it)
        for i in range(n):
            out = self._next()
            self.broken = i < n - 1
            yield out

    def _next(self) -> Any:
        if not self._ready:
            self._ready.extend(self._split(self._run_once(), self.feeder.sizes.popleft()))
        self.outstanding -= 1
        return self._ready.popleft()

    def _run_once(self) -> Any:
        try:
            (out,) = self.pipe.run()
        except StopIteration:  # the feeder had run dry (nothing queued in time): start a new DALI epoch
            self.pipe.reset()
            (out,) = self.pipe.run()
        if self.output == "raw":
            out = out.as_cpu() if hasattr(out, "as_cpu") else out
            return [np.array(out[i]) for i in range(len(out))]
        tensor = out.as_tensor()
        if self.pipe.device_id is None or not hasattr(tensor, "as_cpu"):
            x = torch.from_dlpack(tensor)
        else:
            with torch.cuda.device(self.pipe.device_id):
                x = torch.from_dlpack(tensor)
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    @staticmethod
    def _split(out: Any, sizes: list[int]) -> list[Any]:
        if len(sizes) == 1:
            return [out]
        ends = np.cumsum(sizes)
        return [out[a:b] for a, b in zip(ends - sizes, ends)]


def _i32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int32)


def thin_boxes(boxes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Mask of the boxes 1 px wide in images at least 2 px wide: the ones DALI's ROI decoder
    cannot decode exactly on their own (see :func:`_decode_windows`)."""
    return (np.asarray(boxes)[:, 3] == 1) & (np.asarray(widths) >= 2)


def _decode_windows(boxes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Windows handed to DALI's ROI decoder: the boxes, widened to >= 2 px where possible.

    Measured with DALI 2.4.0 (libjpeg-turbo): ROI-decoding a 1-px-wide window at
    ``left == 0`` of a 4:2:0 JPEG gives chroma that differs by 1 from the full decode (the
    chroma upsampler sees a 1-column image). Every other window was bit-identical to the
    full decode (exhaustive sweep of all boxes of 19x23 and 34x17 images, 4:4:4, 4:2:2,
    4:2:0). So 1-px-wide boxes are decoded 2 px wide and then sliced exactly.
    """
    dec = boxes.copy()
    thin = thin_boxes(boxes, widths)
    if thin.any():
        left = dec[thin, 1]
        w = widths[thin]
        dec[thin, 1] = np.where(left + 2 <= w, left, left - 1)
        dec[thin, 3] = 2
    return dec


def short_error(exc: Exception) -> str:
    """The informative lines of a (long, multi-line) DALI error message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "pipeline" not in ln.lower() and not ln.startswith("File ")]
    return " | ".join(keep[-3:] or lines[-1:])


# ---------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------


def make_renderer(
    backend: str = "auto",
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str | torch.device = "auto",
    workers: int | None = None,
    **kw: Any,
) -> CropRenderer:
    """Build a renderer.

    ``backend``: ``"auto"`` (DALI when importable, else torchvision), ``"dali"``,
    ``"pillow"`` (:class:`PillowRenderer`) or ``"torchvision"``. ``device``: ``"auto"`` (GPU
    when CUDA is available and the backend is DALI, else CPU), ``"cpu"`` or ``"gpu"``, or a
    user device name (``cuda``, ``cuda:N``, a torch device:
    :func:`~hald_store.devices.renderer_device`; ``cuda:N`` sets ``device_id``). ``workers``:
    DALI or pillow threads (torchvision renders in the stream's worker processes). Extra
    keywords go to the renderer class (``interpolation``, ``antialias``, ``device_id`` and
    ``memory_format`` for all; ``num_threads`` for DALI and pillow; ``max_batch_size`` for DALI).
    Explicit requests that cannot be met raise :class:`HaldStoreError`; ``"auto"`` falls back
    silently (and then drops DALI-only keywords). ``device="gpu"`` with the torchvision or
    pillow backend renders on the CPU and returns CUDA tensors.
    """
    if backend not in ("auto",) + BACKENDS:
        raise HaldStoreError(f"unknown renderer backend {backend!r}; use one of {('auto',) + BACKENDS}")
    requested, (device, index) = device, renderer_device(device)
    if index is not None:
        kw.setdefault("device_id", index)
    if backend == "dali" and not dali_available():
        raise HaldStoreError(
            f"backend='dali' was requested but NVIDIA DALI cannot be imported ({_dali_import_error()}); "
            f"install nvidia-dali-cuda130, or pass backend='torchvision' or backend='auto'"
        )
    auto_backend = backend == "auto"
    if auto_backend:
        backend = "dali" if dali_available() else "torchvision"
    if device == "gpu":
        require_cuda(requested)
    if device == "auto":
        device = "gpu" if backend == "dali" and cuda_available() else "cpu"

    if backend == "torchvision" and auto_backend:  # fell back: DALI-only tuning knobs do not apply
        kw = {k: v for k, v in kw.items() if k not in _DALI_ONLY_KWARGS}
    if backend != "torchvision" and workers is not None:
        kw.setdefault("num_threads", max(1, int(workers)))
    allowed = {"interpolation", "antialias", "device_id", "memory_format", *_BACKEND_KWARGS.get(backend, ())}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise HaldStoreError(f"unknown option(s) {unknown} for the {backend} renderer (only {sorted(allowed)} apply)")
    cls = {"dali": DaliRenderer, "pillow": PillowRenderer, "torchvision": TorchvisionRenderer}[backend]
    return cls(size, mean, std, device=device, **kw)


def renderer_for(spec: RenderSpec, backend: str = "auto", device: str | torch.device = "auto",
                 workers: int | None = None, **kw: Any) -> CropRenderer:
    """A renderer that reproduces the pixels ``spec`` records (a store's
    :attr:`~hald_store.store.LabelStore.render_spec`). ``backend="auto"`` is the recorded
    backend (torchvision, with a warning, where a DALI store meets a machine without DALI); the
    rest is :func:`make_renderer`'s."""
    if backend == "auto":
        backend = spec.backend
        if backend == "dali" and not dali_available():
            warnings.warn("this store was labelled with DALI-rendered crops but DALI is not installed; using "
                          "the torchvision renderer, whose pixels differ slightly (see the README's tolerance "
                          "table)", stacklevel=3)
            backend = "torchvision"
    return make_renderer(backend, size=spec.size, mean=spec.mean, std=spec.std, device=device, workers=workers,
                         interpolation=spec.interpolation, antialias=spec.antialias, **kw)
