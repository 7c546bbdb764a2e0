"""BLAS for the Numba kernels: whether Numba can call it, and holding it at one thread.

``np.dot`` inside ``@njit`` (and Numba's gemm entry point that the kernels call directly) runs
the BLAS that SciPy links. The kernels call it from several threads of their own at once, so
BLAS must not start threads of its own meanwhile: nested threads oversubscribe the cores (a
weighted_sum_backward at B=8, T=512 took 40 times longer).
"""

from __future__ import annotations

import os

_state: dict = {}


def available() -> bool:
    """True when Numba can call BLAS (SciPy is installed). Loads SciPy's BLAS on first call."""
    if "ok" not in _state:
        try:
            from numba.np.linalg import ensure_blas

            ensure_blas()  # imports scipy.linalg.cython_blas: its BLAS is loaded from here on
            _state["ok"] = True
        except Exception:  # no SciPy: the kernels use their loop fallbacks
            _state["ok"] = False
        _state["pools"] = _find_pools() if _state["ok"] else []
    return _state["ok"]


def _find_pools():
    """threadpoolctl controllers of SciPy's own BLAS when it ships one, else of every BLAS;
    none without threadpoolctl (BLAS then keeps its thread count)."""
    try:
        import scipy
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    here = os.path.realpath(os.path.dirname(scipy.__file__))
    own = [lib for lib in libs if os.path.realpath(lib.filepath).startswith(here)]
    return own or list(libs)


class OneThread:
    """Within the block BLAS runs one thread; the previous setting comes back on exit. Only
    BLAS is touched: OpenMP and other pools (PyTorch's, Numba's) keep their threads."""

    def __enter__(self):
        available()
        self.saved = []
        for lib in _state["pools"]:
            n = lib.num_threads
            if n != 1:
                lib.set_num_threads(1)
                self.saved.append((lib, n))
        return self

    def __exit__(self, *exc):
        for lib, n in self.saved:
            lib.set_num_threads(n)
        return False
