"""The reference kernels: plain Python loops, one scalar at a time.

This module is the source of truth. ``kernels.vectorized`` and ``kernels.numba_backend``
follow it name for name, with the same intermediate values and the same masking rule:

* entry (b, i, j) of a score matrix is *allowed* when ``mask`` (broadcast to (B, Tq, Tk)) is
  True there, or mask is None, and, with ``causal=True``, ``j <= i``;
* a query row with no allowed entry gives zeros in ``out``, ``lse = -inf`` and zero gradients.

The fused attention kernels, with all their features (grouped queries, causal alignment,
windows, bias, ALiBi, dropout, packed sequences), live in ``kernels.loop_attention``.

Loops run in Python floats (float64) and results are returned in the dtype of the inputs.
Use only tiny shapes: this is slow on purpose.
"""

from __future__ import annotations

import math

import numpy as np

from .loop_attention import attention_backward, attention_forward  # noqa: F401


def softmax_forward(x):
    """y[b, i, :] = softmax(x[b, i, :]). x (B, Tq, Tk) -> y (B, Tq, Tk).

    A row that is all -inf gives a row of zeros.
    """
    B, Tq, Tk = x.shape
    y = np.zeros_like(x)
    for b in range(B):
        for i in range(Tq):
            m = -math.inf
            for j in range(Tk):
                m = max(m, float(x[b, i, j]))
            if m == -math.inf:
                continue  # nothing to attend to: zeros
            total = 0.0
            for j in range(Tk):
                total += math.exp(float(x[b, i, j]) - m)
            for j in range(Tk):
                y[b, i, j] = math.exp(float(x[b, i, j]) - m) / total
    return y


def softmax_backward(dy, y):
    """dx = y * (dy - sum(y * dy, last axis)). dy, y (B, Tq, Tk) -> dx (B, Tq, Tk)."""
    B, Tq, Tk = y.shape
    dx = np.zeros_like(y)
    for b in range(B):
        for i in range(Tq):
            dot = 0.0
            for j in range(Tk):
                dot += float(y[b, i, j]) * float(dy[b, i, j])
            for j in range(Tk):
                dx[b, i, j] = float(y[b, i, j]) * (float(dy[b, i, j]) - dot)
    return dx


def weighted_sum_forward(score, value):
    """z[b, i] = sum_j score[b, i, j] * value[b, j].

    score (B, Tq, Tk), value (B, Tk, d) -> z (B, Tq, d).
    """
    B, Tq, Tk = score.shape
    d = value.shape[2]
    z = np.zeros((B, Tq, d), dtype=value.dtype)
    for b in range(B):
        for i in range(Tq):
            for c in range(d):
                acc = 0.0
                for j in range(Tk):
                    acc += float(score[b, i, j]) * float(value[b, j, c])
                z[b, i, c] = acc
    return z


def weighted_sum_backward(dz, score, value):
    """Gradients of weighted_sum_forward. dz (B, Tq, d) -> dscore (B, Tq, Tk), dvalue (B, Tk, d).

    In the forward pass this was ``z[b, i, c] += score[b, i, j] * value[b, j, c]``, so now
    ``dscore[b, i, j] += value[b, j, c] * dz[b, i, c]`` and
    ``dvalue[b, j, c] += score[b, i, j] * dz[b, i, c]``.
    """
    B, Tq, Tk = score.shape
    d = value.shape[2]
    dscore = np.zeros_like(score)
    dvalue = np.zeros_like(value)
    for b in range(B):
        for i in range(Tq):
            for j in range(Tk):
                acc = 0.0
                for c in range(d):
                    acc += float(value[b, j, c]) * float(dz[b, i, c])
                dscore[b, i, j] = acc
        for j in range(Tk):
            for c in range(d):
                acc = 0.0
                for i in range(Tq):
                    acc += float(score[b, i, j]) * float(dz[b, i, c])
                dvalue[b, j, c] = acc
    return dscore, dvalue


def scores_forward(q, k, scale):
    """s[b, i, j] = scale * q[b, i] . k[b, j]. q (B, Tq, d), k (B, Tk, d) -> s (B, Tq, Tk)."""
    B, Tq, d = q.shape
    Tk = k.shape[1]
    s = np.zeros((B, Tq, Tk), dtype=q.dtype)
    for b in range(B):
        for i in range(Tq):
            for j in range(Tk):
                acc = 0.0
                for c in range(d):
                    acc += float(q[b, i, c]) * float(k[b, j, c])
                s[b, i, j] = scale * acc
    return s


def scores_backward(ds, q, k, scale):
    """Gradients of scores_forward. ds (B, Tq, Tk) -> dq (B, Tq, d), dk (B, Tk, d).

    In the forward pass this was ``s[b, i, j] += scale * q[b, i, c] * k[b, j, c]``, so now
    ``dq[b, i, c] += scale * ds[b, i, j] * k[b, j, c]`` and
    ``dk[b, j, c] += scale * ds[b, i, j] * q[b, i, c]``.
    """
    B, Tq, d = q.shape
    Tk = k.shape[1]
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    for b in range(B):
        for i in range(Tq):
            for c in range(d):
                acc = 0.0
                for j in range(Tk):
                    acc += float(ds[b, i, j]) * float(k[b, j, c])
                dq[b, i, c] = scale * acc
        for j in range(Tk):
            for c in range(d):
                acc = 0.0
                for i in range(Tq):
                    acc += float(ds[b, i, j]) * float(q[b, i, c])
                dk[b, j, c] = scale * acc
    return dq, dk


def embedding_backward(idx, dout, V):
    """Scatter-add: dW[idx[n, t]] += dout[n, t]. idx (N, T) int, dout (N, T, D) -> dW (V, D)."""
    N, T, D = dout.shape
    dW = np.zeros((V, D))  # accumulate in float64, return in the dtype of dout
    for n in range(N):
        for t in range(T):
            row = int(idx[n, t])
            for c in range(D):
                dW[row, c] += float(dout[n, t, c])
    return dW.astype(dout.dtype)
