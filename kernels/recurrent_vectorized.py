"""The recurrent kernels in NumPy: the input products of all steps at once, then the recurrence
one step at a time, each step a few whole-batch NumPy operations.

Same names, signatures and results as ``kernels.recurrent_loop``; the products around the
recurrence are in ``kernels._recurrent``.
"""

from __future__ import annotations

import numpy as np

from . import _recurrent

__all__ = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward",
           "gru_backward"]


def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


# ---- the recurrences: they fill the arrays they are given -----------------------------------


def rnn_scan(Wh, h0, hs):
    """hs[:, t]: xs Wx + b on entry, tanh(that + hs[:, t-1] Wh) on exit."""
    h = h0
    for t in range(hs.shape[1]):
        h = np.tanh(hs[:, t] + h @ Wh)
        hs[:, t] = h


def rnn_scan_back(dhs, WhT, hs, dA, dh0):
    """dA[:, t]: the gradient of step t's pre-activation; dh0 that of h0."""
    dh = np.zeros_like(dh0)
    for t in reversed(range(dhs.shape[1])):
        h = hs[:, t]
        dA[:, t] = dt = (dhs[:, t] + dh) * (1 - h * h)
        dh = dt @ WhT
    dh0[...] = dh


def lstm_scan(Wh, h0, c0, hs, cs, gates):
    """The LSTM recurrence; gates (N, T, 4H): xs Wx + b on entry, [f, g, i, o] on exit."""
    H = Wh.shape[0]
    h, c = h0, c0
    for t in range(hs.shape[1]):
        gt = gates[:, t]
        A = gt + h @ Wh  # (N, 4H)
        gt[:, :H] = f = _sigmoid(A[:, :H])
        gt[:, H:2 * H] = g = np.tanh(A[:, H:2 * H])
        gt[:, 2 * H:] = io = _sigmoid(A[:, 2 * H:])  # i and o
        c = f * c + g * io[:, :H]
        h = io[:, H:] * np.tanh(c)
        hs[:, t], cs[:, t] = h, c


def lstm_scan_back(dhs, WhT, c0, cs, gates, dA, dh0, dc):
    """dA[:, t] = [df, dg, di, do] (pre-activation); dh0, and dc (last cell in, c0 out)."""
    H = WhT.shape[1]
    dh = np.zeros_like(dh0)
    for t in reversed(range(dhs.shape[1])):
        gt = gates[:, t]
        f, g, i, o = gt[:, :H], gt[:, H:2 * H], gt[:, 2 * H:3 * H], gt[:, 3 * H:]
        c_prev = c0 if t == 0 else cs[:, t - 1]
        tc = np.tanh(cs[:, t])
        dh_t = dhs[:, t] + dh
        ds = dc + dh_t * o * (1 - tc * tc)  # gradient of c_t
        d = dA[:, t]
        d[:, :H] = ds * c_prev * f * (1 - f)
        d[:, H:2 * H] = ds * i * (1 - g * g)
        d[:, 2 * H:3 * H] = ds * g * i * (1 - i)
        d[:, 3 * H:] = dh_t * tc * o * (1 - o)
        dh = d @ WhT
        dc[...] = ds * f
    dh0[...] = dh


def gru_scan(Wh, h0, hs, gates):
    """The GRU recurrence; gates (N, T, 3H): xs Wx + b on entry, [z, r, hh] on exit."""
    H = Wh.shape[0]
    h = h0
    for t in range(hs.shape[1]):
        gt = gates[:, t]
        gt[:, :2 * H] = zr = _sigmoid(gt[:, :2 * H] + h @ Wh[:, :2 * H])  # (N, 2H)
        z = zr[:, :H]
        gt[:, 2 * H:] = hh = np.tanh(gt[:, 2 * H:] + (zr[:, H:] * h) @ Wh[:, 2 * H:])
        h = (1 - z) * h + z * hh
        hs[:, t] = h


def gru_scan_back(dhs, WhT, h0, hs, gates, dA, dh0):
    """dA[:, t] = [dz, dr, dhh] (pre-activation); dh0 that of h0. WhT: Wh^T (3H, H)."""
    H = WhT.shape[1]
    dh = np.zeros_like(dh0)
    for t in reversed(range(dhs.shape[1])):
        gt = gates[:, t]
        z, r, hh = gt[:, :H], gt[:, H:2 * H], gt[:, 2 * H:]
        h_prev = h0 if t == 0 else hs[:, t - 1]
        dh_next = dhs[:, t] + dh
        d = dA[:, t]
        d[:, 2 * H:] = dt_h = dh_next * z * (1 - hh * hh)
        dhr = dt_h @ WhT[2 * H:]
        d[:, :H] = dh_next * (hh - h_prev) * z * (1 - z)
        d[:, H:2 * H] = dhr * h_prev * r * (1 - r)
        dh = dh_next * (1 - z) + r * dhr + d[:, :2 * H] @ WhT[:2 * H]
    dh0[...] = dh


# ---- the kernels ----------------------------------------------------------------------------

rnn_forward, rnn_backward, lstm_forward, lstm_backward, gru_forward, gru_backward = (
    _recurrent.bind((rnn_scan, rnn_scan_back), (lstm_scan, lstm_scan_back),
                    (gru_scan, gru_scan_back)))
