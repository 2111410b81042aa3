"""Tests for hald_store.crop_plan: Philox known answers, determinism, geometry, policy."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hald_store.crop_plan import (
    FLIP_BLOCK,
    MAX_ATTEMPTS,
    CropPolicy,
    philox4x64,
    plan_crops,
    uniform_from_u64,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
U64 = (1 << 64) - 1


def _words(value: int) -> list[int]:
    return [(value >> (64 * i)) & U64 for i in range(4)]


def _as_int(words) -> int:
    return sum(int(w) << (64 * i) for i, w in enumerate(words))


# --------------------------------------------------------------------------- Philox


@pytest.mark.parametrize("case", range(12))
def test_philox_matches_numpy(case: int) -> None:
    rng = np.random.default_rng(1000 + case)
    counter = [int(x) for x in rng.integers(0, U64, 4, dtype=np.uint64, endpoint=True)]
    if case % 4 == 1:  # carry out of word 0
        counter[0] = U64
    elif case % 4 == 2:  # carry through words 0..2
        counter[0] = counter[1] = counter[2] = U64
    elif case % 4 == 3:
        counter = [0, 0, 0, 0] if case == 3 else [U64 - 1, 5, 0, 0]
    key = rng.integers(0, U64, 2, dtype=np.uint64, endpoint=True)
    if case == 0:
        key = np.zeros(2, dtype=np.uint64)

    ref = np.random.Philox(counter=np.array(counter, dtype=np.uint64), key=key).random_raw(12)

    # NumPy increments the 256-bit counter (with carry) before each encryption.
    base = _as_int(counter)
    ctrs = np.array([_words((base + j) & ((1 << 256) - 1)) for j in (1, 2, 3)], dtype=np.uint64)
    np.testing.assert_array_equal(philox4x64(ctrs, key).ravel(), ref)
    np.testing.assert_array_equal(philox4x64(ctrs, np.tile(key, (3, 1))).ravel(), ref)


def test_philox_known_answer_zero() -> None:
    # Philox4x64-10 of counter 0, key 0 is NumPy's output for counter=-1 (wrapping).
    out = philox4x64(np.zeros((1, 4), dtype=np.uint64), np.zeros(2, dtype=np.uint64))
    ref = np.random.Philox(counter=np.full(4, U64, dtype=np.uint64), key=[0, 0]).random_raw(4)
    np.testing.assert_array_equal(out[0], ref)


def test_philox_per_row_keys_and_shapes() -> None:
    rng = np.random.default_rng(7)
    ctr = rng.integers(0, U64, (5, 4), dtype=np.uint64, endpoint=True)
    keys = rng.integers(0, U64, (5, 2), dtype=np.uint64, endpoint=True)
    out = philox4x64(ctr, keys)
    assert out.shape == (5, 4) and out.dtype == np.uint64
    for i in range(5):
        np.testing.assert_array_equal(out[i], philox4x64(ctr[i : i + 1], keys[i])[0])
    with pytest.raises(ValueError, match="counter"):
        philox4x64(np.zeros((3, 3), dtype=np.uint64), keys[0])
    with pytest.raises(ValueError, match="key"):
        philox4x64(ctr, np.zeros(3, dtype=np.uint64))


def test_uniform_matches_numpy_random() -> None:
    gen = np.random.Generator(np.random.Philox(key=[11, 22]))
    expected = gen.random(8)
    ctrs = np.array([[j, 0, 0, 0] for j in (1, 2)], dtype=np.uint64)
    got = uniform_from_u64(philox4x64(ctrs, np.array([11, 22], dtype=np.uint64)).ravel())
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- reference


def _reference_crop(plan_seed, stream, image_index, crop_seed, H, W, policy):
    """Scalar, loop-based transcription of torchvision's get_params on the same uniforms."""
    key = np.array([plan_seed, stream], dtype=np.uint64)

    def block(b):
        ctr = np.array([[image_index, crop_seed, b, 0]], dtype=np.uint64)
        return [float(x) for x in uniform_from_u64(philox4x64(ctr, key)[0])]

    area = H * W
    log_ratio = (math.log(policy.ratio[0]), math.log(policy.ratio[1]))
    box = None
    for attempt in range(MAX_ATTEMPTS):
        ua, ur, ut, ul = block(attempt)
        target_area = area * (policy.scale[0] + (policy.scale[1] - policy.scale[0]) * ua)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ur)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            box = (int(ut * (H - h + 1)), int(ul * (W - w + 1)), h, w)
            break
    if box is None:
        in_ratio = W / H
        if in_ratio < min(policy.ratio):
            w, h = W, int(round(W / min(policy.ratio)))
        elif in_ratio > max(policy.ratio):
            h, w = H, int(round(H * max(policy.ratio)))
        else:
            w, h = W, H
        box = ((H - h) // 2, (W - w) // 2, h, w)
    flip = block(FLIP_BLOCK)[0] < policy.flip_prob
    return box, flip


@pytest.mark.parametrize(
    "policy",
    [CropPolicy(), CropPolicy(scale=(0.5, 1.0), ratio=(0.5, 2.0), flip_prob=0.3),
     CropPolicy(scale=(0.9, 1.0), ratio=(3.0, 4.0))],
)
def test_matches_scalar_reference(policy: CropPolicy) -> None:
    rng = np.random.default_rng(3)
    n = 150
    idx = rng.integers(0, 10**6, n)
    seeds = rng.integers(0, 2**63, n)
    H = rng.integers(1, 600, n)
    W = rng.integers(1, 600, n)
    H[:10], W[:10] = 1, rng.integers(1, 50, 10)  # some degenerate / fallback shapes
    boxes, flips = plan_crops(42, idx, seeds, H, W, policy, stream=3)
    for i in range(n):
        box, flip = _reference_crop(42, 3, int(idx[i]), int(seeds[i]), int(H[i]), int(W[i]), policy)
        assert tuple(boxes[i]) == box, i
        assert bool(flips[i]) == flip, i


# --------------------------------------------------------------------------- determinism


def _sample_inputs(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 1_281_167, n), rng.integers(0, 2**40, n),
            rng.integers(1, 800, n), rng.integers(1, 800, n))


def test_output_types_and_shapes() -> None:
    boxes, flips = plan_crops(1, [[0, 1, 2]], [[5], [6]], 32, 48)
    assert boxes.shape == (6, 4) and boxes.dtype == np.int32
    assert flips.shape == (6,) and flips.dtype == np.bool_
    empty_b, empty_f = plan_crops(1, np.zeros(0, dtype=np.int64), 0, 10, 10)
    assert empty_b.shape == (0, 4) and empty_f.shape == (0,)


def test_order_chunk_and_scalar_independence() -> None:
    idx, seeds, H, W = _sample_inputs()
    boxes, flips = plan_crops(123, idx, seeds, H, W)

    perm = np.random.default_rng(1).permutation(idx.size)
    pb, pf = plan_crops(123, idx[perm], seeds[perm], H[perm], W[perm])
    np.testing.assert_array_equal(pb, boxes[perm])
    np.testing.assert_array_equal(pf, flips[perm])

    cuts = [0, 1, 17, 1000, 2500, idx.size]
    cb = np.concatenate([plan_crops(123, idx[a:b], seeds[a:b], H[a:b], W[a:b])[0]
                         for a, b in zip(cuts, cuts[1:])])
    np.testing.assert_array_equal(cb, boxes)

    for i in (0, 7, 4999):
        sb, sf = plan_crops(123, int(idx[i]), int(seeds[i]), int(H[i]), int(W[i]))
        assert sb.shape == (1, 4)
        np.testing.assert_array_equal(sb[0], boxes[i])
        assert sf[0] == flips[i]

    # dtype of the inputs does not matter
    ub, uf = plan_crops(123, idx.astype(np.uint64), seeds.astype(np.uint64),
                        H.astype(np.int16), W.astype(np.uint32))
    np.testing.assert_array_equal(ub, boxes)
    np.testing.assert_array_equal(uf, flips)


def test_large_plan_spans_chunks() -> None:
    n = 150_000  # more than one internal chunk
    idx = np.arange(n)
    b_all, f_all = plan_crops(9, idx, 3, 375, 500)
    b_part, f_part = plan_crops(9, idx[-1000:], 3, 375, 500)
    np.testing.assert_array_equal(b_all[-1000:], b_part)
    np.testing.assert_array_equal(f_all[-1000:], f_part)


_HASH_SNIPPET = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {root!r})
from hald_store.crop_plan import CropPolicy, plan_crops
rng = np.random.default_rng(0)
n = 5000
args = (rng.integers(0, 1_281_167, n), rng.integers(0, 2**40, n),
        rng.integers(1, 800, n), rng.integers(1, 800, n))
b, f = plan_crops(2**63 + 5, *args, CropPolicy.from_dict({policy}), stream=7)
print(hashlib.sha256(b.tobytes() + f.tobytes()).hexdigest())
"""


def test_determinism_across_processes() -> None:
    policy = CropPolicy(scale=(0.25, 1.0), flip_prob=0.4)
    b, f = plan_crops(2**63 + 5, *_sample_inputs(), policy, stream=7)
    local = hashlib.sha256(b.tobytes() + f.tobytes()).hexdigest()
    code = _HASH_SNIPPET.format(root=str(REPO_ROOT), policy=json.dumps(policy.to_dict()))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, check=True)
    assert res.stdout.strip() == local


# --------------------------------------------------------------------------- geometry


def _check_bounds(boxes, H, W):
    top, left, h, w = (boxes[:, i].astype(np.int64) for i in range(4))
    assert (top >= 0).all() and (left >= 0).all()
    assert (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()


def _fallback_box(H, W, policy):
    in_ratio = W / H
    rmin, rmax = policy.ratio
    w = np.where(in_ratio > rmax, np.rint(H * rmax), W)
    h = np.where(in_ratio < rmin, np.rint(W / rmin), H)
    w, h = np.clip(w, 1, W), np.clip(h, 1, H)
    return np.stack([(H - h) // 2, (W - w) // 2, h, w], axis=1).astype(np.int32)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (1, 500), (2, 3), (32, 32),
                                  (500, 375), (375, 500), (20, 900), (900, 20), (4000, 3)])
def test_bounds_and_ranges(size) -> None:
    Hs, Ws = size
    policy = CropPolicy()
    n = 4000
    boxes, _ = plan_crops(5, np.arange(n), 11, Hs, Ws, policy)
    H, W = np.full(n, Hs), np.full(n, Ws)
    _check_bounds(boxes, H, W)
    fb = _fallback_box(H.astype(float), W.astype(float), policy)
    accepted = ~(boxes == fb).all(axis=1)
    h, w = boxes[accepted, 2].astype(float), boxes[accepted, 3].astype(float)
    if accepted.any():
        # rounding of each side moves the area/aspect by at most half a pixel per side
        area_lo = (np.maximum(np.sqrt(policy.scale[0] * Hs * Ws) - 0.5, 0)) ** 2
        assert (h * w >= area_lo - 1e-9).all()
        assert (h * w <= Hs * Ws).all()
        aspect = w / h
        assert (aspect >= policy.ratio[0] * (1 - 0.5 / w) / (1 + 0.5 / h) - 1e-9).all()
        assert (aspect <= policy.ratio[1] * (1 + 0.5 / w) / (1 - 0.5 / h + 1e-12) + 1e-9).all()
    if size in {(32, 32), (500, 375), (375, 500)}:
        assert accepted.mean() > 0.5
    if size in {(1, 500), (4000, 3), (20, 900)}:
        assert not accepted.any()  # every attempt is too wide/tall: fallback only
        np.testing.assert_array_equal(boxes, fb)


def test_accepted_ranges_tight_on_large_images() -> None:
    policy = CropPolicy(scale=(0.2, 0.6), ratio=(0.5, 2.0))
    Hs = Ws = 2000
    boxes, _ = plan_crops(0, np.arange(20000), 0, Hs, Ws, policy)
    frac = boxes[:, 2].astype(float) * boxes[:, 3] / (Hs * Ws)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert frac.min() >= 0.2 * 0.998 and frac.max() <= 0.6 * 1.002
    assert aspect.min() >= 0.5 * 0.998 and aspect.max() <= 2.0 * 1.002
    # tops and lefts cover the full valid range roughly uniformly
    rel_top = boxes[:, 0] / np.maximum(Hs - boxes[:, 2], 1)
    assert 0.45 < rel_top.mean() < 0.55


def test_random_sizes_bounds() -> None:
    rng = np.random.default_rng(99)
    n = 50_000
    H = rng.integers(1, 1200, n)
    W = np.where(rng.random(n) < 0.2, rng.integers(1, 5, n), rng.integers(1, 1200, n))
    boxes, _ = plan_crops(17, rng.integers(0, 10**7, n), rng.integers(0, 10**9, n), H, W,
                          CropPolicy(scale=(0.01, 1.0), ratio=(0.2, 5.0)))
    _check_bounds(boxes, H, W)


def test_extreme_ratio_fallback_clamps_to_one_pixel() -> None:
    policy = CropPolicy(scale=(1.0, 1.0), ratio=(50.0, 100.0))
    boxes, _ = plan_crops(0, np.arange(100), 0, 30, 2)
    _check_bounds(boxes, np.full(100, 30), np.full(100, 2))
    boxes, _ = plan_crops(0, np.arange(100), 0, 30, 2, policy)
    _check_bounds(boxes, np.full(100, 30), np.full(100, 2))
    np.testing.assert_array_equal(boxes, np.tile([14, 0, 1, 2], (100, 1)))


# --------------------------------------------------------------------------- statistics


def test_flip_rate() -> None:
    n = 100_000
    for p in (0.5, 0.2):
        _, flips = plan_crops(8, np.arange(n), 1, 4, 4, CropPolicy(flip_prob=p))
        assert abs(flips.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert not plan_crops(8, np.arange(100), 1, 4, 4, CropPolicy(flip_prob=0.0))[1].any()
    assert plan_crops(8, np.arange(100), 1, 4, 4, CropPolicy(flip_prob=1.0))[1].all()


def test_inputs_change_the_plan() -> None:
    idx = np.arange(2000)
    base, base_f = plan_crops(1, idx, 0, 375, 500)
    variants = [plan_crops(2, idx, 0, 375, 500), plan_crops(1, idx, 0, 375, 500, stream=1),
                plan_crops(1, idx, 1, 375, 500), plan_crops(1, idx + 1, 0, 375, 500)]
    for boxes, flips in variants:
        assert (boxes != base).any(axis=1).mean() > 0.9
        assert 0.3 < (flips != base_f).mean() < 0.7
    # the same image with different crop seeds gets different windows
    b, _ = plan_crops(1, 0, np.arange(2000), 375, 500)
    assert len({tuple(r) for r in b}) > 1900


# --------------------------------------------------------------------------- validation


def test_policy_validation_and_roundtrip() -> None:
    for kwargs, field in [({"scale": (0.0, 1.0)}, "scale"), ({"scale": (0.6, 0.5)}, "scale"),
                          ({"scale": (0.5, 1.5)}, "scale"), ({"ratio": (0.0, 1.0)}, "ratio"),
                          ({"ratio": (2.0, 1.0)}, "ratio"), ({"flip_prob": -0.1}, "flip_prob"),
                          ({"flip_prob": 1.5}, "flip_prob"), ({"scale": (0.5,)}, "scale"),
                          ({"ratio": (1.0, float("inf"))}, "ratio")]:
        with pytest.raises(ValueError, match=field):
            CropPolicy(**kwargs)
    policy = CropPolicy(scale=(0.3, 0.9), ratio=(0.5, 2.0), flip_prob=0.25)
    d = json.loads(json.dumps(policy.to_dict()))
    assert d == {"scale": [0.3, 0.9], "ratio": [0.5, 2.0], "flip_prob": 0.25}
    assert CropPolicy.from_dict(d) == policy
    assert CropPolicy.from_dict(CropPolicy().to_dict()) == CropPolicy()
    assert CropPolicy(scale=[0.3, 0.9]) == CropPolicy(scale=(0.3, 0.9))
    with pytest.raises(ValueError, match="unknown"):
        CropPolicy.from_dict({"scale": [0.1, 1.0], "bogus": 1})


@pytest.mark.parametrize(
    "kwargs, name",
    [({"plan_seed": -1}, "plan_seed"), ({"plan_seed": 2**64}, "plan_seed"),
     ({"plan_seed": 1.5}, "plan_seed"), ({"stream": -2}, "stream"),
     ({"image_index": [0, -1]}, "image_index"), ({"crop_seed": -3}, "crop_seed"),
     ({"image_index": [0.5]}, "image_index"), ({"height": 0}, "height"),
     ({"width": [4, 0]}, "width"), ({"height": 2**31}, "height")],
)
def test_plan_input_validation(kwargs, name) -> None:
    args = {"plan_seed": 0, "image_index": [0, 1], "crop_seed": 0, "height": 10, "width": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        plan_crops(**args)


def test_broadcast_mismatch_is_value_error() -> None:
    with pytest.raises(ValueError, match="broadcast"):
        plan_crops(0, [0, 1, 2], [0, 1], 10, 10)


def test_max_plan_seed_accepted() -> None:
    idx = np.array([0, 2**64 - 1], dtype=np.uint64)
    boxes, _ = plan_crops(2**64 - 1, idx, 2**64 - 1, 10, 10, stream=2**64 - 1)
    _check_bounds(boxes, np.full(2, 10), np.full(2, 10))
