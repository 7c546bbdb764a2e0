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
