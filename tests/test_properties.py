"""Property tests (hypothesis) for the public attention functions on every backend.

Random shapes (B 0..4, Tq and Tk 1..40, d and dv 1..17), float32 and float64, causal or not,
no mask or a random mask of one of several broadcast shapes. The reference is the loop backend
when the case is small enough to be quick (B*Tq*Tk*(d+dv) <= LOOP_BUDGET), otherwise a dense
float64 NumPy computation written here. Results are judged by ``helpers.attention_bounds``
(n * eps times the sum of |terms| each result adds up, carried through the softmax).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_attention_close, attention_bounds, kernel_attention_probs

import fastattn
from fastattn import _checks, functional, kernels

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = kernels.BACKENDS
NAMES = ("out", "lse", "dq", "dk", "dv")
LOOP_BUDGET = 20_000
SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def cases(draw):
    """One attention problem: arrays, mask (or None), causal, and the full boolean mask of
    allowed entries (B, Tq, Tk) that the masking rule gives."""
    B = draw(st.integers(0, 4))
    Tq, Tk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    d, dv = draw(st.integers(1, 17)), draw(st.integers(1, 17))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    causal = draw(st.booleans())
    mask_shape = draw(st.sampled_from([None, (B, Tq, Tk), (B, 1, Tk), (Tq, Tk), (Tq, 1),
                                       (Tk,)]))
    p_allowed = draw(st.sampled_from([0.2, 0.6, 0.95]))
    magnitude = draw(st.sampled_from([1.0, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def r(*shape):
        return (magnitude * rng.standard_normal(shape)).astype(dtype)

    q, k, v, dout = r(B, Tq, d), r(B, Tk, d), r(B, Tk, dv), r(B, Tq, dv)
    mask = None if mask_shape is None else rng.random(mask_shape) < p_allowed
    allowed = np.ones((B, Tq, Tk), dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, (B, Tq, Tk))
    if causal:
        allowed &= np.tril(np.ones((Tq, Tk), dtype=bool))
    return dict(q=q, k=k, v=v, dout=dout, mask=mask, causal=causal, allowed=allowed)


def _run(case, backend):
    q, k, v, dout = case["q"], case["k"], case["v"], case["dout"]
    kw = dict(mask=case["mask"], causal=case["causal"], backend=backend)
    out, lse = fastattn.attention_forward(q, k, v, **kw)
    return (out, lse, *fastattn.attention_backward(dout, q, k, v, out, lse, **kw))


def _dense_reference(case):
    """Forward and backward in float64 NumPy with the full score matrix."""
    q, k, v, dout = (case[n].astype(np.float64) for n in ("q", "k", "v", "dout"))
    allowed = case["allowed"]
    scale = 1 / np.sqrt(q.shape[-1])
    s = np.where(allowed, scale * q @ k.transpose(0, 2, 1), -np.inf)  # (B, Tq, Tk)
    has = allowed.any(axis=-1, keepdims=True)  # (B, Tq, 1)
    m = np.where(has, s.max(axis=-1, keepdims=True, initial=-np.inf), 0)
    e = np.where(allowed, np.exp(s - m), 0)
    total = np.where(has, e.sum(axis=-1, keepdims=True), 1)
    p = e / total
    out = p @ v
    lse = np.where(has, m + np.log(total), -np.inf)[..., 0]
    dp = dout @ v.transpose(0, 2, 1)
    ds = p * (dp - (dout * out).sum(axis=-1, keepdims=True))
    dq = scale * ds @ k
    dk = scale * ds.transpose(0, 2, 1) @ q
    dvv = p.transpose(0, 2, 1) @ dout
    return out, lse, dq, dk, dvv


def _reference(case):
    B, Tq, d = case["q"].shape
    Tk, dv = case["v"].shape[1:]
    if B * Tq * Tk * (d + dv) <= LOOP_BUDGET:
        return _run(case, "loop")
    return _dense_reference(case)


@SETTINGS
@given(case=cases())
def test_every_backend_agrees_with_the_reference(case):
    want = _reference(case)
    q, k, v, dout = case["q"], case["k"], case["v"], case["dout"]
    dtype = q.dtype.type
    scale = 1 / np.sqrt(q.shape[-1])
    P = kernel_attention_probs(q, k, scale, False, case["allowed"])
    bounds = attention_bounds(q, k, v, P, scale=scale, dout=dout)
    for backend in BACKENDS:
        got = _run(case, backend)
        for name, g, w in zip(NAMES, got, want, strict=True):
            assert g.shape == w.shape and g.dtype == dtype, (backend, name)
        assert_attention_close(got, want, q, k, v, dout, bounds=bounds, err_msg=backend)


@SETTINGS
@given(case=cases())
def test_outputs_are_convex_combinations_of_allowed_values_and_gradients_finite(case):
    """out[b, i] lies within [min_j v[b, j], max_j v[b, j]] per feature over the allowed keys
    j (slack: 8 eps of the dtype times max |v|); lse is finite exactly for rows with an allowed
    key; rows with none give out 0; every gradient is finite."""
    v, allowed = case["v"], case["allowed"]
    dtype = v.dtype.type
    B, Tq, Tk = allowed.shape
    has = allowed.any(axis=-1)  # (B, Tq)
    vv = np.broadcast_to(v[:, None, :, :], (B, Tq, Tk, v.shape[-1]))  # (B, Tq, Tk, dv)
    sel = allowed[..., None]
    lo = np.where(sel, vv, np.inf).min(axis=2)  # (B, Tq, dv)
    hi = np.where(sel, vv, -np.inf).max(axis=2)
    slack = 8 * np.finfo(dtype).eps * max(1.0, float(np.abs(v).max(initial=0)))
    backends = BACKENDS if B * Tq * Tk * v.shape[-1] <= LOOP_BUDGET else BACKENDS[1:]
    for backend in backends:
        out, lse, dq, dk, dvv = _run(case, backend)
        assert np.array_equal(np.isfinite(lse), has), backend
        assert np.all(np.isneginf(lse[~has])) and not out[~has].any(), backend
        o = out[has]
        assert np.all(o >= lo[has] - slack) and np.all(o <= hi[has] + slack), backend
        for name, g in (("dq", dq), ("dk", dk), ("dv", dvv)):
            assert np.isfinite(g).all(), (backend, name)


@SETTINGS
@given(case=cases())
def test_rows_with_keys_follows_the_masking_rule(case):
    """The check that tells a fully masked row from a row lost to overflow agrees with the
    masking rule applied entry by entry."""
    if case["mask"] is None:
        return
    B, Tq, Tk = case["allowed"].shape
    compact = _checks.bool_mask(case["mask"], (B, Tq, Tk))
    has = functional._rows_with_keys(compact, case["causal"], Tq)
    np.testing.assert_array_equal(np.broadcast_to(has, (B, Tq)), case["allowed"].any(axis=-1))
