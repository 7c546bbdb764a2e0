"""Benchmarks of the book's layers: what a user of "Deep Learning from Scratch 2" gains by
changing imports.

Groups (each compares its variants side by side; every variant is checked against the
reference before it is timed, and run once untimed so that JIT compilation is not counted):

* ``book TimeAttention``: forward+backward at the book's date-task shapes (N=128, T_enc=29,
  T_dec=11, H=256, float32). "loop" is the book's per-step algorithm (one ``Attention`` per
  decoder step, NumPy within a step), the reference; "vectorized" and "numba" compute all
  steps at once on the kernels. Target: >= 5x faster than loop.
* ``book TimeEmbedding backward``: the scatter-add of the layer's backward at (N=128, T=29,
  V=59) with D=16 and D=256, against the book's ``np.add.at``. Target: >= 5x. (The kernel
  alone is in ``bench_kernels.py``; this is the whole layer call.)
* ``book seq2seq train step``: forward, backward and Adam update of the chapter 8 attention
  seq2seq (``tests/book_lstm.py``: LSTM encoder and decoder, N=128, wordvec 16, H=256, the date
  task). "book" is the book's code path (per-step attention, ``np.add.at`` embedding, NumPy
  elsewhere); "fastattn-*" builds the same model (same weights) on fastattn's layers with
  that backend. Target: >= 1.3x. Most of a step is the LSTMs, which fastattn does not touch.

Run::

    python -m pytest bench/bench_book_attention.py                      # timings
    python -m pytest bench/bench_book_attention.py --benchmark-disable  # as plain tests
    python bench/bench_book_attention.py                               # ratios, interleaved

The last form times the variants of each group in alternation, in one process, and prints
their ratios: the fairest comparison on a busy machine.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

import numpy as np
import pytest
from helpers import (
    assert_all_close,
    assert_within_float32_error,
    book_attention_bounds,
    kernel_bounds,
)

from fastattn import TimeAttention, TimeEmbedding

pytestmark = pytest.mark.numerics  # checked results: CI runs them on AVX2 code paths too

# --- the book's date-task shapes -----------------------------------------------------------
N, T_ENC, T_DEC, H = 128, 29, 11, 256
EMB_N, EMB_T, EMB_V = 128, 29, 59
EMB_DIMS = (16, 256)
WORDVEC = 16

TA_GROUP = f"book TimeAttention fwd+bwd (N={N}, T_enc={T_ENC}, T_dec={T_DEC}, H={H}, float32)"
TA_VARIANTS = ("loop", "vectorized", "numba")
EMB_VARIANTS = ("np.add.at", "vectorized", "numba")
STEP_VARIANTS = ("book", "fastattn-vectorized", "fastattn-numba")


def _emb_group(D):
    return f"book TimeEmbedding backward (N={EMB_N}, T={EMB_T}, V={EMB_V}, D={D}, float32)"


STEP_GROUP = f"book seq2seq train step (N={N}, wordvec={WORDVEC}, H={H}, date task)"


def _book_lstm():
    """tests/book_lstm.py, the test-only attention seq2seq, loaded by path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "book_lstm.py")
    spec = importlib.util.spec_from_file_location("book_lstm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- TimeAttention -------------------------------------------------------------------------

def _ta_inputs():
    rng = np.random.default_rng(0)
    hs_enc = rng.standard_normal((N, T_ENC, H)).astype(np.float32)  # (N, T_enc, H)
    hs_dec = (0.1 * rng.standard_normal((N, T_DEC, H))).astype(np.float32)  # (N, T_dec, H)
    dout = rng.standard_normal((N, T_DEC, H)).astype(np.float32)
    return hs_enc, hs_dec, dout


def _ta_case(variant):
    """fn() running one forward+backward of ``variant``, already checked and warmed up."""
    hs_enc, hs_dec, dout = _ta_inputs()
    layer = TimeAttention(backend=variant)

    def fn():
        out = layer.forward(hs_enc, hs_dec)
        return (out,) + layer.backward(dout)

    got = fn()  # warm-up (JIT compile) and the result to check
    # against the book's algorithm in float64 on the same inputs, within the error bound
    ref = TimeAttention(backend="loop")
    f64 = [x.astype(np.float64) for x in (hs_enc, hs_dec, dout)]
    want = (ref.forward(*f64[:2]),) + ref.backward(f64[2])
    assert_all_close(got, want, book_attention_bounds("TimeAttention", (hs_enc, hs_dec), dout),
                     ("out", "dhs_enc", "dhs_dec"), variant)
    return fn


# --- TimeEmbedding backward ----------------------------------------------------------------

def _emb_case(variant, D):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((EMB_V, D)).astype(np.float32)
    xs = rng.integers(0, EMB_V, size=(EMB_N, EMB_T))
    dout = rng.standard_normal((EMB_N, EMB_T, D)).astype(np.float32)
    ref = np.zeros((EMB_V, D))  # float64 scatter-add, the check
    np.add.at(ref, xs, dout.astype(np.float64))
    if variant == "np.add.at":
        dW = np.zeros_like(W)

        def fn():
            dW[...] = 0
            np.add.at(dW, xs, dout)  # the book's Embedding.backward, all steps at once
            return dW
    else:
        layer = TimeEmbedding(W, backend=variant)
        layer.forward(xs)

        def fn():
            layer.backward(dout)
            return layer.grads[0]

    assert_all_close([fn()], [ref], kernel_bounds("embedding_backward", (xs, dout, EMB_V)),
                     ["dW"], variant)  # also the warm-up
    return fn


# --- a whole training step -----------------------------------------------------------------

_STEP_KW = {
    "book": dict(backend="vectorized", attention_backend="loop", embedding="add.at"),
    "fastattn-vectorized": dict(backend="vectorized"),
    "fastattn-numba": dict(backend="numba"),
}
_step_data = {}


def _step_batch():
    if not _step_data:
        from dataset import sequence

        (x, t), _ = sequence.load_data("date.txt")
        _step_data["batch"] = (np.ascontiguousarray(x[:N, ::-1]), t[:N])  # reversed input
        _step_data["V"] = len(sequence.get_vocab()[0])
    return _step_data["batch"], _step_data["V"]


def _step_reference():
    """The book path's first loss and gradients in float64 and in float32 (the reference's own
    float32 error), from the same float32 weights; computed once."""
    if "ref" not in _step_data:
        (xs, ts), V = _step_batch()
        runs = []
        for dtype in (np.float64, np.float32):
            ref = _book_lstm().AttentionSeq2seq(V, WORDVEC, H, seed=0, dtype=dtype,
                                                **_STEP_KW["book"])
            w32 = _book_lstm().AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW["book"])
            for p, w in zip(ref.params, w32.params, strict=True):
                p[...] = w
            loss = ref.forward(xs, ts)
            ref.backward()
            runs.append(([loss], [g.copy() for g in ref.grads]))
        _step_data["ref"] = runs
    return _step_data["ref"]


def _step_case(variant):
    bl = _book_lstm()
    (xs, ts), V = _step_batch()
    model = bl.AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW[variant])
    optimizer = bl.adam(1e-3)

    def fn():
        loss = model.forward(xs, ts)
        model.backward()
        optimizer.update(model.params, model.grads)
        return loss

    # the check (and warm-up): the first loss and every gradient equal the book path's, to
    # a few times the book path's own float32 error
    (loss64, grads64), (loss32, grads32) = _step_reference()
    loss = model.forward(xs, ts)
    model.backward()
    got = [np.asarray([loss], dtype=np.float32)] + list(model.grads)
    for i, (g, r64, r32) in enumerate(zip(got, [loss64] + grads64, [loss32] + grads32,
                                           strict=True)):
        assert_within_float32_error(g, np.reshape(r64, np.shape(g)), np.reshape(r32, np.shape(g)),
                                    err_msg=f"{variant} {'loss' if i == 0 else f'grads[{i - 1}]'}")
    return fn


# --- pytest-benchmark ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", TA_VARIANTS)
def test_time_attention_forward_backward(benchmark, variant):
    benchmark.group = TA_GROUP
    benchmark.extra_info["variant"] = variant
    benchmark(_ta_case(variant))


@pytest.mark.parametrize("D", EMB_DIMS)
@pytest.mark.parametrize("variant", EMB_VARIANTS)
def test_time_embedding_backward(benchmark, variant, D):
    benchmark.group = _emb_group(D)
    benchmark.extra_info["variant"] = variant
    benchmark(_emb_case(variant, D))


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_seq2seq_train_step(benchmark, variant):
    benchmark.group = STEP_GROUP
    benchmark.extra_info["variant"] = variant
    benchmark(_step_case(variant))


# --- interleaved ratios (python bench/bench_book_attention.py) ----------------------------

def _interleaved(cases, rounds):
    """Median seconds of each case, timed in alternation, ``rounds`` times each."""
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _report(title, medians, reference):
    print(f"\n{title}")
    base = medians[reference]
    for name, t in medians.items():
        print(f"  {name:<22} {t * 1e3:9.2f} ms   {base / t:6.2f}x vs {reference}")


def main():
    _report(TA_GROUP, _interleaved({v: _ta_case(v) for v in TA_VARIANTS}, 30), "loop")
    for D in EMB_DIMS:
        _report(_emb_group(D),
                _interleaved({v: _emb_case(v, D) for v in EMB_VARIANTS}, 100), "np.add.at")
    _report(STEP_GROUP, _interleaved({v: _step_case(v) for v in STEP_VARIANTS}, 7), "book")


if __name__ == "__main__":
    main()
