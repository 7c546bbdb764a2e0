"""BLAS for the Numba kernels: the one gemm they call, and holding BLAS at one thread.

SciPy and threadpoolctl are required dependencies: the Numba kernels' matrix products (the
unfused products of ``numba_backend``, and the fused kernels' tile products in ``_flash``
unless the setting gives them to their own micro-kernel, ``_micro``) are calls to
:func:`gemm`, the ?gemm of the BLAS that SciPy links.

The kernels call BLAS from several threads of their own at once, so BLAS must not start
threads of its own meanwhile: nested threads oversubscribe the cores (a weighted_sum_backward
at B=8, T=512 took 40 times longer). :class:`OneThread` holds it at one thread.
"""

from __future__ import annotations

import os

import numpy as np
from numba import types

from ._numba_math import generic, njit_cached

_state: dict = {}


def available() -> bool:
    """True when Numba can call BLAS (SciPy is installed, as fastattn requires). Loads SciPy's
    BLAS on first call."""
    if "ok" not in _state:
        try:
            from numba.np.linalg import ensure_blas

            ensure_blas()  # imports scipy.linalg.cython_blas: its BLAS is loaded from here on
            ok = True
        except Exception:  # no SciPy: the Numba kernels cannot run
            ok = False
        _state["pools"] = _find_pools() if ok else []
        _state["ok"] = ok  # last: another thread that sees "ok" finds "pools" too
    return _state["ok"]


def pools():
    """threadpoolctl controllers of the BLAS that Numba calls (loads it on first call)."""
    available()
    return list(_state["pools"])


def every_blas():
    """A threadpoolctl controller of every BLAS loaded (NumPy's and SciPy's), made once, after
    SciPy's BLAS (the one Numba calls) is loaded: a controller made before would miss it."""
    if "every" not in _state:
        from threadpoolctl import ThreadpoolController

        available()
        _state["every"] = ThreadpoolController().select(user_api="blas")
    return _state["every"]


def _find_pools():
    """threadpoolctl controllers of SciPy's own BLAS when it ships one, else of every BLAS."""
    import scipy
    from threadpoolctl import ThreadpoolController

    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    here = os.path.realpath(os.path.dirname(scipy.__file__))
    own = [lib for lib in libs if os.path.realpath(lib.filepath).startswith(here)]
    return own or list(libs)


class OneThread:
    """Within the block BLAS runs one thread; the previous setting comes back on exit. Only
    BLAS is touched: OpenMP and other pools (PyTorch's, Numba's) keep their threads."""

    def __enter__(self):
        available()
        _ownership().increment()  # given back on exit, as threadpool_limits does
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
        _ownership().decrement()  # so that no thread keeps OpenBLAS's control afterwards
        return False


class Control:
    """Within the block this Python thread may set BLAS's thread count (threadpoolctl lets one
    thread at a time set OpenBLAS's; see _ownership). The count set stays after the block."""

    def __enter__(self):
        _ownership().increment()
        return self

    def __exit__(self, *exc):
        _ownership().decrement()
        return False


class _NoOwnership:
    def increment(self):
        pass

    def decrement(self):
        pass


def _ownership():
    """threadpoolctl's count of this thread's open limits. Where OpenBLAS has one process-wide
    pool, threadpoolctl (3.8) lets only one Python thread, the first to set a limit, change
    it; a pool thread that set one would keep that role for good, and the limits of every
    other thread would silently do nothing. When the count drops to 0 the role is free
    again. Older threadpoolctl versions have no such count and no such role."""
    import threadpoolctl

    return getattr(threadpoolctl, "CONTROLLING_THREAD_OWNERSHIP", _NoOwnership())


# Numba's own entry point to the ?gemm of the BLAS that SciPy links (what np.dot calls inside
# @njit). It is resolved by name when a kernel is loaded, so cached kernels stay valid.
_XGEMM = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(types.char, types.char, types.char,  # kind 's'/'d', transa, transb
               types.intp, types.intp, types.intp,  # m, n, k
               types.voidptr, types.voidptr, types.intp,  # alpha, a, lda
               types.voidptr, types.intp,  # b, ldb
               types.voidptr, types.voidptr, types.intp),  # beta, c, ldc
)
_N, _T = np.int8(ord("N")), np.int8(ord("T"))
_S, _D = np.int8(ord("s")), np.int8(ord("d"))


@njit_cached(nogil=True)
def _ld(x):
    """The leading dimension BLAS wants for the 2-D row-major x: its row stride in elements,
    at least a row's length (a single row may carry any stride, 0 included)."""
    return max(x.strides[0] // x.itemsize, x.shape[1], 1)


@njit_cached(nogil=True, inline="always")
def gemm(ta, tb, a, b, c, alpha, beta, coef):
    """c = alpha op(a) op(b) + beta c, op(x) = x.T when its flag (ta, tb) is set.

    a, b, c are 2-D arrays of one dtype (float32 or float64) whose rows are contiguous (the
    row stride may be longer than a row); c is (M, N), op(a) (M, K), op(b) (K, N). coef is a
    scratch array of 2 elements of that dtype. BLAS is column-major, so it computes
    c^T = op(b)^T op(a)^T: the operands swap. Compiles once per dtype, whatever the arrays'
    layouts and the flags (``generic``).
    """
    _gemm(generic(ta), generic(tb), generic(a), generic(b), generic(c), generic(alpha),
          generic(beta), generic(coef))


@njit_cached(nogil=True)
def _gemm(ta, tb, a, b, c, alpha, beta, coef):
    """gemm, for arrays of layout 'A' and flags that are not literals."""
    m, n = c.shape
    kk = a.shape[0] if ta else a.shape[1]
    coef[0] = alpha
    coef[1] = beta
    kind = _S if c.itemsize == 4 else _D
    _XGEMM(kind, _T if tb else _N, _T if ta else _N, n, m, kk, coef.ctypes, b.ctypes, _ld(b),
           a.ctypes, _ld(a), coef[1:].ctypes, c.ctypes, _ld(c))
