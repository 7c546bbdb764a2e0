"""Shared pytest fixtures: a seeded random generator, the backends and the dtypes.

A test that parametrizes ``backend`` or ``dtype`` itself overrides the fixture of that name.
Results are compared with their references by the one rule of ``helpers.assert_close``.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import numba_cache

numba_cache.configure()  # before any kernel is imported: never run on stale machine code

import fnmatch  # noqa: E402
from pathlib import Path  # noqa: E402

from fastattn.kernels import BACKENDS  # noqa: E402

DTYPES = (np.float32, np.float64)

#: Test files whose tests are "numerics" (kernels, attention, layers): ``.ci/run`` runs
#: ``-m numerics`` a second time on the AVX2 code paths of Numba, OpenBLAS and PyTorch. A new
#: file joins by its name matching one of these, or by ``pytestmark = pytest.mark.numerics``.
NUMERICS_FILES = ("test_kernel*.py", "test_*attention*.py", "test_*layer*.py",
                  "test_properties*.py", "test_transformer*.py", "test_determinism*.py",
                  "test_flash*.py", "test_numba_backend*.py", "test_functional*.py",
                  "test_glue*.py", "test_recurrent*.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = Path(str(item.fspath)).name
        if any(fnmatch.fnmatch(name, pattern) for pattern in NUMERICS_FILES):
            item.add_marker(pytest.mark.numerics)


@pytest.fixture(autouse=True)
def _fresh_thread_choice():
    """Each test starts with no timings of the fused kernels' calls (``_thread_choice``), so
    what one test's calls measured never picks the thread count of another's."""
    from fastattn.kernels import _thread_choice

    _thread_choice.choice.clear()
    yield


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


@pytest.fixture
def looked_up(monkeypatch):
    """The backends whose kernels are looked up through ``kernels.get``, in order (the
    kernels still run). ``fastattn._backend.kernel`` keeps no checked pairs meanwhile, so
    that every lookup goes through ``kernels.get``."""
    from fastattn import _backend, kernels

    class KeepsNothing(dict):
        def __setitem__(self, key, value):
            pass

    monkeypatch.setattr(_backend, "_checked", KeepsNothing())
    names = []
    real_get = kernels.get

    def spy(kernel_name, backend):
        names.append(backend)
        return real_get(kernel_name, backend)

    monkeypatch.setattr(kernels, "get", spy)
    return names
