"""The recurrent kernels' reference: the book's per-step algorithm, one time step at a time.

Each time step is what one of the book's ``RNN``, ``LSTM`` or ``GRU`` cell objects computes
(``common/time_layers.py``), written out here: the products of that step (``x_t Wx`` and
``h_{t-1} Wh``), the gates, and in the backward the per-step weight gradients summed over the
steps. ``kernels.vectorized`` and ``kernels.numba_backend`` follow it name for name and return
the same values; they do the input products of all steps at once and keep only the recurrence
step by step.

Weight layouts (the book's):

* RNN: Wx (D, H), Wh (H, H), b (H,); ``h_t = tanh(x_t Wx + h_{t-1} Wh + b)``.
* LSTM: Wx (D, 4H), Wh (H, 4H), b (4H,), gates side by side in the order f, g, i, o:
  ``f, i, o = sigmoid(.)``, ``g = tanh(.)``, ``c_t = f c_{t-1} + g i``, ``h_t = o tanh(c_t)``.
* GRU: Wx (D, 3H), Wh (H, 3H), b (3H,), in the order z, r, h:
  ``z = sigmoid(x Wxz + h Whz + bz)``, ``r = sigmoid(x Wxr + h Whr + br)``,
  ``hh = tanh(x Wxh + (r h) Whh + bh)``, ``h_t = (1 - z) h_{t-1} + z hh``.

Shapes: xs (N, T, D), h0 and c0 (N, H), hs and cs (N, T, H); ``gates`` (N, T, kH) holds the
activated gates of every step (LSTM: f, g, i, o; GRU: z, r, hh), which the backward reuses.
Backward kernels return dxs (N, T, D), dWx, dWh, db and the gradient of the initial state dh0
(the LSTM also dc0). ``lstm_backward`` takes ``dc``, the gradient arriving at the last cell state
(zeros for a sequence layer; the single-step ``LSTM`` layer passes its ``dc_next``).

Unlike the other reference kernels, these run in the arrays' dtype with NumPy per step (a
scalar loop over N, T and H^2 would be too slow to test with). The sigmoid is written as
``exp(-|x|)``-based, which equals the book's ``1 / (1 + exp(-x))`` without its overflow.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(x):
    """1 / (1 + exp(-x)), without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def _zero_grads(xs, Wx, Wh):
    return np.zeros_like(Wx), np.zeros_like(Wh), np.zeros(Wx.shape[1], Wx.dtype), \
        np.empty((xs.shape[0], xs.shape[1], Wx.shape[0]), xs.dtype)


def _previous(h0, hs, t):
    """The state before step t: h0 at t = 0, else hs[:, t - 1]."""
    return h0 if t == 0 else hs[:, t - 1]


# --------------------------------------------------------------------------------------- RNN


def rnn_forward(xs, Wx, Wh, b, h0):
    """hs (N, T, H): h_t = tanh(x_t Wx + h_{t-1} Wh + b), from h0 (N, H)."""
    N, T, _ = xs.shape
    hs = np.empty((N, T, Wh.shape[0]), xs.dtype)
    h = h0
    for t in range(T):
        h = np.tanh(h @ Wh + xs[:, t] @ Wx + b)  # (N, H)
        hs[:, t] = h
    return hs


def rnn_backward(dhs, xs, Wx, Wh, h0, hs):
    """dxs, dWx, dWh, db, dh0 of ``rnn_forward``, for dhs (N, T, H) the gradient of hs."""
    dWx, dWh, db, dxs = _zero_grads(xs, Wx, Wh)
    dh = np.zeros_like(h0)
    for t in reversed(range(xs.shape[1])):
        h = hs[:, t]
        dt = (dhs[:, t] + dh) * (1 - h * h)  # (N, H), through the tanh
        db += dt.sum(axis=0)
        dWh += _previous(h0, hs, t).T @ dt
        dWx += xs[:, t].T @ dt
        dxs[:, t] = dt @ Wx.T
        dh = dt @ Wh.T  # (N, H)
    return dxs, dWx, dWh, db, dh


# -------------------------------------------------------------------------------------- LSTM


def lstm_forward(xs, Wx, Wh, b, h0, c0):
    """hs, cs (N, T, H) and gates (N, T, 4H) = [f, g, i, o] per step, from h0, c0 (N, H)."""
    N, T, _ = xs.shape
    H = Wh.shape[0]
    hs = np.empty((N, T, H), xs.dtype)
    cs = np.empty((N, T, H), xs.dtype)
    gates = np.empty((N, T, 4 * H), xs.dtype)
    h, c = h0, c0
    for t in range(T):
        A = xs[:, t] @ Wx + h @ Wh + b  # (N, 4H)
        f = _sigmoid(A[:, :H])
        g = np.tanh(A[:, H:2 * H])
        i = _sigmoid(A[:, 2 * H:3 * H])
        o = _sigmoid(A[:, 3 * H:])
        c = f * c + g * i
        h = o * np.tanh(c)
        hs[:, t], cs[:, t] = h, c
        gates[:, t] = np.concatenate((f, g, i, o), axis=1)
    return hs, cs, gates


def lstm_backward(dhs, dc, xs, Wx, Wh, h0, c0, hs, cs, gates):
    """dxs, dWx, dWh, db, dh0, dc0 of ``lstm_forward``; dc (N, H): gradient of the last c."""
    H = Wh.shape[0]
    dWx, dWh, db, dxs = _zero_grads(xs, Wx, Wh)
    dh = np.zeros_like(h0)
    for t in reversed(range(xs.shape[1])):
        f, g, i, o = (gates[:, t, k * H:(k + 1) * H] for k in range(4))
        c_prev = _previous(c0, cs, t)
        tc = np.tanh(cs[:, t])
        dh_t = dhs[:, t] + dh
        ds = dc + dh_t * o * (1 - tc * tc)  # (N, H): gradient of c_t
        dA = np.concatenate((
            ds * c_prev * f * (1 - f),  # df, through the sigmoid
            ds * i * (1 - g * g),  # dg, through the tanh
            ds * g * i * (1 - i),  # di
            dh_t * tc * o * (1 - o),  # do
        ), axis=1)  # (N, 4H)
        dWh += _previous(h0, hs, t).T @ dA
        dWx += xs[:, t].T @ dA
        db += dA.sum(axis=0)
        dxs[:, t] = dA @ Wx.T
        dh = dA @ Wh.T
        dc = ds * f
    return dxs, dWx, dWh, db, dh, dc


# --------------------------------------------------------------------------------------- GRU


def gru_forward(xs, Wx, Wh, b, h0):
    """hs (N, T, H) and gates (N, T, 3H) = [z, r, hh] per step, from h0 (N, H)."""
    N, T, _ = xs.shape
    H = Wh.shape[0]
    hs = np.empty((N, T, H), xs.dtype)
    gates = np.empty((N, T, 3 * H), xs.dtype)
    h = h0
    for t in range(T):
        x = xs[:, t]
        z = _sigmoid(x @ Wx[:, :H] + h @ Wh[:, :H] + b[:H])
        r = _sigmoid(x @ Wx[:, H:2 * H] + h @ Wh[:, H:2 * H] + b[H:2 * H])
        hh = np.tanh(x @ Wx[:, 2 * H:] + (r * h) @ Wh[:, 2 * H:] + b[2 * H:])
        h = (1 - z) * h + z * hh
        hs[:, t] = h
        gates[:, t] = np.concatenate((z, r, hh), axis=1)
    return hs, gates


def gru_backward(dhs, xs, Wx, Wh, h0, hs, gates):
    """dxs, dWx, dWh, db, dh0 of ``gru_forward``."""
    H = Wh.shape[0]
    dWx, dWh, db, dxs = _zero_grads(xs, Wx, Wh)
    dh = np.zeros_like(h0)
    for t in reversed(range(xs.shape[1])):
        z, r, hh = (gates[:, t, k * H:(k + 1) * H] for k in range(3))
        h_prev, x = _previous(h0, hs, t), xs[:, t]
        dh_next = dhs[:, t] + dh
        dt_h = dh_next * z * (1 - hh * hh)  # (N, H), through the candidate's tanh
        dhr = dt_h @ Wh[:, 2 * H:].T  # gradient of r * h_prev
        dt_z = dh_next * (hh - h_prev) * z * (1 - z)  # through the update gate
        dt_r = dhr * h_prev * r * (1 - r)  # through the reset gate
        dh = dh_next * (1 - z) + r * dhr + dt_z @ Wh[:, :H].T + dt_r @ Wh[:, H:2 * H].T
        dA = np.concatenate((dt_z, dt_r, dt_h), axis=1)  # (N, 3H)
        dWx += x.T @ dA
        dWh[:, :2 * H] += h_prev.T @ dA[:, :2 * H]
        dWh[:, 2 * H:] += (r * h_prev).T @ dt_h
        db += dA.sum(axis=0)
        dxs[:, t] = dA @ Wx.T
    return dxs, dWx, dWh, db, dh
