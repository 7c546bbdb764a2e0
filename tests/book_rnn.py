"""Book-style recurrent layers in NumPy, for tests and benchmarks (not part of fastattn).

The per-step algorithm of "Deep Learning from Scratch 2" (``common/time_layers.py``), written
here from its description: one cell object per time step, each doing its own products, the
weight gradients summed over the steps. ``LSTM`` and ``TimeLSTM`` come from ``book_lstm``; this
module adds ``RNN``, ``GRU``, ``TimeRNN``, ``TimeGRU`` and ``TimeBiLSTM``. Weight layouts as
the book's: RNN Wx (D, H), Wh (H, H), b (H,); GRU Wx (D, 3H), Wh (H, 3H), b (3H,) in the order
z, r, h.
"""

from __future__ import annotations

import numpy as np
from book_lstm import LSTM, TimeLSTM

__all__ = ["RNN", "GRU", "LSTM", "TimeRNN", "TimeGRU", "TimeLSTM", "TimeBiLSTM"]


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


class RNN:
    """h_next = tanh(h_prev Wh + x Wx + b); backward(dh_next) -> dx, dh_prev."""

    def __init__(self, Wx, Wh, b):
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.cache = None

    def forward(self, x, h_prev):
        Wx, Wh, b = self.params
        h_next = np.tanh(h_prev @ Wh + x @ Wx + b)
        self.cache = (x, h_prev, h_next)
        return h_next

    def backward(self, dh_next):
        Wx, Wh, _ = self.params
        x, h_prev, h_next = self.cache
        dt = dh_next * (1 - h_next ** 2)
        self.grads[0][...] = x.T @ dt
        self.grads[1][...] = h_prev.T @ dt
        self.grads[2][...] = dt.sum(axis=0)
        return dt @ Wx.T, dt @ Wh.T


class GRU:
    """The book's GRU step: z, r gates and the candidate hh; backward -> dx, dh_prev."""

    def __init__(self, Wx, Wh, b):
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.cache = None

    def forward(self, x, h_prev):
        Wx, Wh, b = self.params
        H = Wh.shape[0]
        z = _sigmoid(x @ Wx[:, :H] + h_prev @ Wh[:, :H] + b[:H])
        r = _sigmoid(x @ Wx[:, H:2 * H] + h_prev @ Wh[:, H:2 * H] + b[H:2 * H])
        hh = np.tanh(x @ Wx[:, 2 * H:] + (r * h_prev) @ Wh[:, 2 * H:] + b[2 * H:])
        self.cache = (x, h_prev, z, r, hh)
        return (1 - z) * h_prev + z * hh

    def backward(self, dh_next):
        Wx, Wh, _ = self.params
        H = Wh.shape[0]
        x, h_prev, z, r, hh = self.cache
        # the candidate: hh = tanh(x Wxh + (r h_prev) Whh + bh)
        dth = dh_next * z * (1 - hh ** 2)
        drh = dth @ Wh[:, 2 * H:].T
        dh_prev = dh_next * (1 - z) + r * drh
        # the update gate: h_next = (1 - z) h_prev + z hh
        dtz = dh_next * (hh - h_prev) * z * (1 - z)
        # the reset gate, through r h_prev
        dtr = drh * h_prev * r * (1 - r)
        dh_prev += dtz @ Wh[:, :H].T + dtr @ Wh[:, H:2 * H].T
        dx = dtz @ Wx[:, :H].T + dtr @ Wx[:, H:2 * H].T + dth @ Wx[:, 2 * H:].T
        self.grads[0][...] = np.hstack((x.T @ dtz, x.T @ dtr, x.T @ dth))
        self.grads[1][...] = np.hstack((h_prev.T @ dtz, h_prev.T @ dtr, (r * h_prev).T @ dth))
        self.grads[2][...] = np.hstack((dtz.sum(0), dtr.sum(0), dth.sum(0)))
        return dx, dh_prev


class TimeRNN:
    """One ``RNN`` per step (``TimeGRU``: one ``GRU``); grads summed over the steps.

    forward(xs (N, T, D)) -> hs (N, T, H); backward(dhs) -> dxs; ``h``, ``dh``, ``stateful``,
    ``set_state(h)``, ``reset_state()`` as the book's.
    """

    cell = RNN

    def __init__(self, Wx, Wh, b, stateful=False):
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.layers = None
        self.h, self.dh = None, None
        self.stateful = stateful

    def forward(self, xs):
        N, T, _ = xs.shape
        H = self.params[1].shape[0]
        if not self.stateful or self.h is None:
            self.h = np.zeros((N, H), dtype=xs.dtype)
        hs = np.empty((N, T, H), dtype=xs.dtype)
        self.layers = []
        for t in range(T):
            layer = self.cell(*self.params)
            self.h = layer.forward(xs[:, t, :], self.h)
            hs[:, t, :] = self.h
            self.layers.append(layer)
        return hs

    def backward(self, dhs):
        N, T, _ = dhs.shape
        dxs = np.empty((N, T, self.params[0].shape[0]), dtype=dhs.dtype)
        dh = 0
        total = [np.zeros_like(g) for g in self.grads]
        for t in reversed(range(T)):
            layer = self.layers[t]
            dxs[:, t, :], dh = layer.backward(dhs[:, t, :] + dh)
            for acc, g in zip(total, layer.grads, strict=True):
                acc += g
        for g, acc in zip(self.grads, total, strict=True):
            g[...] = acc
        self.dh = dh
        return dxs

    def set_state(self, h):
        self.h = h

    def reset_state(self):
        self.h = None


class TimeGRU(TimeRNN):
    cell = GRU


class TimeBiLSTM:
    """A TimeLSTM forwards and one over the reversed sequence; hidden states side by side."""

    def __init__(self, Wx1, Wh1, b1, Wx2, Wh2, b2, stateful=False):
        self.forward_lstm = TimeLSTM(Wx1, Wh1, b1, stateful)
        self.backward_lstm = TimeLSTM(Wx2, Wh2, b2, stateful)
        self.params = self.forward_lstm.params + self.backward_lstm.params
        self.grads = self.forward_lstm.grads + self.backward_lstm.grads

    def forward(self, xs):
        o1 = self.forward_lstm.forward(xs)
        o2 = self.backward_lstm.forward(xs[:, ::-1])[:, ::-1]
        return np.concatenate((o1, o2), axis=2)

    def backward(self, dhs):
        H = dhs.shape[2] // 2
        dxs = self.forward_lstm.backward(dhs[:, :, :H])
        return dxs + self.backward_lstm.backward(dhs[:, ::-1, H:])[:, ::-1]
