"""Matrix products of the Numba backend's layers, on the kernels' own threads.

A NumPy product wakes the threads of NumPy's BLAS, and they keep spinning for a while after it
(tens of milliseconds), on the cores that the next Numba kernel needs. NumPy and SciPy also
ship a BLAS each, so holding one at one thread does not stop the other's. In the chapter-8
attention seq2seq step, a layer's NumPy products slowed the recurrent kernels that followed
them by half. :func:`matmul` instead cuts the rows of the result into blocks, by the shapes
only, and runs one gemm per block on the threads of the fused kernels
(``kernels._flash._in_parallel``), BLAS held at one thread: no BLAS thread wakes. The
blocks do not depend on the thread count, so neither do the results.

The recurrent kernels' products by rows (their shares' input products and input gradients)
and by parts of the rows (their weight gradients) are here too.
"""

from __future__ import annotations

import numpy as np

from . import _blas, _flash, _tuning
from ._blas import OneThread, gemm
from ._numba_math import FASTMATH, njit_cached, take_unit, wide_vectors

_BLOCK_ROWS = 32  # rows of the result per block, at least
_MAX_BLOCKS = 16
_JIT = {"fastmath": set(FASTMATH), "nogil": True, "error_model": "numpy"}  # no division checks


@njit_cached(nogil=True)
def _product_units(counter, a, ta, b, tb, c, nblk):
    """Block k of nblk of the rows of c = op(a) op(b), for each k taken from counter."""
    wide_vectors()
    M = c.shape[0]
    one = c.dtype.type(1)
    coef = np.empty(2, c.dtype)
    while True:
        k = take_unit(counter)
        if k >= nblk:
            break
        r0, r1 = k * M // nblk, (k + 1) * M // nblk
        if ta:
            gemm(True, tb, a[:, r0:r1], b, c[r0:r1], one, one - one, coef)
        else:
            gemm(False, tb, a[r0:r1], b, c[r0:r1], one, one - one, coef)


def matmul(a, b, ta=False, tb=False):
    """op(a) @ op(b) for 2-D float arrays of one dtype, op(x) = x.T when its flag is set
    (NumPy's product when Numba has no BLAS)."""
    if not _blas.available():
        return (a.T if ta else a) @ (b.T if tb else b)
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    M, K = a.shape[::-1] if ta else a.shape
    N = b.shape[0] if tb else b.shape[1]
    c = np.empty((M, N), a.dtype)
    if M * N * K == 0:
        c[...] = 0
        return c
    nblk = max(1, min(M // _BLOCK_ROWS, _MAX_BLOCKS))
    with OneThread():
        _flash._in_parallel(_product_units, nblk, 2 * M * N * K,
                            _tuning.current()[0].serial_flops, a, ta, b, tb, c, nblk)
    return c


# ---- the recurrent layers' products (kernels._recurrent_numba) -----------------------------
# xs2, dxs2 (N*T, D), A2, dA2 (N*T, kH), xh2 (N*T, D + H): (N, T, .) arrays as rows, batch row
# n's steps at rows n*T .. n*T + T - 1, so the rows of a share are one block.


@njit_cached(**_JIT)
def _input_rows(xs2, Wx, b, A2, T, n0, n1):
    """A2 = xs2 Wx + b on the rows of batch rows n0 <= n < n1."""
    wide_vectors()
    one = A2.dtype.type(1)
    coef = np.empty(2, A2.dtype)
    r0, r1 = n0 * T, n1 * T
    gemm(False, False, xs2[r0:r1], Wx, A2[r0:r1], one, one - one, coef)
    for r in range(r0, r1):
        a = A2[r]
        for j in range(a.size):
            a[j] += b[j]


@njit_cached(**_JIT)
def _back_rows_tail(dA2, Wx, dxs2, xs2, h0, hs, xh2, n0, n1):
    """On the rows of batch rows n0 <= n < n1: dxs = dA Wx^T, and xh2 = [xs, h_prev] (h_prev:
    h0, hs[n, 0], ..., hs[n, T-2]), the input of the weight gradients."""
    wide_vectors()
    T, D = hs.shape[1], xs2.shape[1]
    one = dA2.dtype.type(1)
    coef = np.empty(2, dA2.dtype)
    gemm(False, True, dA2[n0 * T:n1 * T], Wx, dxs2[n0 * T:n1 * T], one, one - one, coef)
    for n in range(n0, n1):
        for t in range(T):
            x, h, dst = xs2[n * T + t], h0[n] if t == 0 else hs[n, t - 1], xh2[n * T + t]
            for j in range(D):
                dst[j] = x[j]
            for j in range(h.size):
                dst[D + j] = h[j]


@njit_cached(**_JIT)
def _grad_rows(dA2, xh2, r2, dW, db, split, N, n0, n1):
    """The part of batch rows n0 <= n < n1 of [dWx; dWh] = xh2^T dA2 (one product: dWx alone,
    of D rows, runs far below BLAS's speed) and of db = the sum of dA2's rows (over the steps
    of a batch row, then over the rows: error ~ (N + T) eps, not N T eps). Columns from
    ``split`` on (the GRU's Whh) take r2 h_prev, made in place in xh2, instead of h_prev."""
    wide_vectors()
    one = dA2.dtype.type(1)
    coef = np.empty(2, dA2.dtype)
    T = dA2.shape[0] // N
    r0, r1, D = n0 * T, n1 * T, xh2.shape[1] - r2.shape[1]
    gemm(True, False, xh2[r0:r1], dA2[r0:r1, :split], dW[:, :split], one, one - one, coef)
    if split < dA2.shape[1]:
        for r in range(r0, r1):
            x, g = xh2[r], r2[r]
            for j in range(g.size):
                x[D + j] *= g[j]
        gemm(True, False, xh2[r0:r1], dA2[r0:r1, split:], dW[:, split:], one, one - one, coef)
    part = np.empty(db.size, dA2.dtype)
    db[:] = 0
    for n in range(n0, n1):
        part[:] = 0
        for t in range(T):
            a = dA2[n * T + t]
            for j in range(a.size):
                part[j] += a[j]
        for j in range(db.size):
            db[j] += part[j]


@njit_cached(**_JIT)
def _grad_part(dA2, xh2, r2, parts, dbs, split, N, k, n0, n1):
    """_grad_rows into part k."""
    wide_vectors()
    _grad_rows(dA2, xh2, r2, parts[k], dbs[k], split, N, n0, n1)
