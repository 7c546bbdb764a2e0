"""The chapter 8 attention layers of "Deep Learning from Scratch 2", as drop-ins.

Same class names, constructors, ``forward``/``backward`` signatures, return values and
attributes as the book's ``WeightSum``, ``AttentionWeight``, ``Attention`` and
``TimeAttention``, so that code written for the book only changes its imports. Each class
also takes ``backend=None`` (None: the backend in force when ``forward`` is called; the
backward runs on the backend its forward ran on).

What the backends mean here:

* ``"loop"`` is the book's algorithm and the readable reference: ``TimeAttention`` runs one
  ``Attention`` per decoder step, and each step is a few whole-array NumPy operations
  (products with broadcasting, sums, a row softmax). This is what users of the book run
  today, and what the fast backends are measured and tested against. (The scalar loop
  kernels of ``kernels.loop`` are not used here: at the book's shapes they would take
  minutes.)
* ``"vectorized"`` and ``"numba"`` run the kernels of that backend. ``TimeAttention`` then
  computes all decoder steps at once: scores (N, T_dec, T_enc) = hs_dec hs_enc^T, a softmax
  over the encoder steps, and the weighted sum of the encoder states; the backward runs the
  three kernels' gradients in reverse order. No per-step Python loop and no ``repeat``.

All backends give the same numbers up to float rounding, for the outputs and all gradients.

Inputs are float32 or float64 (one dtype per layer call); a wrong dtype raises TypeError,
a wrong or empty shape ValueError naming the argument. The backward's upstream gradient of
the other float dtype is cast to the forward's. NaN and inf are not checked for: they
propagate as in the book (the kernels here never index by value). ``backward`` before
``forward`` raises RuntimeError. These layers have no weights: ``params`` and ``grads`` are
empty lists.
"""

from __future__ import annotations

import numpy as np

from fastattn import _backend, _checks
from fastattn._layer import check_backend, dout_array, forward_backend, not_yet

__all__ = ["WeightSum", "AttentionWeight", "Attention", "TimeAttention"]


# --- input checks ------------------------------------------------------------------------

def _array(x, name: str, ndim: int) -> np.ndarray:
    """``x`` as a C-contiguous float32/float64 array with exactly ``ndim`` dimensions."""
    x = _checks.float_array(x, name, ndim_min=0, finite=False)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    return x


def _step_inputs(hs, x, name: str, axis: int):
    """A step layer's inputs: hs (N, T, H) and the 2-D ``x`` of shape (N, hs.shape[axis]),
    both checked, of one dtype."""
    hs = _array(hs, "hs", 3)
    x = _array(x, name, 2)
    _checks.same_dtype({"hs": hs, name: x})
    _checks.shape_is(x, (hs.shape[0], hs.shape[axis]), name)
    return hs, x


def _step_cache(layer, dout, name: str, axis: int):
    """A step layer's forward cache (backend, hs, ...) and its upstream gradient ``dout``,
    checked against the output shape (N, hs.shape[axis])."""
    if layer.cache is None:
        raise not_yet(layer)
    hs = layer.cache[1]
    return layer.cache, dout_array(dout, (hs.shape[0], hs.shape[axis]), hs.dtype, name)


# --- the reference: the book's per-step algorithm in plain NumPy --------------------------

def _ref_weight_sum_forward(hs, a):
    """c[n] = sum_t a[n, t] hs[n, t]. hs (N, T, H), a (N, T) -> c (N, H)."""
    return (hs * a[:, :, None]).sum(axis=1)  # (N, H)


def _ref_weight_sum_backward(dc, hs, a):
    """In the forward pass this was ``c[n] += a[n, t] * hs[n, t]``, so now
    ``dhs[n, t] = a[n, t] * dc[n]`` and ``da[n, t] = hs[n, t] . dc[n]``."""
    dhs = a[:, :, None] * dc[:, None, :]  # (N, T, H)
    da = (hs * dc[:, None, :]).sum(axis=2)  # (N, T)
    return dhs, da


def _ref_attention_weight_forward(hs, h):
    """a[n] = softmax_t(hs[n, t] . h[n]). hs (N, T, H), h (N, H) -> a (N, T)."""
    s = (hs * h[:, None, :]).sum(axis=2)  # (N, T)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # (N, T)


def _ref_attention_weight_backward(da, hs, h, a):
    """Through the softmax ``ds = a * (da - sum_t a da)``; the forward was
    ``s[n, t] += hs[n, t, c] * h[n, c]``, so ``dhs[n, t] = ds[n, t] h[n]`` and
    ``dh[n] = sum_t ds[n, t] hs[n, t]``."""
    ds = a * (da - (a * da).sum(axis=1, keepdims=True))  # (N, T)
    dhs = ds[:, :, None] * h[:, None, :]  # (N, T, H)
    dh = (ds[:, :, None] * hs).sum(axis=1)  # (N, H)
    return dhs, dh


# --- the book's layers --------------------------------------------------------------------

class WeightSum:
    """The context vector: the encoder states weighted by the attention weights.

    ``forward(hs (N, T, H), a (N, T)) -> c (N, H)``, ``c = sum_t a[:, t] * hs[:, t]``;
    ``backward(dc (N, H)) -> (dhs (N, T, H), da (N, T))``.
    """

    def __init__(self, backend=None):
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.cache = None

    def forward(self, hs, a):
        hs, a = _step_inputs(hs, a, "a", 1)
        backend = forward_backend(self)
        if backend == "loop":
            c = _ref_weight_sum_forward(hs, a)
        else:
            c = _backend.kernel("weighted_sum_forward", backend)(a[:, None, :], hs)[:, 0]
        self.cache = (backend, hs, a)
        return c  # (N, H)

    def backward(self, dc):
        (backend, hs, a), dc = _step_cache(self, dc, "dc", 2)
        if backend == "loop":
            return _ref_weight_sum_backward(dc, hs, a)
        fn = _backend.kernel("weighted_sum_backward", backend)
        da, dhs = fn(dc[:, None, :], a[:, None, :], hs)  # (N, 1, T), (N, T, H)
        return dhs, da[:, 0]


class AttentionWeight:
    """Attention weights: a softmax over t of the dot products hs[:, t] . h.

    ``forward(hs (N, T, H), h (N, H)) -> a (N, T)``;
    ``backward(da (N, T)) -> (dhs (N, T, H), dh (N, H))``.
    """

    def __init__(self, backend=None):
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.cache = None

    def forward(self, hs, h):
        hs, h = _step_inputs(hs, h, "h", 2)
        backend = forward_backend(self)
        if backend == "loop":
            a = _ref_attention_weight_forward(hs, h)
        else:
            s = _backend.kernel("scores_forward", backend)(h[:, None, :], hs, 1.0)  # (N, 1, T)
            a = _backend.kernel("softmax_forward", backend)(s)[:, 0]
        self.cache = (backend, hs, h, a)
        return a  # (N, T)

    def backward(self, da):
        (backend, hs, h, a), da = _step_cache(self, da, "da", 1)
        if backend == "loop":
            return _ref_attention_weight_backward(da, hs, h, a)
        ds = _backend.kernel("softmax_backward", backend)(da[:, None, :], a[:, None, :])
        dh, dhs = _backend.kernel("scores_backward", backend)(ds, h[:, None, :], hs, 1.0)
        return dhs, dh[:, 0]


class Attention:
    """One decoder step of attention: ``AttentionWeight`` then ``WeightSum``.

    ``forward(hs (N, T, H), h (N, H)) -> out (N, H)``;
    ``backward(dout (N, H)) -> (dhs (N, T, H), dh (N, H))``.
    ``attention_weight`` holds the (N, T) weights of the last forward.
    """

    def __init__(self, backend=None):
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.attention_weight_layer = AttentionWeight(backend)
        self.weight_sum_layer = WeightSum(backend)
        self.attention_weight = None

    def forward(self, hs, h):
        a = self.attention_weight_layer.forward(hs, h)
        out = self.weight_sum_layer.forward(hs, a)
        self.attention_weight = a
        return out

    def backward(self, dout):
        if self.weight_sum_layer.cache is None:
            raise not_yet(self)
        _, hs, _ = self.weight_sum_layer.cache
        dout = dout_array(dout, (hs.shape[0], hs.shape[2]), hs.dtype)  # (N, H)
        dhs0, da = self.weight_sum_layer.backward(dout)
        dhs1, dh = self.attention_weight_layer.backward(da)
        return dhs0 + dhs1, dh


class TimeAttention:
    """Attention of every decoder step over all encoder states.

    ``forward(hs_enc (N, T_enc, H), hs_dec (N, T_dec, H)) -> context (N, T_dec, H)``, where
    ``context[:, t] = sum_s a[:, t, s] hs_enc[:, s]`` and ``a[:, t] = softmax_s(hs_enc[:, s] .
    hs_dec[:, t])``; ``backward(dout (N, T_dec, H)) -> (dhs_enc, dhs_dec)``.
    ``attention_weights`` is a list of T_dec arrays (N, T_enc), one per decoder step.
    ``layers`` is the list of per-step ``Attention`` layers on the "loop" backend (the book's
    algorithm) and None on the others, which compute all steps at once.
    """

    def __init__(self, backend=None):
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.layers = None
        self.attention_weights = None
        self._cache = None

    def forward(self, hs_enc, hs_dec):
        hs_enc = _array(hs_enc, "hs_enc", 3)
        hs_dec = _array(hs_dec, "hs_dec", 3)
        _checks.same_dtype({"hs_enc": hs_enc, "hs_dec": hs_dec})
        N, T_enc, H = hs_enc.shape
        if hs_dec.shape[0] != N or hs_dec.shape[2] != H:
            raise ValueError(f"hs_dec must have shape (N={N}, T_dec, H={H}) like hs_enc "
                             f"{hs_enc.shape}, got {hs_dec.shape}")
        T_dec = hs_dec.shape[1]
        backend = forward_backend(self)
        if backend == "loop":
            out = np.empty_like(hs_dec)  # (N, T_dec, H)
            self.layers, self.attention_weights = [], []
            for t in range(T_dec):
                layer = Attention(backend="loop")
                out[:, t, :] = layer.forward(hs_enc, hs_dec[:, t, :])
                self.layers.append(layer)
                self.attention_weights.append(layer.attention_weight)
            a = None
        else:
            s = _backend.kernel("scores_forward", backend)(hs_dec, hs_enc, 1.0)  # (N, T_dec, T_enc)
            a = _backend.kernel("softmax_forward", backend)(s)  # (N, T_dec, T_enc)
            out = _backend.kernel("weighted_sum_forward", backend)(a, hs_enc)  # (N, T_dec, H)
            self.layers = None
            self.attention_weights = list(a.transpose(1, 0, 2))  # T_dec views (N, T_enc)
        self._cache = (backend, hs_enc, hs_dec, a)
        return out

    def backward(self, dout):
        if self._cache is None:
            raise not_yet(self)
        backend, hs_enc, hs_dec, a = self._cache
        dout = dout_array(dout, hs_dec.shape, hs_dec.dtype)
        if backend == "loop":
            dhs_enc = np.zeros_like(hs_enc)  # (N, T_enc, H)
            dhs_dec = np.empty_like(hs_dec)  # (N, T_dec, H)
            for t, layer in enumerate(self.layers):
                dhs, dh = layer.backward(dout[:, t, :])
                dhs_enc += dhs
                dhs_dec[:, t, :] = dh
            return dhs_enc, dhs_dec
        da, dhs_enc = _backend.kernel("weighted_sum_backward", backend)(dout, a, hs_enc)
        ds = _backend.kernel("softmax_backward", backend)(da, a)  # (N, T_dec, T_enc)
        dhs_dec, dhs_enc_s = _backend.kernel("scores_backward", backend)(ds, hs_dec, hs_enc, 1.0)
        dhs_enc += dhs_enc_s
        return dhs_enc, dhs_dec
