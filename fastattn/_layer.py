"""The layer toolkit: what every book-style layer of fastattn does, done one way.

Construction

* :func:`check_backend`: ``backend=None`` or a backend name, checked when the layer is built
  (ValueError listing the valid names).
* :func:`check_dtype`, :func:`positive_int`: TypeError for a value of the wrong type (a dtype
  that is not float32/float64, a size that is not an int), ValueError for a value out of range
  (a size below 1).
* :func:`make_rng`, :func:`spawn_seeds`, :func:`uniform`: random initial weights.
* :func:`collect_params`: a composite layer's ``params``/``grads``: its children's lists
  concatenated, holding the children's arrays themselves (an optimizer updates both at once).

Forward and backward

* :func:`forward_backend`: the backend a forward runs on (the layer's own, else the one in force
  when forward is called). The forward keeps it and the backward runs its kernels on it, even
  if the backend in force has changed in between.
* :func:`float_input`: a float input as a C-contiguous array of the layer's dtype (float32 and
  float64 are cast to it; any other dtype is a TypeError); :func:`sequence_input` for (B, T, C).
* :func:`dout_array`: the upstream gradient, of the forward output's shape (ValueError), a float
  array (TypeError) cast to the forward's dtype; :func:`scalar_dout` for a loss.
* :func:`not_yet`: the RuntimeError of a backward called before forward.

Arrays: :func:`colsum`, :func:`rowsum` (sums as one BLAS product with a vector of ones) and
:func:`add_to` (a residual connection without a new array).
"""

from __future__ import annotations

import math

import numpy as np

from fastattn import _backend, _checks, kernels

# --------------------------------------------------------------------------- construction


def check_backend(backend) -> str | None:
    """None, or a valid backend name (ValueError listing the valid ones)."""
    return None if backend is None else kernels.check_backend(backend)


def check_dtype(dtype) -> np.dtype:
    """The dtype of a layer's weights: float32 or float64, else TypeError."""
    dt = np.dtype(dtype)
    if dt not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def positive_int(value, name: str) -> int:
    """A size: TypeError unless an int (bool is not), ValueError below 1."""
    if not _checks.is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def make_rng(seed) -> np.random.Generator:
    """A generator from a seed (None, an int, a SeedSequence or a Generator itself); any
    other seed is a TypeError/ValueError naming ``seed``."""
    return _checks.seeded(np.random.default_rng, seed, "seed",
                          "None, an int >= 0 (or a sequence of them), a SeedSequence or a "
                          "Generator")


def spawn_seeds(seed, n: int):
    """``n`` independent child seeds of ``seed`` (None, an int or a SeedSequence); any other
    seed is a TypeError/ValueError naming ``seed``."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else _checks.seeded(
        np.random.SeedSequence, seed, "seed",
        "None, an int >= 0 (or a sequence of them) or a SeedSequence")
    return ss.spawn(n)


def uniform(rng, shape, fan_in, dtype):
    """Weights uniform in +-1/sqrt(fan_in) (the usual default for linear layers)."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def collect_params(layers):
    """(params, grads) of a composite layer: its children's lists, in order, concatenated."""
    params, grads = [], []
    for layer in layers:
        params += layer.params
        grads += layer.grads
    return params, grads


# --------------------------------------------------------------------------- forward, backward


def forward_backend(layer) -> str:
    """The backend ``layer``'s forward runs on: ``layer.backend``, else the one in force. The
    forward keeps it for the backward (pass it to :func:`fastattn._backend.kernel`)."""
    return _backend.resolve(layer.backend)


def float_input(x, name: str, dtype, *, ndim_min: int = 1) -> np.ndarray:
    """A float input as a C-contiguous array of ``dtype`` (no NaN scan): float32/float64
    arrays (or lists) are cast; other dtypes and objects raise TypeError, fewer than
    ``ndim_min`` dimensions ValueError."""
    if (type(x) is np.ndarray and x.dtype == dtype and x.ndim >= ndim_min
            and x.flags.c_contiguous):  # already what it would become (a decoding step's)
        return x
    x = _checks.float_array(x, name, ndim_min=ndim_min, finite=False)
    return x.astype(dtype, copy=False)


def sequence_input(x, name: str, dtype, C: int) -> np.ndarray:
    """A (B, T, C) float input with B, T >= 1, as :func:`float_input` (ValueError for another
    shape)."""
    x = float_input(x, name, dtype, ndim_min=3)
    if x.ndim != 3 or x.shape[2] != C:
        raise ValueError(f"{name} must have shape (B, T, {C}), got {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one sequence and one position, "
                         f"got shape {x.shape}")
    return x


def dout_array(dout, shape, dtype, name: str = "dout") -> np.ndarray:
    """The upstream gradient of a forward output of ``shape`` and ``dtype``: ValueError for
    another shape, TypeError for a dtype other than float32/float64; cast to ``dtype``."""
    dout = _checks.float_array(dout, name, ndim_min=0, finite=False)
    _checks.shape_is(dout, shape, name)
    return dout.astype(dtype, copy=False)


def scalar_dout(dout, dtype):
    """The upstream gradient of a loss: one real number, as a scalar of ``dtype``."""
    if np.ndim(dout) != 0:
        raise ValueError(f"dout must be a scalar (the gradient of the loss), got shape "
                         f"{np.shape(dout)}")
    kind = np.asarray(dout).dtype.kind
    if kind not in "iuf":
        raise TypeError(f"dout must be a real number, got {type(dout).__name__}")
    return np.dtype(dtype).type(dout)


def not_yet(layer) -> RuntimeError:
    """The error of ``layer.backward`` called before its forward."""
    return RuntimeError(f"{type(layer).__name__}.backward called before forward")


# --------------------------------------------------------------------------- arrays

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


def matmul(backend, a, b, ta=False, tb=False):
    """op(a) @ op(b) of 2-D arrays, op(x) = x.T when its flag is set. On the numba backend by
    ``kernels._products.matmul``: row blocks on the kernels' threads, BLAS at one thread, so
    that no BLAS thread is left spinning on the cores the next kernel needs. Else NumPy's
    product."""
    if backend != "numba":
        return (a.T if ta else a) @ (b.T if tb else b)
    from fastattn.kernels import _products

    return _products.matmul(a, b, ta, tb)


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
