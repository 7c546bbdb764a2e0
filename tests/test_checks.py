"""fastattn._checks.all_finite, the NaN/inf scan of every input check: both of its paths (a
Numba loop over a C-contiguous array, max and min otherwise), both dtypes, a bad value at
every position. (Without Numba it takes max and min: test_backend_switch runs the package
with numba unimportable.)"""

from __future__ import annotations

import numpy as np
import pytest

from fastattn import _checks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_all_finite_finds_nan_and_inf_anywhere(monkeypatch, dtype, contiguous):
    from fastattn.kernels import _numba_math

    calls = []
    real = _numba_math.finite_flat
    monkeypatch.setattr(_checks, "_finite_flat",
                        lambda: lambda x: calls.append(x.shape) or real(x))
    big = np.finfo(dtype).max
    base = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(dtype)
    base[0, 0, 0], base[-1, -1, -1] = big, -big  # the largest finite values are finite
    view = (lambda a: a) if contiguous else (lambda a: a[:, ::2])
    assert _checks.all_finite(view(base))
    n = view(base).size
    for bad in (np.nan, np.inf, -np.inf):
        for flat in range(n):
            x = view(base.copy())
            x[np.unravel_index(flat, x.shape)] = bad
            assert not _checks.all_finite(x), (bad, flat)
    assert bool(calls) == contiguous  # the Numba path ran exactly for C-contiguous arrays


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_numba_scan_compiles_once_for_writeable_and_read_only_arrays(monkeypatch, dtype):
    """The scan takes a read-only view of every array: a read-only input (np.broadcast_to
    gives one) was a second compilation of the loop."""
    from fastattn.kernels import _numba_math

    real, seen = _numba_math.finite_flat, []

    def spy(x):
        seen.append(x.flags.writeable)
        return real(x)

    monkeypatch.setattr(_numba_math, "finite_flat", spy)
    _checks._finite_flat.cache_clear()  # takes the spy
    try:
        x = np.arange(12, dtype=dtype).reshape(3, 4)
        bad = x.copy()
        bad[1, 2] = np.nan
        assert _checks.all_finite(x) and not _checks.all_finite(bad)
        compiled = len(real.signatures)
        read_only = [np.broadcast_to(a, a.shape) for a in (x, bad)]
        assert not any(a.flags.writeable for a in read_only)
        assert [_checks.all_finite(a) for a in read_only] == [True, False]
    finally:
        _checks._finite_flat.cache_clear()
    assert len(real.signatures) == compiled
    assert seen == [False] * 4  # the Numba path, on read-only views every time


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_array_gives_c_order_for_fortran_order_and_transposed_input(dtype):
    """The kernels index C-contiguous memory: a Fortran-ordered array (contiguous, but not C)
    or a transposed view is copied to C order, with its values and shape unchanged."""
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(dtype)
    for view in (np.asfortranarray(x), x.transpose(2, 0, 1), np.asfortranarray(x[0]).T):
        got = _checks.float_array(view, "x")
        assert got.flags.c_contiguous and got.shape == view.shape and got.dtype == dtype
        np.testing.assert_array_equal(got, view)


@pytest.mark.parametrize("bad", [True, np.bool_(False), np.timedelta64(3), 2.0, "2", None])
def test_int_checks_refuse_bools_timedeltas_and_non_ints(bad):
    assert not _checks.is_int(bad)
    with pytest.raises(TypeError, match="count must be an int"):
        _checks.int_at_least(bad, "count", 0)


def test_int_at_least_takes_numpy_ints_and_names_the_bound():
    assert _checks.int_at_least(np.int8(3), "count", 3) == 3
    assert type(_checks.int_at_least(np.uint64(2**63), "count", 0)) is int
    with pytest.raises(ValueError, match="count must be >= 3, got 2"):
        _checks.int_at_least(np.int64(2), "count", 3)


def test_is_real_refuses_bools_and_timedeltas():
    assert _checks.is_real(np.float32(0.5)) and _checks.is_real(7)
    assert not any(_checks.is_real(x) for x in (True, np.bool_(True), np.timedelta64(1), "1"))


def test_to_float_gives_inf_for_ints_beyond_floats_range():
    assert _checks.to_float(10**400) == np.inf and _checks.to_float(-(10**400)) == -np.inf
    assert _checks.to_float(np.float32(0.25)) == 0.25
    with pytest.raises(TypeError):
        _checks.to_float(None)


def test_token_ids_gives_a_c_contiguous_int64_array_of_the_ids_shape():
    """A strided int64 view and a transposed int32 array come back C-contiguous int64 with
    their ids; a 0-d id stays 0-d."""
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    for x in (ids[:, ::2], ids.T.astype(np.int32), np.asfortranarray(ids)):
        out = _checks.token_ids(x, 12)
        assert out.dtype == np.int64 and out.flags.c_contiguous, x.strides
        np.testing.assert_array_equal(out, x)
    one = _checks.token_ids(np.int32(5), 12, ndim=None)
    assert one.shape == () and one.dtype == np.int64 and one == 5


def test_token_ids_of_an_ndarray_subclass_are_a_plain_ndarray():
    """np.matrix ids stayed a matrix (np.require keeps subclasses), and Embedding's vectorized
    W[ids] of a matrix failed with a broadcasting error; they are plain arrays again."""
    from fastattn import Embedding

    for x in (np.matrix([[1, 2]]), np.ma.masked_array([[1, 2]])):
        out = _checks.token_ids(x, 12)
        assert type(out) is np.ndarray and out.shape == (1, 2), type(out)
    W = np.arange(12.0).reshape(4, 3)
    for backend in ("loop", "vectorized", "numba"):
        np.testing.assert_array_equal(
            Embedding(W, backend=backend).forward(np.matrix([[1, 2]])), W[[[1, 2]]])
