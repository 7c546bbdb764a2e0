"""The book's base layers: behaviour, float64 gradient checks on every backend, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_layer_grads
from helpers import assert_close, kernel_bounds, matmul_terms

from fastattn.kernels import BACKENDS
from fastattn.layers import (
    Affine,
    Embedding,
    Softmax,
    SoftmaxWithLoss,
    TimeAffine,
    TimeDropout,
    TimeEmbedding,
    TimeSoftmaxWithLoss,
)

# float64 gradient checks: |analytic - numeric| <= 1e-7 + 1e-5 |numeric| (gradcheck defaults)
# float32 results against float64 NumPy: helpers.assert_close (n * eps * sum|terms|)


def rng(seed=0):
    return np.random.default_rng(seed)


def affine_weights(D, H, dtype=np.float64, seed=0):
    r = rng(seed)
    return r.standard_normal((D, H)).astype(dtype), r.standard_normal(H).astype(dtype)


# --------------------------------------------------------------------------- gradient checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_gradients(backend):
    W, b = affine_weights(4, 3)
    layer = Affine(W, b, backend=backend)
    check_layer_grads(layer, layer.forward, [rng(1).standard_normal((5, 4))],
                      expect={"params", "inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_affine_gradients(backend):
    W, b = affine_weights(4, 3)
    layer = TimeAffine(W, b, backend=backend)
    check_layer_grads(layer, layer.forward, [rng(1).standard_normal((2, 3, 4))],
                      expect={"params", "inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_gradients(backend):
    layer = Softmax(backend=backend)
    check_layer_grads(layer, layer.forward, [rng(1).standard_normal((2, 3, 5))],
                      expect={"inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("one_hot", [False, True])
def test_softmax_with_loss_gradients(backend, one_hot):
    x = rng(1).standard_normal((6, 5))
    t = rng(2).integers(0, 5, size=6)
    if one_hot:
        t = np.eye(5)[t]
    layer = SoftmaxWithLoss(backend=backend)
    check_layer_grads(layer, lambda x: layer.forward(x, t), [x], expect={"inputs[0]"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_gradients_with_repeated_ids(backend):
    W = rng(0).standard_normal((5, 3))
    idx = np.array([0, 2, 2, 4, 2, 0])
    layer = Embedding(W, backend=backend)
    check_layer_grads(layer, layer.forward, [idx], expect={"params"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_embedding_gradients(backend):
    W = rng(0).standard_normal((5, 3))
    xs = np.array([[0, 1, 1], [4, 1, 3]])
    layer = TimeEmbedding(W, backend=backend)
    check_layer_grads(layer, layer.forward, [xs], expect={"params"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("one_hot", [False, True])
def test_time_softmax_with_loss_gradients_with_ignored_targets(backend, one_hot):
    N, T, V = 2, 4, 5
    xs = rng(1).standard_normal((N, T, V))
    ts = rng(2).integers(0, V, size=(N, T))
    ts[0, 1] = ts[1, 3] = -1
    if one_hot:
        ts_in = np.eye(V)[np.where(ts < 0, 0, ts)]
        ts_in[ts < 0] = 0
        ts_in[ts < 0, 0] = 1  # one-hot cannot say "ignore": these become class 0
        ts = np.where(ts < 0, 0, ts)
    else:
        ts_in = ts
    layer = TimeSoftmaxWithLoss(backend=backend)
    check_layer_grads(layer, lambda x: layer.forward(x, ts_in), [xs], expect={"inputs[0]"})


@pytest.mark.parametrize("train", [True, False])
def test_time_dropout_gradients(train):
    layer = TimeDropout(0.4)
    layer.train_flg = train

    def forward(x):
        np.random.seed(3)  # the same mask on every call
        return layer.forward(x)

    check_layer_grads(layer, forward, [rng(1).standard_normal((2, 3, 4))], expect={"inputs[0]"})


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_matches_numpy_and_keeps_float32(backend):
    W, b = affine_weights(4, 3, np.float32)
    x = rng(1).standard_normal((2, 5, 4)).astype(np.float32)
    layer = TimeAffine(W, b, backend=backend)
    out = layer.forward(x)
    assert out.dtype == np.float32
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    assert_close(out, x64 @ W64 + b, terms=matmul_terms(x, W) + np.abs(b), n=W.shape[0] + 3)
    dout = rng(2).standard_normal(out.shape).astype(np.float32)
    dx = layer.backward(dout)
    assert dx.dtype == np.float32 and layer.grads[0].dtype == np.float32
    d64 = dout.astype(np.float64)
    assert_close(dx, d64 @ W64.T, terms=matmul_terms(dout, W.T), n=W.shape[1] + 2)
    assert_close(layer.grads[1], d64.sum(axis=(0, 1)), terms=np.abs(d64).sum(axis=(0, 1)),
                 n=dout.shape[0] * dout.shape[1] + 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_backward_sums_repeated_ids_like_add_at(backend):
    V, D = 6, 4
    W = rng(0).standard_normal((V, D)).astype(np.float32)
    xs = np.array([[1, 1, 1, 5], [0, 1, 5, 5]])
    layer = TimeEmbedding(W, backend=backend)
    out = layer.forward(xs)
    np.testing.assert_array_equal(out, W[xs])
    dout = rng(1).standard_normal((2, 4, D)).astype(np.float32)
    assert layer.backward(dout) is None
    expect = np.zeros(W.shape)
    np.add.at(expect, xs, dout.astype(np.float64))
    [(terms, n)] = kernel_bounds("embedding_backward", (xs, dout, V))
    assert_close(layer.grads[0], expect, terms=terms, n=n)
    assert not layer.grads[0][[2, 3, 4]].any()  # rows never looked up get no gradient


def test_embedding_grads_are_written_in_place_and_overwritten():
    W = rng(0).standard_normal((4, 2))
    layer = Embedding(W)
    g = layer.grads[0]
    layer.forward(np.array([0, 0]))
    layer.backward(np.ones((2, 2)))
    layer.forward(np.array([3]))
    layer.backward(np.ones((1, 2)))
    assert layer.grads[0] is g
    np.testing.assert_array_equal(g, [[0, 0], [0, 0], [0, 0], [1, 1]])  # not accumulated


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_softmax_with_loss_ignores_label_minus_one(backend):
    N, T, V = 3, 4, 6
    xs = rng(1).standard_normal((N, T, V))
    ts = rng(2).integers(0, V, size=(N, T))
    ts[0, 0] = ts[2, 1] = ts[2, 3] = -1
    layer = TimeSoftmaxWithLoss(backend=backend)
    loss = layer.forward(xs, ts)
    # NumPy reference: mean of -log softmax over the kept targets only
    p = np.exp(xs - xs.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    keep = ts != -1
    expect = -np.mean(np.log(p[keep, ts[keep]]))
    assert loss == pytest.approx(expect, rel=1e-12)
    dx = layer.backward()
    assert not dx[~keep].any()  # ignored positions get no gradient
    # changing an ignored position's scores does not change the loss
    xs2 = xs.copy()
    xs2[0, 0] += 10.0
    assert layer.forward(xs2, ts) == pytest.approx(expect, rel=1e-12)


def test_time_softmax_with_loss_one_hot_equals_ids():
    N, T, V = 2, 3, 4
    xs = rng(1).standard_normal((N, T, V)).astype(np.float32)
    ts = rng(2).integers(0, V, size=(N, T))
    a, b = TimeSoftmaxWithLoss(), TimeSoftmaxWithLoss()
    assert a.forward(xs, ts) == b.forward(xs, np.eye(V, dtype=np.float32)[ts])
    np.testing.assert_array_equal(a.backward(), b.backward())


def test_time_softmax_with_loss_all_ignored_gives_zero():
    layer = TimeSoftmaxWithLoss()
    xs = rng(1).standard_normal((1, 2, 3))
    assert layer.forward(xs, np.full((1, 2), -1)) == 0.0
    assert not layer.backward().any()


def test_softmax_with_loss_matches_numpy():
    x = rng(1).standard_normal((4, 3))
    t = np.array([0, 2, 1, 2])
    layer = SoftmaxWithLoss()
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    assert layer.forward(x, t) == pytest.approx(-np.mean(np.log(p[np.arange(4), t])), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_of_a_target_whose_probability_underflows_is_its_score_below_the_logsumexp(backend):
    """Scores of +-1e4: the target's softmax probability underflows to 0, yet its -log is
    logsumexp(x) - x[t], 2e4 here (not -log of the smallest normal number, 87.3 in float32).
    Both losses against the float64 logsumexp: the probability of an ordinary row is off by
    (V + 2 spread + 8) eps relatively (its softmax's bound), the log of it by as much
    absolutely, plus the roundings of the loss's sum."""
    x = np.array([[1e4, -1e4, 0.0], [0.0, 1.0, 2.0], [-1e4, 1e4, 3.0]], np.float32)
    t = np.array([1, 2, 0])
    x64 = x.astype(np.float64)
    m = x64.max(axis=1)
    lse = m + np.log(np.exp(x64 - m[:, None]).sum(axis=1))
    want = float(np.mean(lse - x64[np.arange(3), t]))  # (2e4 + 0.41 + 2e4) / 3
    terms = float(np.mean(np.abs(lse) + np.abs(x64[np.arange(3), t]) + 1))
    n = x.shape[1] + 2 * 2 + 8 + 3  # V + 2 spread (of the ordinary row) + 8, then the sum
    layer = SoftmaxWithLoss(backend=backend)
    assert_close(np.float32(layer.forward(x, t)), want, terms=terms, n=n)  # a float32 loss
    layer = TimeSoftmaxWithLoss(backend=backend)
    assert_close(np.float32(layer.forward(x[None], t[None])), want, terms=terms, n=n)


def test_loss_is_finite_for_extreme_scores():
    xs = np.array([[[0.0, 1e4, -1e4]]], dtype=np.float32)
    layer = TimeSoftmaxWithLoss()
    loss = layer.forward(xs, np.array([[2]]))
    assert np.isfinite(loss) and loss > 80  # -log of the smallest float32 normal
    assert np.isfinite(layer.backward()).all()


def test_time_dropout_train_and_eval():
    x = np.ones((20, 30, 10), dtype=np.float32)
    layer = TimeDropout(0.3, seed=0)
    assert layer.train_flg
    y = layer.forward(x)
    assert y.dtype == np.float32
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)  # inverted dropout scale
    assert abs(kept.mean() - 0.7) < 0.03
    dout = np.full_like(x, 2.0)
    np.testing.assert_array_equal(layer.backward(dout), np.where(kept, 2 / np.float32(0.7), 0))
    layer.train_flg = False
    np.testing.assert_array_equal(layer.forward(x), x)
    np.testing.assert_array_equal(layer.backward(dout), dout)


def test_time_dropout_follows_numpy_global_seed():
    x = np.ones((4, 5, 6))
    a, b = TimeDropout(0.5), TimeDropout(0.5)
    np.random.seed(7)
    ya = a.forward(x)
    np.random.seed(7)
    yb = b.forward(x)
    np.testing.assert_array_equal(ya, yb)
    assert (ya == 0).any() and (ya != 0).any()


def test_time_dropout_with_a_seed_repeats_its_mask_whatever_the_global_state():
    """A seeded TimeDropout draws from its own generator: two layers of one seed drop the same
    elements even when NumPy's global state differs, another seed drops others, and NumPy's
    global state is left alone."""
    x = np.ones((4, 5, 6))
    masks = []
    for global_seed, seed in [(1, 3), (2, 3), (1, 4)]:
        np.random.seed(global_seed)
        state = np.random.get_state()[1].copy()
        masks.append(TimeDropout(0.5, seed=seed).forward(x) != 0)
        np.testing.assert_array_equal(np.random.get_state()[1], state)
    np.testing.assert_array_equal(masks[0], masks[1])
    assert (masks[0] != masks[2]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_of_an_empty_last_axis_raises_naming_it(backend):
    with pytest.raises(ValueError, match="x must have a last axis of at least 1"):
        Softmax(backend=backend).forward(np.zeros((2, 0)))


def test_time_embedding_takes_only_2d_ids_and_embedding_any_shape():
    W = rng(0).standard_normal((5, 3))
    for ids in (np.array([0, 1, 4]), np.zeros((2, 3, 1), dtype=np.int64)):
        with pytest.raises(ValueError, match="xs must be 2-D"):
            TimeEmbedding(W).forward(ids)
        np.testing.assert_array_equal(Embedding(W).forward(ids), W[ids])


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_of_one_id_gives_its_row_and_its_gradient(backend):
    """A 0-d id gives W[id] of shape (D,) and takes dout (D,), as the book's W[idx]; it gave
    (1, D) and wanted dout (1, D)."""
    W = rng(0).standard_normal((5, 3))
    layer = Embedding(W, backend=backend)
    for idx in (2, np.int32(2), np.array(2)):
        np.testing.assert_array_equal(layer.forward(idx), W[2])
    dout = rng(1).standard_normal(3)
    assert layer.backward(dout) is None
    want = np.zeros_like(W)
    want[2] = dout
    np.testing.assert_array_equal(layer.grads[0], want)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make", [
    lambda W: Embedding(W), lambda W: TimeEmbedding(W),
])
@pytest.mark.parametrize("ids, err", [
    (np.array([[0, 5]]), ValueError),  # >= V
    (np.array([[-1, 0]]), ValueError),  # negative
    (np.array([[0.0, 1.0]]), TypeError),  # float ids
    (np.array([[True, False]]), TypeError),
])
def test_embedding_rejects_bad_ids(make, ids, err):
    layer = make(np.zeros((5, 2)))
    with pytest.raises(err, match="id"):
        layer.forward(ids)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.complex128])
def test_weights_with_unsupported_dtype_raise_type_error(dtype):
    W = np.zeros((3, 2), dtype=dtype)
    b = np.zeros(2, dtype=dtype)
    for make in (lambda: Affine(W, b), lambda: TimeAffine(W, b), lambda: Embedding(W),
                 lambda: TimeEmbedding(W)):
        with pytest.raises(TypeError, match="W"):
            make()


def test_weights_of_mixed_dtypes_raise_type_error():
    with pytest.raises(TypeError):
        TimeAffine(np.zeros((3, 2), np.float32), np.zeros(2, np.float64))


def test_bias_of_wrong_size_raises():
    with pytest.raises(ValueError, match="b"):
        TimeAffine(np.zeros((3, 2)), np.zeros(3))


@pytest.mark.parametrize("layer, args, dout", [
    (lambda: Affine(*affine_weights(3, 2)), (np.zeros((4, 3)),), np.zeros((4, 3))),
    (lambda: TimeAffine(*affine_weights(3, 2)), (np.zeros((1, 4, 3)),), np.zeros((1, 4, 3))),
    (lambda: Embedding(np.zeros((5, 2))), (np.array([1, 2]),), np.zeros((2, 3))),
    (lambda: TimeEmbedding(np.zeros((5, 2))), (np.array([[1, 2]]),), np.zeros((2, 1, 2))),
    (lambda: Softmax(), (np.zeros((2, 3)),), np.zeros((3, 2))),
    (lambda: TimeDropout(), (np.zeros((2, 3)),), np.zeros((2, 4))),
])
def test_dout_of_wrong_shape_raises_value_error(layer, args, dout):
    layer = layer()
    layer.forward(*args)
    with pytest.raises(ValueError, match="dout"):
        layer.backward(dout)


@pytest.mark.parametrize("layer", [
    lambda: Affine(*affine_weights(3, 2)), lambda: TimeAffine(*affine_weights(3, 2)),
    lambda: Embedding(np.zeros((5, 2))), lambda: TimeEmbedding(np.zeros((5, 2))),
    Softmax, SoftmaxWithLoss, TimeSoftmaxWithLoss, TimeDropout,
])
def test_backward_before_forward_raises_runtime_error(layer):
    layer = layer()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 1, 1)))


def test_affine_input_of_wrong_width_raises():
    with pytest.raises(ValueError, match="x"):
        TimeAffine(*affine_weights(3, 2)).forward(np.zeros((1, 2, 4)))


def test_time_softmax_with_loss_rejects_bad_targets():
    layer = TimeSoftmaxWithLoss()
    xs = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="ts"):
        layer.forward(xs, np.array([[0, 3]]))  # out of range
    with pytest.raises(ValueError, match="ts"):
        layer.forward(xs, np.array([[0, -2]]))  # negative but not the ignore label
    with pytest.raises(ValueError, match="ts"):
        layer.forward(xs, np.array([0, 1]))  # wrong shape
    with pytest.raises(TypeError, match="ts"):
        layer.forward(xs, np.array([[0.0, 1.0]]))


def test_unknown_backend_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError, match="vectorized"):
        TimeEmbedding(np.zeros((3, 2)), backend="cuda")


def test_dropout_ratio_out_of_range_raises():
    with pytest.raises(ValueError, match="dropout_ratio"):
        TimeDropout(1.0)


# --------------------------------------------------------------------------- the helper itself


class _Scale:
    """y = w * x, with a deliberately adjustable backward, to test the gradient checker."""

    def __init__(self, factor=1.0, rebind=False):
        self.params = [np.array([2.0])]
        self.grads = [np.zeros(1)]
        self.factor, self.rebind = factor, rebind

    def forward(self, x):
        self.x = x
        return self.params[0] * x

    def backward(self, dout):
        dw = self.factor * np.array([np.sum(dout * self.x)])
        if self.rebind:
            self.grads[0] = dw
        else:
            self.grads[0][...] = dw
        return dout * self.params[0]


def test_gradcheck_accepts_right_and_rejects_wrong_gradients():
    x = rng(1).standard_normal(4)
    layer = _Scale()
    errors = check_layer_grads(layer, layer.forward, [x], expect={"params", "inputs[0]"})
    assert set(errors) == {"params[0]", "inputs[0]"} and max(errors.values()) < 1e-8
    layer = _Scale(factor=1.001)
    with pytest.raises(AssertionError, match=r"params\[0\]"):
        check_layer_grads(layer, layer.forward, [x], expect={"params", "inputs[0]"})
    layer = _Scale(rebind=True)
    with pytest.raises(AssertionError, match="in place"):
        check_layer_grads(layer, layer.forward, [x], expect={"params", "inputs[0]"})


def test_gradcheck_sums_the_grads_of_tied_params():
    layer = _Scale()
    layer.params = layer.params * 2  # the same array twice: its gradient is split in halves
    layer.grads = [np.zeros(1), np.zeros(1)]

    def backward(dout):
        dw = np.sum(dout * layer.x) / 2
        layer.grads[0][...] = dw
        layer.grads[1][...] = dw
        return None

    check_layer_grads(layer, layer.forward, [rng(1).standard_normal(3)], backward_fn=backward,
                      no_grad=(0,), expect={"params[0]"})


def test_gradcheck_fails_on_a_missing_input_gradient_and_on_checking_nothing():
    x = rng(1).standard_normal(4)
    layer = _Scale()
    with pytest.raises(AssertionError, match=r"no gradient \(None\) for the float inputs\[0\]"):
        check_layer_grads(layer, layer.forward, [x], expect={"params", "inputs[0]"},
                          backward_fn=lambda d: (layer.backward(d), None)[1])
    with pytest.raises(AssertionError, match="expected"):
        check_layer_grads(layer, layer.forward, [x], expect={"params[0]"})
    layer.params, layer.grads = [], []
    with pytest.raises(AssertionError, match="nothing to check"):
        check_layer_grads(layer, lambda x: 2 * x, [x], no_grad=(0,), expect=set(),
                          backward_fn=lambda d: None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_that_returns_no_gradient_fails_the_gradient_check(backend, monkeypatch):
    """The gradient check of Softmax must not pass a backward that returns None."""
    layer = Softmax(backend=backend)
    monkeypatch.setattr(layer, "backward", lambda dout: None)
    with pytest.raises(AssertionError, match="no gradient"):
        check_layer_grads(layer, layer.forward, [rng(1).standard_normal((2, 3, 4))],
                          expect={"inputs[0]"})
