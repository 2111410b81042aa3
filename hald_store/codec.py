"""Label codec: top-k class indices plus quantized *logit gaps* per crop.

Layout
------
For teacher logits ``z`` of shape ``(N, C)`` and a codec with ``top_k = k`` we store per crop

* ``indices``: the k class indices with the largest logits, sorted by descending logit.
  Ties are broken deterministically by the lower class index (both for which classes enter the
  top-k and for their order).  dtype uint8 if C <= 256, uint16 if C <= 65536, else uint32.
* the ascending, non-negative gaps ``g = [z_max - z_(2), ..., z_max - z_(k), z_max - r]`` where
  ``r`` is the *rest logit* shared by all C-k classes outside the top-k ("marginal smoothing")::

      r = T_b * (logsumexp(z_rest / T_b) - log(C - k))

  so that the total probability of the rest classes is exact at the build temperature ``T_b``.
  The gap of the first top logit is always 0 and is not stored; the rest gap is omitted when
  k == C.  Hence ``m = (k - 1) + (1 if k < C else 0)`` gaps are stored, the last one is the largest.

Because gaps (logit differences) are stored rather than temperature-baked probabilities, the
softmax temperature can be chosen freely at training time (:meth:`TopKLabels.log_probs`).

Value codecs (per crop; ``L`` = number of quantization levels): each is one
:class:`ValueCodec` subclass registered under its name (:func:`register_value_codec`), which owns
its fields, encoding, decoding, settings and version. A store records the codec zarr-style as
``{"name": "uint8", "configuration": {"version": 1, "levels": 255, "bits": 8, "top_k": 5,
"num_classes": 1000, "temperature": 20.0}}``; format-1 stores' ``{"version": 1, "values": ...}``
still reads.

=========  ==========================================================================
``fp32``   ``gaps`` float32 ``(m,)``.  Exact reference.
``fp16``   ``gaps`` float16 ``(m,)``.  Relative error <= 2**-11 (absolute <= 2**-25 below
           the fp16 normal range).
``uint8``  ``scale`` float16 ``()`` = the last (largest) gap; ``codes`` uint8 ``(m-1,)`` =
           ``round(255 * g / scale)`` for the first m-1 gaps (all 0 when scale == 0).
           Error <= scale/510 + fp16 rounding of the scale.
``uint4``  as uint8 with L = 15 and two codes per byte: ``codes`` uint8 ``(ceil((m-1)/2),)``;
           code ``2j`` is in the low nibble of byte j, code ``2j+1`` in its high nibble.
           Error <= scale/30 + fp16 rounding of the scale.
``uint2``  as uint4 with L = 3 and four codes per byte, the first in the lowest two bits.
           Error <= scale/6 + fp16 rounding of the scale.
=========  ==========================================================================

The ``codes`` field is always present for the integer codecs, with width 0 when m == 1.

Documented deviations from "plain rounding" (all tiny and all in the safe direction):

* **float range**: fp32 gaps are clamped to the largest finite float32 (only reachable when
  the teacher's logits span more than 3.4e38).  Every gap stored as fp16 (``fp16`` gaps and
  the integer codecs' ``scale``) is clamped to 65504, the largest finite float16.  A gap that
  large means a probability ratio of ``exp(-65504 / T)``, i.e. exactly 0 in float32 for any
  T < ~600, so nothing is lost in practice; for the integer codecs the codes are then computed
  against the clamped scale (gaps above it saturate at the top code).
* **strict top-1**: a gap that is > 0 is never stored as 0.  For fp32/fp16 it becomes the
  smallest positive subnormal of the storage dtype instead (absolute error <= 2**-24).  For the
  integer codecs a positive gap that would round to code 0 (g < scale/(2L)) is stored as code 1,
  so for those tiny gaps the error bound is scale/L instead of scale/(2L).  This keeps the
  teacher's top-1 class the unique argmax of the decoded distribution (a tie at logit 0 would
  let ``argmax`` pick a lower class index).  Exactly tied top logits stay tied; their order
  follows the lower-index rule, which is also what ``argmax`` returns.
* **monotonicity**: the rest gap is forced to be >= the k-th gap (it is mathematically, but
  float rounding of the logsumexp can violate it by an ulp).

Probability error: if every decoded logit is within ``e`` of the exact (fp32) one, then
``|log p_codec - log p_fp32| <= 2 * e / T`` for every class and temperature T.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from hald_store.errors import OptionError, StoreError, TeacherOutputError, preview
from hald_store.registry import Registry

__all__ = [
    "VALUE_CODECS",
    "ValueCodec",
    "register_value_codec",
    "LabelCodec",
    "TopKLabels",
    "dense_fp16_probs",
    "dense_fp16_bytes_per_crop",
]

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)
_FP32_TINY = float(np.finfo(np.float32).smallest_subnormal)
_FP32_MAX = float(np.finfo(np.float32).max)
# Rows per internal chunk are chosen so that one chunk holds about this many logits (keeps the
# temporaries of encode small and cache friendly; the work inside a chunk is fully vectorized).
_CHUNK_ELEMS = 1 << 21


def _index_dtype(num_classes: int) -> np.dtype:
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _as_tensor(x: Any) -> torch.Tensor:
    """Zero-copy view of a NumPy array (or any array-like) as a torch tensor."""
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        # torch's uint16/uint32 support is limited; indices are widened anyway.
        arr = arr.astype(np.int64)
    if not arr.flags.writeable:
        # Arrays read from Zarr may be read-only; we never write into them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def check_logits(logits: Any, num_classes: int | None, name_rows: Callable[[np.ndarray], str] | None = None,
                 note: str = "") -> torch.Tensor:
    """Validate teacher output and return it as a floating-point tensor (float32 or float64).
    Crops with NaN/Inf are named by ``name_rows(rows)`` (default: their row numbers); ``note``
    ends the message."""
    z = _as_tensor(logits)
    if z.ndim != 2:
        raise TeacherOutputError(f"teacher output must have shape (crops, classes), got shape {tuple(z.shape)}{note}")
    if num_classes is not None and z.shape[1] != num_classes:
        raise TeacherOutputError(
            f"teacher produced {z.shape[1]} outputs per crop but the label codec expects "
            f"num_classes={num_classes} (output shape {tuple(z.shape)}){note}", "num_classes"
        )
    if z.dtype != torch.float64:
        z = z.to(torch.float32)
    if z.shape[0] and z.shape[1]:
        # Cheap screen: a row containing NaN/Inf always has a non-finite sum; rows whose finite
        # values merely overflow the sum are re-checked exactly.
        cand = (~torch.isfinite(z.sum(dim=1))).nonzero().flatten()
        if cand.numel():
            bad = cand[~torch.isfinite(z[cand]).all(dim=1)]
            if bad.numel():
                rows = bad.numpy()
                where = name_rows(rows) if name_rows else f"rows {preview(rows.tolist())}"
                raise TeacherOutputError(
                    f"teacher produced NaN/Inf logits in {bad.numel()} of {z.shape[0]} crops ({where}){note}")
    return z


def _keep_positive(stored: torch.Tensor, exact: torch.Tensor, tiny: float) -> torch.Tensor:
    """Replace values that rounded to 0 although the exact gap is > 0 by ``tiny``."""
    lost = (stored == 0) & (exact > 0)
    return torch.where(lost, torch.full_like(stored, tiny), stored)


def _topk_sorted(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k values/indices per row, descending, ties broken by the lower class index, and the
    largest value outside the top-k ((N, 1), None when k == C)."""
    n, c = z.shape
    # One extra element tells whether the k-th place is tied with a left-out class.
    vals, idx = torch.topk(z, min(k + 1, c), dim=1, largest=True, sorted=True)
    if k < c:
        # torch.topk does not specify which of several equal values at the k-th place it picks;
        # such rows (rare with real logits) are redone with a stable sort.
        rows = (vals[:, k] == vals[:, k - 1]).nonzero().flatten()
        rest_max = vals[:, k:]
        vals, idx = vals[:, :k], idx[:, :k]
        if rows.numel():
            _, sidx = torch.sort(z[rows], dim=1, descending=True, stable=True)
            idx[rows] = sidx[:, :k]
            vals[rows] = torch.gather(z[rows], 1, idx[rows])
    # Order within the top-k: descending value, ties by ascending index.
    idx, perm = torch.sort(idx, dim=1)
    vals = torch.gather(vals, 1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    idx = torch.gather(idx, 1, perm)
    return vals, idx, (rest_max if k < c else None)


# ------------------------------------------------------------------ value codecs
class ValueCodec:
    """How a crop's ``m`` ascending, non-negative logit gaps are stored: one registered subclass
    per value kind (as FFCV's fields and zarr's codecs). A subclass sets ``name`` and
    ``version`` (bump it when what it writes changes meaning) and implements :meth:`fields`,
    :meth:`encode` and :meth:`decode`; :meth:`settings` are recorded in the store beside them."""

    name: ClassVar[str]
    version: ClassVar[int] = 1

    def settings(self) -> dict[str, Any]:
        """Its fixed parameters, recorded in the store's codec configuration."""
        return {}

    def fields(self, m: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Stored arrays per crop: name -> (dtype, per-crop trailing shape)."""
        raise NotImplementedError

    def encode(self, gaps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact gaps ``(N, m)`` (float32 or float64, ascending per row) -> field tensors."""
        raise NotImplementedError

    def decode(self, fields: Mapping[str, torch.Tensor], m: int) -> torch.Tensor:
        """Field tensors (shapes checked) -> decoded gaps ``(N, m)`` float32."""
        raise NotImplementedError


VALUE_CODECS: Registry[type[ValueCodec]] = Registry("value codec")  # name -> class, in registration order
register_value_codec = VALUE_CODECS.register  # class decorator: make ``cls`` the value codec stored under ``cls.name``


class _FloatGaps(ValueCodec):
    """``gaps`` stored as floats; a gap > 0 never rounds to 0 (it becomes ``tiny``)."""

    dtype: ClassVar[torch.dtype]
    tiny: ClassVar[float]  # smallest positive value of the dtype
    max: ClassVar[float]  # largest finite value of the dtype

    def fields(self, m: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {"gaps": (torch.empty((), dtype=self.dtype).numpy().dtype, (m,))}

    def encode(self, gaps: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"gaps": _keep_positive(gaps.clamp(max=self.max).to(self.dtype), gaps, self.tiny)}

    def decode(self, fields: Mapping[str, torch.Tensor], m: int) -> torch.Tensor:
        return fields["gaps"].to(torch.float32)


@register_value_codec
class Fp32Gaps(_FloatGaps):
    """``gaps`` float32: the exact reference."""

    name, dtype, tiny, max = "fp32", torch.float32, _FP32_TINY, _FP32_MAX


@register_value_codec
class Fp16Gaps(_FloatGaps):
    """``gaps`` float16: relative error <= 2**-11."""

    name, dtype, tiny, max = "fp16", torch.float16, _FP16_TINY, _FP16_MAX


class _ScaledCodes(ValueCodec):
    """``scale`` float16 = the last (largest) gap; ``codes`` = the other m-1 gaps as integers
    0..levels against it, ``8 // bits`` codes per byte, the first in the lowest bits. A gap > 0
    never becomes code 0. Subclasses may replace the linear :meth:`quantize`/:meth:`dequantize`."""

    levels: ClassVar[int]
    bits: ClassVar[int] = 8

    def settings(self) -> dict[str, Any]:
        return {"levels": self.levels, "bits": self.bits}

    def fields(self, m: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        per_byte = 8 // self.bits
        return {"codes": (np.dtype(np.uint8), (-(-(m - 1) // per_byte),)), "scale": (np.dtype(np.float16), ())}

    def quantize(self, gaps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Unclamped float codes of ``gaps`` (N, m-1) against ``scale`` (N, 1)."""
        factor = torch.where(scale > 0, self.levels / scale, torch.zeros_like(scale))
        return torch.round(gaps * factor)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Gaps (N, m-1) float32 of float32 ``codes`` against ``scale`` (N, 1) float32."""
        # codes * scale is exact in float32 (8-bit int times 11-bit fp16 mantissa), so the
        # single rounding of the division keeps decoded gaps monotone and code L == scale.
        return codes * scale / self.levels

    def encode(self, gaps: torch.Tensor) -> dict[str, torch.Tensor]:
        last = gaps[:, -1]
        scale16 = _keep_positive(last.clamp(max=_FP16_MAX).to(torch.float16), last, _FP16_TINY)
        q = self.quantize(gaps[:, :-1], scale16.to(gaps.dtype)[:, None]).clamp_(0, self.levels)
        # Strict top-1: a gap > 0 never decodes to 0 (codes stay ascending since gaps are).
        q = torch.where((q == 0) & (gaps[:, :-1] > 0), torch.ones_like(q), q)
        codes, per_byte = q.to(torch.uint8), 8 // self.bits
        if codes.shape[1] % per_byte:
            codes = torch.nn.functional.pad(codes, (0, per_byte - codes.shape[1] % per_byte))
        packed = codes[:, 0::per_byte].clone()
        for j in range(1, per_byte):
            packed |= codes[:, j::per_byte] << (self.bits * j)
        return {"codes": packed, "scale": scale16}

    def decode(self, fields: Mapping[str, torch.Tensor], m: int) -> torch.Tensor:
        scale, codes = fields["scale"].to(torch.float32)[:, None], fields["codes"]
        per_byte, mask = 8 // self.bits, (1 << self.bits) - 1
        if per_byte > 1:
            parts = [(codes >> (self.bits * j)) & mask for j in range(per_byte)]
            codes = torch.stack(parts, dim=2).reshape(codes.shape[0], per_byte * codes.shape[1])[:, : m - 1]
        return torch.cat([self.dequantize(codes.to(torch.float32), scale), scale], dim=1)


@register_value_codec
class Uint8Codes(_ScaledCodes):
    """8-bit codes: error <= scale/510 + fp16 rounding of the scale."""

    name, levels, bits = "uint8", 255, 8


@register_value_codec
class Uint4Codes(_ScaledCodes):
    """4-bit codes, two per byte (low nibble first): error <= scale/30 + fp16 rounding of the scale."""

    name, levels, bits = "uint4", 15, 4


@register_value_codec
class Uint2Codes(_ScaledCodes):
    """2-bit codes, four per byte (lowest bits first): error <= scale/6 + fp16 rounding of the scale."""

    name, levels, bits = "uint2", 3, 2


_FORMAT1_VALUES = ("fp32", "fp16", "uint8", "uint4")  # what format-1 stores ("version": 1, "values": ...) name


@dataclass(frozen=True)
class LabelCodec:
    """How soft labels are stored per crop: the top-k class indices plus the registered value
    codec ``values`` (a name in :data:`VALUE_CODECS`) for the logit gaps (see the module docstring)."""

    values: str
    top_k: int
    num_classes: int
    temperature: float

    index_field: ClassVar[str] = "indices"  # the field holding class indices (k per crop)

    def __post_init__(self) -> None:
        if self.values not in VALUE_CODECS:
            raise ValueError(
                f"values={self.values!r} is not a known value codec; "
                f"choose one of {', '.join(VALUE_CODECS)}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an integer, got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if not 1 <= self.top_k <= self.num_classes:
            raise ValueError(
                f"top_k must be between 1 and num_classes={self.num_classes}, got {self.top_k}"
            )
        try:
            t = float(self.temperature)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}") from None
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "temperature", t)

    # ------------------------------------------------------------------ layout
    @cached_property
    def value_codec(self) -> ValueCodec:
        """The registered codec of the gaps."""
        return VALUE_CODECS[self.values]()

    @property
    def has_rest(self) -> bool:
        return self.top_k < self.num_classes

    @property
    def num_gaps(self) -> int:
        """m: number of stored gaps per crop."""
        return self.top_k - 1 + (1 if self.has_rest else 0)

    @property
    def index_dtype(self) -> np.dtype:
        return _index_dtype(self.num_classes)

    def fields(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Stored arrays per crop: name -> (dtype, per-crop trailing shape)."""
        return {self.index_field: (self.index_dtype, (self.top_k,)), **self.value_codec.fields(self.num_gaps)}

    def bytes_per_crop(self) -> int:
        """Raw (uncompressed) bytes of all fields per crop."""
        return sum(dt.itemsize * int(np.prod(shape, dtype=np.int64)) for dt, shape in self.fields().values())

    def to_dict(self) -> dict:
        """zarr-style ``{"name", "configuration"}``: the value codec's name, version and settings
        plus ``top_k``, ``num_classes`` and ``temperature``."""
        v = self.value_codec
        return {"name": v.name, "configuration": {"version": v.version, **v.settings(), "top_k": self.top_k,
                                                  "num_classes": self.num_classes, "temperature": self.temperature}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelCodec":
        """Read :meth:`to_dict`'s form, or format 1's ``{"version": 1, "values", "top_k", ...}``."""
        if "name" not in d and "values" in d:
            return cls._from_format1(d)
        if "name" not in d or not isinstance(d.get("configuration"), Mapping):
            raise ValueError("label codec settings lack 'name' and 'configuration'")
        name, conf = d["name"], d["configuration"]
        if name not in VALUE_CODECS:
            raise ValueError(f"label codec {name!r} is not known to this hald-store (it reads "
                             f"{', '.join(VALUE_CODECS)}): upgrade hald-store")
        value_codec = VALUE_CODECS[name]()
        if conf.get("version") != value_codec.version:
            raise ValueError(f"label codec {name!r} version {conf.get('version')!r} is not supported (this "
                             f"hald-store reads version {value_codec.version})")
        for key, want in value_codec.settings().items():
            if conf.get(key, want) != want:
                raise ValueError(f"label codec {name!r} was written with {key}={conf[key]!r}; this hald-store's "
                                 f"{name} has {key}={want!r}")
        return cls._from_settings(name, conf)

    @classmethod
    def _from_format1(cls, d: Mapping[str, Any]) -> "LabelCodec":
        if d.get("version", 1) != 1 or d["values"] not in _FORMAT1_VALUES:
            raise ValueError(f"label codec version {d.get('version')!r} with values={d['values']!r} is not "
                             "supported (format 1 has version 1 and values " + ", ".join(_FORMAT1_VALUES) + ")")
        return cls._from_settings(d["values"], d)

    @classmethod
    def _from_settings(cls, values: str, conf: Mapping[str, Any]) -> "LabelCodec":
        missing = [key for key in ("top_k", "num_classes", "temperature") if key not in conf]
        if missing:
            raise ValueError(f"label codec settings lack {', '.join(missing)}")
        return cls(values=values, top_k=conf["top_k"], num_classes=conf["num_classes"],
                   temperature=conf["temperature"])

    @classmethod
    def checked(cls, values: str, top_k: int, num_classes: int, temperature: float) -> "LabelCodec":
        """The codec, its bad parameters raised as :class:`~hald_store.errors.OptionError`."""
        try:
            return cls(values=values, top_k=top_k, num_classes=num_classes, temperature=float(temperature))
        except ValueError as e:
            raise OptionError(str(e), "values", "top_k", "num_classes", "temperature") from e

    # ------------------------------------------------------------------ encode
    def encode(self, logits: Any) -> dict[str, np.ndarray]:
        """Encode teacher logits ``(N, C)`` (NumPy or torch, any device) into NumPy fields.

        Raises :class:`TeacherOutputError` for NaN/Inf logits (naming the first offending rows)
        or a wrong shape/width.
        """
        with torch.no_grad():
            z = check_logits(logits, self.num_classes)
            n = z.shape[0]
            out = {
                name: np.empty((n, *shape), dtype=dt) for name, (dt, shape) in self.fields().items()
            }
            chunk = max(1, _CHUNK_ELEMS // self.num_classes)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                # contiguous: identical results whatever the input's memory layout
                gaps, idx = self._gaps(z[start:stop].contiguous())
                out[self.index_field][start:stop] = idx.cpu().numpy()
                for name, arr in self.value_codec.encode(gaps).items():
                    out[name][start:stop] = arr.cpu().numpy()
        return out

    def _gaps(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact gaps (N, m) in z's dtype and top-k indices (N, k) int64."""
        k, c, t = self.top_k, self.num_classes, self.temperature
        vals, idx, rest_max = _topk_sorted(z, k)
        zmax = vals[:, :1]
        gaps = zmax - vals[:, 1:]
        if rest_max is not None:
            # Rest gap z_max - r = T * (log(C-k) - logsumexp((z_rest - z_max) / T)), evaluated
            # around the largest rest logit v (known from top-k) so that nothing cancels:
            #   z_max - r = (z_max - v) + T * (log(C-k) - log(sum_rest exp((z - v) / T)))
            # where the sum lies in [1, C-k], so both terms are >= 0.  Top-k entries may
            # overflow in exp; they are overwritten with 0 before summing.
            e = torch.sub(z, rest_max)
            if t != 1.0:
                e.mul_(1.0 / t)
            e.exp_().scatter_(1, idx, 0.0)
            total = e.sum(dim=1, keepdim=True)
            rest_gap = (zmax - rest_max) + t * (math.log(c - k) - torch.log(total))
            rest_gap = rest_gap.clamp_min(0.0)
            if k > 1:
                rest_gap = torch.maximum(rest_gap, gaps[:, -1:])
            gaps = torch.cat([gaps, rest_gap], dim=1)
        return gaps, idx

    # ------------------------------------------------------------------ decode
    def decode(self, fields: Mapping[str, Any]) -> "TopKLabels":
        """Rebuild :class:`TopKLabels` from stored fields (NumPy arrays or tensors, same rows)."""
        spec = self.fields()
        missing = [name for name in spec if name not in fields]
        if missing:
            raise StoreError(
                f"label fields {', '.join(missing)} are missing (codec {self.values!r} stores "
                f"{', '.join(spec)})"
            )
        t = {name: _as_tensor(fields[name]) for name in spec}
        n = t[self.index_field].shape[0] if t[self.index_field].ndim else -1
        for name, (_, shape) in spec.items():
            if tuple(t[name].shape) != (n, *shape):
                raise StoreError(
                    f"label field {name!r} has shape {tuple(t[name].shape)}, expected "
                    f"{(n, *shape)} for {self.values} top_k={self.top_k} "
                    f"num_classes={self.num_classes}"
                )
        k = self.top_k
        indices = t.pop(self.index_field).to(torch.int64)
        device = indices.device
        gaps = self.value_codec.decode(t, self.num_gaps)
        logits = torch.cat([torch.zeros(n, 1, dtype=torch.float32, device=device), -gaps[:, : k - 1]], dim=1)
        if self.has_rest:
            rest = -gaps[:, k - 1]
        else:
            rest = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
        return TopKLabels(indices=indices, logits=logits, rest_logit=rest, num_classes=self.num_classes)


@dataclass
class TopKLabels:
    """Decoded soft labels: top-k logits relative to the max plus one shared rest logit."""

    indices: torch.Tensor  # (N, k) int64
    logits: torch.Tensor  # (N, k) float32, first column 0
    rest_logit: torch.Tensor  # (N,) float32, -inf when k == C
    num_classes: int

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    def __getitem__(self, idx: Any) -> "TopKLabels":
        """Row selection (int, slice, index array or bool mask).  An int keeps the row axis."""
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1) if idx != -1 else slice(-1, None)
        return TopKLabels(
            indices=self.indices[idx],
            logits=self.logits[idx],
            rest_logit=self.rest_logit[idx],
            num_classes=self.num_classes,
        )

    def to(self, device: Any) -> "TopKLabels":
        return TopKLabels(
            indices=self.indices.to(device, non_blocking=True),
            logits=self.logits.to(device, non_blocking=True),
            rest_logit=self.rest_logit.to(device, non_blocking=True),
            num_classes=self.num_classes,
        )

    def dense_logits(self) -> torch.Tensor:
        """(N, C) logits: ``rest_logit`` everywhere, the top-k logits scattered in."""
        n = len(self)
        dense = self.rest_logit[:, None].expand(n, self.num_classes).clone()
        return dense.scatter_(1, self.indices, self.logits)

    def log_probs(self, temperature: float) -> torch.Tensor:
        """``log_softmax(dense_logits / T)``, shape (N, C)."""
        return torch.log_softmax(self.dense_logits() / temperature, dim=1)

    def probs(self, temperature: float) -> torch.Tensor:
        return torch.softmax(self.dense_logits() / temperature, dim=1)

    def topk_probs(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (N,k), probabilities of the top-k (N,k), probability of EACH rest class (N,)).

        Same numbers as :meth:`probs` without building the dense (N, C) tensor.
        """
        a = self.logits / temperature
        n_rest = self.num_classes - self.top_k
        if n_rest:
            rest = self.rest_logit / temperature
            terms = torch.cat([a, (rest + math.log(n_rest))[:, None]], dim=1)
            lse = torch.logsumexp(terms, dim=1)
            p_rest = torch.exp(rest - lse)
        else:
            lse = torch.logsumexp(a, dim=1)
            p_rest = torch.zeros_like(lse)
        return self.indices, torch.exp(a - lse[:, None]), p_rest


def dense_fp16_probs(logits: Any, temperature: float) -> np.ndarray:
    """The layout public pipelines store: the full softmax(z / T) vector as float16, (N, C).

    2 * C bytes per crop (see :func:`dense_fp16_bytes_per_crop`); used as the benchmark baseline.
    """
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    with torch.no_grad():
        z = check_logits(logits, None)
        n, c = z.shape
        out = np.empty((n, c), dtype=np.float16)
        chunk = max(1, _CHUNK_ELEMS // max(c, 1))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            p = torch.softmax(z[start:stop] / t, dim=1)
            out[start:stop] = p.to(torch.float16).cpu().numpy()
    return out


def dense_fp16_bytes_per_crop(num_classes: int) -> int:
    """Raw bytes per crop of :func:`dense_fp16_probs`."""
    return 2 * int(num_classes)
