"""How many threads a fused kernel call runs on: all it may use, or the calling one alone,
whichever has measured faster for that kind of call.

Why: a second thread pays only when it gets a core. In a training step it mostly does not:
after each product on two threads, NumPy's OpenBLAS keeps its worker spinning on the other
core (for some 2^28 cycles), so the kernels' pool thread shares that core with it, and the
call waits at its end for the units the pool thread took. Measured in the default model's
training step (2-core AMD EPYC, Zen 4; Numba's default 2 threads, BLAS on 2; every call of
the three attentions alternating between 1 and 2 threads, 300 steps): on 2 threads the calls
took a median 1.07-1.17x their time on 1 (the encoder's forward 1.08 against 0.97 ms), the
few-rows products 1.3x. Another process busy on a core does the same. Called alone, with the
cores free, the same kernels run some 1.8x faster on two threads. Which is faster is a
property of the moment, not of the kernel, so it is measured.

How: a kind of call is (kernel, work units, flops, threads allowed). Its first ``TRIES`` calls
run on all the allowed threads, as without this module, the next ``TRIES`` on one; from then
on each call runs on the count with the lower median of its last ``TRIES`` times. The count in
use is timed at every call, so a slowdown of it (load that came) shows at once; the other one
is timed again, ``TRIES`` calls in a row, after ``FIRST_LOOK`` calls, then after twice as many
each time the choice stands, up to ``LAST_LOOK``. A kind seen fewer than ``2 TRIES`` times
(say, a decoding step's growing key length) always runs on all the allowed threads.

The thread count changes no result (each kernel's units do not depend on it: ``_flash``).
``FASTATTN_THREAD_CHOICE=off`` (read at import) or :func:`fixed` (for timing a kernel, as
``fastattn.tune`` does) runs every call on all the allowed threads.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading

TRIES = 3  # timed calls per look at a count; its estimate is their median
FIRST_LOOK = 16  # calls between looks at the count not in use, doubled while the choice stands
LAST_LOOK = 256
MAX_KINDS = 4096  # kinds of call remembered; beyond that all are forgotten and start again

ENABLED = os.environ.get("FASTATTN_THREAD_CHOICE", "").strip().lower() not in ("off", "0")
_fixed = contextvars.ContextVar("fastattn_fixed_threads", default=False)


@contextlib.contextmanager
def fixed():
    """Within this block (in this thread or task), every fused kernel call runs on all the
    threads it may use, and nothing is measured."""
    token = _fixed.set(True)
    try:
        yield
    finally:
        _fixed.reset(token)


def active() -> bool:
    return ENABLED and not _fixed.get()


def _median(times):
    return sorted(times)[len(times) // 2]


class _Kind:
    """What is known of one kind of call that may run on ``n`` threads."""

    __slots__ = ("n", "times", "using", "looking", "left", "since", "interval")

    def __init__(self, n):
        self.n = n
        self.times = {n: [], 1: []}  # the last TRIES times (seconds) on each count
        self.using = n  # the count in use
        self.looking = 1  # the count being timed now (TRIES calls in a row), or 0
        self.left = 2 * TRIES  # calls left until the first choice (all, then one)
        self.since = 0  # calls since the last look
        self.interval = FIRST_LOOK

    def pick(self):
        if self.left > TRIES:
            return self.n  # the first calls: all the allowed threads
        if self.left > 0:
            return 1
        if self.looking:
            return self.looking
        self.since += 1
        if self.since >= self.interval:  # time the other count again, from scratch
            self.looking = 1 if self.using == self.n else self.n
            self.times[self.looking] = []
            return self.looking
        return self.using

    def record(self, threads, seconds):
        t = self.times[threads]
        t.append(seconds)
        del t[:-TRIES]
        if self.left > 0:
            self.left -= 1
            if self.left == 0:
                self.looking = 0
                self.using = self._faster()
            return
        if self.looking == threads and len(t) >= TRIES:  # a look is over
            before, self.looking, self.since = self.using, 0, 0
            self.using = self._faster()
            self.interval = (FIRST_LOOK if self.using != before
                             else min(2 * self.interval, LAST_LOOK))
        elif not self.looking and threads == self.using:
            self.using = self._faster()  # the count in use got slower than the other's last

    def _faster(self):
        one, all_ = self.times[1], self.times[self.n]
        if not one or not all_:
            return self.using
        return 1 if _median(one) < _median(all_) else self.n


class Choice:
    """The kinds of call seen so far (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kinds: dict = {}

    def pick(self, key, n):
        """The thread count (n or 1) for the next call of kind ``key`` that may use n."""
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                if len(self._kinds) >= MAX_KINDS:
                    self._kinds.clear()
                kind = self._kinds[key] = _Kind(n)
            return kind.pick()

    def record(self, key, threads, seconds):
        """A call of kind ``key`` took ``seconds`` on ``threads`` threads."""
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and threads in kind.times:
                kind.record(threads, seconds)

    def using(self, key):
        """The count in use for ``key`` (None for a kind not seen): for tests and tools."""
        with self._lock:
            kind = self._kinds.get(key)
            return None if kind is None else kind.using

    def clear(self):
        with self._lock:
            self._kinds.clear()


choice = Choice()
