"""Attention features: dropout statistics, merge_attention, bad input, generated combinations.

Dropout bounds are binomial: a count of n independent keep decisions with probability 1 - p
lies within 6 standard deviations sqrt(n p (1 - p)) of n (1 - p) except with probability
below 1e-8; a mean over S seeds lies within 6 sqrt(var / S) of its expectation, var being the
exact variance of one dropout draw.
"""

from __future__ import annotations

import attention_cases as ac
import numpy as np
import pytest

import fastattn
from fastattn import kernels
from fastattn.kernels import _attention_rules as rules
from fastattn.kernels import vectorized_attention

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# ---- dropout ----------------------------------------------------------------------------------


def test_dropout_hash_is_the_same_function_in_python_and_numpy():
    z = vectorized_attention.dropout_factors(3, 4, 5, 0.4, 2**63 + 5, np.float64)
    for b in range(3):
        for i in range(4):
            for j in range(5):
                kept = rules.keep(2**63 + 5, b, i, j, rules.dropout_threshold(0.4))
                assert (z[b, i, j] != 0) == kept
    assert set(np.unique(z)) <= {0.0, 1 / 0.6}


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_a_fraction_of_one_minus_p(p):
    n = 8 * 128 * 128
    kept = np.count_nonzero(vectorized_attention.dropout_factors(8, 128, 128, p, 123,
                                                                 np.float32))
    assert abs(kept - n * (1 - p)) <= 6 * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("backend", ["vectorized", "numba"])
def test_dropout_mean_over_seeds_is_attention_without_dropout(backend):
    """E[out] over seeds is the dropout-free out: each kept weight is scaled by 1 / (1 - p).
    One draw of out[i, c] = sum_j z_ij P_ij v_jc has variance p / (1 - p) sum_j P_ij^2 v_jc^2
    (independent keeps); the mean of S draws is within 6 sqrt(var / S) of out."""
    rng = np.random.default_rng(0)
    c = ac.make(rng, Tq=4, Tk=16, d=4, dv=3)
    p, S = 0.4, 400
    q, k, v = c["q"], c["k"], c["v"]
    ref, lse = fastattn.attention_forward(q, k, v, backend="loop")
    P = np.exp(np.einsum("nhid,nhjd->nhij", q, k) / 2 - lse[..., None])  # scale 1/sqrt(4)
    var = p / (1 - p) * np.einsum("nhij,nhjc->nhic", P**2, v**2)
    outs = [fastattn.attention_forward(q, k, v, dropout_p=p, seed=s, backend=backend)[0]
            for s in range(S)]
    mean = np.mean(outs, axis=0)
    assert np.all(np.abs(mean - ref) <= 6 * np.sqrt(var / S) + 1e-12)
    assert np.std(outs, axis=0).min() > 0  # it did drop


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_dropout_depends_on_the_seed_and_keeps_lse(backend):
    c = ac.make(np.random.default_rng(1))
    q, k, v = c["q"], c["k"], c["v"]
    o0, l0 = fastattn.attention_forward(q, k, v, backend=backend)
    o1, l1 = fastattn.attention_forward(q, k, v, dropout_p=0.5, seed=1, backend=backend)
    o2, l2 = fastattn.attention_forward(q, k, v, dropout_p=0.5, seed=2, backend=backend)
    o1b, _ = fastattn.attention_forward(q, k, v, dropout_p=0.5, seed=1, backend=backend)
    np.testing.assert_array_equal(o1, o1b)
    assert not np.allclose(o1, o2) and not np.allclose(o1, o0)
    np.testing.assert_allclose(l1, l0, rtol=1e-13)
    np.testing.assert_allclose(l2, l0, rtol=1e-13)


# ---- merge_attention --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_merge_of_key_shares_is_attention_over_all_keys(backend):
    rng = np.random.default_rng(2)
    c = ac.make(rng, Tq=3, Tk=10)
    q, k, v = c["q"], c["k"], c["v"]
    mask = np.ones((3, 10), bool)
    mask[1, :4] = False  # row 1 sees nothing in the first share
    want = fastattn.attention_forward(q, k, v, mask=mask, backend="loop")
    parts = [fastattn.attention_forward(q, k[..., a:b, :], v[..., a:b, :],
                                        mask=mask[:, a:b], backend=backend)
             for a, b in ((0, 4), (4, 7), (7, 10))]
    out, lse = fastattn.merge_attention([o for o, _ in parts], [x for _, x in parts])
    np.testing.assert_allclose(out, want[0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(lse, want[1], rtol=0, atol=1e-13)


def test_merge_of_empty_rows_is_zero_and_minus_inf():
    outs = [np.ones((2, 3)), 2 * np.ones((2, 3))]
    lses = [np.array([-np.inf, 0.0]), np.array([-np.inf, -np.inf])]
    out, lse = fastattn.merge_attention(outs, lses)
    np.testing.assert_array_equal(out, [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(lse, [-np.inf, 0.0])


@pytest.mark.parametrize("outs, lses, exc, msg", [
    ([], [], ValueError, "non-empty"),
    ([np.zeros((2, 3))], [np.zeros(2), np.zeros(2)], ValueError, "one length"),
    ([np.zeros((2, 3))], [np.zeros(3)], ValueError, r"lses\[0\] must have shape \(2,\)"),
    ([np.zeros((2, 3)), np.zeros((2, 4))], [np.zeros(2)] * 2, ValueError, r"outs\[1\]"),
    ([np.zeros((2, 3))], [np.array([np.nan, 0])], ValueError, "NaN"),
    ([np.zeros((2, 3))], [np.array([0, np.inf])], ValueError, r"lses\[0\] contains NaN or \+inf"),
    ([np.zeros((2, 3), np.float32)], [np.zeros(2)], TypeError, "one dtype"),
    (np.zeros((1, 2, 3)), [np.zeros(2)], TypeError, "sequences"),
])
def test_merge_bad_input_raises(outs, lses, exc, msg):
    with pytest.raises(exc, match=msg):
        fastattn.merge_attention(outs, lses)


def test_merge_of_single_rows_with_scalar_lses():
    outs = [np.array([1.0, 2.0]), np.array([3.0, 4.0])]
    lses = [np.float64(0.0), np.array(-np.inf)]
    out, lse = fastattn.merge_attention(outs, lses)
    assert out.shape == (2,) and lse.shape == ()
    np.testing.assert_array_equal(out, [1.0, 2.0])
    assert lse == 0.0

# ---- bad input --------------------------------------------------------------------------------


def _qkv(H=4, Hkv=2, Tq=5, Tk=6, dtype=np.float64):
    c = ac.make(np.random.default_rng(0), dtype, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk)
    return c["q"], c["k"], c["v"]


BAD = [
    (dict(cu_seqlens_q=[0, 5]), ValueError, "given together"),
    (dict(cu_seqlens_q=[0, 5], cu_seqlens_k=[0, 2, 6]), ValueError, "same number"),
    (dict(cu_seqlens_q=[1, 5], cu_seqlens_k=[0, 6]), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=[0, 4], cu_seqlens_k=[0, 6]), ValueError, "end at the sequence axis"),
    (dict(cu_seqlens_q=[0, 3, 2, 5], cu_seqlens_k=[0, 1, 2, 6]), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=np.array([0, 3, 2, 5], np.uint64), cu_seqlens_k=[0, 1, 2, 6]),
     ValueError, "cu_seqlens_q must be non-decreasing"),  # unsigned: no wrap-around in diff
    (dict(cu_seqlens_q=[0.0, 5.0], cu_seqlens_k=[0, 6]), TypeError, "cu_seqlens_q must be an "
     "integer"),
    (dict(cu_seqlens_q=[[0, 5]], cu_seqlens_k=[0, 6]), ValueError, "cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_q=[0], cu_seqlens_k=[0]), ValueError, "n \\+ 1 >= 2"),
    (dict(bias=np.zeros((3, 5, 6))), ValueError, "bias of shape"),
    (dict(bias=np.zeros((4, 5, 6), np.float32)), TypeError, "bias must have q's dtype"),
    (dict(bias=np.full((5, 6), np.nan)), ValueError, "bias contains NaN"),
    (dict(bias=np.full((5, 6), np.inf)), ValueError, r"\+inf"),
    (dict(bias=np.where(np.arange(30).reshape(5, 6) == 17, np.nan, -np.inf)), ValueError,
     "bias contains NaN"),  # one NaN among -inf (which is allowed)
    (dict(bias=np.zeros((5, 6), int)), TypeError, "bias must have dtype float"),
    (dict(dropout_p=1.0, seed=0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1, seed=0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=np.nan, seed=0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p="0.1", seed=0), TypeError, "dropout_p must be a real number"),
    (dict(dropout_p=0.1), ValueError, "seed .* is required"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be an int"),
    (dict(window=(-1, 2)), ValueError, "window left must be >= 0"),
    (dict(window=(1, 2.0)), TypeError, "window right must be an int"),
    (dict(window=3), TypeError, "window must be None or a pair"),
    (dict(window=(1, 2, 3)), TypeError, "window must be None or a pair"),
    (dict(window=[1]), TypeError, "window must be None or a pair"),
    (dict(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes must be"),
    (dict(alibi_slopes=np.array([1, np.nan, 1, 1])), ValueError, "alibi_slopes contains NaN"),
    (dict(alibi_slopes=np.array(["a"] * 4)), TypeError, "alibi_slopes must be a real"),
    (dict(causal="bottom"), ValueError, "causal must be"),
    (dict(mask=np.ones((5, 6), int)), TypeError, "mask must be a boolean"),
    (dict(scale=np.complex128(1 + 2j)), TypeError, "scale must be a real number"),
    (dict(scale=True), TypeError, "scale must be a real number"),
    (dict(scale=np.timedelta64(3)), TypeError, "scale must be a real number"),
    (dict(window=(np.timedelta64(3), 1)), TypeError, "window left must be an int"),
]


@pytest.mark.parametrize("kw, exc, msg", BAD, ids=[f"{i}-{b[2][:20]}" for i, b in enumerate(BAD)])
@pytest.mark.parametrize("fn", ["forward", "backward"])
def test_bad_keyword_raises_naming_it(kw, exc, msg, fn):
    q, k, v = _qkv()
    with pytest.raises(exc, match=msg):
        if fn == "forward":
            fastattn.attention_forward(q, k, v, **kw)
        else:
            out = np.zeros(q.shape[:-1] + v.shape[-1:])
            fastattn.attention_backward(out, q, k, v, out, out[..., 0], **kw)


@pytest.mark.parametrize("H, Hkv", [(4, 3), (2, 4), (3, 0)])
def test_head_count_that_is_not_a_multiple_raises(H, Hkv):
    q, _, _ = _qkv(H=H, Hkv=H)
    k = np.zeros((1, Hkv, 6, 3))
    with pytest.raises(ValueError, match=f"H={H} .* multiple of k's and v's Hkv={Hkv}"):
        fastattn.attention_forward(q, k, k.copy())


def test_alibi_without_a_head_axis_raises():
    q = np.zeros((4, 3))
    with pytest.raises(ValueError, match="alibi_slopes needs a head axis"):
        fastattn.attention_forward(q, q, q, alibi_slopes=np.ones(1))


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("window", [(None, 2**63 - 1), (2**63 - 1, 2**63 - 1), (2**64, 1),
                                    (1, 2**100)], ids=str)
def test_window_bounds_beyond_any_position_are_unbounded(backend, causal, window):
    c = ac.make(np.random.default_rng(3), Tq=5, Tk=6)
    q, k, v = c["q"], c["k"], c["v"]
    kw = dict(window=tuple(None if w is None or w > 6 else w for w in window), causal=causal)
    want = fastattn.attention_forward(q, k, v, backend="loop", **kw)
    got = fastattn.attention_forward(q, k, v, window=window, causal=causal, backend=backend)
    ac.assert_close(got, want, dict(c, kw=kw), backend)


@pytest.mark.parametrize("bias", [np.float64(0.5), np.array(0.5), 0.5], ids=type)
def test_dbias_of_a_scalar_bias_is_a_scalar(bias):
    q, k, v = _qkv()
    out, lse = fastattn.attention_forward(q, k, v, bias=bias)
    *_, dbias = fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, bias=bias)
    assert dbias.shape == ()

# ---- generated combinations -------------------------------------------------------------------


@st.composite
def _problems(draw):
    """A small problem with a random combination of features (grouped heads, packed sequences
    of random lengths, empty ones included, causal alignment, window, bias, ALiBi, dropout,
    mask, feature sizes)."""
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    n = draw(st.integers(0, 3))
    lq = [draw(st.integers(0, 4)) for _ in range(n)]
    lk = [draw(st.integers(0, 4)) for _ in range(n)]
    Tq, Tk = (sum(lq), sum(lk)) if n else (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    if Tq == 0 or Tk == 0:
        Tq, Tk, n = max(Tq, 1), max(Tk, 1), 0
    kw = {}
    if n:
        kw["cu_seqlens_q"] = np.cumsum([0] + lq)
        kw["cu_seqlens_k"] = np.cumsum([0] + lk)
    kw["causal"] = draw(st.sampled_from([False, True, "bottom_right"]))
    bound = st.one_of(st.none(), st.integers(0, 3))
    if draw(st.booleans()):
        kw["window"] = (draw(bound), draw(bound))
    if draw(st.booleans()):
        kw["bias"] = draw(st.sampled_from([(1, H, Tq, Tk), (H, 1, Tk), (Tq, 1), (Tk,)]))
    if draw(st.booleans()):
        kw["alibi_slopes"] = np.linspace(0.1, 1.0, H)
    if draw(st.booleans()):
        kw["dropout_p"], kw["seed"] = draw(st.sampled_from([0.2, 0.6])), draw(st.integers())
    seed = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):  # a mask of one of the broadcast shapes
        shape = draw(st.sampled_from([(Tq, Tk), (H, 1, Tk), (1, 1, Tq, 1)]))
        kw["mask"] = np.random.default_rng(seed + 1).random(shape) < 0.7
    d, dv = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return ac.make(np.random.default_rng(seed), np.float64, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, d=d,
                   dv=dv, **kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_generated_combinations_match_the_loop_reference(case):
    want = ac.run(case, "loop")
    for backend in ("vectorized", "numba"):
        ac.assert_close(ac.run(case, backend), want, case, backend)
