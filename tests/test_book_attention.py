"""Tests of the book's chapter 8 attention layers: WeightSum, AttentionWeight, Attention and
TimeAttention.

The "loop" backend (the book's per-step algorithm), run in float64 on the same inputs, is the
reference. Every backend must match it for the outputs and every gradient within the error
bound of ``helpers.book_attention_bounds`` (n * eps times the sum of |terms| each result adds
up, carried through the softmax: the rule of ``helpers.assert_close``). Training runs of many
steps are compared with the loop reference's own float32 error (``assert_within_float32_error``).

Every backend is also checked against float64 central differences (``gradcheck``, eps 1e-6:
rtol 1e-6, atol 1e-8) and against an independent einsum formula of the forward pass.
"""

import os
import re

import book_lstm
import numpy as np
import pytest
from gradcheck import check_layer_grads
from helpers import (
    assert_all_close,
    assert_all_within_float32_error,
    assert_close,
    book_attention_bounds,
)

import fastattn
from fastattn import Attention, AttentionWeight, TimeAttention, WeightSum, book_attention, kernels

BACKENDS = ("loop", "vectorized", "numba")
FAST = ("vectorized", "numba")
DTYPES = (np.float32, np.float64)

# (N, T_enc, T_dec, H): odd sizes, a single encoder step, a single decoder step
SHAPES = [(3, 7, 5, 6), (2, 1, 4, 3), (4, 9, 1, 8), (1, 5, 3, 1)]


def _rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


# Each case builds the layer's inputs and the upstream gradient for a shape.
def _case(name, shape, dtype, seed=0, scale=1.0):
    N, T_enc, T_dec, H = shape
    rng = np.random.default_rng(seed)
    hs = _rand(rng, (N, T_enc, H), dtype, scale)
    if name == "WeightSum":
        a = rng.random((N, T_enc)).astype(dtype)
        a /= a.sum(axis=1, keepdims=True)
        return WeightSum, (hs, a), _rand(rng, (N, H), dtype)
    if name == "AttentionWeight":
        h = _rand(rng, (N, H), dtype, scale)
        return AttentionWeight, (hs, h), _rand(rng, (N, T_enc), dtype)
    if name == "Attention":
        return Attention, (hs, _rand(rng, (N, H), dtype, scale)), _rand(rng, (N, H), dtype)
    hs_dec = _rand(rng, (N, T_dec, H), dtype, scale)
    return TimeAttention, (hs, hs_dec), _rand(rng, (N, T_dec, H), dtype)


LAYERS = ("WeightSum", "AttentionWeight", "Attention", "TimeAttention")


def _run(cls, backend, inputs, dout):
    layer = cls(backend=backend)
    out = layer.forward(*inputs)
    grads = layer.backward(dout)
    return layer, out, grads


def _reference64(cls, inputs, dout):
    """The loop backend's output and gradients in float64, from the same (rounded) inputs."""
    f64 = [np.asarray(x, dtype=np.float64) for x in inputs]
    _, out, grads = _run(cls, "loop", f64, np.asarray(dout, dtype=np.float64))
    return (out, *grads)


def _assert_layer(name, got, inputs, dout, dtype, what=""):
    cls = {"WeightSum": WeightSum, "AttentionWeight": AttentionWeight, "Attention": Attention,
           "TimeAttention": TimeAttention}[name]
    want = _reference64(cls, inputs, dout)
    for g in got:
        assert g.dtype == dtype, what
    assert_all_close(got, want, book_attention_bounds(name, inputs, dout),
                     ("output", "gradient 0", "gradient 1"), f"{name} {what}")


# --- equality with the loop reference -----------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_every_backend_matches_the_float64_loop_reference(name, backend, dtype, shape):
    cls, inputs, dout = _case(name, shape, dtype)
    _, out, grads = _run(cls, backend, inputs, dout)
    assert len(grads) == 2
    _assert_layer(name, (out, *grads), inputs, dout, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", FAST)
def test_time_attention_matches_loop_with_large_logits(backend, dtype):
    # scores of several hundred: softmax must subtract the row maximum on every backend
    cls, inputs, dout = _case("TimeAttention", (2, 6, 4, 5), dtype, scale=8.0)
    _, out, grads = _run(cls, backend, inputs, dout)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    _assert_layer("TimeAttention", (out, *grads), inputs, dout, dtype, backend)


def test_all_decoder_steps_at_once_with_the_loop_kernels_match_the_per_step_reference(
        monkeypatch):
    # The fast path run on the scalar loop kernels (the package's source of truth) agrees
    # with the per-step book algorithm: the reference and the kernels say the same thing.
    cls, inputs, dout = _case("TimeAttention", (2, 5, 3, 4), np.float64)
    _, ref_out, ref_grads = _run(cls, "loop", inputs, dout)
    monkeypatch.setattr(book_attention._backend, "kernel",
                        lambda name, backend=None: kernels.get(name, "loop"))
    _, out, grads = _run(cls, "vectorized", inputs, dout)
    assert_all_close((out, *grads), (ref_out, *ref_grads),
                     book_attention_bounds("TimeAttention", inputs, dout))


@pytest.mark.parametrize("backend", FAST)
def test_fast_time_attention_runs_three_kernels_each_way_whatever_t_dec(backend, monkeypatch):
    calls = []
    real = book_attention._backend.kernel

    def counting(name, b=None):
        calls.append(name)
        return real(name, b)

    monkeypatch.setattr(book_attention._backend, "kernel", counting)
    for T_dec in (1, 6):
        calls.clear()
        layer = TimeAttention(backend=backend)
        _, (hs_enc, hs_dec), dout = _case("TimeAttention", (2, 5, T_dec, 4), np.float32)
        layer.forward(hs_enc, hs_dec)
        assert calls == ["scores_forward", "softmax_forward", "weighted_sum_forward"]
        calls.clear()
        layer.backward(dout)
        assert calls == ["weighted_sum_backward", "softmax_backward", "scores_backward"]
        assert layer.layers is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_an_independent_formula(backend, dtype):
    N, T_enc, T_dec, H = 3, 6, 4, 5
    rng = np.random.default_rng(1)
    hs_enc = _rand(rng, (N, T_enc, H), dtype)
    hs_dec = _rand(rng, (N, T_dec, H), dtype)
    e, d = hs_enc.astype(np.float64), hs_dec.astype(np.float64)
    s = np.einsum("nth,nsh->nts", d, e)  # (N, T_dec, T_enc)
    w = np.exp(s - s.max(axis=2, keepdims=True))
    w /= w.sum(axis=2, keepdims=True)
    ref = np.einsum("nts,nsh->nth", w, e)  # (N, T_dec, H)
    zero = np.zeros((N, T_dec, H))
    (out_b, _, _) = book_attention_bounds("TimeAttention", (hs_enc, hs_dec), zero)
    layer = TimeAttention(backend=backend)
    assert_close(layer.forward(hs_enc, hs_dec), ref, terms=out_b[0], n=out_b[1], err_msg="out")
    # the weights the book's attention plot shows, by value: (T_dec, N, T_enc)
    step_b = [book_attention_bounds("AttentionWeight", (hs_enc, hs_dec[:, t]), np.zeros((N, T_enc)))
              for t in range(T_dec)]
    terms = np.stack([b[0][0] for b in step_b])
    n = np.stack([np.broadcast_to(b[0][1], (N, T_enc)) for b in step_b])
    assert_close(np.array(layer.attention_weights), w.transpose(1, 0, 2), terms=terms, n=n,
                 err_msg="attention weights")
    # the single-step layers, on decoder step 2
    h = hs_dec[:, 2]
    a_b, _, _ = step_b[2]
    assert_close(AttentionWeight(backend).forward(hs_enc, h), w[:, 2], terms=a_b[0], n=a_b[1])
    c_b, _, _ = book_attention_bounds("Attention", (hs_enc, h), zero[:, 0])
    assert_close(Attention(backend).forward(hs_enc, h), ref[:, 2], terms=c_b[0], n=c_b[1])
    w2 = w[:, 2].astype(dtype)
    ws_b, _, _ = book_attention_bounds("WeightSum", (hs_enc, w2), zero[:, 0])
    assert_close(WeightSum(backend).forward(hs_enc, w2), np.einsum("ns,nsh->nh", w2.astype(
        np.float64), e), terms=ws_b[0], n=ws_b[1])


# --- gradients against central differences ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_gradients_match_central_differences(name, backend):
    # every element of both input gradients; |analytic - numeric| <= 1e-8 + 1e-6 |numeric|
    cls, inputs, _ = _case(name, (2, 4, 3, 3), np.float64, seed=3)
    layer = cls(backend=backend)
    errors = check_layer_grads(layer, layer.forward, list(inputs), rtol=1e-6, atol=1e-8,
                               expect={"inputs[0]", "inputs[1]"})
    assert set(errors) == {"inputs[0]", "inputs[1]"}


# --- attention weights ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_weights_are_one_distribution_per_decoder_step(backend, dtype):
    N, T_enc, T_dec, H = 3, 7, 5, 4
    _, (hs_enc, hs_dec), _ = _case("TimeAttention", (N, T_enc, T_dec, H), dtype)
    layer = TimeAttention(backend=backend)
    layer.forward(hs_enc, hs_dec)
    w = layer.attention_weights
    assert isinstance(w, list) and len(w) == T_dec
    for a in w:
        assert a.shape == (N, T_enc) and a.dtype == dtype
        assert (a >= 0).all()
        assert_close(a.sum(axis=1), np.ones(N), terms=1.0, n=2 * T_enc + 8)
    # what the book's attention plot does with them
    assert np.array(w).shape == (T_dec, N, T_enc)
    # a second forward gives a new list and leaves the old one alone
    old = [a.copy() for a in w]
    layer.forward(hs_enc[:, ::-1], hs_dec)
    for a, b in zip(w, old, strict=True):
        np.testing.assert_array_equal(a, b)
    assert layer.attention_weights is not w


@pytest.mark.parametrize("backend", FAST)
def test_attention_weights_equal_the_reference(backend):
    _, (hs_enc, hs_dec), _ = _case("TimeAttention", (3, 7, 5, 4), np.float32)
    ref = TimeAttention(backend="loop")
    ref.forward(hs_enc, hs_dec)
    layer = TimeAttention(backend=backend)
    layer.forward(hs_enc, hs_dec)
    for t, (a, r) in enumerate(zip(layer.attention_weights, ref.attention_weights, strict=True)):
        # the loop reference's float32 weights are themselves within the bound of exact ones
        bound, _, _ = book_attention_bounds("AttentionWeight", (hs_enc, hs_dec[:, t]),
                                            np.zeros((3, 7)))
        assert_close(a, r, terms=bound[0], n=2 * bound[1], err_msg=f"step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_rows_softmax_is_shifted_by_its_own_maximum(backend):
    """Batch entries whose scores lie 1000 apart: a softmax shifted by one maximum for the
    whole batch underflows the lower entry to 0 / 0. Each row must equal softmax(s - max of
    its row), written out here in float64. The scores (sums of two products of halves) are
    exact; on each side the exp (within 2 ulp), the sum of 3 terms (2 eps) and the division
    (1) round: 5 eps each, 10 between them, bound 16 eps."""
    hs = np.array([[[500.0, 500.0], [499.0, 499.0], [498.0, 498.0]],
                   [[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]])  # (N=2, T=3, H=2)
    h = np.ones((2, 2))
    s = np.einsum("nth,nh->nt", hs, h)  # (2, 3): [1000, 998, 996] and [0, 2, 1]
    e = np.exp(s - s.max(axis=1, keepdims=True))
    want = e / e.sum(axis=1, keepdims=True)
    got = AttentionWeight(backend=backend).forward(hs, h)
    tol = 16 * np.finfo(np.float64).eps
    np.testing.assert_allclose(got, want, rtol=tol, atol=0)
    layer = TimeAttention(backend=backend)
    layer.forward(hs, h[:, None, :])
    np.testing.assert_allclose(layer.attention_weights[0], want, rtol=tol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_keeps_the_last_weights(backend):
    _, (hs, h), _ = _case("Attention", (3, 7, 1, 4), np.float64)
    layer = Attention(backend=backend)
    assert layer.attention_weight is None
    layer.forward(hs, h)
    assert layer.attention_weight.shape == (3, 7)
    assert_close(layer.attention_weight.sum(axis=1), np.ones(3), terms=1.0, n=2 * 7 + 8)


def test_the_loop_backend_keeps_one_attention_layer_per_decoder_step():
    _, (hs_enc, hs_dec), _ = _case("TimeAttention", (2, 4, 3, 5), np.float64)
    layer = TimeAttention(backend="loop")
    layer.forward(hs_enc, hs_dec)
    assert len(layer.layers) == 3 and all(isinstance(x, Attention) for x in layer.layers)
    for x, a in zip(layer.layers, layer.attention_weights, strict=True):
        assert x.attention_weight is a


# --- the book's API ------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
def test_layers_have_no_weights_and_are_public(name):
    cls = getattr(fastattn, name)
    layer = cls()
    assert layer.params == [] and layer.grads == []
    assert cls is getattr(book_attention, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_backward_before_forward_raises(name, backend):
    cls, _, dout = _case(name, (2, 3, 2, 4), np.float64)
    with pytest.raises(RuntimeError, match="before .*forward"):
        cls(backend=backend).backward(dout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_the_cache_is_kept_between_forward_and_backward(name, backend):
    cls, inputs, dout = _case(name, (2, 3, 2, 4), np.float64)
    layer = cls(backend=backend)
    layer.forward(*inputs)
    first = layer.backward(dout)
    second = layer.backward(dout)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_backend_none_is_resolved_when_forward_runs_and_kept_for_backward():
    _, (hs_enc, hs_dec), dout = _case("TimeAttention", (2, 4, 3, 5), np.float64)
    layer = TimeAttention()
    with fastattn.use_backend("loop"):
        layer.forward(hs_enc, hs_dec)
    assert layer.layers is not None  # ran the per-step algorithm
    with fastattn.use_backend("vectorized"):
        ref = TimeAttention(backend="loop")
        ref.forward(hs_enc, hs_dec)
        for g, r in zip(layer.backward(dout), ref.backward(dout), strict=True):
            np.testing.assert_array_equal(g, r)
        layer.forward(hs_enc, hs_dec)
    assert layer.layers is None  # ran all steps at once


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_give_the_same_result_as_contiguous_copies(backend):
    _, (hs_enc, hs_dec), dout = _case("TimeAttention", (3, 6, 4, 5), np.float64)
    rev_enc, rev_dec = hs_enc[:, ::-1], hs_dec[:, ::2]  # reversed, strided
    dout = dout[:, ::-2]
    _, out, grads = _run(TimeAttention, backend, (rev_enc, rev_dec), dout)
    _, ref, ref_grads = _run(TimeAttention, backend,
                             (rev_enc.copy(), np.ascontiguousarray(rev_dec)), dout.copy())
    np.testing.assert_array_equal(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_array_equal(g, r)


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "enc_shape, dec_shape, match",
    [
        ((2, 4, 5), (3, 2, 5), "hs_dec"),  # N differs
        ((2, 4, 5), (2, 2, 6), "hs_dec"),  # H differs
        ((2, 4, 5), (2, 5), "hs_dec"),  # 2-D decoder states
        ((4, 5), (2, 2, 5), "hs_enc"),  # 2-D encoder states
        ((2, 0, 5), (2, 2, 5), "hs_enc"),  # no encoder step
    ],
)
def test_time_attention_rejects_bad_shapes(backend, enc_shape, dec_shape, match):
    with pytest.raises(ValueError, match=match):
        TimeAttention(backend=backend).forward(np.zeros(enc_shape), np.zeros(dec_shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_backward_rejects_a_dout_of_the_wrong_shape(name, backend):
    cls, inputs, dout = _case(name, (2, 3, 2, 4), np.float64)
    layer = cls(backend=backend)
    layer.forward(*inputs)
    with pytest.raises(ValueError, match="must have shape"):
        layer.backward(dout[:1])
    with pytest.raises(ValueError, match="must have shape"):
        layer.backward(np.concatenate([dout, dout], axis=-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_layers_reject_bad_shapes(backend):
    hs = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="a must have shape"):
        WeightSum(backend).forward(hs, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="h must have shape"):
        AttentionWeight(backend).forward(hs, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="h must have shape"):
        Attention(backend).forward(hs, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="hs must have 3 dimensions"):
        Attention(backend).forward(np.zeros((2, 4)), np.zeros((2, 4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_dtypes_raise_type_error(backend):
    enc, dec = np.zeros((2, 3, 4)), np.zeros((2, 2, 4))
    with pytest.raises(TypeError, match="hs_enc"):
        TimeAttention(backend).forward(enc.astype(np.int64), dec)
    with pytest.raises(TypeError, match="hs_dec"):
        TimeAttention(backend).forward(enc, dec.astype(np.float16))
    with pytest.raises(TypeError, match="one dtype"):
        TimeAttention(backend).forward(enc, dec.astype(np.float32))
    layer = TimeAttention(backend)
    layer.forward(enc, dec)
    with pytest.raises(TypeError, match="dout"):
        layer.backward(np.zeros((2, 2, 4), np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["WeightSum", "AttentionWeight", "Attention"])
def test_step_layers_reject_inputs_of_two_float_dtypes(name, backend):
    """One dtype per layer call, as for TimeAttention: no silent promotion to float64."""
    cls, (hs, x), _ = _case(name, (2, 3, 1, 4), np.float64)
    for a, b in [(hs, x.astype(np.float32)), (hs.astype(np.float32), x)]:
        with pytest.raises(TypeError, match="one dtype"):
            cls(backend=backend).forward(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_dout_of_the_other_float_dtype_is_cast_to_the_forwards(name, backend):
    """As in every layer: a float32 dout after a float64 forward gives the float64 gradients
    of the float32 values."""
    cls, inputs, dout = _case(name, (2, 3, 2, 4), np.float64)
    dout32 = dout.astype(np.float32)
    layer = cls(backend=backend)
    layer.forward(*inputs)
    want = layer.backward(dout32.astype(np.float64))
    got = layer.backward(dout32)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float64
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", LAYERS)
def test_an_unknown_backend_raises_value_error_listing_the_names_at_construction(name):
    with pytest.raises(ValueError, match="valid backends"):
        getattr(book_attention, name)(backend="gpu")


# --- an attention seq2seq built from these layers (tests/book_lstm.py) ---------------------

def _date_slice(n):
    """The first n training questions (reversed, as the book feeds them) and answers."""
    sequence = pytest.importorskip("dataset.sequence")
    (x, t), _ = sequence.load_data("date.txt")
    return x[:n, ::-1], t[:n], len(sequence.get_vocab()[0])


def test_lstm_gradients_match_central_differences():
    rng = np.random.default_rng(4)
    N, T, D, H = 2, 3, 3, 4
    Wx, Wh = rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H))
    b = rng.standard_normal(4 * H)
    xs = rng.standard_normal((N, T, D))
    lstm = book_lstm.TimeLSTM(Wx, Wh, b)
    check_layer_grads(lstm, lstm.forward, [xs], rtol=1e-6, atol=1e-8,
                      expect={"params", "inputs[0]"})
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    step = book_lstm.LSTM(Wx, Wh, b)
    check_layer_grads(step, lambda x, h, c: np.concatenate(step.forward(x, h, c), axis=1),
                      [xs[:, 0], h0, c0],
                      backward_fn=lambda d: step.backward(d[:, :H], d[:, H:]),
                      rtol=1e-6, atol=1e-8,
                      expect={"params", "inputs[0]", "inputs[1]", "inputs[2]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq2seq_loss_gradients_match_central_differences(backend):
    # the whole model, float64, tiny: the attention layer inside a real network
    rng = np.random.default_rng(5)
    V = 7
    xs = rng.integers(0, V, size=(2, 4))
    ts = rng.integers(0, V, size=(2, 4))
    model = book_lstm.AttentionSeq2seq(V, 3, 4, backend=backend, dtype=np.float64, seed=1)
    check_layer_grads(model, model.forward, [xs, ts], backward_fn=model.backward,
                      rtol=1e-6, atol=1e-8, expect={"params"})


def _train64(model32, xs, ts, N, steps, **kw):
    """The float64 twin of ``model32`` (same weights) trained as the tests train it: (losses,
    the model)."""
    V, D, H = model32.params[0].shape[0], model32.params[0].shape[1], model32.params[2].shape[0]
    twin = book_lstm.AttentionSeq2seq(V, D, H, dtype=np.float64, **kw)
    for p, w in zip(twin.params, model32.params, strict=True):
        p[...] = w
    return book_lstm.train_steps(twin, xs, ts, N, steps, book_lstm.adam(1e-3)), twin


def _assert_training_follows(losses, model, ref64, ref32, err_msg):
    """Losses and trained weights of a float32 run against the float64 reference run, to
    K_FLOAT32 times the float32 reference run's error level (helpers' second form)."""
    (losses64, model64), (losses32, model32) = ref64, ref32
    names = ["losses"] + [f"params[{i}]" for i in range(len(model.params))]
    assert_all_within_float32_error([np.asarray(losses, np.float32)] + model.params,
                                    [np.asarray(losses64)] + model64.params,
                                    [np.asarray(losses32)] + model32.params, names,
                                    err_msg=err_msg)


@pytest.mark.parametrize("backend", FAST)
def test_seq2seq_training_with_fast_layers_follows_the_loop_reference(backend):
    # 25 Adam steps on the date task, same seed, weights and batches, in float32, against the
    # loop reference in float64, to 16 times the float32 loop reference's own error.
    N, steps = 16, 25
    xs, ts, V = _date_slice(N * steps)
    ref = book_lstm.AttentionSeq2seq(V, 16, 32, backend="loop", seed=0)
    fast = book_lstm.AttentionSeq2seq(V, 16, 32, backend=backend, seed=0)
    assert fast.decoder.attention.backend == backend
    for p, q in zip(ref.params, fast.params, strict=True):
        np.testing.assert_array_equal(p, q)
    ref64 = _train64(ref, xs, ts, N, steps, backend="loop")
    ref_losses = book_lstm.train_steps(ref, xs, ts, N, steps, book_lstm.adam(1e-3))
    losses = book_lstm.train_steps(fast, xs, ts, N, steps, book_lstm.adam(1e-3))
    assert ref.decoder.attention.layers is not None  # the per-step reference ran
    assert fast.decoder.attention.layers is None  # all steps at once
    assert ref_losses[-1] < ref_losses[0]  # it learns
    assert all(p.dtype == np.float32 for p in ref.params + fast.params)
    _assert_training_follows(losses, fast, ref64, (ref_losses, ref), backend)


def test_seq2seq_with_the_books_baseline_layers_matches_the_fast_layers():
    # the benchmark's baseline (per-step attention, np.add.at embedding, NumPy elsewhere)
    N, steps = 16, 5
    xs, ts, V = _date_slice(N * steps)
    base = book_lstm.AttentionSeq2seq(V, 16, 32, backend="vectorized",
                                      attention_backend="loop", embedding="add.at")
    fast = book_lstm.AttentionSeq2seq(V, 16, 32, backend="numba")
    base64 = _train64(base, xs, ts, N, steps, backend="vectorized", attention_backend="loop",
                      embedding="add.at")
    base_losses = book_lstm.train_steps(base, xs, ts, N, steps, book_lstm.adam(1e-3))
    losses = book_lstm.train_steps(fast, xs, ts, N, steps, book_lstm.adam(1e-3))
    _assert_training_follows(losses, fast, base64, (base_losses, base), "numba vs the book's")


def test_seq2seq_generate_and_attention_plot_inputs():
    xs, ts, V = _date_slice(4)
    model = book_lstm.AttentionSeq2seq(V, 16, 32, backend="vectorized")
    ids = model.generate(xs[:1], int(ts[0, 0]), 10)
    assert isinstance(ids, list) and len(ids) == 10 and all(0 <= i < V for i in ids)
    model.forward(xs, ts)  # the book's attention plot reads the weights of the last forward
    w = np.array(model.decoder.attention.attention_weights)
    assert w.shape == (ts.shape[1] - 1, 4, xs.shape[1])
    assert_close(w.sum(axis=2), np.ones(w.shape[:2]), terms=1.0, n=2 * w.shape[2] + 8)


def test_books_trainer_and_eval_seq2seq_run_the_attention_seq2seq():
    trainer = pytest.importorskip("fastattn.trainer")
    optim = pytest.importorskip("fastattn.optim")
    sequence = pytest.importorskip("dataset.sequence")
    xs, ts, V = _date_slice(64)
    char_to_id, id_to_char = sequence.get_vocab()
    model = book_lstm.AttentionSeq2seq(V, 16, 32, backend="numba")
    tr = trainer.Trainer(model, optim.Adam())
    tr.fit(xs, ts, max_epoch=1, batch_size=16, max_grad=5.0, eval_interval=1)
    assert len(tr.loss_list) >= 1 and np.isfinite(tr.loss_list).all()
    for i in range(3):
        ok = trainer.eval_seq2seq(model, xs[[i]], ts[[i]], id_to_char, verbose=False,
                                  is_reverse=True)
        assert ok in (0, 1)


def _migration_example():
    """The model code of the README's migration example (fastattn's imports only)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = next(b for b in blocks if b.startswith("# attention_seq2seq.py"))
    assert not re.search(r"^(from|import) common", code, flags=re.M)  # no book code needed
    namespace = {}
    exec(compile(code, path, "exec"), namespace)
    return namespace


def test_the_migration_guides_example_model_trains_the_same_on_every_backend():
    example = _migration_example()
    N, steps = 8, 4
    xs, ts, V = _date_slice(N * steps)
    losses = {}
    for backend in BACKENDS:
        with fastattn.use_backend(backend):
            model = example["AttentionSeq2seq"](V, 8, 16, seed=0)
            losses[backend] = book_lstm.train_steps(model, xs, ts, N, steps,
                                                    book_lstm.adam(1e-2))
            ids = model.generate(xs[:1], int(ts[0, 0]), ts.shape[1] - 1)
        assert len(ids) == ts.shape[1] - 1 and all(0 <= i < V for i in ids)
    assert losses["loop"][-1] < losses["loop"][0]
    for backend in FAST:
        np.testing.assert_allclose(losses[backend], losses["loop"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fortran_ordered_inputs_give_the_results_of_c_ordered_ones(backend):
    """Inputs and upstream gradients in Fortran order (np.asfortranarray, or a transposed
    view) give bit for bit what the same values in C order give on the same backend: the
    kernels must only ever see C-contiguous arrays."""
    rng = np.random.default_rng(5)
    N, T_enc, T_dec, H = 3, 7, 5, 6
    hs, hd = _rand(rng, (N, T_enc, H), np.float64), _rand(rng, (N, T_dec, H), np.float64)
    h, a = _rand(rng, (N, H), np.float64), rng.random((N, T_enc))
    d_ctx, d_c, d_a = (_rand(rng, s, np.float64) for s in ((N, T_dec, H), (N, H), (N, T_enc)))
    f = np.asfortranarray
    cases = [(TimeAttention, (hs, hd), d_ctx), (AttentionWeight, (hs, h), d_a),
             (WeightSum, (hs, a), d_c), (Attention, (hs, h), d_c)]
    for cls, args, dout in cases:
        want_out = (c_layer := cls(backend=backend)).forward(*args)
        want_grads = c_layer.backward(dout)
        for make in (f, lambda z: np.ascontiguousarray(z.T).T):  # Fortran order, a .T view
            layer = cls(backend=backend)
            np.testing.assert_array_equal(layer.forward(*map(make, args)), want_out)
            for got, want in zip(layer.backward(make(dout)), want_grads, strict=True):
                np.testing.assert_array_equal(got, want)
