"""Independent pieces of Python-level work (``generate_batch``'s chunks) on several threads.

Greedy decoding runs one small kernel or product after another. Each is too short to share
well between threads: on 2 cores, 2,000 questions took 0.78 of their one-thread time when
every kernel and product used both cores. Whole chunks of questions on threads of their own,
each thread's kernels and BLAS at one thread, took 0.58 of the one-thread time (NumPy's
products and the Numba kernels release the GIL; the Python between them is a small part).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import threading

_busy = threading.Lock()  # one map_in_threads at a time holds the process-wide BLAS limit


def threads() -> int:
    """The threads to use: Numba's thread count here (``numba.set_num_threads``,
    ``NUMBA_NUM_THREADS``), the one that the kernels use; 1 without Numba."""
    try:
        import numba
    except ImportError:
        return 1
    return numba.get_num_threads()


@contextlib.contextmanager
def _numba_threads(n):
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(n)  # thread-local: only this thread's kernels
    try:
        yield
    finally:
        numba.set_num_threads(old)


def map_in_threads(fn, items, n_threads: int | None = None) -> list:
    """[fn(item) for item in items], run on up to ``n_threads`` (default :func:`threads`)
    threads: the calling one and a pool's, each taking the next item until none are left (so
    a thread slowed down by other work on the machine takes fewer). Meanwhile every BLAS runs
    one thread and each of these threads runs its Numba kernels on one thread. ``fn`` must
    not depend on which thread runs it. The first exception raised by a call stops the
    others from taking more items and is raised here. One call at a time runs on threads (it
    holds the process-wide BLAS limit); a call from another thread meanwhile runs its items
    one after another on its own thread."""
    items = list(items)
    n = min(len(items), threads() if n_threads is None else n_threads)
    if n <= 1 or not _busy.acquire(blocking=False):
        # another thread's call holds the BLAS limit: its restore would undo ours under our
        # threads (and leave one of them threadpoolctl's OpenBLAS controlling thread)
        return [fn(item) for item in items]
    try:
        return _run(fn, items, n)
    finally:
        _busy.release()


def _run(fn, items, n):
    from fastattn.kernels import _blas
    from fastattn.kernels._flash import pool

    results = [None] * len(items)
    errors = []
    lock = threading.Lock()
    todo = iter(range(len(items)))

    def work():
        with _numba_threads(1):
            while True:
                with lock:
                    k = None if errors else next(todo, None)
                if k is None:
                    return
                try:
                    results[k] = fn(items[k])
                except BaseException as e:
                    with lock:
                        errors.append(e)
                    return

    futures = []
    with _blas.every_blas().limit(limits=1, user_api="blas"):
        try:
            # each worker runs in a copy of this thread's context (the backend in force)
            for _ in range(n - 1):
                futures.append(pool(n - 1, "chunks").submit(
                    contextvars.copy_context().run, work))
            work()
        except BaseException as e:  # an interrupt between two items: the others stop too
            with lock:
                errors.append(e)
        finally:
            while True:  # none runs on once this returns, even if interrupted while waiting
                try:
                    concurrent.futures.wait(futures)
                    break
                except BaseException as e:
                    with lock:
                        errors.append(e)
    for f in futures:
        f.result()
    if errors:
        raise errors[0]
    return results
