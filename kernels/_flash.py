"""Fused attention kernels in Numba: ``attention_forward`` and ``attention_backward``.

Same signatures, results and masking rule as ``kernels.loop``: entry (b, i, j) is allowed when
``mask`` (None, or the compact bool array (1 or B, 1 or Tq, Tk)) is True there and, with
``causal``, j <= i; a row with nothing allowed gives out 0, lse -inf and zero gradients.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_NO_MASK = np.ones((1, 1, 1), dtype=np.bool_)


@njit(parallel=True, cache=True)
def _forward_rows(q, k, v, scale, causal, mask, has_mask):
    B, Tq, d = q.shape
    Tk, dv = v.shape[1], v.shape[2]
    zero = q.dtype.type(0)
    ninf = q.dtype.type(-np.inf)
    out = np.zeros((B, Tq, dv), dtype=q.dtype)
    lse = np.empty((B, Tq), dtype=q.dtype)
    for b in prange(B):
        s = np.empty(Tk, dtype=q.dtype)
        mb = min(np.intp(b), mask.shape[0] - 1)  # the mask has 1 or B entries
        for i in range(Tq):
            mi = min(i, mask.shape[1] - 1)  # and 1 or Tq rows
            m = ninf
            for j in range(Tk):
                if (causal and j > i) or (has_mask and not mask[mb, mi, j]):
                    s[j] = ninf
                    continue
                acc = zero
                for c in range(d):
                    acc += q[b, i, c] * k[b, j, c]
                s[j] = acc * scale
                m = max(m, s[j])
            if m == ninf:
                lse[b, i] = ninf  # nothing to attend to: out stays 0
                continue
            total = zero
            for j in range(Tk):
                e = np.exp(s[j] - m) if s[j] != ninf else zero
                s[j] = e
                total += e
            for j in range(Tk):
                if s[j] != zero:
                    for c in range(dv):
                        out[b, i, c] += s[j] * v[b, j, c]
            inv = q.dtype.type(1) / total
            for c in range(dv):
                out[b, i, c] *= inv
            lse[b, i] = m + np.log(total)
    return out, lse


@njit(parallel=True, cache=True)
def _backward_rows(dout, q, k, v, out, lse, scale, causal, mask, has_mask):
    B, Tq, d = q.shape
    Tk, dvd = v.shape[1], v.shape[2]
    zero = q.dtype.type(0)
    ninf = q.dtype.type(-np.inf)
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for b in prange(B):  # each batch entry owns dq[b], dk[b], dv[b]: no races
        mb = min(np.intp(b), mask.shape[0] - 1)  # the mask has 1 or B entries
        for i in range(Tq):
            row_lse = lse[b, i]
            if row_lse == ninf:
                continue  # a row with nothing to attend to has no gradient
            mi = min(i, mask.shape[1] - 1)  # and 1 or Tq rows
            D = zero
            for c in range(dvd):
                D += dout[b, i, c] * out[b, i, c]
            for j in range(Tk):
                if (causal and j > i) or (has_mask and not mask[mb, mi, j]):
                    continue
                acc = zero
                for c in range(d):
                    acc += q[b, i, c] * k[b, j, c]
                p = np.exp(acc * scale - row_lse)
                dp = zero
                for c in range(dvd):
                    dv[b, j, c] += p * dout[b, i, c]
                    dp += v[b, j, c] * dout[b, i, c]
                ds = p * (dp - D) * scale
                for c in range(d):
                    dq[b, i, c] += ds * k[b, j, c]
                    dk[b, j, c] += ds * q[b, i, c]
    return dq, dk, dv


def _prepare(arrays, scale, mask):
    arrays = [np.ascontiguousarray(a) for a in arrays]
    dtype = arrays[0].dtype
    if mask is None:
        mask, has_mask = _NO_MASK, False
    else:
        mask, has_mask = np.ascontiguousarray(mask, dtype=np.bool_), True
    return arrays, dtype.type(scale), mask, has_mask


def attention_forward(q, k, v, scale, causal, mask):
    """out = softmax(scale q k^T, masked) v (B, Tq, dv), lse (B, Tq); see kernels.loop."""
    (q, k, v), scale, mask, has_mask = _prepare((q, k, v), scale, mask)
    return _forward_rows(q, k, v, scale, bool(causal), mask, has_mask)


def attention_backward(dout, q, k, v, out, lse, scale, causal, mask):
    """Gradients of attention_forward -> dq (B, Tq, d), dk (B, Tk, d), dv (B, Tk, dv)."""
    arrays, scale, mask, has_mask = _prepare((dout, q, k, v, out, lse), scale, mask)
    return _backward_rows(*arrays, scale, bool(causal), mask, has_mask)
