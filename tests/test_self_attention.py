"""The seed notebook's self-attention layers: gradients, the seed's demo, its bugs, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_layer_grads
from helpers import assert_close, assert_within_float32_error, load_repo_file

from fastattn.kernels import BACKENDS
from fastattn.self_attention import (
    CompatibilityFunction,
    TimeKeyLayer,
    TimeQueryLayer,
    TimeValueLayer,
    WeightedValue,
)

# float64 gradient checks: |analytic - numeric| <= 1e-7 + 1e-5 |numeric| (gradcheck defaults)
# float32 results of the whole demo: within helpers.K_FLOAT32 times a float32 run's own error
# against the float64 loop reference (helpers.assert_within_float32_error). The loop kernels sum
# in float64, so the float32 error of a fast backend is measured on the *other* fast backend
# (both sum in float32): a bug in one is far beyond the other's rounding.
OTHER = {"loop": "loop", "vectorized": "numba", "numba": "vectorized"}


def ids(B, T, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_scores(cf, xs):
    """softmax(Q K^T / sqrt(d)) in float64 NumPy from the layer's own weights and own d."""
    W_embed, W_key, b_key, W_query, b_query = (p.astype(np.float64) for p in cf.params)
    k = W_embed[xs] @ W_key + b_key
    q = W_query[xs] + b_query
    d = W_key.shape[1]
    return np_softmax(q @ k.transpose(0, 2, 1) / math.sqrt(d))


class SelfAttention:
    """CompatibilityFunction then WeightedValue as one layer, for whole-pipeline checks."""

    def __init__(self, V, D, d, **kw):
        self.cf = CompatibilityFunction(V, D, d, seed=1, **kw)
        self.wv = WeightedValue(V, d, seed=2, **kw)
        self.params = self.cf.params + self.wv.params
        self.grads = self.cf.grads + self.wv.grads

    def forward(self, xs):
        self.score = self.cf.forward(xs)
        return self.wv.forward(xs, self.score)

    def backward(self, dZ):
        self.dscore, self.dvalue = self.wv.backward(dZ)
        return self.cf.backward(self.dscore)


# --------------------------------------------------------------------------- gradient checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_layer_gradients(backend):
    layer = TimeKeyLayer(6, 4, 3, backend=backend, dtype=np.float64, seed=0)
    check_layer_grads(layer, layer.forward, [ids(2, 5, 6)], expect={"params"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [TimeQueryLayer, TimeValueLayer])
def test_query_and_value_layer_gradients_for_ids(backend, cls):
    layer = cls(6, 3, backend=backend, dtype=np.float64, seed=0)
    xs = np.array([[0, 2, 2, 5], [2, 2, 1, 0]])  # repeated ids: the scatter-add must sum
    check_layer_grads(layer, layer.forward, [xs], expect={"params"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [TimeQueryLayer, TimeValueLayer])
def test_query_and_value_layer_gradients_for_float_input(backend, cls):
    layer = cls(5, 3, backend=backend, dtype=np.float64, seed=0)
    xs = np.random.default_rng(1).standard_normal((2, 4, 5))
    errors = check_layer_grads(layer, layer.forward, [xs], expect={"params", "inputs[0]"})
    assert "inputs[0]" in errors  # dxs was returned and checked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [3, 5])  # d == T = 5: a transposed dkey would pass shape checks
def test_compatibility_function_gradients(backend, d):
    layer = CompatibilityFunction(7, 4, d, backend=backend, dtype=np.float64, seed=0)
    check_layer_grads(layer, layer.forward, [ids(2, 5, 7)], expect={"params"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_value_gradients_for_params_and_score(backend):
    layer = WeightedValue(6, 3, backend=backend, dtype=np.float64, seed=0)
    xs = ids(2, 4, 6)
    score = np_softmax(np.random.default_rng(1).standard_normal((2, 4, 4)))
    errors = check_layer_grads(layer, layer.forward, [xs, score],
                               backward_fn=lambda dZ: [None, layer.backward(dZ)[0]],
                               expect={"params", "inputs[1]"})
    assert set(errors) == {"params[0]", "params[1]", "inputs[1]"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_value_dvalue_is_score_transposed_times_dz(backend):
    layer = WeightedValue(6, 3, backend=backend, dtype=np.float64, seed=0)
    xs = ids(2, 4, 6)
    rng = np.random.default_rng(1)
    score = np_softmax(rng.standard_normal((2, 4, 4)))
    layer.forward(xs, score)
    dZ = rng.standard_normal((2, 4, 3))
    _, dvalue = layer.backward(dZ)
    np.testing.assert_allclose(dvalue, score.transpose(0, 2, 1) @ dZ, rtol=1e-12, atol=1e-14)


def test_weighted_value_keeps_the_values_and_their_transpose_as_the_seed_did():
    """out_value (B, T, d) is the value layer's output W[xs] + b, and out_value_T its
    transpose (B, d, T), the seed's attribute."""
    layer = WeightedValue(6, 3, dtype=np.float64, seed=0)
    W, b = layer.params
    b += 0.5  # a bias that shows
    xs = ids(2, 4, 6)
    layer.forward(xs, np_softmax(np.random.default_rng(1).standard_normal((2, 4, 4))))
    np.testing.assert_array_equal(layer.out_value, W[xs] + b)
    assert layer.out_value_T.shape == (2, 3, 4)
    np.testing.assert_array_equal(layer.out_value_T, (W[xs] + b).transpose(0, 2, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_self_attention_gradients(backend):
    layer = SelfAttention(7, 4, 3, backend=backend, dtype=np.float64)
    check_layer_grads(layer, layer.forward, [ids(2, 5, 7)], expect={"params"})


# --------------------------------------------------------------------------- the seed's demo


@pytest.fixture(scope="module")
def date_questions():
    sequence = pytest.importorskip("dataset.sequence")
    (x_train, _), _ = sequence.load_data("date.txt")
    char_to_id, _ = sequence.get_vocab()
    return x_train[:10], len(char_to_id)


def run_demo(xs, V, D, d, backend, dtype=np.float32):
    """The seed notebook's demo: forward, then backward from dZ = ones."""
    comp_func = CompatibilityFunction(V, D, d, backend=backend, dtype=dtype, seed=0)
    weight_func = WeightedValue(V, d, backend=backend, dtype=dtype, seed=1)
    score = comp_func.forward(xs)
    Z = weight_func.forward(xs, score)
    dscore, dvalue = weight_func.backward(np.ones_like(Z))
    assert comp_func.backward(dscore) is None
    grads = [g.copy() for g in comp_func.grads + weight_func.grads]
    return dict(score=score, Z=Z, dscore=dscore, dvalue=dvalue), grads


@pytest.fixture(scope="module")
def demo_loop(date_questions):
    xs, V = date_questions
    return run_demo(xs, V, 512, 64, "loop")


@pytest.fixture(scope="module")
def demo_loop64(date_questions):
    xs, V = date_questions
    return run_demo(xs, V, 512, 64, "loop", dtype=np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_demo_shapes_and_backends_agree(date_questions, demo_loop, demo_loop64, backend):
    xs, V = date_questions
    assert xs.shape == (10, 29)
    out, grads = demo_loop if backend == "loop" else run_demo(xs, V, 512, 64, backend)
    shapes = dict(score=(10, 29, 29), dscore=(10, 29, 29), dvalue=(10, 29, 64), Z=(10, 29, 64))
    for name, shape in shapes.items():
        assert out[name].shape == shape, name
        assert out[name].dtype == np.float32, name
        assert np.isfinite(out[name]).all(), name
    assert_close(out["score"].sum(axis=-1), np.ones((10, 29)), terms=1.0, n=2 * 29 + 8,
                 err_msg="score row sums")
    other = OTHER[backend]
    ref_out, ref_grads = demo_loop if other == "loop" else run_demo(xs, V, 512, 64, other)
    out64, grads64 = demo_loop64
    for name in shapes:
        assert_within_float32_error(out[name], out64[name], ref_out[name], err_msg=name)
    # the key bias shifts every score of a row by the same amount, which the softmax ignores:
    # its gradient (grads[2]) is zero up to rounding, as the reference's own
    for k, (g, r64, r32) in enumerate(zip(grads, grads64, ref_grads, strict=True)):
        assert_within_float32_error(g, r64, r32, err_msg=f"grads[{k}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_demo_gradients_in_float64(date_questions, backend):
    xs, V = date_questions
    # the loop backend runs a shorter piece of the same questions, and samples the elements
    kw = dict(max_per_array=25) if backend == "loop" else {}
    if backend == "loop":
        xs = xs[:2, :12]
    layer = SelfAttention(V, 6, 4, backend=backend, dtype=np.float64)
    check_layer_grads(layer, layer.forward, [xs], **kw, expect={"params"})
    assert layer.score.shape == xs.shape + (xs.shape[1],)


# --------------------------------------------------------------------------- the seed's bugs


def test_compatibility_function_uses_its_own_d():
    xs = ids(3, 6, 9)
    for d in (2, 16):
        cf = CompatibilityFunction(9, 5, d, dtype=np.float64, seed=d)
        np.testing.assert_allclose(cf.forward(xs), np_scores(cf, xs), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_backward_divides_by_sqrt_d(backend):
    """The query bias gradient, computed in NumPy by the chain rule with a 1/sqrt(d) scale."""
    V, D, d = 8, 5, 4
    cf = CompatibilityFunction(V, D, d, backend=backend, dtype=np.float64, seed=0)
    xs = ids(2, 6, V)
    score = cf.forward(xs)
    dscore = np.random.default_rng(1).standard_normal(score.shape)
    cf.backward(dscore)
    W_embed, W_key, b_key, _, _ = cf.params
    k = W_embed[xs] @ W_key + b_key
    ds = score * (dscore - (score * dscore).sum(axis=-1, keepdims=True))
    dq = ds @ k / math.sqrt(d)
    np.testing.assert_allclose(cf.query_grads[1], dq.sum(axis=(0, 1)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dkey_reaching_the_key_layer_has_shape_btd(backend, monkeypatch):
    cf = CompatibilityFunction(6, 4, 3, backend=backend, dtype=np.float64, seed=0)
    seen = []
    original = cf.time_key_layer.backward
    monkeypatch.setattr(cf.time_key_layer, "backward", lambda dk: (seen.append(dk.shape),
                                                                    original(dk))[1])
    cf.forward(ids(2, 5, 6))
    cf.backward(np.ones((2, 5, 5)))
    assert seen == [(2, 5, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dvalue_is_not_zero_and_value_weights_get_gradients(backend):
    wv = WeightedValue(6, 3, backend=backend, seed=0)
    xs = ids(2, 4, 6)
    wv.forward(xs, np.full((2, 4, 4), 0.25, dtype=np.float32))
    _, dvalue = wv.backward(np.ones((2, 4, 3), dtype=np.float32))
    np.testing.assert_allclose(dvalue, 1.0, rtol=1e-6)  # each value row is used with weight 1
    W, b = wv.params
    assert wv.grads[0] is wv.time_value_layer.grads[0]
    np.testing.assert_allclose(wv.grads[1], 8.0, rtol=1e-6)  # 2*4 positions, dvalue = 1
    counts = np.bincount(xs.ravel(), minlength=6)
    np.testing.assert_allclose(wv.grads[0], np.repeat(counts[:, None], 3, axis=1), rtol=1e-6)


def test_grads_do_not_grow_with_forward_calls():
    layer = SelfAttention(6, 4, 3)
    n = len(layer.grads)
    for _ in range(3):
        layer.forward(ids(2, 4, 6))
        layer.backward(np.ones((2, 4, 3), dtype=np.float32))
    for lay in (layer.cf, layer.wv):
        assert len(lay.grads) == len(lay.params)
    assert len(layer.grads) == n == len(layer.params)


@pytest.mark.parametrize("make, n", [
    (lambda: TimeKeyLayer(5, 4, 3), 3),
    (lambda: TimeQueryLayer(5, 3), 2),
    (lambda: TimeValueLayer(5, 3), 2),
    (lambda: CompatibilityFunction(5, 4, 3), 5),
    (lambda: WeightedValue(5, 3), 2),
])
def test_params_and_grads_are_flat_lists_of_matching_arrays(make, n):
    layer = make()
    assert len(layer.params) == len(layer.grads) == n
    for p, g in zip(layer.params, layer.grads, strict=True):
        assert isinstance(p, np.ndarray) and isinstance(g, np.ndarray)
        assert p.shape == g.shape and p.dtype == g.dtype == np.float32


def test_compatibility_function_keeps_key_and_query_lists():
    cf = CompatibilityFunction(5, 4, 3)
    assert cf.params == cf.key_params + cf.query_params  # the same arrays, keys first
    assert all(a is b for a, b in zip(cf.grads, cf.key_grads + cf.query_grads, strict=True))
    assert [p.shape for p in cf.key_params] == [(5, 4), (4, 3), (3,)]
    assert [p.shape for p in cf.query_params] == [(5, 3), (3,)]


def test_grads_are_written_in_place():
    layer = SelfAttention(6, 4, 3)
    before = list(layer.grads)
    layer.forward(ids(2, 4, 6))
    layer.backward(np.ones((2, 4, 3), dtype=np.float32))
    assert all(a is b for a, b in zip(layer.grads, before, strict=True))
    assert all(g.any() for g in layer.grads)


def test_initial_weights_are_scaled_normals_not_uniform():
    cf = CompatibilityFunction(50, 64, 32, seed=0)
    W_embed, W_key, b_key, W_query, _ = cf.params
    for W, std in ((W_embed, 1.0), (W_key, 1 / 8), (W_query, 1.0)):
        assert (W < 0).mean() == pytest.approx(0.5, abs=0.05)
        assert W.std() == pytest.approx(std, rel=0.1)
    assert not b_key.any()


def test_key_and_query_weights_are_independent_draws():
    """One seed gives the key and the query layer different streams of normals: the query
    table is not the start of the embedding table's draws again. Independent draws have a
    sample correlation of sd 1 / sqrt(n); the bound is 5 of those."""
    cf = CompatibilityFunction(50, 64, 32, seed=0)
    W_embed, W_key, _, W_query, _ = cf.params
    for other in (W_embed, W_key):
        n = min(W_query.size, other.size)
        corr = np.corrcoef(W_query.ravel()[:n], other.ravel()[:n])[0, 1]
        assert abs(corr) <= 5 / math.sqrt(n), corr


def test_seed_makes_weights_reproducible_and_dtype_is_kept():
    a = CompatibilityFunction(5, 4, 3, seed=7, dtype=np.float64)
    b = CompatibilityFunction(5, 4, 3, seed=7, dtype=np.float64)
    c = CompatibilityFunction(5, 4, 3, seed=8, dtype=np.float64)
    assert all(np.array_equal(p, q) for p, q in zip(a.params, b.params, strict=True))
    assert not np.array_equal(a.params[0], c.params[0])
    assert all(p.dtype == np.float64 for p in a.params)
    assert a.forward(ids(1, 3, 5)).dtype == np.float64


def test_query_layer_on_ids_equals_affine_on_one_hot():
    V, d = 7, 3
    q1, q2 = TimeQueryLayer(V, d, dtype=np.float64, seed=0), TimeQueryLayer(V, d,
                                                                            dtype=np.float64,
                                                                            seed=0)
    xs = ids(2, 5, V)
    np.testing.assert_allclose(q1.forward(xs), q2.forward(np.eye(V)[xs]), rtol=1e-12)
    dout = np.random.default_rng(1).standard_normal((2, 5, d))
    dx1, dx2 = q1.backward(dout), q2.backward(dout)
    assert dx2.shape == (2, 5, V)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-12, atol=1e-14)
    for g1, g2 in zip(q1.grads, q2.grads, strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make", [
    lambda: TimeKeyLayer(5, 4, 3), lambda: TimeQueryLayer(5, 3), lambda: TimeValueLayer(5, 3),
    lambda: CompatibilityFunction(5, 4, 3),
])
@pytest.mark.parametrize("xs, err", [
    (np.array([[0, 5]]), ValueError),
    (np.array([[-1, 0]]), ValueError),
    (np.array([[0.0, 1.0]]), TypeError),
    (np.array([0, 1]), ValueError),  # 1-D
])
def test_bad_ids_raise_before_any_kernel(make, xs, err):
    with pytest.raises(err, match="xs"):
        make().forward(xs)


def test_weighted_value_rejects_bad_ids_and_mismatched_score():
    wv = WeightedValue(5, 3)
    with pytest.raises(ValueError, match="xs"):
        wv.forward(np.array([[0, 9]]), np.full((1, 2, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match="score"):
        wv.forward(np.array([[0, 1]]), np.full((1, 2, 3), 0.5, np.float32))
    with pytest.raises(TypeError, match="score"):
        wv.forward(np.array([[0, 1]]), np.ones((1, 2, 2), dtype=np.int64))


@pytest.mark.parametrize("make, fwd, dout, name", [
    (lambda: TimeKeyLayer(5, 4, 3), (np.array([[0, 1]]),), np.ones((1, 2, 4)), "dout"),
    (lambda: TimeQueryLayer(5, 3), (np.array([[0, 1]]),), np.ones((1, 3, 3)), "dout"),
    (lambda: CompatibilityFunction(5, 4, 3), (np.array([[0, 1]]),), np.ones((1, 2, 3)),
     "dscore"),
    (lambda: WeightedValue(5, 3), (np.array([[0, 1]]), np.full((1, 2, 2), 0.5)),
     np.ones((1, 2, 2)), "dZ"),
])
def test_wrong_dout_shape_raises_value_error(make, fwd, dout, name):
    layer = make()
    layer.forward(*fwd)
    with pytest.raises(ValueError, match=name):
        layer.backward(dout)


@pytest.mark.parametrize("make", [
    lambda: TimeKeyLayer(5, 4, 3), lambda: TimeQueryLayer(5, 3), lambda: TimeValueLayer(5, 3),
    lambda: CompatibilityFunction(5, 4, 3), lambda: WeightedValue(5, 3),
])
def test_backward_before_forward_raises_runtime_error(make):
    with pytest.raises(RuntimeError, match="before forward"):
        make().backward(np.ones((1, 2, 3)))


@pytest.mark.parametrize("bad", [dict(dtype=np.float16), dict(dtype=np.int32)])
def test_unsupported_dtype_raises_type_error(bad):
    with pytest.raises(TypeError, match="dtype"):
        CompatibilityFunction(5, 4, 3, **bad)


@pytest.mark.parametrize("size, error", [(0, ValueError), (-1, ValueError),
                                         (2.5, TypeError), (True, TypeError)])
def test_bad_sizes_raise_value_error_and_non_ints_type_error(size, error):
    """As every layer with sizes: a size that is not an int is a TypeError, one below 1 a
    ValueError."""
    with pytest.raises(error, match="D"):
        TimeKeyLayer(5, size, 3)


def test_seed_demo_example_runs(capsys):
    demo = load_repo_file("examples/seed_demo.py", "seed_demo")
    assert demo.main(["--backend", "vectorized", "--D", "16", "--d", "8"]) == 0
    out = capsys.readouterr().out
    assert "score shape: (10, 29, 29)" in out and "dvalue shape: (10, 29, 8)" in out
    assert "rows of score sum to 1: True" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_layer_backward_follows_its_last_forward_float_after_ids(backend):
    """A float (one-hot) forward after an id forward: backward takes the float path, so the
    weight gradients are x^T dout and dout's sum over (B, T), written out here (float64,
    rtol 1e-12), not a scatter-add at the earlier forward's ids."""
    V, d, B, T = 6, 3, 2, 4
    layer = TimeQueryLayer(V, d, backend=backend, dtype=np.float64, seed=0)
    layer.forward(ids(B, T, V, seed=1))
    x = np.eye(V)[ids(B, T, V, seed=2)]  # one-hot (B, T, V) of other ids
    dout = np.random.default_rng(3).standard_normal((B, T, d))
    layer.forward(x)
    dxs = layer.backward(dout)
    W = layer.params[0]
    np.testing.assert_allclose(dxs, dout @ W.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads[0], x.reshape(-1, V).T @ dout.reshape(-1, d),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads[1], dout.sum(axis=(0, 1)), rtol=1e-12, atol=1e-12)
