"""Benchmarks of the book's recurrent layers: fastattn's against the book's per-step algorithm.

Groups (each variant is checked against the book on the call that is then warmed up and timed,
``check_then_time`` of ``bench/conftest.py``, so that JIT compilation is not counted):

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
  layer replaced by fastattn's on that backend. Checked first: the losses of the first 25
  training steps (5 with --benchmark-disable; ``FASTATTN_BENCH_CHECK_STEPS=n`` sets the number),
  same seed and batches, against the book's run in float64 from the same weights.

Every check is the tests' second rule (``helpers``): within ``helpers.K_FLOAT32`` times the
book's own float32 error against the book in float64.

Run::

    python -m pytest bench/bench_recurrent.py --benchmark-only      # timings
    python -m pytest bench/bench_recurrent.py --benchmark-disable  # as plain tests
    fastattn bench recurrent                                       # ratios
"""

from __future__ import annotations

import functools
import os

import book_lstm
import book_rnn
import numpy as np
import pytest
from helpers import assert_all_within_float32_error, assert_within_float32_error

from fastattn import TimeGRU, TimeLSTM

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
    """(fn, check): fn() runs one forward+backward of ``variant``; check(its result)."""
    W, xs, dhs = _layer_inputs(layer, shape, np.float32)
    fast_cls, book_cls, _ = LAYERS[layer]
    obj = book_cls(*W) if variant == "book" else fast_cls(*W, backend=variant)

    def check(got):  # every output and gradient against the book in float64
        book32 = _book_results(layer, shape, np.float32)
        book64 = _book_results(layer, shape, np.float64)
        for k, (g, b32, b64) in enumerate(zip(got, book32, book64, strict=True)):
            assert_within_float32_error(g, b64, b32, err_msg=f"{layer} {variant} output {k}")

    return _runner(obj, xs, dhs), check


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


def _losses(variant, steps, dtype=np.float32):
    """The losses of the first ``steps`` training steps (cached per variant and dtype); in
    float64 from the float32 model's weights."""
    key = ("losses", variant, steps, np.dtype(dtype).name)
    if key not in _data:
        xs, ts, V = _date_batches(steps)
        model = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, dtype=dtype,
                                           **_STEP_KW[variant])
        weights = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW[variant])
        for p, w in zip(model.params, weights.params, strict=True):
            p[...] = w
        _data[key] = book_lstm.train_steps(model, xs, ts, N, steps, book_lstm.adam(1e-3))
    return _data[key]


def _step_case(variant, steps=25):
    """(fn, check): fn() runs one training step of ``variant``; check(its first loss)
    compares the losses of the first ``steps`` steps with the book's run in float64."""
    steps = int(CHECK_STEPS or steps)

    def check(loss):
        losses = _losses(variant, steps)
        assert losses[0] == loss  # the timed step is the first step of the checked run
        assert_all_within_float32_error([np.asarray(losses, np.float32)],
                                        [np.asarray(_losses("book", steps, np.float64))],
                                        [np.asarray(_losses("book", steps))], ["losses"],
                                        err_msg=variant)

    xs, ts, V = _date_batches(1)
    model = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW[variant])
    fn = functools.partial(book_lstm.train_step, model, xs, ts, book_lstm.adam(1e-3))
    return fn, check


# --- pytest-benchmark ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("layer", "shape"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_recurrent_forward_backward(benchmark, check_then_time, layer, shape, variant):
    if shape == "lm" and not LARGE:
        pytest.skip("the large shape runs with FASTATTN_BENCH_LARGE=1 (or --full)")
    benchmark.group = _group(layer, shape)
    benchmark.extra_info["variant"] = variant
    fn, check = _layer_case(layer, shape, variant)
    check_then_time(fn, check=check)


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_attention_seq2seq_train_step(benchmark, check_then_time, variant):
    benchmark.group = STEP_GROUP
    benchmark.extra_info["variant"] = variant
    fn, check = _step_case(variant, 5 if benchmark.disabled else 25)
    check_then_time(fn, check=check)
