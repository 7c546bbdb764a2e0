"""A book-style attention seq2seq in NumPy, for tests and benchmarks (not part of fastattn).

An LSTM encoder reads the question; an LSTM decoder, started from the encoder's last state,
attends over all encoder states at every step (``TimeAttention``) and predicts the next
character from the concatenation [context, decoder state]. This is the model of chapter 8
of "Deep Learning from Scratch 2", written here from its description:

    encoder:  TimeEmbedding -> TimeLSTM                             -> hs_enc (N, T_enc, H)
    decoder:  TimeEmbedding -> TimeLSTM (state = hs_enc[:, -1]) -> hs_dec (N, T_dec, H)
              TimeAttention(hs_enc, hs_dec) -> c;  TimeAffine([c, hs_dec]) -> scores (N, T_dec, V)
    loss:     TimeSoftmaxWithLoss(scores, ts[:, 1:]), teacher forcing with ts[:, :-1]

The attention, embedding, affine and loss layers come from fastattn, each on the backend the
model is built with, so that the same model (same seed, same weights) runs on the loop
reference or on a fast backend. ``embedding="add.at"`` swaps in the book's own scatter-add
(``np.add.at``) for the embedding backward: with ``attention_backend="loop"`` and
``backend="vectorized"`` that is the book's code path, the baseline users have today.
"""

from __future__ import annotations

import numpy as np

from fastattn import TimeAffine, TimeAttention, TimeEmbedding, TimeSoftmaxWithLoss


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


class LSTM:
    """One LSTM step. Wx (D, 4H), Wh (H, 4H), b (4H,); gates in the book's order [f, g, i, o].

    forward(x (N, D), h_prev (N, H), c_prev (N, H)) -> h_next, c_next;
    backward(dh_next, dc_next) -> dx, dh_prev, dc_prev (grads written in place).
    """

    def __init__(self, Wx, Wh, b):
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.cache = None

    def forward(self, x, h_prev, c_prev):
        Wx, Wh, b = self.params
        H = Wh.shape[0]
        A = x @ Wx + h_prev @ Wh + b  # (N, 4H)
        f = _sigmoid(A[:, :H])  # forget gate
        g = np.tanh(A[:, H:2 * H])  # candidate cell
        i = _sigmoid(A[:, 2 * H:3 * H])  # input gate
        o = _sigmoid(A[:, 3 * H:])  # output gate
        c_next = f * c_prev + i * g  # (N, H)
        tc = np.tanh(c_next)
        h_next = o * tc  # (N, H)
        self.cache = (x, h_prev, c_prev, i, f, o, g, tc)
        return h_next, c_next

    def backward(self, dh_next, dc_next):
        Wx, Wh, _ = self.params
        x, h_prev, c_prev, i, f, o, g, tc = self.cache
        dc = dc_next + dh_next * o * (1 - tc * tc)  # (N, H), through h = o tanh(c)
        dA = np.concatenate(
            [
                dc * c_prev * f * (1 - f),  # df through the sigmoid
                dc * i * (1 - g * g),  # dg through the tanh
                dc * g * i * (1 - i),  # di
                dh_next * tc * o * (1 - o),  # do
            ],
            axis=1,
        )  # (N, 4H)
        self.grads[0][...] = x.T @ dA
        self.grads[1][...] = h_prev.T @ dA
        self.grads[2][...] = dA.sum(axis=0)
        return dA @ Wx.T, dA @ Wh.T, dc * f


class TimeLSTM:
    """An LSTM over T steps, the book's way: one ``LSTM`` per step, grads summed over steps.

    forward(xs (N, T, D)) -> hs (N, T, H); backward(dhs (N, T, H)) -> dxs (N, T, D), and
    ``dh``, the gradient of the initial state. With ``stateful=True`` the last (h, c) carries
    over to the next forward; ``set_state(h, c=None)`` and ``reset_state()`` set it.
    """

    def __init__(self, Wx, Wh, b, stateful=False):
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.layers = None
        self.h, self.c, self.dh = None, None, None
        self.stateful = stateful

    def forward(self, xs):
        Wx, Wh, b = self.params
        N, T, _ = xs.shape
        H = Wh.shape[0]
        if not self.stateful or self.h is None:
            self.h = np.zeros((N, H), dtype=Wh.dtype)
        if not self.stateful or self.c is None:
            self.c = np.zeros((N, H), dtype=Wh.dtype)
        hs = np.empty((N, T, H), dtype=Wh.dtype)
        self.layers = []
        for t in range(T):
            layer = LSTM(Wx, Wh, b)
            self.h, self.c = layer.forward(xs[:, t, :], self.h, self.c)
            hs[:, t, :] = self.h
            self.layers.append(layer)
        return hs

    def backward(self, dhs):
        Wx = self.params[0]
        N, T, _ = dhs.shape
        dxs = np.empty((N, T, Wx.shape[0]), dtype=dhs.dtype)
        dh = np.zeros_like(dhs[:, 0, :])
        dc = np.zeros_like(dh)
        total = [np.zeros_like(g) for g in self.grads]
        for t in reversed(range(T)):
            layer = self.layers[t]
            dxs[:, t, :], dh, dc = layer.backward(dhs[:, t, :] + dh, dc)
            for acc, g in zip(total, layer.grads, strict=True):
                acc += g
        for g, acc in zip(self.grads, total, strict=True):
            g[...] = acc
        self.dh = dh
        return dxs

    def set_state(self, h, c=None):
        self.h, self.c = h, c

    def reset_state(self):
        self.h, self.c = None, None


class AddAtTimeEmbedding:
    """The book's time embedding: forward W[xs], backward by ``np.add.at`` (the baseline)."""

    def __init__(self, W):
        self.params = [W]
        self.grads = [np.zeros_like(W)]
        self.idx = None

    def forward(self, xs):
        self.idx = np.asarray(xs)
        return self.params[0][self.idx]  # (N, T, D)

    def backward(self, dout):
        dW = self.grads[0]
        dW[...] = 0
        np.add.at(dW, self.idx, dout)
        return None


class AttentionEncoder:
    """xs (N, T) ids -> hs (N, T, H), all the encoder's hidden states."""

    def __init__(self, embed_W, lstm_Wx, lstm_Wh, lstm_b, *, backend=None, embedding="kernel",
                 lstm=None):
        if embedding == "add.at":
            self.embed = AddAtTimeEmbedding(embed_W)
        else:
            self.embed = TimeEmbedding(embed_W, backend=backend)
        self.lstm = (lstm or TimeLSTM)(lstm_Wx, lstm_Wh, lstm_b, stateful=False)
        self.params = self.embed.params + self.lstm.params
        self.grads = self.embed.grads + self.lstm.grads

    def forward(self, xs):
        return self.lstm.forward(self.embed.forward(xs))

    def backward(self, dhs):
        self.embed.backward(self.lstm.backward(dhs))
        return None


class AttentionDecoder:
    """xs (N, T_dec) ids, hs_enc (N, T_enc, H) -> scores (N, T_dec, V)."""

    def __init__(self, embed_W, lstm_Wx, lstm_Wh, lstm_b, affine_W, affine_b, *, backend=None,
                 attention_backend=None, embedding="kernel", lstm=None):
        if embedding == "add.at":
            self.embed = AddAtTimeEmbedding(embed_W)
        else:
            self.embed = TimeEmbedding(embed_W, backend=backend)
        self.lstm = (lstm or TimeLSTM)(lstm_Wx, lstm_Wh, lstm_b, stateful=True)
        self.attention = TimeAttention(backend=attention_backend)
        self.affine = TimeAffine(affine_W, affine_b, backend=backend)
        layers = [self.embed, self.lstm, self.attention, self.affine]
        self.params = [p for layer in layers for p in layer.params]
        self.grads = [g for layer in layers for g in layer.grads]

    def forward(self, xs, hs_enc):
        self.lstm.set_state(hs_enc[:, -1])
        hs_dec = self.lstm.forward(self.embed.forward(xs))  # (N, T_dec, H)
        c = self.attention.forward(hs_enc, hs_dec)  # (N, T_dec, H)
        return self.affine.forward(np.concatenate((c, hs_dec), axis=2))  # (N, T_dec, V)

    def backward(self, dscore):
        dout = self.affine.backward(dscore)  # (N, T_dec, 2H)
        H = dout.shape[2] // 2
        dc, dhs_dec0 = dout[:, :, :H], dout[:, :, H:]
        dhs_enc, dhs_dec1 = self.attention.backward(dc)
        dxs = self.lstm.backward(dhs_dec0 + dhs_dec1)
        dhs_enc[:, -1] += self.lstm.dh  # the decoder started from the encoder's last state
        self.embed.backward(dxs)
        return dhs_enc

    def generate(self, hs_enc, start_id, sample_size):
        """Greedy decoding, one step at a time: ids (N, sample_size)."""
        N = hs_enc.shape[0]
        self.lstm.set_state(hs_enc[:, -1])
        x = np.full((N, 1), start_id, dtype=np.int64)
        sampled = []
        for _ in range(sample_size):
            h = self.lstm.forward(self.embed.forward(x))  # (N, 1, H)
            c = self.attention.forward(hs_enc, h)
            score = self.affine.forward(np.concatenate((c, h), axis=2))  # (N, 1, V)
            x = score.argmax(axis=2)  # (N, 1)
            sampled.append(x[:, 0])
        return np.stack(sampled, axis=1)


class AttentionSeq2seq:
    """The chapter 8 attention seq2seq, with the book's interface.

    forward(xs (N, T_enc) ids, ts (N, T_dec + 1) ids) -> loss (teacher forcing);
    backward(dout=1); generate(xs, start_id, sample_size) -> list of ids (for one question,
    as the book's ``eval_seq2seq`` asks) or an (N, sample_size) array; ``params``, ``grads``.

    ``backend`` is passed to every fastattn layer, ``attention_backend`` (default: backend) to
    ``TimeAttention``; ``embedding="add.at"`` uses the book's ``np.add.at`` embedding backward;
    ``lstm`` (default: this module's book-style ``TimeLSTM``) makes the encoder's and decoder's
    LSTMs, called as ``lstm(Wx, Wh, b, stateful=...)`` (e.g. ``fastattn.TimeLSTM``).
    The weights depend only on ``seed`` and ``dtype``, not on the backends.
    """

    def __init__(self, vocab_size, wordvec_size, hidden_size, *, backend=None,
                 attention_backend=None, embedding="kernel", lstm=None, dtype=np.float32,
                 seed=0):
        V, D, H = vocab_size, wordvec_size, hidden_size
        rng = np.random.default_rng(seed)

        def weights(shape, scale):
            return (rng.standard_normal(shape) * scale).astype(dtype)

        enc = [weights((V, D), 0.01), weights((D, 4 * H), 1 / np.sqrt(D)),
               weights((H, 4 * H), 1 / np.sqrt(H)), np.zeros(4 * H, dtype)]
        dec = [weights((V, D), 0.01), weights((D, 4 * H), 1 / np.sqrt(D)),
               weights((H, 4 * H), 1 / np.sqrt(H)), np.zeros(4 * H, dtype),
               weights((2 * H, V), 1 / np.sqrt(2 * H)), np.zeros(V, dtype)]
        attention_backend = backend if attention_backend is None else attention_backend
        self.encoder = AttentionEncoder(*enc, backend=backend, embedding=embedding, lstm=lstm)
        self.decoder = AttentionDecoder(*dec, backend=backend,
                                        attention_backend=attention_backend,
                                        embedding=embedding, lstm=lstm)
        self.softmax = TimeSoftmaxWithLoss(backend=backend)
        self.params = self.encoder.params + self.decoder.params
        self.grads = self.encoder.grads + self.decoder.grads

    def forward(self, xs, ts):
        hs_enc = self.encoder.forward(xs)
        score = self.decoder.forward(ts[:, :-1], hs_enc)
        return self.softmax.forward(score, ts[:, 1:])

    def backward(self, dout=1):
        dscore = self.softmax.backward(dout)
        self.encoder.backward(self.decoder.backward(dscore))
        return None

    def generate(self, xs, start_id, sample_size):
        ids = self.decoder.generate(self.encoder.forward(xs), start_id, sample_size)
        return [int(i) for i in ids[0]] if ids.shape[0] == 1 else ids


class _Adam:
    """Adam with bias correction, for when fastattn has no optimizer yet."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.iter, self.m, self.v = 0, None, None

    def update(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.iter += 1
        b1, b2 = self.beta1, self.beta2
        lr_t = self.lr * np.sqrt(1 - b2 ** self.iter) / (1 - b1 ** self.iter)
        for p, g, m, v in zip(params, grads, self.m, self.v, strict=True):
            m += (1 - b1) * (g - m)
            v += (1 - b2) * (g * g - v)
            p -= lr_t * m / (np.sqrt(v) + self.eps)


def adam(lr=0.001):
    """fastattn's ``Adam`` when the package has it, else the one above."""
    try:
        from fastattn import Adam
    except (ImportError, AttributeError):
        return _Adam(lr)
    return Adam(lr)


def train_step(model, xs, ts, optimizer):
    """One training step on the batch (xs, ts): forward, backward, update; the loss."""
    loss = model.forward(xs, ts)
    model.backward()
    optimizer.update(model.params, model.grads)
    return loss


def train_steps(model, xs, ts, batch_size, steps, optimizer):
    """Run ``steps`` training steps on consecutive batches; the list of losses."""
    return [train_step(model, xs[k * batch_size:(k + 1) * batch_size],
                       ts[k * batch_size:(k + 1) * batch_size], optimizer)
            for k in range(steps)]
