"""The kernels as Numba JIT code: parallel over the batch, vectorisable inner loops.

Same names, signatures and results as ``kernels.loop`` (the source of truth). Each public name
is a thin Python function that takes exactly the loop signature, converts ``scale`` to the
arrays' dtype and calls a private Numba kernel (``njit_cached``: ``cache=True`` wherever Numba
finds a writable cache location) compiled for float32 and float64 C-contiguous arrays only.
Results come back in the input dtype; float32 inputs accumulate in float32.

How the kernels are built:

* Each kernel runs on the calling thread when the work is small, and in parallel over the
  batch (``prange``) above that (the threading model: the ``kernels`` package docstring).
* ``softmax_*``: per batch entry, the row maxima are subtracted in one pass, the
  exponentials (of values <= 0 or -inf) are taken in one long pass over the whole contiguous
  (Tq, Tk) block with :func:`kernels._numba_math.vexp` (which LLVM vectorises; ``np.exp``
  inside ``@njit`` is a scalar libm call), then each row is normalised. An all ``-inf`` row
  gives zeros.
* ``weighted_sum_*`` and ``scores_*`` are small matrix products per batch entry, all six done
  by one kernel: one product per batch entry, with the transposes and the scale folded in,
  by BLAS gemm (:func:`kernels._blas.gemm`), held at one thread while the batch is shared
  between threads, or, for heads up to the setting's ``own_dim`` wide (``kernels._tuning``:
  all on AVX2), by the fused kernels' own micro-kernel (:func:`kernels._micro.mm`), which
  beats BLAS at these sizes there; with fewer batch entries than threads, NumPy's matmul,
  whose BLAS threads then share each product.
* ``embedding_backward``: large scatter-adds split the rows of dW (token ids) between
  threads, each scanning all ids, so there are no races and no partial copies of dW.
* ``attention_forward``/``attention_backward`` come from ``kernels._flash_features`` (every
  feature), which hands the plain case to ``kernels._flash``.

Every output element is written by one thread in a fixed order, so results are bitwise
identical from call to call. The softmax and scatter-add results do not depend on the number
of threads either; the products can differ in the last bits when the thread count moves a
call between the per-batch-entry gemms and NumPy's matmul (fewer batch entries than threads).

The fastmath flags live in one place, :data:`kernels._numba_math.FASTMATH`; they never include
``nnan``/``ninf``, so ``-inf`` masking stays exact.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, prange

from . import ATTENTION_NAMES, _tuning
from ._blas import gemm
from ._flash import _blas_held, _transpose_into
from ._flash_features import attention_backward, attention_forward  # noqa: F401  (in __all__)
from ._micro import mm
from ._numba_math import FASTMATH, borrow, keep_alive, njit_cached, vexp, wide_vectors

__all__ = list(ATTENTION_NAMES)

_JIT = {"fastmath": set(FASTMATH), "nogil": True}
_PJIT = {**_JIT, "parallel": True}

# Below these sizes a kernel runs on the calling thread alone.
_PARALLEL_MIN_ELEMENTS = 1 << 15  # softmax: B * Tq * Tk
_PARALLEL_MIN_MACS = 1 << 20  # matrix products: B * M * N * K
_PARALLEL_MIN_SCATTER = 1 << 21  # scatter-add: N * T * D (memory-bound: threads gain little)


def _parallel(work, threshold, batch):
    return work >= threshold and batch > 1 and get_num_threads() > 1


# --------------------------------------------------------------------------------------------
# softmax: a serial kernel over a range of batch entries, and a parallel one over all of them


@njit_cached(**_JIT)
def _softmax_forward_range(x, y, b0, b1):
    """y[b] = softmax(x[b]) for b in [b0, b1). x, y (B, Tq, Tk)."""
    wide_vectors()
    x, y = borrow(x), borrow(y)  # no reference counts on the rows' views
    _, Tq, Tk = x.shape
    zero = x.dtype.type(0.0)
    one = x.dtype.type(1.0)
    ninf = x.dtype.type(-np.inf)
    for b in range(b0, b1):
        for i in range(Tq):  # y = x - row max (an all -inf row keeps -inf, its exp is 0)
            xr = x[b, i]
            yr = y[b, i]
            m = ninf
            for j in range(Tk):
                m = max(m, xr[j])
            if m == ninf:
                m = zero
            for j in range(Tk):
                yr[j] = xr[j] - m
        yb = y[b].reshape(-1)  # (Tq*Tk,): one long vectorised pass of exponentials
        for j in range(yb.size):
            yb[j] = vexp(yb[j])  # yb <= 0 or -inf
        for i in range(Tq):  # normalise each row; a row of zeros stays zeros
            yr = y[b, i]
            total = zero
            for j in range(Tk):
                total += yr[j]
            inv = one / total if total > zero else zero
            for j in range(Tk):
                yr[j] *= inv


@njit_cached(**_PJIT)
def _softmax_forward_parallel(x, y):
    for b in prange(x.shape[0]):
        _softmax_forward_range(x, y, b, b + 1)


@njit_cached(**_JIT)
def _softmax_backward_range(dy, y, dx, b0, b1):
    """dx[b] = y[b] * (dy[b] - rowsum(y[b] * dy[b])) for b in [b0, b1). (B, Tq, Tk) each."""
    wide_vectors()
    dy, y, dx = borrow(dy), borrow(y), borrow(dx)  # no reference counts on the rows' views
    _, Tq, Tk = y.shape
    zero = y.dtype.type(0.0)
    for b in range(b0, b1):
        yb = y[b].reshape(-1)
        dyb = dy[b].reshape(-1)
        dxb = dx[b].reshape(-1)
        for j in range(yb.size):  # dx = y * dy, one long pass
            dxb[j] = yb[j] * dyb[j]
        for i in range(Tq):  # dx -= y * sum(y * dy)
            yr = y[b, i]
            dxr = dx[b, i]
            dot = zero
            for j in range(Tk):
                dot += dxr[j]
            for j in range(Tk):
                dxr[j] -= yr[j] * dot


@njit_cached(**_PJIT)
def _softmax_backward_parallel(dy, y, dx):
    for b in prange(y.shape[0]):
        _softmax_backward_range(dy, y, dx, b, b + 1)


def softmax_forward(x):
    """y[b, i, :] = softmax(x[b, i, :]). x (B, Tq, Tk) -> y (B, Tq, Tk).

    An all -inf row gives zeros.
    """
    y = np.empty_like(x)
    if _parallel(x.size, _PARALLEL_MIN_ELEMENTS, x.shape[0]):
        _softmax_forward_parallel(x, y)
    else:
        _softmax_forward_range(x, y, 0, x.shape[0])
    return y


def softmax_backward(dy, y):
    """dx = y * (dy - sum(y * dy, last axis)). dy, y (B, Tq, Tk) -> dx (B, Tq, Tk)."""
    dx = np.empty_like(y)
    if _parallel(y.size, _PARALLEL_MIN_ELEMENTS, y.shape[0]):
        _softmax_backward_parallel(dy, y, dx)
    else:
        _softmax_backward_range(dy, y, dx, 0, y.shape[0])
    return dx


# --------------------------------------------------------------------------------------------
# matrix products: c[b] = alpha op(a[b]) @ op(m[b]), op(x) = x or x^T, one kernel for all six

@njit_cached(**_JIT)
def _bmm_range(a, ta, m, tm, alpha, c, b0, b1, own):
    """c[b] = alpha op(a[b]) @ op(m[b]) for b in [b0, b1): one product per batch entry, by
    BLAS gemm or, with own, by the micro-kernel (which takes no transposed m: with tm, each
    m[b] is first transposed into a scratch buffer).

    a is (B, M, K), or (B, K, M) when ta; m is (B, K, N), or (B, N, K) when tm; c is
    (B, M, N); all C-contiguous, one dtype.
    """
    wide_vectors()
    a, m, c = borrow(a), borrow(m), borrow(c)  # no reference counts on the entries' views
    # one allocation: gemm's scratch, then (own and tm) room for a transposed m[b]
    owned = np.empty(2 + (m.shape[1] * m.shape[2] if own and tm else 0), dtype=c.dtype)
    scratch = borrow(owned)
    coef, tbuf = scratch[:2], scratch[2:]
    zero = c.dtype.type(0)
    al = c.dtype.type(alpha)  # both ways take it in the arrays' dtype (as the fused kernels)
    for b in range(b0, b1):
        if not own:
            gemm(ta, tm, a[b], m[b], c[b], al, zero, coef)
        elif tm:
            mt = tbuf.reshape((m.shape[2], m.shape[1]))
            _transpose_into(m[b], mt)
            mm(a[b], ta, mt, c[b], al, False)
        else:
            mm(a[b], ta, m[b], c[b], al, False)
    keep_alive(owned)


@njit_cached(**_PJIT)
def _bmm_parallel(a, ta, m, tm, alpha, c, own):
    for b in prange(c.shape[0]):
        _bmm_range(a, ta, m, tm, alpha, c, b, b + 1, own)


@njit_cached(**_PJIT)
def _bmm2_parallel(a, ta, m, tm, alpha, c, a2, ta2, m2, tm2, alpha2, c2, own):
    """Two batched products in one parallel loop (a backward's two gradients)."""
    for b in prange(c.shape[0]):
        _bmm_range(a, ta, m, tm, alpha, c, b, b + 1, own)
        _bmm_range(a2, ta2, m2, tm2, alpha2, c2, b, b + 1, own)


def _product(a, ta, m, tm, alpha):
    """The arguments of the product kernels for alpha op(a) @ op(m), with c allocated, and the
    number of multiply-adds."""
    B, r, s = a.shape
    M, K = (s, r) if ta else (r, s)
    N = m.shape[1] if tm else m.shape[2]
    return (a, ta, m, tm, float(alpha), np.empty((B, M, N), dtype=a.dtype)), B * M * N * K


def _bmm(d, *products):
    """For each (a, ta, m, tm, alpha): alpha op(a) @ op(m) for every batch entry, op(x) = x.T
    (the last two axes) when the flag is set. One or two products of one batch size, of an
    attention whose heads are d wide (the micro-kernel takes them when d is at most the
    setting's own_dim, as in the fused kernels).

    Small work: one product after the other on this thread. Larger work: one per batch
    entry in parallel (both products in one parallel loop), BLAS, when it is called, held at
    one thread meanwhile; with fewer batch entries than threads, NumPy's matmul (whose BLAS
    threads then share each product).
    """
    prepared = [_product(*p) for p in products]
    macs = sum(p[1] for p in prepared)
    B = products[0][0].shape[0]
    if macs == 0:  # an empty dimension: nothing to multiply, or sums of nothing
        for arg, _ in prepared:
            arg[5][...] = 0
        return tuple(arg[5] for arg, _ in prepared)
    parallel = _parallel(macs, _PARALLEL_MIN_MACS, B)
    if parallel and B < get_num_threads():
        return tuple(_numpy_product(*p) for p in products)
    args = [arg for arg, _ in prepared]
    _run_products(args, parallel, d <= _tuning.current()[0].own_dim)
    return tuple(arg[5] for arg in args)


def _run_products(args, parallel, own):
    """Run the product kernels on the prepared ``args`` (one or two), on this thread or in
    parallel over the batch, by BLAS or, with own, by the micro-kernel."""
    if not parallel:
        for arg in args:
            _bmm_range(*arg, 0, arg[0].shape[0], own)
    else:
        with _blas_held(own):
            if len(args) == 2:
                _bmm2_parallel(*args[0], *args[1], own)
            else:
                _bmm_parallel(*args[0], own)


def _numpy_product(a, ta, m, tm, alpha):
    c = np.matmul(a.transpose(0, 2, 1) if ta else a, m.transpose(0, 2, 1) if tm else m)
    if alpha != 1.0:
        c *= a.dtype.type(alpha)
    return c


def weighted_sum_forward(score, value):
    """z[b, i] = sum_j score[b, i, j] value[b, j].

    score (B, Tq, Tk), value (B, Tk, d) -> z (B, Tq, d).
    """
    return _bmm(value.shape[2], (score, False, value, False, 1.0))[0]


def weighted_sum_backward(dz, score, value):
    """dscore = dz value^T (B, Tq, Tk), dvalue = score^T dz (B, Tk, d); see kernels.loop."""
    return _bmm(value.shape[2], (dz, False, value, True, 1.0), (score, True, dz, False, 1.0))


def scores_forward(q, k, scale):
    """s[b, i, j] = scale * q[b, i] . k[b, j]. q (B, Tq, d), k (B, Tk, d) -> s (B, Tq, Tk)."""
    return _bmm(q.shape[2], (q, False, k, True, scale))[0]


def scores_backward(ds, q, k, scale):
    """dq = scale ds k (B, Tq, d), dk = scale ds^T q (B, Tk, d); see kernels.loop."""
    return _bmm(q.shape[2], (ds, False, k, False, scale), (ds, True, q, False, scale))


# --------------------------------------------------------------------------------------------
# embedding scatter-add

@njit_cached(**_JIT)
def _scatter_add_rows(rows, src, dW, v0, v1):
    """dW[rows[r]] += src[r] for each r (in order) whose id rows[r] is in [v0, v1).

    rows (N*T,) intp, src (N*T, D), dW (V, D).
    """
    wide_vectors()
    D = src.shape[1]
    for r in range(rows.size):
        row = rows[r]
        if v0 <= row < v1:
            for c in range(D):
                dW[row, c] += src[r, c]


@njit_cached(**_PJIT)
def _scatter_add_parallel(rows, src, dW, n_blocks):
    """Each task owns a range of rows of dW (token ids) and scans all ids: no races."""
    V = dW.shape[0]
    for t in prange(n_blocks):
        _scatter_add_rows(rows, src, dW, t * V // n_blocks, (t + 1) * V // n_blocks)


def embedding_backward(idx, dout, V):
    """Scatter-add: dW[idx[n, t]] += dout[n, t]. idx (N, T) int, dout (N, T, D) -> dW (V, D).

    Each dW row is summed in the order of (n, t), whatever the number of threads.
    """
    D = dout.shape[2]
    rows = np.ascontiguousarray(idx, dtype=np.intp).reshape(-1)  # (N*T,)
    src = dout.reshape(rows.size, D)  # (N*T, D)
    dW = np.zeros((int(V), D), dtype=dout.dtype)
    if _parallel(src.size, _PARALLEL_MIN_SCATTER, int(V)):
        _scatter_add_parallel(rows, src, dW, min(get_num_threads(), int(V)))
    else:
        _scatter_add_rows(rows, src, dW, 0, int(V))
    return dW
