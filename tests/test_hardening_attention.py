"""Bad and awkward input to the public attention functions, on every backend.

Bad input must raise a TypeError/ValueError that names the argument, before any kernel runs
(a Numba kernel does not check bounds). Awkward but valid input must give the right answer:
views give bitwise what a contiguous copy gives (the public functions copy them first), and
results are compared with the loop reference within ``helpers.attention_bounds`` (n * eps
times the sum of |terms| each result adds up).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import assert_attention_close, assert_close

import fastattn
from fastattn import _backend, kernels

BACKENDS = kernels.BACKENDS
DTYPES = [np.float32, np.float64]


def _qkv(B=2, Tq=4, Tk=5, d=3, dv=2, dtype=np.float64, seed=0, lead=None):
    rng = np.random.default_rng(seed)
    lead = (B,) if lead is None else lead
    q = rng.standard_normal(lead + (Tq, d)).astype(dtype)
    k = rng.standard_normal(lead + (Tk, d)).astype(dtype)
    v = rng.standard_normal(lead + (Tk, dv)).astype(dtype)
    dout = rng.standard_normal(lead + (Tq, dv)).astype(dtype)
    return q, k, v, dout


def _both(q, k, v, dout, backend, **kw):
    """Forward then backward through the public functions: (out, lse, dq, dk, dv)."""
    out, lse = fastattn.attention_forward(q, k, v, backend=backend, **kw)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    return (out, lse, *grads)


def _backward_args(dtype=np.float64):
    """Valid arguments for attention_backward, as a dict."""
    q, k, v, dout = _qkv(dtype=dtype)
    out, lse = fastattn.attention_forward(q, k, v, backend="vectorized")
    return dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)


def _call_backward(args, **kw):
    a = args
    return fastattn.attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                       **kw)


# ============================================================================ bad input

BAD_DTYPES = [np.int64, np.int32, np.float16, np.complex128, object, bool]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_non_float_qkv_raises_type_error_naming_the_argument(arg, dtype):
    q, k, v, _ = _qkv()
    args = dict(q=q, k=k, v=v)
    args[arg] = args[arg].astype(dtype)
    with pytest.raises(TypeError, match=rf"^{arg} must have dtype float32 or float64"):
        fastattn.attention_forward(**args)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex128, object],
                         ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("arg", ["dout", "q", "k", "v", "out", "lse"])
def test_non_float_backward_argument_raises_type_error_naming_it(arg, dtype):
    args = _backward_args()
    args[arg] = args[arg].astype(dtype)
    with pytest.raises(TypeError, match=rf"^{arg} must have dtype float32 or float64"):
        _call_backward(args)


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_mixed_float32_float64_raises_type_error_without_promotion(arg):
    """Decision: no dtype promotion. One float32 array among float64 ones is a TypeError that
    lists every argument's dtype (silently promoting would double the memory and hide bugs)."""
    q, k, v, _ = _qkv()
    args = dict(q=q, k=k, v=v)
    args[arg] = args[arg].astype(np.float32)
    with pytest.raises(TypeError, match=rf"share one dtype.*{arg}=float32"):
        fastattn.attention_forward(**args)


@pytest.mark.parametrize("arg", ["dout", "out", "lse"])
def test_mixed_dtypes_in_backward_raise_type_error(arg):
    args = _backward_args()
    args[arg] = args[arg].astype(np.float32)
    with pytest.raises(TypeError, match=rf"share one dtype.*{arg}=float32"):
        _call_backward(args)


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_one_dimensional_input_raises_value_error(arg):
    q, k, v, _ = _qkv(B=1)
    args = dict(q=q[0], k=k[0], v=v[0])  # 2-D is fine: (T, d)
    fastattn.attention_forward(**args)
    args[arg] = args[arg][0]  # 1-D
    with pytest.raises(ValueError, match=rf"^{arg} must have at least 2 dimensions"):
        fastattn.attention_forward(**args)


def test_mismatched_d_raises_value_error():
    q, k, v, _ = _qkv(d=3)
    with pytest.raises(ValueError, match=r"k must have last dimension d=3"):
        fastattn.attention_forward(q, k[..., :2], v)


def test_mismatched_tk_between_k_and_v_raises_value_error():
    q, k, v, _ = _qkv(Tk=5)
    with pytest.raises(ValueError, match=r"v must have Tk=5 rows"):
        fastattn.attention_forward(q, k, v[:, :4])


def test_mismatched_leading_dimensions_raise_value_error():
    """Axis -3 is the head axis (grouped-query attention allows fewer key/value heads that
    divide the query heads); every other leading dimension must match."""
    q, k, v, _ = _qkv(B=3)
    with pytest.raises(ValueError, match="must be a multiple of k's and v's Hkv=2"):
        fastattn.attention_forward(q, k[:2], v[:2])
    q, k, v, _ = _qkv(lead=(2, 3))
    with pytest.raises(ValueError, match="leading dimensions"):
        fastattn.attention_forward(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="v must have k's leading dimensions"):
        fastattn.attention_forward(q, k, v[:, :1])
    with pytest.raises(ValueError, match="same number of dimensions"):
        fastattn.attention_forward(q[None], k, v)


@pytest.mark.parametrize("where", ["Tq", "Tk", "d", "dv"])
def test_zero_length_sequence_or_feature_raises_value_error(where):
    """Decision: an empty batch is fine (empty results), but a sequence or feature axis of
    length 0 is a ValueError: a query with no keys at all is almost surely a bug upstream."""
    sizes = dict(Tq=3, Tk=4, d=2, dv=2)
    sizes[where] = 0
    q, k, v, _ = _qkv(**sizes)
    with pytest.raises(ValueError, match="at least 1"):
        fastattn.attention_forward(q, k, v)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (4,), (3, 1, 5), (2, 4, 5, 1), (3, 4, 5)],
                         ids=str)
def test_mask_that_does_not_broadcast_raises_value_error(shape):
    q, k, v, _ = _qkv(B=2, Tq=4, Tk=5)
    with pytest.raises(ValueError, match=r"^mask of shape .* does not broadcast to \(2, 4, 5\)"):
        fastattn.attention_forward(q, k, v, mask=np.ones(shape, dtype=bool))


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.float64], ids=lambda t: t.__name__)
def test_non_bool_mask_raises_type_error(dtype):
    q, k, v, _ = _qkv()
    mask = np.ones((4, 5), dtype=dtype)
    with pytest.raises(TypeError, match="^mask must be a boolean array"):
        fastattn.attention_forward(q, k, v, mask=mask)
    out, lse = fastattn.attention_forward(q, k, v, backend="vectorized")
    with pytest.raises(TypeError, match="^mask must be a boolean array"):
        fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, mask=mask)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_nan_or_inf_in_qkv_raises_value_error(arg, bad):
    q, k, v, _ = _qkv()
    args = dict(q=q, k=k, v=v)
    args[arg][1, 2, 0] = bad
    with pytest.raises(ValueError, match=rf"^{arg} contains NaN or inf"):
        fastattn.attention_forward(**args)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("arg", ["dout", "q", "k", "v", "out"])
def test_nan_or_inf_in_backward_inputs_raises_value_error(arg, bad):
    args = _backward_args()
    args[arg][0, 1, 0] = bad
    with pytest.raises(ValueError, match=rf"^{arg} contains NaN or inf"):
        _call_backward(args)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "+inf"])
def test_nan_or_plus_inf_lse_raises_value_error(bad):
    """-inf is a valid lse (a fully masked row); NaN and +inf never come out of the forward."""
    args = _backward_args()
    args["lse"][1, 0] = bad
    with pytest.raises(ValueError, match="^lse contains NaN or \\+inf"):
        _call_backward(args)


@pytest.mark.parametrize("arg, cut", [("lse", np.s_[:, :-1]), ("lse", np.s_[0]),
                                      ("dout", np.s_[:, :, :-1]), ("out", np.s_[:1])],
                         ids=["lse-short", "lse-1d", "dout", "out"])
def test_backward_argument_of_wrong_shape_raises_value_error(arg, cut):
    args = _backward_args()
    want = args[arg].shape
    args[arg] = args[arg][cut]
    with pytest.raises(ValueError, match="^" + re.escape(f"{arg} must have shape {want}")):
        _call_backward(args)


@pytest.mark.parametrize("scale, exc, msg", [
    ("0.5", TypeError, "^scale must be a real number"),
    (b"1", TypeError, "^scale must be a real number"),
    (np.array([1.0, 2.0]), TypeError, "^scale must be a real number"),
    (1j, TypeError, "^scale must be a real number"),
    (np.nan, ValueError, "^scale must be finite"),
    (np.inf, ValueError, "^scale must be finite"),
    (10**400, ValueError, "^scale must be finite"),  # was an OverflowError
], ids=["str", "bytes", "array", "complex", "nan", "inf", "int-beyond-float"])
def test_bad_scale_raises(scale, exc, msg):
    q, k, v, _ = _qkv()
    with pytest.raises(exc, match=msg):
        fastattn.attention_forward(q, k, v, scale=scale)


@pytest.mark.parametrize("p", [10**400, -(10**400)], ids=["huge", "-huge"])
def test_dropout_p_of_an_int_beyond_float_raises_value_error(p):
    """Was an OverflowError from float(dropout_p), in the functions, the layer and a
    checkpoint's configuration alike."""
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match=r"^dropout_p must be in \[0, 1\)"):
        fastattn.attention_forward(q, k, v, dropout_p=p, seed=0)
    with pytest.raises(ValueError, match=r"^dropout must be in \[0, 1\)"):
        fastattn.MultiHeadAttention(4, 2, dropout=p)


@pytest.mark.parametrize("causal", [np.array([True, False]), "yes", 2, None, 0.5],
                         ids=["array", "str", "two", "none", "float"])
def test_causal_that_is_not_a_bool_raises_type_error(causal):
    q, k, v, _ = _qkv()
    msg = "^causal must be False, True, 'top_left' or 'bottom_right'"
    with pytest.raises((TypeError, ValueError), match=msg):
        fastattn.attention_forward(q, k, v, causal=causal)


def test_causal_accepts_numpy_bools_and_zero_or_one():
    q, k, v, _ = _qkv()
    want = fastattn.attention_forward(q, k, v, causal=True, backend="vectorized")[0]
    for flag in (np.True_, 1, np.int64(1)):
        got = fastattn.attention_forward(q, k, v, causal=flag, backend="vectorized")[0]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [None, "abc", {"a": 1}, object()],
                         ids=["none", "str", "dict", "object"])
def test_non_array_input_raises_type_error(bad):
    q, k, v, _ = _qkv()
    with pytest.raises(TypeError, match="^q must"):
        fastattn.attention_forward(bad, k, v)


RAGGED = [[0.0, 1.0], [2.0]]  # nested lists of unequal lengths: no array


@pytest.mark.parametrize("name, call", [
    ("q", lambda q, k, v: fastattn.attention_forward(RAGGED, k, v)),
    ("mask", lambda q, k, v: fastattn.attention_forward(q, k, v, mask=[[True], [True, False]])),
    ("bias", lambda q, k, v: fastattn.attention_forward(q, k, v, bias=RAGGED)),
    ("alibi_slopes", lambda q, k, v: fastattn.attention_forward(q[None], k[None], v[None],
                                                                alibi_slopes=RAGGED)),
    ("cu_seqlens_q", lambda q, k, v: fastattn.attention_forward(
        q, k, v, cu_seqlens_q=[0, [1, 2]], cu_seqlens_k=[0, 5])),
    (r"outs\[0\]", lambda q, k, v: fastattn.merge_attention([RAGGED], [[0.0, 0.0]])),
    ("x", lambda q, k, v: fastattn.softmax(RAGGED)),
], ids=["q", "mask", "bias", "alibi", "cu_seqlens", "merge", "softmax"])
def test_ragged_nested_lists_raise_value_error_naming_the_argument(name, call):
    """NumPy's own error for these ('setting an array element with a sequence') named
    nothing."""
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match=f"^{name} must be an array, got nested sequences"):
        call(q, k, v)


@pytest.mark.parametrize("outs, lses", [(None, None), (5, [1.0]), ([np.zeros((2, 3))], None)],
                         ids=["none", "number", "lses-none"])
def test_merge_of_non_sequences_raises_type_error_naming_outs_and_lses(outs, lses):
    with pytest.raises(TypeError, match="^outs and lses must be sequences"):
        fastattn.merge_attention(outs, lses)


def _bad_calls():
    """(id, callable) pairs of calls with bad input, for the no-kernel-ran test."""
    q, k, v, dout = _qkv()
    args = _backward_args()
    nan_q = q.copy()
    nan_q[0, 0, 0] = np.nan
    yield "int q", lambda: fastattn.attention_forward(q.astype(int), k, v)
    yield "mixed", lambda: fastattn.attention_forward(q.astype(np.float32), k, v)
    yield "nan q", lambda: fastattn.attention_forward(nan_q, k, v)
    yield "1-D q", lambda: fastattn.attention_forward(q[0, 0], k, v)
    yield "d", lambda: fastattn.attention_forward(q, k[..., :1], v)
    yield "Tk", lambda: fastattn.attention_forward(q, k, v[:, :2])
    yield "mask shape", lambda: fastattn.attention_forward(q, k, v, mask=np.ones((3, 3), bool))
    yield "mask dtype", lambda: fastattn.attention_forward(q, k, v, mask=np.ones((4, 5)))
    yield "scale", lambda: fastattn.attention_forward(q, k, v, scale=np.nan)
    yield "causal", lambda: fastattn.attention_forward(q, k, v, causal="no")
    yield "lse shape", lambda: _call_backward({**args, "lse": args["lse"][:, :2]})
    yield "lse nan", lambda: _call_backward({**args, "lse": args["lse"] * np.nan})
    yield "dout shape", lambda: _call_backward({**args, "dout": args["dout"][:1]})
    yield "dout dtype", lambda: _call_backward({**args, "dout": args["dout"].astype("f4")})


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_rejected_before_any_kernel_runs(monkeypatch, backend):
    calls = []

    def tripwire(name, backend=None):
        def run(*args):
            calls.append(name)
            raise AssertionError(f"kernel {name} ran on bad input")
        return run

    bad_calls = list(_bad_calls())
    monkeypatch.setattr(_backend, "kernel", tripwire)
    with fastattn.use_backend(backend):
        for what, call in bad_calls:
            with pytest.raises((TypeError, ValueError)):
                call()
            assert not calls, what


# ============================================================================ awkward but valid


def _views(x, kind):
    """A non-contiguous view of the same values as ``x`` (B, T, d), of the given kind."""
    if kind == "reversed":  # the book's x[:, ::-1]; the values are those of the reversal
        return x[:, ::-1]
    if kind == "strided":
        big = np.zeros((x.shape[0], 2 * x.shape[1], 3 * x.shape[2]), x.dtype)
        big[:, ::2, ::3] = x
        return big[:, ::2, ::3]
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "transposed":
        return np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["reversed", "strided", "fortran", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_views_give_bitwise_the_result_of_a_contiguous_copy(backend, kind):
    q, k, v, dout = _qkv(B=3, Tq=6, Tk=7, d=4, dv=3, dtype=np.float32, seed=1)
    rng = np.random.default_rng(2)
    mask = rng.random((3, 6, 7)) < 0.8
    views = [_views(a, kind) for a in (q, k, v, dout)]
    assert not any(a.flags.c_contiguous for a in views)
    mview = _views(mask, kind)
    copies = [np.ascontiguousarray(a) for a in views]
    got = _both(*views, backend, causal=True, mask=mview)
    want = _both(*copies, backend, causal=True, mask=np.ascontiguousarray(mview))
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_big_endian_inputs_give_the_native_result(backend):
    q, k, v, dout = _qkv(dtype=np.float64, seed=3)
    swapped = [a.astype(a.dtype.newbyteorder(">" if a.dtype.byteorder != ">" else "<"))
               for a in (q, k, v, dout)]
    assert not any(a.dtype.isnative for a in swapped)
    got = _both(*swapped, backend, causal=True)
    want = _both(q, k, v, dout, backend, causal=True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype.isnative
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("Tq, Tk", [(1, 1), (1, 6), (6, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_length_one_sequences_match_the_loop_reference(backend, dtype, Tq, Tk):
    q, k, v, dout = _qkv(B=2, Tq=Tq, Tk=Tk, d=3, dv=2, dtype=dtype, seed=4)
    for causal in (False, True):
        got = _both(q, k, v, dout, backend, causal=causal)
        want = _both(q, k, v, dout, "loop", causal=causal)
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
            assert g.shape == w.shape and g.dtype == dtype, name
        assert_attention_close(got, want, q, k, v, dout, causal=causal)
    if Tk == 1:  # one key: the output is that key's value, with nothing to move in q or k
        out, _, dq, dk, _ = _both(q, k, v, dout, backend)
        assert_close(out, np.broadcast_to(v, out.shape), terms=np.abs(v), n=4, err_msg="out")
        # dq = scale * P (dP - D) k with P = 1 and dP = D = dout . v: only rounding is left
        dP = np.abs(dout.astype(np.float64)) @ np.abs(np.swapaxes(v, -1, -2).astype(np.float64))
        assert_close(dq, 0 * dq, terms=2 * dP * np.abs(k).max(), n=2 * dq.shape[-1] + 8,
                     err_msg="dq")
        assert_close(dk, 0 * dk, terms=2 * dP.sum(-2)[..., None] * np.abs(q).max(),
                     n=2 * dq.shape[-1] + Tq + 8, err_msg="dk")


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_returns_empty_results(backend, dtype, lead):
    q, k, v, dout = _qkv(Tq=3, Tk=4, d=2, dv=5, dtype=dtype, lead=lead)
    mask = np.ones(lead + (3, 4), dtype=bool)
    out, lse, dq, dk, dv = _both(q, k, v, dout, backend, causal=True, mask=mask)
    assert out.shape == lead + (3, 5) and lse.shape == lead + (3,)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert all(a.dtype == dtype for a in (out, lse, dq, dk, dv))


@pytest.mark.parametrize("sign", [1, -1], ids=["+1e4", "-1e4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_1e4_give_finite_outputs_and_gradients(backend, dtype, sign):
    """q and k scaled up so that the largest logits are about ±1e4: the softmax is nearly
    one-hot, and exp must not overflow. Checked: every result finite, out within the range of
    the value rows, and float64 results equal to the loop reference (rtol 1e-9, atol 1e-8:
    the gradients are tiny differences of nearly equal numbers)."""
    q, k, v, dout = _qkv(B=2, Tq=5, Tk=6, d=4, dv=3, dtype=dtype, seed=5)
    q = q / np.abs(q).max() * dtype(100)
    k = k / np.abs(k).max() * dtype(100 * sign)
    s = np.einsum("bid,bjd->bij", q.astype(np.float64), k.astype(np.float64))
    assert 2e3 < np.abs(s).max() < 2e4  # logits of order 1e4 with scale 1
    got = _both(q, k, v, dout, backend, causal=True, scale=1.0)
    for name, g in zip(("out", "lse", "dq", "dk", "dv"), got, strict=True):
        assert np.isfinite(g).all(), name
    out = got[0]
    lo = v.min(axis=1, keepdims=True) - 1e-5
    hi = v.max(axis=1, keepdims=True) + 1e-5
    assert np.all((out >= lo) & (out <= hi))
    if dtype is np.float64:
        want = _both(q, k, v, dout, "loop", causal=True, scale=1.0)
        assert_attention_close(got, want, q, k, v, dout, causal=True, scale=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_that_overflow_the_dtype_raise_value_error_not_nan(backend):
    """float32 logits beyond 3.4e38 cannot be represented: a ValueError that says so, never
    inf or NaN in the results."""
    q, k, v, dout = _qkv(dtype=np.float32, seed=6)
    q *= np.float32(1e20)
    k *= np.float32(1e20)
    with pytest.raises(ValueError, match="logits .* overflow float32"):
        out, lse = fastattn.attention_forward(q, k, v, backend=backend)
        # the loop reference computes the logits in float64: its forward may succeed, but its
        # float32 lse is then too coarse for the backward
        fastattn.attention_backward(dout, q, k, v, out, lse, backend=backend)


@pytest.mark.parametrize("fake", ["nan out", "+inf lse", "lost row", "inf grad"])
def test_non_finite_or_lost_kernel_results_raise_value_error(monkeypatch, fake):
    """Whatever a kernel makes of overflowing logits (NaN, inf, or a row that it treats as
    fully masked although it has keys), the public functions raise instead of returning it."""
    q, k, v, dout = _qkv(seed=12)
    mask = np.ones((2, 4, 5), dtype=bool)
    mask[0, 1] = False  # a truly empty row: lse -inf there is right
    out, lse = fastattn.attention_forward(q, k, v, mask=mask, backend="vectorized")
    bad_out, bad_lse = out.copy(), lse.copy()
    grads = [np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)]
    if fake == "nan out":
        bad_out[1, 2, 0] = np.nan
    elif fake == "+inf lse":
        bad_lse[1, 2] = np.inf
    elif fake == "lost row":
        bad_out[1, 2], bad_lse[1, 2] = 0, -np.inf
    else:
        grads[1][1, 0, 0] = np.inf
    results = {"attention_forward": (bad_out, bad_lse), "attention_backward": tuple(grads)}
    monkeypatch.setattr(_backend, "kernel", lambda name, backend=None: lambda *a: results[name])
    with pytest.raises(ValueError, match="overflow float64"):
        fastattn.attention_forward(q, k, v, mask=mask)
        fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask)


@pytest.mark.parametrize("row", [0, 2, 3])
def test_a_lost_causal_row_whose_first_key_is_its_own_position_raises(monkeypatch, row):
    """Under causal, key i is allowed for query i: a row whose mask allows key i first (and
    perhaps later keys, which causal forbids) has one key, so a kernel that returns it empty
    has lost it to an overflow, and the public function raises."""
    q, k, v, _ = _qkv(seed=12)
    mask = np.ones((2, 4, 5), dtype=bool)
    mask[:, row, :row] = False  # key `row` is the row's first allowed key
    out, lse = fastattn.attention_forward(q, k, v, mask=mask, causal=True, backend="vectorized")
    assert np.isfinite(lse).all()
    bad_out, bad_lse = out.copy(), lse.copy()
    bad_out[1, row], bad_lse[1, row] = 0, -np.inf
    monkeypatch.setattr(_backend, "kernel",
                        lambda name, backend=None: lambda *a: (bad_out, bad_lse))
    with pytest.raises(ValueError, match="overflow float64"):
        fastattn.attention_forward(q, k, v, mask=mask, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_row_whose_only_keys_come_later_is_fully_masked(backend):
    """mask allows row 0 only keys 2.., causal forbids them: a fully masked row, not an
    error; row 1 of entry 1 may attend key 1 only."""
    q, k, v, dout = _qkv(B=2, Tq=4, Tk=5, seed=13)
    mask = np.ones((2, 4, 5), dtype=bool)
    mask[:, 0, :2] = False
    mask[1, 1] = [False, True, False, False, False]
    out, lse, dq, dk, dv = _both(q, k, v, dout, backend, mask=mask, causal=True)
    assert np.all(lse[:, 0] == -np.inf) and not out[:, 0].any() and not dq[:, 0].any()
    assert_close(out[1, 1], v[1, 1], terms=np.abs(v[1, 1]), n=4, err_msg="out[1, 1]")
    # the same through compact masks: keys 0 and 1 padded away for every row; with causal,
    # rows 0 and 1 have nothing left, rows 2 and 3 do
    keys = np.array([False, False, True, True, True])
    for m in (keys, np.broadcast_to(keys, (4, 5)).copy(), keys[None, None]):
        got = fastattn.attention_forward(q, k, v, mask=m, causal=True, backend=backend)[1]
        assert np.all(got[:, :2] == -np.inf) and np.isfinite(got[:, 2:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_more_queries_than_keys_and_a_fully_masked_row(backend):
    """Rows i >= Tk see every key under causal; a mask that removes all of row 4 still makes
    it fully masked (not an overflow), and row 5 is unaffected."""
    q, k, v, dout = _qkv(B=2, Tq=6, Tk=2, seed=14)
    mask = np.ones((6, 2), dtype=bool)
    mask[4] = False
    out, lse, dq, dk, dv = _both(q, k, v, dout, backend, mask=mask, causal=True)
    assert np.all(lse[:, 4] == -np.inf) and not out[:, 4].any() and not dq[:, 4].any()
    assert np.isfinite(np.delete(lse, 4, axis=1)).all()
    want = _both(q, k, v, dout, "loop", mask=mask, causal=True)
    assert_attention_close((out, lse, dq, dk, dv), want, q, k, v, dout, mask=mask, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_row_gives_zeros_and_zero_gradients(backend, dtype):
    q, k, v, dout = _qkv(B=2, Tq=4, Tk=5, d=3, dv=2, dtype=dtype, seed=7)
    mask = np.ones((2, 4, 5), dtype=bool)
    mask[0, 2] = False  # one row of entry 0
    mask[1] = False  # all of entry 1
    out, lse, dq, dk, dv = _both(q, k, v, dout, backend, mask=mask)
    assert np.all(out[0, 2] == 0) and np.all(out[1] == 0)
    assert lse[0, 2] == -np.inf and np.all(lse[1] == -np.inf)
    assert np.all(dq[0, 2] == 0)
    assert not dq[1].any() and not dk[1].any() and not dv[1].any()
    for name, g in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), strict=True):
        assert not np.isnan(g).any(), name
    # the masked row's dout moves nothing: only it nonzero gives all-zero gradients
    only = np.zeros_like(dout)
    only[0, 2] = dout[0, 2]
    grads = fastattn.attention_backward(only, q, k, v, out, lse, mask=mask, backend=backend)
    assert not any(g.any() for g in grads)
    # and the other rows are right
    want = _both(q, k, v, dout, "loop", mask=mask)
    assert_attention_close((out, lse, dq, dk, dv), want, q, k, v, dout, mask=mask)


MASK_SHAPES = [(7,), (1, 7), (5, 7), (5, 1), (2, 1, 1, 7), (1, 3, 5, 7), (2, 3, 5, 7),
               (2, 1, 5, 7), (3, 1, 7), (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_broadcast_over_leading_dims_matches_the_full_mask(backend, shape):
    """Every way a mask may broadcast to (2, 3, Tq=5, Tk=7) gives what the full mask gives."""
    q, k, v, dout = _qkv(Tq=5, Tk=7, d=3, dv=2, lead=(2, 3), seed=8)
    rng = np.random.default_rng(9)
    mask = rng.random(shape) < 0.6
    full = np.ascontiguousarray(np.broadcast_to(mask, (2, 3, 5, 7)))
    got = _both(q, k, v, dout, backend, mask=mask, causal=True)
    want = _both(q, k, v, dout, "loop", mask=full, causal=True)
    assert_attention_close(got, want, q, k, v, dout, mask=full, causal=True)


def test_nested_lists_are_accepted_as_float64_arrays():
    q, k, v, dout = _qkv(seed=10)
    got = fastattn.attention_forward(q.tolist(), k.tolist(), v.tolist(), backend="vectorized")
    want = fastattn.attention_forward(q, k, v, backend="vectorized")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float64
        np.testing.assert_array_equal(g, w)


# ============================================================================ softmax


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_of_any_ndim_matches_the_definition(backend):
    rng = np.random.default_rng(11)
    for shape in [(5,), (3, 4), (2, 3, 4), (2, 1, 3, 4)]:
        x = rng.standard_normal(shape)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        y = fastattn.softmax(x, backend=backend)
        assert y.shape == shape
        assert_close(y, e / e.sum(axis=-1, keepdims=True), terms=np.abs(y),
                     n=shape[-1] + 2 * float(np.ptp(x, axis=-1).max()) + 8, err_msg=str(shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_of_minus_inf_rows_and_empty_input(backend):
    x = np.array([[-np.inf, -np.inf], [0.0, -np.inf]])
    np.testing.assert_array_equal(fastattn.softmax(x, backend=backend), [[0, 0], [1, 0]])
    assert fastattn.softmax(np.zeros((0, 3)), backend=backend).shape == (0, 3)


@pytest.mark.parametrize("bad, exc", [(np.array([1, 2]), TypeError),
                                      (np.array([0.0, np.nan]), ValueError),
                                      (np.array([0.0, np.inf]), ValueError),
                                      (np.float64(1.0), ValueError),
                                      (np.zeros((2, 0)), ValueError)],
                         ids=["int", "nan", "+inf", "0-d", "empty-last-axis"])
def test_softmax_bad_input_raises_naming_x(bad, exc):
    with pytest.raises(exc, match="^x "):
        fastattn.softmax(bad)
