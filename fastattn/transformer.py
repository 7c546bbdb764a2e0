"""A small encoder-decoder Transformer from book-style layers, on fastattn's attention kernels.

Every layer here follows the book's conventions: ``self.params`` and ``self.grads`` are flat
lists of arrays of the same shapes, ``forward`` keeps what ``backward`` needs, ``backward``
writes the gradients in place (``self.grads[i][...] = ...``) and returns the input gradient(s);
``backward`` before ``forward`` raises ``RuntimeError``. Layers that create weights take
``dtype=np.float32`` (float64 for gradient checks) and ``seed=None``; ``backend=None`` runs
the kernels of the backend in force at call time.

Attention runs on the fused kernels ``attention_forward``/``attention_backward`` (the (Tq, Tk)
score matrix is never kept); the affine maps, layer norm and ReLU are NumPy on 2-D
``(B*T, C)`` views, so each matrix product is one BLAS call.

The blocks are pre-LN (``x + f(LayerNorm(x))``), and the encoder and decoder end with a final
LayerNorm. ``TransformerSeq2seq`` has the book's seq2seq interface (``forward(xs, ts)`` with
teacher forcing, ``backward()``, ``generate``), so the book's ``Trainer`` and ``eval_seq2seq``
work on it.
"""

from __future__ import annotations

import math

import numpy as np

from fastattn import kernels
from fastattn import _backend, _checks
from fastattn.layers import TimeAffine, TimeEmbedding, TimeSoftmaxWithLoss

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "LayerNorm",
    "MultiHeadAttention",
    "PositionalEncoding",
    "TransformerSeq2seq",
]


# --------------------------------------------------------------------------- helpers


def _check_backend(backend):
    return None if backend is None else kernels.check_backend(backend)


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _rng(seed):
    return np.random.default_rng(seed)


def _spawn(seed, n: int):
    """``n`` independent child seeds of ``seed`` (None, an int or a SeedSequence)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return ss.spawn(n)


def _uniform(rng, shape, fan_in, dtype):
    """Weights uniform in +-1/sqrt(fan_in) (the usual default for linear layers)."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _not_yet(layer) -> RuntimeError:
    return RuntimeError(f"{type(layer).__name__}.backward called before forward")


def _float_input(x, name: str, dtype: np.dtype, C: int) -> np.ndarray:
    """A (B, T, C) float input of the layer's dtype; cheap checks only (no NaN scan)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != dtype:
        if x.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
        x = x.astype(dtype)
    if x.ndim != 3 or x.shape[2] != C:
        raise ValueError(f"{name} must have shape (B, T, {C}), got {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one sequence and one position, "
                         f"got shape {x.shape}")
    return np.ascontiguousarray(x)


def _dout(dout, shape, dtype, name: str = "dout") -> np.ndarray:
    if not isinstance(dout, np.ndarray):
        dout = np.asarray(dout)
    if dout.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {dout.dtype}")
    _checks.shape_is(dout, shape, name)
    return np.ascontiguousarray(dout, dtype=dtype)


_ONES = {}


def _ones(n: int, dtype) -> np.ndarray:
    """A read-only vector of ``n`` ones (cached): sums as matrix-vector products."""
    dt = np.dtype(dtype)
    v = _ONES.get(dt)
    if v is None or v.shape[0] < n:
        v = np.ones(max(n, 1024), dt)
        v.flags.writeable = False
        _ONES[dt] = v
    return v[:n]


def _colsum(a2, out=None):
    """Column sums of a 2-D array (N, C) -> (C,), as ones (N,) @ a2 (one BLAS call)."""
    return np.matmul(_ones(a2.shape[0], a2.dtype), a2, out=out)


def _rowsum(a2):
    """Row sums of a 2-D array (N, C) -> (N,), as a2 @ ones (C,)."""
    return a2 @ _ones(a2.shape[1], a2.dtype)


def _add_to(fresh, x):
    """``fresh + x``, written into ``fresh`` (an array the caller owns) when the shapes and
    dtypes allow it (a residual connection without a new array)."""
    if fresh.shape == np.shape(x) and np.result_type(fresh, x) == fresh.dtype:
        fresh += x
        return fresh
    return fresh + x


def _layers_params(layers):
    params, grads = [], []
    for layer in layers:
        params += layer.params
        grads += layer.grads
    return params, grads


# --------------------------------------------------------------------------- LayerNorm


class LayerNorm:
    """Layer normalisation over the last axis: y = (x - mean) / sqrt(var + eps) * g + b.

    LayerNorm(d_model, eps=1e-5); x (..., d_model) -> same shape; backward(dout) -> dx.
    params [g (d_model,), b (d_model,)], g initialised to ones and b to zeros.
    """

    def __init__(self, d_model, eps=1e-5, *, backend=None, dtype=np.float32, seed=None):
        d_model = _positive_int(d_model, "d_model")
        dt = _check_dtype(dtype)
        self.eps = float(eps)
        self.backend = _check_backend(backend)  # no kernels here; kept for a uniform API
        self.params = [np.ones(d_model, dt), np.zeros(d_model, dt)]
        self.grads = [np.zeros(d_model, dt), np.zeros(d_model, dt)]
        self.cache = None

    def forward(self, x):
        g, b = self.params
        C = g.shape[0]
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
        if x.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"x must have dtype float32 or float64, got {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != C:
            raise ValueError(f"x must be an array with last dimension {C}, got {x.shape}")
        x = np.ascontiguousarray(x, dtype=g.dtype)
        t = g.dtype.type
        x2 = x.reshape(-1, C)  # (N, C)
        mu = _rowsum(x2)  # (N,)
        mu *= t(1.0 / C)
        xc = x2 - mu[:, None]  # (N, C)
        rstd = np.einsum("ij,ij->i", xc, xc)  # (N,), sum of squares
        rstd *= t(1.0 / C)
        rstd += t(self.eps)
        np.sqrt(rstd, out=rstd)
        np.reciprocal(rstd, out=rstd)  # 1 / sqrt(var + eps)
        xhat = np.multiply(xc, rstd[:, None], out=xc)  # (N, C)
        y = xhat * g
        y += b
        self.cache = (xhat, rstd, x.shape)
        return y.reshape(x.shape)

    def backward(self, dout):
        if self.cache is None:
            raise _not_yet(self)
        xhat, rstd, shape = self.cache
        g = self.params[0]
        C = g.shape[0]
        t = g.dtype.type
        dy = _dout(dout, shape, g.dtype).reshape(-1, C)  # (N, C)
        self.grads[0][...] = np.einsum("ij,ij->j", dy, xhat)  # (C,)
        _colsum(dy, out=self.grads[1])  # (C,)
        dxhat = dy * g  # (N, C)
        a = _rowsum(dxhat)  # (N,)
        a *= t(1.0 / C)
        c = np.einsum("ij,ij->i", dxhat, xhat)  # (N,)
        c *= t(1.0 / C)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        dxhat -= a[:, None]
        dxhat -= xhat * c[:, None]
        dxhat *= rstd[:, None]
        return dxhat.reshape(shape)


# --------------------------------------------------------------------------- positions


def sinusoidal_table(max_len: int, d_model: int, dtype=np.float32) -> np.ndarray:
    """The fixed sinusoidal position table (max_len, d_model): sin on even, cos on odd columns."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]  # (L, 1)
    i = np.arange(0, d_model, 2, dtype=np.float64)  # (ceil(C/2),)
    angle = pos / np.power(10000.0, i / d_model)  # (L, ceil(C/2))
    table = np.zeros((max_len, d_model))
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return table.astype(dtype)


class PositionalEncoding:
    """Adds a position vector to every time step: x (B, T, C) -> x + P[offset:offset+T].

    ``kind="learned"`` (default): P (max_len, C) is a parameter, initialised with small normal
    values. ``kind="sinusoidal"``: P is the fixed sinusoidal table and params is empty.
    ``kind="both"``: the sinusoidal table plus a learned correction (initialised to zeros).
    backward(dout) -> dx = dout (and dP, the sum of dout over the batch, for a learned P).
    """

    KINDS = ("learned", "sinusoidal", "both")

    def __init__(self, max_len, d_model, kind="learned", *, backend=None, dtype=np.float32,
                 seed=None):
        max_len = _positive_int(max_len, "max_len")
        d_model = _positive_int(d_model, "d_model")
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        dt = _check_dtype(dtype)
        self.kind = kind
        self.max_len = max_len
        self.d_model = d_model
        self.backend = _check_backend(backend)
        self.fixed = None if kind == "learned" else sinusoidal_table(max_len, d_model, dt)
        if kind == "sinusoidal":
            self.params, self.grads = [], []
        else:
            P = (np.zeros((max_len, d_model)) if kind == "both"
                 else _rng(seed).normal(0.0, 0.1, (max_len, d_model))).astype(dt)
            self.params, self.grads = [P], [np.zeros_like(P)]
        self.dtype = dt
        self.cache = None

    def table(self, T: int, offset: int = 0) -> np.ndarray:
        """The position vectors (T, C) added at positions offset .. offset+T-1."""
        if (isinstance(offset, bool) or not isinstance(offset, (int, np.integer))
                or offset < 0):
            raise ValueError(f"offset must be an integer >= 0, got {offset!r}")
        if offset + T > self.max_len:
            raise ValueError(f"sequence of length {offset + T} is longer than max_len "
                             f"{self.max_len}")
        if self.kind == "sinusoidal":
            return self.fixed[offset:offset + T]
        P = self.params[0][offset:offset + T]
        return P if self.fixed is None else P + self.fixed[offset:offset + T]

    def forward(self, x, offset: int = 0):
        x = _float_input(x, "x", self.dtype, self.d_model)
        T = x.shape[1]
        out = x + self.table(T, offset)  # (B, T, C)
        self.cache = (x.shape, offset)
        return out

    def backward(self, dout):
        if self.cache is None:
            raise _not_yet(self)
        shape, offset = self.cache
        dout = _dout(dout, shape, self.dtype)
        if self.params:
            self.grads[0][...] = 0
            self.grads[0][offset:offset + shape[1]] = dout.sum(axis=0)
        return dout


# --------------------------------------------------------------------------- attention


class MultiHeadAttention:
    """Multi-head scaled dot-product attention on the fused attention kernels.

    MultiHeadAttention(d_model, n_heads, causal=False).

    ``forward(x_q, x_kv=None, mask=None)``: self-attention when ``x_kv`` is None (queries, keys
    and values all from ``x_q``), cross-attention otherwise (queries from ``x_q``, keys and
    values from ``x_kv``). x_q (B, Tq, C), x_kv (B, Tk, C) -> (B, Tq, C). ``mask`` is None or
    a boolean array broadcastable to (B, Tq, Tk), True where a query may attend; a key-padding
    mask ``keep`` (B, Tk) is passed as ``keep[:, None, :]``. ``causal=True`` (decoder
    self-attention) also forbids query i to see key j > i. A query with nothing to attend to
    gets zeros.

    ``backward(dout)`` returns dx_q for self-attention, (dx_q, dx_kv) for cross-attention.

    params [W_in (C, 3C), b_in (3C,), W_out (C, C), b_out (C,)]: columns 0:C of W_in give the
    queries, C:2C the keys, 2C:3C the values (heads are consecutive blocks of C/n_heads).

    Set ``keep_weights = True`` to have ``forward`` also store the attention probabilities in
    ``attention_weights`` (B, n_heads, Tq, Tk), computed by the ``scores_forward`` and
    ``softmax_forward`` kernels (for plots; training does not need them).
    """

    def __init__(self, d_model, n_heads, causal=False, *, backend=None, dtype=np.float32,
                 seed=None):
        d_model = _positive_int(d_model, "d_model")
        n_heads = _positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        dt = _check_dtype(dtype)
        rng = _rng(seed)
        C = d_model
        self.d_model, self.n_heads, self.d_head = C, n_heads, C // n_heads
        self.causal = bool(causal)
        self.backend = _check_backend(backend)
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.params = [
            _uniform(rng, (C, 3 * C), C, dt), np.zeros(3 * C, dt),
            _uniform(rng, (C, C), C, dt), np.zeros(C, dt),
        ]
        self.grads = [np.zeros_like(p) for p in self.params]
        self.dtype = dt
        self.keep_weights = False
        self.attention_weights = None
        self.cache = None

    # -- shape helpers: (B*T, n*C) rows <-> (n, B*H, T, dh) heads
    def _split(self, a2, B, T, n):
        H, dh = self.n_heads, self.d_head
        a = a2.reshape(B, T, n, H, dh).transpose(2, 0, 3, 1, 4)  # (n, B, H, T, dh)
        return np.ascontiguousarray(a).reshape(n, B * H, T, dh)

    def _merge(self, o, B, T):
        H, dh = self.n_heads, self.d_head
        o = o.reshape(B, H, T, dh).transpose(0, 2, 1, 3)  # (B, T, H, dh)
        return np.ascontiguousarray(o).reshape(B * T, H * dh)

    def _mask(self, mask, B, Tq, Tk):
        if mask is None:
            return None
        if not isinstance(mask, np.ndarray):
            mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"mask must be a boolean array (True where attention is allowed), "
                            f"got dtype {mask.dtype}")
        if mask.ndim > 3:
            raise ValueError(f"mask must broadcast to (B, Tq, Tk) = {(B, Tq, Tk)}, got "
                             f"shape {mask.shape}")
        try:
            np.broadcast_shapes(mask.shape, (B, Tq, Tk))
        except ValueError:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to "
                             f"(B, Tq, Tk) = {(B, Tq, Tk)}") from None
        m = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)[:, None]  # (B|1, 1, Tq|1, Tk)
        return _checks.bool_mask(m, (B, self.n_heads, Tq, Tk))

    def _weights(self, q, k, mask3, B, Tq, Tk):
        """Attention probabilities (B, H, Tq, Tk) by the scores and softmax kernels."""
        s = _backend.kernel("scores_forward", self.backend)(q, k, self.scale)  # (B*H, Tq, Tk)
        allowed = np.ones((1, Tq, Tk), bool) if mask3 is None else mask3
        if self.causal:
            allowed = allowed & np.tri(Tq, Tk, dtype=bool)
        s = np.where(allowed, s, -np.inf).astype(s.dtype)
        p = _backend.kernel("softmax_forward", self.backend)(np.ascontiguousarray(s))
        return p.reshape(B, self.n_heads, Tq, Tk)

    def forward(self, x_q, x_kv=None, mask=None):
        W_in, b_in, W_out, b_out = self.params
        C = self.d_model
        x_q = _float_input(x_q, "x_q", self.dtype, C)
        B, Tq, _ = x_q.shape
        xq2 = x_q.reshape(B * Tq, C)
        if x_kv is None:  # self-attention: one product for q, k and v
            Tk = Tq
            qkv = xq2 @ W_in  # (B*T, 3C)
            qkv += b_in
            q, k, v = self._split(qkv, B, Tq, 3)  # each (B*H, T, dh)
            xkv2 = None
        else:
            x_kv = _float_input(x_kv, "x_kv", self.dtype, C)
            if x_kv.shape[0] != B:
                raise ValueError(f"x_kv must have the batch size {B} of x_q, got {x_kv.shape}")
            Tk = x_kv.shape[1]
            xkv2 = x_kv.reshape(B * Tk, C)
            qp = xq2 @ W_in[:, :C]  # (B*Tq, C)
            qp += b_in[:C]
            kv = xkv2 @ W_in[:, C:]  # (B*Tk, 2C)
            kv += b_in[C:]
            q = self._split(qp, B, Tq, 1)[0]  # (B*H, Tq, dh)
            k, v = self._split(kv, B, Tk, 2)  # (B*H, Tk, dh)
        mask3 = self._mask(mask, B, Tq, Tk)
        att, lse = _backend.kernel("attention_forward", self.backend)(
            q, k, v, self.scale, self.causal, mask3)  # (B*H, Tq, dh), (B*H, Tq)
        a2 = self._merge(att, B, Tq)  # (B*Tq, C)
        y = a2 @ W_out  # (B*Tq, C)
        y += b_out
        if self.keep_weights:
            self.attention_weights = self._weights(q, k, mask3, B, Tq, Tk)
        self.cache = (xq2, xkv2, q, k, v, att, lse, a2, mask3, B, Tq, Tk)
        return y.reshape(B, Tq, C)

    def backward(self, dout):
        if self.cache is None:
            raise _not_yet(self)
        xq2, xkv2, q, k, v, att, lse, a2, mask3, B, Tq, Tk = self.cache
        W_in, _, W_out, _ = self.params
        dW_in, db_in, dW_out, db_out = self.grads
        C = self.d_model
        dy = _dout(dout, (B, Tq, C), self.dtype).reshape(B * Tq, C)
        np.matmul(a2.T, dy, out=dW_out)  # (C, C)
        _colsum(dy, out=db_out)
        da = self._split(dy @ W_out.T, B, Tq, 1)[0]  # (B*H, Tq, dh)
        dq, dk, dv = _backend.kernel("attention_backward", self.backend)(
            da, q, k, v, att, lse, self.scale, self.causal, mask3)
        if xkv2 is None:
            dqkv = self._merge_n((dq, dk, dv), B, Tq)  # (B*T, 3C)
            np.matmul(xq2.T, dqkv, out=dW_in)
            _colsum(dqkv, out=db_in)
            return (dqkv @ W_in.T).reshape(B, Tq, C)
        dq2 = self._merge(dq, B, Tq)  # (B*Tq, C)
        dkv = self._merge_n((dk, dv), B, Tk)  # (B*Tk, 2C)
        np.matmul(xq2.T, dq2, out=dW_in[:, :C])
        np.matmul(xkv2.T, dkv, out=dW_in[:, C:])
        _colsum(dq2, out=db_in[:C])
        _colsum(dkv, out=db_in[C:])
        dx_q = (dq2 @ W_in[:, :C].T).reshape(B, Tq, C)
        dx_kv = (dkv @ W_in[:, C:].T).reshape(B, Tk, C)
        return dx_q, dx_kv

    def _merge_n(self, parts, B, T):
        """n arrays (B*H, T, dh) -> (B*T, n*C), the inverse of _split."""
        H, dh = self.n_heads, self.d_head
        n = len(parts)
        out = np.empty((B, T, n, H, dh), parts[0].dtype)
        for i, a in enumerate(parts):
            out[:, :, i] = a.reshape(B, H, T, dh).transpose(0, 2, 1, 3)
        return out.reshape(B * T, n * H * dh)

    # -- inference without a backward: cached keys and values
    def project_kv(self, x_kv):
        """Keys and values of ``x_kv`` (B, Tk, C) for cross-attention: (k, v), each
        (B*H, Tk, dh), to pass to :meth:`attend` many times."""
        W_in, b_in, _, _ = self.params
        C = self.d_model
        x_kv = _float_input(x_kv, "x_kv", self.dtype, C)
        B, Tk, _ = x_kv.shape
        kv = x_kv.reshape(B * Tk, C) @ W_in[:, C:]
        kv += b_in[C:]
        k, v = self._split(kv, B, Tk, 2)
        return k, v

    def attend(self, x_q, k, v, causal=False):
        """Attention of x_q (B, Tq, C) to precomputed keys and values (from :meth:`project_kv`
        or :meth:`step`) -> (B, Tq, C). Keeps nothing for backward."""
        W_in, b_in, W_out, b_out = self.params
        C = self.d_model
        B, Tq, _ = x_q.shape
        qp = x_q.reshape(B * Tq, C) @ W_in[:, :C]
        qp += b_in[:C]
        q = self._split(qp, B, Tq, 1)[0]
        att, _ = _backend.kernel("attention_forward", self.backend)(
            q, k, v, self.scale, causal, None)
        y = self._merge(att, B, Tq) @ W_out
        y += b_out
        return y.reshape(B, Tq, C)

    def step(self, x_new, cache: dict):
        """One step of causal self-attention for generation: x_new (B, 1, C) is the newest
        position; ``cache`` (a dict, empty at the first step) keeps the keys and values of
        the earlier positions and receives the new ones. Returns (B, 1, C)."""
        W_in, b_in, _, _ = self.params
        C = self.d_model
        B = x_new.shape[0]
        kv = x_new.reshape(B, C) @ W_in[:, C:]
        kv += b_in[C:]
        k_new, v_new = self._split(kv, B, 1, 2)  # (B*H, 1, dh)
        if cache:
            k = np.concatenate([cache["k"], k_new], axis=1)  # (B*H, t+1, dh)
            v = np.concatenate([cache["v"], v_new], axis=1)
        else:
            k, v = k_new, v_new
        cache["k"], cache["v"] = k, v
        return self.attend(x_new, k, v, causal=False)


# --------------------------------------------------------------------------- feed-forward


class FeedForward:
    """Position-wise feed-forward: relu(x W1 + b1) W2 + b2. x (B, T, C) -> (B, T, C).

    FeedForward(d_model, d_ff); params [W1 (C, F), b1 (F,), W2 (F, C), b2 (C,)].
    """

    def __init__(self, d_model, d_ff, *, backend=None, dtype=np.float32, seed=None):
        C = _positive_int(d_model, "d_model")
        F = _positive_int(d_ff, "d_ff")
        dt = _check_dtype(dtype)
        rng = _rng(seed)
        self.backend = _check_backend(backend)
        self.params = [_uniform(rng, (C, F), C, dt), np.zeros(F, dt),
                       _uniform(rng, (F, C), F, dt), np.zeros(C, dt)]
        self.grads = [np.zeros_like(p) for p in self.params]
        self.d_model, self.d_ff, self.dtype = C, F, dt
        self.cache = None

    def forward(self, x):
        W1, b1, W2, b2 = self.params
        x = _float_input(x, "x", self.dtype, self.d_model)
        x2 = x.reshape(-1, self.d_model)  # (N, C)
        h = x2 @ W1  # (N, F)
        h += b1
        on = np.greater(h, 0)  # (N, F) relu's mask, reused by backward
        np.multiply(h, on, out=h)  # relu (NaN stays NaN)
        y = h @ W2  # (N, C)
        y += b2
        self.cache = (x2, h, on, x.shape)
        return y.reshape(x.shape)

    def backward(self, dout):
        if self.cache is None:
            raise _not_yet(self)
        x2, h, on, shape = self.cache
        W1, _, W2, _ = self.params
        dW1, db1, dW2, db2 = self.grads
        dy = _dout(dout, shape, self.dtype).reshape(-1, self.d_model)  # (N, C)
        np.matmul(h.T, dy, out=dW2)  # (F, C)
        _colsum(dy, out=db2)
        dh = dy @ W2.T  # (N, F)
        np.multiply(dh, on, out=dh)
        np.matmul(x2.T, dh, out=dW1)  # (C, F)
        _colsum(dh, out=db1)
        return (dh @ W1.T).reshape(shape)


# --------------------------------------------------------------------------- blocks


class EncoderBlock:
    """Pre-LN encoder block: x + SelfAttn(LN(x)), then x + FFN(LN(x)). x (B, T, C) -> same.

    ``forward(x, mask=None)``; ``mask`` as in :class:`MultiHeadAttention`.
    """

    def __init__(self, d_model, n_heads, d_ff, *, backend=None, dtype=np.float32, seed=None):
        ss = _spawn(seed, 2)
        kw = dict(backend=backend, dtype=dtype)
        self.ln1 = LayerNorm(d_model, **kw)
        self.attn = MultiHeadAttention(d_model, n_heads, **kw, seed=ss[0])
        self.ln2 = LayerNorm(d_model, **kw)
        self.ffn = FeedForward(d_model, d_ff, **kw, seed=ss[1])
        self.layers = [self.ln1, self.attn, self.ln2, self.ffn]
        self.params, self.grads = _layers_params(self.layers)
        self._ran = False

    def forward(self, x, mask=None):
        x = _add_to(self.attn.forward(self.ln1.forward(x), mask=mask), x)
        x = _add_to(self.ffn.forward(self.ln2.forward(x)), x)
        self._ran = True
        return x

    def backward(self, dout):
        if not self._ran:
            raise _not_yet(self)
        dx = _add_to(self.ln2.backward(self.ffn.backward(dout)), dout)
        dx += self.ln1.backward(self.attn.backward(dx))
        return dx


class DecoderBlock:
    """Pre-LN decoder block: x + CausalSelfAttn(LN(x)), x + CrossAttn(LN(x), memory),
    x + FFN(LN(x)).

    ``forward(x, memory, mask=None)``: x (B, T, C), memory (B, S, C) -> (B, T, C); ``mask``
    (broadcastable to (B, T, S)) applies to the cross-attention.
    ``backward(dout)`` -> (dx, dmemory).
    """

    def __init__(self, d_model, n_heads, d_ff, *, backend=None, dtype=np.float32, seed=None):
        ss = _spawn(seed, 3)
        kw = dict(backend=backend, dtype=dtype)
        self.ln1 = LayerNorm(d_model, **kw)
        self.self_attn = MultiHeadAttention(d_model, n_heads, causal=True, **kw, seed=ss[0])
        self.ln2 = LayerNorm(d_model, **kw)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, **kw, seed=ss[1])
        self.ln3 = LayerNorm(d_model, **kw)
        self.ffn = FeedForward(d_model, d_ff, **kw, seed=ss[2])
        self.layers = [self.ln1, self.self_attn, self.ln2, self.cross_attn, self.ln3, self.ffn]
        self.params, self.grads = _layers_params(self.layers)
        self._ran = False

    def forward(self, x, memory, mask=None):
        x = _add_to(self.self_attn.forward(self.ln1.forward(x)), x)
        x = _add_to(self.cross_attn.forward(self.ln2.forward(x), memory, mask=mask), x)
        x = _add_to(self.ffn.forward(self.ln3.forward(x)), x)
        self._ran = True
        return x

    def backward(self, dout):
        if not self._ran:
            raise _not_yet(self)
        dx = _add_to(self.ln3.backward(self.ffn.backward(dout)), dout)
        dq, dmemory = self.cross_attn.backward(dx)
        dx += self.ln2.backward(dq)
        dx += self.ln1.backward(self.self_attn.backward(dx))
        return dx, dmemory

    def step(self, x_new, k_mem, v_mem, cache: dict):
        """One generation step for the newest position x_new (B, 1, C), with the memory's
        cross-attention keys/values (from ``cross_attn.project_kv``) and the self-attention
        cache (a dict). Keeps nothing for backward."""
        x = x_new + self.self_attn.step(self.ln1.forward(x_new), cache)
        x = x + self.cross_attn.attend(self.ln2.forward(x), k_mem, v_mem)
        return x + self.ffn.forward(self.ln3.forward(x))


# --------------------------------------------------------------------------- the model


class TransformerSeq2seq:
    """An encoder-decoder Transformer with the book's seq2seq interface.

    TransformerSeq2seq(vocab_size, d_model=64, n_heads=4, n_layers=1, d_ff=256, max_len=32,
    pos="both", backend=None, dtype=np.float32, seed=None); ``n_layers`` encoder and
    ``n_layers`` decoder blocks. ``pos`` is the kind of :class:`PositionalEncoding`; the
    default, the sinusoidal table plus a learned correction, generalises to positions that
    are rare in training (e.g. the last characters of the longest questions) much better than
    learned positions alone.

    * ``forward(xs, ts)`` -> mean cross-entropy loss (a float) with teacher forcing: xs (N, S)
      question ids, ts (N, T+1) answer ids starting with the start symbol; the decoder reads
      ``ts[:, :-1]`` and predicts ``ts[:, 1:]``.
    * ``backward(dout=1)`` writes ``grads`` (in place; the arrays of ``grads`` never change).
    * ``generate(xs, start_id, sample_size)`` -> list of ``sample_size`` ids, greedy, for one
      question xs (1, S) (the book's semantics); ``generate_batch(xs, start_id, sample_size)``
      -> (N, sample_size) int64 ids for many at once (greedy, with cached keys and values).
    * ``params``/``grads``: flat lists; ``param_names`` names each entry; ``config`` holds the
      constructor's arguments (without backend and seed), enough to build the same model.
    * ``translate(questions)`` once a vocabulary is attached (``set_vocab``, or
      :func:`fastattn.load_model`).

    Token ids are checked: integers in [0, vocab_size) (ValueError/TypeError otherwise).
    """

    def __init__(self, vocab_size, d_model=64, n_heads=4, n_layers=1, d_ff=256, max_len=32,
                 pos="both", *, backend=None, dtype=np.float32, seed=None):
        V = _positive_int(vocab_size, "vocab_size")
        C = _positive_int(d_model, "d_model")
        n_heads = _positive_int(n_heads, "n_heads")
        n_layers = _positive_int(n_layers, "n_layers")
        d_ff = _positive_int(d_ff, "d_ff")
        max_len = _positive_int(max_len, "max_len")
        if C % n_heads:
            raise ValueError(f"d_model ({C}) must be a multiple of n_heads ({n_heads})")
        dt = _check_dtype(dtype)
        self.backend = _check_backend(backend)
        self.config = dict(vocab_size=V, d_model=C, n_heads=n_heads, n_layers=n_layers,
                           d_ff=d_ff, max_len=max_len, pos=pos, dtype=dt.name)
        self.dtype = dt
        ss = _spawn(seed, 5 + 2 * n_layers)
        kw = dict(backend=backend, dtype=dt)
        emb_std = 1.0
        self.src_embed = TimeEmbedding(
            _rng(ss[0]).normal(0.0, emb_std, (V, C)).astype(dt), backend=backend)
        self.tgt_embed = TimeEmbedding(
            _rng(ss[1]).normal(0.0, emb_std, (V, C)).astype(dt), backend=backend)
        self.src_pos = PositionalEncoding(max_len, C, pos, **kw, seed=ss[2])
        self.tgt_pos = PositionalEncoding(max_len, C, pos, **kw, seed=ss[3])
        self.encoder = [EncoderBlock(C, n_heads, d_ff, **kw, seed=ss[4 + i])
                        for i in range(n_layers)]
        self.enc_ln = LayerNorm(C, **kw)
        self.decoder = [DecoderBlock(C, n_heads, d_ff, **kw, seed=ss[4 + n_layers + i])
                        for i in range(n_layers)]
        self.dec_ln = LayerNorm(C, **kw)
        self.out = TimeAffine(_uniform(_rng(ss[-1]), (C, V), C, dt), np.zeros(V, dt),
                              backend=backend)
        self.loss_layer = TimeSoftmaxWithLoss(backend=backend)

        named = [("src_embed", self.src_embed), ("tgt_embed", self.tgt_embed),
                 ("src_pos", self.src_pos), ("tgt_pos", self.tgt_pos)]
        named += [(f"encoder.{i}", b) for i, b in enumerate(self.encoder)]
        named += [("enc_ln", self.enc_ln)]
        named += [(f"decoder.{i}", b) for i, b in enumerate(self.decoder)]
        named += [("dec_ln", self.dec_ln), ("out", self.out)]
        self.params, self.grads, self.param_names = [], [], []
        for name, layer in named:
            self.param_names += [f"{name}.{j}" for j in range(len(layer.params))]
            self.params += layer.params
            self.grads += layer.grads
        self.char_to_id = None
        self.id_to_char = None
        self.question_width = None
        self.answer_width = None
        self._ran = False

    # -- checks
    def _ids(self, x, name):
        ids = _checks.token_ids(x, self.config["vocab_size"], name, ndim=2)
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one sequence of at least one id, got "
                             f"shape {ids.shape}")
        if ids.shape[1] > self.config["max_len"]:
            raise ValueError(f"{name} has sequences of length {ids.shape[1]}, longer than "
                             f"max_len {self.config['max_len']}")
        return ids

    # -- pieces
    def encode(self, xs):
        """Encoder output (N, S, C) for question ids xs (N, S)."""
        h = self.src_pos.forward(self.src_embed.forward(xs))
        for block in self.encoder:
            h = block.forward(h)
        return self.enc_ln.forward(h)

    def _decode(self, ys, memory):
        h = self.tgt_pos.forward(self.tgt_embed.forward(ys))
        for block in self.decoder:
            h = block.forward(h, memory)
        return self.out.forward(self.dec_ln.forward(h))  # (N, T, V)

    def forward(self, xs, ts):
        xs = self._ids(xs, "xs")
        ts = self._ids(ts, "ts")
        if ts.shape[0] != xs.shape[0]:
            raise ValueError(f"xs and ts must have the same number of rows, got {xs.shape[0]} "
                             f"and {ts.shape[0]}")
        if ts.shape[1] < 2:
            raise ValueError(f"ts must have at least 2 columns (start symbol and one target), "
                             f"got shape {ts.shape}")
        memory = self.encode(xs)
        score = self._decode(ts[:, :-1], memory)
        loss = self.loss_layer.forward(score, ts[:, 1:])
        self._ran = True
        return loss

    def backward(self, dout=1):
        if not self._ran:
            raise _not_yet(self)
        dscore = self.loss_layer.backward(dout)
        dh = self.dec_ln.backward(self.out.backward(dscore))
        dmemory = None
        for block in reversed(self.decoder):
            dh, dm = block.backward(dh)
            dmemory = dm if dmemory is None else dmemory + dm
        self.tgt_embed.backward(self.tgt_pos.backward(dh))
        dh = self.enc_ln.backward(dmemory)
        for block in reversed(self.encoder):
            dh = block.backward(dh)
        self.src_embed.backward(self.src_pos.backward(dh))
        return None

    # -- generation
    def generate_batch(self, xs, start_id, sample_size):
        """Greedy decoding of many questions at once: xs (N, S) ids -> (N, sample_size) int64.

        ``start_id`` is one id (or N ids, one per row). The decoder runs one position per step
        with cached keys and values (nothing is kept for backward).
        """
        xs = self._ids(xs, "xs")
        if isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer)):
            raise TypeError(f"sample_size must be an int, got {type(sample_size).__name__}")
        sample_size = int(sample_size)
        if sample_size < 0 or sample_size > self.config["max_len"]:
            raise ValueError(f"sample_size must be in [0, max_len={self.config['max_len']}], "
                             f"got {sample_size}")
        N = xs.shape[0]
        start = _checks.token_ids(np.broadcast_to(np.asarray(start_id), (N,)),
                                  self.config["vocab_size"], "start_id", ndim=1)
        memory = self.encode(xs)
        kv = [block.cross_attn.project_kv(memory) for block in self.decoder]
        caches = [{} for _ in self.decoder]
        W_emb = self.tgt_embed.params[0]
        out = np.empty((N, sample_size), dtype=np.int64)
        y = start
        for t in range(sample_size):
            h = (W_emb[y] + self.tgt_pos.table(1, t))[:, None, :]  # (N, 1, C)
            for block, (k, v), cache in zip(self.decoder, kv, caches, strict=True):
                h = block.step(h, k, v, cache)
            h = self.dec_ln.forward(h)
            W, b = self.out.params
            score = h.reshape(N, -1) @ W + b  # (N, V)
            y = score.argmax(axis=1)
            out[:, t] = y
        return out

    def generate(self, xs, start_id, sample_size):
        """The book's ``generate``: xs (1, S) one question -> list of ``sample_size`` ids."""
        arr = np.asarray(xs)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[0] != 1:
            raise ValueError(f"generate takes one question of shape (1, S); use generate_batch "
                             f"for many, got shape {arr.shape}")
        return [int(i) for i in self.generate_batch(arr, start_id, sample_size)[0]]

    def cross_attention(self, xs, ys, layer=-1):
        """Cross-attention probabilities of decoder block ``layer``, averaged over heads:
        xs (N, S) questions, ys (N, T) decoder inputs -> (N, T, S)."""
        xs = self._ids(xs, "xs")
        ys = self._ids(ys, "ys")
        attn = self.decoder[layer].cross_attn
        attn.keep_weights = True
        try:
            self._decode(ys, self.encode(xs))
            w = attn.attention_weights
        finally:
            attn.keep_weights = False
            attn.attention_weights = None
        return w.mean(axis=1)

    # -- vocabulary and translation
    def set_vocab(self, char_to_id, question_width, answer_width):
        """Attach the characters' ids and the widths used in training, for :meth:`translate`.

        question_width: the padded question length; answer_width: the answer length with its
        start symbol (``_``).
        """
        c2i = {str(c): int(i) for c, i in dict(char_to_id).items()}
        V = self.config["vocab_size"]
        if len(c2i) != V or sorted(c2i.values()) != list(range(V)):
            raise ValueError(f"char_to_id must map {V} characters to the ids 0..{V - 1}")
        long = [c for c in c2i if len(c) != 1]
        if long:
            raise ValueError(f"char_to_id must map single characters, got {long[0]!r}")
        if "_" not in c2i:
            raise ValueError("char_to_id must contain the start symbol '_'")
        question_width = _positive_int(int(question_width), "question_width")
        answer_width = _positive_int(int(answer_width), "answer_width")
        max_len = self.config["max_len"]
        if question_width > max_len or answer_width - 1 > max_len:
            raise ValueError(f"question_width {question_width} and answer_width - 1 "
                             f"{answer_width - 1} must be at most max_len {max_len}")
        self.char_to_id = c2i
        self.id_to_char = {i: c for c, i in c2i.items()}
        self.question_width = question_width
        self.answer_width = answer_width

    def translate(self, questions):
        """Answers for questions given as plain text (unpadded, not reversed): list[str] ->
        list[str], each without the start symbol and without trailing padding.

        Raises ValueError naming characters outside the vocabulary, an empty question or one
        longer than the question width.
        """
        if self.char_to_id is None:
            raise RuntimeError("the model has no vocabulary; call set_vocab or use load_model")
        from dataset.sequence import decode, encode

        if isinstance(questions, str):
            raise TypeError("questions must be a list of strings, not one string")
        questions = list(questions)
        for i, q in enumerate(questions):
            if isinstance(q, str) and not q.strip():
                raise ValueError(f"questions[{i}] is empty")
        if not questions:
            return []
        xs = encode(questions, self.char_to_id, self.question_width)
        ids = self.generate_batch(xs, self.char_to_id["_"], self.answer_width - 1)
        return [decode(row, self.id_to_char).rstrip(" ") for row in ids]
