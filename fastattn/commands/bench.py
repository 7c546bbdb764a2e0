"""``fastattn bench``: run the benchmark suites and print a compact table of ratios.

Runs the pytest-benchmark suites in ``bench/`` (``bench_<suite>.py``) with timing on
(``--benchmark-only``), columns min and median, grouped so that each table compares the
backends on the same inputs, then prints one line per benchmark: min and median time, the
ratio to the fastest of its group, and GFLOP/s (with the share of the machine's sgemm peak,
when the run measured it) where the benchmark reports a rate.

Examples::

    fastattn bench                         # every suite, the default shapes
    fastattn bench attention --full        # also the large shapes (FASTATTN_BENCH_FULL=1)
    fastattn bench kernels --filter softmax --save before
    fastattn bench kernels --compare        # against the last saved run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HELP = "run the benchmark suites (pytest-benchmark) and print a table of ratios"


def bench_dir() -> Path | None:
    """The source checkout's ``bench/`` folder, or None (an install without the sources)."""
    root = Path(__file__).resolve().parents[2]
    path = root / "bench"
    return path if path.is_dir() else None


def suites(path: Path) -> list[str]:
    """Suite names: ``bench_<name>.py`` files in ``path``."""
    return sorted(p.stem[len("bench_"):] for p in path.glob("bench_*.py"))


def configure(parser):
    parser.add_argument("suite", nargs="*",
                        help="suites to run, e.g. attention kernels (default: all of bench/)")
    parser.add_argument("--full", action="store_true",
                        help="also the large shapes (sets FASTATTN_BENCH_FULL=1; minutes)")
    parser.add_argument("--filter", "-k", metavar="EXPR", default=None,
                        help="only benchmarks whose name matches this pytest -k expression")
    parser.add_argument("--save", metavar="NAME", default=None,
                        help="save the run under .benchmarks/ as NAME (--benchmark-save)")
    parser.add_argument("--compare", metavar="RUN", nargs="?", const="", default=None,
                        help="compare with a saved run (default: the latest) "
                             "(--benchmark-compare)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also keep pytest-benchmark's JSON output in FILE")
    parser.add_argument("--dir", metavar="DIR", default=None,
                        help="folder of the bench_*.py suites (default: the checkout's bench/)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print only the ratio table, not pytest's own tables")


def pytest_command(files, args, json_path) -> list[str]:
    """The pytest command line for ``files`` and the parsed arguments."""
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "--benchmark-only",
           "--benchmark-columns=min,median", "--benchmark-sort=name",
           "--benchmark-group-by=group", f"--benchmark-json={json_path}", "-q",
           "-p", "no:cacheprovider"]
    if args.filter:
        cmd += ["-k", args.filter]
    if args.save:
        cmd.append(f"--benchmark-save={args.save}")
    if args.compare is not None:
        cmd.append("--benchmark-compare" + (f"={args.compare}" if args.compare else ""))
    return cmd


def _label(bench: dict) -> str:
    """The contender's name: the last dash-separated part of the test id (numba, torch...)."""
    param = bench.get("param") or bench.get("name", "?")
    return param.rsplit("-", 1)[-1] if "-" in param else param


def ratio_table(report: dict) -> str:
    """A compact text table of pytest-benchmark's JSON report: per group, each benchmark's
    min and median time, its ratio to the group's fastest (by min) and its rate."""
    benches = report.get("benchmarks", [])
    peak = None
    for b in benches:
        if (b.get("group") or "").startswith("machine: sgemm peak"):
            peak = b.get("extra_info", {}).get("GFLOP/s")
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    lines = []
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b["stats"]["min"])
        fastest = rows[0]["stats"]["min"]
        lines.append(group)
        head = f"  {'':<28}{'min ms':>10}{'median ms':>11}{'x fastest':>11}{'GFLOP/s':>9}"
        lines.append(head + ("  % sgemm peak" if peak else ""))
        for b in rows:
            st, info = b["stats"], b.get("extra_info", {})
            rate = info.get("GFLOP/s")
            line = (f"  {_label(b):<28}{st['min'] * 1e3:>10.3f}{st['median'] * 1e3:>11.3f}"
                    f"{st['min'] / fastest:>11.2f}"
                    f"{(f'{rate:.1f}' if rate is not None else '-'):>9}")
            if peak and rate is not None and not group.startswith("machine:"):
                line += f"  {100 * rate / peak:>12.0f}%"
            lines.append(line)
        lines.append("")
    if peak:
        lines.append(f"sgemm peak of this machine in this run: {peak:.1f} GFLOP/s")
    info = report.get("machine_info", {})  # written by bench/conftest.py
    if info.get("fastattn_machine"):  # CPU model, instruction set, BLAS kernel
        lines.append(f"measured on: {info['fastattn_machine']}")
    if info.get("fastattn_setting"):  # the fused kernels' tuning in force
        lines.append(f"fused kernels' setting: {info['fastattn_setting']}")
    if info.get("fastattn_host_load"):  # steal and other processes while the suite ran
        lines.append(f"host while measuring: {info['fastattn_host_load']}")
    return "\n".join(lines).rstrip() + "\n"


def run(args) -> int:
    path = Path(args.dir) if args.dir else bench_dir()
    if path is None or not path.is_dir():
        print("fastattn bench: no bench/ folder found; run it from a source checkout of "
              "fastattn or pass --dir", file=sys.stderr)
        return 2
    available = suites(path)
    wanted = args.suite or available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        print(f"fastattn bench: unknown suite(s) {', '.join(unknown)}; available: "
              f"{', '.join(available)}", file=sys.stderr)
        return 2
    files = [path / f"bench_{s}.py" for s in wanted]
    env = dict(os.environ)
    if args.full:
        env["FASTATTN_BENCH_FULL"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(args.json) if args.json else Path(tmp) / "bench.json"
        cmd = pytest_command(files, args, json_path)
        out = subprocess.DEVNULL if args.quiet else None
        code = subprocess.run(cmd, cwd=path.parent, env=env, stdout=out).returncode
        if not json_path.exists():
            return code or 1
        report = json.loads(json_path.read_text())
    if report.get("benchmarks"):
        print("\nRatios (x fastest: min time over the fastest min of the group)\n")
        print(ratio_table(report), end="")
    else:
        print("fastattn bench: no benchmark ran (check --filter)", file=sys.stderr)
    return code
