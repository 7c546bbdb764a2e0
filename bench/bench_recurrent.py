"""Benchmarks of the book's recurrent layers: fastattn's against the book's per-step algorithm.

Groups (each variant is checked against the book before it is timed, and run once untimed so
that JIT compilation is not counted):

* ``TimeLSTM fwd+bwd`` at (N=128, T=29, D=16, H=256), the shape of chapter 8's seq2seq, and at
  (N=20, T=35, D=650, H=650), chapter 6's larger language model (only with
  ``FASTATTN_BENCH_LARGE=1`` or ``fastattn bench recurrent --full``: its float64 check
  alone takes a while). "book" is the book's per-step algorithm (``tests/book_rnn.py``: one
  cell object per step, NumPy within a step); "vectorized" and "numba" are
  ``fastattn.TimeLSTM`` on that backend. Target: >= 2.5x.
* ``TimeGRU fwd+bwd`` at the first shape. Target: >= 2.5x.
* ``attention seq2seq train step``: forward, backward and Adam update of the chapter 8
  attention seq2seq (``tests/book_lstm.py``, N=128, wordvec 16, H=256, the date task). "book"
  is the book's code path throughout (its TimeLSTM, per-step attention, ``np.add.at``
  embedding, NumPy elsewhere); "fastattn-*" is the same model (same weights) with every slow
  layer replaced by fastattn's on that backend. Checked first: the same losses (to rtol 1e-4)
  over the first 25 training steps, same seed and batches (5 steps with --benchmark-disable;
  ``FASTATTN_BENCH_CHECK_STEPS=n`` sets the number). Target: >= 2x.

The check of a float32 layer: every output and gradient within 4 times the book's own float32
error against the book in float64 (plus one float32 ulp of the largest entry).

Run::

    python -m pytest bench/bench_recurrent.py                      # timings
    python -m pytest bench/bench_recurrent.py --benchmark-disable  # as plain tests
    python bench/bench_recurrent.py                                # ratios, interleaved
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest

from fastattn import TimeGRU, TimeLSTM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import book_lstm  # noqa: E402
import book_rnn  # noqa: E402
from bench_book_attention import _interleaved, _report  # noqa: E402

LARGE = any(os.environ.get(v, "") not in ("", "0")
            for v in ("FASTATTN_BENCH_LARGE", "FASTATTN_BENCH_FULL"))
#: Training steps whose losses are compared before a step is timed: 25, or 5 when the benchmarks
#: run as plain tests (--benchmark-disable); FASTATTN_BENCH_CHECK_STEPS overrides both.
CHECK_STEPS = os.environ.get("FASTATTN_BENCH_CHECK_STEPS")

SHAPES = {"seq2seq": (128, 29, 16, 256), "lm": (20, 35, 650, 650)}  # (N, T, D, H)
LAYERS = {"TimeLSTM": (TimeLSTM, book_rnn.TimeLSTM, 4), "TimeGRU": (TimeGRU, book_rnn.TimeGRU, 3)}
VARIANTS = ("book", "vectorized", "numba")
CASES = [("TimeLSTM", "seq2seq"), ("TimeLSTM", "lm"), ("TimeGRU", "seq2seq")]


def _group(layer, shape):
    N, T, D, H = SHAPES[shape]
    return f"{layer} fwd+bwd (N={N}, T={T}, D={D}, H={H}, float32)"


# --- one layer ----------------------------------------------------------------------------

def _layer_inputs(layer, shape, dtype):
    N, T, D, H = SHAPES[shape]
    k = LAYERS[layer][2]
    rng = np.random.default_rng(0)
    W = [rng.standard_normal((D, k * H)) / np.sqrt(D), rng.standard_normal((H, k * H)) /
         np.sqrt(H), np.zeros(k * H)]
    xs, dhs = rng.standard_normal((N, T, D)), rng.standard_normal((N, T, H))
    return [w.astype(dtype) for w in W], xs.astype(dtype), dhs.astype(dtype)


def _runner(layer_obj, xs, dhs):
    def fn():
        hs = layer_obj.forward(xs)
        return [hs, layer_obj.backward(dhs), *layer_obj.grads]
    return fn


@functools.cache
def _book_results(layer, shape, dtype):
    W, xs, dhs = _layer_inputs(layer, shape, dtype)
    return [a.copy() for a in _runner(LAYERS[layer][1](*W), xs, dhs)()]


def _layer_case(layer, shape, variant):
    """fn() running one forward+backward of ``variant``, already checked and warmed up."""
    W, xs, dhs = _layer_inputs(layer, shape, np.float32)
    fast_cls, book_cls, _ = LAYERS[layer]
    obj = book_cls(*W) if variant == "book" else fast_cls(*W, backend=variant)
    fn = _runner(obj, xs, dhs)
    got = fn()  # warm-up (JIT compile) and the result to check
    if variant != "book":
        book32 = _book_results(layer, shape, np.float32)
        book64 = _book_results(layer, shape, np.float64)
        for k, (g, b32, b64) in enumerate(zip(got, book32, book64, strict=True)):
            ref_err = float(np.abs(b32 - b64).max())
            bound = 4 * ref_err + np.finfo(np.float32).eps * float(np.abs(b64).max())
            err = float(np.abs(g - b64).max())
            assert err <= bound, f"{layer} {variant} output {k}: error {err:.3g} > {bound:.3g}"
    return fn


# --- a whole training step ----------------------------------------------------------------

N, WORDVEC, H = 128, 16, 256
STEP_GROUP = f"attention seq2seq train step (N={N}, wordvec={WORDVEC}, H={H}, date task)"
STEP_VARIANTS = ("book", "fastattn-vectorized", "fastattn-numba")
_STEP_KW = {
    "book": dict(backend="vectorized", attention_backend="loop", embedding="add.at"),
    "fastattn-vectorized": dict(backend="vectorized",
                                lstm=functools.partial(TimeLSTM, backend="vectorized")),
    "fastattn-numba": dict(backend="numba", lstm=functools.partial(TimeLSTM, backend="numba")),
}
_data = {}


def _date_batches(steps):
    if "xs" not in _data:
        from dataset import sequence

        (x, t), _ = sequence.load_data("date.txt")
        _data["xs"], _data["ts"] = np.ascontiguousarray(x[:, ::-1]), t  # reversed input
        _data["V"] = len(sequence.get_vocab()[0])
    return _data["xs"][:N * steps], _data["ts"][:N * steps], _data["V"]


def _losses(variant, steps):
    """The losses of the first ``steps`` training steps (cached per variant)."""
    key = ("losses", variant, steps)
    if key not in _data:
        xs, ts, V = _date_batches(steps)
        model = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW[variant])
        _data[key] = book_lstm.train_steps(model, xs, ts, N, steps, book_lstm.adam(1e-3))
    return _data[key]


def _step_case(variant, steps=25):
    steps = int(CHECK_STEPS or steps)
    if variant != "book":  # the check: the same losses as the book's, step by step
        # float32 throughout; rounding differences grow over the steps but stay far below
        # what a wrong gradient would do in a step (the loss moves by ~1e-2 per step)
        np.testing.assert_allclose(_losses(variant, steps), _losses("book", steps),
                                   rtol=1e-4, atol=0)
    xs, ts, V = _date_batches(1)
    model = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW[variant])
    optimizer = book_lstm.adam(1e-3)

    def fn():
        loss = model.forward(xs, ts)
        model.backward()
        optimizer.update(model.params, model.grads)
        return loss

    fn()  # warm-up
    return fn


# --- pytest-benchmark ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("layer", "shape"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_recurrent_forward_backward(benchmark, layer, shape, variant):
    if shape == "lm" and not LARGE:
        pytest.skip("the large shape runs with FASTATTN_BENCH_LARGE=1 (or --full)")
    benchmark.group = _group(layer, shape)
    benchmark.extra_info["variant"] = variant
    benchmark(_layer_case(layer, shape, variant))


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_attention_seq2seq_train_step(benchmark, variant):
    benchmark.group = STEP_GROUP
    benchmark.extra_info["variant"] = variant
    benchmark(_step_case(variant, 5 if benchmark.disabled else 25))


def main():
    for layer, shape in CASES:
        if shape == "lm" and not LARGE:
            continue
        cases = {v: _layer_case(layer, shape, v) for v in VARIANTS}
        _report(_group(layer, shape), _interleaved(cases, 10), "book")
    _report(STEP_GROUP, _interleaved({v: _step_case(v) for v in STEP_VARIANTS}, 7), "book")


if __name__ == "__main__":
    main()
