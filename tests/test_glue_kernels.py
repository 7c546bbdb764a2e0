"""The training step's glue kernels (kernels/glue_loop.py) on every backend.

Each kernel runs on float32 and float64 inputs and is compared with the loop reference run on
the same inputs in float64. The bound on a float32 result comes from the computation: an entry
that sums n terms is off by at most about n eps32 times the sum of |terms| (float32 rounding
of each partial sum), plus the rounding of the inputs' own products; the factors used are
stated at each check. float64 results must match to 1e-12 of the same scale. Gradients of the
reference are checked against float64 central differences.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import numerical_grad
from helpers import adam_reference, machine_code

from fastattn import kernels
from fastattn.kernels import glue_loop as ref

EPS = {np.dtype(np.float32): np.finfo(np.float32).eps, np.dtype(np.float64): 1e-12}


def _eps(dtype):
    return EPS[np.dtype(dtype)]


def _k(name, backend):
    return kernels.get(name, backend)


def _close(got, want, scale, dtype, factor, what):
    """|got - want| <= factor * eps(dtype) * scale, elementwise (scale: the sum of |terms|)."""
    got = np.asarray(got, dtype=np.float64)
    bound = factor * _eps(dtype) * np.asarray(scale) + np.finfo(np.float64).tiny
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.ndim else ()
    assert np.all(err <= bound), (
        f"{what}: |error| {err[worst]:.3g} > bound {np.broadcast_to(bound, err.shape)[worst]:.3g}")


def _ln_inputs(rng, dtype, N=37, C=24):
    x = (rng.standard_normal((N, C)) * 2 + 0.5).astype(dtype)
    g = (1 + 0.3 * rng.standard_normal(C)).astype(dtype)
    b = (0.2 * rng.standard_normal(C)).astype(dtype)
    return x, g, b


def test_layernorm_forward_matches_the_reference(backend, dtype, rng):
    x, g, b = _ln_inputs(rng, dtype)
    y, mean, rstd = _k("layernorm_forward", backend)(x, g, b, 1e-5)
    y64, mean64, rstd64 = ref.layernorm_forward(*(a.astype(np.float64) for a in (x, g, b)), 1e-5)
    assert y.dtype == mean.dtype == rstd.dtype == dtype
    C = x.shape[1]
    # mean and variance each sum C terms; xhat = (x - mean) rstd carries their relative errors
    _close(mean, mean64, np.abs(x).mean(axis=1), dtype, 2 * C, "mean")
    _close(rstd, rstd64, rstd64, dtype, 4 * C, "rstd")
    xhat = (x.astype(np.float64) - mean64[:, None]) * rstd64[:, None]
    scale = (np.abs(xhat) + np.abs(x) * rstd64[:, None]) * np.abs(g.astype(np.float64)) + np.abs(b)
    _close(y, y64, scale, dtype, 4 * C, "y")


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e38])
def test_layernorm_of_float32_rows_whose_squares_overflow_matches_the_reference(backend, rng,
                                                                                magnitude):
    """Rows of 1e20 and 1e30 in float32: their squares (and at 1e38 their sum) are beyond
    float32, but mean, rstd and y are not. A variance taken in float32 overflows to inf, which
    gives rstd 0 and y = b; the rows must be normalised as in float64 (bounds as in the test
    above), beside an ordinary row."""
    dtype = np.float32
    x, g, b = _ln_inputs(rng, dtype, N=4, C=8)
    x[1:] = (1 + 0.3 * rng.standard_normal((3, 8))) * magnitude
    y, mean, rstd = _k("layernorm_forward", backend)(x, g, b, 1e-5)
    y64, mean64, rstd64 = ref.layernorm_forward(*(a.astype(np.float64) for a in (x, g, b)), 1e-5)
    C = x.shape[1]
    _close(mean, mean64, np.abs(x.astype(np.float64)).mean(axis=1), dtype, 2 * C, "mean")
    _close(rstd, rstd64, rstd64, dtype, 4 * C, "rstd")
    xhat = (x.astype(np.float64) - mean64[:, None]) * rstd64[:, None]
    scale = (np.abs(xhat) + np.abs(x) * rstd64[:, None]) * np.abs(g.astype(np.float64)) + np.abs(b)
    _close(y, y64, scale, dtype, 4 * C, "y")


@pytest.mark.parametrize("backend", ["vectorized", "numba"])  # the loop's squares overflow
def test_layernorm_of_float64_rows_whose_squares_overflow_is_that_of_the_rows_scaled(backend,
                                                                                     rng):
    """float64 rows of -1e200 (all negative: the scale is the largest |x|, not the largest x)
    and one of +1e200: their squares are beyond float64. Scaling a row by 2^-664 (exact)
    scales its mean alike and its rstd inversely and leaves y, up to eps, which is below
    float64's resolution beside a variance of 1e399: the reference is the scaled rows' with
    eps 0 (bounds as in the tests above)."""
    dtype, s = np.float64, 2.0 ** -664
    x, g, b = _ln_inputs(rng, dtype, N=4, C=8)
    x[1:] = np.abs(1 + 0.3 * rng.standard_normal((3, 8))) / s
    x[1:3] *= -1
    y, mean, rstd = _k("layernorm_forward", backend)(x, g, b, 1e-5)
    y64, mean64, rstd64 = ref.layernorm_forward(x[1:] * s, g, b, 0.0)
    C = x.shape[1]
    _close(mean[1:] * s, mean64, np.abs(x[1:] * s).mean(axis=1), dtype, 2 * C, "mean")
    _close(rstd[1:] / s, rstd64, rstd64, dtype, 4 * C, "rstd")
    xhat = (x[1:] * s - mean64[:, None]) * rstd64[:, None]
    scale = (np.abs(xhat) + np.abs(x[1:] * s) * rstd64[:, None]) * np.abs(g) + np.abs(b)
    _close(y[1:], y64, scale, dtype, 4 * C, "y")


@pytest.mark.parametrize("N", [37, 130])  # 130: row chunks of uneven sizes (kernels/_glue_numba)
def test_layernorm_backward_matches_the_reference(backend, dtype, rng, N):
    x, g, b = _ln_inputs(rng, dtype, N=N)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, mean64, rstd64 = ref.layernorm_forward(*(a.astype(np.float64) for a in (x, g, b)), 1e-5)
    mean, rstd = mean64.astype(dtype), rstd64.astype(dtype)
    dx, dg, db = _k("layernorm_backward", backend)(dy, x, g, mean, rstd)
    dx64, dg64, db64 = ref.layernorm_backward(*(a.astype(np.float64)
                                                for a in (dy, x, g, mean, rstd)))
    N, C = x.shape
    xhat = np.abs((x.astype(np.float64) - mean64[:, None]) * rstd64[:, None])
    ady = np.abs(dy.astype(np.float64))
    _close(dg, dg64, (ady * (xhat + 1)).sum(axis=0), dtype, 4 * N, "dg")
    _close(db, db64, ady.sum(axis=0), dtype, 2 * N, "db")
    row = (ady * np.abs(g) * (1 + xhat)).sum(axis=1, keepdims=True) / C
    _close(dx, dx64, rstd64[:, None] * (ady * np.abs(g) + row * (1 + xhat)), dtype, 8 * C, "dx")


def test_layernorm_reference_gradients_match_central_differences(rng):
    x, g, b = _ln_inputs(rng, np.float64, N=5, C=6)
    R = rng.standard_normal(x.shape)

    def loss():
        return float((ref.layernorm_forward(x, g, b, 1e-5)[0] * R).sum())

    _, mean, rstd = ref.layernorm_forward(x, g, b, 1e-5)
    dx, dg, db = ref.layernorm_backward(R, x, g, mean, rstd)
    for name, arr, grad in (("x", x, dx), ("g", g, dg), ("b", b, db)):
        np.testing.assert_allclose(grad, numerical_grad(loss, arr), rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_bias_add_adds_the_bias_to_every_row_in_place(backend, dtype, rng):
    y = rng.standard_normal((37, 19)).astype(dtype)
    b = rng.standard_normal(19).astype(dtype)
    want = ref.bias_add(y.astype(np.float64), b.astype(np.float64)).astype(dtype)
    before = y.copy()
    got = _k("bias_add", backend)(y, b)
    assert got is y  # in place
    # the float64 sum of two such floats is exact, so rounding it gives the one-rounding sum
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, before)
    column = rng.standard_normal((5, 1)).astype(dtype)  # a single column
    np.testing.assert_array_equal(_k("bias_add", backend)(column.copy(), b[:1]), column + b[0])


@pytest.mark.parametrize("N", [41, 130])  # 130: row chunks of uneven sizes (kernels/_glue_numba)
def test_bias_relu_matches_the_reference(backend, dtype, rng, N):
    h = rng.standard_normal((N, 19)).astype(dtype)
    b = rng.standard_normal(19).astype(dtype)
    y = _k("bias_relu_forward", backend)(h, b)
    y64 = ref.bias_relu_forward(h.astype(np.float64), b.astype(np.float64))
    _close(y, y64, np.abs(h) + np.abs(b), dtype, 1, "y")
    assert (y >= 0).all() and ((y > 0) == (y64 > 0)).mean() > 0.99
    dy = rng.standard_normal(h.shape).astype(dtype)
    dh, db = _k("bias_relu_backward", backend)(dy, y)
    dh64, db64 = ref.bias_relu_backward(dy.astype(np.float64), y)
    np.testing.assert_array_equal(dh, dh64.astype(dtype))  # a selection: exact
    _close(db, db64, np.abs(dh64).sum(axis=0), dtype, 2 * h.shape[0], "db")


def test_bias_relu_reference_gradients_match_central_differences(rng):
    h = rng.standard_normal((6, 5))
    h[np.abs(h) < 0.05] = 0.3  # away from the kink, where the derivative is defined
    b = np.zeros(5)
    R = rng.standard_normal(h.shape)
    dh, db = ref.bias_relu_backward(R, ref.bias_relu_forward(h, b))
    np.testing.assert_allclose(
        dh, numerical_grad(lambda: float((ref.bias_relu_forward(h, b) * R).sum()), h),
        rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, dh.sum(axis=0), rtol=1e-12)


def _xent_inputs(rng, dtype, N=33, V=17):
    x = (3 * rng.standard_normal((N, V))).astype(dtype)
    t = rng.integers(0, V, N)
    t[::5] = -1  # ignored rows
    return x, t


def test_softmax_xent_matches_the_reference(backend, dtype, rng):
    x, t = _xent_inputs(rng, dtype)
    loss, lse = _k("softmax_xent_forward", backend)(x, t)
    loss64, lse64 = ref.softmax_xent_forward(x.astype(np.float64), t)
    V = x.shape[1]
    spread = np.abs(x).max(axis=1)  # lse and loss round relative to the scores' size
    _close(lse, lse64, spread + 1, dtype, 4 * V, "lse")
    _close(loss, loss64, 2 * spread + 1, dtype, 4 * V, "loss")
    assert np.all(loss[t < 0] == 0)
    dx = _k("softmax_xent_backward", backend)(x, t, lse, 0.25)
    dx64 = ref.softmax_xent_backward(x.astype(np.float64), t, lse64, 0.25)
    # p = exp(x - lse) carries the error of lse and of x, relative to p; onehot is exact
    _close(dx, dx64, 0.25 * (np.abs(dx64 / 0.25) + 1) * (spread[:, None] + 1), dtype,
           8 * V, "dx")
    assert np.all(dx[t < 0] == 0)


def test_softmax_xent_reference_gradient_matches_central_differences(rng):
    x, t = _xent_inputs(rng, np.float64, N=6, V=5)
    dx = ref.softmax_xent_backward(x, t, ref.softmax_xent_forward(x, t)[1], 0.5)
    num = numerical_grad(lambda: 0.5 * float(ref.softmax_xent_forward(x, t)[0].sum()), x)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


def test_softmax_xent_is_exact_for_large_scores(backend):
    """Scores far from 0 (1e4) must not overflow: the row maximum is taken out first, wherever
    in the row it is (first, middle or last column)."""
    x = np.array([[1e4, 0.0, -1e4], [5.0, 5.0, 5.0], [0.0, 1e4, -1e4], [-1e4, 0.0, 1e4]])
    loss, lse = _k("softmax_xent_forward", backend)(x, np.array([1, 2, 0, 0]))
    np.testing.assert_allclose(lse, [1e4, 5 + np.log(3), 1e4, 1e4], rtol=1e-12)
    np.testing.assert_allclose(loss, [1e4, np.log(3), 1e4, 2e4], rtol=1e-12)


def test_adam_update_matches_the_reference(backend, dtype, rng):
    shapes = [(4, 3), (7,), (2, 2, 5), (37, 9)]  # the last one runs vector loops' bodies
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ms = [0.1 * rng.standard_normal(s).astype(dtype) for s in shapes]
    vs = [np.abs(rng.standard_normal(s)).astype(dtype) for s in shapes]
    want = [[a.astype(np.float64) for a in lst] for lst in (params, grads, ms, vs)]
    ref.adam_update(*want, 0.01, 0.9, 0.999, 1e-7)
    got = [[a.copy() for a in lst] for lst in (params, grads, ms, vs)]
    ids = [id(a) for a in got[0]]
    _k("adam_update", backend)(*got, 0.01, 0.9, 0.999, 1e-7)
    assert [id(a) for a in got[0]] == ids, "in place"
    for p, p64, p0, m64, v64 in zip(got[0], want[0], params, want[2], want[3], strict=True):
        # one step of size lr_t m / sqrt(v): relative rounding of a few operations
        step = 0.01 * np.abs(m64) / (np.sqrt(v64) + 1e-7)
        _close(p, p64, np.abs(p0) + 8 * step, dtype, 4, "p")
    for m, m64 in zip(got[2], want[2], strict=True):
        _close(m, m64, np.abs(m64) + np.abs(grads[0].max()), dtype, 4, "m")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_adam_update_after_a_gradient_whose_square_overflows_gives_no_nan(backend):
    """A float32 gradient of +-1e30: its square is beyond float32, so v becomes inf and the
    step m / (sqrt(v) + eps) is 0 (PyTorch's float32 Adam does the same). At the next steps v
    must stay inf, not inf - inf = NaN: those parameters keep their value, as PyTorch's, and
    the others follow the reference in float64 (bound as in the test above)."""
    torch = pytest.importorskip("torch")
    steps = [[1e30, 0.5, -1e30], [1.0, 1.0, 1.0], [2.0, -1.0, 3.0]]
    p0 = np.array([1.0, -0.5, 2.0], np.float32)
    got = [[p0.copy()], [np.zeros(3, np.float32)], [np.zeros(3, np.float32)],
           [np.zeros(3, np.float32)]]
    want = [[p0[1:2].astype(np.float64)], [np.zeros(1)], [np.zeros(1)], [np.zeros(1)]]
    tp = torch.nn.Parameter(torch.tensor(p0))
    topt = torch.optim.Adam([tp], lr=0.01)
    moved = 0.0  # the sum of the reference's step sizes lr_t |m| / (sqrt(v) + eps)
    for g in steps:
        got[1][0][...] = g
        _k("adam_update", backend)(*got, 0.01, 0.9, 0.999, 1e-7)
        want[1][0][...] = g[1]
        ref.adam_update(*want, 0.01, 0.9, 0.999, 1e-7)
        moved += 0.01 * np.abs(want[2][0]) / (np.sqrt(want[3][0]) + 1e-7)
        tp.grad = torch.tensor(g, dtype=torch.float32)
        topt.step()
    p, m, v = got[0][0], got[2][0], got[3][0]
    assert not np.isnan(np.concatenate([p, m, v])).any(), (p, m, v)
    assert np.isposinf(v[[0, 2]]).all()
    np.testing.assert_array_equal(p[[0, 2]], tp.detach().numpy()[[0, 2]])
    # each step as one step of the test above
    _close(p[1:2], want[0][0], np.abs(p0[1:2]) + 8 * moved, np.float32, 3 * 4, "p")


def test_numba_adam_divides_and_takes_square_roots_in_vectors():
    """The numba adam_update's loop is vectorised: with Python's error model, Numba checks
    every division for a zero divisor, and that branch keeps LLVM from vectorising the loop
    (a scalar division and square root per parameter, some 2.5 times slower at the default
    model's 132k parameters). Its machine code, compiled with the kernel's own options (not
    cached, so that it can be read), has packed square roots and divisions."""
    import re

    from fastattn.kernels import _glue_numba

    lists = [_glue_numba.flat_list([np.ones(64, np.float32)]) for _ in range(4)]
    asm = machine_code(_glue_numba._adam_update, *lists, *np.ones(6, np.float32))
    assert re.search(r"\bvsqrtps\b", asm) and re.search(r"\bvdivps\b", asm), (
        "adam_update's loop is not vectorised")


def test_numba_adam_takes_a_prebuilt_list_and_follows_in_place_updates(rng):
    from fastattn.kernels import _glue_numba

    params = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    grads = [np.ones_like(p) for p in params]
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    lists = [_glue_numba.flat_list(a) for a in (params, grads, ms, vs)]
    before = [p.copy() for p in params]
    for _ in range(2):
        grads[0][...] = 2.0  # written in place, as layers do: the list sees it
        _glue_numba.adam_update(*lists, 0.1, 0.9, 0.999, 1e-7)
    want = [[a.copy() for a in before], [g.copy() for g in grads],
            [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]]
    for _ in range(2):
        ref.adam_update(*want, 0.1, 0.9, 0.999, 1e-7)
    for p, w in zip(params, want[0], strict=True):
        np.testing.assert_allclose(p, w, rtol=1e-12)


def _books_adam(params, grads, steps):
    """The book's Adam in float64 (lr 0.01), ``steps`` steps with the same gradients: the
    expected parameters."""
    return [adam_reference(p.astype(np.float64), [g] * steps, 0.01)
            for p, g in zip(params, grads, strict=True)]


def test_adam_optimizer_runs_the_kernel_of_its_backend(backend, rng, monkeypatch):
    """fastattn.Adam on every backend: the book's Adam to float64 rounding, through the
    backend's adam_update kernel (a spy proves which one ran)."""
    from fastattn import Adam, _backend

    ran = []
    real = _backend.kernel
    monkeypatch.setattr(_backend, "kernel",
                        lambda name, b=None: (ran.append((name, b)), real(name, b))[1])
    params = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    grads = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    want = _books_adam(params, grads, 3)
    opt = Adam(lr=0.01, backend=backend)
    for _ in range(3):
        opt.update(params, grads)
    assert ran == [("adam_update", backend)] * 3
    for p, w in zip(params, want, strict=True):
        np.testing.assert_allclose(p, w, rtol=1e-12, atol=1e-15)


def test_a_new_adam_on_the_same_params_starts_from_its_own_moments(backend, rng):
    """A second Adam on the same parameters (training resumed with a fresh optimizer), with
    new gradient arrays: the book's Adam from zero moments, and the first optimizer's moments
    untouched (the numba kernel keeps the typed lists of its last call)."""
    from fastattn import Adam

    params = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    first, first_grads = Adam(lr=0.01, backend=backend), [np.ones_like(p) for p in params]
    for _ in range(2):
        first.update(params, first_grads)
    moments = [a.copy() for a in first.m + first.v]
    grads = [rng.standard_normal(p.shape) for p in params]
    want = _books_adam(params, grads, 3)
    second = Adam(lr=0.01, backend=backend)
    for _ in range(3):
        second.update(params, grads)
    for p, w in zip(params, want, strict=True):
        np.testing.assert_allclose(p, w, rtol=1e-12, atol=1e-15)
    for a, b in zip(first.m + first.v, moments, strict=True):
        np.testing.assert_array_equal(a, b)


def test_adam_numba_takes_non_contiguous_params_through_the_vectorized_kernel(rng):
    from fastattn import Adam

    base = rng.standard_normal((6, 4))
    params = [base[::2], rng.standard_normal(3)]  # a strided view, updated in place
    grads = [np.ones((3, 4)), np.ones(3)]
    want = _books_adam(params, grads, 2)
    opt = Adam(lr=0.01, backend="numba")
    for _ in range(2):
        opt.update(params, grads)
    np.testing.assert_allclose(base[::2], want[0], rtol=1e-12)
    np.testing.assert_allclose(params[1], want[1], rtol=1e-12)
