"""fastattn: fast, checked attention for hand-written NumPy networks.

Book-style layers (``params``/``grads`` lists, explicit ``forward``/``backward``) whose hot
loops run as Numba kernels, with a looped reference and a NumPy version of every kernel.
Layers, models and tools are imported on first use, so ``import fastattn`` stays cheap.
"""

from __future__ import annotations

import importlib

from fastattn._backend import get_backend, set_backend, use_backend
from fastattn.functional import (
    attention_backward,
    attention_forward,
    merge_attention,
    softmax,
)

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    # the book's base layers
    **dict.fromkeys(
        ["Affine", "Embedding", "Softmax", "SoftmaxWithLoss", "TimeAffine", "TimeDropout",
         "TimeEmbedding", "TimeSoftmaxWithLoss"],
        "fastattn.layers",
    ),
    # the book's recurrent layers
    **dict.fromkeys(["RNN", "TimeRNN", "LSTM", "TimeLSTM", "GRU", "TimeGRU", "TimeBiLSTM"],
                    "fastattn.recurrent"),
    # the seed notebook's self-attention layers
    **dict.fromkeys(
        ["TimeKeyLayer", "TimeQueryLayer", "TimeValueLayer", "CompatibilityFunction",
         "WeightedValue"],
        "fastattn.self_attention",
    ),
    # the book's chapter 8 attention
    **dict.fromkeys(["WeightSum", "AttentionWeight", "Attention", "TimeAttention"],
                    "fastattn.book_attention"),
    # the Transformer
    "MultiHeadAttention": "fastattn.attention",
    **dict.fromkeys(
        ["LayerNorm", "PositionalEncoding", "FeedForward", "EncoderBlock", "DecoderBlock"],
        "fastattn.blocks",
    ),
    "TransformerSeq2seq": "fastattn.transformer",
    **dict.fromkeys(["SGD", "Adam", "clip_grads"], "fastattn.optim"),
    **dict.fromkeys(["Trainer", "eval_seq2seq", "exact_match"], "fastattn.trainer"),
    **dict.fromkeys(["load_model", "save_model"], "fastattn.checkpoint"),
    "profile": "fastattn.profiling",
    "tune": "fastattn.tuning",
}

__all__ = [
    "__version__",
    "attention_backward",
    "attention_forward",
    "get_backend",
    "merge_attention",
    "set_backend",
    "softmax",
    "use_backend",
    *_LAZY,
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
