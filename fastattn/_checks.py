"""Input checks shared by the public functions and layers.

Everything a kernel receives passes through here first: kernels do not check bounds, so a bad
index or shape that reached one could corrupt memory silently.
"""

from __future__ import annotations

import functools
import math
import numbers
import reprlib

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_NOT_NUMBERS = (bool, np.bool_, np.timedelta64)  # NumPy counts timedelta64 as an integer


def is_int(x) -> bool:
    """A Python or NumPy integer (bool and timedelta64 are not)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, _NOT_NUMBERS)


def is_real(x) -> bool:
    """A Python or NumPy real number (bool and timedelta64 are not)."""
    return isinstance(x, numbers.Real) and not isinstance(x, _NOT_NUMBERS)


def scalar(x):
    """``x[()]`` for a 0-d array (a setting read back with ``np.load``, say), else ``x``: a
    setting checked with :func:`is_real` or :func:`is_int` takes a 0-d array as the number it
    holds, as ``float()`` and ``int()`` do."""
    return x[()] if isinstance(x, np.ndarray) and x.ndim == 0 else x


def int_at_least(x, name: str, low: int) -> int:
    """``x`` (or a 0-d array of it) as an int >= ``low``, else TypeError/ValueError naming
    ``name``."""
    x = scalar(x)
    if not is_int(x):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < low:
        raise ValueError(f"{name} must be >= {low}, got {x}")
    return int(x)


def to_float(x) -> float:
    """``float(x)``, with +-inf for an int beyond float's range (where float() raises
    OverflowError), so that a range check names the argument."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def finite_real(x, name: str, *, positive: bool = False) -> float:
    """``x`` (or a 0-d array of it) as a float, finite and >= 0 (> 0 with ``positive``), else
    TypeError (not a real number: a string, a bool, None) or ValueError naming ``name``."""
    x = scalar(x)
    if not is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    v = to_float(x)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        need = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {need} number, got {x!r:.80}")
    return v


def as_array(x, name: str) -> np.ndarray:
    """``np.asarray(x)``, with a ValueError naming ``name`` for nested sequences of unequal
    lengths (NumPy's own error names nothing)."""
    try:
        return np.asarray(x)
    except ValueError:
        raise ValueError(f"{name} must be an array, got nested sequences of unequal "
                         f"lengths") from None


def seeded(make, seed, name: str, expected: str):
    """``make(seed)`` (NumPy's generator or seeding call), with NumPy's TypeError/ValueError
    for a bad seed raised again naming ``name`` and what was ``expected`` (NumPy's own errors,
    'SeedSequence expects int or sequence of ints', 'expected non-negative integer', name no
    argument)."""
    try:
        return make(seed)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name} must be {expected}, got {reprlib.repr(seed)} ({e})") from None


def float_array(x, name: str, *, ndim_min: int = 1, finite: bool = True) -> np.ndarray:
    """``x`` as a C-contiguous float32/float64 array, or TypeError/ValueError naming ``name``.

    Non-contiguous and negative-stride views, and non-native byte orders, are copied; the values
    and the shape (a 0-d array too) are unchanged. There is no dtype promotion: integer, float16,
    complex and object arrays raise TypeError.
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple)) or np.isscalar(x):
            x = as_array(x, name)
        else:
            raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype.kind == "f" and not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # e.g. big-endian '>f8': same values
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {x.shape}")
    if finite and x.size and not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf")
    return np.asarray(x) if x.flags.c_contiguous else np.ascontiguousarray(x)  # 0-d stays 0-d


@functools.cache
def _finite_flat():
    """kernels._numba_math.finite_flat on a read-only view (one compilation per dtype,
    whatever the array's flag), or None without Numba."""
    try:
        from fastattn.kernels._numba_math import finite_flat, read_only
    except ImportError:
        return None
    return lambda x: finite_flat(read_only(x))


def all_finite(x: np.ndarray) -> bool:
    """True when ``x`` (non-empty, float) holds no NaN or inf, with no temporary array of x's
    size (unlike np.isfinite(x).all()): one pass of a Numba loop when x is C-contiguous (2-3x
    faster), else (or without Numba) its max and min are finite (NaN propagates through both).
    """
    fast = _finite_flat() if x.flags.c_contiguous else None
    if fast is not None:
        return bool(fast(x.reshape(-1)))
    return bool(np.isfinite(x.max()) and np.isfinite(x.min()))


def same_dtype(arrays: dict) -> np.dtype:
    """The one dtype of all named arrays, or TypeError listing the dtypes."""
    dtypes = {n: a.dtype for n, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"arrays must share one dtype (float32 or float64), got {got}")
    return next(iter(dtypes.values()))


def shape_is(x: np.ndarray, shape: tuple, name: str) -> None:
    """ValueError unless ``x.shape == shape``."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def token_ids(x, V: int, name: str = "xs", *, ndim: int | None = 2) -> np.ndarray:
    """``x`` as a C-contiguous int64 array of ids in [0, V), of x's shape (a 0-d x stays 0-d),
    or TypeError/ValueError."""
    if not isinstance(x, np.ndarray):
        x = as_array(x, name)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D token ids, got shape {x.shape}")
    if x.size:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {V})")
    return np.asarray(x, dtype=np.int64, order="C")  # 0-d stays 0-d; a plain ndarray


def bool_mask(mask, shape: tuple, name: str = "mask") -> np.ndarray:
    """A boolean mask broadcastable to ``shape`` = (..., Tq, Tk), in the compact 3-D form the
    kernels take: (1 or B, 1 or Tq, Tk), C-contiguous, where B is the product of the leading
    dimensions of ``shape``.
    """
    if not isinstance(mask, np.ndarray):
        mask = as_array(mask, name)
    if mask.dtype != bool:
        raise TypeError(f"{name} must be a boolean array (True where attention is allowed), "
                        f"got dtype {mask.dtype}")
    try:
        full = np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {mask.shape} does not broadcast to {tuple(shape)}"
        ) from None
    lead, (Tq, Tk) = shape[:-2], shape[-2:]
    B = int(np.prod(lead, dtype=np.int64))
    m = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)  # same ndim as shape
    varies_lead = any(s != 1 for s in m.shape[:-2])
    Bm = B if varies_lead else 1
    Tqm = Tq if m.shape[-2] != 1 else 1
    if varies_lead:
        compact = full[..., :Tqm, :].reshape(Bm, Tqm, Tk)
    else:
        compact = np.broadcast_to(m.reshape(m.shape[-2:]), (Tqm, Tk)).reshape(1, Tqm, Tk)
    return np.ascontiguousarray(compact)
