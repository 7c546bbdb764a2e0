"""Shared pytest fixtures: a seeded random generator, the backends and the dtypes.

A test that parametrizes ``backend`` or ``dtype`` itself overrides the fixture of that name.
Results are compared with their references by the one rule of ``helpers.assert_close``.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastattn.kernels import BACKENDS

DTYPES = (np.float32, np.float64)


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed: each test sees the same numbers on every run."""
    return np.random.default_rng(20240611)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend name in turn: "loop", "vectorized", "numba"."""
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda t: np.dtype(t).name)
def dtype(request):
    """float32, then float64."""
    return request.param


@pytest.fixture
def threads():
    """Set Numba's thread count for the calling thread; restores it afterwards."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 Numba threads (NUMBA_NUM_THREADS)")
    before = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(before)
