"""The fused attention kernels in vectorized NumPy, with every feature of
``kernels.loop_attention`` (same arguments, same rules; re-exported by ``kernels.vectorized``).

They materialise the (B, Tq, Tk) score matrix: that is the point of the comparison with the
Numba flash kernels, which do not. Grouped heads broadcast over the group axis: K and V are
not copied per query head here either.
"""

from __future__ import annotations

import numpy as np

from . import _attention_rules as rules

_U64 = np.uint64


def _mix(x):
    """rules.mix on uint64 arrays (wrapping arithmetic)."""
    z = x + _U64(rules.GAMMA)
    z = (z ^ (z >> _U64(30))) * _U64(rules.MUL1)
    z = (z ^ (z >> _U64(27))) * _U64(rules.MUL2)
    return z ^ (z >> _U64(31))


def dropout_factors(B, Tq, Tk, dropout_p, seed, dtype):
    """(B, Tq, Tk): 0 where dropped, 1 / (1 - dropout_p) where kept (rules.keep)."""
    with np.errstate(over="ignore"):
        s = _mix(np.array(int(seed) & rules.MASK64, dtype=_U64))
        rk = _mix(_mix(s ^ np.arange(B, dtype=_U64))[:, None] ^ np.arange(Tq, dtype=_U64))
        h = _mix(rk[:, :, None] ^ np.arange(Tk, dtype=_U64))  # (B, Tq, Tk)
    kept = (h >> _U64(32)) >= _U64(rules.dropout_threshold(dropout_p))
    return np.where(kept, 1.0 / (1.0 - dropout_p), 0.0).astype(dtype)


def _positions(cu, T):
    """Per row of a packed axis: (sequence id, local position, sequence length)."""
    if cu is None:
        return np.zeros(T, np.int64), np.arange(T), np.full(T, T)
    cu = np.asarray(cu, dtype=np.int64)
    lengths = np.diff(cu)
    seq = np.repeat(np.arange(len(lengths)), lengths)
    return seq, np.arange(T) - cu[seq], lengths[seq]


def _grouped(op, a, b):
    """op(a[i], b[i // g]) for a (B, m, n) and b (Bkv, n, p), g = B // Bkv, by broadcasting
    over the group axis: b is never copied per query entry -> (B, m, p)."""
    Bkv = b.shape[0]
    res = op(a.reshape((Bkv, a.shape[0] // Bkv) + a.shape[1:]), b[:, None])
    return res.reshape((a.shape[0],) + res.shape[2:])


def _scores(q, k, scale, causal, mask, bias, bias_map, window, alibi, cu_q, cu_k):
    """s = scale q k^T + bias + alibi (B, Tq, Tk), -inf where not allowed."""
    B, Tq, _ = q.shape
    Bkv, Tk, _ = k.shape
    s = _grouped(np.matmul, q, k.transpose(0, 2, 1))  # (B, Tq, Tk)
    s *= q.dtype.type(scale)
    sq, iq, lq = _positions(cu_q, Tq)
    sk, jk, lk = _positions(cu_k, Tk)
    left, right, bottom_right = rules.band(causal, window)
    lk_of_row = np.diff(np.asarray(cu_k))[sq] if cu_k is not None else np.full(Tq, Tk)
    off = (lk_of_row - lq) if bottom_right else np.zeros(Tq, np.int64)  # (Tq,)
    delta = jk[None, :] - iq[:, None] - off[:, None]  # (Tq, Tk)
    allowed = sq[:, None] == sk[None, :]
    if right is not None:
        allowed &= delta <= right
    if left is not None:
        allowed &= delta >= -left
    allowed = np.broadcast_to(allowed, (1, Tq, Tk))
    if mask is not None:
        allowed = allowed & mask
    if bias is not None:
        bmap = np.minimum(np.arange(B), bias.shape[0] - 1) if bias_map is None else bias_map
        s = s + bias[np.asarray(bmap)]
    if alibi is not None:
        dist = np.abs(iq[:, None] + lk_of_row[:, None] - lq[:, None] - jk[None, :])  # (Tq, Tk)
        s = s - (np.asarray(alibi)[:, None, None] * dist).astype(q.dtype)
    return np.where(allowed, s, -np.inf).astype(q.dtype, copy=False)


def attention_forward(q, k, v, scale, causal, mask, *, bias=None, bias_map=None, window=None,
                      alibi=None, dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None):
    """out (B, Tq, dv), lse (B, Tq); see kernels.loop_attention."""
    s = _scores(q, k, scale, causal, mask, bias, bias_map, window, alibi, cu_seqlens_q,
                cu_seqlens_k)
    m = s.max(axis=-1, keepdims=True)  # (B, Tq, 1)
    empty = ~np.isfinite(m)  # rows with nothing allowed
    m[empty] = 0
    p = np.exp(s - m)  # (B, Tq, Tk), masked entries are exp(-inf) = 0
    total = p.sum(axis=-1, keepdims=True)  # (B, Tq, 1)
    total[empty] = 1
    if dropout_p > 0:
        p *= dropout_factors(*s.shape, dropout_p, seed, q.dtype)
    out = _grouped(np.matmul, p, v)
    out /= total
    lse = (m + np.log(total))[..., 0]  # (B, Tq)
    lse[empty[..., 0]] = -np.inf
    return out, lse


def _group_tn(a, b, Bkv):
    """sum over each group of query entries of a[i]^T b[i]: a (B, Tq, Tk), b (B, Tq, c) ->
    (Bkv, Tk, c), as one product per key/value entry over the group's stacked rows."""
    a = a.reshape(Bkv, -1, a.shape[-1])  # (Bkv, g Tq, Tk)
    return np.matmul(a.transpose(0, 2, 1), b.reshape(Bkv, -1, b.shape[-1]))


def attention_backward(dout, q, k, v, out, lse, scale, causal, mask, *, bias=None,
                       bias_map=None, window=None, alibi=None, dropout_p=0.0, seed=0,
                       cu_seqlens_q=None, cu_seqlens_k=None):
    """dq, dk, dv (and dbias when bias is given); see kernels.loop_attention."""
    Bkv = k.shape[0]
    s = _scores(q, k, scale, causal, mask, bias, bias_map, window, alibi, cu_seqlens_q,
                cu_seqlens_k)
    empty = np.isneginf(lse)[..., None]  # (B, Tq, 1)
    row_lse = np.where(empty, 0, lse[..., None]).astype(q.dtype, copy=False)
    p = np.where(empty, 0, np.exp(s - row_lse)).astype(q.dtype, copy=False)  # (B, Tq, Tk)
    dp = _grouped(np.matmul, dout, v.transpose(0, 2, 1))  # (B, Tq, Tk)
    if dropout_p > 0:
        z = dropout_factors(*s.shape, dropout_p, seed, q.dtype)
        dv = _group_tn(p * z, dout, Bkv)  # (Bkv, Tk, dv)
        dp *= z
    else:
        dv = _group_tn(p, dout, Bkv)
    D = np.sum(dout * out, axis=-1, keepdims=True)  # (B, Tq, 1)
    ds = p * (dp - D)  # (B, Tq, Tk)
    sc = q.dtype.type(scale)
    dq = _grouped(np.matmul, ds, k) * sc
    dk = _group_tn(ds, q, Bkv) * sc  # (Bkv, Tk, d)
    grads = (dq, dk, dv)
    if bias is None:
        return grads
    dbias = np.zeros(bias.shape, dtype=q.dtype)
    bmap = np.minimum(np.arange(q.shape[0]), bias.shape[0] - 1) if bias_map is None else bias_map
    rows = ds if bias.shape[1] == ds.shape[1] else ds.sum(axis=1, keepdims=True)
    np.add.at(dbias, np.asarray(bmap), rows)
    return grads + (dbias,)


def merge_parts(outs, lses):
    """Attention over the union of disjoint key sets from its parts.

    outs (n, ..., Tq, dv), lses (n, ..., Tq) -> out (..., Tq, dv), lse (..., Tq):
    lse = logsumexp_i lses[i], out = sum_i exp(lses[i] - lse) outs[i]; parts with lse -inf add
    nothing; a row that is -inf everywhere gives out 0, lse -inf.
    """
    m = lses.max(axis=0)  # (..., Tq)
    empty = np.isneginf(m)
    m = np.where(empty, 0, m).astype(lses.dtype, copy=False)
    w = np.exp(lses - m)  # (n, ..., Tq): 0 for -inf parts
    total = w.sum(axis=0)
    lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1, total))).astype(lses.dtype)
    w /= np.where(empty, 1, total)
    out = (w[..., None] * outs).sum(axis=0).astype(outs.dtype, copy=False)
    return out, lse
