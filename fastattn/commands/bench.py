"""``fastattn bench``: run the benchmark suites and print a compact table of ratios.

Runs the pytest-benchmark suites in ``bench/`` (``bench_<suite>.py``) with timing on
(``--benchmark-only``), columns min and median, grouped so that each table compares the
backends on the same inputs, then prints one line per benchmark: min and median time, the
ratio to the fastest of its group, and GFLOP/s (with the share of the machine's sgemm peak,
or its dgemm peak for float64, when the run measured it) where the benchmark reports a rate.

Examples::

    fastattn bench                         # every suite, the default shapes
    fastattn bench attention --full        # also the large shapes (FASTATTN_BENCH_FULL=1)
    fastattn bench kernels --filter softmax --save before
    fastattn bench kernels --compare        # against the last saved run
    fastattn bench attention --apart 3     # each contender in processes of its own, 3 rounds
    fastattn bench attention --apart 3 --paired   # the same, shape by shape

``--apart N`` runs each contender (numba, vectorized, torch, ...: the last dash-separated part
of a benchmark's parameters) in a pytest process of its own, alternating them for N rounds,
and keeps each benchmark's best round. In one process, PyTorch's OpenMP threads keep spinning
after a call and take the cores from whatever runs next, and the order of the contenders can
move a ratio by up to 2x; in processes of their own they cannot disturb each other.
``--paired`` runs one benchmark per process instead, all rounds of one shape's contenders
alternating before the next shape: the two sides of a ratio then run seconds apart, not a
whole suite apart, which matters on a host whose speed drifts from minute to minute. A shape's
benchmarks are those whose node ids differ in the contender only (``shape_of``); a contender
that is a test function of its own joins the shape of its namesake when the two differ in a
last ``_torch`` or ``_fastattn`` only (``test_train_step_torch`` and
``test_train_step_fastattn[numba]``: PyTorch's rounds between numba's, not after them all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastattn.commands.info import TORCH_PART

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
    parser.add_argument("--apart", metavar="N", type=_rounds, default=None,
                        help="run each contender in a process of its own, alternating them "
                             "for N rounds; each benchmark keeps its best round")
    parser.add_argument("--paired", action="store_true",
                        help="with --apart: one benchmark per process, the contenders of one "
                             "shape alternating for N rounds before the next shape, so the "
                             "two sides of each ratio run seconds apart")


def _rounds(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 100:
        raise argparse.ArgumentTypeError(f"expected a number of rounds from 1 to 100, got {text!r}")
    return n


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


def contender(nodeid: str) -> str:
    """The contender of a benchmark's pytest node id: the last dash-separated part of its
    parameters (``test_x[B4-T16-numba]`` -> numba), or the test's name when it has none."""
    name = nodeid.rsplit("::", 1)[-1]
    if name.endswith("]") and "[" in name:
        return name[name.index("[") + 1:-1].rsplit("-", 1)[-1]
    return name


def shape_of(nodeid: str) -> str:
    """A node id without its contender (``f.py::test_x[B4-T16-numba]`` ->
    ``f.py::test_x[B4-T16]``): the benchmarks of one shape share it. A test function with no
    other parameters loses a last ``_torch`` or ``_fastattn`` (``f.py::test_x_torch`` and
    ``f.py::test_x_fastattn[numba]`` -> ``f.py::test_x``): one shape, two functions."""
    name = contender(nodeid)
    if nodeid.endswith(f"-{name}]"):
        return nodeid[:-len(name) - 2] + "]"
    shape = nodeid[:-len(name) - 2] if nodeid.endswith(f"[{name}]") else nodeid
    for tail in ("_torch", "_fastattn"):
        if shape.endswith(tail) and "[" not in shape:
            return shape[:-len(tail)]
    return shape


def merge(reports: list[dict]) -> dict:
    """One report from several runs of the same benchmarks: each benchmark's entry from the
    run with the smallest min time, with ``extra_info["round_mins"]``, its min in every run
    that timed it (in order); the other fields from the last report, except the machine's
    line, which is taken from a run that had PyTorch loaded when one did (that line also
    names PyTorch's code paths)."""
    best: dict[str, dict] = {}
    for report in reports:
        for bench in report.get("benchmarks", []):
            key = bench.get("fullname") or bench["name"]
            kept = best.get(key)
            mins = (kept["extra_info"]["round_mins"] if kept else []) + [bench["stats"]["min"]]
            if kept is None or bench["stats"]["min"] < kept["stats"]["min"]:
                kept = dict(bench, extra_info=dict(bench.get("extra_info") or {}))
            kept["extra_info"]["round_mins"] = mins
            best[key] = kept
    merged = dict(reports[-1]) if reports else {}
    merged["benchmarks"] = list(best.values())
    lines = [r.get("machine_info", {}).get("fastattn_machine") or "" for r in reports]
    with_torch = [line for line in lines if TORCH_PART in line]
    if with_torch:
        merged["machine_info"] = dict(merged.get("machine_info") or {},
                                      fastattn_machine=with_torch[-1])
    return merged


def _labels(rows: list[dict]) -> list[str]:
    """The rows' names in a group's table: each contender's (numba, torch, ...), or, where
    two rows share one (``quiet-auto`` and ``busy_core-auto``), their whole parameters."""
    names = [contender(b.get("name", "?")) for b in rows]
    if len(set(names)) == len(names):
        return names
    return [b.get("param") or b.get("name", "?") for b in rows]


_PEAKS = ("sgemm", "dgemm")  # the machine's product peaks: float32, float64


def _peak_of(group: str) -> str:
    """The product peak a group's rates compare with: dgemm for float64 groups, else sgemm."""
    return "dgemm" if "float64" in group else "sgemm"


def ratio_table(report: dict) -> str:
    """A compact text table of pytest-benchmark's JSON report: per group, each benchmark's
    min and median time, its ratio to the group's fastest (by min) and its rate (with its
    share of the run's sgemm peak, or dgemm peak for a float64 group, when measured)."""
    benches = report.get("benchmarks", [])
    peaks = {}
    for b in benches:
        for kind in _PEAKS:
            if (b.get("group") or "").startswith(f"machine: {kind} peak"):
                peaks[kind] = b.get("extra_info", {}).get("GFLOP/s")
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    lines = []
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b["stats"]["min"])
        fastest = rows[0]["stats"]["min"]
        kind = _peak_of(group)
        peak = None if group.startswith("machine:") else peaks.get(kind)
        lines.append(group)
        head = f"  {'':<28}{'min ms':>10}{'median ms':>11}{'x fastest':>11}{'GFLOP/s':>9}"
        lines.append(head + (f"  % {kind} peak" if peak else ""))
        for b, label in zip(rows, _labels(rows), strict=True):
            st, info = b["stats"], b.get("extra_info", {})
            rate = info.get("GFLOP/s")
            line = (f"  {label:<28}{st['min'] * 1e3:>10.3f}{st['median'] * 1e3:>11.3f}"
                    f"{st['min'] / fastest:>11.2f}"
                    f"{(f'{rate:.1f}' if rate is not None else '-'):>9}")
            if peak and rate is not None:
                line += f"  {100 * rate / peak:>12.0f}%"
            lines.append(line)
        lines.append("")
    for kind in _PEAKS:
        if peaks.get(kind):
            lines.append(f"{kind} peak of this machine in this run: {peaks[kind]:.1f} GFLOP/s")
    info = report.get("machine_info", {})  # written by bench/conftest.py
    if info.get("fastattn_machine"):  # CPU model, instruction set, BLAS kernel
        lines.append(f"measured on: {info['fastattn_machine']}")
    if info.get("fastattn_setting"):  # the fused kernels' tuning in force
        lines.append(f"fused kernels' setting: {info['fastattn_setting']}")
    if info.get("fastattn_threads"):  # how the fused kernels pick their thread count
        lines.append(f"fused kernels' threads: {info['fastattn_threads']}")
    if info.get("fastattn_host_load"):  # steal and other processes while the suite ran
        lines.append(f"host while measuring: {info['fastattn_host_load']}")
    if info.get("fastattn_apart"):  # how --apart ran the contenders
        lines.append(f"contenders: {info['fastattn_apart']}")
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
    if args.apart is not None and (args.save or args.compare is not None):
        print("fastattn bench: --apart makes one report from several runs; it does not "
              "take --save or --compare (keep it with --json)", file=sys.stderr)
        return 2
    if args.paired and args.apart is None:
        print("fastattn bench: --paired goes with --apart N", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(args.json) if args.json else Path(tmp) / "bench.json"
        if args.apart is not None:
            code, report = _run_apart(files, args, path.parent, env, Path(tmp))
            if report is None:
                return code or 1
            json_path.write_text(json.dumps(report, indent=1))
        else:
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


def _run_apart(files, args, cwd: Path, env: dict, tmp: Path) -> tuple[int, dict | None]:
    """--apart: collect the benchmarks, then run each contender's in a pytest process of its
    own, contenders alternating, for args.apart rounds; (exit code, merged report or None)."""
    from fastattn._hostload import Watch

    cmd = [sys.executable, "-m", "pytest", *map(str, files), "--collect-only", "-q",
           "-p", "no:cacheprovider"]
    if args.filter:
        cmd += ["-k", args.filter]
    listed = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    nodes = [line.strip() for line in listed.stdout.splitlines() if "::" in line]
    if not nodes:
        print(listed.stdout + listed.stderr, file=sys.stderr)
        return listed.returncode or 1, None
    names = list(dict.fromkeys(contender(node) for node in nodes))
    watch = Watch()
    reports, code = [], 0
    out = subprocess.DEVNULL if args.quiet else None
    for r, name, ids in _apart_order(nodes, args.apart, args.paired):
        what = ids[0] if args.paired else f"{len(ids)} benchmark{'s' if len(ids) > 1 else ''}"
        print(f"fastattn bench --apart: round {r + 1} of {args.apart}: {name} ({what}), a "
              f"process of its own", file=sys.stderr, flush=True)
        json_path = tmp / f"round{r}-{len(reports)}.json"
        run = subprocess.run(pytest_command(ids, args, json_path), cwd=cwd, env=env,
                             stdout=out)
        code = code or run.returncode
        if json_path.exists():
            reports.append(json.loads(json_path.read_text()))
    if not reports:
        return code or 1, None
    report = merge(reports)
    info = report.setdefault("machine_info", {})
    info["fastattn_host_load"] = watch.describe()
    rounds = f"{args.apart} round{'s' if args.apart > 1 else ''}"
    info["fastattn_apart"] = (f"each in a process of its own ({', '.join(names)}), "
                              f"alternating for {rounds}"
                              f"{' shape by shape' if args.paired else ''}; each benchmark's "
                              f"best round")
    return code, report


def _apart_order(nodes: list[str], rounds: int, paired: bool):
    """(round, contender, node ids) for each process of --apart, in the order they run: each
    round runs every contender's benchmarks, one process per contender; paired, one process
    per benchmark, and all rounds of one shape's contenders before the next shape."""
    groups: dict[str, list[str]] = {}
    for node in nodes:
        groups.setdefault(contender(node), []).append(node)
    if not paired:
        for r in range(rounds):
            for name, ids in groups.items():
                yield r, name, ids
        return
    shapes: dict[str, list[str]] = {}
    for node in nodes:
        shapes.setdefault(shape_of(node), []).append(node)
    for ids in shapes.values():
        for r in range(rounds):
            for node in ids:
                yield r, contender(node), [node]
