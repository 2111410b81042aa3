"""Deterministic, order-free RandomResizedCrop plans.

A crop is named by ``(image_index, crop_seed)``. Its window and horizontal flip are a
pure function of ``(plan_seed, image_index, crop_seed, height, width, policy, stream)``:
every random number comes from a counter-based generator (Philox4x64-10, bit-identical
to NumPy's ``np.random.Philox``), keyed by ``(plan_seed, stream)`` and addressed by
``(image_index, crop_seed, block, 0)``. Any process, in any order, on any machine,
regenerates the same crops, and planning is vectorized over arrays of crops.

Uniform assignment per crop (each Philox block yields four 64-bit words, turned into
doubles in [0, 1) as ``(word >> 11) * 2**-53``):

* block ``k`` for ``k = 0..9`` (attempt ``k``): word 0 -> area fraction, word 1 -> log
  aspect ratio, word 2 -> top offset, word 3 -> left offset;
* block 10: word 0 -> flip; words 1..3 are reserved (unused).

The geometry follows torchvision's ``RandomResizedCrop.get_params``: up to
``MAX_ATTEMPTS`` attempts, the first valid one wins, otherwise a center crop clamped to
the ratio range.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MAX_ATTEMPTS",
    "FLIP_BLOCK",
    "CropPolicy",
    "philox4x64",
    "uniform_from_u64",
    "plan_crops",
]

MAX_ATTEMPTS = 10
"""Number of random attempts before falling back to the center crop (as torchvision)."""

FLIP_BLOCK = MAX_ATTEMPTS
"""Philox block whose word 0 decides the horizontal flip."""

# Philox4x64 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
_M0 = 0xD2E7470EE14C6C93
_M1 = 0xCA5A826395121157
_W0 = 0x9E3779B97F4A7C15
_W1 = 0xBB67AE8584CAA73B
_MASK64 = (1 << 64) - 1
_MASK32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
_U11 = np.uint64(11)
_TWO_M53 = 2.0**-53

# Rows processed at a time by plan_crops: keeps temporaries cache-resident.
_CHUNK = 1 << 16


def _mulhilo(m: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (high, low) 64-bit halves of the 128-bit product ``m * x`` (m a constant)."""
    m_lo = np.uint64(m & 0xFFFFFFFF)
    m_hi = np.uint64(m >> 32)
    x_lo = x & _MASK32
    x_hi = x >> _U32
    # x*m = x_hi*m_hi*2^64 + (x_hi*m_lo + x_lo*m_hi)*2^32 + x_lo*m_lo; each partial
    # product is < 2^64 and each partial sum below is bounded so that it cannot wrap.
    mid = x_hi * m_lo
    mid += (x_lo * m_lo) >> _U32
    mid2 = x_lo * m_hi
    mid2 += mid & _MASK32
    hi = x_hi * m_hi
    hi += mid >> _U32
    hi += mid2 >> _U32
    lo = x * np.uint64(m)
    return hi, lo


def _round_keys(k0: Any, k1: Any, rounds: int) -> list[tuple[Any, Any]]:
    """Keys for each round: the Weyl sequence k + r*W (mod 2^64)."""
    if isinstance(k0, int):
        return [
            (np.uint64((k0 + r * _W0) & _MASK64), np.uint64((k1 + r * _W1) & _MASK64))
            for r in range(rounds)
        ]
    keys = [(k0, k1)]
    w0, w1 = np.uint64(_W0), np.uint64(_W1)
    for _ in range(rounds - 1):
        k0 = k0 + w0  # array add wraps modulo 2^64
        k1 = k1 + w1
        keys.append((k0, k1))
    return keys


def _philox_words(c0: Any, c1: Any, c2: Any, c3: Any, round_keys: list) -> tuple:
    """Philox4x64 on broadcastable uint64 columns (scalars allowed); returns 4 columns."""
    with np.errstate(over="ignore"):
        for k0, k1 in round_keys:
            hi0, lo0 = _mulhilo(_M0, c0)
            hi1, lo1 = _mulhilo(_M1, c2)
            hi1 ^= c1
            hi1 ^= k0
            hi0 ^= c3
            hi0 ^= k1
            c0, c1, c2, c3 = hi1, lo1, hi0, lo0
    return c0, c1, c2, c3


def philox4x64(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Encrypt counters with Philox4x64-``rounds`` (default 10, as ``np.random.Philox``).

    ``counter`` has shape (N, 4) and ``key`` shape (2,) or (N, 2); both are taken as
    uint64. Returns the (N, 4) uint64 output blocks. NumPy's ``np.random.Philox``
    increments its counter *before* encrypting, so ``Philox(counter=c, key=k)
    .random_raw(4)`` equals ``philox4x64(c + 1, k)`` (128-256 bit add with carry).
    """
    rounds = operator.index(rounds)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    ctr = np.asarray(counter, dtype=np.uint64)
    if ctr.ndim != 2 or ctr.shape[1] != 4:
        raise ValueError(f"counter must have shape (N, 4), got {ctr.shape}")
    k = np.asarray(key, dtype=np.uint64)
    if k.shape == (2,):
        k0: Any = int(k[0])
        k1: Any = int(k[1])
    elif k.ndim == 2 and k.shape == (ctr.shape[0], 2):
        k0, k1 = k[:, 0].copy(), k[:, 1].copy()
    else:
        raise ValueError(f"key must have shape (2,) or ({ctr.shape[0]}, 2), got {k.shape}")
    cols = [ctr[:, i].copy() for i in range(4)]
    out = _philox_words(*cols, _round_keys(k0, k1, rounds))
    return np.stack([np.broadcast_to(c, (ctr.shape[0],)) for c in out], axis=1)


def uniform_from_u64(u: np.ndarray) -> np.ndarray:
    """Map uint64 words to doubles in [0, 1) exactly as NumPy does: ``(u >> 11) * 2**-53``."""
    return (np.asarray(u, dtype=np.uint64) >> _U11).astype(np.float64) * _TWO_M53


@dataclass(frozen=True)
class CropPolicy:
    """RandomResizedCrop parameters: area fraction range, aspect range, flip probability."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        scale = self._pair("scale", self.scale)
        ratio = self._pair("ratio", self.ratio)
        if not (0.0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale}")
        if not (0.0 < ratio[0] <= ratio[1] < math.inf):
            raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio}")
        try:
            flip = float(self.flip_prob)
        except (TypeError, ValueError):
            raise ValueError(f"flip_prob must be a number, got {self.flip_prob!r}") from None
        if not (0.0 <= flip <= 1.0):
            raise ValueError(f"flip_prob must satisfy 0 <= flip_prob <= 1, got {flip}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "flip_prob", flip)

    @staticmethod
    def _pair(name: str, value: Any) -> tuple[float, float]:
        try:
            a, b = value
            pair = (float(a), float(b))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a pair of numbers, got {value!r}") from None
        if not all(math.isfinite(v) for v in pair):
            raise ValueError(f"{name} must be finite, got {pair}")
        return pair

    def to_dict(self) -> dict:
        """JSON-able form: ``{"scale": [a, b], "ratio": [a, b], "flip_prob": p}``."""
        return {"scale": list(self.scale), "ratio": list(self.ratio), "flip_prob": self.flip_prob}

    @classmethod
    def from_dict(cls, d: dict) -> "CropPolicy":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = set(d) - {"scale", "ratio", "flip_prob"}
        if unknown:
            raise ValueError(f"unknown CropPolicy field(s): {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        if "scale" in d:
            kwargs["scale"] = tuple(d["scale"])
        if "ratio" in d:
            kwargs["ratio"] = tuple(d["ratio"])
        if "flip_prob" in d:
            kwargs["flip_prob"] = d["flip_prob"]
        return cls(**kwargs)


def _u64_scalar(name: str, value: Any) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not (0 <= v < 1 << 64):
        raise ValueError(f"{name} must be a non-negative integer < 2**64, got {value!r}")
    return v


def _int_array(name: str, value: Any, minimum: int, maximum: int) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.kind not in "iu":
        if a.size == 0 and a.dtype.kind == "f":
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {lo}")
        if hi > maximum:
            raise ValueError(f"{name} must be <= {maximum}, got {hi}")
    return a


def plan_crops(
    plan_seed: int,
    image_index: Any,
    crop_seed: Any,
    height: Any,
    width: Any,
    policy: CropPolicy = CropPolicy(),
    stream: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Plan RandomResizedCrop windows and flips for a batch of crops.

    ``image_index``, ``crop_seed``, ``height`` and ``width`` are integer array-likes that
    broadcast together (scalars allowed); N is the size of the broadcast shape, which is
    flattened. Philox key = ``(plan_seed, stream)``; counter = ``(image_index, crop_seed,
    block, 0)`` (see the module docstring for the block/word assignment).

    Returns ``boxes`` (N, 4) int32 as ``(top, left, height, width)`` and ``flips`` (N,)
    bool. If none of the ``MAX_ATTEMPTS`` attempts fits, the torchvision center-crop
    fallback is used (its side is clamped to at least 1 pixel).
    """
    seed = _u64_scalar("plan_seed", plan_seed)
    strm = _u64_scalar("stream", stream)
    if not isinstance(policy, CropPolicy):
        raise ValueError(f"policy must be a CropPolicy, got {type(policy).__name__}")
    idx_a = _int_array("image_index", image_index, 0, (1 << 64) - 1)
    cs_a = _int_array("crop_seed", crop_seed, 0, (1 << 64) - 1)
    h_a = _int_array("height", height, 1, (1 << 31) - 1)
    w_a = _int_array("width", width, 1, (1 << 31) - 1)
    try:
        arrays = np.broadcast_arrays(idx_a, cs_a, h_a, w_a)
    except ValueError:
        raise ValueError(
            "image_index, crop_seed, height and width do not broadcast together: shapes "
            f"{idx_a.shape}, {cs_a.shape}, {h_a.shape}, {w_a.shape}"
        ) from None
    c0 = arrays[0].astype(np.uint64).ravel()
    c1 = arrays[1].astype(np.uint64).ravel()
    H = arrays[2].astype(np.float64).ravel()
    W = arrays[3].astype(np.float64).ravel()
    n = c0.size

    boxes = np.empty((n, 4), dtype=np.int32)
    flips = np.empty(n, dtype=bool)
    keys = _round_keys(seed, strm, 10)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        b, f = _plan_chunk(c0[sl], c1[sl], H[sl], W[sl], policy, keys)
        boxes[sl] = b
        flips[sl] = f
    return boxes, flips


def _plan_chunk(
    c0: np.ndarray, c1: np.ndarray, H: np.ndarray, W: np.ndarray, policy: CropPolicy, keys: list
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized get_params for one chunk of crops (H, W as float64)."""
    n = c0.size
    s0, s1 = policy.scale
    lr0, lr1 = math.log(policy.ratio[0]), math.log(policy.ratio[1])
    area = H * W
    zero = np.uint64(0)

    top = np.zeros(n, dtype=np.float64)
    left = np.zeros(n, dtype=np.float64)
    hh = np.zeros(n, dtype=np.float64)
    ww = np.zeros(n, dtype=np.float64)
    pending = np.arange(n)
    for attempt in range(MAX_ATTEMPTS):
        if pending.size == 0:
            break
        all_rows = pending.size == n
        p0 = c0 if all_rows else c0[pending]
        p1 = c1 if all_rows else c1[pending]
        pH = H if all_rows else H[pending]
        pW = W if all_rows else W[pending]
        pA = area if all_rows else area[pending]
        u = _philox_words(p0, p1, np.uint64(attempt), zero, keys)
        target = pA * (s0 + (s1 - s0) * uniform_from_u64(u[0]))
        aspect = np.exp(lr0 + (lr1 - lr0) * uniform_from_u64(u[1]))
        w = np.rint(np.sqrt(target * aspect))
        h = np.rint(np.sqrt(target / aspect))
        ok = (w > 0) & (w <= pW) & (h > 0) & (h <= pH)
        rows = pending[ok]
        h_ok, w_ok = h[ok], w[ok]
        span_h = pH[ok] - h_ok
        span_w = pW[ok] - w_ok
        top[rows] = np.minimum(np.floor(uniform_from_u64(u[2][ok]) * (span_h + 1)), span_h)
        left[rows] = np.minimum(np.floor(uniform_from_u64(u[3][ok]) * (span_w + 1)), span_w)
        hh[rows] = h_ok
        ww[rows] = w_ok
        pending = pending[~ok]

    if pending.size:  # torchvision's center-crop fallback
        pH, pW = H[pending], W[pending]
        rmin, rmax = policy.ratio
        in_ratio = pW / pH
        narrow = in_ratio < rmin
        wide = in_ratio > rmax
        fw = np.where(wide, np.rint(pH * rmax), pW)
        fh = np.where(narrow, np.rint(pW / rmin), pH)
        fw = np.clip(fw, 1, pW)
        fh = np.clip(fh, 1, pH)
        hh[pending] = fh
        ww[pending] = fw
        top[pending] = np.floor((pH - fh) / 2)
        left[pending] = np.floor((pW - fw) / 2)

    boxes = np.stack([top, left, hh, ww], axis=1).astype(np.int32)
    p = policy.flip_prob
    if p <= 0.0:  # u in [0, 1): u < 0 never holds, u < 1 always does
        flips = np.zeros(n, dtype=bool)
    elif p >= 1.0:
        flips = np.ones(n, dtype=bool)
    else:
        u = _philox_words(c0, c1, np.uint64(FLIP_BLOCK), zero, keys)
        flips = uniform_from_u64(u[0]) < p
    return boxes, flips


def plan_image_crops(plan_seed: int, start: int, stop: int, crops_per_image: int, heights: np.ndarray,
                     widths: np.ndarray, policy: CropPolicy = CropPolicy()) -> tuple[np.ndarray, np.ndarray]:
    """Crops ``0 .. crops_per_image - 1`` of images ``start .. stop - 1`` (``heights``/``widths``
    indexed by image): boxes ``(stop - start, S, 4)`` and flips ``(stop - start, S)``. A store
    is planned block by block with this, so planning memory does not grow with the store."""
    s = int(crops_per_image)
    img = np.repeat(np.arange(start, stop), s)
    boxes, flips = plan_crops(plan_seed, img, np.tile(np.arange(s), stop - start), np.asarray(heights)[img],
                              np.asarray(widths)[img], policy)
    return boxes.reshape(stop - start, s, 4), flips.reshape(stop - start, s)
