"""Public functions: checked entry points to the fused attention kernels, and softmax."""

from __future__ import annotations

import math

import numpy as np

from fastattn import _backend, _checks


def _scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, (str, bytes)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(
            f"scale must be a real number or None, got {type(scale).__name__}"
        ) from None
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return s


def _causal(causal) -> bool:
    if isinstance(causal, (bool, np.bool_)):
        return bool(causal)
    if isinstance(causal, (int, np.integer)) and causal in (0, 1):
        return bool(causal)
    raise TypeError(f"causal must be True or False, got {causal!r}")


def _overflow(what: str, dtype) -> ValueError:
    hint = ("" if what == "attention_forward"
            else " (or out and lse are not what attention_forward gave for these inputs)")
    return ValueError(
        f"{what}: the logits scale * q k^T overflow {np.dtype(dtype).name}; "
        f"scale q, k or scale down, or use float64{hint}"
    )


def _run_kernel(fn, what: str, dtype, *args):
    """Call a kernel; a logit overflow that shows as a Python OverflowError (the loop kernels)
    becomes the ValueError that the callers also raise for inf/NaN in the results.
    """
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return fn(*args)
    except OverflowError:
        raise _overflow(what, dtype) from None


def _rows_with_keys(mask, causal: bool, Tq: int):
    """Which query rows have at least one allowed key: bool (1 or B, Tq) from the compact
    mask (1 or B, 1 or Tq, Tk), or None when every row has one (no mask: key 0 is always
    allowed, causal or not).
    """
    if mask is None:
        return None
    if not causal:
        return np.broadcast_to(mask.any(axis=-1), mask.shape[:1] + (Tq,))
    first = mask.argmax(axis=-1)  # (Bm, Tqm): the first allowed key, 0 if none
    return mask.any(axis=-1) & (first <= np.arange(Tq))  # (Bm, Tq): it exists and j <= i


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


def _options(q, v, mask, causal, scale, backend, kernel_name):
    """The keywords checked, in the kernels' form: (scale, causal, mask (1 or B, 1 or Tq, Tk)
    or None, B = the product of the leading dimensions, the kernel)."""
    lead, Tq, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    s = _scale(scale, d)
    causal = _causal(causal)
    B = int(np.prod(lead, dtype=np.int64))
    if mask is not None:
        mask = _checks.bool_mask(mask, lead + (Tq, v.shape[-2]))
    return s, causal, mask, B, _backend.kernel(kernel_name, backend)


def _flat3(x, B):
    return x.reshape((B,) + x.shape[-2:])


def attention_forward(q, k, v, *, mask=None, causal=False, scale=None, backend=None):
    """softmax(scale q k^T, masked) v, fused: the (Tq, Tk) score matrix is never kept.

    q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv), one float dtype; ``mask`` None or bool
    broadcastable to (..., Tq, Tk), True where a query may attend; ``causal=True`` also forbids
    key j > query i. ``scale`` defaults to 1/sqrt(d).
    Returns out (..., Tq, dv) and lse (..., Tq), the row log-sum-exp needed by the backward
    (-inf for a row with nothing to attend to, whose out is zero).

    Raises TypeError for a dtype other than float32/float64 or for mixed dtypes (there is no
    promotion), ValueError for shapes that do not fit, NaN/inf in the inputs, or logits that
    overflow the dtype. An empty batch (a leading dimension of 0) gives empty results.
    """
    q, k, v, dtype = _check_qkv(q, k, v)
    lead, Tq = q.shape[:-2], q.shape[-2]
    dv = v.shape[-1]
    s, causal, mask, B, fn = _options(q, v, mask, causal, scale, backend, "attention_forward")
    if B == 0:
        return np.zeros(lead + (Tq, dv), dtype), np.full(lead + (Tq,), -np.inf, dtype)
    out, lse = _run_kernel(fn, "attention_forward", dtype, _flat3(q, B), _flat3(k, B),
                           _flat3(v, B), s, causal, mask)
    if not np.isfinite(out).all() or np.isnan(lse).any() or np.isposinf(lse).any():
        raise _overflow("attention_forward", dtype)
    empty = np.isneginf(lse)  # (B, Tq): rows the kernel found nothing to attend to
    if empty.any():
        has_key = _rows_with_keys(mask, causal, Tq)
        if has_key is None or (empty & has_key).any():
            raise _overflow("attention_forward", dtype)
    return out.reshape(lead + (Tq, dv)), lse.reshape(lead + (Tq,))


def attention_backward(dout, q, k, v, out, lse, *, mask=None, causal=False, scale=None,
                       backend=None):
    """Gradients of :func:`attention_forward`: (dq, dk, dv), shaped like (q, k, v).

    ``out`` and ``lse`` are what attention_forward returned for the same q, k, v, mask, causal
    and scale; dout is shaped like out. Errors as for :func:`attention_forward`.
    """
    q, k, v, dtype = _check_qkv(q, k, v)
    lead, Tq = q.shape[:-2], q.shape[-2]
    dv = v.shape[-1]
    dout = _checks.float_array(dout, "dout", ndim_min=2)
    out = _checks.float_array(out, "out", ndim_min=2)
    lse = _checks.float_array(lse, "lse", ndim_min=1, finite=False)
    _checks.same_dtype({"q": q, "dout": dout, "out": out, "lse": lse})
    _checks.shape_is(dout, lead + (Tq, dv), "dout")
    _checks.shape_is(out, lead + (Tq, dv), "out")
    _checks.shape_is(lse, lead + (Tq,), "lse")
    if np.isnan(lse).any() or np.isposinf(lse).any():
        raise ValueError("lse contains NaN or +inf; pass the lse that attention_forward returned")
    s, causal, mask, B, fn = _options(q, v, mask, causal, scale, backend, "attention_backward")
    if B == 0:
        return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dq, dk, dvv = _run_kernel(
        fn, "attention_backward", dtype, _flat3(dout, B), _flat3(q, B), _flat3(k, B),
        _flat3(v, B), _flat3(out, B), lse.reshape(B, Tq), s, causal, mask)
    if not (np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dvv).all()):
        raise _overflow("attention_backward", dtype)
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
