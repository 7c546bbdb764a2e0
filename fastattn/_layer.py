"""The toolkit of fastattn's book-style layers: argument checks, initialisation and the small
array helpers that every layer module shares."""

from __future__ import annotations

import math

import numpy as np

from fastattn import _checks, kernels


def check_backend(backend):
    return None if backend is None else kernels.check_backend(backend)


def check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def make_rng(seed):
    return np.random.default_rng(seed)


def spawn_seeds(seed, n: int):
    """``n`` independent child seeds of ``seed`` (None, an int or a SeedSequence)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return ss.spawn(n)


def uniform(rng, shape, fan_in, dtype):
    """Weights uniform in +-1/sqrt(fan_in) (the usual default for linear layers)."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def not_yet(layer) -> RuntimeError:
    return RuntimeError(f"{type(layer).__name__}.backward called before forward")


def float_input(x, name: str, dtype: np.dtype, C: int) -> np.ndarray:
    """A (B, T, C) float input of the layer's dtype; cheap checks only (no NaN scan)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != dtype:
        if x.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
        x = x.astype(dtype)
    if x.ndim != 3 or x.shape[2] != C:
        raise ValueError(f"{name} must have shape (B, T, {C}), got {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one sequence and one position, "
                         f"got shape {x.shape}")
    return np.ascontiguousarray(x)


def dout_array(dout, shape, dtype, name: str = "dout") -> np.ndarray:
    if not isinstance(dout, np.ndarray):
        dout = np.asarray(dout)
    if dout.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {dout.dtype}")
    _checks.shape_is(dout, shape, name)
    return np.ascontiguousarray(dout, dtype=dtype)


_ONES = {}


def ones(n: int, dtype) -> np.ndarray:
    """A read-only vector of ``n`` ones (cached): sums as matrix-vector products."""
    dt = np.dtype(dtype)
    v = _ONES.get(dt)
    if v is None or v.shape[0] < n:
        v = np.ones(max(n, 1024), dt)
        v.flags.writeable = False
        _ONES[dt] = v
    return v[:n]


def colsum(a2, out=None):
    """Column sums of a 2-D array (N, C) -> (C,), as ones (N,) @ a2 (one BLAS call)."""
    return np.matmul(ones(a2.shape[0], a2.dtype), a2, out=out)


def rowsum(a2):
    """Row sums of a 2-D array (N, C) -> (N,), as a2 @ ones (C,)."""
    return a2 @ ones(a2.shape[1], a2.dtype)


def add_to(fresh, x):
    """``fresh + x``, written into ``fresh`` (an array the caller owns) when the shapes and
    dtypes allow it (a residual connection without a new array)."""
    if fresh.shape == np.shape(x) and np.result_type(fresh, x) == fresh.dtype:
        fresh += x
        return fresh
    return fresh + x


def collect_params(layers):
    params, grads = [], []
    for layer in layers:
        params += layer.params
        grads += layer.grads
    return params, grads
