"""Benchmarks of the training step's glue kernels: loop vs vectorized vs numba, side by side.

The glue (``kernels.glue_loop`` documents it) is what the step runs around the attention and
the matrix products. One group per kernel, at the sizes of the default ``fastattn train``
model's step (float32; ``TrainSettings.batch_size`` questions of the date task):

* ``layernorm_*``: the encoder's rows, (batch x 29 positions, d_model);
* ``bias_add``: the encoder's query, key and value projections, (batch x 29, 3 d_model), in
  place;
* ``bias_relu_*``: the feed-forward layer's hidden rows, (batch x 29, d_ff);
* ``softmax_xent_*``: the output layer's rows, (batch x 10 answer positions, 59 characters);
* ``adam_update``: every parameter of the default model, one update of all of them.

The loop reference runs on the first ``LOOP_ROWS`` rows only (a plain Python loop is slow on
purpose), a few rounds; its group is the same kernel, so compare per row.

Every variant is checked before it is timed (``check_then_time`` of ``bench/conftest.py``), on
the very call that is timed: its results against the vectorized kernel run in float64 on the
same numbers, each within ``helpers.K_FLOAT32`` times the float32 error level of the vectorized
kernel run in float32 (``helpers.assert_all_within_float32_error``), the references on copies
of the arguments taken before that call. ``bias_add`` and ``adam_update`` work in place: the
check is on the arrays after the first call, and the timed calls go on updating them.

Run::

    python -m pytest bench/bench_glue.py --benchmark-only --benchmark-columns=min,median
    python -m pytest bench/bench_glue.py --benchmark-disable   # as plain tests, quickly
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_all_within_float32_error, floats_as

from fastattn import kernels
from fastattn.commands.train import TrainSettings
from fastattn.transformer import TransformerConfig as MODEL
from fastattn.transformer import TransformerSeq2seq

pytestmark = pytest.mark.numerics  # checked results: CI runs them on AVX2 code paths too

DTYPE = np.float32
B = TrainSettings.batch_size
T_SRC, T_ANSWER, VOCAB = 29, 10, 59  # the date task's question and answer lengths, characters
LOOP_ROWS = 64
LOOP_ROUNDS = 3


def _inputs(name, rows):
    """float32 arguments of kernel ``name`` (the step's sizes; ``rows`` rows)."""
    rng = np.random.default_rng(0)

    def a(*s):
        return rng.standard_normal(s).astype(DTYPE)

    C, F = MODEL.d_model, MODEL.d_ff
    if name.startswith("layernorm"):
        x, g, b = a(rows, C), 1 + 0.1 * a(C), 0.1 * a(C)
        if name == "layernorm_forward":
            return x, g, b, 1e-5
        _, mean, rstd = kernels.get("layernorm_forward", "vectorized")(x, g, b, 1e-5)
        return a(rows, C), x, g, mean, rstd
    if name == "bias_add":
        return a(rows, 3 * C), a(3 * C)
    if name == "bias_relu_forward":
        return a(rows, F), a(F)
    if name == "bias_relu_backward":
        return a(rows, F), np.maximum(a(rows, F), 0)
    t = rng.integers(0, VOCAB, rows)
    t[::7] = -1  # padding rows: ignored
    x = 3 * a(rows, VOCAB)
    if name == "softmax_xent_forward":
        return x, t
    _, lse = kernels.get("softmax_xent_forward", "vectorized")(x, t)
    return x, t, lse, 1.0 / rows


ROWS = {"layernorm_forward": B * T_SRC, "layernorm_backward": B * T_SRC, "bias_add": B * T_SRC,
        "bias_relu_forward": B * T_SRC, "bias_relu_backward": B * T_SRC,
        "softmax_xent_forward": B * T_ANSWER, "softmax_xent_backward": B * T_ANSWER}


def _results(out):
    return list(out) if isinstance(out, tuple) else [out]


def _check(name, got, args):
    """``got`` (kernel ``name`` on ``args``) against the vectorized kernel in float64, within
    K_FLOAT32 times the vectorized kernel's own float32 error level."""
    ref = kernels.get(name, "vectorized")
    want64 = _results(ref(*floats_as(np.float64, args)))
    want32 = _results(ref(*args))
    got = _results(got)
    assert all(g.dtype == DTYPE for g in got), name
    assert_all_within_float32_error(got, want64, want32, [f"{name}[{i}]" for i in range(len(got))],
                                    err_msg=name)


def _cases():
    for name in ROWS:
        for backend in kernels.BACKENDS:
            yield pytest.param(name, backend, id=f"{name}-{backend}")


@pytest.mark.parametrize("name, backend", list(_cases()))
def test_glue(benchmark, check_then_time, name, backend):
    rows = LOOP_ROWS if backend == "loop" else ROWS[name]
    benchmark.group = f"{name} ({ROWS[name]} rows, float32; loop: {LOOP_ROWS} rows)"
    args = _inputs(name, rows)
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]  # bias_add: in place
    check_then_time(kernels.get(name, backend), args, check=lambda got: _check(name, got, before),
                    rounds=LOOP_ROUNDS if backend == "loop" else None)


# --- Adam over every parameter of the default model ----------------------------------------


@functools.cache
def _model_params():
    """Shapes of the default model's parameters (the step's Adam updates all of them)."""
    return tuple(p.shape for p in TransformerSeq2seq(VOCAB, seed=0).params)


def _adam_state(dtype):
    rng = np.random.default_rng(1)
    shapes = _model_params()
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [0.1 * rng.standard_normal(s).astype(dtype) for s in shapes]
    ms = [0.01 * rng.standard_normal(s).astype(dtype) for s in shapes]
    vs = [1e-4 * np.abs(rng.standard_normal(s)).astype(dtype) for s in shapes]
    return [params, grads, ms, vs]


ADAM = (1e-3, 0.9, 0.999, 1e-8)  # lr_t, beta1, beta2, eps


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_adam_update(benchmark, check_then_time, backend):
    n = sum(int(np.prod(s)) for s in _model_params())
    benchmark.group = (f"adam_update (the default model's {n} parameters, float32; loop: the "
                       f"first 4000 of each array)")
    state = _adam_state(DTYPE)
    if backend == "loop":  # the first 4,000 parameters of each array
        state = [[a.reshape(-1)[:4000].copy() for a in lst] for lst in state]
    start = [[a.copy() for a in lst] for lst in state]
    kernel = kernels.get("adam_update", backend)

    def check(_):
        refs = {}
        for dt in (np.float64, np.float32):
            lists = [[a.astype(dt) for a in lst] for lst in start]
            kernels.get("adam_update", "vectorized")(*lists, *ADAM)
            refs[dt] = [a for k in (0, 2, 3) for a in lists[k]]
        got = [a for k in (0, 2, 3) for a in state[k]]
        assert_all_within_float32_error(got, refs[np.float64], refs[np.float32],
                                        [f"array {i}" for i in range(len(got))],
                                        err_msg="adam_update")

    check_then_time(kernel, (*state, *ADAM), check=check,
                    rounds=LOOP_ROUNDS if backend == "loop" else None, work={"Gparameters/s": n})
