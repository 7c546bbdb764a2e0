"""Benchmarks of the unfused kernels: loop vs vectorized vs numba, side by side.

One group per kernel and shape, so that pytest-benchmark's table compares the backends on the
same inputs:

* ``softmax_*``, ``weighted_sum_*``, ``scores_*`` at the seed notebook's shape (B=10, T=29,
  d=64) and at the date task's training shape (B=128, T=29, d=64), float32, Tq = Tk = T.
  The loop reference runs at the seed shape only (it is slow on purpose), a few rounds.
* ``embedding_backward`` (the scatter-add of an embedding's backward) at (N=10, T=29, D=512)
  (the seed's key embedding) and (N=128, T=29, D=16 and 256), V=59, with ``np.add.at`` (the
  book's way) as a fourth contender.

Every variant is checked (``check_then_time`` of ``bench/conftest.py``) against the vectorized
kernel in float64 on the same numbers, within ``helpers.kernel_bounds``, on the call that is
then warmed up and timed, so JIT compilation is not counted. ``extra_info`` carries GFLOP/s
(matrix products) or GB/s (softmax, scatter-add: bytes read and written once) at the minimum
time.

Run::

    python -m pytest bench/bench_kernels.py --benchmark-only \
        --benchmark-columns=min,median,mean --benchmark-sort=name
    python -m pytest bench/bench_kernels.py --benchmark-disable   # as plain tests, quickly
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_all_close, floats_as, kernel_bounds

from fastattn import kernels

pytestmark = pytest.mark.numerics  # checked results: CI runs them on AVX2 code paths too

DTYPE = np.float32
T, D_HEAD, V = 29, 64, 59
SHAPES = {"seed": 10, "train": 128}  # batch sizes; Tq = Tk = T, d = D_HEAD
LOOP_ROUNDS = 3

MATMUL_FLOPS = {  # multiply-adds count 2
    "weighted_sum_forward": 2,
    "weighted_sum_backward": 4,
    "scores_forward": 2,
    "scores_backward": 4,
}
SOFTMAX_ARRAYS = {"softmax_forward": 2, "softmax_backward": 3}  # (B, T, T) arrays moved


def _inputs(name, B, rng):
    """float32 arguments of kernel ``name`` at (B, T, T) scores and (B, T, D_HEAD) vectors."""

    def a(*s):
        return rng.standard_normal(s).astype(DTYPE)

    p = rng.random((B, T, T))
    p = (p / p.sum(-1, keepdims=True)).astype(DTYPE)  # rows of probabilities
    scale = 1.0 / np.sqrt(D_HEAD)
    return {
        "softmax_forward": (a(B, T, T),),
        "softmax_backward": (a(B, T, T), p),
        "weighted_sum_forward": (p, a(B, T, D_HEAD)),
        "weighted_sum_backward": (a(B, T, D_HEAD), p, a(B, T, D_HEAD)),
        "scores_forward": (a(B, T, D_HEAD), a(B, T, D_HEAD), scale),
        "scores_backward": (a(B, T, T), a(B, T, D_HEAD), a(B, T, D_HEAD), scale),
    }[name]


def _check(name, got, args):
    """``got``, kernel ``name``'s float32 results for ``args``, against the vectorized kernel
    in float64 on the same numbers, within helpers' error bound."""
    got = got if isinstance(got, tuple) else (got,)
    want = kernels.get(name, "vectorized")(*floats_as(np.float64, args))
    want = want if isinstance(want, tuple) else (want,)
    for g in got:
        assert g.dtype == DTYPE, name
    assert_all_close(got, want, kernel_bounds(name, args), err_msg=name)


def _cases():
    for name in (*SOFTMAX_ARRAYS, *MATMUL_FLOPS):
        for shape, B in SHAPES.items():
            for backend in kernels.BACKENDS:
                if backend == "loop" and shape != "seed":
                    continue
                yield pytest.param(name, B, backend, id=f"{name}-B{B}-{backend}")


@pytest.mark.parametrize("name, B, backend", list(_cases()))
def test_kernel(benchmark, check_then_time, name, B, backend):
    benchmark.group = f"{name} (B={B}, T={T}, d={D_HEAD}, float32)"
    args = _inputs(name, B, np.random.default_rng(0))
    if name in MATMUL_FLOPS:
        work = {"GFLOP/s": MATMUL_FLOPS[name] * B * T * T * D_HEAD}
    else:
        work = {"GB/s": SOFTMAX_ARRAYS[name] * B * T * T * np.dtype(DTYPE).itemsize}
    check_then_time(kernels.get(name, backend), args, check=lambda got: _check(name, got, args),
                    rounds=LOOP_ROUNDS if backend == "loop" else None, work=work)


# --- the scatter-add of an embedding's backward ----------------------------------------------

EMB_SHAPES = [(10, 512), (128, 16), (128, 256)]  # (N, D), T = 29, V = 59
EMB_VARIANTS = ("np.add.at", *kernels.BACKENDS)


def _add_at(idx, dout, n_rows):
    """The book's Embedding backward: dW[...] = 0; np.add.at(dW, idx, dout)."""
    dW = np.zeros((n_rows, dout.shape[2]), dtype=dout.dtype)
    np.add.at(dW, idx, dout)
    return dW


def _emb_cases():
    for N, D in EMB_SHAPES:
        for variant in EMB_VARIANTS:
            if variant == "loop" and N != 10:
                continue
            yield pytest.param(N, D, variant, id=f"N{N}-D{D}-{variant}")


@pytest.mark.parametrize("N, D, variant", list(_emb_cases()))
def test_embedding_backward(benchmark, check_then_time, N, D, variant):
    benchmark.group = f"embedding_backward (N={N}, T={T}, D={D}, V={V}, float32)"
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, size=(N, T))
    dout = rng.standard_normal((N, T, D)).astype(DTYPE)
    args = (idx, dout, V)
    fn = _add_at if variant == "np.add.at" else kernels.get("embedding_backward", variant)
    moved = (N * T * D + V * D) * np.dtype(DTYPE).itemsize + idx.nbytes
    check_then_time(fn, args, check=lambda got: _check("embedding_backward", got, args),
                    rounds=LOOP_ROUNDS if variant == "loop" else None, work={"GB/s": moved})
