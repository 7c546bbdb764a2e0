"""A small encoder-decoder Transformer from book-style layers, on fastattn's attention kernels.

Every layer here follows the book's conventions: ``self.params`` and ``self.grads`` are flat
lists of arrays of the same shapes, ``forward`` keeps what ``backward`` needs, ``backward``
writes the gradients in place (``self.grads[i][...] = ...``) and returns the input gradient(s);
``backward`` before ``forward`` raises ``RuntimeError``. Layers that create weights take
``dtype=np.float32`` (float64 for gradient checks) and ``seed=None``; ``backend=None`` runs
the kernels of the backend in force when ``forward`` is called, and ``backward`` runs on the
backend its forward ran on (the helpers of :mod:`fastattn._layer`).

Attention runs on the fused kernels ``attention_forward``/``attention_backward`` (the (Tq, Tk)
score matrix is never kept); the affine maps, layer norm and ReLU are NumPy on 2-D
``(B*T, C)`` views, so each matrix product is one BLAS call.

The blocks are pre-LN (``x + f(LayerNorm(x))``), and the encoder and decoder end with a final
LayerNorm. ``TransformerSeq2seq`` has the book's seq2seq interface (``forward(xs, ts)`` with
teacher forcing, ``backward()``, ``generate``), so the book's ``Trainer`` and ``eval_seq2seq``
work on it.
"""

from __future__ import annotations

import numpy as np

from fastattn import _checks
from fastattn._layer import (
    add_to,
    check_backend,
    check_dtype,
    collect_params,
    colsum,
    dout_array,
    float_input,
    make_rng,
    not_yet,
    positive_int,
    rowsum,
    sequence_input,
    spawn_seeds,
    uniform,
)
from fastattn.attention import MultiHeadAttention
from fastattn.layers import TimeAffine, TimeEmbedding, TimeSoftmaxWithLoss

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "LayerNorm",
    "PositionalEncoding",
    "TransformerSeq2seq",
]


# --------------------------------------------------------------------------- LayerNorm


class LayerNorm:
    """Layer normalisation over the last axis: y = (x - mean) / sqrt(var + eps) * g + b.

    LayerNorm(d_model, eps=1e-5); x (..., d_model) -> same shape; backward(dout) -> dx.
    params [g (d_model,), b (d_model,)], g initialised to ones and b to zeros.
    """

    def __init__(self, d_model, eps=1e-5, *, backend=None, dtype=np.float32, seed=None):
        d_model = positive_int(d_model, "d_model")
        dt = check_dtype(dtype)
        self.eps = float(eps)
        self.backend = check_backend(backend)  # no kernels here; kept for a uniform API
        self.params = [np.ones(d_model, dt), np.zeros(d_model, dt)]
        self.grads = [np.zeros(d_model, dt), np.zeros(d_model, dt)]
        self.cache = None

    def forward(self, x):
        g, b = self.params
        C = g.shape[0]
        x = float_input(x, "x", g.dtype)
        if x.shape[-1] != C:
            raise ValueError(f"x must be an array with last dimension {C}, got {x.shape}")
        t = g.dtype.type
        x2 = x.reshape(-1, C)  # (N, C)
        mu = rowsum(x2)  # (N,)
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
            raise not_yet(self)
        xhat, rstd, shape = self.cache
        g = self.params[0]
        C = g.shape[0]
        t = g.dtype.type
        dy = dout_array(dout, shape, g.dtype).reshape(-1, C)  # (N, C)
        self.grads[0][...] = np.einsum("ij,ij->j", dy, xhat)  # (C,)
        colsum(dy, out=self.grads[1])  # (C,)
        dxhat = dy * g  # (N, C)
        a = rowsum(dxhat)  # (N,)
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
            self.grads[0][offset:offset + shape[1]] = dout.sum(axis=0)
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
        W1, b1, W2, b2 = self.params
        x = sequence_input(x, "x", self.dtype, self.d_model)
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
            raise not_yet(self)
        x2, h, on, shape = self.cache
        W1, _, W2, _ = self.params
        dW1, db1, dW2, db2 = self.grads
        dy = dout_array(dout, shape, self.dtype).reshape(-1, self.d_model)  # (N, C)
        np.matmul(h.T, dy, out=dW2)  # (F, C)
        colsum(dy, out=db2)
        dh = dy @ W2.T  # (N, F)
        np.multiply(dh, on, out=dh)
        np.matmul(x2.T, dh, out=dW1)  # (C, F)
        colsum(dh, out=db1)
        return (dh @ W1.T).reshape(shape)


# --------------------------------------------------------------------------- blocks


class EncoderBlock:
    """Pre-LN encoder block: x + SelfAttn(LN(x)), then x + FFN(LN(x)). x (B, T, C) -> same.

    ``forward(x, mask=None)``; ``mask`` as in :class:`MultiHeadAttention`.
    """

    def __init__(self, d_model, n_heads, d_ff, *, backend=None, dtype=np.float32, seed=None):
        ss = spawn_seeds(seed, 2)
        kw = dict(backend=backend, dtype=dtype)
        self.ln1 = LayerNorm(d_model, **kw)
        self.attn = MultiHeadAttention(d_model, n_heads, **kw, seed=ss[0])
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
    ``backward(dout)`` -> (dx, dmemory).
    """

    def __init__(self, d_model, n_heads, d_ff, *, backend=None, dtype=np.float32, seed=None):
        ss = spawn_seeds(seed, 3)
        kw = dict(backend=backend, dtype=dtype)
        self.ln1 = LayerNorm(d_model, **kw)
        self.self_attn = MultiHeadAttention(d_model, n_heads, causal=True, **kw, seed=ss[0])
        self.ln2 = LayerNorm(d_model, **kw)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, **kw, seed=ss[1])
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
        V = positive_int(vocab_size, "vocab_size")
        C = positive_int(d_model, "d_model")
        n_heads = positive_int(n_heads, "n_heads")
        n_layers = positive_int(n_layers, "n_layers")
        d_ff = positive_int(d_ff, "d_ff")
        max_len = positive_int(max_len, "max_len")
        if C % n_heads:
            raise ValueError(f"d_model ({C}) must be a multiple of n_heads ({n_heads})")
        dt = check_dtype(dtype)
        self.backend = check_backend(backend)
        self.config = dict(vocab_size=V, d_model=C, n_heads=n_heads, n_layers=n_layers,
                           d_ff=d_ff, max_len=max_len, pos=pos, dtype=dt.name)
        self.dtype = dt
        ss = spawn_seeds(seed, 5 + 2 * n_layers)
        kw = dict(backend=backend, dtype=dt)
        emb_std = 1.0
        self.src_embed = TimeEmbedding(
            make_rng(ss[0]).normal(0.0, emb_std, (V, C)).astype(dt), backend=backend)
        self.tgt_embed = TimeEmbedding(
            make_rng(ss[1]).normal(0.0, emb_std, (V, C)).astype(dt), backend=backend)
        self.src_pos = PositionalEncoding(max_len, C, pos, **kw, seed=ss[2])
        self.tgt_pos = PositionalEncoding(max_len, C, pos, **kw, seed=ss[3])
        self.encoder = [EncoderBlock(C, n_heads, d_ff, **kw, seed=ss[4 + i])
                        for i in range(n_layers)]
        self.enc_ln = LayerNorm(C, **kw)
        self.decoder = [DecoderBlock(C, n_heads, d_ff, **kw, seed=ss[4 + n_layers + i])
                        for i in range(n_layers)]
        self.dec_ln = LayerNorm(C, **kw)
        self.out = TimeAffine(uniform(make_rng(ss[-1]), (C, V), C, dt), np.zeros(V, dt),
                              backend=backend)
        self.loss_layer = TimeSoftmaxWithLoss(backend=backend)

        named = [("src_embed", self.src_embed), ("tgt_embed", self.tgt_embed),
                 ("src_pos", self.src_pos), ("tgt_pos", self.tgt_pos)]
        named += [(f"encoder.{i}", b) for i, b in enumerate(self.encoder)]
        named += [("enc_ln", self.enc_ln)]
        named += [(f"decoder.{i}", b) for i, b in enumerate(self.decoder)]
        named += [("dec_ln", self.dec_ln), ("out", self.out)]
        self.params, self.grads = collect_params(layer for _, layer in named)
        self.param_names = [f"{name}.{j}" for name, layer in named
                            for j in range(len(layer.params))]
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
            raise not_yet(self)
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
        question_width = positive_int(int(question_width), "question_width")
        answer_width = positive_int(int(answer_width), "answer_width")
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
