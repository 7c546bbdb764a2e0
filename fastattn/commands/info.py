"""``fastattn info``: what fastattn runs on.

Versions (fastattn, NumPy, Numba, llvmlite, SciPy, threadpoolctl, PyTorch when installed;
read from the package metadata, so nothing slow is imported), the current backend, the CPU as
LLVM sees it, Numba's thread count and threading layer (after a tiny parallel kernel, since
Numba picks its layer on first use), where Numba caches the compiled kernels, and the BLAS
libraries loaded with their thread counts (through threadpoolctl).
"""

from __future__ import annotations

import json
import os
import sys

HELP = ("versions, backend, CPU and instruction set, Numba threads and threading layer, "
        "cache directory, BLAS, the fused kernels' tuning")

PACKAGES = ("fastattn", "numpy", "numba", "llvmlite", "scipy", "threadpoolctl", "torch")


def configure(parser):
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def _version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _numba_facts():
    import numba
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True)
    def _touch(x):  # a tiny parallel kernel: Numba chooses its threading layer on first use
        for i in prange(x.shape[0]):
            x[i] += 1.0

    facts = {"numba_threads": numba.get_num_threads(),
             "numba_max_threads": numba.config.NUMBA_NUM_THREADS}
    try:
        _touch(np.zeros(4))
        facts["threading_layer"] = numba.threading_layer()
    except Exception as exc:  # no usable threading layer
        facts["threading_layer"] = f"unavailable ({type(exc).__name__}: {exc})"
    facts["numba_cache_dir"] = _cache_dir()
    facts["fused_kernel_threads"] = _thread_choice_fact()
    facts["fused_kernel_helpers"] = _helpers_fact()
    return facts


def _helpers_fact():
    from fastattn.kernels import _blas_workers

    return _blas_workers.describe()


def _thread_choice_fact():
    from fastattn.kernels import _thread_choice

    return "by time" if _thread_choice.ENABLED else "fixed"


def _cache_dir():
    """Where the kernels' compiled code is cached (NUMBA_CACHE_DIR, next to the sources, or a
    user-wide folder when the sources' folder is not writable)."""
    try:
        from fastattn.kernels import _flash

        path = _flash._forward_units._cache.cache_path
        return path or "none: no writable cache location, kernels compile in every process"
    except Exception:  # a Numba without this internal: say what the configuration says
        import numba

        return numba.config.CACHE_DIR or "__pycache__ next to each kernel module"


def _cpu():
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name()
    except Exception:
        return "unknown"


def _cpu_model():
    """The CPU's marketing name, as the operating system reports it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: what joins PyTorch's code paths to the machine's line, when PyTorch is loaded
TORCH_PART = "; PyTorch: "


def machine() -> str:
    """One line naming what a measured figure depends on: CPU model, instruction set, BLAS
    kernel (the benchmarks print it with every table)."""
    from fastattn.kernels import _tuning

    t = _tuning.target()
    isa = {"avx512": "AVX-512", "avx2": "AVX2"}.get(t["isa"], "no AVX2")
    blas = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(t["blas"], t["blas"])
    cpu = t["host_cpu"] + ("" if t["cpu"] == t["host_cpu"] else f"; Numba code for {t['cpu']}")
    line = f"{_cpu_model()} ({cpu}), {isa}, {blas} {t['blas_kernel']} kernels{_coretype()}"
    if "torch" in sys.modules:  # a table with PyTorch in it: its code paths too
        line += f"{TORCH_PART}{torch_paths(sys.modules['torch'])}"
    return line


#: PyTorch's own limits on the instruction sets it uses (on a CPU with AVX-512): ATen's
#: vectorised operators follow the first; its float32 matrix products go to MKL, which only
#: the second governs; some operators go to oneDNN, which only the third governs.
TORCH_ISA_VARS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _torch_limits():
    """The settings of TORCH_ISA_VARS, as 'NAME=value, ...' (unset ones left out), or 'none
    (...)' when none is set."""
    set_ = [f"{v}={os.environ[v]}" for v in TORCH_ISA_VARS if os.environ.get(v)]
    return ", ".join(set_) or "none (each library picks the CPU's best)"


def torch_paths(torch) -> str:
    """PyTorch's code paths: ATen's instruction set (asked of an imported ``torch``) and the
    limits set on MKL and oneDNN. ``ATEN_CPU_CAPABILITY=avx2`` alone leaves MKL's products on
    AVX-512: on a 2-core Intel Xeon (Emerald Rapids) a 2048^3 float32 product ran at 236
    GFLOP/s with it and 137 with ``MKL_ENABLE_INSTRUCTIONS=AVX2`` as well."""
    try:
        aten = f"ATen {torch.backends.cpu.get_cpu_capability()}; "
    except Exception:  # an older PyTorch without the query: the limits alone
        aten = ""
    return f"{aten}limits: {_torch_limits()}"


def _tuning_facts():
    """The fused kernels' setting in force, and the CPU and BLAS kernel it is chosen for."""
    try:
        from fastattn import tuning

        return tuning.describe()
    except Exception as exc:  # no usable Numba or BLAS: say so, do not fail
        return {"source": f"unavailable ({type(exc).__name__}: {exc})"}


def _blas_facts():
    """BLAS libraries loaded in this process, including the one Numba's kernels call."""
    try:
        from fastattn.kernels import _blas

        numba_blas = _blas.available()  # loads SciPy's BLAS, the one Numba calls
    except Exception:
        numba_blas = False
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return numba_blas, None
    libs = [{"library": i.get("internal_api"), "version": i.get("version"),
             "threads": i.get("num_threads"), "architecture": i.get("architecture"),
             "file": os.path.basename(i.get("filepath") or "")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return numba_blas, libs


def collect() -> dict:
    """All facts as a dict (what ``fastattn info --json`` prints)."""
    from fastattn import _backend

    facts = {"versions": {p: _version(p) for p in PACKAGES},
             "python": sys.version.split()[0]}
    try:
        facts["backend"] = _backend.get_backend()
    except ValueError as exc:  # a bad FASTATTN_BACKEND
        facts["backend"] = f"invalid ({exc})"
    facts["cpu"] = _cpu()
    facts["cpu_model"] = _cpu_model()
    facts["cpu_count"] = os.cpu_count()
    facts["tuning"] = _tuning_facts()
    facts.update(_numba_facts())
    numba_blas, libs = _blas_facts()
    facts["numba_blas_tile_products"] = numba_blas
    facts["blas"] = libs
    facts["torch_isa_limits"] = _torch_limits()  # without importing PyTorch (slow)
    return facts


def thread_rule(facts=None):
    """How the fused kernels pick their thread count, as the ``fused kernels' threads`` row
    says it: from ``facts`` (:func:`collect`'s), or from this process as it is now."""
    if facts is None:
        import numba

        facts = {"numba_threads": numba.get_num_threads(),
                 "fused_kernel_threads": _thread_choice_fact(),
                 "fused_kernel_helpers": _helpers_fact()}
    n = facts["numba_threads"]
    if n < 2:
        return "1"
    helpers = f"; helpers: {facts['fused_kernel_helpers']}"
    if facts["fused_kernel_threads"] == "fixed":
        return f"{n} (FASTATTN_THREAD_CHOICE=off){helpers}"
    return f"{n} or 1, whichever has measured faster for each kind of call{helpers}"


def format_facts(facts: dict) -> str:
    lines = ["versions:"]
    for name, ver in facts["versions"].items():
        lines.append(f"  {name:<14}{ver or 'not installed'}")
    lines.append(f"  {'python':<14}{facts['python']}")
    rows = [
        ("backend", facts["backend"]),
        ("cpu", f"{facts['cpu_model']}: {facts['cpu']} ({facts['cpu_count']} logical cores)"),
        *_tuning_rows(facts["tuning"]),
        ("numba threads", f"{facts['numba_threads']} (max {facts['numba_max_threads']})"),
        ("fused kernels' threads", thread_rule(facts)),
        ("threading layer", facts["threading_layer"]),
        ("numba cache dir", facts["numba_cache_dir"]),
        ("numba kernels' BLAS",
         "SciPy's" if facts["numba_blas_tile_products"] else "none (SciPy missing)"),
    ]
    if facts["versions"].get("torch"):
        rows.append(("pytorch isa limits", facts["torch_isa_limits"]))
    lines += [f"{k + ':':<26}{v}" for k, v in rows]
    libs = facts["blas"]
    if libs is None:
        lines.append(f"{'blas:':<26}unknown (threadpoolctl not installed)")
    else:
        lines.append("blas:" if libs else f"{'blas:':<26}none loaded")
        for lib in libs:
            lines.append(f"  {lib['library']} {lib['version']} ({lib['architecture']}), "
                         f"{lib['threads']} threads, {lib['file']}")
    return "\n".join(lines) + "\n"


def _coretype() -> str:
    """" (OPENBLAS_CORETYPE=...)" when that variable chooses OpenBLAS's kernels instead of
    OpenBLAS itself (it can hold an AVX-512 CPU to the Haswell kernels, at half the rate)."""
    value = os.environ.get("OPENBLAS_CORETYPE")
    return f" (OPENBLAS_CORETYPE={value})" if value else ""


def _kt(rows):
    from fastattn.kernels._tuning import NEVER

    return "no transposed tiles" if rows >= NEVER else f"transposed tiles from {rows} rows"


def _products(own_dim):
    if not own_dim:
        return "BLAS"
    return (f"own micro-kernel for heads up to {own_dim} wide (fused tiles, unfused "
            "products), BLAS above")


def _tuning_rows(t):
    if "setting" not in t:
        return [("tuning", t["source"])]
    st = t["setting"]
    return [
        ("kernels compiled for", f"{t['cpu']} ({t['isa']})"),
        ("blas kernel", f"{t['blas']} {t['blas_version']}, {t['blas_kernel']}{_coretype()}"),
        ("tuning", t["source"]),
        ("fused attention blocks",
         f"{st['block_q']}x{st['block_k']}, causal {st['causal_block_small']} (T <= 256) / "
         f"{st['causal_block']}, {_kt(st['kt_rows'])}"),
        ("attention products", _products(st["own_dim"])),
    ]


def run(args) -> int:
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        print(format_facts(facts), end="")
    return 0
