"""Every kernel of every backend against the loop reference, and the loop reference itself
against independent float64 NumPy formulas and central differences.

Every comparison uses the one rule of ``helpers.assert_close``: an error bound of n * eps times
the sum of |terms| each output adds up, derived for each kernel by ``helpers.kernel_bounds`` and
``helpers.attention_bounds``. Inputs are drawn in float64 and cast, so the loop reference (which
sums in Python floats and rounds once) and the kernel under test see the same numbers. Shapes
are tiny: the loop backend is slow on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_all_close,
    attention_bounds,
    kernel_attention_probs,
    kernel_attention_scores,
    kernel_bounds,
    llvm_ir,
)
from helpers.paths import record_paths, use_products
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastattn import kernels
from fastattn.kernels import _blas, _flash, _tuning, numba_backend
from fastattn.kernels._numba_math import FASTMATH, borrow, keep_alive, prefetch_rows, vexp

FAST = ("vectorized", "numba")
UNFUSED = (
    "softmax_forward",
    "softmax_backward",
    "weighted_sum_forward",
    "weighted_sum_backward",
    "scores_forward",
    "scores_backward",
    "embedding_backward",
)

# (B, Tq, Tk, d): T=1 both ways, Tq != Tk, and sizes that are not multiples of 4
SHAPES = [(1, 1, 1, 1), (2, 1, 6, 3), (3, 4, 7, 5), (2, 9, 9, 2), (2, 5, 1, 4)]
SCALE = 0.37
V = 6  # vocabulary of the embedding tests


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _inputs(name, shape, dtype, rng):
    """Arguments for kernel ``name`` at (B, Tq, Tk, d), float arrays in ``dtype``."""
    B, Tq, Tk, d = shape

    def a(*s):
        return rng.standard_normal(s).astype(dtype)

    if name == "softmax_forward":
        x = 2 * a(B, Tq, Tk)
        if B == 0:
            return (x,)
        x[0, 0, :] = -np.inf  # a row with nothing to attend to
        if Tk > 1:
            x[-1, -1, 0] = -np.inf  # one masked entry
        return (x,)
    if name == "softmax_backward":
        y = rng.random((B, Tq, Tk))
        return a(B, Tq, Tk), (y / y.sum(-1, keepdims=True)).astype(dtype)
    if name == "weighted_sum_forward":
        return a(B, Tq, Tk), a(B, Tk, d)
    if name == "weighted_sum_backward":
        return a(B, Tq, d), a(B, Tq, Tk), a(B, Tk, d)
    if name == "scores_forward":
        return a(B, Tq, d), a(B, Tk, d), SCALE
    if name == "scores_backward":
        return a(B, Tq, Tk), a(B, Tq, d), a(B, Tk, d), SCALE
    if name == "embedding_backward":
        return rng.integers(0, V, size=(B, Tq)), a(B, Tq, d), V
    raise AssertionError(name)


def _reference64(name, args):
    """The kernel's math written independently in float64 NumPy."""
    f = [np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f"
         else x for x in args]
    if name == "softmax_forward":
        (x,) = f
        m = x.max(-1, keepdims=True)
        e = np.exp(x - np.where(np.isneginf(m), 0.0, m))
        s = e.sum(-1, keepdims=True)
        return (np.divide(e, s, out=np.zeros_like(e), where=s > 0),)
    if name == "softmax_backward":
        dy, y = f
        return (y * dy - y * (y * dy).sum(-1, keepdims=True),)
    if name == "weighted_sum_forward":
        score, value = f
        return (np.einsum("bij,bjc->bic", score, value),)
    if name == "weighted_sum_backward":
        dz, score, value = f
        return np.einsum("bic,bjc->bij", dz, value), np.einsum("bij,bic->bjc", score, dz)
    if name == "scores_forward":
        q, k, scale = f
        return (scale * np.einsum("bic,bjc->bij", q, k),)
    if name == "scores_backward":
        ds, q, k, scale = f
        return scale * np.einsum("bij,bjc->bic", ds, k), scale * np.einsum("bij,bic->bjc", ds, q)
    if name == "embedding_backward":
        idx, dout, n_rows = f
        dW = np.zeros((n_rows, dout.shape[2]))
        np.add.at(dW, idx, dout)
        return (dW,)
    raise AssertionError(name)


def _assert_results(got, want, dtype, bounds, what=""):
    """Each result has ``dtype`` and is within its (terms, n) bound of its reference."""
    got, want = _as_tuple(got), _as_tuple(want)
    for g in got:
        assert isinstance(g, np.ndarray) and g.dtype == np.dtype(dtype), what
    assert_all_close(got, want, bounds, err_msg=what)


def _assert_kernel(name, got, want, args, dtype):
    _assert_results(got, want, dtype, kernel_bounds(name, args), name)


# --------------------------------------------------------------------------------------------
# unfused kernels


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", UNFUSED)
def test_loop_reference_matches_float64_formula(name, shape, dtype, rng):
    args = _inputs(name, shape, dtype, rng)
    _assert_kernel(name, kernels.get(name, "loop")(*args), _reference64(name, args), args, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", UNFUSED)
def test_fast_backends_match_loop(name, backend, shape, dtype, rng):
    args = _inputs(name, shape, dtype, rng)
    want = kernels.get(name, "loop")(*args)
    _assert_kernel(name, kernels.get(name, backend)(*args), want, args, dtype)


@pytest.fixture(params=["serial", "parallel", "few-batch"])
def numba_path(request, monkeypatch):
    """Force one of the numba backend's paths whatever the shape and the thread count:
    everything on the calling thread; parallel over the batch (BLAS per batch entry);
    more threads than batch entries (products by NumPy's matmul)."""
    threshold = 1 << 62 if request.param == "serial" else 0
    for name in ("_PARALLEL_MIN_ELEMENTS", "_PARALLEL_MIN_MACS", "_PARALLEL_MIN_SCATTER"):
        monkeypatch.setattr(numba_backend, name, threshold)
    threads = {"serial": 1, "parallel": 2, "few-batch": 64}[request.param]
    monkeypatch.setattr(numba_backend, "get_num_threads", lambda: threads)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", UNFUSED)
def test_numba_paths_match_loop(name, shape, numba_path, dtype, rng):
    args = _inputs(name, shape, dtype, rng)
    want = kernels.get(name, "loop")(*args)
    _assert_kernel(name, getattr(numba_backend, name)(*args), want, args, dtype)


PRODUCT_KERNELS = ("weighted_sum_forward", "weighted_sum_backward", "scores_forward",
                   "scores_backward")


@pytest.mark.parametrize("own", [0, 1], ids=["blas", "own"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", PRODUCT_KERNELS)
def test_numba_products_match_loop_by_blas_and_by_own(name, shape, numba_path, own, dtype, rng,
                                                      monkeypatch):
    """The product kernels on each path, with their products by BLAS and by the own
    micro-kernel (the spy: the products were run with that flag; with more threads than batch
    entries NumPy's matmul takes them, and neither runs)."""
    seen = use_products(monkeypatch, own)
    args = _inputs(name, shape, dtype, rng)
    want = kernels.get(name, "loop")(*args)
    _assert_kernel(name, getattr(numba_backend, name)(*args), want, args, dtype)
    numpy = numba_path == "few-batch" and shape[0] > 1  # one batch entry: nothing to share
    assert seen == ([] if numpy else [own]), seen


@pytest.mark.parametrize("name", UNFUSED)
def test_numba_kernels_accept_an_empty_batch(name, rng):
    args = _inputs(name, (0, 3, 4, 2), np.float32, rng)
    want = _as_tuple(kernels.get(name, "loop")(*args))
    got = _as_tuple(kernels.get(name, "numba")(*args))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_gemm_matches_float64_products_for_every_transpose(dtype, rng):
    """The one gemm of the Numba kernels: c = alpha op(a) op(b) + beta c, for every pair of
    transposes, with c's rows strided inside a wider array and a single row of a whose row
    stride is 0 (BLAS gets a valid leading dimension all the same). Bound: K eps times the
    sum of the terms' magnitudes, per element (the error of any summation order)."""
    M, N, K = 3, 5, 4
    eps = np.finfo(dtype).eps
    alpha, beta = 0.75, -0.5
    coef = np.empty(2, dtype=dtype)
    for ta in (False, True):
        for tb in (False, True):
            for m in (M, 1):
                a64 = rng.standard_normal((K, m) if ta else (m, K))
                b64 = rng.standard_normal((N, K) if tb else (K, N))
                wide = rng.standard_normal((m, N + 3))
                a = a64.astype(dtype)
                if m == 1 and not ta:  # one row, row stride 0
                    a = np.lib.stride_tricks.as_strided(a.ravel(), (1, K), (0, a.itemsize))
                b = b64.astype(dtype)
                c = wide.astype(dtype)[:, 1:N + 1]  # (m, N), rows strided
                c0 = c.astype(np.float64)
                A = a.astype(np.float64).T if ta else a.astype(np.float64)
                B = b.astype(np.float64).T if tb else b.astype(np.float64)
                want = alpha * A @ B + beta * c0
                terms = abs(alpha) * np.abs(A) @ np.abs(B) + abs(beta) * np.abs(c0)
                bound = (K + 2) * eps * terms
                # alpha and beta in the arrays' dtype, as the kernels pass them (a Python
                # float would compile another signature of _gemm, which
                # test_kernel_micro counts)
                _blas.gemm(ta, tb, a, b, c, dtype(alpha), dtype(beta), coef)
                assert np.all(np.abs(c - want) <= bound), (ta, tb, m)


def test_a_thread_never_sees_blas_half_loaded(monkeypatch):
    """Two Python threads making their first kernel calls at once: one still finding the
    BLAS's thread pools must not leave the other with "available" but no pools."""
    import threading

    monkeypatch.setattr(_blas, "_state", {})
    inside, go_on = threading.Event(), threading.Event()
    find = _blas._find_pools

    def slow_find():
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            go_on.wait(30)
        return find()

    monkeypatch.setattr(_blas, "_find_pools", slow_find)
    def paths(pools):
        return sorted(p.filepath for p in pools)

    first = threading.Thread(target=_blas.available)
    first.start()
    assert inside.wait(30)
    try:
        assert paths(_blas.pools()) == paths(find())  # while the first thread finds them
    finally:
        go_on.set()
        first.join()
    assert paths(_blas.pools()) == paths(find())


def test_one_blas_thread_in_another_thread_leaves_the_limits_working():
    """A thread (a pool's, say) that held BLAS at one thread and lives on must not keep
    threadpoolctl's control of OpenBLAS: the next OneThread of this thread still holds it."""
    import threading

    import threadpoolctl

    pools = _blas.pools()
    if not pools or min(lib.num_threads for lib in pools) < 2:
        pytest.skip("needs a BLAS that threadpoolctl sees running 2 or more threads")
    clear = getattr(threadpoolctl.OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)  # no thread has taken control yet
    done, leave = threading.Event(), threading.Event()

    def other():
        with _blas.OneThread():
            pass
        done.set()
        leave.wait(30)  # alive, as a pool's thread stays

    t = threading.Thread(target=other)
    t.start()
    try:
        assert done.wait(30)
        with _blas.OneThread():
            inside = [lib.num_threads for lib in pools]
    finally:
        leave.set()
        t.join()
    assert inside == [1] * len(pools)


def test_one_blas_thread_gives_the_thread_count_back_on_exit():
    """OneThread holds BLAS at one thread inside the block, nested ones too, and gives every
    pool its own count back on exit: set here to 2 first (and checked), so the block had a
    count to save, whatever the count this test run gives BLAS."""
    import threadpoolctl

    pools = _blas.pools()
    if not pools:
        pytest.skip("no BLAS that threadpoolctl sees")
    clear = getattr(threadpoolctl.OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)  # no thread has taken control yet
    original = [lib.num_threads for lib in pools]
    try:
        with _blas.Control():
            for lib in pools:
                lib.set_num_threads(2)
        before = [lib.num_threads for lib in pools]
        if before != [2] * len(pools):
            pytest.skip("this BLAS does not run 2 threads")
        with _blas.OneThread():
            assert [lib.num_threads for lib in pools] == [1] * len(pools)
            with _blas.OneThread():
                assert [lib.num_threads for lib in pools] == [1] * len(pools)
            assert [lib.num_threads for lib in pools] == [1] * len(pools)
        assert [lib.num_threads for lib in pools] == before
    finally:
        with _blas.Control():
            for lib, n in zip(pools, original, strict=True):
                lib.set_num_threads(n)


def test_softmax_of_all_minus_inf_rows_is_zero(rng):
    x = np.full((2, 3, 4), -np.inf, dtype=np.float32)
    x[1, 2] = rng.standard_normal(4)
    for backend in kernels.BACKENDS:
        y = kernels.get("softmax_forward", backend)(x)
        assert not np.isnan(y).any()
        assert np.all(y[0] == 0) and np.all(y[1, :2] == 0), backend
        assert abs(float(y[1, 2].astype(np.float64).sum()) - 1.0) <= 12 * np.finfo(np.float32).eps


@pytest.mark.parametrize("n_blocks", [1, 2, 4])
def test_numba_parallel_scatter_add_matches_loop(n_blocks, dtype, rng):
    """The parallel path (each task owns a range of token ids) on shapes too small to take it."""
    idx, dout, n_rows = _inputs("embedding_backward", (3, 7, 1, 5), dtype, rng)
    want = kernels.get("embedding_backward", "loop")(idx, dout, n_rows)
    dW = np.zeros_like(want)
    numba_backend._scatter_add_parallel(idx.astype(np.intp).reshape(-1), dout.reshape(21, 5),
                                        dW, n_blocks)
    _assert_kernel("embedding_backward", dW, want, (idx, dout, n_rows), dtype)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_embedding_backward_accepts_int32_and_int64_ids(idx_dtype, rng):
    idx = rng.integers(0, V, size=(3, 5)).astype(idx_dtype)
    dout = rng.standard_normal((3, 5, 4))
    want = kernels.get("embedding_backward", "loop")(idx, dout, V)
    for backend in FAST:
        got = kernels.get("embedding_backward", backend)(idx, dout, V)
        _assert_kernel("embedding_backward", got, want, (idx, dout, V), np.float64)


# --------------------------------------------------------------------------------------------
# fused attention

# (B, Tq, Tk, d, dv)
ATT_SHAPES = [(2, 3, 5, 4, 3), (1, 1, 1, 2, 2), (3, 6, 6, 2, 5), (2, 7, 4, 3, 1)]


def _mask(kind, B, Tq, Tk, rng):
    """A compact boolean mask as fastattn._checks.bool_mask gives it, or None."""
    if kind is None:
        return None
    shapes = {"keys": (B, 1, Tk), "full": (B, Tq, Tk), "shared": (1, Tq, Tk), "keys1": (1, 1, Tk)}
    m = rng.random(shapes[kind]) < 0.7
    m[..., 0] = True  # every row (also causal ones) keeps key 0 ...
    if kind == "full" and Tq > 1:
        m[-1, -1, :] = False  # ... but one row of the full mask has nothing to attend to
    return m


def _attention64(q, k, v, dout, scale, causal, mask):
    """out, lse and dq, dk, dv by the textbook formulas, in float64, with an explicit P."""
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    s = kernel_attention_scores(q, k, scale, causal, mask)
    m = s.max(-1, keepdims=True)
    empty = np.isneginf(m)
    e = np.exp(s - np.where(empty, 0.0, m))
    total = e.sum(-1, keepdims=True)
    p = np.where(empty, 0.0, e / np.where(empty, 1.0, total))
    out = p @ v
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, m + np.log(total))[..., 0]
    dp = dout @ v.transpose(0, 2, 1)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = scale * ds @ k
    dk = scale * ds.transpose(0, 2, 1) @ q
    dv = p.transpose(0, 2, 1) @ dout
    return out, lse, dq, dk, dv


def _attention_case(shape, dtype, rng, kind, causal):
    B, Tq, Tk, d, dv = shape
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((B, Tq, d), (B, Tk, d), (B, Tk, dv)))
    dout = rng.standard_normal((B, Tq, dv)).astype(dtype)
    return q, k, v, dout, 1.0 / np.sqrt(d), causal, _mask(kind, B, Tq, Tk, rng)


def _bounds(q, k, v, dout, scale, causal, mask):
    """attention_bounds for the kernel-level attention, P read off the loop reference."""
    P = kernel_attention_probs(q, k, scale, causal, mask)
    return attention_bounds(q, k, v, P, scale=scale, dout=dout)


FWD, BWD = ("out", "lse"), ("dq", "dk", "dv")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", [None, "keys", "full", "shared", "keys1"])
@pytest.mark.parametrize("shape", ATT_SHAPES, ids=str)
def test_loop_attention_matches_float64_formula(shape, kind, causal, dtype, rng):
    case = _attention_case(shape, dtype, rng, kind, causal)
    q, k, v, dout, scale, causal, mask = case
    out, lse = kernels.get("attention_forward", "loop")(q, k, v, scale, causal, mask)
    grads = kernels.get("attention_backward", "loop")(dout, q, k, v, out, lse, scale, causal, mask)
    want = _attention64(*case)
    b = _bounds(*case)
    _assert_results((out, lse, *grads), want, dtype, [b[x] for x in FWD + BWD], "loop")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", [None, "keys", "full", "shared", "keys1"])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", ATT_SHAPES, ids=str)
def test_fast_attention_matches_loop(shape, backend, kind, causal, dtype, rng):
    case = _attention_case(shape, dtype, rng, kind, causal)
    q, k, v, dout, scale, causal, mask = case
    out, lse = kernels.get("attention_forward", "loop")(q, k, v, scale, causal, mask)
    want = kernels.get("attention_backward", "loop")(dout, q, k, v, out, lse, scale, causal, mask)
    f_out, f_lse = kernels.get("attention_forward", backend)(q, k, v, scale, causal, mask)
    b = _bounds(*case)
    _assert_results((f_out, f_lse), (out, lse), dtype, [b[x] for x in FWD], backend)
    # the backward gets the reference's out and lse, so it is checked on its own
    got = kernels.get("attention_backward", backend)(dout, q, k, v, out, lse, scale, causal, mask)
    _assert_results(got, want, dtype, [b[x] for x in BWD], backend)


def test_fully_masked_rows_give_zeros_minus_inf_and_zero_gradients(backend, dtype, rng):
    B, Tq, Tk, d = 2, 4, 5, 3
    q, k, v, dout = (rng.standard_normal(s).astype(dtype)
                     for s in ((B, Tq, d), (B, Tk, d), (B, Tk, d), (B, Tq, d)))
    mask = np.ones((B, Tq, Tk), dtype=bool)
    mask[0, 1, :] = False  # row (0, 1): nothing at all
    mask[1, :, 0] = False  # with causal, row (1, 0) may only see key 0: nothing either
    fwd = kernels.get("attention_forward", backend)
    bwd = kernels.get("attention_backward", backend)
    out, lse = fwd(q, k, v, 0.5, True, mask)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, 0.5, True, mask)
    for x in (out, dq, dk, dv):
        assert not np.isnan(x).any()
    for b, i in [(0, 1), (1, 0)]:
        assert np.all(out[b, i] == 0) and lse[b, i] == -np.inf and np.all(dq[b, i] == 0)
    assert np.isfinite(lse[0, 0]) and np.isfinite(lse[1, 1])
    # the empty rows contribute nothing to dk, dv: zeroing their dout changes nothing
    dout2 = dout.copy()
    dout2[0, 1] = 0
    dout2[1, 0] = 0
    _, dk2, dv2 = bwd(dout2, q, k, v, out, lse, 0.5, True, mask)
    np.testing.assert_array_equal(dk, dk2)
    np.testing.assert_array_equal(dv, dv2)


def test_loop_attention_gradients_match_central_differences(rng):
    B, Tq, Tk, d, dv = 2, 3, 4, 2, 3
    q, k, v = (rng.standard_normal(s) for s in ((B, Tq, d), (B, Tk, d), (B, Tk, dv)))
    w = rng.standard_normal((B, Tq, dv))  # loss = sum(out * w), so dout = w
    mask = rng.random((B, 1, Tk)) < 0.7
    mask[..., 0] = True
    fwd = kernels.get("attention_forward", "loop")
    scale = 0.6

    def loss():
        return float(np.sum(fwd(q, k, v, scale, True, mask)[0] * w))

    out, lse = fwd(q, k, v, scale, True, mask)
    grads = kernels.get("attention_backward", "loop")(w, q, k, v, out, lse, scale, True, mask)
    h = 1e-6
    for x, g in zip((q, k, v), grads, strict=True):
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            old = x[i]
            x[i] = old + h
            up = loss()
            x[i] = old - h
            down = loss()
            x[i] = old
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# the registry, determinism, vexp


def test_get_raises_value_error_on_unknown_names():
    with pytest.raises(ValueError, match="softmax_forward"):
        kernels.get("no_such_kernel", "loop")
    with pytest.raises(ValueError, match="vectorized"):
        kernels.get("softmax_forward", "cuda")


def test_every_backend_module_defines_every_kernel():
    for backend in kernels.BACKENDS:
        for name in kernels.KERNEL_NAMES:
            assert callable(kernels.get(name, backend))


def test_numba_kernels_are_bitwise_deterministic(rng, monkeypatch):
    """Two calls with the same inputs give the same bits, on the parallel paths (forced at
    these small shapes, and checked to be taken when Numba has 2 threads or more)."""
    import numba

    log = record_paths(monkeypatch, force=True)
    parallel = numba.get_num_threads() > 1
    shape = (16, 9, 11, 8)
    for name in UNFUSED:
        args = _inputs(name, shape, np.float32, rng)
        log.clear()
        first = _as_tuple(kernels.get(name, "numba")(*args))
        second = _as_tuple(kernels.get(name, "numba")(*args))
        assert log.parallel == parallel, (name, log.unfused)
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    q, k, v, dout, scale, causal, mask = _attention_case((16, 9, 11, 8, 8), np.float32, rng,
                                                         "keys", True)
    fwd = kernels.get("attention_forward", "numba")
    bwd = kernels.get("attention_backward", "numba")
    runs = []
    log.clear()
    for _ in range(2):
        out, lse = fwd(q, k, v, scale, causal, mask)
        runs.append((out, lse, *bwd(dout, q, k, v, out, lse, scale, causal, mask)))
    assert log.parallel == parallel and len(log.fused) == 4, log.fused
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


@intrinsic
def _counted(typingctx, a):
    """True when the array has a meminfo, i.e. when Numba counts its references."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        ary = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        return cgutils.is_not_null(builder, ary.meminfo)

    return types.boolean(a), codegen


@njit
def _borrowed_views(x):
    """Whether x, its borrow and views of that borrow are counted; the borrow's rows doubled."""
    y = borrow(x)
    for r in range(y.shape[0]):
        row = y[r]
        for c in range(row.shape[0]):
            row[c] *= 2
    return _counted(x), _counted(y), _counted(y[1:, ::2]), _counted(y.reshape(-1))


def test_a_borrowed_array_is_the_same_data_without_a_reference_count():
    x = np.arange(12.0).reshape(3, 4)
    counted = _borrowed_views(x)
    assert counted == (True, False, False, False)
    np.testing.assert_array_equal(x, 2 * np.arange(12.0).reshape(3, 4))


@njit
def _sum_of_a_kept_buffer(n):
    owned = np.zeros(n)
    b = borrow(owned)
    other = np.full(n, 7.0)  # would take owned's memory if owned were released by now
    total = b.sum() + 0 * other[0]
    keep_alive(owned)
    return total


def test_keep_alive_keeps_a_borrowed_local_buffer():
    """Numba releases a local array after its last use; keep_alive is a use. (Without it,
    the borrowed buffer here reads the 7s of the next allocation: the hazard it is for.)"""
    for n in (16, 4096, 1 << 16):
        assert _sum_of_a_kept_buffer(n) == 0.0


@njit
def _sum_after_prefetch(a, r0, r1, hint):
    if hint:
        prefetch_rows(a, r0, r1)
    total = a.dtype.type(0)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            total += a[r, c]
    return total


def _llvm_prefetches(ir_text):
    return [line for line in ir_text.splitlines() if "call void @llvm.prefetch" in line]


def test_prefetch_rows_is_a_read_hint_into_l2_that_changes_nothing():
    base = np.arange(10 * 300, dtype=np.float32).reshape(10, 300)
    before = base.copy()
    view = base[2:, 5:250]  # strided rows, the last one at the end of the array's rows
    n = view.shape[0]
    for r0, r1 in ((0, n), (3, 3), (n - 1, n)):  # all, none, the last row
        assert _sum_after_prefetch(view, r0, r1, True) == _sum_after_prefetch(view, r0, r1,
                                                                              False)
    np.testing.assert_array_equal(base, before)
    calls = _llvm_prefetches(_sum_after_prefetch.inspect_llvm(_sum_after_prefetch.signatures[0]))
    # llvm.prefetch(address, rw 0: read, locality 2: the L2 cache, cache type 1: data)
    assert calls and all(line.rstrip().endswith("i32 0, i32 2, i32 1)") for line in calls)


def test_the_fused_kernels_prefetch_the_next_head_when_each_head_is_one_tile(monkeypatch):
    """At short sequences (the date model's) both fused kernels hint the next (batch entry,
    head)'s rows (kernels._flash, "Prefetching"): the calls here take one tile per head, and
    the kernels they run, compiled for those very arguments, contain the hints."""
    runs = []
    real = _flash._in_parallel

    def spy(fn, n_units, flops, serial_flops, *args):
        runs.append((fn, args))
        return real(fn, n_units, flops, serial_flops, *args)

    monkeypatch.setattr(_flash, "_in_parallel", spy)
    rng = np.random.default_rng(0)
    B, T, H, d = 3, 7, 2, 4
    q, k, v, dout = (rng.standard_normal((B, T, H, d)).astype(np.float32).transpose(0, 2, 1, 3)
                     for _ in range(4))
    out, lse = _flash.attention_forward(q, k, v, 0.5, False, None)
    _flash.attention_backward(dout, q, k, v, out, lse, 0.5, False, None)
    assert [fn for fn, _ in runs] == [_flash._forward_units, _flash._backward_units]
    bq, bk = _flash._tiles(B * H, T, T, False, _tuning.current()[0])
    assert T <= bq and T <= bk  # one tile per head
    for fn, args in runs:
        assert _llvm_prefetches(llvm_ir(fn, np.zeros(1, np.int64), *args)), fn.__name__


def _borrowed_locals(fn):
    """Names of fn's local arrays (not its arguments) that it borrows: borrow(x), borrow(x[i])."""
    params = {a.arg for a in fn.args.args}
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "borrow":
            arg = node.args[0]
            base = arg.value if isinstance(arg, ast.Subscript) else arg
            if isinstance(base, ast.Name) and base.id not in params:
                names.add(base.id)
    return names


def test_every_kernel_that_borrows_a_local_array_keeps_it_alive_to_its_end():
    """A borrowed local buffer is only valid while its owner lives, and Numba releases the
    owner after its last use, which may be long before the kernel stops using the borrow (a
    thread's next allocation may then take the same memory). So a kernel that borrows one
    ends with keep_alive of it."""
    checked = 0
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            owned = _borrowed_locals(fn)
            if not owned:
                continue
            last = fn.body[-1]
            kept = (isinstance(last, ast.Expr) and isinstance(last.value, ast.Call)
                    and getattr(last.value.func, "id", None) == "keep_alive"
                    and {getattr(a, "id", None) for a in last.value.args} >= owned)
            assert kept, f"{path.name}: {fn.name} borrows {sorted(owned)} but does not end " \
                         "with keep_alive of them"
            assert not any(isinstance(n, ast.Return) for n in ast.walk(fn)), (
                f"{path.name}: {fn.name} returns before its keep_alive")
            checked += 1
    assert checked >= 8  # the fused, recurrent and unfused kernels' buffers


@njit(cache=True, fastmath=set(FASTMATH))
def _vexp_array(x):
    """vexp element by element, in a loop compiled with the kernels' flags (as they use it)."""
    y = np.empty_like(x)
    for i in range(x.size):
        y[i] = vexp(x[i])
    return y


def _ulp_distance(a, b):
    """Distance in units in the last place between two arrays of one float dtype."""
    ints = {4: np.int32, 8: np.int64}[a.dtype.itemsize]
    ia, ib = a.view(ints).astype(np.int64), b.view(ints).astype(np.int64)
    ia = np.where(ia < 0, np.iinfo(ints).min - ia, ia)  # sign-magnitude to a monotone scale
    ib = np.where(ib < 0, np.iinfo(ints).min - ib, ib)
    return np.abs(ia - ib)


# vexp's contract: x <= 0 or -inf; x < LO gives 0, where exp(LO) is about the smallest normal
VEXP_LO = {np.float32: -87.0, np.float64: -708.0}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vexp_is_within_one_ulp_of_exp_on_its_whole_range(dtype):
    lo = VEXP_LO[dtype]
    x = np.concatenate([np.linspace(lo, 0.0, 400_001), np.linspace(-1.0, 0.0, 100_001),
                        -np.logspace(-30, 0, 10_001)]).astype(dtype)
    got = _vexp_array(x)
    want = np.exp(x.astype(np.float64)).astype(dtype)  # correctly rounded (but for ties)
    assert _ulp_distance(got, want).max() <= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vexp_gives_zero_below_its_range_within_exp_of_lo(dtype):
    """Below LO the result is 0: an absolute error of at most exp(LO), about the smallest
    normal number, which no softmax row or tile sum can see."""
    lo = VEXP_LO[dtype]
    x = np.linspace(2 * lo, lo, 10_001)[:-1].astype(dtype)
    x = x[x < dtype(lo)]
    got = _vexp_array(x)
    np.testing.assert_array_equal(got, 0)
    assert np.exp(np.float64(lo)) < 4 * np.finfo(dtype).tiny


def _exp_inplace_with(halves):
    """_flash._exp_inplace compiled here with _EXP_HALVES set to ``halves`` (None: the
    kernels' own, compiled for this CPU)."""
    import types as pytypes

    from fastattn.kernels import _flash

    if halves is None:
        return _flash._exp_inplace
    fn = _flash._exp_inplace.py_func
    code_globals = {**fn.__globals__, "_EXP_HALVES": halves}
    return njit(fastmath=set(FASTMATH))(pytypes.FunctionType(fn.__code__, code_globals,
                                                             fn.__name__))


@pytest.mark.parametrize("halves", [None, False, True], ids=["this_cpu", "one_chain", "halves"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fused_kernels_exp_in_place_is_vexp_at_every_length(dtype, halves, rng):
    """_flash._exp_inplace, which on code without AVX-512 runs over the array's two halves
    at once and then the odd item: every item its own exp within 1 ulp, -inf to 0, NaN to
    NaN, at lengths with and without the odd item. The kernels' own function (the AVX2 run
    of the numerics tests takes the halves path, as the first assertion shows), and copies
    compiled here with either loop, whatever this CPU (distinct values throughout, so an
    item that took another's exp shows)."""
    from fastattn.kernels import _flash, _tuning

    assert _flash._EXP_HALVES == (_tuning.compiled_isa() != "avx512")
    exp_inplace = _exp_inplace_with(halves)
    for n in (0, 1, 2, 3, 4, 17, 64, 1001):
        x = (VEXP_LO[dtype] * rng.random(n) ** 4).astype(dtype)  # many near 0, some near LO
        if n >= 3:
            x[0], x[n // 2], x[-1] = -np.inf, np.nan, -0.5
        got = x.copy()
        exp_inplace(got)
        nan = np.isnan(x)
        assert np.array_equal(np.isnan(got), nan), n
        want = np.exp(x[~nan].astype(np.float64)).astype(dtype)
        assert _ulp_distance(got[~nan], want).max(initial=0) <= 1, n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vexp_special_values(dtype):
    big = np.finfo(dtype).max
    x = np.array([-np.inf, -big, -1e30, -1e4, -0.0, 0.0, np.nan], dtype=dtype)
    got = _vexp_array(x)
    np.testing.assert_array_equal(got[:4], 0)  # -inf and far below the range: exactly 0
    np.testing.assert_array_equal(got[4:6], 1)
    assert np.isnan(got[6])


# ---- wide vectors: LLVM's loops on AVX-512 code use 64-byte registers ----------------------

#: kernel functions with loops that need no wide_vectors(), and why
_NOT_VECTORISED = {
    "_micro.py": {"_mm"},  # the register-blocked micro-kernel: LLVM IR of its own vectors
    # parallel loops over batch entries whose bodies call a kernel that asks for them
    "numba_backend.py": {"_softmax_forward_parallel", "_softmax_backward_parallel",
                         "_bmm_parallel", "_bmm2_parallel", "_scatter_add_parallel"},
}


def _is_call(stmt, name):
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and getattr(stmt.value.func, "id", None) == name and not stmt.value.args)


def _jit_decorator(fn):
    """The fn's njit_cached(...) call among its decorators, or None."""
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "njit_cached":
            return dec
    return None


def test_every_kernel_function_with_a_loop_asks_for_wide_vectors():
    """Each compiled kernel function that has a loop of its own (and is not inlined into its
    callers by Numba, inline="always") names wide_vectors() first (after its docstring): the
    attribute is a function's own, so one that forgets it runs 32-byte vectors on Intel's
    AVX-512 CPUs. The ones that need none are listed, with why."""
    missing, seen = [], 0
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            dec = _jit_decorator(fn)
            if dec is None or any(k.arg == "inline" for k in dec.keywords):
                continue
            if not any(isinstance(n, (ast.For, ast.While)) for n in ast.walk(fn)):
                continue
            if fn.name in _NOT_VECTORISED.get(path.name, ()):
                continue
            body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(
                getattr(fn.body[0], "value", None), ast.Constant) else fn.body
            seen += 1
            if not _is_call(body[0], "wide_vectors"):
                missing.append(f"{path.name}:{fn.name}")
    assert seen >= 40, seen  # the walk found the kernels
    assert not missing, f"no wide_vectors() first in {missing}"


def test_wide_vectors_sets_the_attribute_on_avx512_code_only():
    """A fresh (uncached) function that names wide_vectors(): its LLVM function carries
    prefer-vector-width=512 exactly when Numba makes AVX-512 code, and then its loop uses
    64-byte registers (zmm), which LLVM's Intel tuning alone would not; without AVX-512 it
    has neither. (On this machine: see the first assertion's value.)"""
    from fastattn.kernels import _numba_math, _tuning

    wide = _tuning.compiled_isa() == "avx512"
    assert _numba_math._wide() is wide

    @njit(fastmath=set(FASTMATH))
    def scaled_exp(x):
        _numba_math.wide_vectors()
        for i in range(x.shape[0]):
            x[i] = vexp(x[i] * 0.5)

    x = -np.arange(100, dtype=np.float32)
    scaled_exp(x)
    want = np.exp(-np.arange(100) * 0.5).astype(np.float32)
    assert _ulp_distance(x, want).max() <= 1  # vexp's contract
    llvm = next(iter(scaled_exp.inspect_llvm().values())).splitlines()
    define = next(line for line in llvm if line.startswith("define") and "scaled_exp" in line)
    attrs = ""  # the function's attribute group, when it has one
    if "#" in define.rsplit(")", 1)[1]:
        group = define.rsplit("#", 1)[1].split()[0]
        attrs = next(line for line in llvm if line.startswith(f"attributes #{group} "))
    assert ('"prefer-vector-width"="512"' in attrs) is wide, (define, attrs)
    asm = next(iter(scaled_exp.inspect_asm().values()))
    assert ("%zmm" in asm) is wide
