"""The recurrent kernels in Numba: one kernel call runs the whole recurrence of a layer.

Same names, signatures and results as ``kernels.recurrent_loop``; the products around the
recurrence (``xs Wx + b`` for all steps, and the weight and input gradients from the saved
pre-activation gradients) are NumPy products in ``kernels._recurrent``.

How the recurrence runs:

* The forward finds ``xs Wx + b`` in its output array (``gates``; the RNN: ``hs``) and works
  in place: each step's ``h Wh`` (the GRU: ``h [Whz Whr]`` and ``(r h) Whh``) is added to
  that step's rows by one BLAS gemm (``beta = 1``, :func:`kernels._blas.gemm`, which takes
  the rows where they are: no copies of h, of the step's rows or of slices of Wh), and one
  fused loop per row then applies the gates over contiguous units, with sigmoid and tanh
  written on :func:`kernels._numba_math.vexp` so that LLVM vectorises them. The backward
  writes each step's pre-activation gradients straight into ``dA`` and multiplies those rows
  by a contiguous copy of ``Wh^T``, made once per call (OpenBLAS's gemm with the transpose
  flag on Wh ran 15% slower at (128, 1024) x (1024, 256)).
* Rows of the batch never interact, so the batch is cut into row shares of at least
  ``_ROWS`` rows, by the shapes only (:func:`_shares`), and each share runs the whole time
  loop of its rows: no barrier per time step. Threads (Numba's thread count: the calling
  thread and a kept pool of Python threads; the kernels release the GIL) take shares from a
  counter, one thread runs them one after another, and BLAS is held at one thread meanwhile.
  A single share runs on the calling thread, where BLAS keeps its own threads.
* Without SciPy (Numba's BLAS), or with an empty dimension, the NumPy recurrences of
  ``kernels.recurrent_vectorized`` run instead.

A row's result depends on the share it falls in (BLAS may round a product of fewer rows
differently), and the shares depend on the shapes only, so results do not depend on the
thread count.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import get_num_threads

from . import _blas, _recurrent
from . import recurrent_vectorized as _numpy
from ._blas import gemm
from ._numba_math import FASTMATH, njit_cached, vexp

__all__ = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward",
           "gru_backward"]

_JIT = {"fastmath": set(FASTMATH), "nogil": True, "error_model": "numpy"}  # no division checks

#: Rows per share aimed at: N // _ROWS shares, but at least two (see _shares; a per-step gemm
#: of few rows on one BLAS thread runs slower than one of many), and the per-step work
#: (N * H * kH multiply-adds) below which the recurrence runs in one share.
_ROWS = 64
_MIN_SHARE_ROWS = 8  # fewer rows than this make no share of their own
_PARALLEL_MIN_MACS = 1 << 18

#: How the last recurrence ran: the number of row shares (1: on the calling thread, 0: the
#: NumPy fallback) and of threads that ran them. Tests read it to prove a path ran.
stats = {"shares": 0, "threads": 0}


@njit_cached(**_JIT)
def _sigmoid(x, one):
    e = vexp(-abs(x))  # in (0, 1]: no overflow
    s = one / (one + e)
    return s if x >= 0 else e * s


@njit_cached(**_JIT)
def _tanh(x, one):
    e = vexp(-(abs(x) + abs(x)))
    t = (one - e) / (one + e)
    return t if x >= 0 else -t


# ---- RNN ------------------------------------------------------------------------------------
# Each kernel handles rows n0 <= n < n1. A step's rows of an (N, T, .) array, x[n0:n1, t],
# are a 2-D view whose rows are contiguous (T * width apart): BLAS takes it as it is. The loops
# over units index rows of the C-contiguous arrays themselves (x[n, t], not x[n0:n1, t][r],
# whose stride Numba does not know: LLVM then does not vectorise, 7x slower gates).


@njit_cached(**_JIT)
def _rnn_rows(Wh, h0, hs, one, n0, n1):
    """hs[n, t]: xs Wx + b on entry, tanh(that + hs[n, t-1] Wh) on exit."""
    coef = np.empty(2, hs.dtype)
    for t in range(hs.shape[1]):
        h = h0[n0:n1] if t == 0 else hs[n0:n1, t - 1]
        A = hs[n0:n1, t]
        gemm(False, False, h, Wh, A, one, one, coef)  # A += h Wh
        for n in range(n0, n1):
            a = hs[n, t]  # a row of a C-contiguous array: LLVM knows its stride
            for j in range(a.size):
                a[j] = _tanh(a[j], one)


@njit_cached(**_JIT)
def _rnn_back_rows(dhs, WhT, hs, dA, dh0, one, n0, n1):
    """dA[n, t] = (dhs[n, t] + dh) (1 - hs[n, t]^2), dh = dA[n, t] Wh^T, backwards in t."""
    coef = np.empty(2, dhs.dtype)
    dh = np.zeros((n1 - n0, WhT.shape[1]), dhs.dtype)  # (R, H)
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(n1 - n0):
            d, hr, dr, out = dhs[n0 + r, t], hs[n0 + r, t], dh[r], dA[n0 + r, t]
            for j in range(d.size):
                out[j] = (d[j] + dr[j]) * (one - hr[j] * hr[j])
        gemm(False, False, dA[n0:n1, t], WhT, dh, one, one - one, coef)  # dh = dA_t Wh^T
    dh0[n0:n1] = dh


# ---- LSTM -----------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _lstm_rows(Wh, h0, c0, hs, cs, gates, one, n0, n1):
    """The LSTM recurrence; gates[n, t]: xs Wx + b on entry, [f, g, i, o] (4H,) on exit."""
    H = Wh.shape[0]
    coef = np.empty(2, hs.dtype)
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
                gg = _tanh(g[H + j], one)
                i = _sigmoid(g[2 * H + j], one)
                o = _sigmoid(g[3 * H + j], one)
                cj = f * c_prev[j] + gg * i
                g[j], g[H + j], g[2 * H + j], g[3 * H + j] = f, gg, i, o
                c_out[j] = cj
                h_out[j] = o * _tanh(cj, one)


@njit_cached(**_JIT)
def _lstm_back_rows(dhs, WhT, c0, cs, gates, dA, dh0, dc, one, n0, n1):
    """dA[n, t] = [df, dg, di, do] backwards in t; dc: the last cell's gradient in, c0's out."""
    H = WhT.shape[1]
    coef = np.empty(2, dhs.dtype)
    dh = np.zeros((n1 - n0, H), dhs.dtype)  # (R, H)
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(n1 - n0):
            n = n0 + r
            g, c, d, dcr, dr, out = gates[n, t], cs[n, t], dhs[n, t], dc[n], dh[r], dA[n, t]
            c_prev = c0[n] if t == 0 else cs[n, t - 1]
            for j in range(H):
                f, gg, i, o = g[j], g[H + j], g[2 * H + j], g[3 * H + j]
                tc = _tanh(c[j], one)
                dh_t = d[j] + dr[j]
                ds = dcr[j] + dh_t * o * (one - tc * tc)  # gradient of c_t
                out[j] = ds * c_prev[j] * f * (one - f)
                out[H + j] = ds * i * (one - gg * gg)
                out[2 * H + j] = ds * gg * i * (one - i)
                out[3 * H + j] = dh_t * tc * o * (one - o)
                dcr[j] = ds * f
        gemm(False, False, dA[n0:n1, t], WhT, dh, one, one - one, coef)  # dh = dA_t Wh^T
    dh0[n0:n1] = dh


# ---- GRU ------------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _gru_rows(Wh, h0, hs, gates, one, n0, n1):
    """The GRU recurrence; gates[n, t]: xs Wx + b on entry, [z, r, hh] (3H,) on exit."""
    H = Wh.shape[0]
    coef = np.empty(2, hs.dtype)
    rh = np.empty((n1 - n0, H), hs.dtype)  # r * h, the input of Whh
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
                hh = _tanh(g[2 * H + j], one)
                g[2 * H + j] = hh
                out[j] = (one - g[j]) * hr[j] + g[j] * hh


@njit_cached(**_JIT)
def _gru_back_rows(dhs, WhT, h0, hs, gates, dA, dh0, one, n0, n1):
    """dA[n, t] = [dz, dr, dhh] backwards in t; dh0. WhT: Wh^T (3H, H)."""
    H = WhT.shape[1]
    coef = np.empty(2, dhs.dtype)
    dh = np.zeros((n1 - n0, H), dhs.dtype)  # (R, H)
    dhr = np.empty_like(dh)  # the gradient of r h_prev
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


# ---- dispatch -------------------------------------------------------------------------------


def _shares(N, H, width):
    """How many row shares the N rows are cut into: a function of the shapes only (1: on the
    calling thread, with BLAS's own threads). At least two when the work is large and there
    are rows for two shares of _MIN_SHARE_ROWS: at (N=20, H=650) two shares of 10 rows took
    0.70 of the time of one share on BLAS's two threads."""
    if N < 2 * min(_ROWS, _MIN_SHARE_ROWS) or N * H * width < _PARALLEL_MIN_MACS:
        return 1
    return max(2, N // _ROWS)


_pool: dict = {}
_pool_lock = threading.Lock()


def _executor(workers):
    """A thread pool of at least ``workers`` threads, kept for the next calls."""
    with _pool_lock:
        if _pool.get("size", 0) < workers:
            if "pool" in _pool:
                _pool["pool"].shutdown(wait=False)
            _pool["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="fastattn-recurrent")
            _pool["size"] = workers
        return _pool["pool"]


def _dispatch(rows, fallback, args, N, H, width):
    """Run the recurrence ``rows`` (a ``nogil`` kernel) on all N rows: in one share on this
    thread, or in the row shares of :func:`_shares`, which this thread and pool threads take
    from a counter, BLAS held at one thread."""
    if min(a.size for a in args if isinstance(a, np.ndarray)) == 0 or not _blas.available():
        stats.update(shares=0, threads=0)
        return fallback(*args)
    one = args[0].dtype.type(1)
    shares = _shares(N, H, width)
    workers = max(1, min(get_num_threads(), shares))
    stats.update(shares=shares, threads=workers)
    if shares == 1:
        rows(*args, one, 0, N)
        return None
    bounds = [(k * N // shares, (k + 1) * N // shares) for k in range(shares)]
    counter = itertools.count()  # next() is atomic: each share runs once

    def work():
        while (k := next(counter)) < shares:
            rows(*args, one, *bounds[k])

    with _blas.OneThread():
        futures = [_executor(workers - 1).submit(work) for _ in range(workers - 1)]
        try:
            work()
        finally:
            for f in futures:
                f.result()
    return None


def _rnn_scan(Wh, h0, hs):
    _dispatch(_rnn_rows, _numpy.rnn_scan, (Wh, h0, hs), hs.shape[0], *Wh.shape)


def _rnn_scan_back(dhs, WhT, hs, dA, dh0):
    _dispatch(_rnn_back_rows, _numpy.rnn_scan_back, (dhs, WhT, hs, dA, dh0), dhs.shape[0],
              *WhT.shape[::-1])


def _lstm_scan(Wh, h0, c0, hs, cs, gates):
    _dispatch(_lstm_rows, _numpy.lstm_scan, (Wh, h0, c0, hs, cs, gates), hs.shape[0],
              *Wh.shape)


def _lstm_scan_back(dhs, WhT, c0, cs, gates, dA, dh0, dc):
    _dispatch(_lstm_back_rows, _numpy.lstm_scan_back, (dhs, WhT, c0, cs, gates, dA, dh0, dc),
              dhs.shape[0], *WhT.shape[::-1])


def _gru_scan(Wh, h0, hs, gates):
    _dispatch(_gru_rows, _numpy.gru_scan, (Wh, h0, hs, gates), hs.shape[0], *Wh.shape)


def _gru_scan_back(dhs, WhT, h0, hs, gates, dA, dh0):
    _dispatch(_gru_back_rows, _numpy.gru_scan_back, (dhs, WhT, h0, hs, gates, dA, dh0),
              dhs.shape[0], *WhT.shape[::-1])


rnn_forward, rnn_backward, lstm_forward, lstm_backward, gru_forward, gru_backward = (
    _recurrent.bind((_rnn_scan, _rnn_scan_back), (_lstm_scan, _lstm_scan_back),
                    (_gru_scan, _gru_scan_back)))
