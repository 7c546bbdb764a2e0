"""``fastattn info`` and ``fastattn bench``: the facts they print and the ratio table."""

from __future__ import annotations

import json
import sys
import types
from importlib import metadata

import pytest

from fastattn import _hostload, cli
from fastattn.commands import bench, info


def test_info_prints_versions_threads_and_cache(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for name in ("numpy", "numba", "llvmlite"):
        assert f"{name}" in text and metadata.version(name) in text
    for key in ("backend:", "numba threads:", "threading layer:", "numba cache dir:", "blas"):
        assert key in text


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
                              "fastattn_host_load": "1.0% stolen"}
    assert bench.ratio_table(report).splitlines()[-3:] == [
        "measured on: some CPU", "fused kernels' setting: tuned (f)",
        "host while measuring: 1.0% stolen"]


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
    host = [line for line in lines if line.startswith("host while measuring: ")]
    assert len(host) == 2, out
    for line in host:
        if _hostload.cpu_ticks() is not None:
            assert "% of the CPUs' time stolen by the hypervisor, " in line, line
