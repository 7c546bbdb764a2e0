"""The pieces of a tile for the fused feature kernels (``kernels._flash_features``): the
dropout hash, bias, ALiBi, the causal/window band and the mask on a score tile, loop products
for a few query rows and the backward's dS (the online softmax step, which the plain kernels
share, is ``kernels._flash._online_softmax``).

Every function takes the int64 configuration array ``cfg`` of ``_flash_features`` where it
needs to know which features are on; indices below.

Numba's cache keys each function on its own file's source: the kernels of ``_flash_features``
that inline these pieces are not recompiled when only this file changes. Change a line there
too (or clear the ``__pycache__``) when editing here.
"""

from __future__ import annotations

import numpy as np

from . import _attention_rules as rules
from ._flash import _FM
from ._numba_math import njit_cached, vexp, wide_vectors

_GAMMA = np.uint64(rules.GAMMA)
_MUL1 = np.uint64(rules.MUL1)
_MUL2 = np.uint64(rules.MUL2)
_S27, _S30, _S31, _S32 = (np.uint64(s) for s in (27, 30, 31, 32))
_UNBOUNDED = 1 << 40  # a band bound that no position difference reaches
_LOOP_ROWS = 4  # query tiles of at most this many rows take loops instead of BLAS products

# indices into the int64 configuration array of the kernels
(_GROUP, _BQ, _BK, _HAS_MASK, _HAS_BIAS, _HAS_ALIBI, _HAS_DROP, _LEFT, _RIGHT, _BOTTOM_RIGHT,
 _USE_KT, _NSHARE, _SPLIT_HEADS, _OWN, _NCFG) = range(15)


@njit_cached(fastmath=_FM)
def _mix(x):
    """rules.mix on a uint64."""
    z = x + _GAMMA
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@njit_cached(fastmath=_FM)
def _keep_factors(z, b, i0, j0, drop, inv):
    """z = the dropout factors (0, or inv where kept) of the tile of rows i0.., keys j0.. of
    query entry b. drop = [seed, threshold] (uint64)."""
    wide_vectors()
    nq, nk = z.shape
    zero = z.dtype.type(0)
    seed = _mix(drop[0])
    for r in range(nq):
        rk = _mix(_mix(seed ^ np.uint64(b)) ^ np.uint64(i0 + r))
        for c in range(nk):
            h = _mix(rk ^ np.uint64(j0 + c))
            z[r, c] = inv if (h >> _S32) >= drop[1] else zero


@njit_cached(fastmath=_FM)
def _times(s, z):
    """s *= z, elementwise (2-D)."""
    wide_vectors()
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            s[r, c] *= z[r, c]


@njit_cached(fastmath=_FM)
def _add_bias(s, bb, i0, j0):
    """s += the bias rows bb (Tq or 1, Tk) i0.., keys j0... Indexed from 0 by the loop
    counter (brow[j0 + c] with j0 unknown to the compiler could be negative, and that
    loop does not vectorise: 7x slower)."""
    wide_vectors()
    nq, nk = s.shape
    for r in range(nq):
        brow = bb[min(i0 + r, bb.shape[0] - 1), j0:j0 + nk]
        row = s[r]
        for c in range(nk):
            row[c] += brow[c]


@njit_cached(fastmath=_FM)
def _features_tile(s, b, i0, j0, qs, ks, Lq, Lk, cfg, mask, bias, bias_map, alibi):
    """Add bias and ALiBi to the scaled score tile s (rows i0.., keys j0.., of the sequence
    starting at qs, ks with lengths Lq, Lk) and set the entries outside the band or the mask
    to -inf."""
    wide_vectors()
    nq, nk = s.shape
    dt = s.dtype.type
    ninf = dt(-np.inf)
    off = Lk - Lq if cfg[_BOTTOM_RIGHT] else 0
    lj0 = j0 - ks
    if cfg[_HAS_BIAS]:
        _add_bias(s, bias[bias_map[b]], i0, j0)
    for r in range(nq):
        i = i0 + r
        li = i - qs
        row = s[r]
        if cfg[_HAS_ALIBI]:
            slope = alibi[b]
            base = li + Lk - Lq - lj0
            for c in range(nk):
                row[c] -= dt(slope * abs(base - c))
        lo = li + off - cfg[_LEFT] - lj0  # columns c < lo are left of the band
        hi = li + off + cfg[_RIGHT] - lj0  # columns c > hi are right of it
        for c in range(min(max(lo, 0), nk)):
            row[c] = ninf
        for c in range(max(hi + 1, 0), nk):
            row[c] = ninf
        if cfg[_HAS_MASK]:
            mb = mask[min(b, mask.shape[0] - 1)]
            mrow = mb[min(i, mb.shape[0] - 1), j0:j0 + nk]
            for c in range(nk):
                if not mrow[c]:
                    row[c] = ninf


@njit_cached(fastmath=_FM)
def _scores_loop(qb, kb, s, scale):
    """s = scale qb kb^T by loops over the keys (few query rows: no BLAS call overhead)."""
    wide_vectors()
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            acc = s.dtype.type(0)
            for p in range(qb.shape[1]):
                acc += qb[r, p] * kb[c, p]
            s[r, c] = scale * acc


@njit_cached(fastmath=_FM)
def _finite(x):
    """True when the flat x holds no NaN or inf (a NaN compares false)."""
    wide_vectors()
    big = x.dtype.type(np.inf)
    ok = True
    for i in range(x.shape[0]):
        ok &= abs(x[i]) < big
    return ok


@njit_cached(fastmath=_FM)
def _pv_loop(s, vb, ob):
    """ob += s vb by loops over the keys, four keys per pass over an output row (ob may
    alias vb for all the compiler knows, so each pass loads and stores the row)."""
    wide_vectors()
    nk = s.shape[1]
    n4 = nk - nk % 4
    for c in range(0, n4, 4):
        for r in range(s.shape[0]):
            f0, f1, f2, f3 = s[r, c], s[r, c + 1], s[r, c + 2], s[r, c + 3]
            for p in range(vb.shape[1]):
                ob[r, p] += ((f0 * vb[c, p] + f1 * vb[c + 1, p])
                             + (f2 * vb[c + 2, p] + f3 * vb[c + 3, p]))
    for c in range(n4, nk):
        for r in range(s.shape[0]):
            f = s[r, c]
            for p in range(vb.shape[1]):
                ob[r, p] += f * vb[c, p]


@njit_cached(fastmath=_FM)
def _seq(cu_q, cu_k, n):
    """(qs, ks, Lq, Lk) of sequence n."""
    return cu_q[n], cu_k[n], cu_q[n + 1] - cu_q[n], cu_k[n + 1] - cu_k[n]


@njit_cached(fastmath=_FM)
def _key_range(li0, li1, Lk, off, cfg):
    """rules.key_range with the sentinel bounds."""
    j0 = max(0, li0 + off - cfg[_LEFT])
    j1 = min(Lk, li1 - 1 + off + cfg[_RIGHT] + 1)
    return j0, max(j0, j1)


@njit_cached(fastmath=_FM)
def _query_range(lj0, lj1, Lq, off, cfg):
    """rules.query_range with the sentinel bounds."""
    i0 = max(0, lj0 - off - cfg[_RIGHT])
    i1 = min(Lq, lj1 - 1 - off + cfg[_LEFT] + 1)
    return i0, max(i0, i1)


@njit_cached(fastmath=_FM)
def _dscores(s, dp, z, D, lr, drop_on):
    """P = exp(S - lse) in s, then dS = P (dP z - D) in dp (z: dropout factors, when on)."""
    wide_vectors()
    nq, nk = s.shape
    ninf = s.dtype.type(-np.inf)
    for r in range(nq):
        row = s[r]
        if lr[r] == ninf:  # a dead row: P = 0
            row[:] = ninf
        else:
            for c in range(nk):
                row[c] -= lr[r]
        for c in range(nk):
            row[c] = vexp(row[c])
    for r in range(nq):
        if drop_on:
            for c in range(nk):
                dp[r, c] = s[r, c] * (dp[r, c] * z[r, c] - D[r])
        else:
            for c in range(nk):
                dp[r, c] = s[r, c] * (dp[r, c] - D[r])


@njit_cached(fastmath=_FM)
def _add_dbias(ds, dbb, i0, j0):
    """dbias rows (Tq or 1, Tk) of one query entry += the dS tile (summed over rows for 1)."""
    wide_vectors()
    nq, nk = ds.shape
    for r in range(nq):
        drow = dbb[min(i0 + r, dbb.shape[0] - 1), j0:j0 + nk]  # from 0: it vectorises
        for c in range(nk):
            drow[c] += ds[r, c]
