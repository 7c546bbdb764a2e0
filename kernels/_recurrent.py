"""The big products around the recurrence, in NumPy, and the names of the recurrent kernels.

A recurrent layer's forward is ``xs Wx + b`` for all steps at once (one (N*T, D) x (D, kH)
product), then the recurrence over t, which needs ``h_{t-1} Wh`` step by step. Its backward
runs the recurrence backwards and keeps only ``dA`` (N, T, kH), the gradients of the
pre-activations of every step; the weight and input gradients then are big products too:
``dWx = xs^T dA``, ``dWh = h_prev^T dA``, ``db = sum dA``, ``dxs = dA Wx^T``, over all N*T rows
at once.

The functions below take the recurrence (``scan``/``scan_back``) of the NumPy backend
(``kernels.recurrent_vectorized``; the Numba backend, ``kernels._recurrent_numba``, runs the
same products on its own threads instead). Their signatures and results are those of
``kernels.recurrent_loop``, whose names and documentation :func:`named` gives both backends'
kernels. A forward scan finds ``xs Wx + b`` in the
array it fills (``gates``; the RNN's ``hs``) and overwrites it step by step: no separate
(N, T, kH) array of input products. The forward scans take Wh (H, kH), the backward ones a
contiguous Wh^T (kH, H).
"""

from __future__ import annotations

import functools

import numpy as np

from . import recurrent_loop as _reference


def input_product(xs, Wx, b):
    """xs Wx + b for all steps: xs (N, T, D) -> (N, T, kH), one BLAS product."""
    N, T, D = xs.shape
    xw = xs.reshape(N * T, D) @ Wx  # (N*T, kH)
    xw += b
    return xw.reshape(N, T, Wx.shape[1])


def previous_states(h0, hs):
    """h_prev (N, T, H): the state before each step (h0, hs[:, 0], ..., hs[:, T-2])."""
    h_prev = np.empty_like(hs)
    if hs.shape[1]:
        h_prev[:, 0] = h0
        h_prev[:, 1:] = hs[:, :-1]
    return h_prev


def input_grads(dA, xs, Wx):
    """dxs (N, T, D), dWx (D, kH), db (kH,) from dA (N, T, kH)."""
    N, T, D = xs.shape
    dA2 = dA.reshape(N * T, dA.shape[2])  # (N*T, kH)
    x2 = xs.reshape(N * T, D)
    dxs = (dA2 @ Wx.T).reshape(N, T, D)
    db = dA.sum(axis=0).sum(axis=0)  # over N, then over T: error ~ (N + T) eps, not N T eps
    return dxs, x2.T @ dA2, db


def _rnn_forward(xs, Wx, Wh, b, h0, scan):
    hs = input_product(xs, Wx, b)  # (N, T, H): the scan turns it into the states in place
    scan(Wh, h0, hs)
    return hs


def _rnn_backward(dhs, xs, Wx, Wh, h0, hs, scan_back):
    dA = np.empty_like(hs)  # (N, T, H)
    dh0 = np.empty_like(h0)
    scan_back(dhs, np.ascontiguousarray(Wh.T), hs, dA, dh0)
    dxs, dWx, db = input_grads(dA, xs, Wx)
    H = Wh.shape[0]
    dWh = previous_states(h0, hs).reshape(-1, H).T @ dA.reshape(-1, H)  # (H, H)
    return dxs, dWx, dWh, db, dh0


def _lstm_forward(xs, Wx, Wh, b, h0, c0, scan):
    N, T, _ = xs.shape
    H = Wh.shape[0]
    hs = np.empty((N, T, H), xs.dtype)
    cs = np.empty((N, T, H), xs.dtype)
    gates = input_product(xs, Wx, b)  # (N, T, 4H): the scan turns it into the gates in place
    scan(Wh, h0, c0, hs, cs, gates)
    return hs, cs, gates


def _lstm_backward(dhs, dc, xs, Wx, Wh, h0, c0, hs, cs, gates, scan_back):
    dA = np.empty_like(gates)  # (N, T, 4H)
    dh0 = np.empty_like(h0)
    dc0 = np.array(dc, copy=True)  # the scan turns the last cell's gradient into the first's
    scan_back(dhs, np.ascontiguousarray(Wh.T), c0, cs, gates, dA, dh0, dc0)
    dxs, dWx, db = input_grads(dA, xs, Wx)
    H = Wh.shape[0]
    dWh = previous_states(h0, hs).reshape(-1, H).T @ dA.reshape(-1, 4 * H)  # (H, 4H)
    return dxs, dWx, dWh, db, dh0, dc0


def _gru_forward(xs, Wx, Wh, b, h0, scan):
    N, T, _ = xs.shape
    hs = np.empty((N, T, Wh.shape[0]), xs.dtype)
    gates = input_product(xs, Wx, b)  # (N, T, 3H): the scan turns it into the gates in place
    scan(Wh, h0, hs, gates)
    return hs, gates


def _gru_backward(dhs, xs, Wx, Wh, h0, hs, gates, scan_back):
    H = Wh.shape[0]
    dA = np.empty_like(gates)  # (N, T, 3H)
    dh0 = np.empty_like(h0)
    scan_back(dhs, np.ascontiguousarray(Wh.T), h0, hs, gates, dA, dh0)  # Wh^T (3H, H)
    dxs, dWx, db = input_grads(dA, xs, Wx)
    h_prev = previous_states(h0, hs)  # (N, T, H)
    dWh = np.empty_like(Wh)
    dWh[:, :2 * H] = h_prev.reshape(-1, H).T @ dA[:, :, :2 * H].reshape(-1, 2 * H)
    rh = h_prev * gates[:, :, H:2 * H]  # r h_prev, the input of Whh
    dWh[:, 2 * H:] = rh.reshape(-1, H).T @ dA[:, :, 2 * H:].reshape(-1, H)
    return dxs, dWx, dWh, db, dh0


def bind(rnn_scans, lstm_scans, gru_scans):
    """The six kernels (rnn/lstm/gru forward/backward) around a backend's recurrences, each
    (scan, scan_back) pair; named and documented as ``kernels.recurrent_loop``'s."""

    def rnn_forward(xs, Wx, Wh, b, h0):
        return _rnn_forward(xs, Wx, Wh, b, h0, rnn_scans[0])

    def rnn_backward(dhs, xs, Wx, Wh, h0, hs):
        return _rnn_backward(dhs, xs, Wx, Wh, h0, hs, rnn_scans[1])

    def lstm_forward(xs, Wx, Wh, b, h0, c0):
        return _lstm_forward(xs, Wx, Wh, b, h0, c0, lstm_scans[0])

    def lstm_backward(dhs, dc, xs, Wx, Wh, h0, c0, hs, cs, gates):
        return _lstm_backward(dhs, dc, xs, Wx, Wh, h0, c0, hs, cs, gates, lstm_scans[1])

    def gru_forward(xs, Wx, Wh, b, h0):
        return _gru_forward(xs, Wx, Wh, b, h0, gru_scans[0])

    def gru_backward(dhs, xs, Wx, Wh, h0, hs, gates):
        return _gru_backward(dhs, xs, Wx, Wh, h0, hs, gates, gru_scans[1])

    return named(rnn_forward, rnn_backward, lstm_forward, lstm_backward, gru_forward,
                 gru_backward)


def named(*fns):
    """fns, each given the name and documentation of ``kernels.recurrent_loop``'s kernel of its
    name; returned as a tuple."""
    for fn in fns:
        functools.update_wrapper(fn, getattr(_reference, fn.__name__), updated=())
        del fn.__wrapped__  # the signature is the reference's; the code is not
    return fns
