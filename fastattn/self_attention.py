"""The seed notebook's self-attention layers, with its API and correct gradients.

Five layers, with the seed's constructors, ``forward``/``backward`` signatures and return shapes:

==========================  =====================  ========================================
layer                       forward                backward
==========================  =====================  ========================================
``TimeKeyLayer(V, D, d)``   xs (B,T) ids -> K      dK (B,T,d) -> None
``TimeQueryLayer(V, d)``    xs (B,T) ids -> Q      dQ (B,T,d) -> dxs (B,T,V)
                            or (B,T,V) floats
``TimeValueLayer(V, d)``    as the query layer     as the query layer
``CompatibilityFunction``   xs -> score (B,T,T)    dscore (B,T,T) -> None
``(V, D, d)``               softmax(Q K^T/sqrt(d))
``WeightedValue(V, d)``     xs, score -> Z         dZ (B,T,d) -> (dscore (B,T,T),
                            (B,T,d) = score @ Vx                  dvalue (B,T,d))
==========================  =====================  ========================================

The key is an embedding V -> D followed by an affine D -> d. The query and the value are
affine maps of the one-hot encoded ids, computed as a row lookup ``W[xs] + b``: the one-hot
array is never built: the weight gradient is the scatter-add of dout's rows at the ids (the
``embedding_backward`` kernel). Their ``backward`` returns dxs (B,T,V) = dout W^T, the gradient
with respect to the one-hot input, as the seed did, for id and float input alike.

``WeightedValue.backward`` also backpropagates ``dvalue`` into its value layer, so the value
weights get their gradient; it still returns ``dvalue``, the gradient with respect to the value
layer's output, as the seed did.

Every layer takes ``backend=None`` (the backend in force at call time), ``dtype=np.float32``
(float64 for gradient checks) and ``seed=None`` (an int, or a ``np.random.Generator``). Weights
are drawn from a normal distribution scaled so that keys, queries and values have unit variance
at the start: the embedding and the one-hot query/value tables N(0, 1) (a one-hot input has one
non-zero entry), the key affine N(0, 1/D); biases start at zero. ``params`` and ``grads`` are
flat lists of arrays of the same shapes, and ``backward`` writes the gradients in place.
"""

from __future__ import annotations

import math

import numpy as np

from fastattn import _backend, _checks
from fastattn.layers import TimeAffine, TimeEmbedding, _check_backend, _dout, _not_yet

__all__ = [
    "CompatibilityFunction",
    "TimeKeyLayer",
    "TimeQueryLayer",
    "TimeValueLayer",
    "WeightedValue",
]


def _dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _size(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


class TimeKeyLayer:
    """Keys of a batch of id sequences: an embedding V -> D, then an affine D -> d.

    forward(xs (B, T) ids) -> (B, T, d); backward(dout (B, T, d)) -> None.
    """

    def __init__(self, V, D, d, backend=None, dtype=np.float32, seed=None):
        V, D, d = _size(V, "V"), _size(D, "D"), _size(d, "d")
        dt = _dtype(dtype)
        backend = _check_backend(backend)
        rng = np.random.default_rng(seed)
        W_embed = rng.standard_normal((V, D)).astype(dt)  # (V, D)
        W_key = (rng.standard_normal((D, d)) / math.sqrt(D)).astype(dt)  # (D, d)
        b_key = np.zeros(d, dtype=dt)  # (d,)
        self.layers = [TimeEmbedding(W_embed, backend=backend),
                       TimeAffine(W_key, b_key, backend=backend)]
        self.params, self.grads = [], []
        for layer in self.layers:
            self.params += layer.params
            self.grads += layer.grads
        self.V, self.D, self.d = V, D, d
        self.backend = backend

    def forward(self, xs):
        for layer in self.layers:
            xs = layer.forward(xs)
        return xs  # (B, T, d)

    def backward(self, dout):
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout  # None: no gradient for ids


class TimeQueryLayer:
    """An affine map of one-hot encoded ids, as a row lookup. W (V, d), b (d,).

    forward(xs) -> (B, T, d): for xs (B, T) integer ids, ``W[xs] + b`` (the one-hot array is
    never built); for xs (B, T, V) floats, ``xs @ W + b``.
    backward(dout (B, T, d)) -> dxs (B, T, V) = dout W^T, the gradient with respect to the
    one-hot input, as the seed returned it. For id input the weight gradient is the scatter-add
    of dout's rows at the ids (the ``embedding_backward`` kernel); the one-hot is never built.
    """

    def __init__(self, V, d, backend=None, dtype=np.float32, seed=None):
        V, d = _size(V, "V"), _size(d, "d")
        dt = _dtype(dtype)
        self.backend = _check_backend(backend)
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((V, d)).astype(dt)  # (V, d); one-hot input: fan-in 1
        b = np.zeros(d, dtype=dt)  # (d,)
        self.layers = TimeAffine(W, b, backend=self.backend)  # the float-input path
        self.params, self.grads = self.layers.params, self.layers.grads
        self.V, self.d = V, d
        self.idx = None  # the ids of the last forward, or None after a float forward
        self._forwarded = False

    def forward(self, xs):
        W, b = self.params
        if isinstance(xs, np.ndarray) and xs.ndim == 3:
            if xs.dtype.kind != "f":
                raise TypeError(f"xs of shape (B, T, V) must hold float one-hot rows, got "
                                f"dtype {xs.dtype}")
            y = self.layers.forward(xs)  # (B, T, d)
            self.idx, self._forwarded = None, True
            return y
        self.idx = _checks.token_ids(xs, self.V, "xs", ndim=2)  # (B, T)
        self._forwarded = True
        return W[self.idx] + b  # (B, T, d)

    def backward(self, dout):
        if not self._forwarded:
            raise _not_yet(self)
        if self.idx is None:
            return self.layers.backward(dout)  # (B, T, V)
        W = self.params[0]
        dout = _dout(dout, self.idx.shape + (self.d,), W.dtype)
        self.grads[0][...] = _backend.kernel("embedding_backward", self.backend)(
            self.idx, dout, self.V
        )  # (V, d)
        self.grads[1][...] = dout.sum(axis=(0, 1))  # (d,)
        return dout @ W.T  # (B, T, V)


class TimeValueLayer(TimeQueryLayer):
    """The value map: the same layer as :class:`TimeQueryLayer`, with its own weights."""


class CompatibilityFunction:
    """Attention weights of a sequence with itself: score = softmax(Q K^T / sqrt(d)).

    Q from a :class:`TimeQueryLayer` (V, d), K from a :class:`TimeKeyLayer` (V, D, d).
    forward(xs (B, T) ids) -> score (B, T, T), each row summing to 1.
    backward(dscore (B, T, T)) -> None; writes the key and query weights' gradients.
    ``key_params``/``key_grads`` and ``query_params``/``query_grads`` are the two sub-layers'
    lists; ``params``/``grads`` their flat union, keys first.
    """

    def __init__(self, V, D, d, backend=None, dtype=np.float32, seed=None):
        self.backend = _check_backend(backend)
        rng = np.random.default_rng(seed)
        self.time_key_layer = TimeKeyLayer(V, D, d, backend=self.backend, dtype=dtype, seed=rng)
        self.time_query_layer = TimeQueryLayer(V, d, backend=self.backend, dtype=dtype, seed=rng)
        self.key_params = list(self.time_key_layer.params)
        self.key_grads = list(self.time_key_layer.grads)
        self.query_params = list(self.time_query_layer.params)
        self.query_grads = list(self.time_query_layer.grads)
        self.params = self.key_params + self.query_params
        self.grads = self.key_grads + self.query_grads
        self.d = self.time_key_layer.d
        self.scale = 1.0 / math.sqrt(self.d)
        self.out_query = self.out_key = self.out = self.score = None

    def forward(self, xs):
        xs = _checks.token_ids(xs, self.time_key_layer.V, "xs", ndim=2)
        q = np.ascontiguousarray(self.time_query_layer.forward(xs))  # (B, T, d)
        k = np.ascontiguousarray(self.time_key_layer.forward(xs))  # (B, T, d)
        out = _backend.kernel("scores_forward", self.backend)(q, k, self.scale)  # (B, T, T)
        score = _backend.kernel("softmax_forward", self.backend)(out)  # (B, T, T)
        self.out_query, self.out_key, self.out, self.score = q, k, out, score
        return score

    def backward(self, dscore):
        if self.score is None:
            raise _not_yet(self)
        dscore = _dout(dscore, self.score.shape, self.score.dtype, "dscore")
        dout = _backend.kernel("softmax_backward", self.backend)(dscore, self.score)  # (B, T, T)
        dquery, dkey = _backend.kernel("scores_backward", self.backend)(
            dout, self.out_query, self.out_key, self.scale
        )  # (B, T, d) each
        self.time_key_layer.backward(dkey)
        self.time_query_layer.backward(dquery)
        return None


class WeightedValue:
    """The attention output: Z = score @ value(xs), with a :class:`TimeValueLayer` (V, d).

    forward(xs (B, T) ids or (B, T, V) floats, score (B, Tq, T)) -> Z (B, Tq, d).
    backward(dZ (B, Tq, d)) -> (dscore (B, Tq, T), dvalue (B, T, d)); dvalue is also
    backpropagated into the value layer, whose weight gradients land in ``grads``; the
    gradient with respect to the (one-hot) input is kept as ``self.dxs`` (B, T, V).
    """

    def __init__(self, V, d, backend=None, dtype=np.float32, seed=None):
        self.backend = _check_backend(backend)
        self.time_value_layer = TimeValueLayer(V, d, backend=self.backend, dtype=dtype,
                                               seed=seed)
        self.params = list(self.time_value_layer.params)
        self.grads = list(self.time_value_layer.grads)
        self.out_value = self.score = self.dxs = None

    @property
    def out_value_T(self):
        """The values transposed, (B, d, T), as the seed kept them."""
        return None if self.out_value is None else self.out_value.transpose(0, 2, 1)

    def forward(self, xs, score):
        value = np.ascontiguousarray(self.time_value_layer.forward(xs))  # (B, T, d)
        B, T, _ = value.shape
        score = _checks.float_array(score, "score", ndim_min=3, finite=False)
        if score.ndim != 3 or score.shape[0] != B or score.shape[2] != T:
            raise ValueError(f"score must have shape ({B}, Tq, {T}) to match xs, "
                             f"got {score.shape}")
        score = score.astype(value.dtype, copy=False)
        Z = _backend.kernel("weighted_sum_forward", self.backend)(score, value)  # (B, Tq, d)
        self.out_value, self.score = value, score
        return Z

    def backward(self, dZ):
        if self.score is None:
            raise _not_yet(self)
        value, score = self.out_value, self.score
        dZ = _dout(dZ, (score.shape[0], score.shape[1], value.shape[2]), value.dtype, "dZ")
        dscore, dvalue = _backend.kernel("weighted_sum_backward", self.backend)(
            dZ, score, value
        )  # (B, Tq, T), (B, T, d)
        self.dxs = self.time_value_layer.backward(dvalue)
        return dscore, dvalue
