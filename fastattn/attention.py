"""Multi-head attention for the Transformer, on fastattn's fused attention kernels.

The layer follows the book's conventions (see :mod:`fastattn.transformer`): ``params`` and
``grads`` are flat lists, ``backward`` writes the gradients in place and returns the input
gradient(s). The (Tq, Tk) score matrix is never kept: ``attention_forward`` and
``attention_backward`` work on tiles; the projections are NumPy products on 2-D ``(B*T, C)``
views.
"""

from __future__ import annotations

import math

import numpy as np

from fastattn import _attention_args, _backend, _checks
from fastattn._layer import (
    check_backend,
    check_dtype,
    colsum,
    dout_array,
    float_input,
    forward_backend,
    make_rng,
    not_yet,
    positive_int,
    sequence_input,
    uniform,
)

__all__ = ["MultiHeadAttention"]


_FEW_ROWS = 2  # kernels._flash.FEW_ROWS (fastattn imports no kernel module at import time)


def _in_place(backend, Tq) -> bool:
    """Whether the fused kernels get the heads in place, as (B, H, T, dh) views of the
    projections' columns, with out and the gradients in (B, T, H, dh) order: no split or
    merge copies. The numba kernels can; up to kernels._flash.FEW_ROWS rows per sequence the
    forward's loops (no BLAS tiles) run faster on contiguous heads (decoding 2,000 questions:
    15% slower in place). Measured.

    Whatever the batch: small batches (a question or two) once took copies, which cost
    ``fastattn train`` a second compilation of the fused forward (the copies' layout), 6 of
    its 25 s of compiling, and decoding one question at a time ran as fast either way (100
    calls of ``generate_batch``, in one process, alternating: 78.5 ms with copies, 79.2 in
    place; two at a time 44.8 and 42.7 ms; Intel Xeon, Emerald Rapids)."""
    return backend == "numba" and Tq > _FEW_ROWS


def _flat_heads(a):
    """(B, H, T, dh) heads -> a contiguous (B*H, T, dh) copy."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[2], a.shape[3])


class MultiHeadAttention:
    """Multi-head scaled dot-product attention on the fused attention kernels.

    MultiHeadAttention(d_model, n_heads, causal=False, *, n_kv_heads=None, window=None,
    dropout=0.0).

    * ``n_kv_heads``: grouped-query attention, n_heads a multiple of it (None: n_heads; 1:
      multi-query); query head h reads key/value head h // (n_heads // n_kv_heads), and the
      key/value projections have n_kv_heads * d_head columns each. Keys and values are never
      copied per query head.
    * ``causal``: False, True or "top_left" (query i sees keys j <= i, decoder
      self-attention), "bottom_right" (j <= i + Tk - Tq: the queries are the last Tq of the
      Tk positions); anything else is a TypeError/ValueError.
    * ``window``: (left, right) ints >= 0 or None: query i sees keys i' - left .. i' + right,
      i' = i (i + Tk - Tq with "bottom_right"); with causal, right is 0; a sliding window.
      Generation (:meth:`step`) keeps to it.
    * ``dropout``: dropout on the attention probabilities while ``train_flg`` is True (the
      book's convention; set it False to evaluate); the keep decisions come from a hash of a
      fresh seed per forward, so the backward regenerates them.

    ``forward(x_q, x_kv=None, mask=None)``: self-attention when ``x_kv`` is None (queries, keys
    and values all from ``x_q``), cross-attention otherwise (queries from ``x_q``, keys and
    values from ``x_kv``). x_q (B, Tq, C), x_kv (B, Tk, C) -> (B, Tq, C). ``mask`` is None or
    a boolean array broadcastable to (B, Tq, Tk), True where a query may attend; a key-padding
    mask ``keep`` (B, Tk) is passed as ``keep[:, None, :]``. A query with nothing to attend
    to gets zeros.

    ``backward(dout)`` returns dx_q for self-attention, (dx_q, dx_kv) for cross-attention.

    params [W_in (C, C + 2 Ckv), b_in (C + 2 Ckv,), W_out (C, C), b_out (C,)] with
    Ckv = n_kv_heads * C / n_heads (C without grouping): columns 0:C of W_in give the queries,
    C:C+Ckv the keys, C+Ckv: the values (heads are consecutive blocks of C/n_heads).

    Set ``keep_weights = True`` to have ``forward`` also store the attention probabilities in
    ``attention_weights`` (B, n_heads, Tq, Tk), computed by the ``scores_forward`` and
    ``softmax_forward`` kernels (for plots; training does not need them).
    """

    def __init__(self, d_model, n_heads, causal=False, *, n_kv_heads=None, window=None,
                 dropout=0.0, backend=None, dtype=np.float32, seed=None):
        d_model = positive_int(d_model, "d_model")
        n_heads = positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        n_kv = n_heads if n_kv_heads is None else positive_int(n_kv_heads, "n_kv_heads")
        if n_heads % n_kv:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
        self.window = _attention_args.check_window(window)
        self.dropout = _attention_args.check_ratio(dropout, "dropout")
        dt = check_dtype(dtype)
        rng = make_rng(seed)
        C = d_model
        self.d_model, self.n_heads, self.d_head = C, n_heads, C // n_heads
        self.n_kv_heads = n_kv
        Ckv = n_kv * self.d_head
        causal = _attention_args.check_causal(causal)
        self.causal = True if causal == "top_left" else causal  # False, True, "bottom_right"
        self.backend = check_backend(backend)
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.params = [
            uniform(rng, (C, C + 2 * Ckv), C, dt), np.zeros(C + 2 * Ckv, dt),
            uniform(rng, (C, C), C, dt), np.zeros(C, dt),
        ]
        self.train_flg = True
        self._drop_rng = make_rng(None if seed is None else rng.integers(2**63))
        self.grads = [np.zeros_like(p) for p in self.params]
        self.dtype = dt
        self.keep_weights = False
        self.attention_weights = None
        self.cache = None

    # -- shape helpers: (B*T, n*C) rows <-> (n, B*H, T, dh) heads
    def _split(self, a2, B, T, n, H=None):
        H, dh = H or self.n_heads, self.d_head
        if T == 1:  # one position (decoding): fewer axes to move (none when n is 1)
            if n == 1:  # the heads of a row are consecutive: a copy, then a reshape
                return np.ascontiguousarray(a2).reshape(1, B * H, 1, dh)
            a = a2.reshape(B, n, H, dh).transpose(1, 0, 2, 3)  # (n, B, H, dh)
            return np.ascontiguousarray(a).reshape(n, B * H, 1, dh)
        a = a2.reshape(B, T, n, H, dh).transpose(2, 0, 3, 1, 4)  # (n, B, H, T, dh)
        return np.ascontiguousarray(a).reshape(n, B * H, T, dh)

    def _heads(self, a2, B, T, widths):
        """(B, Hi, T, dh) views of the consecutive column blocks (widths) of a2 (B*T, .), for
        the numba kernels, which read and write heads in place: no copies."""
        dh, c, views = self.d_head, 0, []
        for w in widths:
            views.append(a2[:, c:c + w].reshape(B, T, w // dh, dh).transpose(0, 2, 1, 3))
            c += w
        return views

    def _merge(self, o, B, T):
        dh = self.d_head
        if T == 1:  # one position (decoding): a reshape
            return np.ascontiguousarray(o).reshape(B, -1)
        o = o.reshape(B, -1, T, dh).transpose(0, 2, 1, 3)  # (B, T, H, dh)
        return np.ascontiguousarray(o).reshape(B * T, -1)

    def _features(self, train):
        """The kernels' keywords for window and (in training) dropout."""
        kw = {} if self.window is None else {"window": self.window}
        if train and self.dropout > 0:
            kw.update(dropout_p=self.dropout, seed=int(self._drop_rng.integers(2**63)))
        return kw

    def _causal(self, Tq, Tk):
        """The kernels' causal for Tq queries and Tk keys (bottom-right is top-left at Tq = Tk)."""
        return True if self.causal == "bottom_right" and Tq == Tk else self.causal

    def _mask(self, mask, B, Tq, Tk):
        if mask is None:
            return None
        if not isinstance(mask, np.ndarray):
            mask = _checks.as_array(mask, "mask")
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

    def _weights(self, backend, q, k, mask3, B, Tq, Tk):
        """Attention probabilities (B, H, Tq, Tk) by the scores and softmax kernels."""
        g = self.n_heads // self.n_kv_heads
        k = np.repeat(k, g, axis=0) if g > 1 else k  # a copy for the plot only
        s = _backend.kernel("scores_forward", backend)(q, k, self.scale)  # (B*H, Tq, Tk)
        allowed = np.ones((1, Tq, Tk), bool) if mask3 is None else mask3
        off = Tk - Tq if self.causal == "bottom_right" else 0  # query i sits at i + off
        delta = np.arange(Tk)[None, :] - np.arange(Tq)[:, None] - off  # j - (i + off)
        if self.causal:
            allowed = allowed & (delta <= 0)
        if self.window is not None:
            left, right = self.window
            allowed = allowed & (delta >= -(Tq + Tk if left is None else left)) & (
                delta <= (Tq + Tk if right is None else right))
        s = np.where(allowed, s, -np.inf).astype(s.dtype)
        p = _backend.kernel("softmax_forward", backend)(np.ascontiguousarray(s))
        return p.reshape(B, self.n_heads, Tq, Tk)

    def forward(self, x_q, x_kv=None, mask=None):
        y, self.cache = self._forward(x_q, x_kv, mask)
        return y

    def infer(self, x_q, x_kv=None, mask=None):
        """forward without keeping anything for backward or the plots (generation)."""
        return self._forward(x_q, x_kv, mask, keep=False)[0]

    def _forward(self, x_q, x_kv, mask, keep=True):
        W_in, b_in, W_out, b_out = self.params
        C = self.d_model
        backend = forward_backend(self)
        x_q = sequence_input(x_q, "x_q", self.dtype, C)
        B, Tq, _ = x_q.shape
        xq2 = x_q.reshape(B * Tq, C)
        Hkv = self.n_kv_heads
        Ckv = Hkv * self.d_head
        heads = _in_place(backend, Tq)
        add_bias = _backend.kernel("bias_add", backend)
        if x_kv is None:  # self-attention: one product for q, k and v
            Tk = Tq
            qkv = add_bias(xq2 @ W_in, b_in)  # (B*T, C + 2Ckv)
            if heads:
                q, k, v = self._heads(qkv, B, Tq, (C, Ckv, Ckv))
            elif Hkv == self.n_heads:
                q, k, v = self._split(qkv, B, Tq, 3)  # each (B*H, T, dh)
            else:
                q = self._split(qkv[:, :C], B, Tq, 1)[0]  # (B*H, T, dh)
                k, v = self._split(qkv[:, C:], B, Tq, 2, Hkv)  # (B*Hkv, T, dh)
            xkv2 = None
        else:
            x_kv = sequence_input(x_kv, "x_kv", self.dtype, C)
            if x_kv.shape[0] != B:
                raise ValueError(f"x_kv must have the batch size {B} of x_q, got {x_kv.shape}")
            Tk = x_kv.shape[1]
            xkv2 = x_kv.reshape(B * Tk, C)
            qp = add_bias(xq2 @ W_in[:, :C], b_in[:C])  # (B*Tq, C)
            kv = add_bias(xkv2 @ W_in[:, C:], b_in[C:])  # (B*Tk, 2C)
            if heads:
                (q,), (k, v) = self._heads(qp, B, Tq, (C,)), self._heads(kv, B, Tk, (Ckv, Ckv))
            else:
                q = self._split(qp, B, Tq, 1)[0]  # (B*H, Tq, dh)
                k, v = self._split(kv, B, Tk, 2, Hkv)  # (B*Hkv, Tk, dh)
        mask3 = self._mask(mask, B, Tq, Tk)
        feats = self._features(self.train_flg)
        att, lse = _backend.kernel("attention_forward", backend)(
            q, k, v, self.scale, self._causal(Tq, Tk), mask3, **feats)  # (B*H, Tq, dh), (B*H, Tq)
        if heads:  # a view of a (B, Tq, H, dh) array: the merge is a reshape
            a2 = att.transpose(0, 2, 1, 3).reshape(B * Tq, C)
        else:
            a2 = self._merge(att, B, Tq)  # (B*Tq, C)
        y = add_bias(a2 @ W_out, b_out)  # (B*Tq, C)
        if keep and self.keep_weights:
            qw, kw = (_flat_heads(a) for a in (q, k)) if heads else (q, k)
            self.attention_weights = self._weights(backend, qw, kw, mask3, B, Tq, Tk)
        return y.reshape(B, Tq, C), (backend, xq2, xkv2, q, k, v, att, lse, a2, mask3, B, Tq,
                                     Tk, feats)

    def backward(self, dout):
        if self.cache is None:
            raise not_yet(self)
        backend, xq2, xkv2, q, k, v, att, lse, a2, mask3, B, Tq, Tk, feats = self.cache
        W_in, _, W_out, _ = self.params
        dW_in, db_in, dW_out, db_out = self.grads
        C = self.d_model
        dy = dout_array(dout, (B, Tq, C), self.dtype).reshape(B * Tq, C)
        np.matmul(a2.T, dy, out=dW_out)  # (C, C)
        colsum(dy, out=db_out)
        backward = _backend.kernel("attention_backward", backend)
        if q.ndim == 4:  # heads in place: the kernel writes dq, dk, dv into their columns
            Ckv = self.n_kv_heads * self.d_head
            (da,) = self._heads(dy @ W_out.T, B, Tq, (C,))
            if xkv2 is None:
                dqkv = np.zeros((B * Tq, C + 2 * Ckv), self.dtype)
                grads = self._heads(dqkv, B, Tq, (C, Ckv, Ckv))
            else:
                dq2 = np.zeros((B * Tq, C), self.dtype)
                dkv = np.zeros((B * Tk, 2 * Ckv), self.dtype)
                grads = self._heads(dq2, B, Tq, (C,)) + self._heads(dkv, B, Tk, (Ckv, Ckv))
            backward(da, q, k, v, att, lse, self.scale, self._causal(Tq, Tk), mask3, grads=grads,
                     **feats)
        else:
            da = self._split(dy @ W_out.T, B, Tq, 1)[0]  # (B*H, Tq, dh)
            dq, dk, dv = backward(da, q, k, v, att, lse, self.scale, self._causal(Tq, Tk), mask3,
                                  **feats)
            if xkv2 is None:
                dqkv = self._merge_n((dq, dk, dv), B, Tq)  # (B*T, 3C)
            else:
                dq2 = self._merge(dq, B, Tq)  # (B*Tq, C)
                dkv = self._merge_n((dk, dv), B, Tk)  # (B*Tk, 2Ckv)
        if xkv2 is None:
            np.matmul(xq2.T, dqkv, out=dW_in)
            colsum(dqkv, out=db_in)
            return (dqkv @ W_in.T).reshape(B, Tq, C)
        np.matmul(xq2.T, dq2, out=dW_in[:, :C])
        np.matmul(xkv2.T, dkv, out=dW_in[:, C:])
        colsum(dq2, out=db_in[:C])
        colsum(dkv, out=db_in[C:])
        dx_q = (dq2 @ W_in[:, :C].T).reshape(B, Tq, C)
        dx_kv = (dkv @ W_in[:, C:].T).reshape(B, Tk, C)
        return dx_q, dx_kv

    def _merge_n(self, parts, B, T):
        """n arrays (B*Hi, T, dh) -> (B*T, sum of Hi*dh), the inverse of _split."""
        dh = self.d_head
        widths = [a.shape[0] // B * dh for a in parts]
        out = np.empty((B, T, sum(widths)), parts[0].dtype)
        c = 0
        for a, w in zip(parts, widths, strict=True):
            out[:, :, c:c + w].reshape(B, T, w // dh, dh)[...] = (
                a.reshape(B, w // dh, T, dh).transpose(0, 2, 1, 3))
            c += w
        return out.reshape(B * T, -1)

    # -- inference without a backward: cached keys and values
    def project_kv(self, x_kv):
        """Keys and values of ``x_kv`` (B, Tk, C) for cross-attention: (k, v), each
        (B*H, Tk, dh), to pass to :meth:`attend` many times."""
        W_in, b_in, _, _ = self.params
        C = self.d_model
        x_kv = sequence_input(x_kv, "x_kv", self.dtype, C)
        B, Tk, _ = x_kv.shape
        kv = x_kv.reshape(B * Tk, C) @ W_in[:, C:]
        kv += b_in[C:]
        k, v = self._split(kv, B, Tk, 2, self.n_kv_heads)
        return k, v

    def _kv_input(self, k, v, B, names=("k", "v")):
        """Keys and values as :meth:`project_kv` makes them for a batch of ``B``: two arrays
        (B*n_kv_heads, Tk, d_head) of one shape with Tk >= 1, cast to the layer's dtype;
        TypeError/ValueError naming them otherwise (the kernels trust their shapes)."""
        want = (B * self.n_kv_heads, self.d_head)
        out = []
        for name, a in zip(names, (k, v), strict=True):
            a = float_input(a, name, self.dtype, ndim_min=3)
            if a.ndim != 3 or (a.shape[0], a.shape[2]) != want or a.shape[1] == 0:
                raise ValueError(f"{name} must have shape (B*n_kv_heads, Tk, d_head) = "
                                 f"({want[0]}, Tk >= 1, {want[1]}), got {a.shape}")
            out.append(a)
        if out[1].shape != out[0].shape:
            raise ValueError(f"{names[1]} must have the shape of {names[0]} {out[0].shape}, "
                             f"got {out[1].shape}")
        return out

    def attend(self, x_q, k, v, causal=False, window=None):
        """Attention of x_q (B, Tq, C) to precomputed keys and values (from :meth:`project_kv`
        or :meth:`step`) -> (B, Tq, C). Keeps nothing for backward. ``causal`` and ``window``
        as for :func:`fastattn.attention_forward`."""
        W_in, b_in, _, _ = self.params
        C = self.d_model
        x_q = sequence_input(x_q, "x_q", self.dtype, C)
        B, Tq, _ = x_q.shape
        k, v = self._kv_input(k, v, B)
        causal = _attention_args.check_causal(causal)
        causal = True if causal == "top_left" else causal  # the kernels' form
        window = _attention_args.check_window(window, Tq + k.shape[1])
        qp = x_q.reshape(B * Tq, C) @ W_in[:, :C]
        qp += b_in[:C]
        return self._attend(qp, B, Tq, k, v, causal, window)

    def _attend(self, qp, B, Tq, k, v, causal, window):
        """attend from the projected queries qp (B*Tq, C)."""
        _, _, W_out, b_out = self.params
        C = self.d_model
        kw = {} if window is None else {"window": window}
        q = self._split(qp, B, Tq, 1)[0]
        att, _ = _backend.kernel("attention_forward", self.backend)(
            q, k, v, self.scale, causal, None, **kw)
        y = self._merge(att, B, Tq) @ W_out
        y += b_out
        return y.reshape(B, Tq, C)

    def step(self, x_new, cache: dict):
        """One step of causal self-attention for generation: x_new (B, 1, C) is the newest
        position; ``cache`` (a dict, empty at the first step) keeps the keys and values of
        the earlier positions and receives the new ones. Returns (B, 1, C)."""
        W_in, b_in, _, _ = self.params
        C = self.d_model
        x_new = sequence_input(x_new, "x_new", self.dtype, C)
        B = x_new.shape[0]
        if x_new.shape[1] != 1:
            raise ValueError(f"x_new must have shape (B, 1, {C}), got {x_new.shape}")
        if not isinstance(cache, dict):
            raise TypeError(f"cache must be a dict, got {type(cache).__name__}")
        if cache:
            cached = self._kv_input(cache.get("k"), cache.get("v"), B,
                                   ("cache['k']", "cache['v']"))
        qkv = x_new.reshape(B, C) @ W_in  # one product for the query, key and value
        qkv += b_in
        Hkv, dh = self.n_kv_heads, self.d_head
        Ckv = Hkv * dh
        k_new = qkv[:, C:C + Ckv].reshape(B, Hkv, 1, dh)  # views: the copies come next
        v_new = qkv[:, C + Ckv:].reshape(B, Hkv, 1, dh)
        if cache:  # (B*Hkv, t, dh) -> (B*Hkv, t+1, dh), the new position last
            t = cached[0].shape[1]
            k = np.concatenate([cached[0].reshape(B, Hkv, t, dh), k_new], axis=2)
            v = np.concatenate([cached[1].reshape(B, Hkv, t, dh), v_new], axis=2)
        else:
            k, v = np.ascontiguousarray(k_new), np.ascontiguousarray(v_new)
        k, v = k.reshape(B * Hkv, -1, dh), v.reshape(B * Hkv, -1, dh)
        cache["k"], cache["v"] = k, v
        if self.window is None:
            return self._attend(qkv[:, :C], B, 1, k, v, False, None)
        # the newest position is the last query: bottom-right alignment puts it at t
        return self._attend(qkv[:, :C], B, 1, k, v, "bottom_right", self.window)
