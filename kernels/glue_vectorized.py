"""The training step's glue kernels in NumPy: same names, signatures and results as
``kernels.glue_loop`` (the reference, which also documents the arguments)."""

from __future__ import annotations

import numpy as np


def row_stats_scaled(x, eps):
    """(mean, rstd) in float64 of the rows of x (n, C), each row scaled by its largest |x|
    first, so that neither its sum nor its sum of squares overflows (rows of 1e20 in float32:
    their squares are beyond float32). For the rows whose statistics overflowed."""
    x = x.astype(np.float64)
    m = np.abs(x).max(axis=1)  # (n,)
    m = np.where(m > 0, m, 1.0)
    xs = x / m[:, None]
    mu = xs.mean(axis=1)  # (n,)
    var = ((xs - mu[:, None]) ** 2).mean(axis=1)  # (n,): the variance / m^2
    with np.errstate(under="ignore"):
        rstd = 1 / (m * np.sqrt(var + eps / m / m))
    return mu * m, rstd


def layernorm_forward(x, g, b, eps):
    t = x.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):
        mean = x.mean(axis=1)  # (N,)
        xc = x - mean[:, None]  # (N, C)
        ss = np.einsum("ij,ij->i", xc, xc)  # (N,)
    rstd = 1 / np.sqrt(ss / t(x.shape[1]) + t(eps))  # (N,)
    bad = ~(np.isfinite(mean) & np.isfinite(ss))  # overflowed: again, scaled, in float64
    if bad.any():
        mean[bad], rstd[bad] = row_stats_scaled(x[bad], eps)
        xc[bad] = x[bad] - mean[bad, None]
    xc *= rstd[:, None]  # xhat
    y = xc * g
    y += b
    return y, mean, rstd.astype(x.dtype, copy=False)


def layernorm_backward(dy, x, g, mean, rstd):
    t = x.dtype.type
    xhat = (x - mean[:, None]) * rstd[:, None]  # (N, C)
    dg = np.einsum("ij,ij->j", dy, xhat)  # (C,)
    db = dy.sum(axis=0)  # (C,)
    dxhat = dy * g  # (N, C)
    a = dxhat.mean(axis=1)  # (N,)
    c = np.einsum("ij,ij->i", dxhat, xhat) / t(x.shape[1])  # (N,)
    dxhat -= a[:, None]
    dxhat -= xhat * c[:, None]
    dxhat *= rstd[:, None]
    return dxhat, dg, db


def bias_add(y, b):
    y += b
    return y


def bias_relu_forward(h, b):
    y = h + b
    np.maximum(y, 0, out=y)
    return y


def bias_relu_backward(dy, y):
    dh = np.multiply(dy, y > 0)
    return dh, dh.sum(axis=0)


def softmax_xent_forward(x, t):
    m = x.max(axis=1)  # (N,)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))  # (N,)
    keep = t >= 0
    picked = x[np.arange(x.shape[0]), np.where(keep, t, 0)]  # (N,)
    loss = np.where(keep, lse - picked, x.dtype.type(0))
    return loss.astype(x.dtype, copy=False), lse.astype(x.dtype, copy=False)


def softmax_xent_backward(x, t, lse, scale):
    dx = np.exp(x - lse[:, None])  # softmax (N, V)
    keep = t >= 0
    rows = np.flatnonzero(keep)
    dx[rows, t[rows]] -= 1
    dx *= x.dtype.type(scale)
    dx[~keep] = 0
    return dx


def adam_update(params, grads, ms, vs, lr_t, beta1, beta2, eps):
    for p, g, m, v in zip(params, grads, ms, vs, strict=True):
        t = p.dtype.type
        m *= t(beta1)  # beta m + (1 - beta) g: no inf - inf once v is inf (glue_loop)
        m += t(1 - beta1) * g
        v *= t(beta2)
        v += t(1 - beta2) * (g * g)
        p -= t(lr_t) * m / (np.sqrt(v) + t(eps))
