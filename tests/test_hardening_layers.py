"""Bad input to every public layer and to the Transformer model.

* Token ids (the embeddings, the one-hot query/value layers, the seed's self-attention layers
  and the model's forward/generate/generate_batch/cross_attention/translate): negative ids,
  ids >= V, float, bool, complex, object and string ids raise before any kernel runs.
  Decision: a dtype that is not an integer raises TypeError, even when the values are whole
  numbers (``[[0.0, 1.0]]``): ids are never rounded or cast; an integer id outside [0, V)
  raises ValueError.
* Every public class with forward/backward (one table, checked against ``fastattn._LAZY``):
  backward before forward raises RuntimeError; a forward that raised leaves the layer as if it
  had not run; a dout of the wrong shape raises ValueError before any kernel runs; weights
  (passed in, or made from ``dtype=``) of an unsupported dtype raise TypeError, and so do float
  inputs of one.

A "tripwire" replaces ``fastattn._backend.kernel`` and ``kernels.get`` with functions whose
kernels fail the test if they are ever called.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import SMALL_VOCAB, ids, rand

import fastattn
from fastattn import _backend, _checks, kernels
from fastattn._layer import make_rng
from fastattn.attention import MultiHeadAttention
from fastattn.book_attention import Attention, AttentionWeight, TimeAttention, WeightSum
from fastattn.layers import (
    Affine,
    Embedding,
    Softmax,
    SoftmaxWithLoss,
    TimeAffine,
    TimeDropout,
    TimeEmbedding,
    TimeSoftmaxWithLoss,
)
from fastattn.recurrent import GRU, LSTM, RNN, TimeBiLSTM, TimeGRU, TimeLSTM, TimeRNN
from fastattn.self_attention import (
    CompatibilityFunction,
    TimeKeyLayer,
    TimeQueryLayer,
    TimeValueLayer,
    WeightedValue,
)
from fastattn.transformer import (
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    LayerNorm,
    PositionalEncoding,
    TransformerConfig,
    TransformerSeq2seq,
)
from fastattn.vocab import attach_vocab

F64 = np.float64
V = SMALL_VOCAB  # the vocabulary of every id-taking layer here


@pytest.fixture
def tripwire(monkeypatch):
    """Make every kernel fail the test if it runs; returns the list of kernels that ran."""
    ran = []

    def kernel(name, backend=None):
        def run(*args, **kwargs):
            ran.append(name)
            raise AssertionError(f"kernel {name} ran on bad input")
        return run

    monkeypatch.setattr(_backend, "kernel", kernel)
    monkeypatch.setattr(kernels, "get", kernel)
    return ran


def tiny_model(**kw):
    return TransformerSeq2seq(V, d_model=4, n_heads=2, n_layers=1, d_ff=6, max_len=5,
                              backend="vectorized", dtype=F64, seed=0, **kw)


CHARS = "_ 0123"  # a vocabulary of V characters for translate


def model_with_vocab():
    model = tiny_model()
    attach_vocab(model, {c: i for i, c in enumerate(CHARS)}, 4, 3)
    return model


# ============================================================================ token ids

BAD_IDS = [  # (ids, expected error)
    pytest.param(np.array([[0, -1]]), ValueError, id="negative"),
    pytest.param(np.array([[0, V]]), ValueError, id="equal-to-V"),
    pytest.param(np.array([[0, 2**62]]), ValueError, id="huge"),
    pytest.param(np.array([[0, 2**64 - 1]], np.uint64), ValueError, id="uint64-max"),
    pytest.param(np.array([[0, -3]], np.int8), ValueError, id="int8-negative"),
    pytest.param([[0, 99]], ValueError, id="list-out-of-range"),
    pytest.param(np.array([[0.0, 1.0]]), TypeError, id="float-whole-numbers"),
    pytest.param(np.array([[0.5, 1.0]]), TypeError, id="float-fraction"),
    pytest.param(np.array([[0, 1]], np.float32), TypeError, id="float32"),
    pytest.param(np.array([[True, False]]), TypeError, id="bool"),
    pytest.param(np.array([[0, 1]], np.complex128), TypeError, id="complex"),
    pytest.param(np.array([[0, 1]], dtype=object), TypeError, id="object"),
    pytest.param(np.array([["0", "1"]]), TypeError, id="strings"),
    pytest.param([[0.0, 1.0]], TypeError, id="list-of-floats"),
]


def _model_call(method):
    def call(x):
        model = tiny_model()
        good = ids(1, 2)
        if method == "forward-xs":
            return model.forward(x, ids(1, 3))
        if method == "forward-ts":
            return model.forward(good, x)
        if method == "generate":
            return model.generate(x, 0, 3)
        if method == "generate_batch":
            return model.generate_batch(x, 0, 3)
        if method == "generate-start_id":
            return model.generate(good, np.asarray(x).reshape(-1)[-1:], 3)  # (1,), same dtype
        if method == "cross_attention":
            return model.cross_attention(good, x)
        raise AssertionError(method)
    return call


ID_TAKERS = {  # name -> call(ids): builds the layer/model and passes it the ids
    "Embedding": lambda x: Embedding(rand(V, 3)).forward(x),
    "TimeEmbedding": lambda x: TimeEmbedding(rand(V, 3)).forward(x),
    "TimeKeyLayer": lambda x: TimeKeyLayer(V, 4, 3, dtype=F64).forward(x),
    "TimeQueryLayer": lambda x: TimeQueryLayer(V, 3, dtype=F64).forward(x),
    "TimeValueLayer": lambda x: TimeValueLayer(V, 3, dtype=F64).forward(x),
    "CompatibilityFunction": lambda x: CompatibilityFunction(V, 4, 3, dtype=F64).forward(x),
    "WeightedValue": lambda x: WeightedValue(V, 3, dtype=F64).forward(
        x, np.full((1, 2, 2), 0.5)),
    **{f"TransformerSeq2seq.{m}": _model_call(m)
       for m in ("forward-xs", "forward-ts", "generate", "generate_batch",
                 "generate-start_id", "cross_attention")},
}


@pytest.mark.parametrize("bad, err", BAD_IDS)
@pytest.mark.parametrize("taker", sorted(ID_TAKERS))
def test_bad_token_ids_raise_before_any_kernel(taker, bad, err, tripwire):
    with pytest.raises(err, match="id|xs|ts|ys|idx"):
        ID_TAKERS[taker](bad)
    assert tripwire == []


@pytest.mark.parametrize("taker", sorted(t for t in ID_TAKERS if not t.endswith("start_id")))
def test_ragged_lists_of_token_ids_raise_value_error_naming_them(taker, tripwire):
    """NumPy's own error ('setting an array element with a sequence') named nothing."""
    with pytest.raises(ValueError, match=r"^(xs|ts|ys|idx) must be an array, got nested"):
        ID_TAKERS[taker]([[0, 1], [2]])
    assert tripwire == []


@pytest.mark.parametrize("taker", sorted(ID_TAKERS))
def test_good_token_ids_of_any_integer_dtype_are_accepted(taker):
    """The same calls with valid ids of other integer dtypes run (so the errors above come from
    the ids, not from the call)."""
    for dt in (np.int64, np.int32, np.uint8):
        ID_TAKERS[taker](np.array([[1, 2]], dt))


@pytest.mark.parametrize("questions, err, match", [
    (["0 #"], ValueError, "'#'"),
    (["0" * 5], ValueError, "width"),
    ([""], ValueError, "empty"),
    ([3], TypeError, "str"),
    ("01", TypeError, "list"),
])
def test_translate_rejects_bad_questions_before_any_kernel(questions, err, match, tripwire):
    model = model_with_vocab()
    with pytest.raises(err, match=match):
        model.translate(questions)
    assert tripwire == []


@pytest.mark.parametrize("loss, x, t", [
    (SoftmaxWithLoss, rand(2, V), np.array([0, V])),
    (SoftmaxWithLoss, rand(2, V), np.array([True, False])),
    (TimeSoftmaxWithLoss, rand(1, 2, V), np.array([[0, V]])),
    (TimeSoftmaxWithLoss, rand(1, 2, V), np.array([[True, False]])),
    (TimeSoftmaxWithLoss, rand(1, 2, V), np.array([[0.0, 1.0]])),
])
def test_loss_targets_out_of_range_or_not_integers_raise_before_any_kernel(loss, x, t,
                                                                           tripwire):
    with pytest.raises((TypeError, ValueError), match="t"):
        loss().forward(x, t)
    assert tripwire == []


@pytest.mark.parametrize("dtype", ["U1", "S1", object, np.complex128, "M8[D]"],
                         ids=["str", "bytes", "object", "complex", "datetime"])
@pytest.mark.parametrize("loss, x, name", [(SoftmaxWithLoss, rand(2, V), "t"),
                                           (TimeSoftmaxWithLoss, rand(1, 2, V), "ts")],
                         ids=["SoftmaxWithLoss", "TimeSoftmaxWithLoss"])
def test_one_hot_targets_that_are_not_numbers_raise_type_error_naming_them(loss, x, name,
                                                                           dtype, tripwire):
    """Strings (and objects, complex numbers, dates) of the one-hot shape went through argmax
    and gave a loss."""
    one_hot = np.zeros(x.shape, dtype=np.int64)
    one_hot[..., 1] = 1
    with pytest.raises(TypeError, match=f"^{name} as one-hot targets must be numbers"):
        loss().forward(x, one_hot.astype(dtype))
    assert tripwire == []


def test_one_hot_targets_of_floats_ints_and_bools_give_the_ids_loss():
    x = rand(2, V)
    t = np.array([1, 3])
    want = SoftmaxWithLoss().forward(x, t)
    for one_hot in (np.eye(V)[t], np.eye(V, dtype=np.int32)[t], np.eye(V, dtype=bool)[t]):
        assert SoftmaxWithLoss().forward(x, one_hot) == want
        assert TimeSoftmaxWithLoss().forward(x[None], one_hot[None]) == pytest.approx(
            want, rel=1e-12)


def test_generate_sample_size_and_start_id_are_checked(tripwire):
    model = tiny_model()
    with pytest.raises(TypeError, match="sample_size"):
        model.generate_batch(ids(1, 2), 0, 2.5)
    with pytest.raises(ValueError, match="sample_size"):
        model.generate_batch(ids(1, 2), 0, -1)
    with pytest.raises(TypeError, match="start_id"):
        model.generate(ids(1, 2), 1.5, 2)  # was silently truncated to 1
    with pytest.raises(TypeError, match="start_id"):
        model.generate(ids(1, 2), True, 2)
    assert tripwire == []


@pytest.mark.parametrize("ratio, err", [
    (10**400, ValueError),  # was an OverflowError
    (float("nan"), ValueError), (-0.1, ValueError), (1, ValueError),
    (None, TypeError), ("abc", TypeError), ([0.5], TypeError),
    ("0.5", TypeError),  # was silently float("0.5")
    (True, TypeError), (np.array([0.5]), TypeError), (np.array(1.5), ValueError),
], ids=["int-beyond-float", "nan", "negative", "one", "none", "str", "list", "numeric-str",
        "bool", "array", "0d-array-out-of-range"])
def test_time_dropout_ratio_must_be_a_real_number_in_0_1(ratio, err):
    with pytest.raises(err, match="^dropout_ratio must be"):
        TimeDropout(ratio)
    assert TimeDropout(np.float32(0.25)).dropout_ratio == 0.25


def test_a_0d_array_setting_is_taken_as_the_number_it_holds():
    """A setting read back with np.load is a 0-d array: the book's TimeDropout and float()
    took it (as SGD's lr, clip_grads' max_norm and attention's scale still do)."""
    assert TimeDropout(np.array(0.5)).dropout_ratio == 0.5
    assert TimeDropout(np.array(0.25, np.float32), seed=0).dropout_ratio == 0.25
    assert LayerNorm(4, np.array(1e-5)).eps == 1e-5
    assert MultiHeadAttention(4, 2, dropout=np.array(0.125), seed=0).dropout == 0.125
    assert TransformerConfig(V, dropout=np.array(0.125)).dropout == 0.125


@pytest.mark.parametrize("eps, err", [
    (0.0, ValueError),  # constant rows: a ZeroDivisionError from the numba kernel
    (1e-50, ValueError),  # 0 in float32: the same
    (-1e-5, ValueError),  # NaN outputs
    (float("nan"), ValueError), (float("inf"), ValueError),
    (10**400, ValueError),  # was an OverflowError
    ("1e-5", TypeError), (None, TypeError), (True, TypeError), (1j, TypeError),
], ids=["zero", "zero-in-float32", "negative", "nan", "inf", "int-beyond-float", "str", "none",
        "bool", "complex"])
def test_layernorm_eps_must_be_positive_in_its_dtype(eps, err):
    with pytest.raises(err, match="^eps must be"):
        LayerNorm(4, eps, dtype=np.float32)
    layer = LayerNorm(4, 1e-50, dtype=F64)  # > 0 in float64
    assert np.isfinite(layer.forward(np.ones((1, 2, 4)))).all()


BAD_SEEDS = [("x", TypeError), (1.5, TypeError), ([1, 2, "a"], ValueError), (-1, ValueError),
             (np.float64(2.0), TypeError), (object(), TypeError)]
SEED_IDS = ["str", "float", "list-with-str", "negative", "np-float", "object"]
SEED_TAKERS = {  # name -> make(seed)
    "make_rng": lambda s: make_rng(s),
    "MultiHeadAttention": lambda s: MultiHeadAttention(4, 2, seed=s),
    "PositionalEncoding": lambda s: PositionalEncoding(8, 4, seed=s),
    "FeedForward": lambda s: FeedForward(4, 6, seed=s),
    "EncoderBlock": lambda s: EncoderBlock(4, 2, 6, seed=s),
    "TransformerSeq2seq": lambda s: TransformerSeq2seq(V, d_model=4, n_heads=2, n_layers=1,
                                                       d_ff=6, max_len=5, seed=s),
    "TimeKeyLayer": lambda s: TimeKeyLayer(V, 3, 2, seed=s),
    "TimeQueryLayer": lambda s: TimeQueryLayer(V, 2, seed=s),
    "CompatibilityFunction": lambda s: CompatibilityFunction(V, 3, 2, seed=s),
    "TimeDropout": lambda s: TimeDropout(0.5, seed=s),
}


@pytest.mark.parametrize("seed, err", BAD_SEEDS, ids=SEED_IDS)
@pytest.mark.parametrize("taker", sorted(SEED_TAKERS))
def test_a_bad_seed_raises_naming_seed(taker, seed, err):
    """NumPy's own errors ('SeedSequence expects int or sequence of ints for entropy',
    'unrecognized seed string', 'expected non-negative integer') named no argument."""
    with pytest.raises(err, match="^seed must be None, an int >= 0"):
        SEED_TAKERS[taker](seed)
    SEED_TAKERS[taker](np.int64(3))  # NumPy integers are seeds


@pytest.mark.parametrize("width, err", [(float("inf"), TypeError), (3.5, TypeError),
                                        (True, TypeError), (None, TypeError), ("4", TypeError),
                                        (0, ValueError)],
                         ids=["inf", "fraction", "bool", "none", "str", "zero"])
def test_attach_vocab_widths_must_be_positive_ints(width, err):
    """inf was an OverflowError, 3.5 and True were silently 3 and 1."""
    c2i = {c: i for i, c in enumerate(CHARS)}
    for widths, name in (((width, 3), "question_width"), ((4, width), "answer_width")):
        with pytest.raises(err, match=f"^{name} must be"):
            attach_vocab(tiny_model(), c2i, *widths)
    assert attach_vocab(tiny_model(), c2i, np.int64(4), 3).question_width == 4


def test_attach_vocab_takes_0d_arrays_as_the_widths_they_hold():
    """int() took them before the widths were checked (widths read back with np.load)."""
    c2i = {c: i for i, c in enumerate(CHARS)}
    model = attach_vocab(tiny_model(), c2i, np.array(4), np.array(3, np.int32))
    assert (model.question_width, model.answer_width) == (4, 3)
    assert type(model.question_width) is int
    with pytest.raises(TypeError, match="^question_width must be"):
        attach_vocab(tiny_model(), c2i, np.array(3.5), 3)


@pytest.mark.parametrize("bad", [0.5, 0.0, "x", "0", True, None, np.float64(0.0)],
                         ids=["fraction", "whole-float", "str", "numeric-str", "bool", "none",
                              "np-float"])
def test_char_to_id_ids_must_be_ints(bad):
    """int() made 0.5 the id 0 and True the id 1 silently; "x" and None were int()'s errors,
    naming nothing."""
    c2i = {c: i for i, c in enumerate(CHARS)}
    if isinstance(bad, bool):
        c2i[CHARS[1]] = bad  # in place of the id 1
    else:
        c2i[CHARS[0]] = bad  # in place of the id 0
    with pytest.raises(TypeError, match="^char_to_id must map characters to int ids"):
        attach_vocab(tiny_model(), c2i, 4, 3)
    ok = {c: np.int32(i) for i, c in enumerate(CHARS)}
    assert attach_vocab(tiny_model(), ok, 4, 3).char_to_id == {c: i for i, c in
                                                               enumerate(CHARS)}


def test_cross_attention_layer_and_start_ids_are_checked_naming_them(tripwire):
    """An out-of-range layer was an IndexError, a float one a bare 'list indices' TypeError;
    start ids of the wrong count a NumPy broadcasting error that named nothing."""
    model = tiny_model()  # one decoder block
    for layer in (1, -2, 5):
        with pytest.raises(ValueError, match=r"^layer must be in \[-1, 1\)"):
            model.cross_attention(ids(1, 2), ids(1, 2), layer=layer)
    for layer in (1.5, None, True):
        with pytest.raises(TypeError, match="^layer must be an int"):
            model.cross_attention(ids(1, 2), ids(1, 2), layer=layer)
    for start in (np.array([0, 1, 1]), np.array([[0], [1]]), np.zeros((1, 2), int)):
        with pytest.raises(ValueError, match="^start_id must be one id or 2 ids"):
            model.generate_batch(ids(2, 2), start, 2)
    with pytest.raises(ValueError, match="^start_id must be one id or 1 ids"):
        model.generate(ids(1, 2), np.array([0, 1]), 2)
    assert tripwire == []


def test_positional_offset_must_be_a_non_negative_int():
    pe = PositionalEncoding(8, 4, dtype=F64, seed=0)
    x = rand(1, 3, 4)
    for offset in (-5, -1, 1.0, True):  # -5 would have read the table's last rows
        with pytest.raises(ValueError, match="offset"):
            pe.forward(x, offset)
    np.testing.assert_array_equal(pe.forward(x, 2), x + pe.params[0][2:5])


@pytest.mark.parametrize("loss, args", [
    (SoftmaxWithLoss, (rand(2, 3), np.array([0, 2]))),
    (TimeSoftmaxWithLoss, (rand(1, 2, 3), np.array([[0, 2]]))),
])
def test_loss_dout_must_be_one_real_number(loss, args):
    layer = loss()
    layer.forward(*args)
    ref = layer.backward(1.0)
    np.testing.assert_array_equal(layer.backward(np.float32(2.0)), 2 * ref)
    for bad in (np.ones(3), np.ones(1), [1.0, 2.0]):  # ones(3) used to broadcast over C = 3
        with pytest.raises(ValueError, match="dout"):
            layer.backward(bad)
    for bad in ("1", None, 1j):
        with pytest.raises(TypeError, match="dout"):
            layer.backward(bad)


# ============================================================================ the layer table


@dataclass
class Case:
    """How to exercise one public layer class (float64, small shapes)."""

    make: Callable  # () -> layer
    forward: Callable  # layer -> output (runs forward with valid input)
    fail: Callable  # layer -> raises from inside forward (bad input)
    weights: Callable | None = None  # bad dtype -> constructs the layer with such weights
    float_input: Callable | None = None  # (layer, bad dtype) -> forward with such inputs
    dout_name: str = "dout"


def _x(*shape):
    return rand(*shape)


def _as(x, dt):
    return np.asarray(x).astype(dt)


def _w_affine(cls):
    return lambda dt: cls(np.zeros((3, 2), dt), np.zeros(2, dt))


def _w_recurrent(k, dt=F64):
    """Wx (3, kH), Wh (H, kH), b (kH,) of a recurrent layer with k gates, H = 2."""
    return [_as(rand(3, 2 * k), dt), _as(rand(2, 2 * k, seed=1), dt), _as(rand(2 * k), dt)]


def _step(m, k, x, rows=2):
    """One step of a recurrent cell (k gates) from random states of ``rows`` rows; the LSTM's
    h_next only."""
    out = m.forward(x, *[_x(rows, 2)] * (2 if k == 4 else 1))
    return out[0] if k == 4 else out


def _dtype_arg(cls, *args):
    return lambda dt: cls(*args, dtype=dt)


CASES = {
    # the book's base layers
    "Affine": Case(
        lambda: Affine(rand(3, 2), rand(2)), lambda m: m.forward(_x(4, 3)),
        lambda m: m.forward(_x(4, 5)), _w_affine(Affine),
        lambda m, dt: m.forward(_as(_x(4, 3), dt))),
    "TimeAffine": Case(
        lambda: TimeAffine(rand(3, 2), rand(2)), lambda m: m.forward(_x(2, 4, 3)),
        lambda m: m.forward(_x(2, 4, 5)), _w_affine(TimeAffine),
        lambda m, dt: m.forward(_as(_x(2, 4, 3), dt))),
    "Embedding": Case(
        lambda: Embedding(rand(V, 3)), lambda m: m.forward(np.array([0, 5, 5, 2])),
        lambda m: m.forward(np.array([0, V])), lambda dt: Embedding(np.zeros((V, 3), dt))),
    "TimeEmbedding": Case(
        lambda: TimeEmbedding(rand(V, 3)), lambda m: m.forward(ids()),
        lambda m: m.forward(-ids() - 1), lambda dt: TimeEmbedding(np.zeros((V, 3), dt))),
    "Softmax": Case(
        Softmax, lambda m: m.forward(_x(2, 3, 4)), lambda m: m.forward(np.zeros((2, 0))),
        float_input=lambda m, dt: m.forward(_as(_x(2, 3), dt))),
    "SoftmaxWithLoss": Case(
        SoftmaxWithLoss, lambda m: m.forward(_x(4, 3), np.array([0, 1, 2, 1])),
        lambda m: m.forward(_x(4, 3), np.array([0, 1, 2, 3])),
        float_input=lambda m, dt: m.forward(_as(_x(4, 3), dt), np.array([0, 1, 2, 1]))),
    "TimeSoftmaxWithLoss": Case(
        TimeSoftmaxWithLoss, lambda m: m.forward(_x(2, 3, 4), np.array([[0, 1, 2], [3, -1, 0]])),
        lambda m: m.forward(_x(2, 3, 4), np.array([[0, 1, 2], [3, 4, 0]])),
        float_input=lambda m, dt: m.forward(_as(_x(2, 3, 4), dt), np.zeros((2, 3), int))),
    "TimeDropout": Case(
        lambda: TimeDropout(0.5, seed=0), lambda m: m.forward(_x(2, 3, 4)),
        lambda m: m.forward(np.zeros((2, 3), np.int64)),
        float_input=lambda m, dt: m.forward(_as(_x(2, 3), dt))),
    # the seed notebook's self-attention
    "TimeKeyLayer": Case(
        lambda: TimeKeyLayer(V, 4, 3, dtype=F64, seed=0), lambda m: m.forward(ids()),
        lambda m: m.forward(ids() + V), _dtype_arg(TimeKeyLayer, V, 4, 3)),
    "TimeQueryLayer": Case(
        lambda: TimeQueryLayer(V, 3, dtype=F64, seed=0), lambda m: m.forward(ids()),
        lambda m: m.forward(ids() * 1.0), _dtype_arg(TimeQueryLayer, V, 3),
        lambda m, dt: m.forward(_as(np.eye(V)[ids()], dt))),
    "TimeValueLayer": Case(
        lambda: TimeValueLayer(V, 3, dtype=F64, seed=0), lambda m: m.forward(np.eye(V)[ids()]),
        lambda m: m.forward(np.eye(V + 1)[ids()]), _dtype_arg(TimeValueLayer, V, 3),
        lambda m, dt: m.forward(_as(np.eye(V)[ids()], dt))),
    "CompatibilityFunction": Case(
        lambda: CompatibilityFunction(V, 4, 3, dtype=F64, seed=0), lambda m: m.forward(ids()),
        lambda m: m.forward(ids() == 1), _dtype_arg(CompatibilityFunction, V, 4, 3),
        dout_name="dscore"),
    "WeightedValue": Case(
        lambda: WeightedValue(V, 3, dtype=F64, seed=0),
        lambda m: m.forward(ids(), np.full((2, 4, 3), 1 / 3)),
        lambda m: m.forward(ids(), np.full((2, 4, 4), 1 / 4)), _dtype_arg(WeightedValue, V, 3),
        lambda m, dt: m.forward(ids(), _as(np.full((2, 4, 3), 1 / 3), dt)), dout_name="dZ"),
    # the book's chapter 8 attention
    "WeightSum": Case(
        WeightSum, lambda m: m.forward(_x(2, 3, 4), np.full((2, 3), 1 / 3)),
        lambda m: m.forward(_x(2, 3, 4), np.full((2, 4), 1 / 4)),
        float_input=lambda m, dt: m.forward(_as(_x(2, 3, 4), dt), _as(_x(2, 3), dt)),
        dout_name="dc"),
    "AttentionWeight": Case(
        AttentionWeight, lambda m: m.forward(_x(2, 3, 4), _x(2, 4)),
        lambda m: m.forward(_x(2, 3, 4), _x(2, 5)),
        float_input=lambda m, dt: m.forward(_as(_x(2, 3, 4), dt), _as(_x(2, 4), dt)),
        dout_name="da"),
    "Attention": Case(
        Attention, lambda m: m.forward(_x(2, 3, 4), _x(2, 4)),
        lambda m: m.forward(_x(2, 3, 4), _x(3, 4)),
        float_input=lambda m, dt: m.forward(_as(_x(2, 3, 4), dt), _as(_x(2, 4), dt))),
    "TimeAttention": Case(
        TimeAttention, lambda m: m.forward(_x(2, 3, 4), _x(2, 5, 4)),
        lambda m: m.forward(_x(2, 3, 4), _x(2, 5, 3)),
        float_input=lambda m, dt: m.forward(_as(_x(2, 3, 4), dt), _as(_x(2, 5, 4), dt))),
    # the book's recurrent layers
    **{cls.__name__: Case(
        lambda cls=cls, k=k: cls(*_w_recurrent(k)), lambda m: m.forward(_x(2, 3, 3)),
        lambda m: m.forward(_x(2, 3, 4)),  # D does not match Wx
        lambda dt, cls=cls, k=k: cls(*_w_recurrent(k, dt)),
        lambda m, dt: m.forward(_as(_x(2, 3, 3), dt)), dout_name="dhs")
       for cls, k in ((TimeRNN, 1), (TimeLSTM, 4), (TimeGRU, 3))},
    **{cls.__name__: Case(
        lambda cls=cls, k=k: cls(*_w_recurrent(k)),
        lambda m, k=k: _step(m, k, _x(2, 3)),  # LSTM: h_next, the output backward(dh) takes
        lambda m, k=k: _step(m, k, _x(2, 3), rows=3),  # a state of 3 rows for 2 inputs
        lambda dt, cls=cls, k=k: cls(*_w_recurrent(k, dt)),
        lambda m, dt, k=k: _step(m, k, _as(_x(2, 3), dt)), dout_name="dh_next")
       for cls, k in ((RNN, 1), (LSTM, 4), (GRU, 3))},
    "TimeBiLSTM": Case(
        lambda: TimeBiLSTM(*_w_recurrent(4), *_w_recurrent(4)), lambda m: m.forward(_x(2, 3, 3)),
        lambda m: m.forward(_x(2, 3)),
        lambda dt: TimeBiLSTM(*_w_recurrent(4, dt), *_w_recurrent(4, dt)),
        lambda m, dt: m.forward(_as(_x(2, 3, 3), dt)), dout_name="dhs"),
    # the Transformer
    "LayerNorm": Case(
        lambda: LayerNorm(4, dtype=F64), lambda m: m.forward(_x(2, 3, 4)),
        lambda m: m.forward(_x(2, 3, 5)), _dtype_arg(LayerNorm, 4),
        lambda m, dt: m.forward(_as(_x(2, 3, 4), dt))),
    "PositionalEncoding": Case(
        lambda: PositionalEncoding(8, 4, dtype=F64, seed=0), lambda m: m.forward(_x(2, 3, 4)),
        lambda m: m.forward(_x(2, 9, 4)), _dtype_arg(PositionalEncoding, 8, 4),
        lambda m, dt: m.forward(_as(_x(2, 3, 4), dt))),
    "MultiHeadAttention": Case(
        lambda: MultiHeadAttention(4, 2, dtype=F64, seed=0), lambda m: m.forward(_x(2, 3, 4)),
        lambda m: m.forward(_x(2, 3, 4), mask=np.ones((2, 4, 3), bool)),
        _dtype_arg(MultiHeadAttention, 4, 2), lambda m, dt: m.forward(_as(_x(2, 3, 4), dt))),
    "FeedForward": Case(
        lambda: FeedForward(4, 6, dtype=F64, seed=0), lambda m: m.forward(_x(2, 3, 4)),
        lambda m: m.forward(_x(2, 3, 6)), _dtype_arg(FeedForward, 4, 6),
        lambda m, dt: m.forward(_as(_x(2, 3, 4), dt))),
    "EncoderBlock": Case(
        lambda: EncoderBlock(4, 2, 6, dtype=F64, seed=0), lambda m: m.forward(_x(2, 3, 4)),
        lambda m: m.forward(_x(2, 3, 4), mask=np.ones((2, 3, 2), bool)),  # fails in attention
        _dtype_arg(EncoderBlock, 4, 2, 6), lambda m, dt: m.forward(_as(_x(2, 3, 4), dt))),
    "DecoderBlock": Case(
        lambda: DecoderBlock(4, 2, 6, dtype=F64, seed=0),
        lambda m: m.forward(_x(2, 3, 4), _x(2, 5, 4)),
        lambda m: m.forward(_x(2, 3, 4), _x(1, 5, 4)),  # fails in cross-attention
        _dtype_arg(DecoderBlock, 4, 2, 6),
        lambda m, dt: m.forward(_as(_x(2, 3, 4), dt), _as(_x(2, 5, 4), dt))),
    "TransformerSeq2seq": Case(
        tiny_model, lambda m: m.forward(ids(2, 4), ids(2, 3, seed=1)),
        lambda m: m.forward(ids(2, 4), ids(2, 6)),  # ts longer than max_len
        _dtype_arg(TransformerSeq2seq, V)),
}

BAD_DTYPES = [t for t in (np.int32, np.int64, np.uint8, bool, np.float16, np.complex64,
                          np.complex128, object, np.longdouble, np.dtype(">f8"))
              if np.dtype(t) not in _checks.FLOAT_DTYPES]
DTYPE_IDS = [np.dtype(t).str if np.dtype(t).byteorder == ">" else np.dtype(t).name
             for t in BAD_DTYPES]
# inputs (unlike weights, which are kept by reference) may be non-native floats: not here
BAD_INPUT_DTYPES = [t for t in BAD_DTYPES if np.dtype(t).byteorder != ">"]


def _public_layer_classes():
    out = set()
    for name in fastattn._LAZY:
        obj = getattr(fastattn, name)
        if inspect.isclass(obj) and hasattr(obj, "forward") and hasattr(obj, "backward"):
            out.add(name)
    return out


def test_the_table_covers_every_public_layer_class():
    assert set(CASES) == _public_layer_classes()


def _bad_douts(out):
    """Arrays of shapes that differ from ``out``'s: one axis longer, one axis fewer or more,
    transposed; for a loss (a float), non-scalars."""
    shape = np.shape(out)
    if shape == ():
        return [np.ones(3), np.ones((1, 1))]
    bad = [shape[:-1] + (shape[-1] + 1,), (shape[0] + 1,) + shape[1:], shape[1:],
           shape + (1,), shape[::-1]]
    return [np.ones(s, np.asarray(out).dtype) for s in dict.fromkeys(bad) if s != shape]


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_before_forward_raises_runtime_error(name):
    layer = CASES[name].make()
    with pytest.raises(RuntimeError, match=r"backward.*before.*forward"):
        layer.backward(np.ones((1, 1, 1)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_forward_that_raised_leaves_nothing_to_backward(name):
    case = CASES[name]
    layer = case.make()
    with pytest.raises((TypeError, ValueError)):
        case.fail(layer)
    with pytest.raises(RuntimeError, match=r"backward.*before.*forward"):
        layer.backward(np.ones((1, 1, 1)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_dout_of_the_wrong_shape_raises_value_error_before_any_kernel(name, monkeypatch):
    case = CASES[name]
    layer = case.make()
    with fastattn.use_backend("vectorized"):
        out = case.forward(layer)
        ran = []

        def kernel(kname, backend=None):
            def run(*args, **kwargs):
                ran.append(kname)
                raise AssertionError(f"kernel {kname} ran on a bad dout")
            return run

        with monkeypatch.context() as m:
            m.setattr(_backend, "kernel", kernel)
            m.setattr(kernels, "get", kernel)
            for dout in _bad_douts(out):
                with pytest.raises(ValueError, match=case.dout_name):
                    layer.backward(dout)
                assert ran == [], dout.shape
        # the layer still works with a dout of the right shape
        good = 1 if np.ndim(out) == 0 else np.ones_like(out)
        layer.backward(good)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.weights))
def test_weights_of_an_unsupported_dtype_raise_type_error(name, dtype):
    with pytest.raises(TypeError, match=r"W|dtype"):
        CASES[name].weights(dtype)


@pytest.mark.parametrize("name, make", [
    ("W", lambda: Embedding(np.zeros((V, 0)))),  # backward: an unnamed reshape error
    ("W", lambda: TimeEmbedding(np.zeros((0, 3)))),
    ("W", lambda: TimeAffine(np.zeros((0, 2)), np.zeros(2))),  # forward: the same
    ("W", lambda: Affine(np.zeros((3, 0)), np.zeros(0))),
    ("Wh", lambda: TimeLSTM(np.zeros((3, 4)), np.zeros((0, 4)), np.zeros(4))),  # H = 0
    ("Wx", lambda: TimeRNN(np.zeros((0, 2)), np.zeros((2, 2)), np.zeros(2))),  # D = 0
    ("Wx1", lambda: TimeBiLSTM(*[np.zeros(s) for s in ((3, 0), (0, 0), (0,))] * 2)),
], ids=["Embedding-D", "TimeEmbedding-V", "TimeAffine-D", "Affine-H", "TimeLSTM-H",
        "TimeRNN-D", "TimeBiLSTM-H"])
def test_weights_with_an_axis_of_length_0_raise_value_error_naming_them(name, make):
    """Such layers failed later, in forward or backward and on some backends only, with
    NumPy reshape errors that named nothing."""
    with pytest.raises(ValueError, match=f"^{name} must have no axis of length 0"):
        make()


@pytest.mark.parametrize("dtype", BAD_INPUT_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.float_input))
def test_float_inputs_of_an_unsupported_dtype_raise_type_error(name, dtype, tripwire):
    case = CASES[name]
    with pytest.raises(TypeError, match="dtype"):
        case.float_input(case.make(), dtype)
    assert tripwire == []


@pytest.mark.parametrize("empty", [(0, 3, 4), (2, 0, 4)], ids=["no-sequence", "no-position"])
@pytest.mark.parametrize("arg", ["x_q", "x_kv"])
def test_an_empty_sequence_input_raises_value_error_naming_it(arg, empty, tripwire):
    m = MultiHeadAttention(4, 2, dtype=F64, seed=0)
    x_q, x_kv = (np.zeros(empty), None) if arg == "x_q" else (_x(2, 3, 4), np.zeros(empty))
    with pytest.raises(ValueError, match=f"{arg} must have at least one sequence and one "
                                         "position"):
        m.forward(x_q, x_kv)  # the tripwire fails the test if a kernel runs first


@pytest.mark.parametrize("cls, k", [(TimeRNN, 1), (TimeLSTM, 4), (TimeGRU, 3)])
@pytest.mark.parametrize("shape", [(2, 3, 3, 1), (1, 2, 3, 3, 1)])
def test_recurrent_xs_that_is_not_3d_raises_value_error_naming_it(cls, k, shape, tripwire):
    m = cls(*_w_recurrent(k))
    with pytest.raises(ValueError, match=r"xs must have shape \(N, T, 3\)"):
        m.forward(np.zeros(shape))


# ============================================================================ cached keys, values


ATTEND_CALLS = {  # id -> (what the error names, call(layer, x (2, 3, 4), k, v (4, 5, 2)))
    "v-shorter": ("v", lambda m, x, k, v: m.attend(x, k, np.ascontiguousarray(v[:, :2]))),
    "k-rows": ("k", lambda m, x, k, v: m.attend(x, k[:1], v[:1])),
    "k-d_head": ("k", lambda m, x, k, v: m.attend(x, np.zeros((4, 5, 7)), v)),
    "k-2d": ("k", lambda m, x, k, v: m.attend(x, k[0], v[0])),
    "k-empty": ("k", lambda m, x, k, v: m.attend(x, k[:, :0], v[:, :0])),
    "k-int": ("k", lambda m, x, k, v: m.attend(x, k.astype(np.int64), v)),
    "x_q-width": ("x_q", lambda m, x, k, v: m.attend(np.zeros((2, 3, 5)), k, v)),
    "x_q-2d": ("x_q", lambda m, x, k, v: m.attend(x[0], k, v)),
    "causal": ("causal", lambda m, x, k, v: m.attend(x, k, v, causal="yes")),
    "window": ("window", lambda m, x, k, v: m.attend(x, k, v, window=(-1, 0))),
    "step-x_new": ("x_new", lambda m, x, k, v: m.step(x, {})),
    "step-cache-rows": (r"cache\['k'\]", lambda m, x, k, v: m.step(x[:, :1],
                                                                     {"k": k[:2], "v": v[:2]})),
    "step-cache-v": (r"cache\['v'\]", lambda m, x, k, v: m.step(x[:, :1],
                                                                  {"k": k, "v": v[:, :1]})),
    "step-cache-type": ("cache", lambda m, x, k, v: m.step(x[:, :1], [k, v])),
    "stepper-v_mem": ("v_mem", lambda m, x, k, v: DecoderBlock(
        4, 2, 6, dtype=F64, seed=0).stepper(k, v[:, :3], 2, 3)),
    "stepper-B": ("k_mem", lambda m, x, k, v: DecoderBlock(
        4, 2, 6, dtype=F64, seed=0).stepper(k, v, 3, 3)),
}


@pytest.mark.parametrize("what", sorted(ATTEND_CALLS))
def test_attend_and_step_check_keys_values_and_queries_before_any_kernel(what, tripwire):
    """The kernels trust their shapes: keys and values that do not fit (a v shorter than k
    was read past its end) raise TypeError/ValueError naming the argument first."""
    name, call = ATTEND_CALLS[what]
    m = MultiHeadAttention(4, 2, dtype=F64, seed=0)
    k, v = m.project_kv(_x(2, 5, 4))  # (4, 5, 2) each
    with pytest.raises((TypeError, ValueError), match=f"^{name} "):
        call(m, _x(2, 3, 4), k, v)
    assert tripwire == []


def test_attend_takes_views_lists_and_the_other_float_dtype():
    m = MultiHeadAttention(4, 2, dtype=F64, seed=0, backend="vectorized")
    x = _x(2, 3, 4)
    k, v = m.project_kv(_x(2, 5, 4))
    want = m.attend(x, k, v)
    for got in (m.attend(x.tolist(), k[:, ::-1][:, ::-1], v.astype(np.float32)),
                m.attend(np.asfortranarray(x), k, v.astype(np.float32))):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # v rounded to float32
