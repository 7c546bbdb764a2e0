"""Public functions: checked entry points to the fused attention kernels, and softmax."""

from __future__ import annotations

import math

import numpy as np

from fastattn import _backend, _checks


def _scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(
            f"scale must be a real number or None, got {type(scale).__name__}"
        ) from None
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return s


def _check_qkv(q, k, v):
    q = _checks.float_array(q, "q", ndim_min=2)
    k = _checks.float_array(k, "k", ndim_min=2)
    v = _checks.float_array(v, "v", ndim_min=2)
    dtype = _checks.same_dtype({"q": q, "k": k, "v": v})
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(
            f"q, k and v must have the same number of dimensions, got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    lead = q.shape[:-2]
    if k.shape[:-2] != lead or v.shape[:-2] != lead:
        raise ValueError(
            f"q, k and v must share their leading dimensions, got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    Tq, d = q.shape[-2:]
    Tk = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"k must have last dimension d={d} like q, got shape {k.shape}")
    if v.shape[-2] != Tk:
        raise ValueError(f"v must have Tk={Tk} rows like k, got shape {v.shape}")
    if Tq == 0 or Tk == 0 or d == 0 or v.shape[-1] == 0:
        raise ValueError(
            f"sequence lengths and feature sizes must be at least 1, got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    return q, k, v, dtype


def _flat3(x, B):
    return x.reshape((B,) + x.shape[-2:])


def attention_forward(q, k, v, *, mask=None, causal=False, scale=None, backend=None):
    """softmax(scale q k^T, masked) v, fused: the (Tq, Tk) score matrix is never kept.

    q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv), one float dtype; ``mask`` None or bool
    broadcastable to (..., Tq, Tk), True where a query may attend; ``causal=True`` also forbids
    key j > query i. ``scale`` defaults to 1/sqrt(d).
    Returns out (..., Tq, dv) and lse (..., Tq), the row log-sum-exp needed by the backward
    (-inf for a row with nothing to attend to, whose out is zero).
    """
    q, k, v, dtype = _check_qkv(q, k, v)
    lead, Tq, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    Tk, dv = v.shape[-2:]
    s = _scale(scale, d)
    causal = bool(causal)
    B = int(np.prod(lead, dtype=np.int64))
    if mask is not None:
        mask = _checks.bool_mask(mask, lead + (Tq, Tk))
    fn = _backend.kernel("attention_forward", backend)
    if B == 0:
        return np.zeros(lead + (Tq, dv), dtype), np.zeros(lead + (Tq,), dtype)
    out, lse = fn(_flat3(q, B), _flat3(k, B), _flat3(v, B), s, causal, mask)
    return out.reshape(lead + (Tq, dv)), lse.reshape(lead + (Tq,))


def attention_backward(dout, q, k, v, out, lse, *, mask=None, causal=False, scale=None,
                       backend=None):
    """Gradients of :func:`attention_forward`: (dq, dk, dv), shaped like (q, k, v).

    ``out`` and ``lse`` are what attention_forward returned for the same q, k, v, mask, causal
    and scale; dout is shaped like out.
    """
    q, k, v, dtype = _check_qkv(q, k, v)
    lead, Tq, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    Tk, dv = v.shape[-2:]
    dout = _checks.float_array(dout, "dout", ndim_min=2)
    out = _checks.float_array(out, "out", ndim_min=2)
    lse = _checks.float_array(lse, "lse", ndim_min=1, finite=False)
    _checks.same_dtype({"q": q, "dout": dout, "out": out, "lse": lse})
    _checks.shape_is(dout, lead + (Tq, dv), "dout")
    _checks.shape_is(out, lead + (Tq, dv), "out")
    _checks.shape_is(lse, lead + (Tq,), "lse")
    if np.isnan(lse).any() or np.isposinf(lse).any():
        raise ValueError("lse contains NaN or +inf; pass the lse that attention_forward returned")
    s = _scale(scale, d)
    causal = bool(causal)
    B = int(np.prod(lead, dtype=np.int64))
    if mask is not None:
        mask = _checks.bool_mask(mask, lead + (Tq, Tk))
    fn = _backend.kernel("attention_backward", backend)
    if B == 0:
        return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dq, dk, dvv = fn(_flat3(dout, B), _flat3(q, B), _flat3(k, B), _flat3(v, B),
                     _flat3(out, B), lse.reshape(B, Tq), s, causal, mask)
    return dq.reshape(q.shape), dk.reshape(k.shape), dvv.reshape(v.shape)


def softmax(x, *, backend=None):
    """Softmax over the last axis of an array of any ndim (the book's ``softmax``).

    x float32/float64, any shape with a last axis of at least 1 -> same shape and dtype.
    """
    x = _checks.float_array(x, "x", ndim_min=1, finite=False)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("x contains NaN or +inf")
    if x.size == 0:
        return x.copy()
    y = _backend.kernel("softmax_forward", backend)(x.reshape(1, -1, x.shape[-1]))
    return y.reshape(x.shape)
