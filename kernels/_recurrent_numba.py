"""The recurrent kernels in Numba: one kernel call runs the whole recurrence of a layer.

Same names, signatures and results as ``kernels.recurrent_loop``. Every product is a call to
:func:`kernels._blas.gemm`: one BLAS library, whose threads stay asleep while the shares run
(BLAS's threads spin for a while after a product, and a product of another library, such as
NumPy's, leaves them spinning on the cores the shares need).

How a layer runs:

* Rows of the batch never interact, so the batch is cut into row shares of at least ``_ROWS``
  rows, by the shapes only (:func:`_shares`). A share runs its rows' input products
  (``xs Wx + b`` for all its steps at once, written into the output array: ``gates``, the
  RNN's ``hs``) and then the whole time loop of its rows: no barrier per time step. Each step's
  ``h Wh`` (the GRU: ``h [Whz Whr]`` and ``(r h) Whh``) is added to that step's rows by one
  gemm (``beta = 1``, rows taken where they are), and one fused loop per row applies the gates
  over contiguous units, with a sigmoid written on :func:`kernels._numba_math.vexp` and
  :func:`kernels._numba_math.vtanh`, so that LLVM vectorises them.
* The backward share writes each step's pre-activation gradients straight into ``dA``,
  multiplies them by a contiguous copy of ``Wh^T`` made once per call (OpenBLAS's gemm with
  the transpose flag on Wh ran 15% slower at (128, 1024) x (1024, 256)), then finds its rows'
  ``dxs = dA Wx^T`` and previous states. The weight gradients ``xs^T dA``, ``h_prev^T dA`` and
  ``db`` follow as one product per part of the rows (:func:`_weight_grads`).
* Threads (Numba's thread count: the calling thread and a kept pool of Python threads, the
  fused kernels' :func:`kernels._flash.pool`; the kernels release the GIL) take shares, then
  parts, from a counter, BLAS held at one thread. A single share or block runs on the calling
  thread, where BLAS keeps its own threads.
* Without SciPy (Numba's BLAS), or with an empty dimension, ``kernels.recurrent_vectorized``
  runs instead.

A row's result depends on the share it falls in (BLAS may round a product of fewer rows
differently), and shares and parts depend on the shapes only, so results do not depend on
the thread count.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import get_num_threads

from . import _blas, _flash, _recurrent
from . import recurrent_vectorized as _numpy
from ._blas import gemm
from ._numba_math import borrow, keep_alive, njit_cached, vexp, vtanh, wide_vectors
from ._products import _JIT, _back_rows_tail, _grad_part, _input_rows

__all__ = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward",
           "gru_backward"]


#: Rows per share aimed at: N // _ROWS shares, but at least two (see _shares; a per-step gemm
#: of few rows on one BLAS thread runs slower than one of many), and the per-step work
#: (N * H * kH multiply-adds) below which the recurrence runs in one share.
_ROWS = 64
_MIN_SHARE_ROWS = 8  # fewer rows than this make no share of their own
_PARALLEL_MIN_MACS = 1 << 18

#: Parts of the batch rows whose weight gradients are summed (with more than one share).
_PARTS = 2

#: How the last kernel ran: the number of row shares (1: on the calling thread, 0: the NumPy
#: fallback), of threads that ran them, and of the backward's parts of the weight gradients
#: (0 in a forward). Tests read it to prove a path ran.
stats = {"shares": 0, "threads": 0, "parts": 0}


@njit_cached(**_JIT)
def _sigmoid(x, one):
    wide_vectors()
    e = vexp(-abs(x))  # in (0, 1]: no overflow
    s = one / (one + e)
    return s if x >= 0 else e * s


# ---- RNN ------------------------------------------------------------------------------------
# Each kernel handles rows n0 <= n < n1. A step's rows of an (N, T, .) array, x[n0:n1, t],
# are a 2-D view whose rows are contiguous (T * width apart): BLAS takes it as it is. The loops
# over units index rows of the C-contiguous arrays themselves (x[n, t], not x[n0:n1, t][r],
# whose stride Numba does not know: LLVM then does not vectorise, 7x slower gates).


@njit_cached(**_JIT)
def _rnn_rows(Wh, h0, hs, one, n0, n1):
    """hs[n, t]: xs Wx + b on entry, tanh(that + hs[n, t-1] Wh) on exit."""
    wide_vectors()
    owned = np.empty(2, hs.dtype)
    coef = borrow(owned)
    for t in range(hs.shape[1]):
        h = h0[n0:n1] if t == 0 else hs[n0:n1, t - 1]
        A = hs[n0:n1, t]
        gemm(False, False, h, Wh, A, one, one, coef)  # A += h Wh
        for n in range(n0, n1):
            a = hs[n, t]  # a row of a C-contiguous array: LLVM knows its stride
            for j in range(a.size):
                a[j] = vtanh(a[j])
    keep_alive(owned)


@njit_cached(**_JIT)
def _rnn_back_rows(dhs, WhT, hs, dA, dh0, one, n0, n1):
    """dA[n, t] = (dhs[n, t] + dh) (1 - hs[n, t]^2), dh = dA[n, t] Wh^T, backwards in t."""
    wide_vectors()
    owned = (np.empty(2, dhs.dtype), np.zeros((n1 - n0, WhT.shape[1]), dhs.dtype))
    coef, dh = borrow(owned[0]), borrow(owned[1])  # dh (R, H)
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(n1 - n0):
            d, hr, dr, out = dhs[n0 + r, t], hs[n0 + r, t], dh[r], dA[n0 + r, t]
            for j in range(d.size):
                out[j] = (d[j] + dr[j]) * (one - hr[j] * hr[j])
        gemm(False, False, dA[n0:n1, t], WhT, dh, one, one - one, coef)  # dh = dA_t Wh^T
    dh0[n0:n1] = dh
    keep_alive(owned)


# ---- LSTM -----------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _lstm_rows(Wh, h0, c0, hs, cs, gates, one, n0, n1):
    """The LSTM recurrence; gates[n, t]: xs Wx + b on entry, [f, g, i, o] (4H,) on exit."""
    wide_vectors()
    H = Wh.shape[0]
    owned = np.empty(2, hs.dtype)
    coef = borrow(owned)
    for t in range(hs.shape[1]):
        h = h0[n0:n1] if t == 0 else hs[n0:n1, t - 1]
        A = gates[n0:n1, t]
        gemm(False, False, h, Wh, A, one, one, coef)  # A += h Wh
        for r in range(n1 - n0):
            n = n0 + r
            g, h_out, c_out = gates[n, t], hs[n, t], cs[n, t]
            c_prev = c0[n] if t == 0 else cs[n, t - 1]
            for j in range(H):
                f = _sigmoid(g[j], one)
                gg = vtanh(g[H + j])
                i = _sigmoid(g[2 * H + j], one)
                o = _sigmoid(g[3 * H + j], one)
                cj = f * c_prev[j] + gg * i
                g[j], g[H + j], g[2 * H + j], g[3 * H + j] = f, gg, i, o
                c_out[j] = cj
                h_out[j] = o * vtanh(cj)
    keep_alive(owned)


@njit_cached(**_JIT)
def _lstm_back_rows(dhs, WhT, c0, cs, gates, dA, dh0, dc, one, n0, n1):
    """dA[n, t] = [df, dg, di, do] backwards in t; dc: the last cell's gradient in, c0's out."""
    wide_vectors()
    H = WhT.shape[1]
    owned = (np.empty(2, dhs.dtype), np.zeros((n1 - n0, H), dhs.dtype))
    coef, dh = borrow(owned[0]), borrow(owned[1])  # dh (R, H)
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(n1 - n0):
            n = n0 + r
            g, c, d, dcr, dr, out = gates[n, t], cs[n, t], dhs[n, t], dc[n], dh[r], dA[n, t]
            c_prev = c0[n] if t == 0 else cs[n, t - 1]
            for j in range(H):
                f, gg, i, o = g[j], g[H + j], g[2 * H + j], g[3 * H + j]
                tc = vtanh(c[j])
                dh_t = d[j] + dr[j]
                ds = dcr[j] + dh_t * o * (one - tc * tc)  # gradient of c_t
                out[j] = ds * c_prev[j] * f * (one - f)
                out[H + j] = ds * i * (one - gg * gg)
                out[2 * H + j] = ds * gg * i * (one - i)
                out[3 * H + j] = dh_t * tc * o * (one - o)
                dcr[j] = ds * f
        gemm(False, False, dA[n0:n1, t], WhT, dh, one, one - one, coef)  # dh = dA_t Wh^T
    dh0[n0:n1] = dh
    keep_alive(owned)


# ---- GRU ------------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _gru_rows(Wh, h0, hs, gates, one, n0, n1):
    """The GRU recurrence; gates[n, t]: xs Wx + b on entry, [z, r, hh] (3H,) on exit."""
    wide_vectors()
    H = Wh.shape[0]
    owned = (np.empty(2, hs.dtype), np.empty((n1 - n0, H), hs.dtype))
    coef, rh = borrow(owned[0]), borrow(owned[1])  # rh: r * h, the input of Whh
    for t in range(hs.shape[1]):
        h = h0[n0:n1] if t == 0 else hs[n0:n1, t - 1]
        A = gates[n0:n1, t]
        gemm(False, False, h, Wh[:, :2 * H], A[:, :2 * H], one, one, coef)  # += h [Whz Whr]
        for r in range(n1 - n0):
            g, rhr = gates[n0 + r, t], rh[r]
            hr = h0[n0 + r] if t == 0 else hs[n0 + r, t - 1]
            for k in range(2 * H):
                g[k] = _sigmoid(g[k], one)
            for j in range(H):
                rhr[j] = g[H + j] * hr[j]
        gemm(False, False, rh, Wh[:, 2 * H:], A[:, 2 * H:], one, one, coef)  # += (r h) Whh
        for r in range(n1 - n0):
            g, out = gates[n0 + r, t], hs[n0 + r, t]
            hr = h0[n0 + r] if t == 0 else hs[n0 + r, t - 1]
            for j in range(H):
                hh = vtanh(g[2 * H + j])
                g[2 * H + j] = hh
                out[j] = (one - g[j]) * hr[j] + g[j] * hh
    keep_alive(owned)


@njit_cached(**_JIT)
def _gru_back_rows(dhs, WhT, h0, hs, gates, dA, dh0, one, n0, n1):
    """dA[n, t] = [dz, dr, dhh] backwards in t; dh0. WhT: Wh^T (3H, H)."""
    wide_vectors()
    H = WhT.shape[1]
    owned = (np.empty(2, dhs.dtype), np.zeros((n1 - n0, H), dhs.dtype),
             np.empty((n1 - n0, H), dhs.dtype))
    coef, dh, dhr = borrow(owned[0]), borrow(owned[1]), borrow(owned[2])  # dhr: of r h_prev
    for t in range(dhs.shape[1] - 1, -1, -1):
        D = dA[n0:n1, t]
        for r in range(n1 - n0):
            g, d, dr, out = gates[n0 + r, t], dhs[n0 + r, t], dh[r], dA[n0 + r, t]
            for j in range(H):  # through the candidate's tanh
                hh = g[2 * H + j]
                out[2 * H + j] = (d[j] + dr[j]) * g[j] * (one - hh * hh)
        gemm(False, False, D[:, 2 * H:], WhT[2 * H:], dhr, one, one - one, coef)
        for r in range(n1 - n0):
            n = n0 + r
            g, d, dr, out, dhr_r = gates[n, t], dhs[n, t], dh[r], dA[n, t], dhr[r]
            h_prev = h0[n] if t == 0 else hs[n, t - 1]
            for j in range(H):
                z, rr = g[j], g[H + j]
                dh_next = d[j] + dr[j]
                out[j] = dh_next * (g[2 * H + j] - h_prev[j]) * z * (one - z)
                out[H + j] = dhr_r[j] * h_prev[j] * rr * (one - rr)
                dr[j] = dh_next * (one - z) + rr * dhr_r[j]  # the direct paths to h_prev
        gemm(False, False, D[:, :2 * H], WhT[:2 * H], dh, one, one, coef)  # dh += [dz dr] Wzr^T
    dh0[n0:n1] = dh
    keep_alive(owned)


# ---- one share: its rows' input products, recurrence and row-wise gradients -----------------
# The share kernels borrow their arrays (no reference counting on them or any view of them:
# kernels._numba_math.borrow says why); the row kernels borrow their own buffers.


@njit_cached(**_JIT)
def _rnn_share(xs2, Wx, b, Wh, h0, hs, A2, one, n0, n1):
    wide_vectors()
    xs2, Wx, b = borrow(xs2), borrow(Wx), borrow(b)
    Wh, h0, hs = borrow(Wh), borrow(h0), borrow(hs)
    A2 = borrow(A2)
    _input_rows(xs2, Wx, b, A2, hs.shape[1], n0, n1)
    _rnn_rows(Wh, h0, hs, one, n0, n1)


@njit_cached(**_JIT)
def _rnn_back_share(dhs, WhT, hs, dA, dh0, dA2, Wx, dxs2, xs2, h0, xh2, one, n0, n1):
    wide_vectors()
    dhs, WhT, hs = borrow(dhs), borrow(WhT), borrow(hs)
    dA, dh0, dA2 = borrow(dA), borrow(dh0), borrow(dA2)
    Wx, dxs2, xs2 = borrow(Wx), borrow(dxs2), borrow(xs2)
    h0, xh2 = borrow(h0), borrow(xh2)
    _rnn_back_rows(dhs, WhT, hs, dA, dh0, one, n0, n1)
    _back_rows_tail(dA2, Wx, dxs2, xs2, h0, hs, xh2, n0, n1)


@njit_cached(**_JIT)
def _lstm_share(xs2, Wx, b, Wh, h0, c0, hs, cs, gates, A2, one, n0, n1):
    wide_vectors()
    xs2, Wx, b = borrow(xs2), borrow(Wx), borrow(b)
    Wh, h0, c0 = borrow(Wh), borrow(h0), borrow(c0)
    hs, cs, gates = borrow(hs), borrow(cs), borrow(gates)
    A2 = borrow(A2)
    _input_rows(xs2, Wx, b, A2, hs.shape[1], n0, n1)
    _lstm_rows(Wh, h0, c0, hs, cs, gates, one, n0, n1)


@njit_cached(**_JIT)
def _lstm_back_share(dhs, WhT, c0, cs, gates, dA, dh0, dc, dA2, Wx, dxs2, xs2, h0, hs, xh2,
                     one, n0, n1):
    wide_vectors()
    dhs, WhT, c0 = borrow(dhs), borrow(WhT), borrow(c0)
    cs, gates, dA = borrow(cs), borrow(gates), borrow(dA)
    dh0, dc, dA2 = borrow(dh0), borrow(dc), borrow(dA2)
    Wx, dxs2, xs2 = borrow(Wx), borrow(dxs2), borrow(xs2)
    h0, hs, xh2 = borrow(h0), borrow(hs), borrow(xh2)
    _lstm_back_rows(dhs, WhT, c0, cs, gates, dA, dh0, dc, one, n0, n1)
    _back_rows_tail(dA2, Wx, dxs2, xs2, h0, hs, xh2, n0, n1)


@njit_cached(**_JIT)
def _gru_share(xs2, Wx, b, Wh, h0, hs, gates, A2, one, n0, n1):
    wide_vectors()
    xs2, Wx, b = borrow(xs2), borrow(Wx), borrow(b)
    Wh, h0, hs = borrow(Wh), borrow(h0), borrow(hs)
    gates, A2 = borrow(gates), borrow(A2)
    _input_rows(xs2, Wx, b, A2, hs.shape[1], n0, n1)
    _gru_rows(Wh, h0, hs, gates, one, n0, n1)


@njit_cached(**_JIT)
def _gru_back_share(dhs, WhT, h0, hs, gates, dA, dh0, dA2, Wx, dxs2, xs2, xh2, one, n0, n1):
    wide_vectors()
    dhs, WhT, h0 = borrow(dhs), borrow(WhT), borrow(h0)
    hs, gates, dA = borrow(hs), borrow(gates), borrow(dA)
    dh0, dA2, Wx = borrow(dh0), borrow(dA2), borrow(Wx)
    dxs2, xs2, xh2 = borrow(dxs2), borrow(xs2), borrow(xh2)
    _gru_back_rows(dhs, WhT, h0, hs, gates, dA, dh0, one, n0, n1)
    _back_rows_tail(dA2, Wx, dxs2, xs2, h0, hs, xh2, n0, n1)


# ---- dispatch -------------------------------------------------------------------------------


def _shares(N, H, width):
    """How many row shares the N rows are cut into: a function of the shapes only (1: on the
    calling thread, with BLAS's own threads). At least two when the work is large and there
    are rows for two shares of _MIN_SHARE_ROWS: at (N=20, H=650) two shares of 10 rows took
    0.70 of the time of one share on BLAS's two threads."""
    if N < 2 * min(_ROWS, _MIN_SHARE_ROWS) or N * H * width < _PARALLEL_MIN_MACS:
        return 1
    return max(2, N // _ROWS)


def _run(kernel, args, items):
    """kernel(*args, *item) for every item (a tuple): on this thread, where BLAS keeps its own
    threads, when there is one item; else this thread and pool threads take items from a
    counter (Numba's thread count of them at most), BLAS held at one thread. Returns the
    number of threads."""
    workers = max(1, min(get_num_threads(), len(items)))
    if len(items) == 1:
        kernel(*args, *items[0])
        return workers
    counter = itertools.count()  # next() is atomic: each item runs once

    def work():
        while (k := next(counter)) < len(items):
            kernel(*args, *items[k])

    with _blas.OneThread():
        futures = [_flash.pool(workers - 1).submit(work) for _ in range(workers - 1)]
        try:
            work()
        finally:
            for f in futures:
                f.result()
    return workers


def _rows(kernel, args, N, H, width):
    """The share kernel on the row shares of :func:`_shares`; returns the number of shares."""
    shares = _shares(N, H, width)
    one = args[0].dtype.type(1)
    bounds = [(one, k * N // shares, (k + 1) * N // shares) for k in range(shares)]
    stats.update(shares=shares, threads=_run(kernel, args, bounds), parts=0)
    return shares


def _weight_grads(dA2, xh2, D, H, N, shares, r2=None):
    """dWx, dWh, db from the rows of dA2 and xh2 = [xs, h_prev]; with r2 (the GRU's reset
    gates, (N*T, H)), the last H columns of dWh take r2 h_prev instead of h_prev. With more
    than one share, two parts of the batch rows run at once (a product of all rows cut by
    columns ran 25% slower) and are summed: a function of the shapes only."""
    kH = dA2.shape[1]
    nparts = 1 if shares == 1 else _PARTS
    parts = np.empty((nparts, D + H, kH), dA2.dtype)  # [dWx; dWh] of each part
    dbs = np.empty((nparts, kH), dA2.dtype)
    r2 = _stand_in(dA2.dtype) if r2 is None else r2
    items = [(k, k * N // nparts, (k + 1) * N // nparts) for k in range(nparts)]
    _run(_grad_part, (dA2, xh2, r2, parts, dbs, 2 * H if r2.shape[1] else kH, N), items)
    stats["parts"] = nparts
    for k in range(1, nparts):  # in order: the bits do not depend on the threads
        parts[0] += parts[k]
        dbs[0] += dbs[k]
    return parts[0, :D], parts[0, D:], dbs[0]


def _stand_in(dtype):
    return np.zeros((1, 0), dtype)


def _fallback(xs, Wh):
    """True when the NumPy kernels run instead: an empty dimension, or no BLAS for Numba."""
    if min(xs.shape + Wh.shape) == 0 or not _blas.available():
        stats.update(shares=0, threads=0, parts=0)
        return True
    return False


def _contiguous(*arrays):
    return [np.ascontiguousarray(a) for a in arrays]


def rnn_forward(xs, Wx, Wh, b, h0):
    if _fallback(xs, Wh):
        return _numpy.rnn_forward(xs, Wx, Wh, b, h0)
    xs, Wx, Wh, b, h0 = _contiguous(xs, Wx, Wh, b, h0)
    N, T, D = xs.shape
    hs = np.empty((N, T, Wh.shape[0]), xs.dtype)
    _rows(_rnn_share, (xs.reshape(N * T, D), Wx, b, Wh, h0, hs, hs.reshape(N * T, -1)), N,
          *Wh.shape)
    return hs


def rnn_backward(dhs, xs, Wx, Wh, h0, hs):
    if _fallback(xs, Wh):
        return _numpy.rnn_backward(dhs, xs, Wx, Wh, h0, hs)
    dhs, xs, Wx, Wh, h0, hs = _contiguous(dhs, xs, Wx, Wh, h0, hs)
    N, T, D = xs.shape
    H = Wh.shape[0]
    dA, dh0, dxs = np.empty_like(hs), np.empty_like(h0), np.empty_like(xs)
    dA2, xs2, xh2 = dA.reshape(N * T, H), xs.reshape(N * T, D), np.empty((N * T, D + H), xs.dtype)
    shares = _rows(_rnn_back_share, (dhs, np.ascontiguousarray(Wh.T), hs, dA, dh0, dA2, Wx,
                                     dxs.reshape(N * T, D), xs2, h0, xh2), N, H, H)
    return (dxs, *_weight_grads(dA2, xh2, D, H, N, shares), dh0)


def lstm_forward(xs, Wx, Wh, b, h0, c0):
    if _fallback(xs, Wh):
        return _numpy.lstm_forward(xs, Wx, Wh, b, h0, c0)
    xs, Wx, Wh, b, h0, c0 = _contiguous(xs, Wx, Wh, b, h0, c0)
    N, T, D = xs.shape
    H = Wh.shape[0]
    hs, cs = np.empty((N, T, H), xs.dtype), np.empty((N, T, H), xs.dtype)
    gates = np.empty((N, T, 4 * H), xs.dtype)
    _rows(_lstm_share, (xs.reshape(N * T, D), Wx, b, Wh, h0, c0, hs, cs, gates,
                        gates.reshape(N * T, 4 * H)), N, H, 4 * H)
    return hs, cs, gates


def lstm_backward(dhs, dc, xs, Wx, Wh, h0, c0, hs, cs, gates):
    if _fallback(xs, Wh):
        return _numpy.lstm_backward(dhs, dc, xs, Wx, Wh, h0, c0, hs, cs, gates)
    dhs, xs, Wx, Wh, h0, c0, hs, cs, gates = _contiguous(dhs, xs, Wx, Wh, h0, c0, hs, cs,
                                                         gates)
    N, T, D = xs.shape
    H = Wh.shape[0]
    dA, dh0, dxs = np.empty_like(gates), np.empty_like(h0), np.empty_like(xs)
    dc0 = np.array(dc, dtype=xs.dtype, order="C")  # the last cell's gradient in, c0's out
    dA2, xs2, xh2 = dA.reshape(N * T, 4 * H), xs.reshape(N * T, D), np.empty((N * T, D + H),
                                                                           xs.dtype)
    shares = _rows(_lstm_back_share, (dhs, np.ascontiguousarray(Wh.T), c0, cs, gates, dA, dh0,
                                      dc0, dA2, Wx, dxs.reshape(N * T, D), xs2, h0, hs, xh2),
                   N, H, 4 * H)
    dWx, dWh, db = _weight_grads(dA2, xh2, D, H, N, shares)
    return dxs, dWx, dWh, db, dh0, dc0


def gru_forward(xs, Wx, Wh, b, h0):
    if _fallback(xs, Wh):
        return _numpy.gru_forward(xs, Wx, Wh, b, h0)
    xs, Wx, Wh, b, h0 = _contiguous(xs, Wx, Wh, b, h0)
    N, T, D = xs.shape
    H = Wh.shape[0]
    hs, gates = np.empty((N, T, H), xs.dtype), np.empty((N, T, 3 * H), xs.dtype)
    _rows(_gru_share, (xs.reshape(N * T, D), Wx, b, Wh, h0, hs, gates,
                       gates.reshape(N * T, 3 * H)), N, H, 3 * H)
    return hs, gates


def gru_backward(dhs, xs, Wx, Wh, h0, hs, gates):
    if _fallback(xs, Wh):
        return _numpy.gru_backward(dhs, xs, Wx, Wh, h0, hs, gates)
    dhs, xs, Wx, Wh, h0, hs, gates = _contiguous(dhs, xs, Wx, Wh, h0, hs, gates)
    N, T, D = xs.shape
    H = Wh.shape[0]
    dA, dh0, dxs = np.empty_like(gates), np.empty_like(h0), np.empty_like(xs)
    dA2, xs2, xh2 = dA.reshape(N * T, 3 * H), xs.reshape(N * T, D), np.empty((N * T, D + H),
                                                                           xs.dtype)
    shares = _rows(_gru_back_share, (dhs, np.ascontiguousarray(Wh.T), h0, hs, gates, dA, dh0,
                                     dA2, Wx, dxs.reshape(N * T, D), xs2, xh2), N, H, 3 * H)
    r2 = gates.reshape(N * T, 3 * H)[:, H:2 * H]
    dWx, dWh, db = _weight_grads(dA2, xh2, D, H, N, shares, r2)
    return dxs, dWx, dWh, db, dh0


rnn_forward, rnn_backward, lstm_forward, lstm_backward, gru_forward, gru_backward = (
    _recurrent.named(rnn_forward, rnn_backward, lstm_forward, lstm_backward, gru_forward,
                     gru_backward))
