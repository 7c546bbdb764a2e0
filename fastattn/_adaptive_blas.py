"""BLAS's thread count for a loop of like steps (training steps), chosen from their times.

On a quiet 2-core machine the training step is fastest with BLAS on both cores. When another
process keeps one core busy, half of every product waits for that core, and one BLAS thread
is faster: the date model's step (the Intel Xeon of the README) took a median of 72-86 ms on
2 BLAS threads next to a spinning process, 36-51 ms on one, and 39-43 and 50-51 ms on a
quiet machine. Which is faster changes while a job runs, so :class:`AdaptiveBlas` measures:

* it starts with BLAS on its thread count when entered (``most``, all cores by default);
* ``probe`` steps after that, then ``every`` steps after each choice, and sooner when the
  median of the last ``probe`` steps has grown ``jump`` times over its value at the last
  choice (another process took a core), it runs ``probe`` steps on the other count
  (``most`` or 1) and keeps that count when their median beats the median of the ``probe``
  steps just before by ``margin``;
* each probe that loses doubles the steps to the next one, up to 8 ``every``: on a machine
  with many cores one thread is several times slower, and probing it often would cost more
  than it can find.

Only the thread count changes. With OpenBLAS's products the results are the same bits on one
thread or more (it does not split the sum of a product between threads; a test checks a
training run's bits), so the choice changes the speed alone. Another BLAS (MKL, BLIS) may
split the sums, and then the bits would depend on the steps' times: with one loaded, the
count stays BLAS's own.
"""

from __future__ import annotations

import statistics
from collections import deque


class AdaptiveBlas:
    """Context manager around runs of steps; call :meth:`step` after each step with its
    seconds (see the module docstring). The choice carries over from one ``with`` block to
    the next (an epoch to the next, with evaluations between them on BLAS's own count).
    ``running`` is the count the next step runs with; ``counts`` lists the count each step
    ran with.

    ``limits``: a function of one int that sets the thread count (default: every BLAS that
    threadpoolctl finds, ``kernels._blas.every_blas``, given back on exit); ``most``: the
    larger count (default: BLAS's thread count on entry, 1 with ``limits``).
    """

    def __init__(self, *, probe: int = 3, every: int = 64, jump: float = 1.5,
                 margin: float = 0.05, most: int | None = None, limits=None):
        if probe < 1 or every < 1 or jump <= 1 or not 0 <= margin < 1:
            raise ValueError(f"need probe >= 1, every >= 1, jump > 1, 0 <= margin < 1; got "
                             f"{probe}, {every}, {jump}, {margin}")
        self.probe, self.every, self.jump, self.margin = probe, every, jump, margin
        self._most, self._limits = most, limits
        self.counts: list[int] = []

    def __enter__(self):
        """Set BLAS to the count chosen so far (first: its own count, ``most``)."""
        self._restore = None
        limits, most, fixed = self._limits, 1, False
        if limits is None:
            from fastattn.kernels import _blas

            libs = _blas.every_blas().lib_controllers
            saved = [(lib, lib.num_threads) for lib in libs]

            def set_counts(pairs):
                with _blas.Control():
                    for lib, n in pairs:
                        lib.set_num_threads(n)

            def limits(n):
                set_counts((lib, n) for lib in libs)

            self._restore = lambda: set_counts(saved)
            most = max((n for _, n in saved), default=1)
            # no choice with a BLAS that may split sums: the bits could depend on the count
            fixed = any(lib.internal_api != "openblas" for lib in libs)
        self._set = limits
        if not hasattr(self, "choices"):  # the first entry: the choice starts
            most = self._most or most
            self.choices = (most, 1) if most > 1 and not fixed else (most,)
            self.current = self.running = most  # BLAS runs with this already
            self._recent: deque = deque(maxlen=self.probe)  # times on the current count
            self._before: list = []  # its last times when a probe began
            self._probing: list | None = None  # times of the probe under way
            self._every = self.every  # steps from a choice to the next probe
            self._since = self.every  # steps since the last choice: probe once recent is full
            self._reference = None  # median on the current count at the last choice
        elif self.running != self.choices[0]:  # exit gave BLAS its count back
            limits(self.running)
        return self

    def __exit__(self, *exc):
        """Give BLAS its thread count back (the choice is kept for the next entry)."""
        if self._restore is not None:
            self._restore()
        return False

    def _run(self, n):
        if n != self.running:
            self._set(n)
            self.running = n

    def step(self, seconds: float) -> None:
        """The step just run took ``seconds``; sets the count of the next one."""
        self.counts.append(self.running)
        if len(self.choices) == 1:
            return
        if self._probing is not None:
            self._probing.append(seconds)
            if len(self._probing) < self.probe:
                return
            probed, before = statistics.median(self._probing), statistics.median(self._before)
            if probed < (1 - self.margin) * before:
                self.current, self._reference = self.running, probed
                self._every = self.every
            else:
                self._reference = before
                self._every = min(2 * self._every, 8 * self.every)
            self._probing, self._since = None, 0
            self._recent.clear()
            self._run(self.current)
            return
        self._recent.append(seconds)
        self._since += 1
        if len(self._recent) < self.probe:
            return
        now = statistics.median(self._recent)
        if self._since >= self._every or (self._reference is not None
                                         and now > self.jump * self._reference):
            self._before, self._probing = list(self._recent), []
            self._run(next(c for c in self.choices if c != self.current))
