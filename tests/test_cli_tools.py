"""``fastattn info`` and ``fastattn bench``: the facts they print and the ratio table."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import types
from importlib import metadata

import pytest
from helpers import load_repo_file

from fastattn import _hostload, cli
from fastattn.commands import bench, info


def test_info_prints_versions_threads_and_cache(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for name in ("numpy", "numba", "llvmlite"):
        assert f"{name}" in text and metadata.version(name) in text
    for key in ("backend:", "numba threads:", "threading layer:", "numba cache dir:", "blas"):
        assert key in text


def test_info_shows_numbas_thread_count_in_force_and_its_maximum(capsys, threads):
    """With Numba set to one thread of its maximum (at least two): "1 (max N)", and the
    JSON facts say the same."""
    import numba

    threads(1)
    top = numba.config.NUMBA_NUM_THREADS
    assert cli.main(["info"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("numba threads:")]
    assert len(rows) == 1 and rows[0].split(":", 1)[1].strip() == f"1 (max {top})", rows
    assert cli.main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["numba_threads"], facts["numba_max_threads"]) == (1, top)


def test_info_says_how_the_fused_kernels_pick_their_threads(capsys, monkeypatch, threads):
    from fastattn.kernels import _thread_choice

    def row():
        assert cli.main(["info"]) == 0
        rows = [line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
                if line.startswith("fused kernels' threads:")]
        assert len(rows) == 1, rows
        return rows[0]

    from fastattn.kernels import _blas_workers

    monkeypatch.setattr(_thread_choice, "ENABLED", True)
    threads(2)
    helpers = "; helpers: " + _blas_workers.describe()
    assert row() == "2 or 1, whichever has measured faster for each kind of call" + helpers
    monkeypatch.setattr(_thread_choice, "ENABLED", False)
    assert row() == "2 (FASTATTN_THREAD_CHOICE=off)" + helpers
    threads(1)
    assert row() == "1"
    if _blas_workers.threads() >= 2:  # the wheels' OpenBLAS: its workers help
        assert helpers.startswith("; helpers: NumPy's OpenBLAS workers (")
        with _blas_workers.off():
            threads(2)
            assert row().endswith("; helpers: a pool of their own (off in this thread)")


def test_info_json_names_a_threading_layer_and_the_backend(capsys, monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "vectorized")
    assert cli.main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["backend"] == "vectorized"
    assert facts["versions"]["numba"] == metadata.version("numba")
    assert facts["threading_layer"] in ("tbb", "omp", "workqueue")
    assert facts["numba_threads"] >= 1
    assert facts["numba_cache_dir"]


def _without_isa_limits(monkeypatch):
    for var in info.TORCH_ISA_VARS:
        monkeypatch.delenv(var, raising=False)


def test_the_machine_line_names_pytorchs_code_paths_only_when_pytorch_is_loaded(monkeypatch):
    """A benchmark table with PyTorch in it says which instruction sets PyTorch was held to:
    ATen's capability (asked of torch) and the limits on MKL and oneDNN, which
    ATEN_CPU_CAPABILITY does not set."""
    _without_isa_limits(monkeypatch)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    plain = info.machine()
    assert "PyTorch" not in plain
    fake = types.SimpleNamespace(backends=types.SimpleNamespace(
        cpu=types.SimpleNamespace(get_cpu_capability=lambda: "AVX2")))
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    line = info.machine()
    assert line.startswith(plain + "; PyTorch: ATen AVX2; ")
    assert "ATEN_CPU_CAPABILITY=avx2" in line and "MKL_ENABLE_INSTRUCTIONS" not in line
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    line = info.machine()
    assert "MKL_ENABLE_INSTRUCTIONS=AVX2" in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line


def test_the_machine_line_and_info_say_when_openblas_coretype_chose_the_blas_kernel(
        capsys, monkeypatch):
    """OPENBLAS_CORETYPE picks OpenBLAS's kernels instead of OpenBLAS (it can hold an
    AVX-512 CPU to the Haswell kernels): the machine line and `fastattn info`'s BLAS kernel
    row say so when it is set, and only then."""
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    assert "OPENBLAS_CORETYPE" not in info.machine()
    assert cli.main(["info"]) == 0
    assert "OPENBLAS_CORETYPE" not in capsys.readouterr().out
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert "kernels (OPENBLAS_CORETYPE=Haswell)" in info.machine()
    assert cli.main(["info"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("blas kernel:")]
    assert len(row) == 1 and row[0].endswith(" (OPENBLAS_CORETYPE=Haswell)"), row


def test_info_shows_pytorchs_limits_when_pytorch_is_installed(capsys, monkeypatch):
    _without_isa_limits(monkeypatch)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert cli.main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch_isa_limits"] == "MKL_ENABLE_INSTRUCTIONS=AVX2"
    text = info.format_facts(dict(facts, versions=dict(facts["versions"], torch="2.13.0")))
    assert "pytorch isa limits:" in text and "MKL_ENABLE_INSTRUCTIONS=AVX2" in text
    text = info.format_facts(dict(facts, versions=dict(facts["versions"], torch=None)))
    assert "pytorch isa limits:" not in text


def test_bench_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--full", "--filter", "--save", "--compare", "--json"):
        assert opt in text


def test_bench_rejects_an_unknown_suite(capsys):
    assert cli.main(["bench", "no_such_suite"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def _bench(group, param, minimum, median, rate=None):
    info_ = {} if rate is None else {"GFLOP/s": rate}
    return {"group": group, "name": f"test_x[{param}]", "param": param,
            "stats": {"min": minimum, "median": median}, "extra_info": info_}


def test_ratio_table_divides_by_the_fastest_of_each_group():
    g = "attention fwd+bwd (B=2)"
    report = {"benchmarks": [
        _bench(g, "B2-numba", 0.002, 0.0025, 50.0),
        _bench(g, "B2-torch", 0.004, 0.005, 25.0),
        _bench("machine: sgemm peak", "", 0.1, 0.1, 200.0),
    ]}
    lines = bench.ratio_table(report).splitlines()
    numba = next(line for line in lines if line.strip().startswith("numba"))
    torch = next(line for line in lines if line.strip().startswith("torch"))
    assert numba.split()[1:4] == ["2.000", "2.500", "1.00"]
    assert torch.split()[1:4] == ["4.000", "5.000", "2.00"]
    assert numba.split()[-1] == "25%" and torch.split()[-1] == "12%"
    assert "200.0 GFLOP/s" in lines[-1]
    report["machine_info"] = {"fastattn_machine": "some CPU", "fastattn_setting": "tuned (f)",
                              "fastattn_threads": "2 or 1 (t)",
                              "fastattn_host_load": "1.0% stolen"}
    assert bench.ratio_table(report).splitlines()[-4:] == [
        "measured on: some CPU", "fused kernels' setting: tuned (f)",
        "fused kernels' threads: 2 or 1 (t)", "host while measuring: 1.0% stolen"]


def test_ratio_table_orders_and_divides_by_the_min_time_not_the_median():
    """numba has the smaller min (1 ms) and the larger median (9 ms): it is the fastest of
    its group, listed first, and vectorized's ratio is its min over numba's, 2.00."""
    g = "attention fwd+bwd (B=2)"
    report = {"benchmarks": [_bench(g, "B2-vectorized", 0.002, 0.003),
                             _bench(g, "B2-numba", 0.001, 0.009)]}
    rows = [line.split() for line in bench.ratio_table(report).splitlines()
            if line.startswith("  ") and not line.strip().startswith("min")]
    assert [r[:4] for r in rows] == [["numba", "1.000", "9.000", "1.00"],
                                     ["vectorized", "2.000", "3.000", "2.00"]]


def test_ratio_table_names_rows_by_their_parameters_where_contenders_repeat():
    g = "fit next to a busy core"
    report = {"benchmarks": [_bench(g, "quiet-auto", 1.0, 1.0), _bench(g, "busy-auto", 2.0, 2.0),
                             _bench("other", "B2-numba", 1.0, 1.0)]}
    rows = [line.split()[0] for line in bench.ratio_table(report).splitlines()
            if line.startswith("  ") and not line.strip().startswith("min")]
    assert rows == ["quiet-auto", "busy-auto", "numba"]


def test_ratio_table_compares_float64_groups_with_the_dgemm_peak():
    f32, f64 = "attention fwd+bwd (B=2, float32)", "attention fwd+bwd (B=2, float64)"
    report = {"benchmarks": [
        _bench(f32, "B2-numba", 0.002, 0.002, 60.0),
        _bench(f64, "B2-float64-numba", 0.004, 0.004, 30.0),
        _bench("machine: sgemm peak (float32)", "", 0.1, 0.1, 200.0),
        _bench("machine: dgemm peak (float64)", "", 0.2, 0.2, 100.0),
    ]}
    lines = bench.ratio_table(report).splitlines()
    at = {line: i for i, line in enumerate(lines)}
    assert lines[at[f32] + 1].endswith("% sgemm peak") and lines[at[f32] + 2].endswith(" 30%")
    assert lines[at[f64] + 1].endswith("% dgemm peak") and lines[at[f64] + 2].endswith(" 30%")
    assert lines[-2:] == ["sgemm peak of this machine in this run: 200.0 GFLOP/s",
                          "dgemm peak of this machine in this run: 100.0 GFLOP/s"]
    # without a dgemm peak, a float64 group gets no share (never one of the sgemm peak)
    del report["benchmarks"][3]
    lines = bench.ratio_table(report).splitlines()
    assert "peak" not in lines[lines.index(f64) + 1] and lines[lines.index(f64) + 2].endswith(
        "30.0")
    assert "dgemm" not in lines[-1]


def test_bench_runs_a_suite_and_prints_ratios(capfd):
    """A real run, filtered to the tiny attention shape of two backends. Its output has
    pytest-benchmark's table, whose summary names the machine, the setting and the host's
    load (bench/conftest.py), then the ratio table, which names them again from the JSON."""
    code = cli.main(["bench", "attention", "--filter", "tiny-numba or tiny-vectorized"])
    out = capfd.readouterr().out
    assert code == 0
    assert "attention fwd+bwd (B=4, T=16, d=8, float32)" in out
    assert any(line.strip().startswith("numba") for line in out.splitlines())
    assert any(line.strip().startswith("vectorized") for line in out.splitlines())
    from fastattn.kernels import _tuning  # the child ran with this process's environment

    lines = out.splitlines()
    assert lines.count(f"fused kernels' setting: {_tuning.current()[1]}") == 2
    rule = [line for line in lines if line.startswith("fused kernels' threads: ")]
    assert len(rule) == 2 and rule[0] == rule[1], out
    host = [line for line in lines if line.startswith("host while measuring: ")]
    assert len(host) == 2, out
    for line in host:
        if _hostload.cpu_ticks() is not None:
            assert "% of the CPUs' time stolen by the hypervisor, " in line, line


@pytest.mark.parametrize("flags, passed, full", [
    (["--filter", "tiny-numba", "--save", "before", "--full"],
     [["-k", "tiny-numba"], ["--benchmark-save=before"]], True),
    (["--compare"], [["--benchmark-compare"]], False),
    (["--compare", "0001"], [["--benchmark-compare=0001"]], False),
])
def test_bench_hands_its_options_to_pytest_and_keeps_the_report(tmp_path, monkeypatch, capsys,
                                                                 flags, passed, full):
    """With pytest-benchmark's run replaced by a stand-in that writes a report: --filter,
    --save and --compare reach its command line, --full sets FASTATTN_BENCH_FULL=1 (only
    then), the suite asked for is the one run, --json keeps the report, and its ratio
    table is printed."""
    calls = []
    report = {"benchmarks": [_bench("g", "B2-numba", 0.001, 0.001),
                             _bench("g", "B2-torch", 0.003, 0.003)]}

    def fake_run(cmd, cwd=None, env=None, **kw):
        calls.append((cmd, env))
        out = next(a for a in cmd if a.startswith("--benchmark-json="))
        pathlib.Path(out.split("=", 1)[1]).write_text(json.dumps(report))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.delenv("FASTATTN_BENCH_FULL", raising=False)
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    kept = tmp_path / "kept.json"
    assert cli.main(["bench", "attention", *flags, "--json", str(kept)]) == 0
    (cmd, env), = calls
    for part in passed:
        i = cmd.index(part[0])
        assert cmd[i:i + len(part)] == part, cmd
    assert [a for a in cmd if a.endswith(".py")] == [str(bench.bench_dir() /
                                                         "bench_attention.py")]
    assert ("FASTATTN_BENCH_FULL" in env) == full and env.get("FASTATTN_BENCH_FULL",
                                                              "1") == "1"
    assert json.loads(kept.read_text()) == report
    lines = capsys.readouterr().out.splitlines()
    torch = next(line for line in lines if line.strip().startswith("torch"))
    assert torch.split()[3] == "3.00"


@pytest.mark.parametrize("nodeid, name", [
    ("bench/bench_attention.py::test_attention_fwd_bwd[B4-T16-d8-tiny-numba]", "numba"),
    ("bench/bench_train_step.py::test_train_step_fastattn[vectorized]", "vectorized"),
    ("bench/bench_train_step.py::test_train_step_torch", "test_train_step_torch"),
    ("bench/bench_x.py::TestA::test_y[torch]", "torch"),
])
def test_contender_of_a_node_id(nodeid, name):
    assert bench.contender(nodeid) == name


def test_merge_keeps_each_benchmarks_best_round():
    def run(tag, mins):
        return {"machine_info": {"tag": tag}, "benchmarks": [
            {"fullname": f"f::{k}", "name": k, "stats": {"min": m, "median": 2 * m},
             "extra_info": {"GFLOP/s": 1 / m}} for k, m in mins.items()]}

    first, second = run("first", {"a": 3.0, "b": 1.0}), run("second", {"a": 2.0, "b": 4.0})
    merged = bench.merge([first, second])
    by = {b["name"]: b for b in merged["benchmarks"]}
    assert by["a"]["stats"] == {"min": 2.0, "median": 4.0}  # from the second run, whole
    assert by["a"]["extra_info"] == {"GFLOP/s": 0.5, "round_mins": [3.0, 2.0]}
    assert by["b"]["stats"] == {"min": 1.0, "median": 2.0}  # from the first
    assert by["b"]["extra_info"] == {"GFLOP/s": 1.0, "round_mins": [1.0, 4.0]}
    assert merged["machine_info"] == {"tag": "second"}
    assert "round_mins" not in first["benchmarks"][0]["extra_info"]  # inputs left as they were
    # the machine's line: from a run with PyTorch loaded (it names PyTorch's paths), if any
    first["machine_info"]["fastattn_machine"] = "cpu X; PyTorch: avx2"
    second["machine_info"]["fastattn_machine"] = "cpu X"
    assert bench.merge([first, second])["machine_info"] == {
        "tag": "second", "fastattn_machine": "cpu X; PyTorch: avx2"}
    assert bench.merge([second])["machine_info"] == {"tag": "second",
                                                     "fastattn_machine": "cpu X"}


FAKE_SUITE = '''
import os

import pytest


@pytest.mark.parametrize("who", ["alpha", "beta"])
@pytest.mark.parametrize("size", [1, 2])
def test_fake(benchmark, who, size):
    with open(os.environ["FAKE_BENCH_LOG"], "a") as f:
        f.write(f"{who} {size} {os.getpid()}\\n")
    benchmark.group = f"fake {size}"
    benchmark(sum, range(size * 1000 if who == "alpha" else size * 3000))
'''


def _run_fake_suite(tmp_path, monkeypatch, *extra):
    """``fastattn bench fake --apart 2 *extra`` on FAKE_SUITE in tmp_path: (exit code, the
    suite's log of who ran where, the merged report's path)."""
    suite = tmp_path / "bench"
    suite.mkdir()
    (suite / "bench_fake.py").write_text(FAKE_SUITE)
    log = tmp_path / "log"
    monkeypatch.setenv("FAKE_BENCH_LOG", str(log))
    # quick child processes: no plugin but pytest-benchmark, short timings
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p pytest_benchmark.plugin --benchmark-max-time=0.01 "
                       "--benchmark-min-rounds=2")
    report = tmp_path / "report.json"
    code = cli.main(["bench", "fake", "--dir", str(suite), "--apart", "2", *extra, "-q",
                     "--json", str(report)])
    return code, log, report


def test_bench_apart_runs_each_contender_in_processes_of_its_own(tmp_path, monkeypatch,
                                                                 capfd):
    """--apart 2 on a suite of two contenders (alpha, beta), two shapes each: four pytest
    processes, alpha's and beta's alternating, each running all of one contender's
    benchmarks; the table is made from the merged report and says how it was run."""
    code, log, report = _run_fake_suite(tmp_path, monkeypatch)
    out, err = capfd.readouterr()
    assert code == 0, out + err
    runs = [line.split() for line in log.read_text().splitlines()]
    pids = [pid for _, _, pid in runs]
    processes = list(dict.fromkeys(pids))  # in order of first use
    assert len(processes) == 4
    who_of = {pid: {who for who, _, p in runs if p == pid} for pid in processes}
    assert [who_of[p] for p in processes] == [{"alpha"}, {"beta"}, {"alpha"}, {"beta"}]
    assert all({s for _, s, p in runs if p == pid} == {"1", "2"} for pid in processes)
    merged = json.loads(report.read_text())
    assert sorted(b["name"] for b in merged["benchmarks"]) == [
        "test_fake[1-alpha]", "test_fake[1-beta]", "test_fake[2-alpha]", "test_fake[2-beta]"]
    for b in merged["benchmarks"]:
        assert len(b["extra_info"]["round_mins"]) == 2
        assert b["stats"]["min"] == min(b["extra_info"]["round_mins"])
    assert ("contenders: each in a process of its own (alpha, beta), alternating for 2 rounds; "
            "each benchmark's best round") in out.splitlines()
    assert "round 2 of 2: beta (2 benchmarks), a process of its own" in err


def test_bench_apart_paired_alternates_the_contenders_shape_by_shape(tmp_path, monkeypatch,
                                                                    capfd):
    """--apart 2 --paired on the same suite: one benchmark per process, both rounds of shape
    1's alpha and beta, alternating, before shape 2's."""
    code, log, report = _run_fake_suite(tmp_path, monkeypatch, "--paired")
    out, err = capfd.readouterr()
    assert code == 0, out + err
    runs = [tuple(line.split()) for line in log.read_text().splitlines()]
    processes = list(dict.fromkeys(pid for _, _, pid in runs))
    assert len(processes) == 8
    ran = [sorted({(who, size) for who, size, p in runs if p == pid}) for pid in processes]
    assert ran == [[("alpha", "1")], [("beta", "1")]] * 2 + [[("alpha", "2")], [("beta", "2")]] * 2
    merged = json.loads(report.read_text())
    assert len(merged["benchmarks"]) == 4
    assert all(len(b["extra_info"]["round_mins"]) == 2 for b in merged["benchmarks"])
    assert ("contenders: each in a process of its own (alpha, beta), alternating for 2 rounds "
            "shape by shape; each benchmark's best round") in out.splitlines()
    assert ("round 2 of 2: beta (bench/bench_fake.py::test_fake[2-beta]), a process of its own"
            in err)


@pytest.mark.parametrize(("nodeid", "shape"), [
    ("bench/b.py::test_a[B4-T16-numba]", "bench/b.py::test_a[B4-T16]"),
    ("bench/b.py::test_a[tiny-torch]", "bench/b.py::test_a[tiny]"),
    ("bench/b.py::test_a[numba]", "bench/b.py::test_a"),
    ("bench/b.py::test_sgemm_peak", "bench/b.py::test_sgemm_peak"),
    # PyTorch's function joins its namesake's shape: its rounds between fastattn's
    ("bench/b.py::test_step_torch", "bench/b.py::test_step"),
    ("bench/b.py::test_step_fastattn[numba_library_threads]", "bench/b.py::test_step"),
    ("bench/b.py::test_step_fastattn", "bench/b.py::test_step"),
    ("bench/b.py::test_gen_fastattn[batch-numba]", "bench/b.py::test_gen_fastattn[batch]"),
    ("bench/b.py::test_torch_like_name[x]", "bench/b.py::test_torch_like_name"),
])
def test_shape_of_a_node_id(nodeid, shape):
    assert bench.shape_of(nodeid) == shape


def test_paired_rounds_put_pytorchs_function_between_its_namesakes_rounds():
    """--paired's order for bench_train_step's contenders: every round runs numba, vectorized
    and PyTorch (a function of its own) before the next round, not PyTorch's rounds after all
    of fastattn's."""
    nodes = ["bench/t.py::test_step_fastattn[numba]", "bench/t.py::test_step_fastattn[vectorized]",
             "bench/t.py::test_step_torch", "bench/t.py::test_other[x-numba]"]
    order = [(r, name) for r, name, _ in bench._apart_order(nodes, 2, True)]
    assert order == [(0, "numba"), (0, "vectorized"), (0, "test_step_torch"),
                     (1, "numba"), (1, "vectorized"), (1, "test_step_torch"),
                     (0, "numba"), (1, "numba")]


def test_bench_paired_needs_apart(capsys):
    assert cli.main(["bench", "--paired"]) == 2
    assert "--paired goes with --apart N" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--save", "x"], ["--compare"]])
def test_bench_apart_refuses_save_and_compare(tmp_path, capsys, extra):
    assert cli.main(["bench", "--apart", "2", *extra]) == 2
    assert "--apart makes one report from several runs" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-1", "x", "101"])
def test_bench_apart_takes_a_number_of_rounds(bad):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--apart", bad])


def _bench_conftest():
    """bench/conftest.py as a module of its own (its check_then_time is a plain function)."""
    return load_repo_file("bench/conftest.py", "_bench_conftest_under_test")


class _FakeBenchmark:
    """pytest-benchmark's fixture as check_then_time uses it; records what it timed and
    reports the given min and median."""

    def __init__(self, enabled, minimum=None, median=None):
        self.enabled, self.extra_info, self.timed = enabled, {}, []
        self.stats = (types.SimpleNamespace(stats=types.SimpleNamespace(min=minimum,
                                                                        median=median))
                      if enabled else None)

    def __call__(self, fn, *args):
        self.timed.append((fn, args))
        return fn(*args)

    def pedantic(self, fn, args, rounds, iterations):
        self.timed.append((fn, tuple(args)))
        return fn(*args)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("rounds", [None, 2])
def test_check_then_time_checks_before_it_times_whether_timing_or_not(enabled, rounds):
    run = _bench_conftest().run_checked_then_timed
    bm = _FakeBenchmark(enabled, 1.0, 1.0)

    def wrong(got):
        raise AssertionError(f"wrong result {got}")

    with pytest.raises(AssertionError, match="wrong result 5"):
        run(bm, max, (2, 5), check=wrong, rounds=rounds, warmup=0.0)
    assert bm.timed == []  # a wrong result is never timed
    checked = []
    assert run(bm, max, (2, 5), check=checked.append, rounds=rounds, warmup=0.0) == 5
    assert checked == [5] and bm.timed == [(max, (2, 5))]  # the call checked is the one timed


def test_check_then_time_rates_the_work_by_the_fastest_round():
    """8e6 floating-point operations whose fastest round took 2 ms (median 4 ms): 4 GFLOP/s.
    A plain run (timing off) keeps the work but claims no rate."""
    run = _bench_conftest().run_checked_then_timed
    bm = _FakeBenchmark(True, minimum=0.002, median=0.004)
    run(bm, sum, ([1, 2],), check=lambda got: None, warmup=0.0, work={"GFLOP/s": 8e6})
    assert bm.extra_info == {"work": 8e6, "GFLOP/s": 4.0}
    plain = _FakeBenchmark(False)
    run(plain, sum, ([1, 2],), check=lambda got: None, warmup=0.0, work={"GFLOP/s": 8e6})
    assert plain.extra_info == {"work": 8e6}
