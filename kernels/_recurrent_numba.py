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

_JIT = {"fastmath": set(FASTMATH), "nogil": True}

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


@njit_cached(**_JIT)
def _rnn_rows(xw, Wh, h0, hs, one, n0, n1):
    """hs[n, t] = tanh(xw[n, t] + hs[n, t-1] Wh) for rows n0 <= n < n1."""
    H = Wh.shape[0]
    h = h0[n0:n1].copy()  # (R, H)
    for t in range(xw.shape[1]):
        A = np.dot(h, Wh)  # (R, H)
        for r in range(n1 - n0):
            for j in range(H):
                v = _tanh(A[r, j] + xw[n0 + r, t, j], one)
                h[r, j] = v
                hs[n0 + r, t, j] = v


@njit_cached(**_JIT)
def _rnn_back_rows(dhs, WhT, hs, dA, dh0, one, n0, n1):
    H = WhT.shape[0]
    R = n1 - n0
    dh = np.zeros((R, H), dhs.dtype)
    dt = np.empty((R, H), dhs.dtype)
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(R):
            n = n0 + r
            for j in range(H):
                h = hs[n, t, j]
                v = (dhs[n, t, j] + dh[r, j]) * (one - h * h)
                dt[r, j] = v
                dA[n, t, j] = v
        dh = np.dot(dt, WhT)
    dh0[n0:n1] = dh




# ---- LSTM -----------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _lstm_rows(xw, Wh, h0, c0, hs, cs, gates, one, n0, n1):
    """The LSTM recurrence for rows n0 <= n < n1; gates [f, g, i, o] (N, T, 4H)."""
    H = Wh.shape[0]
    h = h0[n0:n1].copy()  # (R, H)
    c = c0[n0:n1].copy()
    for t in range(xw.shape[1]):
        A = np.dot(h, Wh)  # (R, 4H)
        for r in range(n1 - n0):
            n = n0 + r
            for j in range(H):
                f = _sigmoid(A[r, j] + xw[n, t, j], one)
                g = _tanh(A[r, H + j] + xw[n, t, H + j], one)
                i = _sigmoid(A[r, 2 * H + j] + xw[n, t, 2 * H + j], one)
                o = _sigmoid(A[r, 3 * H + j] + xw[n, t, 3 * H + j], one)
                cj = f * c[r, j] + g * i
                hj = o * _tanh(cj, one)
                c[r, j] = cj
                h[r, j] = hj
                cs[n, t, j] = cj
                hs[n, t, j] = hj
                gates[n, t, j] = f
                gates[n, t, H + j] = g
                gates[n, t, 2 * H + j] = i
                gates[n, t, 3 * H + j] = o


@njit_cached(**_JIT)
def _lstm_back_rows(dhs, WhT, c0, cs, gates, dA, dh0, dc, one, n0, n1):
    """dA (pre-activation gradients) for rows n0 <= n < n1; dc: last cell's gradient in, c0's
    out; dh0."""
    H = WhT.shape[1]
    R = n1 - n0
    dh = np.zeros((R, H), dhs.dtype)
    d = np.empty((R, 4 * H), dhs.dtype)
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(R):
            n = n0 + r
            for j in range(H):
                f = gates[n, t, j]
                g = gates[n, t, H + j]
                i = gates[n, t, 2 * H + j]
                o = gates[n, t, 3 * H + j]
                c_prev = c0[n, j] if t == 0 else cs[n, t - 1, j]
                tc = _tanh(cs[n, t, j], one)
                dh_t = dhs[n, t, j] + dh[r, j]
                ds = dc[n, j] + dh_t * o * (one - tc * tc)
                d[r, j] = ds * c_prev * f * (one - f)
                d[r, H + j] = ds * i * (one - g * g)
                d[r, 2 * H + j] = ds * g * i * (one - i)
                d[r, 3 * H + j] = dh_t * tc * o * (one - o)
                dc[n, j] = ds * f
            for k in range(4 * H):
                dA[n, t, k] = d[r, k]
        dh = np.dot(d, WhT)  # (R, H)
    dh0[n0:n1] = dh




# ---- GRU ------------------------------------------------------------------------------------


@njit_cached(**_JIT)
def _gru_rows(xw, Whzr, Whh, h0, hs, gates, one, n0, n1):
    """The GRU recurrence for rows n0 <= n < n1; gates [z, r, hh] (N, T, 3H)."""
    H = Whh.shape[0]
    R = n1 - n0
    h = h0[n0:n1].copy()  # (R, H)
    rh = np.empty((R, H), h.dtype)  # r * h, the input of Whh
    for t in range(xw.shape[1]):
        Azr = np.dot(h, Whzr)  # (R, 2H)
        for r in range(R):
            n = n0 + r
            for j in range(2 * H):
                gates[n, t, j] = _sigmoid(Azr[r, j] + xw[n, t, j], one)
            for j in range(H):
                rh[r, j] = gates[n, t, H + j] * h[r, j]
        Ah = np.dot(rh, Whh)  # (R, H)
        for r in range(R):
            n = n0 + r
            for j in range(H):
                hh = _tanh(Ah[r, j] + xw[n, t, 2 * H + j], one)
                z = gates[n, t, j]
                v = (one - z) * h[r, j] + z * hh
                gates[n, t, 2 * H + j] = hh
                h[r, j] = v
                hs[n, t, j] = v


@njit_cached(**_JIT)
def _gru_back_rows(dhs, WhzrT, WhhT, h0, hs, gates, dA, dh0, one, n0, n1):
    H = WhhT.shape[0]
    R = n1 - n0
    dh = np.zeros((R, H), dhs.dtype)
    dt_h = np.empty((R, H), dhs.dtype)
    dzr = np.empty((R, 2 * H), dhs.dtype)
    carry = np.empty((R, H), dhs.dtype)
    for t in range(dhs.shape[1] - 1, -1, -1):
        for r in range(R):
            n = n0 + r
            for j in range(H):
                z = gates[n, t, j]
                hh = gates[n, t, 2 * H + j]
                v = (dhs[n, t, j] + dh[r, j]) * z * (one - hh * hh)
                dt_h[r, j] = v
                dA[n, t, 2 * H + j] = v
        dhr = np.dot(dt_h, WhhT)  # (R, H): gradient of r * h_prev
        for r in range(R):
            n = n0 + r
            for j in range(H):
                z = gates[n, t, j]
                rr = gates[n, t, H + j]
                hh = gates[n, t, 2 * H + j]
                h_prev = h0[n, j] if t == 0 else hs[n, t - 1, j]
                dh_next = dhs[n, t, j] + dh[r, j]
                vz = dh_next * (hh - h_prev) * z * (one - z)
                vr = dhr[r, j] * h_prev * rr * (one - rr)
                dzr[r, j] = vz
                dzr[r, H + j] = vr
                dA[n, t, j] = vz
                dA[n, t, H + j] = vr
                carry[r, j] = dh_next * (one - z) + rr * dhr[r, j]
        dh = np.dot(dzr, WhzrT)  # (R, H)
        dh += carry
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
