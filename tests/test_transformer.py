"""The Transformer layers and model: float64 gradient checks on every backend, agreement with
a plain NumPy reference, causality, greedy decoding with cached keys/values, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_layer_grads
from helpers import assert_close, assert_within_float32_error, attention_bounds

from fastattn import transformer
from fastattn.attention import MultiHeadAttention
from fastattn.kernels import BACKENDS
from fastattn.transformer import (
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    LayerNorm,
    PositionalEncoding,
    TransformerSeq2seq,
    sinusoidal_table,
)

F64 = np.float64
# float64 gradient checks: |analytic - numeric| <= 1e-7 + 1e-5 |numeric| (gradcheck defaults)
# float64 comparisons with the NumPy reference: rtol 1e-10, atol 1e-12


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def perturb_params(layer, seed=1, scale=0.3):
    """Non-trivial values for params initialised to constants (LayerNorm gains, biases)."""
    rng = np.random.default_rng(seed)
    for p in layer.params:
        p += scale * rng.standard_normal(p.shape)


# --------------------------------------------------------------------------- references


def ref_layernorm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def ref_mha(layer, x_q, x_kv=None, mask=None, weights=False):
    """Multi-head attention written out with an explicit softmax (float64); with weights=True,
    the attention probabilities (B, H, Tq, Tk) and the error bound (terms, n) of each."""
    W_in, b_in, W_out, b_out = layer.params
    C, H = layer.d_model, layer.n_heads
    dh = C // H
    x_kv = x_q if x_kv is None else x_kv
    q = x_q @ W_in[:, :C] + b_in[:C]
    k = x_kv @ W_in[:, C:2 * C] + b_in[C:2 * C]
    v = x_kv @ W_in[:, 2 * C:] + b_in[2 * C:]
    B, Tq, Tk = x_q.shape[0], x_q.shape[1], x_kv.shape[1]
    out = np.zeros((B, Tq, C))
    allowed = np.ones((B, Tq, Tk), bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, (B, Tq, Tk))
    if layer.causal:
        allowed &= np.tri(Tq, Tk, dtype=bool)
    P = np.zeros((B, H, Tq, Tk))
    terms, n = np.zeros_like(P), np.zeros((B, H, Tq, 1))
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        s = q[:, :, sl] @ k[:, :, sl].transpose(0, 2, 1) / np.sqrt(dh)
        s = np.where(allowed, s, -np.inf)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        e = np.exp(s - m)
        tot = e.sum(-1, keepdims=True)
        p = np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0)
        out[:, :, sl] = p @ v[:, :, sl]
        P[:, h] = p
        if weights:  # q and k as the magnitudes of their terms: projections of C terms
            qa = np.abs(x_q) @ np.abs(W_in[:, sl]) + np.abs(b_in[sl])
            ka = np.abs(x_kv) @ np.abs(W_in[:, C:2 * C][:, sl]) + np.abs(b_in[C:2 * C][sl])
            terms[:, h], n[:, h] = attention_bounds(qa, ka, ka, p, scale=1 / np.sqrt(dh),
                                                    depth=C + 2)["P"]
    if weights:
        return P, (terms, n)
    return out @ W_out + b_out


# --------------------------------------------------------------------------- gradient checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_gradients(backend):
    layer = LayerNorm(5, backend=backend, dtype=F64)
    perturb_params(layer)
    check_layer_grads(layer, layer.forward, [rand((2, 3, 5))], expect={"params", "inputs[0]"})


@pytest.mark.parametrize("kind", PositionalEncoding.KINDS)
def test_positional_encoding_gradients(kind):
    layer = PositionalEncoding(6, 4, kind, dtype=F64, seed=0)
    perturb_params(layer)
    check_layer_grads(layer, layer.forward, [rand((2, 3, 4))], expect={"params", "inputs[0]"})
    check_layer_grads(layer, lambda x: layer.forward(x, offset=2), [rand((2, 3, 4))],
                      expect={"params", "inputs[0]"})


@pytest.mark.parametrize("kind", PositionalEncoding.KINDS)
def test_positional_encoding_offset_adds_the_rows_at_those_positions(kind):
    """forward(x, offset) adds the position vectors of positions offset .. offset+T-1, fixed
    table and learned rows alike: the same as those steps of a call on the whole sequence
    (the same additions, so the same bits), and, for the fixed table, column 0 is sin(pos)
    (its angle is the position itself)."""
    L, C = 7, 4
    layer = PositionalEncoding(L, C, kind, dtype=F64, seed=0)
    perturb_params(layer)  # "both": a learned part that is not zero
    x = rand((2, L, C))
    whole = layer.forward(x)
    for offset, T in [(0, 3), (2, 3), (4, 3), (6, 1)]:
        part = layer.forward(x[:, offset:offset + T], offset=offset)
        np.testing.assert_array_equal(part, whole[:, offset:offset + T], err_msg=str(offset))
    if kind != "learned":
        zeros = np.zeros((1, 3, C))
        if kind == "both":
            layer.params[0][...] = 0
        pos = layer.forward(zeros, offset=3)
        np.testing.assert_allclose(pos[0, :, 0], np.sin([3.0, 4.0, 5.0]), rtol=0,
                                   atol=4 * np.finfo(np.float64).eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_gradients(backend, causal):
    layer = MultiHeadAttention(4, 2, causal=causal, backend=backend, dtype=F64, seed=0)
    perturb_params(layer)
    check_layer_grads(layer, layer.forward, [rand((2, 3, 4))], expect={"params", "inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_with_mask_gradients(backend):
    layer = MultiHeadAttention(4, 2, backend=backend, dtype=F64, seed=0)
    perturb_params(layer)
    keep = np.array([[True, True, False], [True, False, True]])  # key padding (B, Tk)
    check_layer_grads(layer, lambda x: layer.forward(x, mask=keep[:, None, :]),
                      [rand((2, 3, 4))], expect={"params", "inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_gradients(backend):
    layer = MultiHeadAttention(4, 2, backend=backend, dtype=F64, seed=0)
    perturb_params(layer)
    mask = rand((2, 2, 3), seed=5) > -0.5  # some entries masked
    check_layer_grads(layer, lambda xq, xkv: layer.forward(xq, xkv, mask=mask),
                      [rand((2, 2, 4), seed=1), rand((2, 3, 4), seed=2)],
                      expect={"params", "inputs[0]", "inputs[1]"})


@pytest.mark.parametrize("B, T", [(8, 8), (1, 8), (3, 2)])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_numba_attention_takes_its_heads_in_place(monkeypatch, cross, B, T):
    """On the numba backend, with more than kernels._flash.FEW_ROWS query rows per sequence,
    whatever the batch (8 sequences, or one), MultiHeadAttention gives the fused kernels its
    heads as views of the projections' columns (no split copies), takes their out as the
    merged heads (no merge copy) and has dq, dk, dv written into the columns of its gradient
    arrays; with fewer (T 2, decoding's case) it copies, as the other backends' kernels need.
    Either way the results are the loop backend's (float64)."""
    from fastattn import attention
    from fastattn.kernels import _flash

    calls = []
    real_fwd, real_bwd = _flash.attention_forward, _flash.attention_backward
    real_few = _flash.few_rows_forward  # the forward's way for few rows and no mask

    def fwd(q, k, v, *a, **kw):
        calls.append(("forward", q.ndim, q.base is not None, k.base is not None))
        return real_fwd(q, k, v, *a, **kw)

    def few(q, k, v, *a, **kw):
        calls.append(("forward", q.ndim))
        return real_few(q, k, v, *a, **kw)

    def bwd(dout, q, *a, grads=None, **kw):
        calls.append(("backward", q.ndim, grads is not None
                      and all(g.base is not None for g in grads), dout.base is not None))
        return real_bwd(dout, q, *a, grads=grads, **kw)

    monkeypatch.setattr(_flash, "attention_forward", fwd)
    monkeypatch.setattr(_flash, "attention_backward", bwd)
    monkeypatch.setattr(_flash, "few_rows_forward", few)
    xq, xkv, dy = rand((B, T, 8), seed=1), rand((B, 5, 8), seed=2), rand((B, T, 8), seed=3)
    assert attention._FEW_ROWS == _flash.FEW_ROWS  # the copy of the kernels' constant
    assert not attention._in_place("vectorized", 29)  # the other backends copy
    results = {}
    for backend in ("numba", "loop"):
        layer = MultiHeadAttention(8, 2, causal=not cross, backend=backend, dtype=F64, seed=0)
        y = layer.forward(xq, xkv) if cross else layer.forward(xq)
        dx = layer.backward(dy)
        results[backend] = [y, *(dx if cross else (dx,)), *layer.grads]
    if T > _flash.FEW_ROWS:
        assert calls == [("forward", 4, True, True), ("backward", 4, True, True)]
    else:
        assert [c[:2] for c in calls] == [("forward", 3), ("backward", 3)]
    for got, want in zip(results["numba"], results["loop"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feed_forward_gradients(backend):
    layer = FeedForward(4, 6, backend=backend, dtype=F64, seed=0)
    perturb_params(layer)
    check_layer_grads(layer, layer.forward, [rand((2, 3, 4))], expect={"params", "inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_block_gradients(backend):
    layer = EncoderBlock(4, 2, 6, backend=backend, dtype=F64, seed=0)
    perturb_params(layer, scale=0.2)
    check_layer_grads(layer, layer.forward, [rand((2, 3, 4))], expect={"params", "inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_block_gradients(backend):
    layer = DecoderBlock(4, 2, 6, backend=backend, dtype=F64, seed=0)
    perturb_params(layer, scale=0.2)
    check_layer_grads(layer, layer.forward, [rand((2, 2, 4), seed=1), rand((2, 3, 4), seed=2)],
                      expect={"params", "inputs[0]", "inputs[1]"})


def tiny_model(backend=None, dtype=F64, seed=0, **kw):
    cfg = dict(vocab_size=7, d_model=4, n_heads=2, n_layers=1, d_ff=6, max_len=5)
    cfg.update(kw)
    return TransformerSeq2seq(**cfg, backend=backend, dtype=dtype, seed=seed)


def tiny_batch(seed=0, N=2, S=4, T=4, V=7):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (N, S)), rng.integers(0, V, (N, T))


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_loss_gradients(backend):
    model = tiny_model(backend)
    for p in model.params:  # lift LayerNorm gains/biases off their constant start
        p += 0.1 * np.random.default_rng(3).standard_normal(p.shape)
    xs, ts = tiny_batch()
    check_layer_grads(model, model.forward, [xs, ts],
                      backward_fn=lambda dout: model.backward(dout),
                      max_per_array=None if backend != "loop" else 12, expect={"params"})


def test_model_with_two_layers_loss_gradients():
    model = tiny_model("vectorized", n_layers=2, pos="both")
    for p in model.params:
        p += 0.1 * np.random.default_rng(4).standard_normal(p.shape)
    xs, ts = tiny_batch(seed=1)
    check_layer_grads(model, model.forward, [xs, ts], max_per_array=20, expect={"params"})


# --------------------------------------------------------------------------- forward values


def test_layernorm_matches_reference():
    layer = LayerNorm(6, dtype=F64)
    perturb_params(layer)
    x = rand((3, 4, 6))
    g, b = layer.params
    np.testing.assert_allclose(layer.forward(x), ref_layernorm(x, g, b), rtol=1e-10, atol=1e-12)


def test_new_layernorm_and_feed_forward_start_with_unit_gain_and_no_biases():
    """A new LayerNorm is the plain normalisation (gain 1, shift 0) and a new FeedForward
    relu(x W1) W2 (biases 0), the usual starting point of a pre-LN Transformer."""
    x = rand((2, 3, 6))
    plain = ref_layernorm(x, np.ones(6), np.zeros(6))
    np.testing.assert_allclose(LayerNorm(6, dtype=F64).forward(x), plain, rtol=1e-10,
                               atol=1e-12)
    ffn = FeedForward(6, 5, dtype=F64, seed=0)
    W1, _, W2, _ = ffn.params
    np.testing.assert_allclose(ffn.forward(x), np.maximum(x @ W1, 0) @ W2, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_uses_its_eps(backend):
    """A LayerNorm's own eps, not the default, is what the kernel adds to the variance: with
    eps 0.5 and a row variance about 0.25 the two differ by tens of percent."""
    layer = LayerNorm(6, eps=0.5, backend=backend, dtype=F64)
    perturb_params(layer)
    x = 0.5 * rand((3, 4, 6))
    g, b = layer.params
    want = ref_layernorm(x, g, b, eps=0.5)
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.infer(x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_reference(backend, causal):
    layer = MultiHeadAttention(6, 3, causal=causal, backend=backend, dtype=F64, seed=2)
    perturb_params(layer, scale=0.1)
    x = rand((2, 4, 6))
    np.testing.assert_allclose(layer.forward(x), ref_mha(layer, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_with_mask_matches_reference(backend):
    layer = MultiHeadAttention(6, 2, backend=backend, dtype=F64, seed=2)
    xq, xkv = rand((2, 3, 6), 1), rand((2, 5, 6), 2)
    mask = rand((2, 1, 5), 3) > 0  # key padding, broadcast over queries
    mask[1, 0, :] = False  # a sequence with nothing to attend to: zeros before W_out
    got = layer.forward(xq, xkv, mask=mask)
    np.testing.assert_allclose(got, ref_mha(layer, xq, xkv, mask), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], np.broadcast_to(layer.params[3], (3, 6)), atol=1e-15)


def test_float32_attention_matches_float64():
    l64 = MultiHeadAttention(8, 2, dtype=F64, seed=0)
    l32 = MultiHeadAttention(8, 2, dtype=np.float32, seed=0)
    x = rand((3, 5, 8))
    y32 = l32.forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    # the reference's own float32 error: the loop backend's float32 run, same float32 weights
    ref = MultiHeadAttention(8, 2, dtype=np.float32, seed=0, backend="loop")
    for p, w in zip(l64.params, l32.params, strict=True):
        p[...] = w
    x32 = x.astype(np.float32)
    assert_within_float32_error(y32, l64.forward(x32.astype(F64)), ref.forward(x32))


def test_causal_attention_ignores_the_future():
    layer = MultiHeadAttention(4, 2, causal=True, dtype=F64, seed=0)
    x = rand((1, 5, 4))
    y = layer.forward(x)
    x2 = x.copy()
    x2[:, 3:] += 10.0
    y2 = layer.forward(x2)
    np.testing.assert_allclose(y2[:, :3], y[:, :3], rtol=1e-12, atol=1e-12)
    assert not np.allclose(y2[:, 3:], y[:, 3:])


def test_a_fresh_both_encoding_adds_exactly_the_sinusoidal_table():
    """kind="both": the learned correction starts at zero, so the layer first adds the fixed
    table, written out here: column 2i of position pos is sin(pos / 10000^(2i / C)), column
    2i + 1 its cos."""
    L, C = 5, 4
    layer = PositionalEncoding(L, C, "both", dtype=F64, seed=0)
    pos = np.arange(L)[:, None]
    angle = pos / 10000.0 ** (np.array([0, 2]) / C)  # (L, C / 2)
    table = np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(L, C)
    got = layer.forward(np.zeros((2, L, C)))
    np.testing.assert_allclose(got, np.broadcast_to(table, (2, L, C)), rtol=0,
                               atol=4 * np.finfo(F64).eps)
    np.testing.assert_array_equal(layer.params[0], np.zeros((L, C)))
    assert PositionalEncoding(L, C, "sinusoidal", dtype=F64).params == []


def test_sinusoidal_table_values():
    P = sinusoidal_table(4, 6, dtype=F64)
    pos = 3  # column 4 = 2*2 is a sin, column 5 a cos, both of frequency 10000^(-4/6)
    np.testing.assert_allclose(P[pos, 4], np.sin(pos / 10000 ** (4 / 6)), rtol=1e-12)
    np.testing.assert_allclose(P[pos, 5], np.cos(pos / 10000 ** (4 / 6)), rtol=1e-12)
    assert P.shape == (4, 6)


@pytest.mark.parametrize("d_model", [6, 5])  # 5: a model of 5 heads of width 1, say
def test_sinusoidal_table_of_every_width_is_the_formula_entry_by_entry(d_model):
    """Column 2i holds sin(pos / 10000^(2i / d_model)), column 2i + 1 the cos of the same
    angle, for even and odd widths alike (an odd width ends with a sin column)."""
    L = 7
    P = sinusoidal_table(L, d_model, dtype=F64)
    assert P.shape == (L, d_model)
    for pos in range(L):
        for col in range(d_model):
            angle = pos / 10000 ** ((col - col % 2) / d_model)
            want = math.sin(angle) if col % 2 == 0 else math.cos(angle)
            assert P[pos, col] == pytest.approx(want, rel=1e-12, abs=1e-15), (pos, col)


def test_attention_weights_are_distributions():
    layer = MultiHeadAttention(4, 2, causal=True, dtype=F64, seed=0)
    layer.keep_weights = True
    x = rand((2, 3, 4))
    layer.forward(x)
    w = layer.attention_weights
    assert w.shape == (2, 2, 3, 3)
    assert np.all(w[..., 0, 1:] == 0)  # causal: the first query sees only the first key
    want, (terms, n) = ref_mha(layer, x, weights=True)  # by value, as the plots show them
    assert_close(w, want, terms=terms, n=n, err_msg="attention weights")


# --------------------------------------------------------------------------- the model


def test_model_params_and_grads_are_parallel_lists():
    model = tiny_model()
    assert len(model.params) == len(model.grads) == len(model.param_names)
    for p, g in zip(model.params, model.grads, strict=True):
        assert p.shape == g.shape and p.dtype == g.dtype == np.float64
    assert len({id(p) for p in model.params}) == len(model.params)


def test_model_float32_by_default_and_seeded():
    m1 = TransformerSeq2seq(7, d_model=8, n_heads=2, d_ff=8, max_len=6, seed=3)
    m2 = TransformerSeq2seq(7, d_model=8, n_heads=2, d_ff=8, max_len=6, seed=3)
    assert all(p.dtype == np.float32 for p in m1.params)
    for a, b in zip(m1.params, m2.params, strict=True):
        np.testing.assert_array_equal(a, b)
    xs, ts = tiny_batch(S=5, T=5)
    assert m1.forward(xs, ts) == m2.forward(xs, ts)


def test_model_blocks_and_embeddings_start_from_different_weights():
    """Each block (two encoder and two decoder blocks here) and each embedding gets its own
    seed: no two start from the same weights, which training could never tell apart."""
    model = tiny_model(n_layers=2, seed=3)
    pairs = [(model.src_embed, model.tgt_embed), model.encoder, model.decoder]
    for a, b in pairs:
        random = [(p, q) for p, q in zip(a.params, b.params, strict=True) if np.ptp(p) > 0]
        assert random  # the weights drawn at random (LayerNorms and biases start constant)
        for p, q in random:
            assert not np.array_equal(p, q), type(a).__name__


def test_teacher_forcing_uses_shifted_targets():
    """The loss on (xs, ts) is the mean cross-entropy of ts[:, 1:] given ts[:, :-1]."""
    model = tiny_model()
    xs, ts = tiny_batch(T=5)
    loss = model.forward(xs, ts)
    memory = model.encode(xs)
    score = model._decode(ts[:, :-1], memory)  # (N, T-1, V)
    logp = score - np.log(np.exp(score).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, ts[:, 1:, None], axis=2).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-10)


def _greedy_by_full_recomputation(model, xs, start_id, n):
    """n greedy ids per row of xs, re-running the whole decoder on each prefix (no cache)."""
    ys = np.full((len(xs), 1), start_id, dtype=np.int64)
    memory = model.encode(xs)
    for _ in range(n):
        score = model._decode(ys, memory)
        ys = np.concatenate([ys, score[:, -1].argmax(-1)[:, None]], axis=1)
    return ys[:, 1:]


@pytest.mark.parametrize("backend", ["vectorized", "numba"])
def test_generate_batch_equals_full_recomputation(backend):
    """Greedy decoding with cached keys/values gives the ids that re-running the whole
    decoder on the prefix gives."""
    model = tiny_model(backend, dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=5)
    xs, _ = tiny_batch(N=6, S=6)
    got = model.generate_batch(xs, 1, 6)
    np.testing.assert_array_equal(got, _greedy_by_full_recomputation(model, xs, 1, 6))
    assert got.shape == (6, 6) and got.dtype == np.int64


@pytest.mark.parametrize("backend", ["vectorized", "numba"])
def test_generate_batch_decodes_up_to_max_len_ids(backend):
    """sample_size may be max_len (the decoder's last input, start symbol included, is then
    max_len long): the ids of re-running the whole decoder on each prefix. 0 gives no ids,
    max_len + 1 is a ValueError naming sample_size."""
    model = tiny_model(backend, d_model=8, n_heads=2, max_len=5, seed=5)
    perturb_params(model, seed=6, scale=0.1)
    xs, _ = tiny_batch(N=3, S=5, seed=7)
    got = model.generate_batch(xs, 1, 5)
    want = _greedy_by_full_recomputation(model, xs, 1, 5)
    np.testing.assert_array_equal(got, want)
    assert model.generate(xs[:1], 1, 5) == want[0].tolist()
    empty = model.generate_batch(xs, 1, 0)
    assert empty.shape == (3, 0) and empty.dtype == np.int64
    with pytest.raises(ValueError, match="sample_size"):
        model.generate_batch(xs, 1, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, F64])
@pytest.mark.parametrize("n_kv_heads, window", [(None, None), (2, None), (1, (2, 0))])
@pytest.mark.parametrize("B", [1, 3])
def test_stepper_gives_the_bits_of_step(backend, dtype, n_kv_heads, window, B):
    """DecoderBlock.stepper's steps are DecoderBlock.step's arithmetic on (B, C) rows: the
    same bits at every position, with grouped heads and a window too."""
    C, n = 8, 6
    block = DecoderBlock(C, 4, 12, n_kv_heads=n_kv_heads, window=window, backend=backend,
                         dtype=dtype, seed=2)
    perturb_params(block, seed=3)  # the biases and LayerNorm shifts start at 0
    memory = rand((B, 5, C), seed=4).astype(dtype)
    k_mem, v_mem = block.cross_attn.project_kv(memory)
    step, cache = block.stepper(k_mem, v_mem, B, n), {}
    rng = np.random.default_rng(5)
    for t in range(n):
        x = rng.standard_normal((B, C)).astype(dtype)
        want = block.step(x[:, None, :], k_mem, v_mem, cache)[:, 0]
        got = step(x, t)
        assert got.dtype == dtype and got.shape == (B, C)
        np.testing.assert_array_equal(got, want, err_msg=f"position {t}")


def _decode_by_block_steps(model, xs, start, n):
    """Greedy decoding written with DecoderBlock.step (what generate_batch computes)."""
    memory = model.encode(xs)
    kv = [block.cross_attn.project_kv(memory) for block in model.decoder]
    caches = [{} for _ in model.decoder]
    y, ids = np.asarray(start), []
    for t in range(n):
        h = (model.tgt_embed.params[0][y] + model.tgt_pos.table(1, t))[:, None, :]
        for block, (k, v), cache in zip(model.decoder, kv, caches, strict=True):
            h = block.step(h, k, v, cache)
        W, b = model.out.params
        y = (model.dec_ln.infer(h).reshape(len(y), -1) @ W + b).argmax(axis=1)
        ids.append(y)
    return np.stack(ids, axis=1)


@pytest.mark.parametrize("backend", ["vectorized", "numba"])
def test_generate_batch_decodes_with_each_blocks_stepper(backend, monkeypatch):
    """generate_batch takes one stepper per decoder block and chunk, and gives the ids of
    decoding with DecoderBlock.step (two layers, grouped heads, a window, both positions)."""
    model = tiny_model(backend, dtype=np.float32, d_model=8, n_heads=4, n_kv_heads=2,
                       window=(2, 0), n_layers=2, max_len=8, pos="both", seed=6)
    perturb_params(model, seed=7)
    xs, _ = tiny_batch(N=5, S=6, seed=8)
    start = np.arange(5) % 7
    made = []
    original = DecoderBlock.stepper

    def spy(self, *args):
        made.append(self)
        return original(self, *args)

    monkeypatch.setattr(DecoderBlock, "stepper", spy)
    got = model.generate_batch(xs, start, 7)
    assert made == list(model.decoder)  # one chunk: each block's stepper, once
    np.testing.assert_array_equal(got, _decode_by_block_steps(model, xs, start, 7))


@pytest.mark.parametrize("backend", ["vectorized", "numba"])
def test_generate_batch_decodes_many_questions_in_chunks(backend, monkeypatch):
    """More questions than _GENERATE_ROWS are decoded a chunk at a time, each with its own
    start id, and give the ids of one pass over all of them."""
    model = tiny_model(backend, d_model=8, n_heads=2, max_len=7, seed=6)
    xs, _ = tiny_batch(N=10, S=6)
    start = np.arange(10) % 3
    whole = model.generate_batch(xs, start, 5)
    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 4)
    encoded = []
    encode = model._encode_only
    monkeypatch.setattr(model, "_encode_only",
                        lambda x: (encoded.append(len(x)), encode(x))[1])
    chunked = model.generate_batch(xs, start, 5)
    assert sorted(encoded) == [2, 4, 4]  # the chunks may run on several threads
    np.testing.assert_array_equal(chunked, whole)
    assert chunked.shape == (10, 5) and chunked.dtype == np.int64


def _blas_threads():
    from threadpoolctl import threadpool_info

    from fastattn.kernels import _blas

    _blas.available()  # SciPy's BLAS loaded, so that every call sees the same libraries

    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")


@pytest.mark.parametrize("backend", ["vectorized", "numba"])
def test_generate_batch_runs_chunks_on_the_kernels_threads(backend, monkeypatch, threads):
    """With 2 Numba threads the chunks run on 2 threads at once (a barrier that both must
    reach proves it), each with its Numba kernels and every BLAS at one thread, and give the
    ids of a one-thread run; the thread settings come back afterwards."""
    import threading

    import numba

    model = tiny_model(backend, dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=6)
    xs, _ = tiny_batch(N=10, S=6)
    start = np.arange(10) % 3
    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 4)
    threads(1)
    serial = model.generate_batch(xs, start, 5)
    threads(2)
    blas_before = _blas_threads()
    seen = []
    barrier = threading.Barrier(2, timeout=30)
    generate = model._generate

    def spy(x, st, n):
        seen.append((threading.get_ident(), numba.get_num_threads(),
                     {t for _, t in _blas_threads()}))
        if len(seen) <= 2:
            barrier.wait()  # the first two chunks only pass together, on two threads
        return generate(x, st, n)

    monkeypatch.setattr(model, "_generate", spy)
    got = model.generate_batch(xs, start, 5)
    np.testing.assert_array_equal(got, serial)
    assert len(seen) == 3 and len({ident for ident, _, _ in seen}) == 2
    assert all(n == 1 and blas == {1} for _, n, blas in seen), seen
    assert numba.get_num_threads() == 2 and _blas_threads() == blas_before


def test_generate_batch_raises_a_chunks_error_and_restores_the_threads(monkeypatch, threads):
    import numba

    model = tiny_model("numba", dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=6)
    xs, _ = tiny_batch(N=10, S=6)
    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 2)
    threads(2)
    blas_before = _blas_threads()
    calls = []
    generate = model._generate

    def failing(x, st, n):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("chunk failed")
        return generate(x, st, n)

    monkeypatch.setattr(model, "_generate", failing)
    with pytest.raises(RuntimeError, match="chunk failed"):
        model.generate_batch(xs, 1, 5)
    assert len(calls) < 5  # no chunk is started after the error is seen ...
    assert numba.get_num_threads() == 2 and _blas_threads() == blas_before
    monkeypatch.setattr(model, "_generate", generate)  # ... and the threads work on
    assert model.generate_batch(xs, 1, 5).shape == (10, 5)


def test_an_interrupt_between_chunks_stops_the_other_threads_first(monkeypatch, threads):
    """An interrupt that reaches the calling thread outside a chunk (here, before its first)
    is raised only once the other thread has finished its chunk, and no more are begun."""
    import contextlib
    import threading
    import time

    from fastattn import _threads

    model = tiny_model("numba", dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=6)
    xs, _ = tiny_batch(N=20, S=6)
    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 2)
    threads(2)
    caller = threading.get_ident()
    running, ended = threading.Event(), []
    one_thread = _threads._numba_threads

    @contextlib.contextmanager
    def interrupted(n):
        if threading.get_ident() == caller:
            assert running.wait(30)  # the pool's thread is inside its first chunk
            raise KeyboardInterrupt
        with one_thread(n):
            yield

    generate = model._generate

    def slow(x, st, n):
        running.set()
        time.sleep(0.2)
        out = generate(x, st, n)
        ended.append(time.perf_counter())
        return out

    monkeypatch.setattr(_threads, "_numba_threads", interrupted)
    monkeypatch.setattr(model, "_generate", slow)
    with pytest.raises(KeyboardInterrupt):
        model.generate_batch(xs, 1, 5)
    raised = time.perf_counter()
    assert 1 <= len(ended) < 10 and max(ended) < raised


def test_an_interrupt_while_waiting_for_the_other_thread_waits_on(monkeypatch, threads):
    """An interrupt that reaches the calling thread while it waits for the pool's thread (its
    own items done) is raised only once that thread's chunk has ended."""
    import concurrent.futures
    import threading
    import time

    model = tiny_model("numba", dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=6)
    xs, _ = tiny_batch(N=4, S=6)
    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 2)
    threads(2)
    caller = threading.get_ident()
    ended = []
    generate = model._generate

    def uneven(x, st, n):
        out = generate(x, st, n)
        if threading.get_ident() != caller:
            time.sleep(0.5)  # the calling thread runs out of items first and waits
        ended.append(time.perf_counter())
        return out

    real_wait = concurrent.futures.wait
    interrupted = []

    def wait(futures, *a, **kw):
        if not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt
        return real_wait(futures, *a, **kw)

    monkeypatch.setattr(model, "_generate", uneven)
    monkeypatch.setattr(concurrent.futures, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        model.generate_batch(xs, 1, 5)
    assert interrupted and len(ended) == 2 and max(ended) < time.perf_counter()


def test_two_generate_batch_calls_at_once(monkeypatch, threads):
    """Two Python threads decoding at once: both get the one-thread answers, and afterwards
    the BLAS thread counts are back and the kernels can still hold BLAS at one thread."""
    import contextvars
    import threading

    from fastattn.kernels import _blas

    model = tiny_model("numba", dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=6)
    xs, _ = tiny_batch(N=12, S=6)
    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 2)
    threads(1)
    want = model.generate_batch(xs, 1, 5)
    threads(2)
    blas_before = _blas_threads()
    together = threading.Barrier(2, timeout=30)
    generate = model._generate
    caller_of = contextvars.ContextVar("caller_of", default=None)  # chunks run in a copy
    waited, lock = set(), threading.Lock()

    def spy(x, st, n):  # each caller's first chunk, on whichever thread, waits for the other's
        k = caller_of.get()
        with lock:
            first = k is not None and k not in waited
            waited.add(k)
        if first:
            together.wait()
        return generate(x, st, n)

    monkeypatch.setattr(model, "_generate", spy)
    got = {}

    def caller(k):
        caller_of.set(k)
        threads(2)  # Numba's thread count is per thread
        got[k] = model.generate_batch(xs, 1, 5)

    callers = [threading.Thread(target=caller, args=(k,), name=f"caller-{k}") for k in (0, 1)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(60)
    assert set(got) == {0, 1}
    for k in (0, 1):
        np.testing.assert_array_equal(got[k], want)
    assert _blas_threads() == blas_before
    with _blas.OneThread():
        assert {lib.num_threads for lib in _blas.pools()} == {1}


def test_generate_batch_with_dropout_on_runs_its_chunks_on_one_thread(monkeypatch, threads):
    """An attention with dropout in training mode draws a seed per call from its generator:
    the chunks then run one after another on the calling thread, and a seeded model answers
    the same with 1 or 2 Numba threads."""
    import threading

    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 2)
    xs, _ = tiny_batch(N=10, S=6)
    answers = []
    for n in (1, 2):
        threads(n)
        model = tiny_model("numba", dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=6,
                           dropout=0.5)
        seen, generate = set(), model._generate
        monkeypatch.setattr(model, "_generate",
                            lambda *a, g=generate, s=seen: (s.add(threading.get_ident()),
                                                            g(*a))[1])
        answers.append(model.generate_batch(xs, 1, 5))
        assert seen == {threading.get_ident()}
    np.testing.assert_array_equal(answers[0], answers[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [2, 5])  # decoder inputs of 1 (the shape of a decoding step) and 4
def test_generate_between_forward_and_backward_leaves_the_gradients_alone(backend, T):
    """Decoding other questions between a forward and its backward (say, a progress check in
    a training loop) keeps nothing for backward: the gradients are those of the forward."""
    model = tiny_model(backend, max_len=6, seed=3)
    xs, ts = tiny_batch(seed=4, N=3, S=5, T=T)
    other, _ = tiny_batch(seed=5, N=3, S=5)
    model.forward(xs, ts)
    model.backward()
    want = [g.copy() for g in model.grads]
    model.forward(xs, ts)
    model.generate_batch(other, 1, 4)
    model.backward()
    for g, w in zip(model.grads, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_generate_follows_the_book():
    model = tiny_model(dtype=np.float32)
    xs, _ = tiny_batch(N=3)
    batch = model.generate_batch(xs, 2, 3)
    for i in range(3):
        one = model.generate(xs[i:i + 1], 2, 3)
        assert isinstance(one, list) and all(isinstance(v, int) for v in one)
        assert one == batch[i].tolist()
    with pytest.raises(ValueError, match="generate_batch"):
        model.generate(xs, 2, 3)


def test_generate_takes_one_question_as_a_flat_row_too():
    """generate(xs) with xs (S,), one question without its batch axis, answers as (1, S)."""
    model = tiny_model(dtype=np.float32)
    xs, _ = tiny_batch(N=2)
    for row in xs:
        assert model.generate(row, 2, 3) == model.generate(row[None], 2, 3)
        assert model.generate(list(row), 2, 3) == model.generate(row[None], 2, 3)


def test_cross_attention_map_shape():
    model = tiny_model()
    xs, ts = tiny_batch(N=3, S=4, T=3)
    attn = model.decoder[-1].cross_attn
    seen = []
    forward = attn.forward

    def recording(*args, **kw):
        seen.append((args, kw))
        return forward(*args, **kw)

    attn.forward = recording
    w = model.cross_attention(xs, ts)
    assert w.shape == (3, 3, 4)
    # by value: the head mean of the probabilities the layer applied to its own inputs
    (x_q, x_kv), kw = seen[-1]
    want, (terms, n) = ref_mha(attn, x_q, x_kv, kw.get("mask"), weights=True)
    assert_close(w, want.mean(1), terms=terms.mean(1), n=n.max(1) + 2, err_msg="cross-attention")


# --------------------------------------------------------------------------- bad input


def test_backward_before_forward_raises():
    for layer in [LayerNorm(4), PositionalEncoding(4, 4), MultiHeadAttention(4, 2),
                  FeedForward(4, 4), EncoderBlock(4, 2, 4), DecoderBlock(4, 2, 4),
                  tiny_model()]:
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(np.ones((1, 1, 4), np.float32))


@pytest.mark.parametrize("bad, err", [
    (np.array([[0, 7, 1, 2]]), ValueError),  # id == V
    (np.array([[0, -1, 1, 2]]), ValueError),  # negative
    (np.array([[0.0, 1.0, 1.0, 2.0]]), TypeError),  # not integer
    (np.array([0, 1, 2]), ValueError),  # not 2-D
    (np.zeros((1, 6), np.int64), ValueError),  # longer than max_len
])
def test_model_rejects_bad_token_ids(bad, err):
    model = tiny_model()
    xs, ts = tiny_batch(N=1)
    with pytest.raises(err):
        model.forward(bad, ts)
    with pytest.raises(err):
        model.forward(xs, bad)
    with pytest.raises(err):
        model.generate_batch(bad, 0, 2)


def test_model_forward_names_ts_when_it_does_not_fit_xs_or_holds_no_target():
    """ts needs the start symbol and at least one target per row, and one row per question:
    a ValueError naming ts (not one from a layer inside, naming that layer's argument)."""
    model = tiny_model()
    xs, ts = tiny_batch(N=2)
    with pytest.raises(ValueError, match=r"ts must have at least 2 columns"):
        model.forward(xs, ts[:, :1])
    with pytest.raises(ValueError, match=r"xs and ts must have the same number of rows"):
        model.forward(xs, np.concatenate([ts, ts[:1]]))


def test_cross_attention_map_leaves_the_layer_keeping_nothing():
    """cross_attention (for the plots, between epochs say) switches the layer's keep_weights
    on for its own call only: training forwards after it keep no (B, H, T, S) weights."""
    model = tiny_model()
    xs, ts = tiny_batch(N=3, S=4, T=3)
    attn = model.decoder[-1].cross_attn
    assert model.cross_attention(xs, ts).shape == (3, 3, 4)
    assert attn.keep_weights is False and attn.attention_weights is None
    model.forward(xs, ts)
    assert attn.attention_weights is None


def test_layer_input_errors():
    layer = MultiHeadAttention(4, 2)
    with pytest.raises(ValueError, match="x_q"):
        layer.forward(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match="x_q"):
        layer.forward(np.zeros((2, 3, 4), np.int64))
    with pytest.raises(ValueError, match="batch"):
        layer.forward(np.zeros((2, 3, 4), np.float32), np.zeros((1, 3, 4), np.float32))
    with pytest.raises(ValueError, match="mask"):
        layer.forward(np.zeros((2, 3, 4), np.float32), mask=np.ones((2, 4, 3), bool))
    with pytest.raises(TypeError, match="mask"):
        layer.forward(np.zeros((2, 3, 4), np.float32), mask=np.ones((2, 3, 3)))
    layer.forward(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="dout"):
        layer.backward(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        MultiHeadAttention(6, 4)
    with pytest.raises(TypeError, match="dtype"):
        LayerNorm(4, dtype=np.int32)
    with pytest.raises(ValueError, match="backend"):
        FeedForward(4, 4, backend="cuda")


def test_config_builds_the_same_model_and_checks_its_fields():
    from dataclasses import asdict

    from fastattn.transformer import TransformerConfig

    model = TransformerSeq2seq(7, d_model=4, n_heads=2, d_ff=6, max_len=5, seed=3)
    assert model.config == TransformerConfig(7, d_model=4, n_heads=2, d_ff=6, max_len=5)
    again = TransformerSeq2seq.from_config(model.config, seed=3)
    assert asdict(again.config) == asdict(model.config)
    for a, b in zip(model.params, again.params, strict=True):
        np.testing.assert_array_equal(a, b)
    assert TransformerConfig(7).d_model == 64  # the model of `fastattn train`
    assert TransformerConfig(7, dtype=np.float64).dtype == "float64"
    for bad, err in [(dict(d_model=2.0), TypeError), (dict(n_layers=0), ValueError),
                     (dict(d_model=6, n_heads=4), ValueError), (dict(pos="rotary"), ValueError),
                     (dict(dtype=np.int32), TypeError)]:
        with pytest.raises(err):
            TransformerConfig(7, **bad)


def test_the_model_modules_do_not_import_the_dataset_package():
    import subprocess
    import sys

    code = ("import sys, fastattn.transformer, fastattn.blocks, fastattn.attention; "
            "print('dataset' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_generate_batch_holds_scipys_blas_too_in_a_fresh_process():
    """The first generate_batch of a process, before any kernel loaded SciPy's BLAS (the one
    the Numba kernels call), holds that BLAS at one thread too."""
    import subprocess
    import sys

    code = """if True:
        import numpy as np, numba
        from threadpoolctl import threadpool_info
        from fastattn import transformer
        numba.set_num_threads(2)
        transformer._GENERATE_ROWS = 2
        m = transformer.TransformerSeq2seq(20, 8, 2, 1, 16, 8, backend="numba", seed=0)
        seen, g = [], m._generate
        def spy(*a):
            seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
            return g(*a)
        m._generate = spy
        m.generate_batch(np.ones((4, 3), np.int64), 1, 2)
        m.generate_batch(np.ones((4, 3), np.int64), 1, 2)
        print(seen)
        assert all(s == {1} for s in seen), seen
    """
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 Numba threads (NUMBA_NUM_THREADS)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generate_batch_chunks_on_threads_keep_the_backend_in_force(monkeypatch, threads,
                                                                   looked_up):
    """A model without a backend of its own decodes every chunk, on every thread, on the
    backend of the caller's ``use_backend`` block."""
    import fastattn

    model = tiny_model(None, dtype=np.float32, d_model=8, n_heads=2, max_len=7, seed=6)
    xs, _ = tiny_batch(N=10, S=6)
    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 2)
    threads(2)
    with fastattn.use_backend("vectorized"):
        model.generate_batch(xs, 1, 5)
    assert looked_up and set(looked_up) == {"vectorized"}
