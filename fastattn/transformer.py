"""A small encoder-decoder Transformer with the book's seq2seq interface, on fastattn's kernels.

:class:`TransformerConfig` says what the model is (sizes, positions, dtype); its defaults are
the model of ``fastattn train``. :class:`TransformerSeq2seq` is built from book-style layers:
embeddings and the output affine of :mod:`fastattn.layers`, the blocks of
:mod:`fastattn.blocks` (pre-LN encoder and decoder blocks, ending with a final LayerNorm each)
and the multi-head attention of :mod:`fastattn.attention`, which runs on the fused kernels
``attention_forward``/``attention_backward`` (the (Tq, Tk) score matrix is never kept).

``TransformerSeq2seq`` has the book's seq2seq interface (``forward(xs, ts)`` with teacher
forcing, ``backward()``, ``generate``), so the book's ``Trainer`` and ``eval_seq2seq`` work on
it. It works on token ids only; the characters behind them live in :mod:`fastattn.vocab`.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass

import numpy as np

from fastattn import _attention_args, _backend, _checks, _threads
from fastattn._layer import (
    check_backend,
    check_dtype,
    collect_params,
    forward_backend,
    make_rng,
    not_yet,
    positive_int,
    spawn_seeds,
    uniform,
)
from fastattn.blocks import (
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    LayerNorm,
    PositionalEncoding,
    sinusoidal_table,
)
from fastattn.layers import TimeAffine, TimeEmbedding, TimeSoftmaxWithLoss

_GENERATE_ROWS = 256  # generate_batch decodes at most this many questions at a time

__all__ = [  # the blocks too, which this module offered before they had a module of their own
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "LayerNorm",
    "PositionalEncoding",
    "TransformerConfig",
    "TransformerSeq2seq",
    "sinusoidal_table",
]


@dataclass(frozen=True)
class TransformerConfig:
    """The arguments that build a :class:`TransformerSeq2seq` (all but backend and seed).

    ``n_layers`` encoder and ``n_layers`` decoder blocks; ``pos`` is the kind of
    :class:`~fastattn.blocks.PositionalEncoding` (the default, the sinusoidal table plus a
    learned correction, generalises to positions that are rare in training much better than
    learned positions alone); ``dtype`` the name of the weights' dtype. The defaults are the
    model of ``fastattn train`` (>= 99.9% exact match on the date task). ``n_kv_heads``
    (grouped keys and values), ``window`` (the self-attentions') and ``dropout`` (attention
    probabilities, while each attention's ``train_flg`` is True) are those of
    :class:`~fastattn.attention.MultiHeadAttention`. Checked when made: TypeError for a size
    that is not an int or a dtype other than float32/float64, ValueError for a size below 1, a
    d_model that n_heads does not divide, an unknown pos, or a bad attention option.
    """

    vocab_size: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    d_ff: int = 256
    max_len: int = 32
    pos: str = "both"
    dtype: str = "float32"
    n_kv_heads: int | None = None
    window: tuple | None = None
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            object.__setattr__(self, name, positive_int(getattr(self, name), name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads "
                             f"({self.n_heads})")
        if self.pos not in PositionalEncoding.KINDS:
            raise ValueError(f"pos must be one of {PositionalEncoding.KINDS}, got {self.pos!r}")
        object.__setattr__(self, "dtype", check_dtype(self.dtype).name)
        if self.n_kv_heads is not None:
            object.__setattr__(self, "n_kv_heads", positive_int(self.n_kv_heads, "n_kv_heads"))
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                                 f"({self.n_kv_heads})")
        object.__setattr__(self, "window", _attention_args.check_window(self.window))
        object.__setattr__(self, "dropout",
                           _attention_args.check_ratio(self.dropout, "dropout"))

    def as_dict(self) -> dict:
        """The fields as JSON values; the attention options only where they are not the
        defaults, so that the default model's stored configuration stays as it was."""
        d = asdict(self)
        for name, default in (("n_kv_heads", None), ("window", None), ("dropout", 0.0)):
            if d[name] == default:
                del d[name]
        if "window" in d:
            d["window"] = list(d["window"])
        return d


class TransformerSeq2seq:
    """An encoder-decoder Transformer with the book's seq2seq interface.

    TransformerSeq2seq(vocab_size, d_model=64, n_heads=4, n_layers=1, d_ff=256, max_len=32,
    pos="both", *, n_kv_heads=None, window=None, dropout=0.0, backend=None, dtype=np.float32,
    seed=None): the arguments and defaults of :class:`TransformerConfig`, plus the backend and
    the seed of the initial weights.

    * ``forward(xs, ts)`` -> mean cross-entropy loss (a float) with teacher forcing: xs (N, S)
      question ids, ts (N, T+1) answer ids starting with the start symbol; the decoder reads
      ``ts[:, :-1]`` and predicts ``ts[:, 1:]``.
    * ``backward(dout=1)`` writes ``grads`` (in place; the arrays of ``grads`` never change).
    * ``generate(xs, start_id, sample_size)`` -> list of ``sample_size`` ids, greedy, for one
      question xs (1, S) (the book's semantics); ``generate_batch(xs, start_id, sample_size)``
      -> (N, sample_size) int64 ids for many at once (greedy, with cached keys and values).
    * ``params``/``grads``: flat lists; ``param_names`` names each entry; ``config`` (a
      :class:`TransformerConfig`) holds the constructor's arguments without backend and seed,
      enough to build the same model (:meth:`from_config`).

    The model works on ids; :func:`fastattn.vocab.attach_vocab` (or :func:`fastattn.load_model`)
    gives it ``char_to_id``, ``id_to_char`` and ``translate(questions)`` for text.

    Token ids are checked: integers in [0, vocab_size) (ValueError/TypeError otherwise).
    """

    def __init__(self, vocab_size, d_model=TransformerConfig.d_model,
                 n_heads=TransformerConfig.n_heads, n_layers=TransformerConfig.n_layers,
                 d_ff=TransformerConfig.d_ff, max_len=TransformerConfig.max_len,
                 pos=TransformerConfig.pos, *, n_kv_heads=None, window=None, dropout=0.0,
                 backend=None, dtype=np.float32, seed=None):
        self.config = TransformerConfig(vocab_size, d_model, n_heads, n_layers, d_ff, max_len,
                                        pos, dtype, n_kv_heads, window, dropout)
        V, C, n_heads, n_layers, d_ff, max_len, pos, dt = astuple(self.config)[:8]
        attention = dict(n_kv_heads=n_kv_heads, window=self.config.window, dropout=dropout)
        dt = np.dtype(dt)
        self.backend = check_backend(backend)
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
        self.encoder = [EncoderBlock(C, n_heads, d_ff, **attention, **kw, seed=ss[4 + i])
                        for i in range(n_layers)]
        self.enc_ln = LayerNorm(C, **kw)
        self.decoder = [DecoderBlock(C, n_heads, d_ff, **attention, **kw,
                                     seed=ss[4 + n_layers + i])
                        for i in range(n_layers)]
        self.dec_ln = LayerNorm(C, **kw)
        self.out = TimeAffine(uniform(make_rng(ss[-1]), (C, V), C, dt), np.zeros(V, dt),
                              backend=backend)
        # NumPy's products, as every other product of the model: on the kernels' threads
        # (the numba backend's own, BLAS at one thread) the default model's step took 0.8-1.1%
        # (fastattn train's threads: one Numba thread) and 0.7-1.8% (the library's) longer,
        # medians of 600-800 steps a side in turns in one process (2-core AMD EPYC, Zen 4)
        self.out._own_products = False
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
        self._ran = False

    @classmethod
    def from_config(cls, config: TransformerConfig, *, backend=None, seed=None):
        """The model that ``config`` describes."""
        return cls(**asdict(config), backend=backend, seed=seed)

    # -- checks
    def _ids(self, x, name):
        ids = _checks.token_ids(x, self.config.vocab_size, name, ndim=2)
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one sequence of at least one id, got "
                             f"shape {ids.shape}")
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"{name} has sequences of length {ids.shape[1]}, longer than "
                             f"max_len {self.config.max_len}")
        return ids

    # -- pieces
    def encode(self, xs):
        """Encoder output (N, S, C) for question ids xs (N, S)."""
        h = self.src_pos.forward(self.src_embed.forward(xs))
        for block in self.encoder:
            h = block.forward(h)
        return self.enc_ln.forward(h)

    def _encode_only(self, xs):
        """encode for checked ids xs, keeping nothing for backward (generation)."""
        h = self.src_embed.params[0][xs] + self.src_pos.table(xs.shape[1])
        for block in self.encoder:
            h = block.infer(h)
        return self.enc_ln.infer(h)

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
        with cached keys and values (nothing is kept for backward), on chunks of up to 256
        questions, each chunk's results those of decoding it alone. The chunks run on the
        kernels' threads (``numba.set_num_threads``), one chunk per thread at a time (on one
        thread while an attention with dropout has ``train_flg`` set, so that a seeded model
        draws its dropout in the same order every time).
        """
        xs = self._ids(xs, "xs")
        if isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer)):
            raise TypeError(f"sample_size must be an int, got {type(sample_size).__name__}")
        sample_size = int(sample_size)
        if sample_size < 0 or sample_size > self.config.max_len:
            raise ValueError(f"sample_size must be in [0, max_len={self.config.max_len}], "
                             f"got {sample_size}")
        N = xs.shape[0]
        start = _checks.as_array(start_id, "start_id")
        if start.ndim > 1 or start.size not in (1, N):
            raise ValueError(f"start_id must be one id or {N} ids (one per row of xs), got "
                             f"shape {start.shape}")
        start = _checks.token_ids(np.broadcast_to(start, (N,)), self.config.vocab_size,
                                  "start_id", ndim=1)
        R = _GENERATE_ROWS  # in chunks whose activations stay in the CPU's caches
        # dropout seeds come from each attention's generator in the order of the calls: one
        # thread keeps that order, and a seeded model's answers with it
        serial = any(a.dropout > 0 and a.train_flg for a in self._attentions())
        with _backend.use_backend(_backend.resolve(self.backend)):  # resolved once, not per kernel
            return np.concatenate(_threads.map_in_threads(
                lambda i: self._generate(xs[i:i + R], start[i:i + R], sample_size),
                range(0, N, R), 1 if serial else None))

    def _attentions(self):
        return ([block.attn for block in self.encoder]
                + [a for block in self.decoder for a in (block.self_attn, block.cross_attn)])

    def _generate(self, xs, start, sample_size):
        N = xs.shape[0]
        memory = self._encode_only(xs)
        # each block's step as DecoderBlock.step computes it, on (N, C) rows
        steps = [block.stepper(*block.cross_attn.project_kv(memory), N, sample_size)
                 for block in self.decoder]
        W_emb = self.tgt_embed.params[0]
        pos = self.tgt_pos.table(sample_size) if sample_size else None  # (sample_size, C)
        ln = _backend.kernel("layernorm_forward", forward_backend(self.dec_ln))
        (g, c), eps = self.dec_ln.params, self.dec_ln.eps
        W, b = self.out.params
        out = np.empty((N, sample_size), dtype=np.int64)
        y = start
        for t in range(sample_size):
            h = W_emb[y] + pos[t]  # (N, C)
            for step in steps:
                h = step(h, t)
            score = ln(h, g, c, eps)[0] @ W + b  # (N, V)
            y = score.argmax(axis=1)
            out[:, t] = y
        return out

    def generate(self, xs, start_id, sample_size):
        """The book's ``generate``: xs (1, S) one question -> list of ``sample_size`` ids."""
        arr = _checks.as_array(xs, "xs")
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[0] != 1:
            raise ValueError(f"generate takes one question of shape (1, S); use generate_batch "
                             f"for many, got shape {arr.shape}")
        return [int(i) for i in self.generate_batch(arr, start_id, sample_size)[0]]

    def cross_attention(self, xs, ys, layer=-1):
        """Cross-attention probabilities of decoder block ``layer``, averaged over heads:
        xs (N, S) questions, ys (N, T) decoder inputs -> (N, T, S)."""
        n = len(self.decoder)
        if not _checks.is_int(layer):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not -n <= layer < n:
            raise ValueError(f"layer must be in [-{n}, {n}) (the model has {n} decoder "
                             f"blocks), got {layer}")
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
