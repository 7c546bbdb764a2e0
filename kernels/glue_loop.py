"""Reference kernels of a Transformer training step's glue: plain loops, the source of truth.

The glue is what a training step runs around the attention and the matrix products:
LayerNorm, the bias and ReLU after a product, the output layer's softmax with cross-entropy,
and Adam's update. ``kernels.glue_vectorized`` (NumPy) and ``kernels._glue_numba`` (Numba)
follow these name for name, with the same intermediate values. Arrays are 2-D rows (N, C)
unless said otherwise, C-contiguous, all float arguments of one dtype; the loops accumulate in
float64.

| kernel | arguments | returns |
|---|---|---|
| ``layernorm_forward`` | x (N,C), g (C,), b (C,), eps | y (N,C), mean (N,), rstd (N,) |
| ``layernorm_backward`` | dy (N,C), x, g, mean, rstd | dx (N,C), dg (C,), db (C,) |
| ``bias_add`` | y (N,C), b (C,) | y, with y += b on every row (in place) |
| ``bias_relu_forward`` | h (N,C), b (C,) | y = max(h + b, 0) (N,C) |
| ``bias_relu_backward`` | dy (N,C), y | dh = dy * (y > 0) (N,C), db = sum_rows dh (C,) |
| ``softmax_xent_forward`` | x (N,V), t (N,) int64, -1 = ignored | loss (N,), lse (N,) |
| ``softmax_xent_backward`` | x (N,V), t, lse, scale | dx = scale (softmax(x) - onehot(t)) |
| ``adam_update`` | params, grads, ms, vs (lists), lr_t, beta1, beta2, eps | None (in place) |

``softmax_xent``: loss[n] = lse[n] - x[n, t[n]] with lse the row log-sum-exp; an ignored row
(t = -1) has loss 0 and a zero gradient row. ``adam_update`` is the book's Adam step on every
array of the lists: m += (1 - beta1) (g - m); v += (1 - beta2) (g^2 - v);
p -= lr_t m / (sqrt(v) + eps). The moments are computed as beta m + (1 - beta) g, the same
sum: once v has overflowed to inf (a float32 gradient of 1e30, whose square is beyond float32)
it stays inf and that parameter stops moving, where v + (1 - beta2) (g^2 - v) would be
inf - inf = NaN at the next step.
"""

from __future__ import annotations

import math

import numpy as np


def layernorm_forward(x, g, b, eps):
    N, C = x.shape
    y = np.empty_like(x)
    mean = np.empty(N, dtype=x.dtype)
    rstd = np.empty(N, dtype=x.dtype)
    for n in range(N):
        s = 0.0
        for c in range(C):
            s += float(x[n, c])
        mu = s / C
        ss = 0.0
        for c in range(C):
            ss += (float(x[n, c]) - mu) ** 2
        r = 1.0 / math.sqrt(ss / C + eps)
        for c in range(C):
            y[n, c] = (float(x[n, c]) - mu) * r * float(g[c]) + float(b[c])
        mean[n], rstd[n] = mu, r
    return y, mean, rstd


def layernorm_backward(dy, x, g, mean, rstd):
    # forward: xhat = (x - mean) rstd, y = xhat g + b, so dg = sum_n dy xhat, db = sum_n dy and,
    # with dxhat = dy g: dx = rstd (dxhat - mean_c(dxhat) - xhat mean_c(dxhat xhat))
    N, C = x.shape
    dx = np.empty_like(x)
    dg = np.zeros(C)
    db = np.zeros(C)
    for n in range(N):
        r, mu = float(rstd[n]), float(mean[n])
        a = 0.0
        c2 = 0.0
        for c in range(C):
            xhat = (float(x[n, c]) - mu) * r
            dxhat = float(dy[n, c]) * float(g[c])
            a += dxhat
            c2 += dxhat * xhat
            dg[c] += float(dy[n, c]) * xhat
            db[c] += float(dy[n, c])
        a /= C
        c2 /= C
        for c in range(C):
            xhat = (float(x[n, c]) - mu) * r
            dx[n, c] = r * (float(dy[n, c]) * float(g[c]) - a - xhat * c2)
    return dx, dg.astype(x.dtype), db.astype(x.dtype)


def bias_add(y, b):
    N, C = y.shape
    for n in range(N):
        for c in range(C):
            y[n, c] = float(y[n, c]) + float(b[c])  # one rounding, as y + b in y's dtype
    return y


def bias_relu_forward(h, b):
    N, C = h.shape
    y = np.empty_like(h)
    for n in range(N):
        for c in range(C):
            y[n, c] = max(float(h[n, c]) + float(b[c]), 0.0)
    return y


def bias_relu_backward(dy, y):
    # forward: y = max(h + b, 0), so dh = dy where y > 0 (else 0) and db = sum over rows of dh
    N, C = dy.shape
    dh = np.empty_like(dy)
    db = np.zeros(C)
    for n in range(N):
        for c in range(C):
            v = float(dy[n, c]) if y[n, c] > 0 else 0.0
            dh[n, c] = v
            db[c] += v
    return dh, db.astype(dy.dtype)


def softmax_xent_forward(x, t):
    N, V = x.shape
    loss = np.zeros(N, dtype=x.dtype)
    lse = np.empty(N, dtype=x.dtype)
    for n in range(N):
        m = max(float(x[n, j]) for j in range(V))
        s = 0.0
        for j in range(V):
            s += math.exp(float(x[n, j]) - m)
        lse[n] = m + math.log(s)
        if t[n] >= 0:
            loss[n] = m + math.log(s) - float(x[n, t[n]])
    return loss, lse


def softmax_xent_backward(x, t, lse, scale):
    # forward: loss = lse - x[t], so dloss/dx[j] = softmax(x)[j] - (j == t)
    N, V = x.shape
    dx = np.zeros_like(x)
    for n in range(N):
        if t[n] < 0:
            continue
        for j in range(V):
            p = math.exp(float(x[n, j]) - float(lse[n]))
            dx[n, j] = scale * (p - (1.0 if j == t[n] else 0.0))
    return dx


def adam_update(params, grads, ms, vs, lr_t, beta1, beta2, eps):
    for p, g, m, v in zip(params, grads, ms, vs, strict=True):
        for i in np.ndindex(p.shape):  # element by element, in place (views included)
            gi = float(g[i])
            m[i] = beta1 * float(m[i]) + (1 - beta1) * gi
            v[i] = beta2 * float(v[i]) + (1 - beta2) * (gi * gi)
            p[i] = float(p[i]) - lr_t * float(m[i]) / (math.sqrt(float(v[i])) + eps)
