"""The public names that the design fixes exist, import lazily and are what they say."""

import subprocess
import sys

import pytest

import fastattn
from fastattn import kernels

DESIGN_NAMES = [
    "attention_forward", "attention_backward", "merge_attention", "softmax", "set_backend",
    "get_backend", "use_backend", "load_model",
    "TimeKeyLayer", "TimeQueryLayer", "TimeValueLayer", "CompatibilityFunction", "WeightedValue",
    "Embedding", "TimeEmbedding", "TimeAffine", "TimeSoftmaxWithLoss", "TimeDropout",
    "WeightSum", "AttentionWeight", "Attention", "TimeAttention",
    "LayerNorm", "PositionalEncoding", "MultiHeadAttention", "TransformerSeq2seq",
    "SGD", "Adam", "Trainer", "eval_seq2seq", "profile",
]


@pytest.mark.parametrize("name", sorted(set(fastattn.__all__) | set(DESIGN_NAMES)))
def test_every_public_name_resolves(name):
    assert name in fastattn.__all__
    assert getattr(fastattn, name) is not None


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        fastattn.no_such_name  # noqa: B018


def test_every_backend_module_has_every_kernel():
    for backend in kernels.BACKENDS:
        for family, (names, _) in kernels.FAMILIES.items():
            module = kernels.module(backend, family)
            for name in names:
                assert callable(getattr(module, name)), (backend, name)
                assert kernels.get(name, backend) is getattr(module, name)


def test_import_fastattn_does_not_import_the_layers_or_numba():
    code = ("import sys, fastattn; "
            "print(any(m in sys.modules for m in "
            "('numba', 'fastattn.transformer', 'fastattn.layers', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
