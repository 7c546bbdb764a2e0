"""The layer toolkit (``fastattn._layer``): one behaviour each, checked on every public layer.

* ``backward`` runs on the backend its ``forward`` ran on, whatever backend is in force when
  ``backward`` is called (each layer module: layers, self_attention, book_attention, attention,
  transformer, recurrent);
* a backend name is checked when the layer is built;
* ``backward`` before ``forward`` raises the same RuntimeError everywhere;
* a ``dout`` of the other float dtype is cast to the forward's dtype (the same gradients as
  the forward's dtype with the same values); a ``dout`` that is not float is a TypeError;
* sizes: a value that is not an int is a TypeError, one below 1 a ValueError, and a weight
  dtype other than float32/float64 a TypeError, in every module that takes them;
* a composite layer's ``params``/``grads`` hold its children's arrays themselves.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from helpers import SMALL_VOCAB, ids, rand

import fastattn
from fastattn import (
    GRU,
    LSTM,
    RNN,
    Affine,
    Attention,
    AttentionWeight,
    CompatibilityFunction,
    DecoderBlock,
    Embedding,
    EncoderBlock,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    PositionalEncoding,
    Softmax,
    SoftmaxWithLoss,
    TimeAffine,
    TimeAttention,
    TimeBiLSTM,
    TimeDropout,
    TimeEmbedding,
    TimeGRU,
    TimeKeyLayer,
    TimeLSTM,
    TimeQueryLayer,
    TimeRNN,
    TimeSoftmaxWithLoss,
    TimeValueLayer,
    TransformerSeq2seq,
    WeightedValue,
    WeightSum,
)

F64 = np.float64
V = SMALL_VOCAB  # the vocabulary of every id-taking layer here


def _model(**kw):
    return TransformerSeq2seq(V, d_model=4, n_heads=2, n_layers=1, d_ff=6, max_len=5,
                              dtype=F64, seed=0, **kw)


def _rnn_weights(gates, D=3, H=4):
    return rand(D, gates * H), rand(H, gates * H, seed=1), rand(gates * H, seed=2)


# name -> (make(**kw) -> layer, forward(layer) -> output); kw is backend=...
CASES = {
    # fastattn.layers
    "Affine": (lambda **kw: Affine(rand(3, 2), rand(2), **kw), lambda m: m.forward(rand(4, 3))),
    "TimeAffine": (lambda **kw: TimeAffine(rand(3, 2), rand(2), **kw),
                   lambda m: m.forward(rand(2, 4, 3))),
    "Embedding": (lambda **kw: Embedding(rand(V, 3), **kw),
                  lambda m: m.forward(np.array([0, 5, 5, 2]))),
    "TimeEmbedding": (lambda **kw: TimeEmbedding(rand(V, 3), **kw), lambda m: m.forward(ids())),
    "Softmax": (Softmax, lambda m: m.forward(rand(2, 3, 4))),
    "SoftmaxWithLoss": (SoftmaxWithLoss, lambda m: m.forward(rand(4, 3), np.array([0, 1, 2, 1]))),
    "TimeSoftmaxWithLoss": (TimeSoftmaxWithLoss,
                            lambda m: m.forward(rand(2, 3, 4), np.array([[0, 1, 2], [3, -1, 0]]))),
    "TimeDropout": (lambda **kw: TimeDropout(0.5, seed=0, **kw),
                    lambda m: m.forward(rand(2, 3, 4))),
    # fastattn.self_attention
    "TimeKeyLayer": (lambda **kw: TimeKeyLayer(V, 4, 3, dtype=F64, seed=0, **kw),
                     lambda m: m.forward(ids())),
    "TimeQueryLayer": (lambda **kw: TimeQueryLayer(V, 3, dtype=F64, seed=0, **kw),
                       lambda m: m.forward(ids())),
    "TimeValueLayer": (lambda **kw: TimeValueLayer(V, 3, dtype=F64, seed=0, **kw),
                       lambda m: m.forward(ids())),
    "CompatibilityFunction": (lambda **kw: CompatibilityFunction(V, 4, 3, dtype=F64, seed=0,
                                                                 **kw),
                              lambda m: m.forward(ids())),
    "WeightedValue": (lambda **kw: WeightedValue(V, 3, dtype=F64, seed=0, **kw),
                      lambda m: m.forward(ids(), np.full((2, 3, 3), 1 / 3))),
    # fastattn.book_attention
    "WeightSum": (WeightSum, lambda m: m.forward(rand(2, 3, 4), np.full((2, 3), 1 / 3))),
    "AttentionWeight": (AttentionWeight, lambda m: m.forward(rand(2, 3, 4), rand(2, 4))),
    "Attention": (Attention, lambda m: m.forward(rand(2, 3, 4), rand(2, 4))),
    "TimeAttention": (TimeAttention, lambda m: m.forward(rand(2, 3, 4), rand(2, 5, 4))),
    # fastattn.attention
    "MultiHeadAttention": (lambda **kw: MultiHeadAttention(4, 2, dtype=F64, seed=0, **kw),
                           lambda m: m.forward(rand(2, 3, 4), rand(2, 5, 4))),
    # fastattn.transformer
    "LayerNorm": (lambda **kw: LayerNorm(4, dtype=F64, **kw), lambda m: m.forward(rand(2, 3, 4))),
    "PositionalEncoding": (lambda **kw: PositionalEncoding(8, 4, dtype=F64, seed=0, **kw),
                           lambda m: m.forward(rand(2, 3, 4))),
    "FeedForward": (lambda **kw: FeedForward(4, 6, dtype=F64, seed=0, **kw),
                    lambda m: m.forward(rand(2, 3, 4))),
    "EncoderBlock": (lambda **kw: EncoderBlock(4, 2, 6, dtype=F64, seed=0, **kw),
                     lambda m: m.forward(rand(2, 3, 4))),
    "DecoderBlock": (lambda **kw: DecoderBlock(4, 2, 6, dtype=F64, seed=0, **kw),
                     lambda m: m.forward(rand(2, 3, 4), rand(2, 5, 4))),
    "TransformerSeq2seq": (_model, lambda m: m.forward(ids(2, 4), ids(2, 3, seed=1))),
    # fastattn.recurrent (D = 3, H = 4; the LSTM step's backward takes dh_next alone)
    "RNN": (lambda **kw: RNN(*_rnn_weights(1), **kw), lambda m: m.forward(rand(2, 3), rand(2, 4))),
    "GRU": (lambda **kw: GRU(*_rnn_weights(3), **kw), lambda m: m.forward(rand(2, 3), rand(2, 4))),
    "LSTM": (lambda **kw: LSTM(*_rnn_weights(4), **kw),
             lambda m: m.forward(rand(2, 3), rand(2, 4), rand(2, 4))[0]),
    "TimeRNN": (lambda **kw: TimeRNN(*_rnn_weights(1), **kw), lambda m: m.forward(rand(2, 5, 3))),
    "TimeGRU": (lambda **kw: TimeGRU(*_rnn_weights(3), **kw), lambda m: m.forward(rand(2, 5, 3))),
    "TimeLSTM": (lambda **kw: TimeLSTM(*_rnn_weights(4), **kw),
                 lambda m: m.forward(rand(2, 5, 3))),
    "TimeBiLSTM": (lambda **kw: TimeBiLSTM(*_rnn_weights(4), *_rnn_weights(4), **kw),
                   lambda m: m.forward(rand(2, 5, 3))),
}

# layers whose backward runs no kernel (NumPy products or elementwise work only)
NO_BACKWARD_KERNEL = {"Affine", "TimeAffine", "SoftmaxWithLoss", "TimeDropout",
                      "PositionalEncoding"}


def _public_layer_classes():
    return {name for name in fastattn._LAZY
            if inspect.isclass(obj := getattr(fastattn, name))
            and hasattr(obj, "forward") and hasattr(obj, "backward")}


def test_the_table_covers_every_public_layer_class():
    assert set(CASES) == _public_layer_classes()
    assert NO_BACKWARD_KERNEL <= set(CASES)


def _ones_like(out):
    return 1.0 if np.ndim(out) == 0 else np.ones_like(out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_runs_on_the_backend_its_forward_ran_on(name, looked_up):
    make, forward = CASES[name]
    layer = make()
    with fastattn.use_backend("vectorized"):
        out = forward(layer)
    assert set(looked_up) <= {"vectorized"}
    looked_up.clear()
    with fastattn.use_backend("loop"):  # switched between forward and backward
        layer.backward(_ones_like(out))
    assert set(looked_up) <= {"vectorized"}, looked_up
    assert bool(looked_up) == (name not in NO_BACKWARD_KERNEL), "backward ran no kernel"


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_unknown_backend_raises_value_error_when_the_layer_is_built(name):
    make, _ = CASES[name]
    with pytest.raises(ValueError, match="valid backends are: 'loop', 'vectorized', 'numba'"):
        make(backend="gpu")


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_before_forward_raises_the_same_runtime_error(name):
    layer = CASES[name][0]()
    with pytest.raises(RuntimeError, match=rf"^{type(layer).__name__}\.backward called before "
                                           r"forward$"):
        layer.backward(np.ones((2, 3, 4)))


DOUT_NAMES = {"CompatibilityFunction": "dscore", "WeightedValue": "dZ", "WeightSum": "dc",
              "AttentionWeight": "da", "RNN": "dh_next", "GRU": "dh_next", "LSTM": "dh_next",
              "TimeRNN": "dhs", "TimeGRU": "dhs", "TimeLSTM": "dhs", "TimeBiLSTM": "dhs"}


def _arrays(result, layer):
    """The backward's returned arrays and the layer's gradients, copied."""
    items = result if isinstance(result, tuple) else (result,)
    return [np.array(a) for a in items if a is not None] + [g.copy() for g in layer.grads]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_dout_of_the_other_float_dtype_is_cast_to_the_forwards(name):
    make, forward = CASES[name]
    layer = make(backend="vectorized")
    out = forward(layer)
    dout32 = np.float32(0.5) if np.ndim(out) == 0 else rand(*out.shape).astype(np.float32)
    want = _arrays(layer.backward(dout32.astype(F64)), layer)
    got = _arrays(layer.backward(dout32), layer)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == F64
        np.testing.assert_array_equal(g, w)
    bad = np.complex128(1) if np.ndim(out) == 0 else np.ones(out.shape, np.complex128)
    with pytest.raises(TypeError, match=DOUT_NAMES.get(name, "dout")):
        layer.backward(bad)


# every constructor argument that is a size: make(size) -> layer
SIZES = {
    "TimeKeyLayer.D": lambda n: TimeKeyLayer(V, n, 3),
    "TimeQueryLayer.V": lambda n: TimeQueryLayer(n, 3),
    "WeightedValue.d": lambda n: WeightedValue(V, n),
    "MultiHeadAttention.n_heads": lambda n: MultiHeadAttention(4, n),
    "LayerNorm.d_model": lambda n: LayerNorm(n),
    "PositionalEncoding.max_len": lambda n: PositionalEncoding(n, 4),
    "FeedForward.d_ff": lambda n: FeedForward(4, n),
    "EncoderBlock.d_ff": lambda n: EncoderBlock(4, 2, n),
    "TransformerSeq2seq.n_layers": lambda n: TransformerSeq2seq(V, n_layers=n),
}


@pytest.mark.parametrize("where", sorted(SIZES))
@pytest.mark.parametrize("size, error", [(2.5, TypeError), (True, TypeError), ("3", TypeError),
                                         (0, ValueError), (-1, ValueError)])
def test_a_bad_size_raises_the_same_error_in_every_module(where, size, error):
    with pytest.raises(error, match=where.split(".")[1]):
        SIZES[where](size)


@pytest.mark.parametrize("make", [
    lambda dt: TimeKeyLayer(V, 4, 3, dtype=dt), lambda dt: CompatibilityFunction(V, 4, 3, dtype=dt),
    lambda dt: MultiHeadAttention(4, 2, dtype=dt), lambda dt: LayerNorm(4, dtype=dt),
    lambda dt: TransformerSeq2seq(V, dtype=dt),
])
def test_a_weight_dtype_that_is_not_float32_or_float64_is_a_type_error(make):
    for dt in (np.int32, np.float16):
        with pytest.raises(TypeError, match="dtype must be float32 or float64"):
            make(dt)


@pytest.mark.parametrize("name", ["TimeKeyLayer", "CompatibilityFunction", "WeightedValue",
                                  "EncoderBlock", "DecoderBlock", "TransformerSeq2seq"])
def test_a_composite_layers_params_are_its_childrens_arrays(name):
    layer = CASES[name][0]()
    children = [getattr(layer, a) for a in vars(layer)]
    children = [c for x in children for c in (x if isinstance(x, list) else [x])
                if hasattr(c, "params") and c is not layer]
    own = {id(p) for c in children for p in c.params}
    assert layer.params and all(id(p) in own for p in layer.params)
    own_grads = {id(g) for c in children for g in c.grads}
    assert all(id(g) in own_grads for g in layer.grads)
