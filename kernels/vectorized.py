"""The kernels in vectorized NumPy: batched matmuls and ufuncs, no Python loops over data.

Same names, signatures, intermediate values and masking rule as ``kernels.loop``. The fused
attention kernels here materialise the (B, Tq, Tk) score matrix; that is the point of the
comparison with the Numba flash kernels, which do not. They live, with all their features,
in ``kernels.vectorized_attention``.
"""

from __future__ import annotations

import numpy as np

from .vectorized_attention import attention_backward, attention_forward  # noqa: F401


def softmax_forward(x):
    """y[b, i, :] = softmax(x[b, i, :]). x (B, Tq, Tk) -> y; an all -inf row gives zeros."""
    m = x.max(axis=-1, keepdims=True)  # (B, Tq, 1)
    m = np.where(np.isfinite(m), m, 0).astype(x.dtype, copy=False)
    e = np.exp(x - m)  # (B, Tq, Tk)
    total = e.sum(axis=-1, keepdims=True)  # (B, Tq, 1)
    total[total == 0] = 1
    e /= total
    return e


def softmax_backward(dy, y):
    """dx = y * (dy - sum(y * dy, last axis)). dy, y (B, Tq, Tk) -> dx (B, Tq, Tk)."""
    dx = y * dy
    dx -= y * dx.sum(axis=-1, keepdims=True)
    return dx


def weighted_sum_forward(score, value):
    """z = score @ value. score (B, Tq, Tk), value (B, Tk, d) -> z (B, Tq, d)."""
    return np.matmul(score, value)


def weighted_sum_backward(dz, score, value):
    """dscore = dz @ value^T (B, Tq, Tk), dvalue = score^T @ dz (B, Tk, d)."""
    dscore = np.matmul(dz, value.transpose(0, 2, 1))
    dvalue = np.matmul(score.transpose(0, 2, 1), dz)
    return dscore, dvalue


def scores_forward(q, k, scale):
    """s = scale * q @ k^T. q (B, Tq, d), k (B, Tk, d) -> s (B, Tq, Tk)."""
    s = np.matmul(q, k.transpose(0, 2, 1))
    s *= q.dtype.type(scale)
    return s


def scores_backward(ds, q, k, scale):
    """dq = scale * ds @ k (B, Tq, d), dk = scale * ds^T @ q (B, Tk, d)."""
    sc = q.dtype.type(scale)
    dq = np.matmul(ds, k)
    dq *= sc
    dk = np.matmul(ds.transpose(0, 2, 1), q)
    dk *= sc
    return dq, dk


def embedding_backward(idx, dout, V):
    """Scatter-add dW[idx[n, t]] += dout[n, t] -> dW (V, D), as one weighted bincount."""
    D = dout.shape[2]
    flat = idx.reshape(-1).astype(np.intp, copy=False)  # (N*T,)
    keys = (flat[:, None] * D + np.arange(D)).reshape(-1)  # (N*T*D,) flat index into dW
    dW = np.bincount(keys, weights=dout.reshape(-1), minlength=V * D)  # float64 sums
    return dW.reshape(V, D).astype(dout.dtype)
