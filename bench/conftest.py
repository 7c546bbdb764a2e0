"""What every benchmark suite shares: one check-then-time helper (as llm.c's dev/cuda
``common.h``: validate a kernel against the reference, then time it), the test session's
Numba cache (``helpers.numba_cache``), and the machine each table was measured on.

A benchmark builds its inputs and a function, then hands both to the ``check_then_time``
fixture with a check of the result: the call that is checked is exactly the call that is
timed. Benchmarks keep no timers of their own; pytest-benchmark times, and
``--benchmark-disable`` runs every suite as plain tests (check only). Every table ends with a
line naming the machine (CPU model, instruction set, BLAS kernel): figures differ from one CPU
to the next. Another line says how quiet the machine was while the suite ran
(``fastattn._hostload``: the hypervisor's steal and other processes' share of the CPUs): a
ratio measured while the host took a core away is worth less.
"""

from __future__ import annotations

import functools
import time

import pytest
from helpers import numba_cache

numba_cache.configure()  # before any kernel is imported: never time or check stale code

from fastattn._hostload import Watch  # noqa: E402 (after configure: it imports fastattn)

_WATCH = Watch()  # the host's load from the suite's start (conftest files load before tests)


@pytest.fixture
def check_then_time(benchmark):
    """``check_then_time(fn, args, *, check, rounds=None, warmup=0.2, work=None)`` on this
    test's ``benchmark``; see ``run_checked_then_timed``."""
    return functools.partial(run_checked_then_timed, benchmark)


def run_checked_then_timed(benchmark, fn, args=(), *, check, rounds=None, warmup=0.2,
                           work=None):
    """Call ``fn(*args)`` once (compiling it) and ``check`` its result (raising when it is
    wrong), then warm up for ``warmup`` seconds and time the same call with ``benchmark``.

    rounds: time exactly this many single calls (``benchmark.pedantic``), for slow variants.
    work: ``{unit: amount}``, e.g. ``{"GFLOP/s": flops}``: ``extra_info[unit]`` gets
    amount / 1e9 / the minimum time, when timings were taken.
    Returns the checked result.
    """
    result = fn(*args)
    check(result)
    if rounds is not None:
        benchmark.pedantic(fn, args, rounds=rounds, iterations=1)
    else:
        if benchmark.enabled:  # caches, thread pools and page tables warm before timing
            end = time.perf_counter() + warmup
            while time.perf_counter() < end:
                fn(*args)
        benchmark(fn, *args)
    for unit, amount in (work or {}).items():
        benchmark.extra_info["work"] = amount
        if benchmark.enabled and benchmark.stats is not None:
            benchmark.extra_info[unit] = round(amount / benchmark.stats.stats.min / 1e9, 2)
    return result


def machine():
    """CPU model, instruction set and BLAS kernel, in one line (``fastattn info``'s)."""
    from fastattn.commands.info import machine as describe

    return describe()


def setting():
    """The fused kernels' setting in force and where it comes from (``fastattn info``'s
    ``tuning`` row): defaults, which defaults, or a tuned file."""
    from fastattn.kernels import _tuning

    return _tuning.current()[1]


def thread_rule():
    """How the fused kernels pick their thread count (``fastattn info``'s row)."""
    from fastattn.commands.info import thread_rule as describe

    return describe()


def host_load():
    """The machine's load while the suite ran (``fastattn._hostload.Watch.describe``)."""
    return _WATCH.describe()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastattn_machine"] = machine()
    machine_info["fastattn_setting"] = setting()
    machine_info["fastattn_threads"] = thread_rule()
    machine_info["fastattn_host_load"] = host_load()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is not None and not session.disabled and session.benchmarks:
        terminalreporter.write_line(f"measured on: {machine()}")
        terminalreporter.write_line(f"fused kernels' setting: {setting()}")
        terminalreporter.write_line(f"fused kernels' threads: {thread_rule()}")
        terminalreporter.write_line(f"host while measuring: {host_load()}")
