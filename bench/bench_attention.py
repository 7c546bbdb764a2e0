"""Benchmarks of the fused attention forward+backward: numba vs vectorized vs PyTorch (vs loop).

One group per shape and dtype, so that pytest-benchmark's table compares the contenders on the
same inputs (q, k, v of shape (B, T, d), Tq = Tk = T, no mask):

* ``numba`` and ``vectorized``: ``kernels.get("attention_forward"/"attention_backward", ...)``;
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` forward on (B, 1, T, d)
  (one head), then ``torch.autograd.grad`` for dq, dk, dv (skipped when torch is not
  installed); torch runs with its default thread count, which is the number of cores, like
  Numba;
* ``loop`` (the reference) at a tiny shape only (in float32 and float64, as every contender).

Shapes: the date task's (128, 29, 64) and (256, 128, 64), plus (32, 512, 64) and
(8, 2048, 64) when the environment variable ``FASTATTN_BENCH_FULL=1`` is set, and causal
variants, in float32; full runs time every shape in float64 too. ``test_sgemm_peak`` times a
large float32 ``np.dot`` in the same run (and full runs a float64 one), the machine's
matrix-product peak to compare GFLOP/s with. ``test_peak_memory`` (full runs only) measures
the extra memory of forward+backward at B=8, T=8192, d=64 in a fresh process, and
``test_compile_time`` (full runs only) the cold and warm import + first call.

Every contender is checked before it is warmed up and timed, on exactly the call that is
timed (the same B, T, d, causal, so the same tiles and code paths): its results against the
float64 formula of ``helpers`` within ``helpers.attention_bounds``. A timed run first fixes
glibc's malloc thresholds for the process (see ``_steady_allocator``), so that page faults of
reallocated arrays do not depend on what ran before. ``extra_info`` carries GFLOP/s at the
minimum time, counting 4 B T^2 d flops for the forward and 10 B T^2 d for the backward (half
for causal).

Run::

    python -m pytest bench/bench_attention.py --benchmark-only \
        --benchmark-columns=min,median --benchmark-sort=name
    FASTATTN_BENCH_FULL=1 fastattn bench --filter attention   # all shapes, ratios table
    python bench/bench_attention.py memory 8 8192 64            # peak extra memory, as JSON
    python bench/bench_attention.py first-call                  # import + first call, seconds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
    assert_all_close,
    assert_close,
    attention_bounds,
    blas_thread_count,
    kernel_attention_probs,
    matmul_terms,
)

from fastattn import kernels

FULL = os.environ.get("FASTATTN_BENCH_FULL") == "1"


def _steady_allocator():
    """Have glibc's malloc keep freed memory for reuse (mmap threshold 32 MiB, trim threshold
    1 GiB) in this benchmark process.

    With glibc's default, self-adjusting thresholds, whether the arrays a call allocates and
    frees (outputs, temporaries: about 1 MiB each at B=128, T=29) come back as already-mapped
    memory or are returned to the OS and page-faulted in again on every call depends on the
    order of earlier allocations in the process: measured here at (128, 29, 64), ~930 page
    faults and 2.5x the time per call after one small call had come first, none otherwise.
    Fixed thresholds take that lottery out of the comparison, for every contender alike.
    FASTATTN_BENCH_MALLOC=default leaves glibc as it is.
    """
    if os.environ.get("FASTATTN_BENCH_MALLOC") == "default":
        return
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 2**30)


@pytest.fixture(autouse=True, scope="module")
def _allocator_for_timing(request):
    """When this run times anything (not --benchmark-disable), steady the allocator first."""
    if not request.config.getoption("benchmark_disable", default=False):
        _steady_allocator()
DTYPE = np.float32
DTYPES = ("float32", "float64") if FULL else ("float32",)  # float64 in full runs only

# (B, T, d, causal)
SHAPES = [(128, 29, 64, False), (256, 128, 64, False), (256, 128, 64, True)]
if FULL:
    SHAPES += [(32, 512, 64, False), (8, 2048, 64, False), (32, 512, 64, True)]
TINY = (4, 16, 8, False)  # the only shape the loop reference runs at
CONTENDERS = ("numba", "vectorized", "torch")
SLOW_VECTORIZED_T = 2048  # vectorized materialises (B, T, T): a few rounds only from here


def _flops(B, T, d, causal):
    """Forward 4 B T^2 d plus backward 10 B T^2 d; half with causal."""
    return 14 * B * T * T * d // (2 if causal else 1)


def _inputs(B, T, d, seed=0, dtype=DTYPE):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, T, d)).astype(dtype) for _ in range(4))  # q k v dout


def _kernel_fwd_bwd(backend):
    fwd = kernels.get("attention_forward", backend)
    bwd = kernels.get("attention_backward", backend)

    def run(q, k, v, dout, causal):
        scale = 1.0 / np.sqrt(q.shape[-1])
        out, lse = fwd(q, k, v, scale, causal, None)
        dq, dk, dv = bwd(dout, q, k, v, out, lse, scale, causal, None)
        return out, dq, dk, dv

    return run


def _torch_fwd_bwd():
    torch = pytest.importorskip("torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(q, k, v, dout, causal):
        # (B, 1, T, d): one head per batch entry, the 4-D layout of torch's CPU flash kernel
        # (3-D inputs take its slower unfused path)
        tq, tk, tv = (torch.from_numpy(a[:, None]).requires_grad_(True) for a in (q, k, v))
        out = sdpa(tq, tk, tv, is_causal=causal)
        grads = torch.autograd.grad(out, (tq, tk, tv), torch.from_numpy(dout[:, None]))
        return (out.detach().numpy()[:, 0], *(g.numpy()[:, 0] for g in grads))

    return run, torch.get_num_threads()


def _contender(name):
    """(fwd+bwd function of q, k, v, dout, causal -> out, dq, dk, dv; its thread count)."""
    if name == "torch":
        return _torch_fwd_bwd()
    threads = 1
    if name == "numba":
        import numba

        threads = numba.get_num_threads()
    return _kernel_fwd_bwd(name), threads


def _check(got, args, causal):
    """The results of exactly the timed call against the float64 formula (P explicit), within
    helpers.attention_bounds."""
    want, bounds = _reference(args, causal)
    names = ("out", "dq", "dk", "dv")
    for name, g in zip(names, got, strict=True):
        assert g.dtype == args[0].dtype, name
    assert_all_close(got, want, [bounds[x] for x in names], names)


_REFERENCES = {}


def _reference(args, causal):
    """float64 (out, dq, dk, dv) and their bounds for one configuration, computed once."""
    key = (args[0].shape, args[0].dtype, causal)
    if key in _REFERENCES:
        return _REFERENCES[key]
    _REFERENCES.clear()  # one configuration at a time: the groups run in order
    q, k, v, dout = (a.astype(np.float64) for a in args)
    scale = 1.0 / np.sqrt(q.shape[-1])
    P = kernel_attention_probs(q, k, scale, causal, None)  # (B, T, T)
    ds = P * (dout @ v.transpose(0, 2, 1) - (dout * (P @ v)).sum(-1, keepdims=True))
    want = (P @ v, scale * ds @ k, scale * ds.transpose(0, 2, 1) @ q,
            P.transpose(0, 2, 1) @ dout)
    bounds = attention_bounds(*args[:3], P, scale=scale, dout=args[3])
    _REFERENCES[key] = want, bounds
    return want, bounds


def _group(B, T, d, causal, dtype="float32"):
    return f"attention fwd+bwd (B={B}, T={T}, d={d}{', causal' if causal else ''}, {dtype})"


def _tag(dtype):
    """The dtype's part of an id: none for float32 (its ids as they always were)."""
    return "" if dtype == "float32" else f"-{dtype}"


def _cases():
    for dtype in DTYPES:
        for B, T, d, causal in SHAPES:
            for name in CONTENDERS:
                yield pytest.param(
                    B, T, d, causal, dtype, name,
                    id=f"B{B}-T{T}-d{d}{'-causal' if causal else ''}{_tag(dtype)}-{name}")
    for dtype in ("float32", "float64"):  # float64 at least here: plain runs check its path
        for name in ("loop", *CONTENDERS):
            yield pytest.param(*TINY, dtype, name, id=f"tiny{_tag(dtype)}-{name}")


@pytest.mark.parametrize("B, T, d, causal, dtype, name", list(_cases()))
def test_attention_fwd_bwd(benchmark, check_then_time, B, T, d, causal, dtype, name):
    benchmark.group = _group(B, T, d, causal, dtype)
    run, threads = _contender(name)
    args = _inputs(B, T, d, dtype=np.dtype(dtype))
    benchmark.extra_info["threads"] = threads
    slow = name == "loop" or (name == "vectorized" and T >= SLOW_VECTORIZED_T)
    check_then_time(run, (*args, causal), check=lambda got: _check(got, args, causal),
                    rounds=3 if slow else None, warmup=0.3,
                    work={"GFLOP/s": _flops(B, T, d, causal)})


def test_sgemm_peak(benchmark, check_then_time):
    """The machine's float32 matrix-product rate: np.dot of two 2048 x 2048 matrices, all
    BLAS threads."""
    _gemm_peak(benchmark, check_then_time, np.float32)


@pytest.mark.skipif(not FULL, reason="set FASTATTN_BENCH_FULL=1 (float64 runs)")
def test_dgemm_peak(benchmark, check_then_time):
    """The same in float64, the peak that the float64 runs compare with."""
    _gemm_peak(benchmark, check_then_time, np.float64)


def _gemm_peak(benchmark, check_then_time, dtype):
    kind = "sgemm" if dtype == np.float32 else "dgemm"
    benchmark.group = f"machine: {kind} peak ({np.dtype(dtype).name} np.dot 2048^3)"
    n = 2048
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))

    # the float64 reference's own rounding counts as much as the product's in float64
    rounds = n + 2 if dtype == np.float32 else 2 * n + 2

    def check(c):  # a corner of the product, against float64
        assert c.dtype == dtype, kind
        assert_close(c[:8, :8], a[:8].astype(np.float64) @ b[:, :8], terms=matmul_terms(
            a[:8], b[:, :8]), n=rounds, err_msg=kind)

    benchmark.extra_info["threads"] = blas_thread_count()
    check_then_time(np.dot, (a, b), check=check, warmup=0.3, work={"GFLOP/s": 2 * n**3})


# ---- peak memory ------------------------------------------------------------------------------

MEMORY_SHAPE = (8, 8192, 64)
MEMORY_LIMIT = 64 * 2**20  # extra bytes allowed beyond inputs and outputs


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def measure_memory(B, T, d, backend="numba"):
    """Peak resident memory of fastattn.attention_forward + attention_backward beyond the
    inputs and outputs, in a process of its own (Linux: the peak is reset through
    /proc/self/clear_refs). Returns a dict of byte counts and seconds."""
    import fastattn

    q, k, v, dout = _inputs(1, 64, d)  # compile / load the kernels and start thread pools
    out, lse = fastattn.attention_forward(q, k, v, backend=backend)
    fastattn.attention_backward(dout, q, k, v, out, lse, backend=backend)
    del q, k, v, dout, out, lse
    q, k, v, dout = _inputs(B, T, d)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size to the current one
    base = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    out, lse = fastattn.attention_forward(q, k, v, backend=backend)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, backend=backend)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    outputs = out.nbytes + lse.nbytes + sum(g.nbytes for g in grads)
    return {"shape": [B, T, d], "backend": backend, "peak_rss_growth": peak - base,
            "outputs": outputs, "extra": peak - base - outputs, "seconds": round(seconds, 3),
            "scores_matrix": B * T * T * np.dtype(DTYPE).itemsize}


@pytest.mark.skipif(not FULL, reason="set FASTATTN_BENCH_FULL=1 (runs B=8, T=8192)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_memory(benchmark):
    """At B=8, T=8192, d=64 the fused kernels need <= 64 MiB beyond inputs and outputs (the
    score matrix alone would be 2 GiB)."""
    benchmark.group = "memory: attention fwd+bwd (B=8, T=8192, d=64)"
    cmd = [sys.executable, os.path.abspath(__file__), "memory", *map(str, MEMORY_SHAPE)]

    def measure():
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_script_env())
        return json.loads(res.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    benchmark.extra_info["extra_MiB"] = round(result["extra"] / 2**20, 1)
    assert result["extra"] <= MEMORY_LIMIT, result


def _script_env():
    """The environment for running this file as a script: the tests' helpers importable."""
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


# ---- compile time ----------------------------------------------------------------------------


def measure_first_call():
    """Seconds to import fastattn and run the numba fused forward+backward once in float32 and
    once in float64 (compiling them, or loading them from Numba's cache)."""
    t0 = time.perf_counter()
    import fastattn

    for dtype in (np.float32, np.float64):
        q, k, v, dout = (a.astype(dtype) for a in _inputs(2, 5, 4))
        out, lse = fastattn.attention_forward(q, k, v, causal=True, backend="numba")
        fastattn.attention_backward(dout, q, k, v, out, lse, causal=True, backend="numba")
    return {"seconds": round(time.perf_counter() - t0, 2)}


@pytest.mark.skipif(not FULL, reason="set FASTATTN_BENCH_FULL=1 (compiles from scratch)")
def test_compile_time(benchmark, tmp_path):
    """Cold: a fresh Numba cache, so the fused kernels compile (float32 and float64). Warm: the
    same cache again, so import + first call only load them."""
    benchmark.group = "compile: import + first numba fwd+bwd (float32 and float64)"
    env = dict(_script_env(), NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))
    cmd = [sys.executable, os.path.abspath(__file__), "first-call"]

    def first_call():
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return json.loads(res.stdout.strip().splitlines()[-1])["seconds"]

    cold = first_call()
    warm = benchmark.pedantic(first_call, rounds=3, iterations=1)
    benchmark.extra_info.update({"cold_seconds": cold, "warm_seconds": warm})
    assert warm < cold


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "memory":
        shape = tuple(int(x) for x in sys.argv[2:5]) or MEMORY_SHAPE
        print(json.dumps(measure_memory(*shape)))
    elif len(sys.argv) == 2 and sys.argv[1] == "first-call":
        print(json.dumps(measure_first_call()))
    else:
        print("usage: python bench/bench_attention.py memory [B T d] | first-call",
              file=sys.stderr)
        sys.exit(2)
