"""NumPy's OpenBLAS worker threads as the fused kernels' helper threads.

Why: after each matrix product on more than one thread, NumPy's OpenBLAS keeps its worker
threads spinning (for some 2^28 cycles) on the other cores. In a training step the products
come every few hundred microseconds, so those workers never sleep, and a helper thread of our
own shares a core with one of them: a fused kernel on two threads is then no faster than on
one (``_thread_choice``). OpenBLAS's pthreads server can run any C function on its workers
(``gotoblas_pthread``, its pthread_create-style entry point, exported by the OpenBLAS that
NumPy's wheels ship). :func:`run` hands a kernel's work to them: the calling thread and the
workers run the same nogil kernel, taking units from the shared counter, on the cores the
workers were spinning on anyway, and no thread of ours competes with them. The next product
finds its workers where it left them, awake.

When it is used: NumPy's BLAS is OpenBLAS with its own pthreads pool (not OpenMP), is not the
BLAS that the kernels themselves call (SciPy's, ``_blas``), runs on at least two threads now
(``threadpoolctl``'s count; a limit of 1 turns this off), has started its workers, and offers
the entry point. Otherwise, or with ``FASTATTN_BLAS_WORKERS=off`` (read at import), the
kernels' own ``ThreadPoolExecutor`` helps (``_flash.pool``). Which one ran a call changes no
result: the units do not depend on the threads that take them.

How: the workers run a ctypes callback, which takes the GIL for the moment it needs to find
its job and call the kernel; the kernel releases it (``nogil``). The calling thread waits in
OpenBLAS (the GIL released) until every worker is done, and an exception in a worker is
raised in the caller. A worker that another thread's product holds just starts later: the
counter leaves it fewer units, or none.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import itertools
import os
import threading

_ENABLED = os.environ.get("FASTATTN_BLAS_WORKERS", "").strip().lower() not in ("off", "0")
_STRIDE = 1 << 10  # the callback's argument: job number * _STRIDE + thread index
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_jobs: dict = {}  # job number -> (fn, args, errors)
_numbers = itertools.count(1)
_state: dict = {}
_lock = threading.Lock()
_off = contextvars.ContextVar("fastattn_no_blas_workers", default=False)  # off() in force
calls = [0]  # calls run on the workers (tests read it)


def _work(arg):
    """A worker's (or the caller's) share of job ``arg // _STRIDE``."""
    number = (arg or 0) // _STRIDE
    job = _jobs.get(number)
    if job is None:
        return
    fn, args, errors = job
    try:
        fn(*args)
    except BaseException as e:  # raised again in the calling thread
        errors.append(e)


_work_c = _CALLBACK(_work)
_work_ptr = ctypes.cast(_work_c, ctypes.c_void_p)


def _numpy_openblas():
    """(entry point, threadpoolctl controller, its thread count, its started flag) of NumPy's
    OpenBLAS when it has a pthreads pool of its own and the entry point and is not the kernels'
    own BLAS; else None."""
    import numpy

    from . import _blas

    if not _blas.available():
        return None
    own = {os.path.realpath(c.filepath) for c in _blas.pools()}
    here = os.path.realpath(os.path.dirname(numpy.__file__))  # numpy/ and numpy.libs/
    for lib in _blas.every_blas().lib_controllers:
        path = os.path.realpath(lib.filepath)
        if (lib.internal_api != "openblas" or path in own or not path.startswith(here)
                or getattr(lib, "threading_layer", None) != "pthreads"):
            continue
        try:
            dll = ctypes.CDLL(lib.filepath)
            entry = dll.gotoblas_pthread
            workers = ctypes.c_int.in_dll(dll, "blas_num_threads")  # threads, the caller's too
            started = ctypes.c_int.in_dll(dll, "blas_server_avail")
        except (OSError, AttributeError, ValueError):
            continue
        entry.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        entry.restype = ctypes.c_int
        return entry, lib, workers, started
    return None


def _pool():
    if "pool" not in _state:
        with _lock:
            if "pool" not in _state:
                _state["pool"] = _numpy_openblas() if _ENABLED else None
    return _state["pool"]


def threads() -> int:
    """How many threads a call of :func:`run` can have now, the calling one included (1: the
    workers cannot be used)."""
    pool = _pool()
    if pool is None or _off.get():
        return 1
    _, lib, workers, started = pool
    if started.value != 1:
        return 1
    return max(1, min(lib.num_threads, workers.value))


def run(n, fn, *args) -> bool:
    """Run ``fn(*args)`` on the calling thread and n - 1 of NumPy's OpenBLAS workers, all at
    once, and return True; False (nothing run) when fewer than n threads are there."""
    if n < 2 or threads() < n:
        return False
    entry = _state["pool"][0]
    number = next(_numbers)
    errors: list = []
    _jobs[number] = (fn, args, errors)
    try:
        entry(n, _work_ptr, number * _STRIDE, 1)  # thread i gets number * _STRIDE + i
    finally:
        del _jobs[number]
    calls[0] += 1
    if errors:
        raise errors[0]
    return True


def describe() -> str:
    """Which threads help the fused kernels now, in words (``fastattn info``)."""
    if not _ENABLED:
        return "a pool of their own (FASTATTN_BLAS_WORKERS=off)"
    if _off.get():
        return "a pool of their own (off in this thread)"
    if _pool() is None:
        return "a pool of their own (NumPy's BLAS lends no OpenBLAS pthreads workers)"
    n = threads()
    if n < 2:
        return "a pool of their own (NumPy's BLAS runs on one thread now)"
    return f"NumPy's OpenBLAS workers ({n - 1})"


@contextlib.contextmanager
def off():
    """Within this block (in this thread or task), the kernels do not use the workers (their own
    pool helps), as ``_thread_choice.fixed`` sets its rule."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)
