"""Which code path the numba kernels took: serial, or parallel (and on how many threads).

The unfused kernels (``kernels/numba_backend.py``) decide in one function, ``_parallel(work,
threshold, batch)``; the fused ones (``kernels/_flash.py``) hand their work units to
``_in_parallel(fn, n_units, flops, serial_flops, ...)``, which runs ``fn`` on one thread or
several; the recurrent ones (``kernels/_recurrent_numba.py``) cut the batch into
``_shares(N, H, width)`` row shares (``_rows``). ``record_paths`` wraps all three: the
decisions of the first and the last (as "unfused": True when parallel; for the recurrent
kernels: more than one share, run on more than one thread), and the distinct threads that
ran ``fn`` in the second. With ``force=True`` the work thresholds are set to 0 (the unfused
kernels' constants, the tuning setting's ``serial_flops``, the recurrent kernels' work
threshold, and their rows per share to 2), so that small test shapes take the parallel paths
whenever there are two threads and something to share. (The glue kernels of
``kernels/_glue_numba.py`` always run ``prange`` over rows or row chunks; ``glue_chunks``
says into how many chunks the column-summing ones split N rows.)
"""

from __future__ import annotations

import dataclasses
import threading


class PathLog:
    """unfused: one bool per unfused call (True: parallel); fused: one thread count per fused
    call (1: serial); fused_threads: the idents of those threads, one set per fused call."""

    def __init__(self):
        self.unfused, self.fused, self.fused_threads = [], [], []

    def clear(self):
        self.unfused.clear()
        self.fused.clear()
        self.fused_threads.clear()

    @property
    def parallel(self):
        """True when every call since the last clear() ran in parallel (and there was one)."""
        calls = self.unfused + [n > 1 for n in self.fused]
        return bool(calls) and all(calls)


def record_paths(monkeypatch, force=False):
    """Start logging the paths the numba kernels take (undone with ``monkeypatch``)."""
    from fastattn.kernels import _flash, _recurrent_numba, _tuning, numba_backend

    log = PathLog()
    if force:
        for name in ("_PARALLEL_MIN_ELEMENTS", "_PARALLEL_MIN_MACS", "_PARALLEL_MIN_SCATTER"):
            monkeypatch.setattr(numba_backend, name, 0)
        monkeypatch.setattr(_recurrent_numba, "_PARALLEL_MIN_MACS", 0)
        monkeypatch.setattr(_recurrent_numba, "_ROWS", 2)
        monkeypatch.setitem(_tuning._state, "current", (dataclasses.replace(
            _tuning.current()[0], serial_flops=0), "no serial threshold (a test)"))
    decide = numba_backend._parallel

    def parallel(work, threshold, batch):
        took = decide(work, threshold, batch)
        log.unfused.append(bool(took))
        return took

    run = _flash._in_parallel

    def in_parallel(fn, n_units, flops, serial_flops, *args):
        idents, lock = set(), threading.Lock()

        def traced(counter, *a):
            with lock:
                idents.add(threading.get_ident())
            return fn(counter, *a)

        run(traced, n_units, flops, serial_flops, *args)
        log.fused.append(len(idents))
        log.fused_threads.append(idents)

    rows = _recurrent_numba._rows

    def recurrent_rows(*args):
        out = rows(*args)
        log.unfused.append(_recurrent_numba.stats["threads"] > 1)
        return out

    monkeypatch.setattr(numba_backend, "_parallel", parallel)
    monkeypatch.setattr(_recurrent_numba, "_rows", recurrent_rows)
    monkeypatch.setattr(_flash, "_in_parallel", in_parallel)
    return log


def glue_chunks(N):
    """Into how many row chunks the column-summing glue kernels split N rows."""
    from fastattn.kernels import _glue_numba

    return _glue_numba._chunks(N)


def use_products(monkeypatch, own):
    """Put the tile products of the fused kernels, and the unfused kernels' products, by the
    own micro-kernel (own = 1: ``own_dim`` 1024) or by BLAS (own = 0: ``own_dim`` 0) in force,
    undone with ``monkeypatch``. Returns a list that receives, per call of a fused kernel
    (plain or features) and per call of an unfused one that runs products
    (``numba_backend._run_products``), the flag it was given."""
    from fastattn.kernels import _flash, _tuning, numba_backend
    from fastattn.kernels import _flash_features as ff
    from fastattn.kernels._flash_tiles import _OWN

    monkeypatch.setitem(_tuning._state, "current", (dataclasses.replace(
        _tuning.current()[0], own_dim=1024 if own else 0), f"own products {own} (a test)"))
    seen = []

    def spy(run):
        def in_parallel(fn, n_units, flops, serial_flops, *args):
            if fn in (_flash._forward_units, _flash._backward_units):
                seen.append(int(args[-1]))
            elif fn is ff._forward_units:
                seen.append(int(args[8][_OWN]))  # cfg
            elif fn is ff._backward_units:
                seen.append(int(args[15][_OWN]))
            return run(fn, n_units, flops, serial_flops, *args)
        return in_parallel

    run_products = numba_backend._run_products

    def products(args, parallel, own):
        seen.append(int(own))
        return run_products(args, parallel, own)

    monkeypatch.setattr(_flash, "_in_parallel", spy(_flash._in_parallel))
    monkeypatch.setattr(ff, "_in_parallel", spy(ff._in_parallel))
    monkeypatch.setattr(numba_backend, "_run_products", products)
    return seen
