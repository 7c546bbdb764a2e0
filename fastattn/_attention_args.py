"""Checks of the attention functions' keywords, and their conversion to the kernels' form.

Each ``check_*`` raises TypeError or ValueError naming the argument and what was expected,
before any kernel sees the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fastattn import _checks


def check_causal(causal):
    """False, "top_left" or "bottom_right" (True and 1 mean "top_left", 0 means False)."""
    if isinstance(causal, str):
        if causal in ("top_left", "bottom_right"):
            return causal
        raise ValueError(
            f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")
    if isinstance(causal, (bool, np.bool_)) or (_checks.is_int(causal) and causal in (0, 1)):
        return "top_left" if causal else False
    raise TypeError(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def check_window(window, reach=None):
    """None or (left, right), each an int >= 0 or None. Given ``reach`` (Tq + Tk: no
    difference of positions gets that far), a bound of at least ``reach`` becomes None, so
    that the kernels' integers never see one beyond int64."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right), got {window!r}")
    out = []
    for name, x in zip(("left", "right"), window, strict=True):
        if x is None:
            out.append(None)
            continue
        if not _checks.is_int(x):
            raise TypeError(f"window {name} must be an int >= 0 or None, got {x!r}")
        if x < 0:
            raise ValueError(f"window {name} must be >= 0 or None, got {x}")
        out.append(None if reach is not None and x >= reach else int(x))
    return None if out == [None, None] else tuple(out)


def check_ratio(dropout_p, name="dropout_p") -> float:
    """A dropout probability (a layer's ratio too) as a float in [0, 1); errors say ``name``."""
    dropout_p = _checks.scalar(dropout_p)
    if not _checks.is_real(dropout_p):
        raise TypeError(f"{name} must be a real number in [0, 1), got {dropout_p!r}")
    p = _checks.to_float(dropout_p)
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p!r}")
    return p


def check_dropout(dropout_p, seed, name="dropout_p"):
    """(dropout_p as a float in [0, 1), seed as an int in [0, 2**64)); errors say ``name``."""
    p = check_ratio(dropout_p, name)
    if seed is None:
        if p > 0:
            raise ValueError("seed (an int) is required when dropout_p > 0")
        return p, 0
    if not _checks.is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return p, int(seed) % (1 << 64)


def check_cu_seqlens(cu_q, cu_k, Tq: int, Tk: int):
    """(cu_q, cu_k) as int64 arrays, or (None, None)."""
    if (cu_q is None) != (cu_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_q is None:
        return None, None
    out = []
    for name, cu, T in (("cu_seqlens_q", cu_q, Tq), ("cu_seqlens_k", cu_k, Tk)):
        a = _checks.as_array(cu, name)
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
        if a.ndim != 1 or a.size < 2:
            raise ValueError(f"{name} must be 1-D with n + 1 >= 2 entries, got shape {a.shape}")
        if a[0] != 0 or a[-1] != T:
            raise ValueError(f"{name} must start at 0 and end at the sequence axis length {T}, "
                             f"got {a[0]} ... {a[-1]}")
        if (np.diff(a.astype(np.int64)) < 0).any():
            raise ValueError(f"{name} must be non-decreasing")
        out.append(np.ascontiguousarray(a, dtype=np.int64))
    if out[0].size != out[1].size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {out[0].size - 1} and {out[1].size - 1}")
    return out[0], out[1]


def check_alibi(slopes, lead: tuple):
    """The slopes (H,) or (..., H) as float64 (B,), one per flattened query entry."""
    a = _checks.as_array(slopes, "alibi_slopes")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"alibi_slopes must be a real array, got dtype {a.dtype}")
    if len(lead) == 0:
        raise ValueError("alibi_slopes needs a head axis: q must be (..., H, Tq, d)")
    if a.ndim == 0 or a.shape[-1] != lead[-1]:
        raise ValueError(f"alibi_slopes must be (H,) or (..., H) with H={lead[-1]}, got shape "
                         f"{a.shape}")
    try:
        full = np.broadcast_to(a, lead)
    except ValueError:
        raise ValueError(f"alibi_slopes of shape {a.shape} does not broadcast to the leading "
                         f"dimensions {lead} of q") from None
    if not np.isfinite(full).all():
        raise ValueError("alibi_slopes contains NaN or inf")
    return np.ascontiguousarray(full.reshape(-1), dtype=np.float64)


@dataclass
class Bias:
    """A bias in the kernels' compact form and what it takes to give dbias bias's shape."""

    array: np.ndarray  # (Bb, 1 or Tq, Tk)
    bias_map: np.ndarray  # (B,) int64: the entry of array that query entry b uses
    shape: tuple  # the user's shape
    full_shape: tuple  # that shape with leading 1s up to q's ndim, Tk expanded
    tk_expanded: bool = field(default=False)

    def grad(self, dbias):
        """The kernels' dbias (Bb, 1 or Tq, Tk) in the user's bias shape."""
        g = dbias.reshape(self.full_shape)
        if self.tk_expanded:
            g = g.sum(axis=-1, keepdims=True)
        return g.reshape(self.shape)


def check_bias(bias, lead: tuple, Tq: int, Tk: int, dtype) -> Bias:
    """A float bias of q's dtype broadcastable to lead + (Tq, Tk); -inf allowed (masks)."""
    bias = _checks.float_array(bias, "bias", ndim_min=0, finite=False)
    if bias.dtype != dtype:
        raise TypeError(f"bias must have q's dtype {np.dtype(dtype).name}, got {bias.dtype}")
    if bias.size and not bias.max() < np.inf:  # one pass: the max is NaN or +inf if any is
        raise ValueError("bias contains NaN or +inf (-inf is allowed: it masks)")
    shape = lead + (Tq, Tk)
    try:
        fits = bias.ndim <= len(shape) and np.broadcast_shapes(bias.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"bias of shape {bias.shape} does not broadcast to {shape}")
    b = bias.reshape((1,) * (len(shape) - bias.ndim) + bias.shape)
    blead = b.shape[:-2]
    expanded = b.shape[-1] == 1 and Tk > 1
    if expanded:
        b = np.broadcast_to(b, b.shape[:-1] + (Tk,))
    Bb = int(np.prod(blead, dtype=np.int64))
    bias_map = np.broadcast_to(np.arange(Bb, dtype=np.int64).reshape(blead), lead).reshape(-1)
    return Bias(np.ascontiguousarray(b.reshape(Bb, b.shape[-2], Tk)),
                np.ascontiguousarray(bias_map), bias.shape, b.shape, expanded)


def check_heads(q, k, v):
    """Query entries per key/value entry (the group size): H // Hkv, 1 without grouping.

    All leading dimensions of q and k must match but the head axis (-3), where q's count must
    be a multiple of k's; v must have k's leading dimensions.
    """
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(
            f"q, k and v must have the same number of dimensions, got shapes "
            f"{q.shape}, {k.shape}, {v.shape}")
    if v.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"v must have k's leading dimensions {k.shape[:-2]}, got shape "
                         f"{v.shape}")
    if q.shape[:-2] == k.shape[:-2]:
        return 1
    if q.ndim < 3 or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(
            f"q, k and v must share their leading dimensions (but for grouped heads on axis "
            f"-3), got shapes {q.shape}, {k.shape}, {v.shape}")
    H, Hkv = q.shape[-3], k.shape[-3]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q's head count H={H} (axis -3) must be a multiple of k's and v's "
                         f"Hkv={Hkv}")
    return H // Hkv


def scale_of(scale, d: int) -> float:
    """1/sqrt(d) for None, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    x = _checks.scalar(scale)
    if not _checks.is_real(x):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    s = _checks.to_float(x)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return s
