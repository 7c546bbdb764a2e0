"""MultiHeadAttention's n_kv_heads, window and dropout, and TransformerSeq2seq with them."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_layer_grads

import fastattn
from fastattn import MultiHeadAttention, TransformerSeq2seq
from fastattn.kernels import BACKENDS


class _FixedSeed:
    """Stands in for the layer's seed generator: the same dropout seed on every forward, so
    that the forward is a fixed function (for central differences)."""

    def __init__(self, seed=12345):
        self.seed = seed

    def integers(self, n):
        return self.seed


def _x(rng, B=2, T=5, C=8):
    return rng.standard_normal((B, T, C))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(n_kv_heads=2), dict(n_kv_heads=1, causal=True),
                                dict(window=(1, 1)), dict(window=(2, None), causal=True),
                                dict(n_kv_heads=2, window=(1, 0), dropout=0.3, causal=True)],
                         ids=["gqa", "mqa-causal", "window", "window-causal", "all"])
def test_layer_gradients_match_central_differences(kw, backend):
    layer = MultiHeadAttention(8, 4, backend=backend, dtype=np.float64, seed=0, **kw)
    layer._drop_rng = _FixedSeed()
    check_layer_grads(layer, layer.forward, [_x(np.random.default_rng(1))],
                      expect={"params", "inputs[0]"})


def test_layer_cross_attention_gradients_with_grouped_heads():
    layer = MultiHeadAttention(8, 4, n_kv_heads=2, dtype=np.float64, seed=0)
    rng = np.random.default_rng(2)
    check_layer_grads(layer, layer.forward, [_x(rng, T=3), _x(rng, T=6)],
                      expect={"params", "inputs[0]", "inputs[1]"})


def test_grouped_heads_equal_full_heads_with_shared_key_value_weights():
    """n_kv_heads = 2 of 4 heads is 4-head attention whose key/value columns repeat per group
    (head h reads key/value head h // 2)."""
    gqa = MultiHeadAttention(8, 4, n_kv_heads=2, dtype=np.float64, seed=0)
    full = MultiHeadAttention(8, 4, dtype=np.float64, seed=1)
    W, b = gqa.params[0], gqa.params[1]  # (8, 8 + 2 * 4)
    heads = [0, 0, 1, 1]  # key/value head of each query head (d_head 2)

    def cols(start):
        return np.concatenate([np.arange(start + 2 * g, start + 2 * g + 2) for g in heads])

    idx = np.concatenate([np.arange(8), cols(8), cols(12)])
    full.params[0][...] = W[:, idx]
    full.params[1][...] = b[idx]
    full.params[2][...] = gqa.params[2]
    full.params[3][...] = gqa.params[3]
    x = _x(np.random.default_rng(3))
    np.testing.assert_allclose(gqa.forward(x), full.forward(x), rtol=0, atol=1e-13)


def test_window_equals_the_band_as_a_mask():
    rng = np.random.default_rng(4)
    a = MultiHeadAttention(8, 2, window=(2, 1), dtype=np.float64, seed=0)
    b = MultiHeadAttention(8, 2, dtype=np.float64, seed=0)
    x = _x(rng, T=7)
    i, j = np.arange(7)[:, None], np.arange(7)[None, :]
    band = (j >= i - 2) & (j <= i + 1)
    np.testing.assert_allclose(a.forward(x), b.forward(x, mask=band), rtol=0, atol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_kept_weights_with_a_window_are_those_of_the_band_as_a_mask(causal):
    """keep_weights under a window (2, 1): the probabilities of the band given as a mask,
    zero outside the band and positive (finite scores) inside it, and out = weights @ v."""
    rng = np.random.default_rng(4)
    a = MultiHeadAttention(8, 2, causal=causal, window=(2, 1), dtype=np.float64, seed=0)
    b = MultiHeadAttention(8, 2, causal=causal, dtype=np.float64, seed=0)
    a.keep_weights = b.keep_weights = True
    x = _x(rng, T=7)
    i, j = np.arange(7)[:, None], np.arange(7)[None, :]
    band = (j >= i - 2) & (j <= (i if causal else i + 1))
    y = a.forward(x)
    b.forward(x, mask=band)
    w = a.attention_weights  # (B, H, T, T)
    np.testing.assert_array_equal(w, b.attention_weights)
    assert np.all(w[..., ~band] == 0) and np.all(w[..., band] > 0)
    W_in, b_in, W_out, b_out = a.params
    v = (x @ W_in[:, 16:] + b_in[16:]).reshape(x.shape[0], 7, 2, 4).transpose(0, 2, 1, 3)
    out = (w @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], 7, 8) @ W_out + b_out
    np.testing.assert_allclose(y, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, (1, None)])
def test_bottom_right_causal_cross_attention_is_its_band_as_a_mask(window, backend):
    """causal="bottom_right" with 3 queries and 5 keys: query i sees keys j <= i + 2 (and,
    with a window (1, None), j >= i + 2 - 1), forward, kept weights and backward; it was
    taken as True (top-left: j <= i). Every backend: the numba one takes the heads in place
    here, the others as copies (another backward call)."""
    rng = np.random.default_rng(9)
    a = MultiHeadAttention(8, 2, causal="bottom_right", window=window, dtype=np.float64,
                           seed=0, backend=backend)
    b = MultiHeadAttention(8, 2, dtype=np.float64, seed=0, backend=backend)
    a.keep_weights = b.keep_weights = True
    x_q, x_kv, dout = _x(rng, T=3), _x(rng, T=5), _x(rng, T=3)
    i, j = np.arange(3)[:, None], np.arange(5)[None, :]
    band = (j <= i + 2) & (j >= (i + 1 if window else 0))
    np.testing.assert_allclose(a.forward(x_q, x_kv), b.forward(x_q, x_kv, mask=band),
                               rtol=0, atol=1e-13)
    w = a.attention_weights
    np.testing.assert_array_equal(w, b.attention_weights)
    assert np.all(w[..., ~band] == 0) and np.all(w[..., band] > 0)
    for ga, gb in zip(a.backward(dout), b.backward(dout), strict=True):
        np.testing.assert_allclose(ga, gb, rtol=0, atol=1e-13)


def test_bottom_right_self_attention_is_top_left_and_bad_causal_raises():
    x = _x(np.random.default_rng(10))
    a = MultiHeadAttention(8, 2, causal="bottom_right", dtype=np.float64, seed=0)
    b = MultiHeadAttention(8, 2, causal=True, dtype=np.float64, seed=0)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    assert MultiHeadAttention(8, 2, causal="top_left").causal is True
    with pytest.raises(ValueError, match="^causal must be"):
        MultiHeadAttention(8, 2, causal="future")  # was taken as True
    with pytest.raises(TypeError, match="^causal must be"):
        MultiHeadAttention(8, 2, causal=2)


def test_dropout_only_in_training():
    rng = np.random.default_rng(5)
    a = MultiHeadAttention(8, 2, dropout=0.5, dtype=np.float64, seed=0)
    b = MultiHeadAttention(8, 2, dtype=np.float64, seed=0)
    x = _x(rng)
    assert not np.allclose(a.forward(x), b.forward(x))
    y1, y2 = a.forward(x), a.forward(x)
    assert not np.allclose(y1, y2)  # a fresh draw per forward
    a.train_flg = False
    np.testing.assert_allclose(a.forward(x), b.forward(x), rtol=0, atol=1e-14)


def test_dropout_backward_uses_the_forwards_mask():
    """The backward regenerates the mask of its own forward's seed: the same gradients as a
    layer whose every draw is that seed."""
    rng = np.random.default_rng(8)
    x, dout = _x(rng), _x(rng)
    a = MultiHeadAttention(8, 2, dropout=0.5, dtype=np.float64, seed=0)
    a.forward(x)  # a first draw, so that the next one is not the first
    y = a.forward(x)
    dx = a.backward(dout)
    seed = a.cache[-1]["seed"]
    b = MultiHeadAttention(8, 2, dropout=0.5, dtype=np.float64, seed=0)
    b._drop_rng = _FixedSeed(seed)
    np.testing.assert_array_equal(b.forward(x), y)
    np.testing.assert_array_equal(b.backward(dout), dx)


def test_step_with_window_and_grouped_heads_matches_forward():
    """Generation one position at a time (cached keys and values) gives the rows of the full
    causal forward, window and grouped heads included."""
    layer = MultiHeadAttention(8, 4, causal=True, n_kv_heads=2, window=(2, None),
                               dtype=np.float64, seed=0)
    x = _x(np.random.default_rng(6), B=2, T=6)
    full = layer.forward(x)
    cache = {}
    rows = [layer.step(x[:, t:t + 1], cache) for t in range(6)]
    np.testing.assert_allclose(np.concatenate(rows, axis=1), full, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kw, msg", [(dict(n_kv_heads=3), "multiple of n_kv_heads"),
                                     (dict(n_kv_heads=0), "n_kv_heads"),
                                     (dict(window=(1, -1)), "window right"),
                                     (dict(dropout=1.0), r"^dropout must be in \[0, 1\)"),
                                     (dict(dropout="0.1"), "^dropout must be a real")])
def test_layer_bad_arguments_raise(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        MultiHeadAttention(8, 4, **kw)


def test_default_layer_and_model_are_unchanged():
    """Without the new arguments the weights (and the model's config) are what they were."""
    layer = MultiHeadAttention(8, 4, seed=0)
    assert layer.params[0].shape == (8, 24)
    model = TransformerSeq2seq(13, d_model=8, n_heads=2, d_ff=16, max_len=6, seed=0)
    assert set(model.config.as_dict()) == {"vocab_size", "d_model", "n_heads", "n_layers",
                                           "d_ff", "max_len", "pos", "dtype"}


def test_model_with_grouped_heads_window_and_dropout_trains_and_round_trips(tmp_path):
    rng = np.random.default_rng(7)
    model = TransformerSeq2seq(13, d_model=8, n_heads=4, d_ff=16, max_len=6, n_kv_heads=2,
                               window=(2, 2), dropout=0.1, seed=0)
    assert model.encoder[0].attn.n_kv_heads == 2
    assert model.decoder[0].self_attn.window == (2, 2)  # causal: the right bound is moot
    assert model.decoder[0].cross_attn.window is None
    xs, ts = rng.integers(0, 13, (3, 6)), rng.integers(0, 13, (3, 5))
    loss = model.forward(xs, ts)
    model.backward()
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in model.grads)
    assert len(model.generate(xs[:1], 1, 4)) == 4
    path = tmp_path / "m.npz"
    fastattn.save_model(model, path)
    back = fastattn.load_model(path)
    assert back.config == model.config
    for p, q in zip(back.params, model.params, strict=True):
        np.testing.assert_array_equal(p, q)
