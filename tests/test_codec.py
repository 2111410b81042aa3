"""Tests for hald_store.codec: exact layout, documented error bounds, edge cases, errors.

Error bounds asserted here (g = exact gap, s = stored fp16 scale, L = levels):

* indices: exactly the true top-k, descending, ties -> lower class index first;
* fp32: gaps exact to float32 rounding; rest mass at T_b exact (< 1e-5);
* fp16: |err| <= 2**-11 * g (+ float32 rounding and 2**-24 absolute);
* uint8 / uint4: |err| <= s / (2L) + |s - last gap| (fp16 rounding of the scale); a gap > 0 is
  never stored as code 0 (strict top-1), so gaps below s / (2L) have |err| <= s / L;
* probabilities at any T: |log p - log p_exact| <= 2 * max logit error / T, where p_exact is
  the exact marginal-smoothed distribution (what fp32 stores);
* the top-1 class of the decoded dense distribution is the true top-1 for every codec.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hald_store.codec import (
    VALUE_CODECS,
    LabelCodec,
    TopKLabels,
    ValueCodec,
    dense_fp16_bytes_per_crop,
    dense_fp16_probs,
    register_value_codec,
)
from hald_store.convert import reencode_store
from hald_store.errors import HaldStoreError, StoreError, TeacherOutputError
from hald_store.store import LabelStore
from hald_store.verify import check_integrity, verify_store
from hald_train import TrainConfig, Trainer

T_BUILD = 4.0
TEMPS = (T_BUILD, 1.0, 20.0)
LEVELS = {"uint8": 255, "uint4": 15, "uint2": 3}
CASES = [(10, 1), (10, 5), (10, 9), (10, 10), (100, 5), (100, 20), (1000, 10), (1000, 1)]


# ---------------------------------------------------------------------------------- helpers
def realistic_logits(n: int, c: int, seed: int = 0) -> np.ndarray:
    """Teacher-like logits: random normal background, one boosted class per row chosen so that
    its softmax probability at T=1 is uniform in [0.3, 0.99], plus a random per-row offset."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.5, 3.0, size=(n, 1))
    z = rng.normal(size=(n, c)) * spread
    target = rng.integers(0, c, size=n)
    p = rng.uniform(0.3, 0.99, size=n)
    others = z.copy()
    others[np.arange(n), target] = -np.inf
    m = others.max(axis=1)
    lse_others = m + np.log(np.exp(others - m[:, None]).sum(axis=1))
    z[np.arange(n), target] = np.log(p / (1 - p)) + lse_others
    z += rng.normal(scale=5.0, size=(n, 1))
    return z.astype(np.float32)


def lse(x: np.ndarray, axis: int = 1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def truth(z: np.ndarray, k: int, t_build: float):
    """float64 reference: top-k indices (stable tie rule), exact gaps (N, m), smoothed logits."""
    z = z.astype(np.float64)
    n, c = z.shape
    order = np.argsort(-z, axis=1, kind="stable")
    idx = order[:, :k]
    top = np.take_along_axis(z, idx, axis=1)
    zmax = top[:, :1]
    gaps = zmax - top[:, 1:]
    if k < c:
        rest = np.take_along_axis(z, order[:, k:], axis=1)
        rest_gap = t_build * (math.log(c - k) - lse((rest - zmax) / t_build))
        gaps = np.concatenate([gaps, rest_gap[:, None]], axis=1)
    return idx, gaps


def smoothed_dense(idx: np.ndarray, gaps: np.ndarray, c: int) -> np.ndarray:
    """Dense (N, C) logits relative to the max from exact gaps (float64)."""
    n, k = idx.shape
    rest = -gaps[:, k - 1] if k < c else np.full(n, -np.inf)
    dense = np.repeat(rest[:, None], c, axis=1)
    top = np.concatenate([np.zeros((n, 1)), -gaps[:, : k - 1]], axis=1)
    np.put_along_axis(dense, idx, top, axis=1)
    return dense


def log_softmax(x: np.ndarray, t: float) -> np.ndarray:
    return x / t - lse(x / t)[:, None]


def decoded_gaps(labels: TopKLabels) -> np.ndarray:
    g = -labels.logits[:, 1:].numpy().astype(np.float64)
    if labels.top_k < labels.num_classes:
        g = np.concatenate([g, -labels.rest_logit.numpy().astype(np.float64)[:, None]], axis=1)
    return g


def gap_bound(codec: LabelCodec, enc: dict, g: np.ndarray) -> np.ndarray:
    """The documented per-gap error bound (N, m) for `codec` given the exact gaps `g`."""
    if codec.values == "fp32":
        return 2.0**-22 * g + 1e-6 * codec.temperature + 1e-30
    if codec.values == "fp16":
        return (2.0**-11 + 2.0**-22) * g + 2.0**-24
    levels = LEVELS[codec.values]
    s = enc["scale"].astype(np.float64)
    last = g[:, -1]
    fp16_round = np.abs(s - last)
    bound = np.repeat((s / (2 * levels) + fp16_round)[:, None], g.shape[1], axis=1)
    # strict top-1: positive gaps below s/(2L) are stored as code 1 instead of 0
    tiny = (g > 0) & (g < (s / (2 * levels))[:, None] * (1 + 1e-6))
    bound = np.where(tiny, (s / levels + fp16_round)[:, None], bound)
    bound[:, -1] = fp16_round  # the scale itself
    return bound * (1 + 1e-6) + 2.0**-22 * g + 1e-7


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("values", VALUE_CODECS)
@pytest.mark.parametrize("c,k", CASES)
def test_encode_matches_fields(values, c, k):
    codec = LabelCodec(values, k, c, T_BUILD)
    z = realistic_logits(17, c, seed=c + k)
    enc = codec.encode(z)
    spec = codec.fields()
    assert set(enc) == set(spec)
    for name, (dt, shape) in spec.items():
        assert enc[name].dtype == dt, name
        assert enc[name].shape == (17, *shape), name
    m = (k - 1) + (1 if k < c else 0)
    assert codec.num_gaps == m
    assert codec.bytes_per_crop() == sum(a.nbytes for a in enc.values()) // 17


def test_bytes_per_crop_table():
    expected = {
        (10, 5): {"fp32": 25, "fp16": 15, "uint8": 11, "uint4": 9},
        (1000, 10): {"fp32": 60, "fp16": 40, "uint8": 31, "uint4": 27},
    }
    for (c, k), table in expected.items():
        for values, nbytes in table.items():
            assert LabelCodec(values, k, c, 1.0).bytes_per_crop() == nbytes, (c, k, values)
    assert dense_fp16_bytes_per_crop(1000) == 2000


@pytest.mark.parametrize("c,dt", [(2, np.uint8), (256, np.uint8), (257, np.uint16),
                                  (65536, np.uint16), (65537, np.uint32)])
def test_index_dtype(c, dt):
    assert LabelCodec("uint8", 1, c, 1.0).fields()["indices"][0] == np.dtype(dt)


def test_uint32_indices_roundtrip():
    c = 70000
    z = realistic_logits(3, c, seed=5)
    codec = LabelCodec("fp16", 4, c, 2.0)
    enc = codec.encode(z)
    assert enc["indices"].dtype == np.uint32
    idx, _ = truth(z, 4, 2.0)
    assert np.array_equal(codec.decode(enc).indices.numpy(), idx)
    assert codec.decode({k: torch.from_numpy(v.astype(np.int64) if k == "indices" else v)
                         for k, v in enc.items()}).indices.tolist() == idx.tolist()


# ---------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("values", VALUE_CODECS)
@pytest.mark.parametrize("c,k", CASES)
def test_indices_gaps_and_probability_bounds(values, c, k):
    n = 400
    z = realistic_logits(n, c, seed=10 * c + k)
    codec = LabelCodec(values, k, c, T_BUILD)
    enc = codec.encode(z)
    labels = codec.decode(enc)
    idx, g = truth(z, k, T_BUILD)

    # indices: exactly the true top-k in the documented order
    assert labels.indices.dtype == torch.int64
    assert np.array_equal(labels.indices.numpy(), idx)
    assert labels.logits.dtype == torch.float32 and labels.rest_logit.dtype == torch.float32
    assert torch.all(labels.logits[:, 0] == 0)

    # gaps: ascending, non-negative, within the documented bound
    dg = decoded_gaps(labels)
    assert np.all(dg >= 0) and np.all(np.diff(dg, axis=1) >= 0)
    err = np.abs(dg - g)
    bound = gap_bound(codec, enc, g)
    assert np.all(err <= bound), float(np.max(err - bound))

    # probabilities: |d log p| <= 2 * max logit error / T against the exact smoothed distribution
    row_err = err.max(axis=1) if err.shape[1] else np.zeros(n)
    exact = smoothed_dense(idx, g, c)
    for t in TEMPS:
        lp = labels.log_probs(t).numpy().astype(np.float64)
        lp_exact = log_softmax(exact, t)
        slack = 1e-5 + 2e-6 * np.abs(lp_exact)  # float32 evaluation of log_softmax over C terms
        assert np.all(np.abs(lp - lp_exact) <= (2 * row_err / t)[:, None] + slack), t
        p = labels.probs(t).numpy().astype(np.float64)
        p_exact = np.exp(lp_exact)
        assert np.all(np.abs(p - p_exact) <= p_exact * np.expm1(2 * row_err / t + 2e-5)[:, None]
                      + 1e-7), t
        assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)

    # top-1 of the decoded dense distribution is the teacher's top-1
    assert np.array_equal(labels.dense_logits().argmax(dim=1).numpy(), idx[:, 0])
    assert np.array_equal(labels.probs(1.0).argmax(dim=1).numpy(), idx[:, 0])


@pytest.mark.parametrize("c,k", CASES)
def test_fp32_exact_at_build_temperature(c, k):
    z = realistic_logits(300, c, seed=c * k)
    codec = LabelCodec("fp32", k, c, T_BUILD)
    labels = codec.decode(codec.encode(z))
    idx, _ = truth(z, k, T_BUILD)
    p_true = np.exp(log_softmax(z.astype(np.float64), T_BUILD))
    p = labels.probs(T_BUILD).numpy().astype(np.float64)
    # top-k probabilities exact, rest mass exact (marginal smoothing), at T_b
    top_true = np.take_along_axis(p_true, idx, axis=1)
    assert np.max(np.abs(np.take_along_axis(p, idx, axis=1) - top_true)) < 1e-6
    rest_true = 1.0 - top_true.sum(axis=1)
    rest = 1.0 - np.take_along_axis(p, idx, axis=1).sum(axis=1)
    assert np.max(np.abs(rest - rest_true)) < 1e-5
    # every rest class gets the same probability
    if k < c:
        mask = np.ones_like(p, dtype=bool)
        np.put_along_axis(mask, idx, False, axis=1)
        rest_p = p[mask].reshape(len(p), c - k)
        assert np.allclose(rest_p, rest_p[:, :1], rtol=1e-6, atol=0)
        assert np.max(np.abs(rest_p.sum(axis=1) - rest_true)) < 1e-5
    # gaps stored in float32: exactly the float32 differences of the float32 logits
    top32 = np.take_along_axis(z, idx, axis=1)
    assert np.array_equal(-labels.logits.numpy()[:, 1:], (top32[:, :1] - top32[:, 1:]))


def test_full_topk_is_exact_softmax_at_any_temperature():
    z = realistic_logits(200, 10, seed=3)
    codec = LabelCodec("fp32", 10, 10, T_BUILD)
    labels = codec.decode(codec.encode(z))
    assert torch.all(torch.isinf(labels.rest_logit)) and torch.all(labels.rest_logit < 0)
    for t in TEMPS:
        ref = torch.softmax(torch.from_numpy(z).double() / t, dim=1)
        assert torch.allclose(labels.probs(t).double(), ref, atol=1e-6, rtol=0)
        _, ptop, prest = labels.topk_probs(t)
        assert torch.all(prest == 0)
        assert torch.allclose(ptop.sum(dim=1), torch.ones(200), atol=1e-6)


def test_runner_up_gap_never_rounds_to_zero():
    """Near-tie between top-1 and runner-up: without the strict top-1 rule uint4 would decode
    both as logit 0 and argmax would pick the lower class index."""
    c, n = 10, 64
    rng = np.random.default_rng(1)
    z = rng.normal(size=(n, c)).astype(np.float32) * 3
    z[:, 0] = 50.0  # far ahead of everything -> large scale
    top = rng.integers(1, c, size=n)
    z[np.arange(n), top] = 50.0 + 1e-3  # true top-1, runner-up class 0 just 1e-3 behind
    for values in VALUE_CODECS:
        labels = LabelCodec(values, 3, c, T_BUILD).decode(LabelCodec(values, 3, c, T_BUILD).encode(z))
        assert np.array_equal(labels.indices[:, 0].numpy(), top), values
        assert torch.all(labels.logits[:, 1] < 0), values
        assert np.array_equal(labels.dense_logits().argmax(dim=1).numpy(), top), values
    enc = LabelCodec("uint4", 3, c, T_BUILD).encode(z)
    assert np.all(enc["codes"][:, 0] & 15 == 1)


# ---------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("values", VALUE_CODECS)
def test_ties_lower_index_first(values):
    rng = np.random.default_rng(2)
    z = rng.integers(0, 4, size=(300, 12)).astype(np.float32)  # many ties, incl. at the k-th place
    z[:5] = 1.0  # fully tied rows
    for k in (1, 3, 6, 11, 12):
        codec = LabelCodec(values, k, 12, T_BUILD)
        labels = codec.decode(codec.encode(z))
        idx, _ = truth(z, k, T_BUILD)
        assert np.array_equal(labels.indices.numpy(), idx), k
        assert np.array_equal(labels.dense_logits().argmax(dim=1).numpy(), idx[:, 0]), k
        assert np.array_equal(labels.indices[:5].numpy(), np.tile(np.arange(k), (5, 1)))


def test_ties_are_deterministic_in_torch_input_and_large_rows():
    # a tie at the k-th position in a wide row (the case torch.topk leaves unspecified)
    z = np.zeros((50, 1000), dtype=np.float32)
    z[:, 500:] = 1.0
    z[:, 999] = 2.0
    codec = LabelCodec("fp16", 10, 1000, 1.0)
    a = codec.encode(z)["indices"]
    b = codec.encode(torch.from_numpy(z))["indices"]
    assert np.array_equal(a, b)
    assert np.array_equal(a[0], [999, *range(500, 509)])


@pytest.mark.parametrize("values", VALUE_CODECS)
def test_all_equal_logits_scale_zero(values):
    z = np.full((8, 10), 3.25, dtype=np.float32)
    for k in (1, 4, 10):
        codec = LabelCodec(values, k, 10, T_BUILD)
        enc = codec.encode(z)
        if "scale" in enc:
            assert np.all(enc["scale"] == 0) and np.all(enc["codes"] == 0)
        labels = codec.decode(enc)
        for t in (T_BUILD, 1.0, 20.0):
            assert torch.allclose(labels.probs(t), torch.full((8, 10), 0.1), atol=1e-6)
        assert np.array_equal(labels.indices.numpy(), np.tile(np.arange(k), (8, 1)))


@pytest.mark.parametrize("values", VALUE_CODECS)
def test_two_classes(values):
    z = np.array([[1.0, 3.0], [5.0, -2.0], [0.0, 0.0]], dtype=np.float32)
    for k in (1, 2):
        codec = LabelCodec(values, k, 2, 1.0)
        assert codec.num_gaps == 1
        labels = codec.decode(codec.encode(z))
        assert labels.indices[:, 0].tolist() == [1, 0, 0]
        p = labels.probs(1.0)
        ref = torch.softmax(torch.from_numpy(z), dim=1)
        assert torch.allclose(p, ref, atol=2e-3), (values, k)  # C=2, k=1: rest logit is exact


@pytest.mark.parametrize("values", VALUE_CODECS)
def test_huge_logit_range_clamps_to_fp16_max(values):
    c, k = 10, 4
    rng = np.random.default_rng(4)
    z = rng.normal(size=(20, c)).astype(np.float32)
    z[:, 0] = 2e5  # all other gaps > 65504
    z[:10, 1] = 2e5 - 3.0
    z[10:, 1] = 2e5 - 1e5
    codec = LabelCodec(values, k, c, T_BUILD)
    enc = codec.encode(z)
    for name, arr in enc.items():
        if arr.dtype.kind == "f":
            assert np.all(np.isfinite(arr)), name
    labels = codec.decode(enc)
    dg = decoded_gaps(labels)
    idx, g = truth(z, k, T_BUILD)
    assert np.array_equal(labels.indices.numpy(), idx)
    if values == "fp32":
        assert np.allclose(dg, g, rtol=1e-6)
    else:
        # documented: gaps are clamped to 65504 (the largest float16)
        assert np.all(dg <= 65504.0)
        assert np.all(dg[:, -1] == 65504.0)
        assert np.all(np.abs(dg[:10, 0] - 3.0) <= 65504.0 / LEVELS.get(values, 255))  # a tiny gap: code 1, not 0
    # the clamp is invisible in the probabilities for any practical temperature
    for t in (1.0, 20.0, 100.0):
        ref = torch.from_numpy(np.exp(log_softmax(smoothed_dense(idx, g, c), t))).float()
        p = labels.probs(t)
        assert torch.all(torch.isfinite(p))
        if values in ("fp32", "fp16"):
            assert torch.allclose(p, ref, atol=1e-6), t
        assert torch.all(p.argmax(dim=1) == 0)


def test_extreme_float32_range_stays_finite():
    z = np.array([[3e38, -3e38, 0.0, 1.0]], dtype=np.float32)
    for values in VALUE_CODECS:
        codec = LabelCodec(values, 2, 4, 1.0)
        enc = codec.encode(z)
        assert all(np.all(np.isfinite(a)) for a in enc.values() if a.dtype.kind == "f")
        labels = codec.decode(enc)
        assert labels.probs(1.0)[0, 0] == 1.0


def test_empty_batch():
    for values in VALUE_CODECS:
        codec = LabelCodec(values, 3, 10, 1.0)
        enc = codec.encode(np.zeros((0, 10), dtype=np.float32))
        assert all(a.shape[0] == 0 for a in enc.values())
        labels = codec.decode(enc)
        assert len(labels) == 0 and labels.probs(2.0).shape == (0, 10)


def test_chunked_encode_equals_rowwise_blocks():
    z = realistic_logits(2500, 1000, seed=9)  # larger than one internal chunk (2097 rows)
    codec = LabelCodec("uint4", 10, 1000, T_BUILD)
    whole = codec.encode(z)
    parts = [codec.encode(z[i : i + 777]) for i in range(0, 2500, 777)]
    for name in whole:
        assert np.array_equal(whole[name], np.concatenate([p[name] for p in parts])), name


# ---------------------------------------------------------------------------------- API
@pytest.mark.parametrize("values", VALUE_CODECS)
def test_numpy_and_torch_inputs_identical(values):
    z = realistic_logits(100, 100, seed=11)
    codec = LabelCodec(values, 7, 100, T_BUILD)
    a = codec.encode(z)
    b = codec.encode(torch.from_numpy(z).requires_grad_())  # straight from a model's forward
    c = codec.encode(np.asfortranarray(z))  # non-contiguous input
    ro = z.copy()
    ro.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = codec.encode(ro)
    for name in a:
        assert isinstance(b[name], np.ndarray)
        assert np.array_equal(a[name], b[name]) and np.array_equal(a[name], c[name])
        assert np.array_equal(a[name], d[name])
    # float64 teacher output: same indices, same storage up to float32 rounding
    e = codec.encode(z.astype(np.float64))
    assert np.array_equal(a["indices"], e["indices"])
    # decode from NumPy (also read-only, as Zarr may return) and from torch: identical
    frozen = {k: v.copy() for k, v in a.items()}
    for v in frozen.values():
        v.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la = codec.decode(frozen)
    lb = codec.decode({k: torch.from_numpy(v) for k, v in a.items()})
    for attr in ("indices", "logits", "rest_logit"):
        assert torch.equal(getattr(la, attr), getattr(lb, attr))


@pytest.mark.parametrize("values", VALUE_CODECS)
@pytest.mark.parametrize("c,k", [(10, 3), (100, 100), (1000, 10), (10, 1)])
def test_topk_probs_consistent_with_probs(values, c, k):
    z = realistic_logits(64, c, seed=12)
    codec = LabelCodec(values, k, c, T_BUILD)
    labels = codec.decode(codec.encode(z))
    for t in TEMPS:
        p = labels.probs(t)
        idx, ptop, prest = labels.topk_probs(t)
        assert torch.equal(idx, labels.indices)
        assert torch.allclose(ptop, torch.gather(p, 1, idx), rtol=1e-5, atol=1e-7)
        if k < c:
            mask = torch.ones_like(p, dtype=torch.bool).scatter_(1, idx, False)
            assert torch.allclose(p[mask].view(64, c - k), prest[:, None].expand(64, c - k),
                                  rtol=1e-5, atol=1e-8)
        total = ptop.sum(dim=1) + (c - k) * prest
        assert torch.allclose(total, torch.ones(64), atol=1e-5)
        assert torch.allclose(labels.log_probs(t).exp(), p, atol=1e-6)


def test_topk_labels_container():
    z = realistic_logits(10, 100, seed=13)
    codec = LabelCodec("uint8", 5, 100, T_BUILD)
    labels = codec.decode(codec.encode(z))
    assert len(labels) == 10
    assert labels.dense_logits().shape == (10, 100)
    sub = labels[2:5]
    assert len(sub) == 3 and torch.equal(sub.indices, labels.indices[2:5])
    one = labels[4]
    assert len(one) == 1 and torch.equal(one.logits, labels.logits[4:5])
    assert torch.equal(labels[-1].rest_logit, labels.rest_logit[-1:])
    sel = labels[torch.tensor([0, 9])]
    assert torch.equal(sel.indices, labels.indices[[0, 9]])
    mask = np.zeros(10, dtype=bool)
    mask[[1, 3]] = True
    assert torch.equal(labels[torch.from_numpy(mask)].indices, labels.indices[[1, 3]])
    moved = labels.to("cpu")
    assert moved.num_classes == 100 and torch.equal(moved.logits, labels.logits)
    # dense: rest logit everywhere except the top-k
    dense = labels.dense_logits()
    assert torch.equal(torch.gather(dense, 1, labels.indices), labels.logits)
    assert int((dense == labels.rest_logit[:, None]).sum(dim=1).min()) >= 95


def test_uint4_packing_low_nibble_first():
    z = realistic_logits(50, 100, seed=14)
    k = 8  # m - 1 = 7 codes -> 4 bytes, last high nibble is padding
    enc4 = LabelCodec("uint4", k, 100, T_BUILD).encode(z)
    assert enc4["codes"].shape == (50, 4)
    assert np.all(enc4["codes"][:, -1] >> 4 == 0)
    codes = np.stack([enc4["codes"] & 15, enc4["codes"] >> 4], axis=2).reshape(50, 8)[:, :7]
    labels = LabelCodec("uint4", k, 100, T_BUILD).decode(enc4)
    s = enc4["scale"].astype(np.float32)[:, None]
    assert np.allclose(-labels.logits.numpy()[:, 1:], codes * (s / 15), rtol=1e-6)
    assert np.all(codes <= 15)


def test_uint2_packs_four_codes_per_byte_lowest_bits_first():
    z = realistic_logits(50, 100, seed=16)
    codec = LabelCodec("uint2", 7, 100, T_BUILD)  # m - 1 = 6 codes -> 2 bytes, the last 2 pairs padding
    enc = codec.encode(z)
    assert enc["codes"].shape == (50, 2) and codec.bytes_per_crop() == 7 + 2 + 2
    assert np.all(enc["codes"][:, -1] >> 4 == 0)
    codes = np.stack([(enc["codes"] >> s) & 3 for s in (0, 2, 4, 6)], axis=2).reshape(50, 8)[:, :6]
    assert np.all(np.diff(codes, axis=1) >= 0) and codes.max() == 3  # ascending gaps, all four levels used
    s = enc["scale"].astype(np.float32)[:, None]
    assert np.allclose(-codec.decode(enc).logits.numpy()[:, 1:], codes * s / 3, rtol=1e-6)


def test_codec_dict_roundtrip():
    for values in VALUE_CODECS:
        codec = LabelCodec(values, 10, 1000, 4.0)
        d = json.loads(json.dumps(codec.to_dict()))
        assert LabelCodec.from_dict(d) == codec
    assert LabelCodec("uint4", 3, 10, 2.0).to_dict() == {
        "name": "uint4", "configuration": {"version": 1, "levels": 15, "bits": 4, "top_k": 3, "num_classes": 10,
                                           "temperature": 2.0}}
    conf = LabelCodec("fp16", 1, 2, 1.0).to_dict()["configuration"]
    with pytest.raises(ValueError, match="'fp16' version 99 is not supported"):
        LabelCodec.from_dict({"name": "fp16", "configuration": {**conf, "version": 99}})
    with pytest.raises(ValueError, match="'int3' is not known"):
        LabelCodec.from_dict({"name": "int3", "configuration": conf})
    with pytest.raises(ValueError, match="written with levels=127"):
        LabelCodec.from_dict({"name": "uint8", "configuration": {**conf, "version": 1, "levels": 127}})
    with pytest.raises(ValueError, match="lack 'name' and 'configuration'"):
        LabelCodec.from_dict({"name": "fp16"})
    with pytest.raises(ValueError, match="top_k"):
        LabelCodec.from_dict({"name": "fp16", "configuration": {"version": 1, "num_classes": 2, "temperature": 1.0}})


@pytest.mark.parametrize("values", ["fp32", "fp16", "uint8", "uint4"])
def test_format_1_codec_settings_still_read(values):
    old = {"version": 1, "values": values, "top_k": 3, "num_classes": 10, "temperature": 20.0}
    assert LabelCodec.from_dict(old) == LabelCodec(values, 3, 10, 20.0)
    with pytest.raises(ValueError, match="version 2"):
        LabelCodec.from_dict({**old, "version": 2})
    with pytest.raises(ValueError, match="top_k"):
        LabelCodec.from_dict({k: v for k, v in old.items() if k != "top_k"})


def test_value_codecs_are_registered_classes():
    assert list(VALUE_CODECS)[:4] == ["fp32", "fp16", "uint8", "uint4"]
    assert all(issubclass(cls, ValueCodec) and cls.name == name for name, cls in VALUE_CODECS.items())
    codec = LabelCodec("uint4", 3, 10, 1.0)
    assert isinstance(codec.value_codec, VALUE_CODECS["uint4"]) and codec.index_field in codec.fields()
    with pytest.raises(ValueError, match="'uint8' is already registered"):
        register_value_codec(type("Again", (ValueCodec,), {"name": "uint8"}))
    with pytest.raises(TypeError):
        VALUE_CODECS["x"] = ValueCodec  # read-only: register_value_codec is the one way in


def test_dense_fp16_probs():
    z = realistic_logits(30, 1000, seed=15)
    ref = dense_fp16_probs(z, 2.0)
    assert ref.dtype == np.float16 and ref.shape == (30, 1000)
    assert ref.nbytes // 30 == dense_fp16_bytes_per_crop(1000)
    exact = np.exp(log_softmax(z.astype(np.float64), 2.0))
    assert np.all(np.abs(ref - exact) <= exact * 2.0**-11 + 2.0**-25)
    assert np.array_equal(dense_fp16_probs(torch.from_numpy(z), 2.0), ref)
    with pytest.raises(TeacherOutputError):
        dense_fp16_probs(np.full((2, 3), np.nan), 1.0)


# ---------------------------------------------------------------------------------- errors
def test_teacher_output_errors_name_rows():
    codec = LabelCodec("uint8", 3, 10, 1.0)
    z = realistic_logits(20, 10)
    bad = z.copy()
    bad[4, 2] = np.nan
    bad[17, 0] = np.inf
    with pytest.raises(TeacherOutputError, match=r"2 of 20 crops.*rows 4, 17"):
        codec.encode(bad)
    many = z.copy()
    many[3:15, 1] = -np.inf
    with pytest.raises(TeacherOutputError, match=r"rows 3, 4, 5, 6, 7 and 7 more"):
        codec.encode(torch.from_numpy(many))
    huge = z.copy()
    huge[0] = 3e38  # finite but the row sum overflows: not an error
    codec.encode(huge)
    with pytest.raises(TeacherOutputError, match="num_classes=10"):
        codec.encode(np.zeros((4, 11), dtype=np.float32))
    with pytest.raises(TeacherOutputError, match="shape"):
        codec.encode(np.zeros(10, dtype=np.float32))
    assert issubclass(TeacherOutputError, HaldStoreError)


def test_bad_codec_parameters():
    with pytest.raises(ValueError, match=r"values='int8'.*fp32, fp16, uint8, uint4"):
        LabelCodec("int8", 3, 10, 1.0)
    for k in (0, 11, -1):
        with pytest.raises(ValueError, match="top_k"):
            LabelCodec("fp16", k, 10, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        LabelCodec("fp16", True, 10, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        LabelCodec("fp16", 2.5, 10, 1.0)
    with pytest.raises(ValueError, match="num_classes"):
        LabelCodec("fp16", 1, 1, 1.0)
    for t in (0.0, -1.0, float("nan"), float("inf"), "hot"):
        with pytest.raises(ValueError, match="temperature"):
            LabelCodec("fp16", 1, 10, t)
    with pytest.raises(ValueError, match="temperature"):
        dense_fp16_probs(np.zeros((1, 3)), 0.0)
    codec = LabelCodec("uint8", np.int64(3), np.int64(10), 2)
    assert type(codec.top_k) is int and type(codec.temperature) is float


def test_decode_rejects_inconsistent_fields():
    codec = LabelCodec("uint8", 3, 10, 1.0)
    enc = codec.encode(realistic_logits(5, 10))
    with pytest.raises(StoreError, match="scale"):
        codec.decode({"indices": enc["indices"], "codes": enc["codes"]})
    with pytest.raises(StoreError, match="codes"):
        codec.decode({**enc, "codes": enc["codes"][:, :1]})
    with pytest.raises(StoreError, match="scale"):
        codec.decode({**enc, "scale": enc["scale"][:4]})


# ---------------------------------------------------------------------------------- format 1
FORMAT1 = Path(__file__).resolve().parent / "data" / "format1"  # written by make_format1.py (format-1 code)


def test_format_1_store_opens_reads_trains_verifies_and_converts(tmp_path, resnet20):
    root = Path(shutil.copytree(FORMAT1, tmp_path / "format1"))
    store = LabelStore.open(root / "store")
    assert store.attrs["format_version"] == 1 and store.attrs["codec"]["values"] == "uint4"
    assert store.codec == LabelCodec("uint4", 3, 10, 20.0)
    images, seeds = np.divmod(np.arange(store.num_images * store.crops_per_image), store.crops_per_image)
    labels, want = store.read(images, seeds), np.load(root / "labels.npz")
    for name in ("indices", "logits", "rest_logit"):
        assert np.array_equal(getattr(labels, name).numpy(), want[name]), name
    assert check_integrity(store).passed
    report = verify_store(store, root / "images", resnet20, sample=18, device="cpu")
    assert report.passed and report.num_crops == 18, str(report)
    run = tmp_path / "run"
    Trainer(TrainConfig(store=str(root / "store"), images=str(root / "images"), out_dir=str(run), schedule="soft:1",
                        batch_size=6, device="cpu", progress=False)).run()
    (line,) = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert line["kind"] == "soft" and math.isfinite(line["loss"]) and line["loss"] > 0
    new = reencode_store(store, tmp_path / "new", top_k=2, values="uint8", progress=False)
    assert new.attrs["format_version"] == 2 and new.attrs["codec"]["name"] == "uint8"
    assert new.settings.reencoded_from == store.codec
    expect = new.codec.encode(labels.dense_logits())  # what convert promises: decode, then encode anew
    assert all(np.array_equal(got, expect[k]) for k, got in new.read_fields(images, seeds).items())
