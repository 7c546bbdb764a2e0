"""kernels._products.matmul (the numba backend's layer products on the kernels' threads) and
the Affine layers that use it: against float64 products, on the parallel path, and bitwise the
same on one thread and two."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close
from helpers.bounds import matmul_terms
from helpers.paths import record_paths

from fastattn.layers import Affine, TimeAffine

pytest.importorskip("numba")
pytestmark = pytest.mark.numerics


def _operands(M, K, N, ta, tb, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("ta", "tb"), [(False, False), (True, False), (False, True),
                                        (True, True)])
def test_matmul_matches_float64_on_the_parallel_path(monkeypatch, ta, tb, dtype):
    from fastattn.kernels import _products

    numba = pytest.importorskip("numba")
    log = record_paths(monkeypatch, force=True)
    M, K, N = 100, 37, 21  # 3 blocks of 33 or 34 rows: uneven
    a, b = _operands(M, K, N, ta, tb, dtype)
    got = _products.matmul(a, b, ta, tb)
    A, Bm = (a.T if ta else a), (b.T if tb else b)
    assert got.dtype == dtype and got.shape == (M, N)
    assert_close(got, A.astype(np.float64) @ Bm.astype(np.float64),
                 terms=matmul_terms(A, Bm), n=K + 2, err_msg=f"ta={ta} tb={tb}")
    if numba.get_num_threads() > 1:
        assert log.fused == [2]  # the blocks ran on two threads


def test_matmul_does_not_depend_on_the_thread_count(monkeypatch):
    from fastattn.kernels import _products

    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 Numba threads")
    record_paths(monkeypatch, force=True)
    a, b = _operands(300, 64, 50, True, False, np.float32, seed=1)
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (2, 1):
            numba.set_num_threads(threads)
            runs.append(_products.matmul(a, b, True, False))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_matmul_of_an_empty_dimension_is_zeros():
    from fastattn.kernels import _products

    got = _products.matmul(np.zeros((4, 0), np.float32), np.zeros((0, 3), np.float32))
    np.testing.assert_array_equal(got, np.zeros((4, 3), np.float32))
    assert _products.matmul(np.zeros((0, 5)), np.ones((5, 2))).shape == (0, 2)


@pytest.mark.parametrize("cls", [Affine, TimeAffine])
def test_affine_on_numba_matches_vectorized_and_takes_the_kernel_products(monkeypatch, cls):
    from fastattn.kernels import _products

    calls = []
    real = _products.matmul
    monkeypatch.setattr(_products, "matmul", lambda *a: calls.append(a[2:]) or real(*a))
    rng = np.random.default_rng(2)
    W, b = rng.standard_normal((6, 5)), rng.standard_normal(5)
    x = rng.standard_normal((4, 6) if cls is Affine else (3, 4, 6))
    dout = rng.standard_normal(x.shape[:-1] + (5,))
    results = {}
    for backend in ("vectorized", "numba"):
        layer = cls(W.copy(), b.copy(), backend=backend)
        results[backend] = [layer.forward(x), layer.backward(dout), *layer.grads]
    # forward, dW = x^T dout, dx = dout W^T
    assert calls == [(False, False), (True, False), (False, True)]
    for got, want in zip(results["numba"], results["vectorized"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_the_transformers_output_layer_takes_numpys_products_on_numba(monkeypatch):
    """TransformerSeq2seq's output layer (a TimeAffine) multiplies with NumPy on the numba
    backend, as the model's other layers do (``_own_products``): no call reaches the kernels'
    products in a forward and backward, while a TimeAffine of its own on that backend still
    takes them; the model's loss and grads match the vectorized backend's."""
    from fastattn import TransformerSeq2seq
    from fastattn.kernels import _products

    calls = []
    real = _products.matmul
    monkeypatch.setattr(_products, "matmul", lambda *a: calls.append(a[2:]) or real(*a))
    rng = np.random.default_rng(3)
    xs = rng.integers(0, 11, (3, 5))
    ts = rng.integers(0, 11, (3, 4))
    got = {}
    for backend in ("vectorized", "numba"):
        model = TransformerSeq2seq(11, d_model=8, n_heads=2, d_ff=16, max_len=8,
                                   backend=backend, dtype=np.float64, seed=4)
        loss = model.forward(xs, ts)
        model.backward()
        got[backend] = [np.float64(loss), *(g.copy() for g in model.grads)]
    assert calls == []
    for a, b in zip(got["numba"], got["vectorized"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    layer = TimeAffine(rng.standard_normal((8, 11)), np.zeros(11), backend="numba")
    layer.forward(rng.standard_normal((2, 3, 8)))
    assert calls == [(False, False)]
