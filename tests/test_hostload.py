"""The host-load line of the benchmark tables (fastattn._hostload): steal and other
processes' share of the CPUs while a suite ran."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fastattn import _hostload

LINE = "cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0\n"


def _reading(**ticks):
    values = dict.fromkeys(_hostload.FIELDS, 0) | ticks
    return values


def test_shares_of_two_readings_worked_by_hand():
    before = _reading(user=100, system=50, idle=1000, steal=10)
    after = _reading(user=300, nice=20, system=100, idle=1660, iowait=10, irq=5, softirq=5,
                     steal=60)
    # in between: 1000 ticks of all CPUs (10 s at 100 ticks a second); busy = 200 user +
    # 20 nice + 50 system + 5 irq + 5 softirq = 280 ticks = 2.8 s, of which this process 1.3 s;
    # idle 660, iowait 10, steal 50 ticks
    s = _hostload.shares(before, after, own_seconds=1.3, seconds=5.0, hz=100)
    assert s.cpu_seconds == pytest.approx(10.0)
    assert s.steal == pytest.approx(0.05)
    assert s.others == pytest.approx(0.15)
    assert s.describe() == ("5.0% of the CPUs' time stolen by the hypervisor, 15.0% used by "
                            "other processes (over 5 s)")
    # this process alone (own time above the busy ticks, as ticks round): nobody else
    assert _hostload.shares(before, after, own_seconds=3.0, seconds=5.0, hz=100).others == 0
    # no time between the readings, or readings swapped: no answer
    assert _hostload.shares(before, before, 0.0, 1.0, 100) is None
    assert _hostload.shares(after, before, 0.0, 1.0, 100) is None
    # iowait, which Linux may count down, counts as 0 then: 990 ticks, 50 of them stolen
    fewer = _hostload.shares(before | {"iowait": 20}, after, own_seconds=1.3, seconds=5.0,
                             hz=100)
    assert fewer.cpu_seconds == pytest.approx(9.9)
    assert fewer.steal == pytest.approx(50 / 990)
    assert fewer.others == pytest.approx(1.5 / 9.9)


@pytest.mark.parametrize("text", [
    None,  # no file
    "",
    "intr 1 2 3 4 5 6 7 8 9\n",
    "cpu  1 2 3\n",
    "cpu  1 2 3 4 5 6 7\n",  # seven fields: Linux before 2.6.11 had no steal
    "cpu  1 2 3 x 5 6 7 8\n",
    "cpu  1 2 3 -4 5 6 7 8\n",
    "\xff\xfe binary\n",
])
def test_cpu_ticks_is_none_for_a_missing_or_malformed_file(tmp_path, text):
    path = tmp_path / "stat"
    if text is not None:
        path.write_bytes(text.encode("latin-1"))
    assert _hostload.cpu_ticks(str(path)) is None
    assert _hostload.Watch(str(path)).shares() is None
    assert _hostload.Watch(str(path)).describe() == f"not known (no readable {path})"


def test_cpu_ticks_reads_the_cpu_line(tmp_path):
    path = tmp_path / "stat"
    path.write_text(LINE.format(user=1, nice=2, system=3, idle=4, iowait=5, irq=6, softirq=7,
                                steal=8) + "cpu0 1 1 1 1 1 1 1 1 0 0\n")
    assert _hostload.cpu_ticks(str(path)) == dict(zip(_hostload.FIELDS, range(1, 9),
                                                      strict=True))


def _cpu_seconds_of(pid):
    """utime + stime of process pid, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(_hostload.cpu_ticks() is None, reason="no readable /proc/stat")
def test_a_watch_counts_the_time_another_process_used():
    """A spinning child that is not waited for while the watch runs is another process: the
    watch's 'others' time is at least what the child used in the window (its own count, from
    /proc/<pid>/stat), give or take clock ticks."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # started
        spent = _cpu_seconds_of(child.pid)
        watch = _hostload.Watch()
        time.sleep(0.8)
        s = watch.shares()
        spent = _cpu_seconds_of(child.pid) - spent
    finally:
        child.kill()
        child.wait()
    assert spent > 0.2, "the spinning child got no CPU time: nothing to check against"
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert s.others * s.cpu_seconds >= spent - 4 * tick
    assert 0 <= s.steal <= 1
    assert s.cpu_seconds >= 0.8 - 4 * tick


def test_own_cpu_seconds_count_the_children_waited_for():
    """A child that spins for 0.3 s of CPU and is waited for is this process's own time (the
    --apart runs' pytest processes are not 'other processes'), by the child's own count."""
    before = _hostload.own_cpu_seconds()
    child = subprocess.run(
        [sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass\n"
         "print(time.process_time())"], capture_output=True, text=True, check=True)
    spent = float(child.stdout)
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert _hostload.own_cpu_seconds() - before >= spent - 2 * tick
