"""kernels._micro.mm, the fused kernels' own tile product, against float64 products.

Every block height (1..6 rows) and width (one or two vectors, whole or masked, for float32's
and float64's vectors of 32 or, on AVX-512, 64 bytes), a transposed or plain ``a``,
accumulating or not, rows
strided inside wider arrays: within the error bound of a k-term sum (each item of c is one sum
over k, scaled once and added once), and nothing outside c's view is written.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import assert_close, machine_code
from numba import njit

from fastattn.kernels import _tuning
from fastattn.kernels._micro import MR, VBYTES, _block, _mm, mm

DTYPES = (np.float32, np.float64)

SIZES_M = range(1, 2 * MR + 2)  # every block height, one and two blocks and a remainder
SIZES_N = (1, 3, 4, 5, 8, 9, 12, 16, 17, 24, 31, 32, 33, 47, 48, 63, 65)  # vector edges
SIZES_K = (0, 1, 7, 64)


def _strided(rng, rows, cols, dtype, pad=5):
    """A (rows, cols) view with rows pad items further apart than its width, inside a
    buffer that is filled with a sentinel around it; returns (view, buffer)."""
    buf = np.full((rows + 2, cols + pad), 7.25, dtype=dtype)
    view = buf[1:-1, 2:2 + cols]
    view[...] = rng.standard_normal((rows, cols))
    return view, buf


def test_vectors_are_as_wide_as_the_compile_targets_registers():
    """64-byte vectors when the code Numba makes may use AVX-512 (natively on such a CPU; not
    with NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma), else 32-byte ones; and the
    machine code of a block works in 64-byte (zmm) registers exactly then (LLVM could split
    the vectors in two, or use AVX-512 where the setting said AVX2)."""
    assert VBYTES == (64 if _tuning.target()["isa"] == "avx512" else 32)

    @njit  # not cached: its machine code is read below
    def one_block(a, b, c):
        _block(a, 0, a.shape[1], 1, b, 0, b.shape[1], c, 0, c.shape[1], a.shape[1],
               a.shape[0], c.shape[1], np.float32(1), False)

    rng = np.random.default_rng(34)
    w = 2 * VBYTES // 4  # a whole block's columns, float32
    a = rng.integers(-4, 5, (MR, 7)).astype(np.float32)
    b = rng.integers(-4, 5, (7, w)).astype(np.float32)
    c = np.zeros((MR, w), np.float32)
    one_block(a, b, c)
    np.testing.assert_array_equal(c, a @ b)  # small integers: exact
    asm = one_block.inspect_asm(one_block.signatures[0])
    assert ("zmm" in asm) == (VBYTES == 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_call_divides_nothing(dtype):
    """mm turns byte strides into item strides by shifts: integer divisions (with Python's
    rounding of negative numbers) took some 50 ns of each call, more than a small tile's
    product (the fused kernels make 2 calls per tile forward and 5 backward). The machine
    code of its body (``_mm``: mm itself is inlined into its callers), compiled with its own
    options (not cached, so that it can be read), has none; the product is still right for
    strided rows."""
    import re

    rng = np.random.default_rng(35)
    a, _ = _strided(rng, 5, 3, dtype)
    b, _ = _strided(rng, 3, 9, dtype)
    c, _ = _strided(rng, 5, 9, dtype)
    asm = machine_code(_mm, a, False, b, c, dtype(1), False)  # the copy computes c
    assert_close(c, a.astype(np.float64) @ b, terms=np.abs(a) @ np.abs(b), n=3)
    assert not re.search(r"\b(idiv|div)[lq]?\b", asm), "an integer division in mm"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_t", [False, True], ids=["a", "a_T"])
@pytest.mark.parametrize("acc", [False, True], ids=["set", "add"])
def test_mm_matches_float64_product(dtype, a_t, acc):
    rng = np.random.default_rng(31)
    alpha = dtype(0.37)
    for m, n, k in itertools.product(SIZES_M, SIZES_N, SIZES_K):
        a = rng.standard_normal((k, m) if a_t else (m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        c = rng.standard_normal((m, n)).astype(dtype)
        c0 = c.astype(np.float64)
        A = (a.T if a_t else a).astype(np.float64)
        want = float(alpha) * (A @ b.astype(np.float64)) + (c0 if acc else 0)
        terms = abs(float(alpha)) * (np.abs(A) @ np.abs(b.astype(np.float64)))
        terms = terms + (np.abs(c0) if acc else 0)
        mm(a, a_t, b, c, alpha, acc)
        assert_close(c, want, terms=terms, n=k + 2, err_msg=f"m {m} n {n} k {k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_reads_and_writes_strided_rows_only_inside_the_views(dtype):
    """a, b and c as views whose rows lie apart inside bigger buffers (as the heads of a
    (B, T, H, d) array do): the same numbers as contiguous copies give, bit for bit, and the
    sentinels around c's view are untouched."""
    rng = np.random.default_rng(32)
    for (m, n, k), a_t, acc in itertools.product(
            [(13, 33, 9), (6, 16, 64), (1, 5, 3), (29, 29, 16)], [False, True], [False, True]):
        a, _ = _strided(rng, *((k, m) if a_t else (m, k)), dtype)
        b, _ = _strided(rng, k, n, dtype, pad=11)
        c, cbuf = _strided(rng, m, n, dtype, pad=3)
        before = cbuf.copy()
        want = np.ascontiguousarray(c)
        mm(np.ascontiguousarray(a), a_t, np.ascontiguousarray(b), want, dtype(1.5), acc)
        mm(a, a_t, b, c, dtype(1.5), acc)
        np.testing.assert_array_equal(c, want)
        outside = np.ones(cbuf.shape, bool)
        outside[1:-1, 2:2 + n] = False
        np.testing.assert_array_equal(cbuf[outside], before[outside])


def test_mm_is_exact_on_small_integers():
    """Sums of products of small integers are exact in float32: any misplaced row, column
    or lane shows as a wrong integer."""
    rng = np.random.default_rng(33)
    for m, n, k in [(7, 17, 5), (12, 9, 13), (2, 32, 1)]:
        a = rng.integers(-4, 5, (m, k)).astype(np.float32)
        b = rng.integers(-4, 5, (k, n)).astype(np.float32)
        c = np.ones((m, n), np.float32)
        mm(a, False, b, c, np.float32(1), True)
        np.testing.assert_array_equal(c, a.astype(np.int64) @ b.astype(np.int64) + 1)
        mm(np.ascontiguousarray(a.T), True, b, c, np.float32(2), False)
        np.testing.assert_array_equal(c, 2 * (a.astype(np.int64) @ b.astype(np.int64)))


def test_the_tile_products_compile_once_per_dtype_whatever_the_layouts_and_flags():
    """mm and gemm (kernels._blas) reach their bodies (_mm, _gemm) through
    ``_numba_math.generic``: contiguous and strided arrays and constant flags, as the fused
    kernels pass them, make one compilation per dtype (each mix was one of its own, a second
    or more of ``fastattn train``'s compile time). Called from a jitted caller with literal
    flags and both layouts; the products are still right, and every compiled body of _mm and
    _gemm in this process (other tests' calls too) takes 'A' arrays and plain flags."""
    from numba import types

    from fastattn.kernels._blas import OneThread, _gemm, gemm

    @njit  # not cached: a test's own caller
    def caller(a, b, c, a_s, b_s, c_s, coef):
        one = c.dtype.type(1)
        mm(a, False, b, c, one, False)  # contiguous, literal flags
        mm(a_s, True, b_s, c_s, one, True)  # strided, other literals
        gemm(False, False, a, b, c, one, one, coef)  # c += a b: contiguous
        gemm(True, False, a_s, b_s, c_s, one, one, coef)  # c_s += a_s^T b_s: strided

    rng = np.random.default_rng(36)
    for dtype in DTYPES:
        a, b, c = (rng.integers(-4, 5, s).astype(dtype) for s in ((5, 3), (3, 9), (5, 9)))
        a_s, _ = _strided(rng, 3, 5, dtype)  # (k, m), used transposed
        b_s, _ = _strided(rng, 3, 9, dtype)
        c_s, _ = _strided(rng, 5, 9, dtype)
        a_s[...], b_s[...], c_s[...] = (rng.integers(-4, 5, x.shape) for x in (a_s, b_s, c_s))
        want = 2 * (a.astype(np.int64) @ b.astype(np.int64))
        want_s = c_s.astype(np.int64) + 2 * (a_s.T.astype(np.int64) @ b_s.astype(np.int64))
        with OneThread():
            caller(a, b, c, a_s, b_s, c_s, np.empty(2, dtype))
        np.testing.assert_array_equal(c, want)  # small integers: exact
        np.testing.assert_array_equal(c_s, want_s)
    for body in (_mm, _gemm):
        sigs = body.signatures
        dtypes = [next(t.dtype for t in s if isinstance(t, types.Array)) for s in sigs]
        assert len(dtypes) == len(set(dtypes)) <= len(DTYPES), (body.__name__, sigs)
        for s in sigs:
            assert all(t.layout == "A" for t in s if isinstance(t, types.Array)), s
            assert not any(isinstance(t, types.Literal) for t in s), s
