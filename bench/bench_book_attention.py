"""Benchmarks of the book's layers: what a user of "Deep Learning from Scratch 2" gains by
changing imports.

Groups (each compares its variants side by side; every variant is checked against the
reference in float64 on the very call that is then warmed up and timed, ``check_then_time`` of
``bench/conftest.py``, so that JIT compilation is not counted):

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

    python -m pytest bench/bench_book_attention.py --benchmark-only      # timings
    python -m pytest bench/bench_book_attention.py --benchmark-disable  # as plain tests
    fastattn bench book_attention                                       # ratios
"""

from __future__ import annotations

import functools

import book_lstm
import numpy as np
import pytest
from helpers import (
    assert_all_close,
    assert_all_within_float32_error,
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


# --- TimeAttention -------------------------------------------------------------------------

def _ta_inputs():
    rng = np.random.default_rng(0)
    hs_enc = rng.standard_normal((N, T_ENC, H)).astype(np.float32)  # (N, T_enc, H)
    hs_dec = (0.1 * rng.standard_normal((N, T_DEC, H))).astype(np.float32)  # (N, T_dec, H)
    dout = rng.standard_normal((N, T_DEC, H)).astype(np.float32)
    return hs_enc, hs_dec, dout


def _ta_case(variant):
    """(fn, check): fn() runs one forward+backward of ``variant``; check(its result)."""
    hs_enc, hs_dec, dout = _ta_inputs()
    layer = TimeAttention(backend=variant)

    def fn():
        out = layer.forward(hs_enc, hs_dec)
        return (out,) + layer.backward(dout)

    def check(got):  # the book's algorithm in float64 on the same inputs, within the bound
        ref = TimeAttention(backend="loop")
        f64 = [x.astype(np.float64) for x in (hs_enc, hs_dec, dout)]
        want = (ref.forward(*f64[:2]),) + ref.backward(f64[2])
        assert_all_close(got, want, book_attention_bounds("TimeAttention", (hs_enc, hs_dec),
                                                          dout), ("out", "dhs_enc", "dhs_dec"),
                         variant)

    return fn, check


# --- TimeEmbedding backward ----------------------------------------------------------------

def _emb_case(variant, D):
    """(fn, check) for one backward of the embedding (``variant``) at width D."""
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

    def check(dW):
        assert_all_close([dW], [ref], kernel_bounds("embedding_backward", (xs, dout, EMB_V)),
                         ["dW"], variant)

    return fn, check


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
            ref = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, dtype=dtype,
                                                **_STEP_KW["book"])
            w32 = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW["book"])
            for p, w in zip(ref.params, w32.params, strict=True):
                p[...] = w
            loss = ref.forward(xs, ts)
            ref.backward()
            runs.append(([loss], [g.copy() for g in ref.grads]))
        _step_data["ref"] = runs
    return _step_data["ref"]


def _step_case(variant):
    """(fn, check): fn() runs one training step of ``variant`` and returns the loss; check(the
    first loss) compares it and every gradient of that step with the book path's."""
    (xs, ts), V = _step_batch()
    model = book_lstm.AttentionSeq2seq(V, WORDVEC, H, seed=0, **_STEP_KW[variant])
    fn = functools.partial(book_lstm.train_step, model, xs, ts, book_lstm.adam(1e-3))

    def check(loss):  # the grads of the first step were taken at the book path's weights
        (loss64, grads64), (loss32, grads32) = _step_reference()
        got = [np.asarray([loss], dtype=np.float32)] + list(model.grads)
        names = ["loss"] + [f"grads[{i}]" for i in range(len(model.grads))]
        assert_all_within_float32_error(got, [np.reshape(loss64, 1)] + grads64,
                                        [np.reshape(loss32, 1)] + grads32, names,
                                        err_msg=variant)

    return fn, check


# --- pytest-benchmark ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", TA_VARIANTS)
def test_time_attention_forward_backward(benchmark, check_then_time, variant):
    benchmark.group = TA_GROUP
    benchmark.extra_info["variant"] = variant
    fn, check = _ta_case(variant)
    check_then_time(fn, check=check)


@pytest.mark.parametrize("D", EMB_DIMS)
@pytest.mark.parametrize("variant", EMB_VARIANTS)
def test_time_embedding_backward(benchmark, check_then_time, variant, D):
    benchmark.group = _emb_group(D)
    benchmark.extra_info["variant"] = variant
    fn, check = _emb_case(variant, D)
    check_then_time(fn, check=check)


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_seq2seq_train_step(benchmark, check_then_time, variant):
    benchmark.group = STEP_GROUP
    benchmark.extra_info["variant"] = variant
    fn, check = _step_case(variant)
    check_then_time(fn, check=check)
