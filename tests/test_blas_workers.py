"""The fused kernels' helper threads: NumPy's OpenBLAS workers when they can be had
(``kernels._blas_workers``), else the kernels' own pool.

Each test that says the workers ran a call proves it: the call's units were taken by a thread
that Python does not know (an OpenBLAS worker), and the route's count of calls grew.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers.paths import record_paths

numba = pytest.importorskip("numba")
threadpoolctl = pytest.importorskip("threadpoolctl")

from fastattn.kernels import _blas_workers, _flash, _tuning  # noqa: E402

pytestmark = pytest.mark.skipif(_blas_workers.threads() < 2,
                                reason="NumPy's BLAS offers no worker threads here")


@pytest.fixture
def two_threads(monkeypatch, threads):
    """Two kernel threads, even for the smallest work, and no thread choice."""
    threads(2)
    monkeypatch.setitem(_tuning._state, "current", (dataclasses.replace(
        _tuning.current()[0], serial_flops=0), "no serial threshold (a test)"))
    from fastattn.kernels import _thread_choice

    monkeypatch.setattr(_thread_choice, "active", lambda: False)


def _qkv(dtype, seed=0, B=6, T=40, d=8):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, T, d)).astype(dtype) for _ in range(4)]


def _forward_backward(q, k, v, dout):
    out, lse = _flash.attention_forward(q, k, v, 0.35, True, None, tiles=(8, 8))
    return (out, lse, *_flash.attention_backward(dout, q, k, v, out, lse, 0.35, True, None,
                                                 tiles=(8, 8)))


def _python_threads():
    return {t.ident for t in threading.enumerate()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_run_on_numpys_blas_workers_with_the_same_bits(two_threads, monkeypatch,
                                                                threads, dtype):
    q, k, v, dout = _qkv(dtype)
    threads(1)
    one = _forward_backward(q, k, v, dout)
    threads(2)
    calls = record_paths(monkeypatch).fused_threads
    before = _blas_workers.calls[0]
    two = _forward_backward(q, k, v, dout)
    assert _blas_workers.calls[0] - before == len(calls) == 2
    for idents in calls:  # the calling thread and a thread that Python did not start
        assert threading.get_ident() in idents
        assert idents - _python_threads(), "no OpenBLAS worker took a unit"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, two, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_off_and_a_blas_limit_of_one_give_the_work_to_the_kernels_pool(two_threads,
                                                                        monkeypatch):
    q, k, v, dout = _qkv(np.float64, seed=1)
    want = _forward_backward(q, k, v, dout)
    calls = record_paths(monkeypatch).fused_threads
    for ctx in (_blas_workers.off(), threadpoolctl.threadpool_limits(1, user_api="blas")):
        calls.clear()
        before = _blas_workers.calls[0]
        with ctx:
            assert _blas_workers.threads() == 1
            got = _forward_backward(q, k, v, dout)
        assert _blas_workers.calls[0] == before
        assert calls and all(len(idents) == 2 and idents <= _python_threads()
                             for idents in calls), calls  # a pool thread of the kernels
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
    assert _blas_workers.threads() >= 2  # both blocks gave the workers back


def test_run_wants_as_many_threads_as_there_are():
    n = _blas_workers.threads()
    assert not _blas_workers.run(n + 1, lambda: pytest.fail("ran"))
    assert not _blas_workers.run(1, lambda: pytest.fail("ran"))


def test_an_exception_in_a_worker_is_raised_in_the_caller():
    caller = threading.get_ident()
    seen = []

    def work():
        seen.append(threading.get_ident())
        if threading.get_ident() != caller:
            raise ArithmeticError("in a worker")

    with pytest.raises(ArithmeticError, match="in a worker"):
        _blas_workers.run(2, work)
    assert len(seen) == 2 and caller in seen
    assert _blas_workers.run(2, lambda: None)  # the workers are free again


def test_python_threads_share_the_workers(two_threads):
    """Kernels called from several Python threads at once each get their results (no call
    waits for ever on a worker that another call holds)."""
    cases = [_qkv(np.float32, seed=s, B=3) for s in range(3)]
    want = [_forward_backward(*c) for c in cases]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(15):
                got[i] = _forward_backward(*cases[i])
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors
    for i in range(3):
        for a, b in zip(want[i], got[i], strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_variable_turns_the_workers_off():
    code = ("from fastattn.kernels import _blas_workers as w; import numpy as np; "
            "print(w.threads(), w.run(2, lambda: None))")
    env = dict(os.environ, FASTATTN_BLAS_WORKERS="off")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1", "False"]
