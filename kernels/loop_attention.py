"""The reference fused attention kernels, with every feature: plain Python loops.

Re-exported by ``kernels.loop``; this module defines what each attention feature means.

Arguments beyond ``(q, k, v, scale, causal, mask)``, all keyword-only and the same in every
backend:

* q (B, Tq, d); k (Bkv, Tk, d), v (Bkv, Tk, dv) with B a multiple of Bkv: query entry b reads
  key/value entry ``b // (B // Bkv)`` (grouped-query attention; the public functions flatten
  (..., H) so that this is head h -> h // (H // Hkv)).
* causal: False, True or "top_left" (key j <= query i), "bottom_right" (j <= i + Lk - Lq).
* window: None or (left, right), each int >= 0 or None: see ``kernels._attention_rules``.
* mask: None or bool (1 or B, 1 or Tq, Tk), True where allowed.
* bias: None or (Bb, 1 or Tq, Tk) added to the scaled scores (-inf masks); ``bias_map`` (B,)
  ints says which bias entry batch entry b uses (default: entry min(b, Bb - 1)).
* alibi: None or (B,) slopes: score (i, j) gets ``-slope * |i + Lk - Lq - j|`` (local
  positions of i and j within their sequence, whose lengths are Lq and Lk).
* dropout_p, seed: entry (b, i, j) of the probabilities is kept when
  ``_attention_rules.keep(seed, b, i, j, threshold)``, then scaled by 1 / (1 - dropout_p).
  lse stays the log-sum-exp before dropout.
* cu_seqlens_q, cu_seqlens_k: None, or int arrays (n + 1,) of packed sequences.

A row with nothing allowed gives out 0, lse -inf and zero gradients.
"""

from __future__ import annotations

import math

import numpy as np

from . import _attention_rules as rules


class _Rules:
    """Everything about entry (b, i, j) but q, k and v: allowed, additive term, dropout."""

    def __init__(self, B, Tq, Tk, causal, mask, bias, bias_map, window, alibi, dropout_p,
                 seed, cu_seqlens_q, cu_seqlens_k):
        self.mask = None if mask is None else np.broadcast_to(mask, (B, Tq, Tk))
        self.bias = bias
        if bias is not None and bias_map is None:
            bias_map = [min(b, bias.shape[0] - 1) for b in range(B)]
        self.bias_map = bias_map
        self.left, self.right, self.bottom_right = rules.band(causal, window)
        self.alibi = alibi
        self.p = float(dropout_p)
        self.seed = int(seed)
        self.threshold = rules.dropout_threshold(self.p)
        self.spans = rules.spans(cu_seqlens_q, cu_seqlens_k, Tq, Tk)

    def score_term(self, b, i, j, qs, ks, Lq, Lk):
        """(allowed, additive term) of entry (b, i, j) in the sequence (qs, ks, Lq, Lk)."""
        off = rules.offset(self.bottom_right, Lq, Lk)
        if not rules.in_band(i - qs, j - ks, off, self.left, self.right):
            return False, 0.0
        if self.mask is not None and not self.mask[b, i, j]:
            return False, 0.0
        add = 0.0
        if self.bias is not None:
            bb = self.bias[self.bias_map[b]]
            add += float(bb[min(i, bb.shape[0] - 1), j])
            if add == -math.inf:
                return False, 0.0
        if self.alibi is not None:
            add -= float(self.alibi[b]) * abs((i - qs) + Lk - Lq - (j - ks))
        return True, add

    def dropout(self, b, i, j):
        """The factor of entry (b, i, j): 0 (dropped) or 1 / (1 - p) (kept)."""
        if self.p == 0.0:
            return 1.0
        if not rules.keep(self.seed, b, i, j, self.threshold):
            return 0.0
        return 1.0 / (1.0 - self.p)


def _score(q, k, b, bk, i, j, scale):
    acc = 0.0
    for c in range(q.shape[2]):
        acc += float(q[b, i, c]) * float(k[bk, j, c])
    return scale * acc


def attention_forward(q, k, v, scale, causal, mask, *, bias=None, bias_map=None, window=None,
                      alibi=None, dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None):
    """out = dropout(softmax(scale q k^T + bias + alibi, allowed)) v, lse; see the module.

    -> out (B, Tq, dv), lse (B, Tq).
    """
    B, Tq, _ = q.shape
    Bkv, Tk, dv = v.shape
    group = B // Bkv
    R = _Rules(B, Tq, Tk, causal, mask, bias, bias_map, window, alibi, dropout_p, seed,
               cu_seqlens_q, cu_seqlens_k)
    out = np.zeros((B, Tq, dv), dtype=q.dtype)
    lse = np.full((B, Tq), -np.inf, dtype=q.dtype)
    for b in range(B):
        bk = b // group  # the key/value entry of query entry b
        for qs, qe, ks, ke in R.spans:
            for i in range(qs, qe):
                s = {}  # allowed key j -> score
                for j in range(ks, ke):
                    ok, add = R.score_term(b, i, j, qs, ks, qe - qs, ke - ks)
                    if ok:
                        s[j] = _score(q, k, b, bk, i, j, scale) + add
                if not s:
                    continue  # nothing to attend to: out stays 0, lse stays -inf
                m = max(s.values())
                total = sum(math.exp(x - m) for x in s.values())
                for c in range(dv):
                    acc = 0.0
                    for j, x in s.items():
                        acc += R.dropout(b, i, j) * math.exp(x - m) * float(v[bk, j, c])
                    out[b, i, c] = acc / total
                lse[b, i] = m + math.log(total)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, scale, causal, mask, *, bias=None,
                       bias_map=None, window=None, alibi=None, dropout_p=0.0, seed=0,
                       cu_seqlens_q=None, cu_seqlens_k=None):
    """Gradients of attention_forward: dq, dk, dv, and dbias (bias's shape) when bias is given.

    With p[i, j] = exp(s[i, j] - lse[i]) and z[i, j] the dropout factor, the forward was
    ``out[i, c] += z p v[j, c]``, so ``dv[j, c] += z p dout[i, c]`` and
    ``dp[i, j] = z sum_c dout[i, c] v[j, c]``. Through the softmax,
    ``ds[i, j] = p (dp - D[i])`` with ``D[i] = sum_c dout[i, c] out[i, c]`` (= sum_j p dp).
    The bias is added to s, so ``dbias += ds``; through ``s = scale q k^T``,
    ``dq[i] += scale ds k[j]`` and ``dk[j] += scale ds q[i]`` (dk, dv summed over the query
    entries that share a key/value entry).
    """
    B, Tq, d = q.shape
    Bkv, Tk, dvd = v.shape
    group = B // Bkv
    R = _Rules(B, Tq, Tk, causal, mask, bias, bias_map, window, alibi, dropout_p, seed,
               cu_seqlens_q, cu_seqlens_k)
    dq = np.zeros(q.shape)  # accumulate in float64, return in the input dtype
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    dbias = None if bias is None else np.zeros(bias.shape)
    for b in range(B):
        bk = b // group
        for qs, qe, ks, ke in R.spans:
            for i in range(qs, qe):
                row_lse = float(lse[b, i])
                if row_lse == -math.inf:
                    continue  # a row with nothing to attend to has no gradient
                D = 0.0
                for c in range(dvd):
                    D += float(dout[b, i, c]) * float(out[b, i, c])
                for j in range(ks, ke):
                    ok, add = R.score_term(b, i, j, qs, ks, qe - qs, ke - ks)
                    if not ok:
                        continue
                    p = math.exp(_score(q, k, b, bk, i, j, scale) + add - row_lse)
                    z = R.dropout(b, i, j)
                    dp = 0.0
                    for c in range(dvd):
                        dv[bk, j, c] += z * p * float(dout[b, i, c])
                        dp += float(v[bk, j, c]) * float(dout[b, i, c])
                    ds = p * (z * dp - D)
                    if dbias is not None:
                        dbias[R.bias_map[b], min(i, bias.shape[1] - 1), j] += ds
                    for c in range(d):
                        dq[b, i, c] += scale * ds * float(k[bk, j, c])
                        dk[bk, j, c] += scale * ds * float(q[b, i, c])
    grads = (dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype))
    return grads if bias is None else grads + (dbias.astype(q.dtype),)
