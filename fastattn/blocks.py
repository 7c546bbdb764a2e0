"""The layers of the Transformer's blocks, book-style: layer norm, positions, feed-forward, and
the pre-LN encoder and decoder blocks (multi-head attention is :mod:`fastattn.attention`).

Every layer follows the book's conventions: ``self.params`` and ``self.grads`` are flat lists
of arrays of the same shapes, ``forward`` keeps what ``backward`` needs, ``backward`` writes the
gradients in place (``self.grads[i][...] = ...``) and returns the input gradient(s); ``backward``
before ``forward`` raises ``RuntimeError``. Layers that create weights take ``dtype=np.float32``
(float64 for gradient checks) and ``seed=None``; ``backend=None`` runs the kernels of the backend
in force when ``forward`` is called, and ``backward`` runs on the backend its forward ran on (the
helpers of :mod:`fastattn._layer`).

The affine maps, layer norm and ReLU are NumPy on 2-D ``(B*T, C)`` views, so each matrix product
is one BLAS call. The blocks are pre-LN: ``x + f(LayerNorm(x))``.
"""

from __future__ import annotations

import math

import numpy as np

from fastattn import _backend, _checks
from fastattn._layer import (
    add_to,
    check_backend,
    check_dtype,
    collect_params,
    colsum,
    dout_array,
    float_input,
    forward_backend,
    make_rng,
    not_yet,
    positive_int,
    sequence_input,
    spawn_seeds,
    uniform,
)
from fastattn.attention import MultiHeadAttention

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "LayerNorm",
    "PositionalEncoding",
    "sinusoidal_table",
]


# --------------------------------------------------------------------------- LayerNorm


def _eps(eps, dtype) -> float:
    """A LayerNorm's eps: a real number > 0 also in ``dtype`` (the kernels add it to a
    variance that may be 0 and divide by its square root), else TypeError/ValueError."""
    eps = _checks.scalar(eps)
    if not _checks.is_real(eps):
        raise TypeError(f"eps must be a real number > 0, got {type(eps).__name__}")
    e = _checks.to_float(eps)
    if not (math.isfinite(e) and dtype.type(e) > 0):
        raise ValueError(f"eps must be a finite number > 0 in {dtype.name}, got {eps!r}")
    return e


class LayerNorm:
    """Layer normalisation over the last axis: y = (x - mean) / sqrt(var + eps) * g + b.

    LayerNorm(d_model, eps=1e-5); x (..., d_model) -> same shape; backward(dout) -> dx.
    params [g (d_model,), b (d_model,)], g initialised to ones and b to zeros.
    """

    def __init__(self, d_model, eps=1e-5, *, backend=None, dtype=np.float32, seed=None):
        d_model = positive_int(d_model, "d_model")
        dt = check_dtype(dtype)
        self.eps = _eps(eps, dt)
        self.backend = check_backend(backend)
        self.params = [np.ones(d_model, dt), np.zeros(d_model, dt)]
        self.grads = [np.zeros(d_model, dt), np.zeros(d_model, dt)]
        self.cache = None

    def forward(self, x):
        y, self.cache = self._forward(x)  # the row statistics, for backward
        return y

    def infer(self, x):
        """forward without keeping anything for backward (generation)."""
        return self._forward(x)[0]

    def _forward(self, x):
        g, b = self.params
        C = g.shape[0]
        x = float_input(x, "x", g.dtype)
        if x.shape[-1] != C:
            raise ValueError(f"x must be an array with last dimension {C}, got {x.shape}")
        backend = forward_backend(self)
        x2 = x.reshape(-1, C)  # (N, C)
        y, mean, rstd = _backend.kernel("layernorm_forward", backend)(x2, g, b, self.eps)
        return y.reshape(x.shape), (x2, mean, rstd, x.shape, backend)

    def backward(self, dout):
        if self.cache is None:
            raise not_yet(self)
        x2, mean, rstd, shape, backend = self.cache
        g = self.params[0]
        dy = dout_array(dout, shape, g.dtype).reshape(x2.shape)  # (N, C)
        dx, dg, db = _backend.kernel("layernorm_backward", backend)(dy, x2, g, mean, rstd)
        self.grads[0][...] = dg
        self.grads[1][...] = db
        return dx.reshape(shape)


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
        max_len = positive_int(max_len, "max_len")
        d_model = positive_int(d_model, "d_model")
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        dt = check_dtype(dtype)
        self.kind = kind
        self.max_len = max_len
        self.d_model = d_model
        self.backend = check_backend(backend)
        self.fixed = None if kind == "learned" else sinusoidal_table(max_len, d_model, dt)
        if kind == "sinusoidal":
            self.params, self.grads = [], []
        else:
            P = (np.zeros((max_len, d_model)) if kind == "both"
                 else make_rng(seed).normal(0.0, 0.1, (max_len, d_model))).astype(dt)
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
        x = sequence_input(x, "x", self.dtype, self.d_model)
        T = x.shape[1]
        out = x + self.table(T, offset)  # (B, T, C)
        self.cache = (x.shape, offset)
        return out

    def backward(self, dout):
        if self.cache is None:
            raise not_yet(self)
        shape, offset = self.cache
        dout = dout_array(dout, shape, self.dtype)
        if self.params:
            self.grads[0][...] = 0
            rows = self.grads[0][offset:offset + shape[1]]  # contiguous rows: a view
            colsum(dout.reshape(shape[0], -1), out=rows.reshape(-1))  # one BLAS call, not sum
        return dout

# --------------------------------------------------------------------------- feed-forward


class FeedForward:
    """Position-wise feed-forward: relu(x W1 + b1) W2 + b2. x (B, T, C) -> (B, T, C).

    FeedForward(d_model, d_ff); params [W1 (C, F), b1 (F,), W2 (F, C), b2 (C,)].
    """

    def __init__(self, d_model, d_ff, *, backend=None, dtype=np.float32, seed=None):
        C = positive_int(d_model, "d_model")
        F = positive_int(d_ff, "d_ff")
        dt = check_dtype(dtype)
        rng = make_rng(seed)
        self.backend = check_backend(backend)
        self.params = [uniform(rng, (C, F), C, dt), np.zeros(F, dt),
                       uniform(rng, (F, C), F, dt), np.zeros(C, dt)]
        self.grads = [np.zeros_like(p) for p in self.params]
        self.d_model, self.d_ff, self.dtype = C, F, dt
        self.cache = None

    def forward(self, x):
        y, self.cache = self._forward(x)
        return y

    def infer(self, x):
        """forward without keeping anything for backward (generation)."""
        return self._forward(x)[0]

    def _forward(self, x):
        W1, b1, W2, b2 = self.params
        x = sequence_input(x, "x", self.dtype, self.d_model)
        backend = forward_backend(self)
        x2 = x.reshape(-1, self.d_model)  # (N, C)
        h = _backend.kernel("bias_relu_forward", backend)(x2 @ W1, b1)  # (N, F)
        y = _backend.kernel("bias_add", backend)(h @ W2, b2)  # (N, C)
        return y.reshape(x.shape), (x2, h, x.shape, backend)

    def backward(self, dout):
        if self.cache is None:
            raise not_yet(self)
        x2, h, shape, backend = self.cache
        W1, _, W2, _ = self.params
        dW1, db1, dW2, db2 = self.grads
        dy = dout_array(dout, shape, self.dtype).reshape(-1, self.d_model)  # (N, C)
        np.matmul(h.T, dy, out=dW2)  # (F, C)
        colsum(dy, out=db2)
        dh, db1[...] = _backend.kernel("bias_relu_backward", backend)(dy @ W2.T, h)  # (N, F)
        np.matmul(x2.T, dh, out=dW1)  # (C, F)
        return (dh @ W1.T).reshape(shape)


# --------------------------------------------------------------------------- blocks


class EncoderBlock:
    """Pre-LN encoder block: x + SelfAttn(LN(x)), then x + FFN(LN(x)). x (B, T, C) -> same.

    ``forward(x, mask=None)``; ``mask`` as in :class:`MultiHeadAttention`. ``n_kv_heads``,
    ``window`` and ``dropout`` go to the self-attention.
    """

    def __init__(self, d_model, n_heads, d_ff, *, n_kv_heads=None, window=None, dropout=0.0,
                 backend=None, dtype=np.float32, seed=None):
        ss = spawn_seeds(seed, 2)
        kw = dict(backend=backend, dtype=dtype)
        self.ln1 = LayerNorm(d_model, **kw)
        self.attn = MultiHeadAttention(d_model, n_heads, n_kv_heads=n_kv_heads, window=window,
                                       dropout=dropout, **kw, seed=ss[0])
        self.ln2 = LayerNorm(d_model, **kw)
        self.ffn = FeedForward(d_model, d_ff, **kw, seed=ss[1])
        self.layers = [self.ln1, self.attn, self.ln2, self.ffn]
        self.params, self.grads = collect_params(self.layers)
        self._ran = False

    def forward(self, x, mask=None):
        x = add_to(self.attn.forward(self.ln1.forward(x), mask=mask), x)
        x = add_to(self.ffn.forward(self.ln2.forward(x)), x)
        self._ran = True
        return x

    def infer(self, x, mask=None):
        """forward without keeping anything for backward (generation)."""
        x = add_to(self.attn.infer(self.ln1.infer(x), mask=mask), x)
        return add_to(self.ffn.infer(self.ln2.infer(x)), x)

    def backward(self, dout):
        if not self._ran:
            raise not_yet(self)
        dx = add_to(self.ln2.backward(self.ffn.backward(dout)), dout)
        dx += self.ln1.backward(self.attn.backward(dx))
        return dx


class DecoderBlock:
    """Pre-LN decoder block: x + CausalSelfAttn(LN(x)), x + CrossAttn(LN(x), memory),
    x + FFN(LN(x)).

    ``forward(x, memory, mask=None)``: x (B, T, C), memory (B, S, C) -> (B, T, C); ``mask``
    (broadcastable to (B, T, S)) applies to the cross-attention.
    ``backward(dout)`` -> (dx, dmemory). ``n_kv_heads`` and ``dropout`` go to both
    attentions, ``window`` to the self-attention.
    """

    def __init__(self, d_model, n_heads, d_ff, *, n_kv_heads=None, window=None, dropout=0.0,
                 backend=None, dtype=np.float32, seed=None):
        ss = spawn_seeds(seed, 3)
        kw = dict(backend=backend, dtype=dtype)
        att = dict(n_kv_heads=n_kv_heads, dropout=dropout, **kw)
        self.ln1 = LayerNorm(d_model, **kw)
        self.self_attn = MultiHeadAttention(d_model, n_heads, causal=True, window=window, **att,
                                            seed=ss[0])
        self.ln2 = LayerNorm(d_model, **kw)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, **att, seed=ss[1])
        self.ln3 = LayerNorm(d_model, **kw)
        self.ffn = FeedForward(d_model, d_ff, **kw, seed=ss[2])
        self.layers = [self.ln1, self.self_attn, self.ln2, self.cross_attn, self.ln3, self.ffn]
        self.params, self.grads = collect_params(self.layers)
        self._ran = False

    def forward(self, x, memory, mask=None):
        x = add_to(self.self_attn.forward(self.ln1.forward(x)), x)
        x = add_to(self.cross_attn.forward(self.ln2.forward(x), memory, mask=mask), x)
        x = add_to(self.ffn.forward(self.ln3.forward(x)), x)
        self._ran = True
        return x

    def backward(self, dout):
        if not self._ran:
            raise not_yet(self)
        dx = add_to(self.ln3.backward(self.ffn.backward(dout)), dout)
        dq, dmemory = self.cross_attn.backward(dx)
        dx += self.ln2.backward(dq)
        dx += self.ln1.backward(self.self_attn.backward(dx))
        return dx, dmemory

    def step(self, x_new, k_mem, v_mem, cache: dict):
        """One generation step for the newest position x_new (B, 1, C), with the memory's
        cross-attention keys/values (from ``cross_attn.project_kv``) and the self-attention
        cache (a dict). Keeps nothing for backward."""
        x = x_new + self.self_attn.step(self.ln1.infer(x_new), cache)
        x = x + self.cross_attn.attend(self.ln2.infer(x), k_mem, v_mem)
        return x + self.ffn.infer(self.ln3.infer(x))

    def stepper(self, k_mem, v_mem, B: int, n_steps: int):
        """A function ``step(x, t)`` for greedy decoding: the newest position x (B, C), a
        C-contiguous array of the block's dtype, at position t = 0, 1, ... n_steps - 1 (one
        call each, in order) -> (B, C). It does :meth:`step`'s arithmetic in its order, so
        its results are the same bits, with less Python around it: each layer's kernels
        looked up once, no input checks (its caller's arrays are already right) and the keys
        and values of the positions so far kept in arrays made once. A decoding step of a
        small model is a few microseconds of arithmetic per layer; the Python around it
        costs more than that. ``k_mem`` and ``v_mem`` (as for :meth:`step`), ``B`` and
        ``n_steps`` are checked here, once."""
        sa, ca, ffn = self.self_attn, self.cross_attn, self.ffn
        B = positive_int(B, "B")
        n_steps = _checks.int_at_least(n_steps, "n_steps", 0)
        k_mem, v_mem = ca._kv_input(k_mem, v_mem, B, ("k_mem", "v_mem"))
        C, Hkv, dh = sa.d_model, sa.n_kv_heads, sa.d_head
        Ckv = Hkv * dh
        norms = [(_backend.kernel("layernorm_forward", forward_backend(n)), *n.params, n.eps)
                 for n in (self.ln1, self.ln2, self.ln3)]
        relu = _backend.kernel("bias_relu_forward", forward_backend(ffn))
        W_in, b_in = sa.params[:2]
        Wq_x, bq_x = ca.params[0][:, :C], ca.params[1][:C]  # the cross-attention's queries
        W1, b1, W2, b2 = ffn.params
        keys = np.empty((B * Hkv, n_steps, dh), sa.dtype)
        values = np.empty_like(keys)
        self_kw = ({}, False) if sa.window is None else ({"window": sa.window}, "bottom_right")

        def norm(i, x):
            ln, g, b, eps = norms[i]
            return ln(x, g, b, eps)[0]

        def attending(att):  # MultiHeadAttention._attend at T = 1
            kernel = _backend.kernel("attention_forward", forward_backend(att))
            H, d_head, (W_out, b_out) = att.n_heads, att.d_head, att.params[2:]

            def attention(q2, k, v, kw, causal):
                q = np.ascontiguousarray(q2).reshape(B * H, 1, d_head)
                o, _ = kernel(q, k, v, att.scale, causal, None, **kw)
                y = o.reshape(B, -1) @ W_out
                y += b_out
                return y

            return attention

        self_attention, cross_attention = attending(sa), attending(ca)

        def step(x, t):
            qkv = norm(0, x) @ W_in  # self-attention: the query, key and value
            qkv += b_in
            keys[:, t] = qkv[:, C:C + Ckv].reshape(B * Hkv, dh)
            values[:, t] = qkv[:, C + Ckv:].reshape(B * Hkv, dh)
            k = np.ascontiguousarray(keys[:, :t + 1])
            v = np.ascontiguousarray(values[:, :t + 1])
            x = x + self_attention(qkv[:, :C], k, v, *self_kw)
            qp = norm(1, x) @ Wq_x  # cross-attention to the memory's keys and values
            qp += bq_x
            x = x + cross_attention(qp, k_mem, v_mem, {}, False)
            y = relu(norm(2, x) @ W1, b1) @ W2  # feed-forward
            y += b2
            return x + y

        return step
