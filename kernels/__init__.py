"""The hot loops of attention, each in three versions with one signature.

``kernels.loop`` is the readable reference (plain Python loops), ``kernels.vectorized`` the
NumPy version and ``kernels.numba_backend`` the Numba JIT version. All three modules define
every name in :data:`KERNEL_NAMES` with the same arguments and results.

Kernels trust their inputs: arrays are float32 or float64 (all one dtype), 3-D and
C-contiguous, indices are in range. The public functions and layers of ``fastattn`` check
inputs before calling a kernel.

>>> from fastattn import kernels
>>> f = kernels.get("softmax_forward", "vectorized")
"""

from __future__ import annotations

import importlib

BACKENDS = ("loop", "vectorized", "numba")

KERNEL_NAMES = (
    "softmax_forward",
    "softmax_backward",
    "weighted_sum_forward",
    "weighted_sum_backward",
    "scores_forward",
    "scores_backward",
    "attention_forward",
    "attention_backward",
    "embedding_backward",
    # the training step's glue (kernels/glue_loop.py documents them)
    "layernorm_forward",
    "layernorm_backward",
    "bias_relu_forward",
    "bias_relu_backward",
    "softmax_xent_forward",
    "softmax_xent_backward",
    "adam_update",
)

_MODULES = {
    "loop": ".loop",
    "vectorized": ".vectorized",
    "numba": ".numba_backend",
}


def check_backend(name) -> str:
    """Return ``name`` if it is a backend name, else raise ValueError listing the valid ones."""
    if name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are: {', '.join(map(repr, BACKENDS))}"
        )
    return name


def module(backend: str):
    """The module that implements ``backend`` (imported on first use)."""
    return importlib.import_module(_MODULES[check_backend(backend)], __name__)


def get(kernel_name: str, backend: str):
    """Return the kernel ``kernel_name`` of ``backend``.

    Raises ValueError for an unknown kernel or backend name, ImportError when the backend's
    dependency (numba) cannot be imported.
    """
    if kernel_name not in KERNEL_NAMES:
        raise ValueError(
            f"unknown kernel {kernel_name!r}; valid kernels are: {', '.join(KERNEL_NAMES)}"
        )
    return getattr(module(backend), kernel_name)
