"""The fused kernels' thread count per kind of call (``kernels._thread_choice``).

A kind of call first runs on all the threads it may use, then on one, then on whichever had
the lower median time; the count not in use is timed again later, less often while the choice
stands, and a slowdown of the count in use switches at once. The choice changes no result.
Timings here come from a clock the test drives, so the tests do not depend on this machine's
speed; the calls themselves really run on the pool (each test proves on how many threads).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
from helpers.paths import record_paths

from fastattn.kernels import _flash, _thread_choice
from fastattn.kernels._thread_choice import FIRST_LOOK, LAST_LOOK, TRIES, _Kind

# ---- the rule, on one kind, with made-up times


def _run(kind, cost, calls):
    """``calls`` calls of ``kind`` whose time on n threads is cost[n]; the counts used."""
    used = []
    for _ in range(calls):
        n = kind.pick()
        used.append(n)
        kind.record(n, cost[n])
    return used


def test_a_kind_alternates_between_all_threads_and_one_then_runs_on_the_faster():
    kind = _Kind(2)
    assert _run(kind, {1: 1.0, 2: 2.0}, 2 * TRIES) == [2, 1] * TRIES
    assert kind.using == 1 and _run(kind, {1: 1.0, 2: 2.0}, 5) == [1] * 5
    kind = _Kind(4)  # the faster is all of them: they stay
    assert _run(kind, {1: 2.0, 4: 1.0}, 2 * TRIES + 5) == [4, 1] * TRIES + [4] * 5
    assert kind.using == 4 and kind.interval == FIRST_LOOK


def test_both_counts_are_timed_again_in_turns_less_often_while_the_choice_stands():
    kind = _Kind(2)
    cost = {1: 1.0, 2: 2.0}
    _run(kind, cost, 2 * TRIES)
    interval, looks = FIRST_LOOK, 0
    while interval < 4 * LAST_LOOK:
        every = min(interval, LAST_LOOK)
        used = _run(kind, cost, every - 1 + 2 * TRIES)
        # every - 1 calls on the choice, then a look: the other count and it in turns
        assert used == [1] * (every - 1) + [2, 1] * TRIES, (interval, used)
        assert kind.using == 1
        interval, looks = 2 * interval, looks + 1
    assert kind.interval == LAST_LOOK and looks > 5


def test_a_look_that_finds_the_other_count_faster_switches_and_looks_soon_again():
    kind = _Kind(2)
    _run(kind, {1: 1.0, 2: 2.0}, 2 * TRIES)
    _run(kind, {1: 1.0, 2: 2.0}, FIRST_LOOK - 1 + 2 * TRIES)  # one look: the choice stands
    assert kind.interval == 2 * FIRST_LOOK
    quiet = {1: 1.0, 2: 0.8}  # the other core came free: a little faster, no switch between
    used = _run(kind, quiet, 2 * FIRST_LOOK - 1)
    assert used == [1] * (2 * FIRST_LOOK - 1) and kind.using == 1
    used = _run(kind, quiet, 2 * TRIES)  # the look: both afresh, two threads faster
    assert used == [2, 1] * TRIES and kind.using == 2 and kind.interval == FIRST_LOOK
    assert _run(kind, quiet, 3) == [2] * 3


def test_a_large_slowdown_of_the_count_in_use_starts_a_look_at_once_a_small_one_waits():
    kind = _Kind(2)
    _run(kind, {1: 2.0, 2: 1.0}, 2 * TRIES)
    assert kind.using == 2
    assert _run(kind, {1: 2.0, 2: 9.0}, 1) == [2] and kind.using == 2  # one slow call
    assert _run(kind, {1: 2.0, 2: 1.0}, 2) == [2, 2] and kind.using == 2
    # slower than one thread was, but less than SLOWER times: left to the next look
    assert _run(kind, {1: 2.0, 2: 2.5}, 5) == [2] * 5 and kind.using == 2
    assert _run(kind, {1: 2.0, 2: 9.0}, 2) == [2, 2]  # two of the last three: load came?
    assert _run(kind, {1: 2.0, 2: 9.0}, 2 * TRIES) == [1, 2] * TRIES  # a look, at once
    assert kind.using == 1 and kind.interval == FIRST_LOOK
    assert _run(kind, {1: 2.0, 2: 9.0}, 3) == [1] * 3
    kind = _Kind(2)  # a false alarm: the look finds the count in use still the faster
    _run(kind, {1: 2.0, 2: 1.0}, 2 * TRIES)
    assert _run(kind, {1: 2.0, 2: 9.0}, 2) == [2, 2]
    assert _run(kind, {1: 2.0, 2: 1.0}, 2 * TRIES + 3) == [1, 2] * TRIES + [2] * 3
    assert kind.using == 2 and kind.interval == 2 * FIRST_LOOK


def test_the_choice_forgets_every_kind_beyond_its_limit(monkeypatch):
    monkeypatch.setattr(_thread_choice, "MAX_KINDS", 3)
    choice = _thread_choice.Choice()
    for key in "abc":
        choice.pick(key, 2)
    assert choice.using("c") == 2 and choice.using("z") is None
    choice.pick("d", 2)  # a fourth kind: the three before are forgotten
    assert [choice.using(k) for k in "abcd"] == [None, None, None, 2]
    choice.record("q", 2, 1.0)  # a kind not seen: nothing to record, no error
    assert choice.using("q") is None


# ---- _in_parallel: the count chosen is the count that runs


class _Clock:
    """perf_counter for _flash: its second reading of a call is the first plus cost[n], n the
    threads that entered the kernel in between (so a call's time depends on its threads)."""

    def __init__(self, log):
        self.log, self.now, self.start = log, 0.0, None
        self.cost = {1: 1.0, 2: 2.0}

    def perf_counter(self):
        if self.start is None:
            self.start = len(self.log)
        else:
            self.now += self.cost[len(set(self.log[self.start:]))]
            self.start = None
        return self.now


def _driven(monkeypatch):
    log, lock = [], threading.Lock()

    def kernel(counter, log):  # one kind of call: the same function every time
        with lock:
            log.append(threading.get_ident())

    clock = _Clock(log)
    monkeypatch.setattr(_flash, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(_thread_choice, "ENABLED", True)

    def call():
        start = len(log)
        _flash._in_parallel(kernel, 8, 10, 1, log)
        return len(set(log[start:]))

    return call, clock, kernel


def test_in_parallel_runs_on_the_count_its_timings_chose(monkeypatch, threads):
    threads(2)
    call, clock, kernel = _driven(monkeypatch)
    assert [call() for _ in range(2 * TRIES)] == [2, 1] * TRIES
    assert [call() for _ in range(FIRST_LOOK - 1)] == [1] * (FIRST_LOOK - 1)
    assert [call() for _ in range(2 * TRIES)] == [2, 1] * TRIES  # a look at both
    assert _thread_choice.choice.using((kernel, 8, 10, 2)) == 1
    clock.cost = {1: 4.0, 2: 1.0}  # one thread got much slower: two of its times start a look
    assert [call() for _ in range(2 + 2 * TRIES + 2)] == [1, 1] + [2, 1] * TRIES + [2, 2]
    with _thread_choice.fixed():  # fixed: all the threads, and no time is taken
        assert [call() for _ in range(3)] == [2] * 3
        clock.cost = {1: 1.0, 2: 9.0}
        assert [call() for _ in range(3)] == [2] * 3
    assert _thread_choice.active()


def test_with_the_choice_off_every_call_runs_on_all_threads(monkeypatch, threads):
    threads(2)
    call, clock, kernel = _driven(monkeypatch)
    monkeypatch.setattr(_thread_choice, "ENABLED", False)
    assert [call() for _ in range(2 * TRIES + 2)] == [2] * (2 * TRIES + 2)
    assert _thread_choice.choice.using((kernel, 8, 10, 2)) is None
    threads(1)  # one thread allowed: one thread, nothing chosen either way
    monkeypatch.setattr(_thread_choice, "ENABLED", True)
    assert [call() for _ in range(2 * TRIES + 2)] == [1] * (2 * TRIES + 2)
    assert _thread_choice.choice.using((kernel, 8, 10, 1)) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fused_kernels_give_the_same_bits_on_the_count_chosen(dtype, monkeypatch, threads,
                                                                  rng):
    """The real kernels, chosen onto one thread and onto two (the log proves which): the same
    out, lse, dq, dk, dv bits."""
    threads(2)
    monkeypatch.setattr(_thread_choice, "ENABLED", True)
    log = record_paths(monkeypatch, force=True)
    B, H, T, d = 6, 2, 13, 8
    q, k, v, dout = (rng.standard_normal((B, H, T, d)).astype(dtype) for _ in range(4))
    results = {}
    for n in (1, 2):
        monkeypatch.setattr(_thread_choice.choice, "pick", lambda key, allowed, n=n: n)
        log.fused.clear()
        out, lse = _flash.attention_forward(q, k, v, 0.3, True, None)
        grads = _flash.attention_backward(dout, q, k, v, out, lse, 0.3, True, None)
        assert log.fused and set(log.fused) == {n}, (n, log.fused)
        results[n] = (out, lse, *grads)
    for one, two in zip(results[1], results[2], strict=True):
        assert np.array_equal(one, two)


def test_the_variable_turns_the_choice_off_at_import():
    code = "from fastattn.kernels import _thread_choice as t; print(t.ENABLED, t.active())"
    for value, want in (("off", "False False"), ("OFF ", "False False"), ("0", "False False"),
                        ("on", "True True"), ("", "True True")):
        env = {k: v for k, v in os.environ.items()
               if k != "FASTATTN_THREAD_CHOICE"}
        env["FASTATTN_THREAD_CHOICE"] = value
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert got.stdout.split() == want.split(), (value, got.stdout, got.stderr[-2000:])
