"""Error bounds, as (terms, n) pairs for ``helpers.assert_close``, derived from the computation.

Everything here is float64. ``terms`` is the sum of |terms| an output adds up; ``n`` the number
of roundings along the chain that produces it (see ``helpers``). For a result computed from
other rounded results, the error of the inputs is carried through: a softmax probability p
computed from scores with absolute errors <= e eps is off by at most p * 2e eps relatively, and
that relative error is carried into every sum that p enters.
"""

from __future__ import annotations

import numpy as np

F64 = np.float64


def _f64(x):
    return np.asarray(x, dtype=F64)


def matmul_terms(a, b):
    """|a| @ |b| in float64: for each entry of ``a @ b``, the sum of the |terms| it adds up."""
    return np.abs(_f64(a)) @ np.abs(_f64(b))


def _t(x):
    return np.swapaxes(x, -1, -2)


def kernel_bounds(name, args):
    """[(terms, n), ...], one per result of the unfused kernel ``name`` called with ``args``
    (the kernels' own signatures, see DESIGN's kernel table)."""
    if name == "softmax_forward":
        x = _f64(args[0])  # (B, Tq, Tk), -inf allowed
        m = x.max(-1, keepdims=True)
        live = np.isfinite(m)
        z = np.where(np.isfinite(x) & live, x - np.where(live, m, 0.0), -np.inf)
        e = np.exp(z)
        s = e.sum(-1, keepdims=True)
        y = np.divide(e, s, out=np.zeros_like(e), where=s > 0)
        spread = np.where(np.isfinite(z), -z, 0.0).max(-1, keepdims=True)
        # exp(x - m): the rounding of x - m (|x - m| eps) and of exp (a few eps); the row sum
        # (Tk terms, each >= 0) and the division
        return [(y, x.shape[-1] + 2 * spread + 8)]
    if name == "softmax_backward":
        dy, y = _f64(args[0]), _f64(args[1])
        dot = (y * np.abs(dy)).sum(-1, keepdims=True)  # terms of sum(y * dy)
        return [(y * (np.abs(dy) + dot), y.shape[-1] + 4)]
    if name == "weighted_sum_forward":
        score, value = args
        return [(matmul_terms(score, value), score.shape[-1] + 2)]
    if name == "weighted_sum_backward":
        dz, score, value = args
        return [(matmul_terms(dz, _t(value)), value.shape[-1] + 2),
                (matmul_terms(_t(score), dz), score.shape[-2] + 2)]
    if name == "scores_forward":
        q, k, scale = args
        return [(abs(scale) * matmul_terms(q, _t(k)), q.shape[-1] + 3)]
    if name == "scores_backward":
        ds, q, k, scale = args
        return [(abs(scale) * matmul_terms(ds, k), ds.shape[-1] + 3),
                (abs(scale) * matmul_terms(_t(ds), q), ds.shape[-2] + 3)]
    if name == "embedding_backward":
        idx, dout, n_rows = args
        terms = np.zeros((n_rows, dout.shape[-1]))
        np.add.at(terms, idx, np.abs(_f64(dout)))
        count = np.bincount(np.ravel(idx), minlength=n_rows).max(initial=0)
        return [(terms, count + 2)]
    raise ValueError(f"no bound for kernel {name!r}")


def attention_probs(forward, q, k, **kw):
    """The float64 attention probabilities P (..., H, Tq, Tk) that ``forward(q, k, v, **kw) ->
    (out, lse)`` applies, read off by running it on identity values (out = P @ I = P): masks,
    windows, biases, packed sequences and dropout are whatever ``forward`` makes of them."""
    k = _f64(k)
    Tk = k.shape[-2]
    eye = np.ascontiguousarray(np.broadcast_to(np.eye(Tk), k.shape[:-1] + (Tk,)))
    out, _ = forward(_f64(q), k, eye, **kw)
    return _f64(out)


def kernel_attention_scores(q, k, scale, causal, mask):
    """S (B, Tq, Tk) in float64 of the kernel-level attention (DESIGN's kernel table): scale
    q k^T where a key is allowed (``mask`` broadcast to (B, Tq, Tk) and, with causal, j <= i),
    -inf elsewhere."""
    q, k = _f64(q), _f64(k)
    B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
    allowed = np.ones((B, Tq, Tk), dtype=bool)
    if causal:
        allowed &= np.arange(Tk)[None, None, :] <= np.arange(Tq)[None, :, None]
    if mask is not None:
        allowed &= np.broadcast_to(mask, (B, Tq, Tk))
    return np.where(allowed, scale * (q @ _t(k)), -np.inf)


def kernel_attention_probs(q, k, scale, causal, mask):
    """P (B, Tq, Tk) in float64 of the kernel-level attention: the softmax of
    :func:`kernel_attention_scores` over each row; rows with no allowed key are zeros."""
    s = kernel_attention_scores(q, k, scale, causal, mask)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    total = e.sum(-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def _per_query_head(x, H):
    """k or v (..., Hkv, Tk, c) repeated to the query heads (..., H, Tk, c) (GQA)."""
    if x.ndim >= 3 and x.shape[-3] != H:
        return np.repeat(x, H // max(x.shape[-3], 1), axis=-3)
    return x


def _per_kv_head(x, Hkv):
    """Sum of per-query-head gradients (..., H, Tk, c) over each group: (..., Hkv, Tk, c)."""
    if x.ndim >= 3 and x.shape[-3] != Hkv:
        g = x.shape[-3] // Hkv
        return x.reshape(x.shape[:-3] + (Hkv, g) + x.shape[-2:]).sum(-3)
    return x


def attention_bounds(q, k, v, P, *, scale, dout=None, P_drop=None, bias_abs=0.0, depth=0):
    """(terms, n) for out, lse and, given ``dout``, dq, dk, dv and ds (the score gradient, the
    bias gradient before any sum over broadcast dimensions) of an attention, and for P itself.

    q (..., H, Tq, d), k (..., Hkv, Tk, d), v (..., Hkv, Tk, dv), dout (..., H, Tq, dv);
    P (..., H, Tq, Tk): the float64 probabilities before dropout (``attention_probs``); P_drop:
    after dropout (scaled), default P; bias_abs: the largest |bias| + |ALiBi| term added to a
    score; depth: roundings that q and k carry already (a projection x W + b of C terms:
    C + 2), when q and k are given as the magnitudes |x| |W| + |b| of their terms. Returns
    {name: (terms, n)}.

    Error chain (units of eps): a score adds d products, is scaled and biased, so is off by
    (d + 2) Sabs, Sabs = scale |q| |k| + bias_abs. A probability is off relatively by twice the
    largest error of its row's scores (M: the row's largest Sabs over the keys it attends),
    plus the rounding of the exponent's argument and of exp, the row sum (Tk terms), the online
    softmax's rescalings (one per key tile) and, in a backward that recomputes P from lse, the
    error of lse and the scores again: r = 4 (d + 3) M + 3 Tk + 2 L + 24, where L >= |lse|.
    out = P v then adds Tk terms of P |v|; dS = P (dP - D) with dP = dout v^T (dv terms) and
    D = dout . out carries r and out's error; dq, dk, dv add Tk, Tq and Tq terms.
    """
    q, k, v, P = _f64(q), _f64(k), _f64(v), _f64(P)
    P_drop = P if P_drop is None else _f64(P_drop)
    H, Tq, d = (q.shape[-3] if q.ndim >= 3 else 1), q.shape[-2], q.shape[-1]
    Hkv = k.shape[-3] if k.ndim >= 3 else 1
    Tk, dv = k.shape[-2], v.shape[-1]
    kr, vr = _per_query_head(k, H), _per_query_head(v, H)
    absv = np.abs(vr)
    s_abs = abs(scale) * matmul_terms(q, _t(kr)) + bias_abs  # (..., H, Tq, Tk)
    M = np.where(P > 0, s_abs, 0.0).max(-1, keepdims=True)  # (..., H, Tq, 1)
    L = M + np.log(Tk) + 1.0  # |lse| <= max |score| + log Tk
    r = 4 * (d + depth + 3) * M + 3 * Tk + 2 * L + 24  # relative error of P, units of eps
    out_terms = P_drop @ absv  # (..., H, Tq, dv)
    bounds = {"out": (out_terms, r + Tk + 2), "lse": ((1 + M + L)[..., 0], d + Tk + 8),
              "P": (P_drop, r)}
    if dout is None:
        return bounds
    g = H // Hkv if Hkv else 1
    absdo = np.abs(_f64(dout))
    G = absdo @ _t(absv)  # terms of dP = dout v^T (..., H, Tq, Tk)
    D = (absdo * out_terms).sum(-1, keepdims=True)  # terms of D = dout . out (..., H, Tq, 1)
    E = P_drop * G + P * D  # terms of dS = P (dP - D)
    n_s = r + dv + Tk + 8  # (..., H, Tq, 1)
    n_k = float(n_s.max(initial=0.0)) + Tq + g + 2
    bounds["dq"] = (abs(scale) * E @ np.abs(kr), n_s + Tk + 2)
    bounds["dk"] = (_per_kv_head(abs(scale) * _t(E) @ np.abs(q), Hkv), n_k)
    bounds["dv"] = (_per_kv_head(_t(P_drop) @ absdo, Hkv),
                    float(r.max(initial=0.0)) + Tq + g + 2)
    bounds["ds"] = (E, n_s)
    return bounds


def book_attention_bounds(name, inputs, dout):
    """[(terms, n)] for the output and the two input gradients of the book's chapter 8 layer
    ``name`` ("WeightSum", "AttentionWeight", "Attention", "TimeAttention") run on ``inputs``
    with upstream gradient ``dout``. The book's attention is an attention with scale 1 whose
    keys and values are both the encoder states hs: its gradient of hs is dk + dv."""
    hs = _f64(inputs[0])  # (N, T, H)
    T, H = hs.shape[1], hs.shape[2]
    if name == "WeightSum":
        a, dc = _f64(inputs[1]), np.abs(_f64(dout))  # (N, T), (N, H)
        return [(np.einsum("nt,nth->nh", np.abs(a), np.abs(hs)), T + 2),
                (np.abs(a)[:, :, None] * dc[:, None, :], 2),
                (np.einsum("nth,nh->nt", np.abs(hs), dc), H + 2)]
    one_step = name in ("AttentionWeight", "Attention")
    q = _f64(inputs[1])[:, None, :] if one_step else _f64(inputs[1])  # (N, Tq, H)
    P = kernel_attention_probs(q, hs, 1.0, False, None)
    if name == "AttentionWeight":
        b = attention_bounds(q, hs, hs, P, scale=1.0)
        P1, r = P[:, 0], b["P"][1][:, 0]  # (N, T), (N, 1)
        da = np.abs(_f64(dout))
        E = P1 * (da + (P1 * da).sum(-1, keepdims=True))  # terms of the softmax backward
        n_s = r + T + 4
        return [(P1, r), (E[:, :, None] * np.abs(q), (n_s + 2)[:, :, None]),
                (np.einsum("nt,nth->nh", E, np.abs(hs)), n_s + T + 2)]
    g = _f64(dout)[:, None, :] if one_step else _f64(dout)
    b = attention_bounds(q, hs, hs, P, scale=1.0, dout=g)
    (dk, n_k), (dv, n_v), (dq, n_q) = b["dk"], b["dv"], b["dq"]
    out = b["out"]
    if one_step:
        out, dq, n_q = (out[0][:, 0], out[1][:, 0]), dq[:, 0], n_q[:, 0]
    return [out, (dk + dv, max(n_k, n_v) + 1), (dq, n_q)]
