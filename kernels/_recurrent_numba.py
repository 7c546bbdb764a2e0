"""The recurrent kernels in Numba: one kernel call runs the whole recurrence of a layer.

Same names, signatures and results as ``kernels.recurrent_loop``; the products around the
recurrence (``xs Wx + b`` for all steps, and the weight and input gradients from the saved
pre-activation gradients) are NumPy products in ``kernels._recurrent``.

How the recurrence runs:

* Each step's ``h Wh`` (the GRU: ``h [Whz Whr]`` and ``(r h) Whh``; the backward: products with
  ``Wh^T``) is a BLAS product through ``np.dot`` inside the kernel; the gates around it are
  fused loops over (row, unit), with sigmoid and tanh written on
  :func:`kernels._numba_math.vexp` so that LLVM vectorises them.
* Rows of the batch never interact, so the batch is cut into contiguous shares of rows, one
  per thread (Numba's thread count: the calling thread and a kept pool of Python threads; the
  kernels release the GIL), and each thread runs the whole time loop of its rows: no barrier
  per time step. BLAS is held at one thread meanwhile. Small work (few rows, small H) runs on
  the calling thread, where BLAS keeps its own threads (they share the gate products of a
  large H).
* Without SciPy (Numba's ``np.dot`` needs its BLAS), or with an empty dimension, the NumPy
  recurrences of ``kernels.recurrent_vectorized`` run instead.

Each row's result does not depend on the share it falls in except through BLAS's summation
order, which may differ with the number of rows in a product.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import get_num_threads

from . import _blas, _recurrent
from . import recurrent_vectorized as _numpy
from ._numba_math import FASTMATH, njit_cached, vexp

__all__ = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward",
           "gru_backward"]

_JIT = {"fastmath": set(FASTMATH), "nogil": True, "error_model": "numpy"}  # no division checks

#: Rows per thread at least, and the per-step work (N * H * kH multiply-adds) below which the
#: recurrence runs on the calling thread.
_MIN_ROWS = 4
_PARALLEL_MIN_MACS = 1 << 18

#: How the last recurrence ran: the number of row shares (1: on the calling thread, 0: the
#: NumPy fallback). Tests read it to prove a path ran.
stats = {"shares": 0}


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
# Each kernel handles rows n0 <= n < n1. Per step and row, the loops run over contiguous 1-D
# views (a row of the step's product, of xw[n, t], of the outputs), which LLVM vectorises.


@njit_cached(**_JIT)
def _rnn_rows(xw, Wh, h0, hs, one, n0, n1):
    """hs[n, t] = tanh(xw[n, t] + hs[n, t-1] Wh)."""
    h = h0[n0:n1].copy()  # (R, H)
    for t in range(xw.shape[1]):
        A = np.dot(h, Wh)  # (R, H)
        for r in range(n1 - n0):
            a, x, hr, out = A[r], xw[n0 + r, t], h[r], hs[n0 + r, t]
            for j in range(hr.size):
                v = _tanh(a[j] + x[j], one)
                hr[j] = v
                out[j] = v


@njit_cached(**_JIT)
def _rnn_back_rows(dhs, WhT, hs, dA, dh0, one, n0, n1):
    """dA[n, t] = (dhs[n, t] + dh) (1 - hs[n, t]^2), dh = dA[n, t] Wh^T, backwards in t."""
    dh = np.zeros((n1 - n0, WhT.shape[0]), dhs.dtype)  # (R, H)
    dt = np.empty_like(dh)  # the step's dA rows, contiguous for the product
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(n1 - n0):
            n = n0 + r
            d, hr, dr, dtr = dhs[n, t], hs[n, t], dh[r], dt[r]
            for j in range(d.size):
                dtr[j] = (d[j] + dr[j]) * (one - hr[j] * hr[j])
            dA[n, t] = dtr
        dh = np.dot(dt, WhT)  # (R, H)
    dh0[n0:n1] = dh


# ---- LSTM -----------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _lstm_rows(xw, Wh, h0, c0, hs, cs, gates, one, n0, n1):
    """The LSTM recurrence; gates[n, t] = [f, g, i, o] (4H,)."""
    H = Wh.shape[0]
    h = h0[n0:n1].copy()  # (R, H)
    c = c0[n0:n1].copy()
    for t in range(xw.shape[1]):
        A = np.dot(h, Wh)  # (R, 4H)
        for r in range(n1 - n0):
            n = n0 + r
            a, x, g = A[r], xw[n, t], gates[n, t]
            for k in range(H):  # f
                g[k] = _sigmoid(a[k] + x[k], one)
            for k in range(H, 2 * H):  # g
                g[k] = _tanh(a[k] + x[k], one)
            for k in range(2 * H, 4 * H):  # i, o
                g[k] = _sigmoid(a[k] + x[k], one)
            hr, cr, h_out, c_out = h[r], c[r], hs[n, t], cs[n, t]
            for j in range(H):
                cj = g[j] * cr[j] + g[H + j] * g[2 * H + j]
                hj = g[3 * H + j] * _tanh(cj, one)
                cr[j] = cj
                hr[j] = hj
                c_out[j] = cj
                h_out[j] = hj


@njit_cached(**_JIT)
def _lstm_back_rows(dhs, WhT, c0, cs, gates, dA, dh0, dc, one, n0, n1):
    """dA[n, t] = [df, dg, di, do] backwards in t; dc: the last cell's gradient in, c0's out."""
    H = WhT.shape[1]
    dh = np.zeros((n1 - n0, H), dhs.dtype)  # (R, H)
    dstep = np.empty((n1 - n0, 4 * H), dhs.dtype)  # the step's dA rows, contiguous
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(n1 - n0):
            n = n0 + r
            g, c, d, dcr, dr, out = gates[n, t], cs[n, t], dhs[n, t], dc[n], dh[r], dstep[r]
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
            dA[n, t] = out
        dh = np.dot(dstep, WhT)  # (R, H)
    dh0[n0:n1] = dh


# ---- GRU ------------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _gru_rows(xw, Whzr, Whh, h0, hs, gates, one, n0, n1):
    """The GRU recurrence; gates[n, t] = [z, r, hh] (3H,)."""
    H = Whh.shape[0]
    h = h0[n0:n1].copy()  # (R, H)
    rh = np.empty_like(h)  # r * h, the input of Whh
    for t in range(xw.shape[1]):
        Azr = np.dot(h, Whzr)  # (R, 2H)
        for r in range(n1 - n0):
            a, x, g, hr, rhr = Azr[r], xw[n0 + r, t], gates[n0 + r, t], h[r], rh[r]
            for k in range(2 * H):
                g[k] = _sigmoid(a[k] + x[k], one)
            for j in range(H):
                rhr[j] = g[H + j] * hr[j]
        Ah = np.dot(rh, Whh)  # (R, H)
        for r in range(n1 - n0):
            a, x, g, hr, out = Ah[r], xw[n0 + r, t], gates[n0 + r, t], h[r], hs[n0 + r, t]
            for j in range(H):
                hh = _tanh(a[j] + x[2 * H + j], one)
                v = (one - g[j]) * hr[j] + g[j] * hh
                g[2 * H + j] = hh
                hr[j] = v
                out[j] = v


@njit_cached(**_JIT)
def _gru_back_rows(dhs, WhzrT, WhhT, h0, hs, gates, dA, dh0, one, n0, n1):
    """dA[n, t] = [dz, dr, dhh] backwards in t; dh0."""
    H = WhhT.shape[0]
    dh = np.zeros((n1 - n0, H), dhs.dtype)  # (R, H)
    dzr = np.empty((n1 - n0, 2 * H), dhs.dtype)  # [dz, dr] of the step
    dth = np.empty_like(dh)  # dhh of the step
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(n1 - n0):
            g, d, dr, dthr = gates[n0 + r, t], dhs[n0 + r, t], dh[r], dth[r]
            for j in range(H):  # through the candidate's tanh
                hh = g[2 * H + j]
                dthr[j] = (d[j] + dr[j]) * g[j] * (one - hh * hh)
            dA[n0 + r, t, 2 * H:] = dthr
        dhr = np.dot(dth, WhhT)  # (R, H): the gradient of r h_prev
        for r in range(n1 - n0):
            n = n0 + r
            g, d, dr, out, dzr_r = gates[n, t], dhs[n, t], dh[r], dA[n, t], dzr[r]
            h_prev = h0[n] if t == 0 else hs[n, t - 1]
            for j in range(H):
                z, rr = g[j], g[H + j]
                dh_next = d[j] + dr[j]
                vz = dh_next * (g[2 * H + j] - h_prev[j]) * z * (one - z)
                vr = dhr[r, j] * h_prev[j] * rr * (one - rr)
                dzr_r[j] = vz
                dzr_r[H + j] = vr
                dr[j] = dh_next * (one - z) + rr * dhr[r, j]  # the direct paths to h_prev
            out[:2 * H] = dzr_r
        dh += np.dot(dzr, WhzrT)  # (R, H)
    dh0[n0:n1] = dh


# ---- dispatch -------------------------------------------------------------------------------


def _shares(N, H, width):
    """How many row shares to run in parallel (1: on the calling thread)."""
    threads = get_num_threads()
    if threads < 2 or N < 2 * _MIN_ROWS or N * H * width < _PARALLEL_MIN_MACS:
        return 1
    return min(threads, N // _MIN_ROWS)


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
    """Run the recurrence ``rows`` (a ``nogil`` kernel) on all N rows: on this thread, or in
    row shares, one per thread (this one and pool threads), BLAS held at one thread."""
    if min(a.size for a in args if isinstance(a, np.ndarray)) == 0 or not _blas.available():
        stats["shares"] = 0
        return fallback(*args)
    one = args[0].dtype.type(1)
    shares = _shares(N, H, width)
    stats["shares"] = shares
    if shares == 1:
        rows(*args, one, 0, N)
        return None
    bounds = [(k * N // shares, (k + 1) * N // shares) for k in range(shares)]
    with _blas.OneThread():
        futures = [_executor(shares - 1).submit(rows, *args, one, n0, n1)
                   for n0, n1 in bounds[1:]]
        try:
            rows(*args, one, *bounds[0])
        finally:
            for f in futures:
                f.result()
    return None


def _rnn_scan(xw, Wh, h0, hs):
    _dispatch(_rnn_rows, _numpy.rnn_scan, (xw, Wh, h0, hs),
              xw.shape[0], Wh.shape[0], Wh.shape[1])


def _rnn_scan_back(dhs, WhT, hs, dA, dh0):
    _dispatch(_rnn_back_rows, _numpy.rnn_scan_back, (dhs, WhT, hs, dA, dh0),
              dhs.shape[0], WhT.shape[0], WhT.shape[1])


def _lstm_scan(xw, Wh, h0, c0, hs, cs, gates):
    _dispatch(_lstm_rows, _numpy.lstm_scan, (xw, Wh, h0, c0, hs, cs, gates),
              xw.shape[0], Wh.shape[0], Wh.shape[1])


def _lstm_scan_back(dhs, WhT, c0, cs, gates, dA, dh0, dc):
    _dispatch(_lstm_back_rows, _numpy.lstm_scan_back,
              (dhs, WhT, c0, cs, gates, dA, dh0, dc), dhs.shape[0], WhT.shape[1], WhT.shape[0])


def _gru_scan(xw, Whzr, Whh, h0, hs, gates):
    _dispatch(_gru_rows, _numpy.gru_scan, (xw, Whzr, Whh, h0, hs, gates),
              xw.shape[0], Whh.shape[0], 3 * Whh.shape[0])


def _gru_scan_back(dhs, WhzrT, WhhT, h0, hs, gates, dA, dh0):
    _dispatch(_gru_back_rows, _numpy.gru_scan_back,
              (dhs, WhzrT, WhhT, h0, hs, gates, dA, dh0), dhs.shape[0], WhhT.shape[0],
              3 * WhhT.shape[0])


rnn_forward, rnn_backward, lstm_forward, lstm_backward, gru_forward, gru_backward = (
    _recurrent.bind((_rnn_scan, _rnn_scan_back), (_lstm_scan, _lstm_scan_back),
                    (_gru_scan, _gru_scan_back)))
