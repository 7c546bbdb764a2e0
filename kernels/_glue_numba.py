"""The training step's glue kernels in Numba: same names, signatures and results as
``kernels.glue_loop`` (the reference, which also documents the arguments).

Each kernel makes one pass over its rows (LayerNorm's backward, say, reads dy and x once and
writes dx, with dg and db summed on the way) instead of the several whole-array passes of the
NumPy version. They run on the calling thread: at a training step's sizes a pass takes some
0.1 ms, less than a parallel region costs, and a parallel region stalls when another process
holds a core (measured: 50 to 100 times slower under such load, against unchanged serial).
Column sums (dg, db) go into partial sums over fixed chunks of rows, then over the chunks in
order. Exponentials use ``vexp`` (vectorised).
"""

from __future__ import annotations

import numpy as np
from numba import typed

from ._numba_math import FASTMATH, fmax, njit_cached, vexp, wide_vectors

_FM = set(FASTMATH)
_ROWS_PER_CHUNK = 64  # rows per partial sum of the column-summing kernels


@njit_cached(fastmath=_FM)
def _row_stats_scaled(row, eps):
    """(mean, rstd) of one row in its dtype, computed in float64 on the row scaled by its
    largest |x| (glue_vectorized.row_stats_scaled): for a row whose sum or sum of squares
    overflowed its dtype (a float32 row of 1e20: its squares are beyond float32)."""
    wide_vectors()
    t = row.dtype.type
    C = row.shape[0]
    m = 0.0
    for c in range(C):
        m = max(m, abs(np.float64(row[c])))
    if not m > 0.0:
        m = 1.0
    s = 0.0
    for c in range(C):
        s += np.float64(row[c]) / m
    mu = s / C
    ss = 0.0
    for c in range(C):
        d = np.float64(row[c]) / m - mu
        ss += d * d
    return t(mu * m), t(1.0 / (m * np.sqrt(ss / C + eps / m / m)))


@njit_cached(fastmath=_FM)
def _layernorm_forward(x, g, b, eps, y, mean, rstd):
    wide_vectors()
    N, C = x.shape
    t = x.dtype.type
    inv_c = t(1.0) / t(C)
    big = t(np.inf)
    for n in range(N):
        s = t(0.0)
        for c in range(C):
            s += x[n, c]
        mu = s * inv_c
        ss = t(0.0)
        for c in range(C):
            d = x[n, c] - mu
            ss += d * d
        r = t(1.0) / np.sqrt(ss * inv_c + t(eps))
        if not (abs(s) < big and ss < big):  # overflowed: again, scaled, in float64
            mu, r = _row_stats_scaled(x[n], eps)
        for c in range(C):
            y[n, c] = (x[n, c] - mu) * r * g[c] + b[c]
        mean[n] = mu
        rstd[n] = r


def layernorm_forward(x, g, b, eps):
    N = x.shape[0]
    y = np.empty_like(x)
    mean = np.empty(N, dtype=x.dtype)
    rstd = np.empty(N, dtype=x.dtype)
    _layernorm_forward(x, g, b, eps, y, mean, rstd)
    return y, mean, rstd


def _chunks(N):
    return max(1, -(-N // _ROWS_PER_CHUNK))


@njit_cached(fastmath=_FM)
def _layernorm_backward(dy, x, g, mean, rstd, dx, dg_part, db_part):
    wide_vectors()
    N, C = x.shape
    t = x.dtype.type
    inv_c = t(1.0) / t(C)
    n_chunks = dg_part.shape[0]
    for k in range(n_chunks):
        dgk = dg_part[k]
        dbk = db_part[k]
        for n in range(k * N // n_chunks, (k + 1) * N // n_chunks):
            r, mu = rstd[n], mean[n]
            a = t(0.0)
            c2 = t(0.0)
            for c in range(C):
                xhat = (x[n, c] - mu) * r
                dxhat = dy[n, c] * g[c]
                a += dxhat
                c2 += dxhat * xhat
                dgk[c] += dy[n, c] * xhat
                dbk[c] += dy[n, c]
            a *= inv_c
            c2 *= inv_c
            for c in range(C):
                xhat = (x[n, c] - mu) * r
                dx[n, c] = r * (dy[n, c] * g[c] - a - xhat * c2)


def layernorm_backward(dy, x, g, mean, rstd):
    C = x.shape[1]
    dx = np.empty_like(x)
    parts = np.zeros((2, _chunks(x.shape[0]), C), dtype=x.dtype)
    _layernorm_backward(dy, x, g, mean, rstd, dx, parts[0], parts[1])
    return dx, parts[0].sum(axis=0), parts[1].sum(axis=0)


@njit_cached(fastmath=_FM)
def _bias_add(y, b):
    wide_vectors()
    N, C = y.shape
    for n in range(N):
        for c in range(C):
            y[n, c] += b[c]


def bias_add(y, b):
    # NumPy's y += b runs its inner loop once per row (C wide); one loop here: 2.6-2.9x faster
    # at (3712, 64-192) float32
    _bias_add(y, b)
    return y


@njit_cached(fastmath=_FM)
def _bias_relu_forward(h, b, y):
    wide_vectors()
    N, C = h.shape
    zero = h.dtype.type(0.0)
    for n in range(N):
        for c in range(C):
            y[n, c] = fmax(h[n, c] + b[c], zero)


def bias_relu_forward(h, b):
    y = np.empty_like(h)
    _bias_relu_forward(h, b, y)
    return y


@njit_cached(fastmath=_FM)
def _bias_relu_backward(dy, y, dh, db_part):
    wide_vectors()
    N, C = dy.shape
    zero = dy.dtype.type(0.0)
    n_chunks = db_part.shape[0]
    for k in range(n_chunks):
        dbk = db_part[k]
        for n in range(k * N // n_chunks, (k + 1) * N // n_chunks):
            for c in range(C):
                v = dy[n, c] if y[n, c] > zero else zero
                dh[n, c] = v
                dbk[c] += v


def bias_relu_backward(dy, y):
    dh = np.empty_like(dy)
    db_part = np.zeros((_chunks(dy.shape[0]), dy.shape[1]), dtype=dy.dtype)
    _bias_relu_backward(dy, y, dh, db_part)
    return dh, db_part.sum(axis=0)


@njit_cached(fastmath=_FM)
def _softmax_xent_forward(x, t, loss, lse):
    wide_vectors()
    N, V = x.shape
    tp = x.dtype.type
    for n in range(N):
        m = x[n, 0]
        for j in range(1, V):
            m = fmax(m, x[n, j])
        s = tp(0.0)
        for j in range(V):
            s += vexp(x[n, j] - m)
        lse[n] = m + np.log(s)
        loss[n] = lse[n] - x[n, t[n]] if t[n] >= 0 else tp(0.0)


def softmax_xent_forward(x, t):
    N = x.shape[0]
    loss = np.empty(N, dtype=x.dtype)
    lse = np.empty(N, dtype=x.dtype)
    _softmax_xent_forward(x, t, loss, lse)
    return loss, lse


@njit_cached(fastmath=_FM)
def _softmax_xent_backward(x, t, lse, scale, dx):
    wide_vectors()
    N, V = x.shape
    zero = x.dtype.type(0.0)
    for n in range(N):
        if t[n] < 0:
            for j in range(V):
                dx[n, j] = zero
            continue
        for j in range(V):
            dx[n, j] = scale * vexp(x[n, j] - lse[n])
        dx[n, t[n]] -= scale


def softmax_xent_backward(x, t, lse, scale):
    dx = np.empty_like(x)
    _softmax_xent_backward(x, t, lse, x.dtype.type(scale), dx)
    return dx


@njit_cached(fastmath=_FM, error_model="numpy")  # no division check: LLVM vectorises the loop
def _adam_update(params, grads, ms, vs, lr_t, b1, c1, b2, c2, eps):
    wide_vectors()
    for a in range(len(params)):  # one serial pass: a model's parameters are few and small
        p, g, m, v = params[a], grads[a], ms[a], vs[a]
        for i in range(p.shape[0]):
            gi = g[i]
            m[i] = b1 * m[i] + c1 * gi  # beta m + (1 - beta) g: an inf v stays inf (glue_loop)
            v[i] = b2 * v[i] + c2 * (gi * gi)
            p[i] -= lr_t * m[i] / (np.sqrt(v[i]) + eps)


def flat_list(arrays):
    """A typed list of 1-D views of C-contiguous arrays (what ``adam_update`` takes); build it
    once per list of arrays and pass it again (it holds views, so it follows in-place updates).
    """
    return typed.List([a.reshape(-1) for a in arrays])


_LISTS: dict = {}  # the last lists' typed lists (an optimizer passes the same ones every step)


def _typed_lists(arrays4):
    key = tuple(id(a) for lst in arrays4 for a in lst)
    hit = _LISTS.get("key")
    if hit is None or hit[0] != key:
        # the entry holds the arrays, so no id in the key can be reused while it is kept
        hit = (key, [flat_list(lst) for lst in arrays4], arrays4)
        _LISTS["key"] = hit
    return hit[1]


def adam_update(params, grads, ms, vs, lr_t, beta1, beta2, eps):
    if len(params) == 0:
        return
    if all(isinstance(a, typed.List) for a in (params, grads, ms, vs)):
        lists = [params, grads, ms, vs]
    else:
        lists = _typed_lists([list(a) for a in (params, grads, ms, vs)])
    t = lists[0][0].dtype.type
    _adam_update(*lists, t(lr_t), t(beta1), t(1 - beta1), t(beta2), t(1 - beta2), t(eps))

