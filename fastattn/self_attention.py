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

Every layer takes ``backend=None`` (the backend in force when ``forward`` is called; ``backward``
runs on the backend its forward ran on), ``dtype=np.float32``
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
from fastattn._layer import (
    check_backend,
    check_dtype,
    collect_params,
    dout_array,
    float_input,
    forward_backend,
    make_rng,
    not_yet,
    positive_int,
)
from fastattn.layers import TimeAffine, TimeEmbedding

__all__ = [
    "CompatibilityFunction",
    "TimeKeyLayer",
    "TimeQueryLayer",
    "TimeValueLayer",
    "WeightedValue",
]


class TimeKeyLayer:
    """Keys of a batch of id sequences: an embedding V -> D, then an affine D -> d.

    forward(xs (B, T) ids) -> (B, T, d); backward(dout (B, T, d)) -> None.
    """

    def __init__(self, V, D, d, backend=None, dtype=np.float32, seed=None):
        V, D, d = positive_int(V, "V"), positive_int(D, "D"), positive_int(d, "d")
        dt = check_dtype(dtype)
        backend = check_backend(backend)
        rng = make_rng(seed)
        W_embed = rng.standard_normal((V, D)).astype(dt)  # (V, D)
        W_key = (rng.standard_normal((D, d)) / math.sqrt(D)).astype(dt)  # (D, d)
        b_key = np.zeros(d, dtype=dt)  # (d,)
        self.layers = [TimeEmbedding(W_embed, backend=backend),
                       TimeAffine(W_key, b_key, backend=backend)]
        self.params, self.grads = collect_params(self.layers)
        self.V, self.D, self.d = V, D, d
        self.backend = backend
        self._ran = False

    def forward(self, xs):
        for layer in self.layers:
            xs = layer.forward(xs)
        self._ran = True
        return xs  # (B, T, d)

    def backward(self, dout):
        if not self._ran:
            raise not_yet(self)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout  # None: no gradient for ids


class TimeQueryLayer:
    """An affine map of one-hot encoded ids, as a row lookup. W (V, d), b (d,).

    forward(xs) -> (B, T, d): for xs (B, T) integer ids, ``W[xs] + b`` (the one-hot array is
    never built); for xs (B, T, V) floats (a numpy array), ``xs @ W + b``.
    backward(dout (B, T, d)) -> dxs (B, T, V) = dout W^T, the gradient with respect to the
    one-hot input, as the seed returned it. For id input the weight gradient is the scatter-add
    of dout's rows at the ids (the ``embedding_backward`` kernel); the one-hot is never built.
    """

    def __init__(self, V, d, backend=None, dtype=np.float32, seed=None):
        V, d = positive_int(V, "V"), positive_int(d, "d")
        dt = check_dtype(dtype)
        self.backend = check_backend(backend)
        rng = make_rng(seed)
        W = rng.standard_normal((V, d)).astype(dt)  # (V, d); one-hot input: fan-in 1
        b = np.zeros(d, dtype=dt)  # (d,)
        self.layers = TimeAffine(W, b, backend=self.backend)  # the float-input path
        self.params, self.grads = collect_params([self.layers])
        self.V, self.d = V, d
        self.idx = None  # the ids of the last forward, or None after a float forward
        self._ran_on = None  # the backend of the last forward, which backward runs on

    def forward(self, xs):
        W, b = self.params
        if isinstance(xs, np.ndarray) and xs.ndim == 3:
            if xs.dtype.kind != "f":
                raise TypeError(f"xs of shape (B, T, V) must hold float one-hot rows, got "
                                f"dtype {xs.dtype}")
            y = self.layers.forward(xs)  # (B, T, d)
            self.idx, self._ran_on = None, forward_backend(self)
            return y
        backend = forward_backend(self)
        self.idx = _checks.token_ids(xs, self.V, "xs", ndim=2)  # (B, T)
        self._ran_on = backend
        return W[self.idx] + b  # (B, T, d)

    def backward(self, dout):
        if self._ran_on is None:
            raise not_yet(self)
        if self.idx is None:
            return self.layers.backward(dout)  # (B, T, V)
        W = self.params[0]
        dout = dout_array(dout, self.idx.shape + (self.d,), W.dtype)
        self.grads[0][...] = _backend.kernel("embedding_backward", self._ran_on)(
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
        self.backend = check_backend(backend)
        rng = make_rng(seed)
        self.time_key_layer = TimeKeyLayer(V, D, d, backend=self.backend, dtype=dtype, seed=rng)
        self.time_query_layer = TimeQueryLayer(V, d, backend=self.backend, dtype=dtype, seed=rng)
        self.key_params = list(self.time_key_layer.params)
        self.key_grads = list(self.time_key_layer.grads)
        self.query_params = list(self.time_query_layer.params)
        self.query_grads = list(self.time_query_layer.grads)
        self.params, self.grads = collect_params([self.time_key_layer, self.time_query_layer])
        self.d = self.time_key_layer.d
        self.scale = 1.0 / math.sqrt(self.d)
        self.out_query = self.out_key = self.out = self.score = None
        self._ran_on = None  # the backend of the last forward, which backward runs on

    def forward(self, xs):
        backend = forward_backend(self)
        xs = _checks.token_ids(xs, self.time_key_layer.V, "xs", ndim=2)
        q = np.ascontiguousarray(self.time_query_layer.forward(xs))  # (B, T, d)
        k = np.ascontiguousarray(self.time_key_layer.forward(xs))  # (B, T, d)
        out = _backend.kernel("scores_forward", backend)(q, k, self.scale)  # (B, T, T)
        score = _backend.kernel("softmax_forward", backend)(out)  # (B, T, T)
        self.out_query, self.out_key, self.out, self.score = q, k, out, score
        self._ran_on = backend
        return score

    def backward(self, dscore):
        if self.score is None:
            raise not_yet(self)
        dscore = dout_array(dscore, self.score.shape, self.score.dtype, "dscore")
        dout = _backend.kernel("softmax_backward", self._ran_on)(dscore, self.score)  # (B, T, T)
        dquery, dkey = _backend.kernel("scores_backward", self._ran_on)(
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
        self.backend = check_backend(backend)
        self.time_value_layer = TimeValueLayer(V, d, backend=self.backend, dtype=dtype,
                                               seed=seed)
        self.params, self.grads = collect_params([self.time_value_layer])
        self.out_value = self.score = self.dxs = None
        self._ran_on = None  # the backend of the last forward, which backward runs on

    @property
    def out_value_T(self):
        """The values transposed, (B, d, T), as the seed kept them."""
        return None if self.out_value is None else self.out_value.transpose(0, 2, 1)

    def forward(self, xs, score):
        backend = forward_backend(self)
        value = np.ascontiguousarray(self.time_value_layer.forward(xs))  # (B, T, d)
        B, T, _ = value.shape
        score = float_input(score, "score", value.dtype, ndim_min=3)
        if score.ndim != 3 or score.shape[0] != B or score.shape[2] != T:
            raise ValueError(f"score must have shape ({B}, Tq, {T}) to match xs, "
                             f"got {score.shape}")
        Z = _backend.kernel("weighted_sum_forward", backend)(score, value)  # (B, Tq, d)
        self.out_value, self.score, self._ran_on = value, score, backend
        return Z

    def backward(self, dZ):
        if self.score is None:
            raise not_yet(self)
        value, score = self.out_value, self.score
        dZ = dout_array(dZ, (score.shape[0], score.shape[1], value.shape[2]), value.dtype, "dZ")
        dscore, dvalue = _backend.kernel("weighted_sum_backward", self._ran_on)(
            dZ, score, value
        )  # (B, Tq, T), (B, T, d)
        self.dxs = self.time_value_layer.backward(dvalue)
        return dscore, dvalue
