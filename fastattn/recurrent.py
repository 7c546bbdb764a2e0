"""The book's recurrent layers (``common.time_layers``) on fastattn's recurrent kernels.

``RNN(Wx, Wh, b)``, ``TimeRNN(Wx, Wh, b, stateful=False)``, ``LSTM(Wx, Wh, b)``,
``TimeLSTM(Wx, Wh, b, stateful=False)``, ``GRU(Wx, Wh, b)``, ``TimeGRU(Wx, Wh, b,
stateful=False)`` and ``TimeBiLSTM(Wx1, Wh1, b1, Wx2, Wh2, b2, stateful=False)``: the book's
constructors, weight layouts, ``forward``/``backward`` signatures, return values and attributes
(``params``, ``grads``, ``h``, ``c``, ``dh``, ``stateful``, ``set_state``, ``reset_state``), so
that changing an import is all a user of the book's code does.

Weight layouts (the book's): ``RNN`` Wx (D, H), Wh (H, H), b (H,); ``LSTM`` Wx (D, 4H),
Wh (H, 4H), b (4H,) with the gates f, g, i, o side by side; ``GRU`` Wx (D, 3H), Wh (H, 3H),
b (3H,) with z, r and the candidate h side by side.

A ``Time*`` layer runs its whole sequence as one kernel call per forward and one per backward
(``rnn_*``, ``lstm_*``, ``gru_*`` in :mod:`fastattn.kernels`): the input products of all steps
at once, then the recurrence. With ``backend="loop"`` the kernel is the book's per-step
algorithm. The single-step layers (``RNN``, ``LSTM``, ``GRU``) call the same kernels with T = 1.

As in the book: a ``Time*`` layer starts from zeros unless ``stateful`` and a state is there;
after ``forward`` its ``h`` (and ``c``) hold the last step's state; ``backward`` leaves in
``dh`` the gradient of the initial ``h``; ``set_state(h)`` (``TimeLSTM``: ``set_state(h,
c=None)``, where ``c=None`` means zeros) and ``reset_state()`` set the state. ``backward``
writes each gradient in place (``self.grads[0][...] = dWx``). As the book's, a ``Time*``
layer's ``hs`` and the ``LSTM``'s ``c_next`` are the caller's own arrays: changing them in place
does not change ``backward``. There are no per-step cell objects: ``layers`` stays None.

What fastattn adds: the weights fix the dtype (float32 or float64) and must be numpy arrays
of matching shapes (``TypeError``/``ValueError`` naming the argument at construction); float
inputs of the other float dtype are cast to it; a wrong shape, an integer input, a state whose
batch size or width does not fit, a ``dout`` of the wrong shape raise ``ValueError`` or
``TypeError`` naming the argument before any kernel runs; ``backward`` before ``forward``
raises ``RuntimeError``. ``backend=None`` runs on the backend in force when ``forward`` is
called; ``backward`` runs on the backend its ``forward`` ran on.
"""

from __future__ import annotations

import numpy as np

from fastattn import _backend
from fastattn._layer import check_backend, dout_array, float_input, forward_backend, not_yet
from fastattn.layers import _param

__all__ = ["RNN", "TimeRNN", "LSTM", "TimeLSTM", "GRU", "TimeGRU", "TimeBiLSTM"]

_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _weights(Wx, Wh, b, kind, suffix=""):
    """Check Wx (D, kH), Wh (H, kH), b (kH,): numpy float arrays of one dtype."""
    k = _GATES[kind]
    nx, nh, nb = f"Wx{suffix}", f"Wh{suffix}", f"b{suffix}"
    Wx, Wh, b = _param(Wx, nx, 2), _param(Wh, nh, 2), _param(b, nb, 1)
    dtypes = {nx: Wx.dtype, nh: Wh.dtype, nb: b.dtype}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"{nx}, {nh} and {nb} must share one dtype, got {got}")
    H = Wh.shape[0]
    gates = f"{k}H" if k > 1 else "H"
    if Wh.shape[1] != k * H:
        raise ValueError(f"{nh} must have shape (H, {gates}), got {Wh.shape}")
    if Wx.shape[1] != k * H:
        raise ValueError(f"{nx} must have shape (D, {gates}) = (D, {k * H}) to match {nh} "
                         f"{Wh.shape}, got {Wx.shape}")
    if b.shape != (k * H,):
        raise ValueError(f"{nb} must have shape ({k * H},) to match {nh} {Wh.shape}, "
                         f"got {b.shape}")
    return Wx, Wh, b


def _state(x, name, N, H, dtype):
    """A state (N, H) as a C-contiguous array of ``dtype``, or TypeError/ValueError."""
    x = float_input(x, name, dtype)
    if x.shape != (N, H):
        raise ValueError(f"{name} must have shape (N, H) = ({N}, {H}) for this input, "
                         f"got {x.shape}")
    return x


def _forward(kind, backend, xs, params, h0, c0=None):
    """Run the ``kind`` forward kernel; (hs, cache for ``_backward``)."""
    Wx, Wh, b = (np.ascontiguousarray(p) for p in params)
    states = (h0,) if c0 is None else (h0, c0)
    out = _backend.kernel(f"{kind}_forward", backend)(xs, Wx, Wh, b, *states)
    saved = out if isinstance(out, tuple) else (out,)  # (hs,), (hs, cs, gates), (hs, gates)
    return saved[0], (kind, backend, xs, states, saved)


def _backward(layer, dhs, dc=None):
    """Run the backward kernel of the forward in ``layer.cache``; writes ``layer.grads`` in
    place; returns (dxs, dh0) or, for the LSTM, (dxs, dh0, dc0)."""
    kind, backend, xs, states, saved = layer.cache
    Wx, Wh = (np.ascontiguousarray(p) for p in layer.params[:2])
    head = (dhs,) if dc is None else (dhs, dc)
    out = _backend.kernel(f"{kind}_backward", backend)(*head, xs, Wx, Wh, *states, *saved)
    dxs, dWx, dWh, db, *dstates = out
    for grad, value in zip(layer.grads, (dWx, dWh, db), strict=True):
        grad[...] = value
    return (dxs, *dstates)


class _Step:
    """One time step (the book's ``RNN``, ``LSTM``, ``GRU``): the kernels with T = 1."""

    _kind = "rnn"

    def __init__(self, Wx, Wh, b, backend=None):
        Wx, Wh, b = _weights(Wx, Wh, b, self._kind)
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.backend = check_backend(backend)
        self.cache = None

    def _step_forward(self, x, states):
        Wx, Wh, _ = self.params
        x = float_input(x, "x", Wx.dtype, ndim_min=2)
        if x.ndim != 2 or x.shape[1] != Wx.shape[0]:
            raise ValueError(f"x must have shape (N, {Wx.shape[0]}), got {x.shape}")
        N, H = x.shape[0], Wh.shape[0]
        states = [_state(s, name, N, H, Wx.dtype) for name, s in states]
        hs, self.cache = _forward(self._kind, forward_backend(self), x[:, None],
                                  self.params, *states)
        return hs[:, 0], self.cache[4]

    def _step_backward(self, dh_next, dc_next=None):
        if self.cache is None:
            raise not_yet(self)
        xs, Wh = self.cache[2], self.params[1]
        shape = (xs.shape[0], Wh.shape[0])
        dhs = dout_array(dh_next, shape, Wh.dtype, "dh_next")[:, None]
        dc = None if dc_next is None else dout_array(dc_next, shape, Wh.dtype, "dc_next")
        dxs, *dstates = _backward(self, dhs, dc)
        return (dxs[:, 0], *dstates)


class RNN(_Step):
    """h_next = tanh(h_prev Wh + x Wx + b). Wx (D, H), Wh (H, H), b (H,).

    forward(x (N, D), h_prev (N, H)) -> h_next (N, H); backward(dh_next) -> dx, dh_prev.
    """

    def forward(self, x, h_prev):
        return self._step_forward(x, [("h_prev", h_prev)])[0]

    def backward(self, dh_next):
        return self._step_backward(dh_next)


class GRU(RNN):
    """The book's GRU step. Wx (D, 3H), Wh (H, 3H), b (3H,), gates z, r, h side by side.

    forward(x (N, D), h_prev (N, H)) -> h_next (N, H); backward(dh_next) -> dx, dh_prev.
    """

    _kind = "gru"


class LSTM(_Step):
    """The book's LSTM step. Wx (D, 4H), Wh (H, 4H), b (4H,), gates f, g, i, o side by side.

    forward(x (N, D), h_prev, c_prev (N, H)) -> h_next, c_next;
    backward(dh_next, dc_next) -> dx, dh_prev, dc_prev (``dc_next=None``: zeros, for a
    c_next that nothing uses).
    """

    _kind = "lstm"

    def forward(self, x, h_prev, c_prev):
        hs, (_, cs, _) = self._step_forward(x, [("h_prev", h_prev), ("c_prev", c_prev)])
        return hs, cs[:, 0].copy()  # the caller's own c_next; backward reads the cached cs

    def backward(self, dh_next, dc_next=None):
        if dc_next is None and self.cache is not None:
            dc_next = np.zeros((self.cache[2].shape[0], self.params[1].shape[0]),
                               self.params[1].dtype)
        return self._step_backward(dh_next, dc_next)


class TimeRNN:
    """An RNN over T steps. Wx (D, H), Wh (H, H), b (H,).

    forward(xs (N, T, D)) -> hs (N, T, H); backward(dhs (N, T, H)) -> dxs (N, T, D), and
    ``dh`` (N, H), the gradient of the initial state. ``h``: the last state.
    """

    _kind = "rnn"

    def __init__(self, Wx, Wh, b, stateful=False, backend=None):
        Wx, Wh, b = _weights(Wx, Wh, b, self._kind)
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.backend = check_backend(backend)
        self.stateful = stateful
        self.layers = None
        self.cache = None
        self.h, self.dh = None, None

    def _initial(self, name, N):
        """The state ``name`` ("h" or "c") the sequence starts from: zeros unless stateful and
        one is set."""
        Wh = self.params[1]
        value = getattr(self, name)
        if not self.stateful or value is None:
            return np.zeros((N, Wh.shape[0]), Wh.dtype)
        return _state(value, name, N, Wh.shape[0], Wh.dtype)

    def _checked_xs(self, xs):
        Wx = self.params[0]
        xs = float_input(xs, "xs", Wx.dtype, ndim_min=3)
        if xs.ndim != 3 or xs.shape[2] != Wx.shape[0]:
            raise ValueError(f"xs must have shape (N, T, {Wx.shape[0]}), got {xs.shape}")
        return xs

    def _run(self, xs, names):
        xs = self._checked_xs(xs)
        states = [self._initial(name, xs.shape[0]) for name in names]
        hs, self.cache = _forward(self._kind, forward_backend(self), xs, self.params,
                                  *states)
        last = [s[:, -1].copy() for s in self.cache[4][:len(names)]] if xs.shape[1] else states
        for name, value in zip(names, last, strict=True):
            setattr(self, name, value)
        return hs

    def forward(self, xs):
        return self._run(xs, ["h"]).copy()  # the caller's own hs; backward reads the cached hs

    def backward(self, dhs):
        if self.cache is None:
            raise not_yet(self)
        xs, Wh = self.cache[2], self.params[1]
        dhs = dout_array(dhs, xs.shape[:2] + (Wh.shape[0],), Wh.dtype, "dhs")
        dc = np.zeros((xs.shape[0], Wh.shape[0]), Wh.dtype) if self._kind == "lstm" else None
        dxs, self.dh, *_ = _backward(self, dhs, dc)
        return dxs

    def set_state(self, h):
        self.h = h

    def reset_state(self):
        self.h = None


class TimeGRU(TimeRNN):
    """A GRU over T steps (the book's ``TimeGRU``). Wx (D, 3H), Wh (H, 3H), b (3H,).

    forward(xs (N, T, D)) -> hs (N, T, H); backward(dhs) -> dxs; ``h``, ``dh`` as TimeRNN.
    """

    _kind = "gru"


class TimeLSTM(TimeRNN):
    """An LSTM over T steps (the book's ``TimeLSTM``). Wx (D, 4H), Wh (H, 4H), b (4H,).

    forward(xs (N, T, D)) -> hs (N, T, H); backward(dhs) -> dxs; ``h`` and ``c`` hold the last
    state, ``dh`` the gradient of the initial h.
    """

    _kind = "lstm"

    def __init__(self, Wx, Wh, b, stateful=False, backend=None):
        super().__init__(Wx, Wh, b, stateful, backend)
        self.c = None

    def forward(self, xs):
        # as the book: h and c start from zeros unless stateful and set (c=None: zeros)
        return self._run(xs, ["h", "c"]).copy()

    def set_state(self, h, c=None):
        self.h, self.c = h, c

    def reset_state(self):
        self.h, self.c = None, None


class TimeBiLSTM:
    """Two TimeLSTMs, one reading xs forwards and one backwards; their hidden states side by
    side. Wx1, Wx2 (D, 4H), Wh1, Wh2 (H, 4H), b1, b2 (4H,).

    forward(xs (N, T, D)) -> hs (N, T, 2H); backward(dhs (N, T, 2H)) -> dxs (N, T, D).
    """

    def __init__(self, Wx1, Wh1, b1, Wx2, Wh2, b2, stateful=False, backend=None):
        _weights(Wx1, Wh1, b1, "lstm", "1")
        _weights(Wx2, Wh2, b2, "lstm", "2")
        if Wx1.dtype != Wx2.dtype:
            raise TypeError(f"Wx2 must have the dtype of Wx1 ({Wx1.dtype}), got {Wx2.dtype}")
        if Wx1.shape != Wx2.shape:
            raise ValueError(f"Wx2 must have the shape of Wx1 {Wx1.shape}, got {Wx2.shape}")
        self.forward_lstm = TimeLSTM(Wx1, Wh1, b1, stateful, backend)
        self.backward_lstm = TimeLSTM(Wx2, Wh2, b2, stateful, backend)
        self.params = self.forward_lstm.params + self.backward_lstm.params
        self.grads = self.forward_lstm.grads + self.backward_lstm.grads

    def forward(self, xs):
        o1 = self.forward_lstm._run(xs, ["h", "c"])  # the cached hs: concatenate copies them
        o2 = self.backward_lstm._run(self.forward_lstm.cache[2][:, ::-1], ["h", "c"])
        return np.concatenate((o1, o2[:, ::-1]), axis=2)  # (N, T, 2H)

    def backward(self, dhs):
        if self.forward_lstm.cache is None:
            raise not_yet(self)
        xs, Wh = self.forward_lstm.cache[2], self.forward_lstm.params[1]
        H = Wh.shape[0]
        dhs = dout_array(dhs, xs.shape[:2] + (2 * H,), Wh.dtype, "dhs")
        dxs = self.forward_lstm.backward(dhs[:, :, :H])
        dxs += self.backward_lstm.backward(dhs[:, ::-1, H:])[:, ::-1]
        return dxs
