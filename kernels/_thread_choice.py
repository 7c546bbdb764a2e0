"""How many threads a fused kernel call runs on: all it may use, or the calling one alone,
whichever has measured faster for that kind of call.

Why: a second thread pays only when it gets a core. In a training step it mostly does not:
after each product on two threads, NumPy's OpenBLAS keeps its worker spinning on the other
core (for some 2^28 cycles), so the kernels' pool thread shares that core with it, and the
call waits at its end for the units the pool thread took. Measured in the default model's
training step (2-core AMD EPYC, Zen 4; Numba's default 2 threads, BLAS on 2; every call of
the three attentions alternating between 1 and 2 threads, 300 steps): on 2 threads the calls
took a median 1.07-1.17x their time on 1 (the encoder's forward 1.08 against 0.97 ms), the
unfused products on the kernels' threads (``_products``) 1.3-1.6x. Called alone, with the
cores free, two threads are faster (the encoder's attention, forward plus backward, min 1.48
against 2.45 ms). Which is faster is a property of the moment, not of the kernel, so it is
measured.

How: a kind of call is (kernel, work units, flops, threads allowed). Its first ``2 TRIES``
calls alternate between all the allowed threads and one; from then on each call runs on the
count with the lower median of its ``TRIES`` times. Both counts are timed afresh, in turns (so
that a drift of the machine's speed moves both alike), after ``FIRST_LOOK`` calls, then after
twice as many each time the choice stands, up to ``LAST_LOOK``. Between these looks the count
in use is timed at every call, and when its median grows ``SLOWER`` times the other's last
(load came?), the next call starts a look. A kind seen fewer than ``2 TRIES`` times (say, a
decoding step's growing key length) runs on all the allowed threads once and on one once, as
it alternates.

What it costs and gains, measured on the same machine (in one process, the choice on and off
in turns of 25 steps or 50 calls, three processes each): in the default model's training step
with the library's thread defaults, a median step 2.5-4.8% faster with it; the encoder's
attention called alone (where two threads stay), its median 0-2.4% slower (the looks' calls
on one thread), with looks up to every 256 calls; now up to every 1024.

Since then the helper thread is NumPy's OpenBLAS worker where it can be had
(``_blas_workers``): the worker that spun beside the call now takes its units, and in the same
step both counts were measured again (300 steps, library's defaults): the encoder's forward
0.60 ms on two threads against 0.90 on one, its backward 1.07 against 1.53, the decoder's and
the cross-attention's 0.37-0.42 against 0.41-0.50, so two are in use there. The choice stays
for load: another process on the helper's core slows the two-thread calls.

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
FIRST_LOOK = 16  # calls from one look to the next, doubled while the choice stands
LAST_LOOK = 1024
SLOWER = 1.5  # between looks, a look comes at once when the count in use gets this much slower
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

    __slots__ = ("n", "times", "using", "order", "since", "interval")

    def __init__(self, n):
        self.n = n
        self.times = {n: [], 1: []}  # the last TRIES times (seconds) on each count
        self.using = n  # the count in use
        self.order = [n, 1] * TRIES  # the counts of a look still to run: both, in turns
        self.since = 0  # calls since the last look
        self.interval = 0  # calls from one look to the next (0: none yet)

    def pick(self):
        if self.order:
            return self.order[0]
        self.since += 1
        if self.since >= self.interval:  # a look: both counts timed afresh, in turns
            other = 1 if self.using == self.n else self.n
            self.times = {self.n: [], 1: []}
            self.order = [other, self.using] * TRIES
            return other
        return self.using

    def record(self, threads, seconds):
        t = self.times[threads]
        t.append(seconds)
        del t[:-TRIES]
        if self.order:
            if self.order[0] == threads:
                del self.order[0]
                if not self.order:  # a look is over
                    before, self.since = self.using, 0
                    self.using = self._faster()
                    self.interval = (FIRST_LOOK if self.using != before or not self.interval
                                     else min(2 * self.interval, LAST_LOOK))
            return
        other = 1 if threads == self.n else self.n
        if (threads == self.using and len(t) == TRIES and self.times[other]
                and _median(t) > SLOWER * _median(self.times[other])):
            self.since = self.interval  # much slower than the other was (load?): look now

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
