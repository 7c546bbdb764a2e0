"""How quiet the machine was while something was measured: the share of the CPUs' time that
the hypervisor gave to other guests (steal) and the share that other processes used.

A ratio measured side by side means little when the host took a core away for part of the
run, and a virtual machine's speed can move by half within minutes. The benchmark suites
print this next to every table (``bench/conftest.py``) and store it in their JSON report, so
that ``fastattn bench``'s table says it too.

Linux only: it reads the ``cpu`` line of ``/proc/stat`` (clock ticks summed over all CPUs);
elsewhere, or when that file cannot be read or parsed, it reports that the load is not known.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

PROC_STAT = "/proc/stat"
#: the fields of /proc/stat's cpu line, in order (guest time is counted in user already)
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_BUSY = ("user", "nice", "system", "irq", "softirq")


def cpu_ticks(path: str = PROC_STAT) -> dict | None:
    """The first eight fields of the ``cpu`` line of ``path`` as {name: ticks}, or None when
    the file is missing, unreadable or not in that form."""
    try:
        with open(path, encoding="ascii") as f:
            first = f.readline().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(first) < 1 + len(FIELDS) or first[0] != "cpu":
        return None
    try:
        values = [int(v) for v in first[1:1 + len(FIELDS)]]
    except ValueError:
        return None
    if min(values) < 0:
        return None
    return dict(zip(FIELDS, values, strict=True))


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class Shares:
    """Over a window of ``seconds`` (wall time), in which all CPUs together had
    ``cpu_seconds``: ``steal``, the share of that time taken by the hypervisor; ``others``,
    the share used by processes other than this one and its waited-for children (0 when this
    process's own count exceeds the machine's, as clock ticks round)."""

    seconds: float
    cpu_seconds: float
    steal: float
    others: float

    def describe(self) -> str:
        return (f"{100 * self.steal:.1f}% of the CPUs' time stolen by the hypervisor, "
                f"{100 * self.others:.1f}% used by other processes (over {self.seconds:.0f} s)")


def shares(before: dict, after: dict, own_seconds: float, seconds: float,
           hz: int) -> Shares | None:
    """The Shares between two ``cpu_ticks`` readings, given this process's CPU seconds in
    between (``own_seconds``), the wall time between them and the clock ticks per second;
    None when the readings give no time. A count that went down counts as 0: Linux's iowait
    can (its proc(5) calls it unreliable)."""
    delta = {k: max(0, after[k] - before[k]) for k in FIELDS}
    total = sum(delta.values())
    if total <= 0:
        return None
    busy = sum(delta[k] for k in _BUSY) / hz
    others = max(0.0, busy - own_seconds) / (total / hz)
    return Shares(seconds=seconds, cpu_seconds=total / hz, steal=delta["steal"] / total,
                  others=min(1.0, others))


class Watch:
    """Started when made; ``shares()`` gives the Shares since then (None where /proc/stat is
    not there to read)."""

    def __init__(self, path: str = PROC_STAT):
        self._path = path
        self._ticks = cpu_ticks(path)
        self._own = own_cpu_seconds()
        self._start = time.monotonic()

    def shares(self) -> Shares | None:
        now = cpu_ticks(self._path)
        if self._ticks is None or now is None:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        return shares(self._ticks, now, own_cpu_seconds() - self._own,
                      time.monotonic() - self._start, hz)

    def describe(self) -> str:
        s = self.shares()
        return s.describe() if s is not None else f"not known (no readable {self._path})"
