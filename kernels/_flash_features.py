"""Fused Numba attention kernels with every feature of ``kernels.loop_attention``.

Grouped-query heads, causal alignment, windows, bias (and dbias), ALiBi, dropout and packed
sequences, in any combination, forward and backward, with the rules of
``kernels._attention_rules``. Built as ``kernels._flash`` (flash attention: (bq, bk) tiles,
tile products by BLAS or by the kernels' own micro-kernel (``kernels._micro``, heads up to the
setting's ``own_dim``), an online softmax, P recomputed from lse in the backward), plus:

* **Work units.** Forward: (query entry b, query tile, key share), a query tile being bq rows
  of one packed sequence. Backward: (key/value entry, share); a unit runs the query heads of
  its group against the key tiles, so dk and dv (and dbias, dq) have one writer each. With
  several shares per entry, grouped queries split the group's heads (each share but the
  first writes its own dk, dv part), others the key tiles (dq parts); parts are summed in a
  fixed order afterwards. K and V are never copied per query head.
* **Skipped blocks.** A query tile visits only the keys of its sequence inside the causal and
  window band (``_attention_rules.key_range``), a key tile only the matching queries
  (``query_range``), so work grows with T * window; ``LAST_TILES`` counts the tiles visited.
* **Per tile, only what is on.** Bias and ALiBi are added to the scaled scores, the band and
  the mask set -inf; a feature that is off costs one test per tile.
* **Dropout.** The keep decision of entry (b, i, j) is ``_attention_rules.keep``: SplitMix64
  on 64-bit integers, recomputed in the backward; lse and the row sums stay those before
  dropout.
* **Decoding.** A few query rows against many keys: S and P V as loops over the keys (no BLAS
  call per tile), and each query tile's keys split into shares when there are fewer units
  than the setting's ``min_units``; the shares' (out, lse) are merged as ``merge_attention`` does.
"""

from __future__ import annotations

import math

import numpy as np

from . import _attention_rules as rules
from . import _flash, _tuning
from ._blas import OneThread as _OneBlasThread
from ._flash import (
    _FM,
    _in_parallel,
    _mm_nn,
    _mm_nn_acc,
    _mm_nt,
    _mm_tn_acc,
    _online_softmax,
    _tiles,
    _transpose_into,
    transposed_keys,
)
from ._flash_tiles import (
    _BK,
    _BOTTOM_RIGHT,
    _BQ,
    _GROUP,
    _HAS_ALIBI,
    _HAS_BIAS,
    _HAS_DROP,
    _HAS_MASK,
    _LEFT,
    _LOOP_ROWS,
    _NCFG,
    _NSHARE,
    _OWN,
    _RIGHT,
    _SPLIT_HEADS,
    _UNBOUNDED,
    _USE_KT,
    _add_dbias,
    _dscores,
    _features_tile,
    _finite,
    _keep_factors,
    _key_range,
    _pv_loop,
    _query_range,
    _scores_loop,
    _seq,
    _times,
)
from ._numba_math import borrow, keep_alive, njit_cached, read_only, take_unit, wide_vectors
from .vectorized_attention import merge_parts

# (n_units,) per call, tiles visited; summed into LAST_TILES (a test shows blocks skipped)
# and the key shares of the last calls (the decode split)
_DECODE_BK = 512  # key tile length with few query rows: less per-tile work per key

LAST_TILES = {"forward": 0, "backward": 0, "forward_shares": 1, "backward_shares": 1,
              "backward_split": "keys"}


@njit_cached(nogil=True, fastmath=_FM)
def _forward_units(counter, q, k, kT, v, out, lse, scale, inv, cfg, drop, qtiles, cu_q, cu_k,
                   mask, bias, bias_map, alibi, visited):
    """Unit u: query entry b = u // (nt nshare), query tile t of qtiles (nt, 3) = (sequence,
    i0, i1), key share u % nshare of the tile's keys. Writes out[share, b, i0:i1] (dv) and
    lse[share, b, i0:i1]."""
    wide_vectors()
    bq, bk, nshare, group = cfg[_BQ], cfg[_BK], cfg[_NSHARE], cfg[_GROUP]
    own = cfg[_OWN] != 0
    nt = qtiles.shape[0]
    dt = q.dtype.type
    ninf, zero, one = dt(-np.inf), dt(0), dt(1)
    # no reference counting on the arrays or any view of them (_numba_math.borrow: why)
    q, k, kT, v, out, lse = borrow(q), borrow(k), borrow(kT), borrow(v), borrow(out), borrow(lse)
    drop, qtiles, cu_q, cu_k = borrow(drop), borrow(qtiles), borrow(cu_q), borrow(cu_k)
    mask, bias, alibi, visited = borrow(mask), borrow(bias), borrow(alibi), borrow(visited)
    cfg, bias_map = borrow(cfg), borrow(bias_map)
    owned = (np.empty(2, dtype=q.dtype), np.empty(bq * bk, dtype=q.dtype),
             np.empty(bq * bk, dtype=q.dtype),
             np.empty(q.shape[2] * bk if own else 0, dtype=q.dtype),  # own: K_j^T per tile
             np.empty(bq, dtype=q.dtype), np.empty(bq, dtype=q.dtype))
    coef, sbuf, zbuf = borrow(owned[0]), borrow(owned[1]), borrow(owned[2])
    ktbuf, m, lsum = borrow(owned[3]), borrow(owned[4]), borrow(owned[5])
    while True:
        u = take_unit(counter)
        if u >= q.shape[0] * nt * nshare:
            break
        b, t, share = u // (nt * nshare), (u // nshare) % nt, u % nshare
        bkv = b // group
        qs, ks, Lq, Lk = _seq(cu_q, cu_k, qtiles[t, 0])
        i0, i1 = qtiles[t, 1], qtiles[t, 2]
        nq = i1 - i0
        off = Lk - Lq if cfg[_BOTTOM_RIGHT] else 0
        lj0, lj1 = _key_range(i0 - qs, i1 - qs, Lk, off, cfg)
        nblk = (lj1 - lj0 + bk - 1) // bk
        jstart = ks + lj0 + (share * nblk // nshare) * bk
        jend = min(ks + lj1, ks + lj0 + ((share + 1) * nblk // nshare) * bk)
        qb = q[b, i0:i1]
        ob = out[share, b, i0:i1]
        m[:] = ninf
        lsum[:] = zero
        ob[:, :] = zero
        bad = False
        for j0 in range(jstart, jend, bk):
            j1 = min(j0 + bk, jend)
            nk = j1 - j0
            visited[u] += 1
            s = sbuf[: nq * nk].reshape((nq, nk))
            if nq <= _LOOP_ROWS:
                _scores_loop(qb, k[bkv, j0:j1], s, scale)
                bad |= not _finite(sbuf[: nq * nk])
            elif own:  # the micro-kernel takes no b^T: this tile's keys transposed here
                kj = k[bkv, j0:j1]
                kTj = ktbuf[: kj.shape[1] * nk].reshape((kj.shape[1], nk))
                _transpose_into(kj, kTj)
                _mm_nn(qb, kTj, s, scale, coef, True)
            elif cfg[_USE_KT]:
                _mm_nn(qb, kT[bkv, :, j0:j1], s, scale, coef, False)
            else:
                _mm_nt(qb, k[bkv, j0:j1], s, scale, coef)
            _features_tile(s, b, i0, j0, qs, ks, Lq, Lk, cfg, mask, bias, bias_map, alibi)
            _online_softmax(s, m, lsum, ob, sbuf[: nq * nk], j0 == jstart)
            if cfg[_HAS_DROP]:  # the row sums above are before dropout, P V after
                z = zbuf[: nq * nk].reshape((nq, nk))
                _keep_factors(z, b, i0, j0, drop, inv)
                _times(s, z)
            if nq <= _LOOP_ROWS:
                _pv_loop(s, v[bkv, j0:j1], ob)
            else:
                _mm_nn_acc(s, v[bkv, j0:j1], ob, one, coef, own)
        for r in range(nq):
            if lsum[r] > zero:
                f = one / lsum[r]
                for c in range(ob.shape[1]):
                    ob[r, c] *= f
                lse[share, b, i0 + r] = m[r] + np.log(lsum[r])
            else:
                lse[share, b, i0 + r] = ninf  # nothing to attend to: out stays 0
        if bad:  # a score from non-finite q or k (or overflow): NaN results tell the caller
            ob[:, :] = np.nan
            lse[share, b, i0:i1] = np.nan
    keep_alive(owned)


@njit_cached(nogil=True, fastmath=_FM)
def _backward_units(counter, dout, q, k, v, lse, D, dq, dk, dv, dq_part, dk_part, dv_part,
                    dbias, scale, inv, cfg, drop, ktiles, cu_q, cu_k, mask, bias, bias_map,
                    alibi, visited):
    """Unit u: key/value entry u // nshare and its share u % nshare of the work:

    * split by keys: its key tiles share, share + nshare, ... of ktiles (nkt, 3) = (sequence,
      j0, j1), against every query head of its group; accumulates into dk, dv (those key
      rows) and into dq (share 0) or dq_part[share - 1];
    * split by heads (cfg[_SPLIT_HEADS], grouped queries): the group's query heads share,
      share + nshare, ... against every key tile; accumulates into dq (those heads) and into
      dk, dv (share 0) or dk_part, dv_part[share - 1].

    dbias (B, Tq or 1, Tk) rows of a query entry have one writer either way. All outputs are
    zeroed by the caller. D (B, Tq) = rowsum(dout * out)."""
    wide_vectors()
    bq, bk, nshare, group = cfg[_BQ], cfg[_BK], cfg[_NSHARE], cfg[_GROUP]
    own = cfg[_OWN] != 0
    d, dvd = q.shape[2], v.shape[2]
    one = q.dtype.type(1)
    # no reference counting on the arrays or any view of them (_numba_math.borrow: why)
    dout, q, k, v, lse, D = borrow(dout), borrow(q), borrow(k), borrow(v), borrow(lse), borrow(D)
    dq, dk, dv, dq_part = borrow(dq), borrow(dk), borrow(dv), borrow(dq_part)
    dk_part, dv_part, dbias, drop = borrow(dk_part), borrow(dv_part), borrow(dbias), borrow(drop)
    ktiles, cu_q, cu_k, mask = borrow(ktiles), borrow(cu_q), borrow(cu_k), borrow(mask)
    bias, bias_map, alibi, visited = borrow(bias), borrow(bias_map), borrow(alibi), borrow(visited)
    cfg = borrow(cfg)
    owned = (np.empty(2, dtype=q.dtype), np.empty(bq * bk, dtype=q.dtype),
             np.empty(bq * bk, dtype=q.dtype), np.empty(bq * bk, dtype=q.dtype),
             np.empty(d * bk, dtype=q.dtype), np.empty(dvd * bk, dtype=q.dtype))
    coef, sbuf, pbuf = borrow(owned[0]), borrow(owned[1]), borrow(owned[2])
    zbuf, ktbuf, vtbuf = borrow(owned[3]), borrow(owned[4]), borrow(owned[5])
    while True:
        u = take_unit(counter)
        if u >= k.shape[0] * nshare:
            break
        bkv, share = u // nshare, u % nshare
        by_heads = cfg[_SPLIT_HEADS] != 0
        t_first, t_step = (0, 1) if by_heads else (share, nshare)
        h_first, h_step = (share, nshare) if by_heads else (0, 1)
        dkb = dk[bkv] if not by_heads or share == 0 else dk_part[share - 1, bkv]  # (Tk, d)
        dvb = dv[bkv] if not by_heads or share == 0 else dv_part[share - 1, bkv]  # (Tk, dv)
        for t in range(t_first, ktiles.shape[0], t_step):
            qs, ks, Lq, Lk = _seq(cu_q, cu_k, ktiles[t, 0])
            j0, j1 = ktiles[t, 1], ktiles[t, 2]
            nk = j1 - j0
            off = Lk - Lq if cfg[_BOTTOM_RIGHT] else 0
            li0, li1 = _query_range(j0 - ks, j1 - ks, Lq, off, cfg)
            kj, vj = k[bkv, j0:j1], v[bkv, j0:j1]  # (nk, d), (nk, dv)
            kTj = ktbuf[: d * nk].reshape((d, nk))
            vTj = vtbuf[: dvd * nk].reshape((dvd, nk))
            if cfg[_USE_KT]:  # transposed once, used by every query tile
                _transpose_into(kj, kTj)
                _transpose_into(vj, vTj)
            dkj, dvj = dkb[j0:j1], dvb[j0:j1]
            for b in range(bkv * group + h_first, (bkv + 1) * group, h_step):
                dqb = dq[b] if by_heads or share == 0 else dq_part[share - 1, b]
                for i0 in range(qs + li0, qs + li1, bq):
                    i1 = min(i0 + bq, qs + li1)
                    nq = i1 - i0
                    visited[u] += 1
                    s = sbuf[: nq * nk].reshape((nq, nk))
                    dp = pbuf[: nq * nk].reshape((nq, nk))
                    z = zbuf[: nq * nk].reshape((nq, nk))
                    qi, doi = q[b, i0:i1], dout[b, i0:i1]
                    if cfg[_USE_KT]:  # S = scale Q_i K_j^T, dP = dO_i V_j^T
                        _mm_nn(qi, kTj, s, scale, coef, own)
                        _mm_nn(doi, vTj, dp, one, coef, own)
                    else:
                        _mm_nt(qi, kj, s, scale, coef)
                        _mm_nt(doi, vj, dp, one, coef)
                    _features_tile(s, b, i0, j0, qs, ks, Lq, Lk, cfg, mask, bias, bias_map,
                                   alibi)
                    if cfg[_HAS_DROP]:
                        _keep_factors(z, b, i0, j0, drop, inv)
                    _dscores(s, dp, z, D[b, i0:i1], lse[b, i0:i1], cfg[_HAS_DROP])
                    if cfg[_HAS_DROP]:
                        _times(s, z)
                    _mm_tn_acc(s, doi, dvj, one, coef, own)  # dV_j += (P Z)^T dO_i
                    if cfg[_HAS_BIAS]:
                        _add_dbias(dp, dbias[b], i0, j0)
                    _mm_nn_acc(dp, kj, dqb[i0:i1], scale, coef, own)  # dQ_i += sc dS K_j
                    _mm_tn_acc(dp, qi, dkj, scale, coef, own)  # dK_j += sc dS^T Q_i
    keep_alive(owned)


# ---- Python side ------------------------------------------------------------------------------

_NO = {}  # stand-ins for the arrays of features that are off, per dtype


def _stand_ins(dtype):
    if dtype not in _NO:
        _NO[dtype] = dict(mask=read_only(np.ones((1, 1, 1), np.bool_)),
                          bias=read_only(np.zeros((1, 1, 1), dtype)),
                          dbias=np.zeros((1, 1, 1), dtype), kT=np.zeros((1, 1, 1), dtype),
                          dq_part=np.zeros((1, 1, 1, 1), dtype))
    return _NO[dtype]


def _spans(cu_seqlens_q, cu_seqlens_k, Tq, Tk):
    if cu_seqlens_q is None:
        cu_seqlens_q, cu_seqlens_k = (0, Tq), (0, Tk)
    return (read_only(np.ascontiguousarray(cu_seqlens_q, dtype=np.int64)),
            read_only(np.ascontiguousarray(cu_seqlens_k, dtype=np.int64)))


def _blocks(cu, size):
    """(n_tiles, 3) int64: (sequence, start, end) of blocks of ``size`` rows per sequence."""
    rows = [(n, a, min(a + size, cu[n + 1]))
            for n in range(len(cu) - 1) for a in range(cu[n], cu[n + 1], size)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _setup(q, k, causal, mask, bias, bias_map, window, alibi, dropout_p, seed, tiles, st):
    """The kernels' common arguments: cfg (int64), drop (uint64), inv and the feature arrays
    (stand-ins where off). st: the tuning setting in force (kernels._tuning)."""
    B, Tq, _ = q.shape
    Bkv, Tk, _ = k.shape
    no = _stand_ins(q.dtype)
    left, right, bottom_right = rules.band(causal, window)
    bq, bk = tiles or _tiles(B, Tq, Tk, bool(causal) or window is not None, st)
    if tiles is None and bq <= _LOOP_ROWS:  # decoding: loop products, long key tiles
        bk = min(Tk, max(bk, _DECODE_BK))
    cfg = np.zeros(_NCFG, np.int64)
    cfg[[_GROUP, _BQ, _BK, _BOTTOM_RIGHT]] = (B // Bkv, bq, bk, bottom_right)
    cfg[_LEFT] = _UNBOUNDED if left is None else left
    cfg[_RIGHT] = _UNBOUNDED if right is None else right
    cfg[_HAS_MASK] = mask is not None
    cfg[_HAS_BIAS] = bias is not None
    cfg[_HAS_ALIBI] = alibi is not None
    cfg[_HAS_DROP] = dropout_p > 0
    cfg[_OWN] = q.shape[2] <= st.own_dim
    # the forward's transposed copy of k (BLAS products only: the own ones transpose per tile)
    cfg[_USE_KT] = not cfg[_OWN] and min(Tq, bq) >= st.kt_rows
    if bias is not None and bias_map is None:
        bias_map = np.minimum(np.arange(B), bias.shape[0] - 1)
    arrays = dict(  # passed read-only, however the caller made them (see read_only)
        mask=no["mask"] if mask is None else np.ascontiguousarray(mask, dtype=np.bool_),
        bias=no["bias"] if bias is None else np.ascontiguousarray(bias, dtype=q.dtype),
        bias_map=np.ascontiguousarray(np.zeros(B) if bias_map is None else bias_map,
                                      dtype=np.int64),
        alibi=np.ascontiguousarray(np.zeros(B) if alibi is None else alibi, dtype=np.float64))
    arrays = {name: read_only(a) for name, a in arrays.items()}
    drop = np.array([int(seed) % (1 << 64), rules.dropout_threshold(dropout_p)], np.uint64)
    inv = q.dtype.type(1 / (1 - dropout_p))
    return cfg, drop, inv, arrays


def _count(kind, visited):
    LAST_TILES[kind] = int(visited.sum())


def features_forward(q, k, v, scale, causal, mask, *, bias=None, bias_map=None, window=None,
                     alibi=None, dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None,
                     tiles=None, key_shares=None):
    """out (B, Tq, dv), lse (B, Tq); see kernels.loop_attention. ``tiles`` (bq, bk) and
    ``key_shares`` override the block sizes and the decode split (for tests)."""
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    B, Tq, _ = q.shape
    Tk = k.shape[1]
    st = _tuning.current()[0]
    cfg, drop, inv, F = _setup(q, k, causal, mask, bias, bias_map, window, alibi, dropout_p,
                               seed, tiles, st)
    cu_q, cu_k = _spans(cu_seqlens_q, cu_seqlens_k, Tq, Tk)
    qtiles = _blocks(cu_q, cfg[_BQ])
    units = B * len(qtiles)
    nshare = key_shares or 1
    if key_shares is None and units < st.min_units and Tk > cfg[_BK]:
        nshare = min(math.ceil(st.min_units / units), math.ceil(Tk / cfg[_BK]))
    cfg[_NSHARE] = nshare
    out = np.empty((nshare, B, Tq, v.shape[2]), dtype=q.dtype)
    lse = np.empty((nshare, B, Tq), dtype=q.dtype)
    kT = (transposed_keys(k, 4 * q.size * Tk, st.serial_flops) if cfg[_USE_KT]
          else _stand_ins(q.dtype)["kT"])
    visited = np.zeros(units * nshare, np.int64)
    with _OneBlasThread():
        _in_parallel(_forward_units, units * nshare, 4 * q.size * Tk, st.serial_flops, q, k,
                     kT, v, out, lse, q.dtype.type(scale), inv, cfg, drop, qtiles, cu_q, cu_k,
                     F["mask"], F["bias"], F["bias_map"], F["alibi"], visited)
    _count("forward", visited)
    LAST_TILES["forward_shares"] = nshare
    if nshare == 1:
        return out[0], lse[0]
    return merge_parts(out, lse)


def features_backward(dout, q, k, v, out, lse, scale, causal, mask, *, bias=None,
                      bias_map=None, window=None, alibi=None, dropout_p=0.0, seed=0,
                      cu_seqlens_q=None, cu_seqlens_k=None, tiles=None, key_shares=None,
                      head_shares=None):
    """dq, dk, dv (and dbias, in bias's shape, when bias is given); see
    kernels.loop_attention. ``tiles`` overrides the block sizes, ``key_shares`` or
    ``head_shares`` the split of each key/value entry's work (for tests).

    With fewer key/value entries than the setting's ``min_units``, each entry's work is split
    into shares: grouped queries split the group's query heads (extra copies of dk and dv per
    share but the first: (shares - 1) Bkv Tk (d + dv), against B Tk (d + dv) for K and V
    expanded per head), otherwise the key tiles (extra copies of dq)."""
    dout, q, k, v, out, lse = (np.ascontiguousarray(a) for a in (dout, q, k, v, out, lse))
    B, Tq, d = q.shape
    Bkv, Tk, _ = k.shape
    st = _tuning.current()[0]
    cfg, drop, inv, F = _setup(q, k, causal, mask, bias, bias_map, window, alibi, dropout_p,
                               seed, tiles, st)
    cu_q, cu_k = _spans(cu_seqlens_q, cu_seqlens_k, Tq, Tk)
    ktiles = _blocks(cu_k, cfg[_BK])
    group = B // Bkv
    nshare, by_heads = key_shares or head_shares or 1, head_shares is not None
    if (key_shares is None and head_shares is None and Bkv < st.min_units
            and 10 * B * Tq * Tk * d >= st.serial_flops):
        want = math.ceil(st.min_units / Bkv)
        by_heads = group > 1
        nshare = min(group, want) if by_heads else max(1, min(len(ktiles), want))
    cfg[_NSHARE], cfg[_SPLIT_HEADS] = nshare, by_heads
    # small heads: transposed tiles pay in the backward; the own products always take them
    cfg[_USE_KT] |= d <= st.kt_dim or cfg[_OWN]
    D = np.einsum("bic,bic->bi", dout, out)  # (B, Tq): rowsum(dO * O)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    no = _stand_ins(q.dtype)["dq_part"]
    extra = nshare - 1
    dq_part = np.zeros((extra, B, Tq, d), q.dtype) if extra and not by_heads else no
    dk_part = np.zeros((extra,) + k.shape, q.dtype) if extra and by_heads else no
    dv_part = np.zeros((extra,) + v.shape, q.dtype) if extra and by_heads else no
    dbias = (np.zeros((B,) + F["bias"].shape[1:], q.dtype) if bias is not None
             else _stand_ins(q.dtype)["dbias"])
    visited = np.zeros(Bkv * nshare, np.int64)
    with _OneBlasThread():
        _in_parallel(_backward_units, Bkv * nshare, 10 * B * Tq * Tk * d, st.serial_flops,
                     dout, q, k, v, lse, D, dq, dk, dv, dq_part, dk_part, dv_part, dbias,
                     q.dtype.type(scale), inv, cfg, drop, ktiles, cu_q, cu_k, F["mask"],
                     F["bias"], F["bias_map"], F["alibi"], visited)
    _count("backward", visited)
    LAST_TILES["backward_shares"] = nshare
    LAST_TILES["backward_split"] = "heads" if by_heads else "keys"
    for s in range(extra):  # a fixed order: the bits do not depend on the threads
        if by_heads:
            dk += dk_part[s]
            dv += dv_part[s]
        else:
            dq += dq_part[s]
    if bias is None:
        return dq, dk, dv
    if F["bias"].shape[0] == B and np.array_equal(F["bias_map"], np.arange(B)):
        return dq, dk, dv, dbias  # one bias entry per query entry: nothing to sum
    db = np.zeros(F["bias"].shape, q.dtype)
    for b in range(B):  # in order of b: deterministic
        db[F["bias_map"][b]] += dbias[b]
    return dq, dk, dv, db


def _plain(q, k, causal, features) -> bool:
    """True when kernels._flash alone computes this: no feature but mask and top-left causal,
    one query entry per key/value entry, and not a decode shape (few rows, many keys).
    q, k are (B, T, .), or (B, H, T, .) heads."""
    return (not features and k.shape[:-2] == q.shape[:-2] and causal in (False, True)
            and not (q.shape[-2] <= _LOOP_ROWS and k.shape[-2] >= 512))


def scans_kv(q, k, causal, features) -> bool:
    """True when attention_forward(q, k, v, scale, causal, None, **features) gives NaN
    results (out and lse) for NaN or inf anywhere in k or v: the loop path (few query rows)
    with no feature that skips keys, and a causal band that reaches every key. A non-finite
    key makes a score non-finite, which the kernel reports; a non-finite value reaches out
    through P V (0 * inf is NaN)."""
    Tq, Tk = q.shape[1], k.shape[1]
    reaches_all = causal in (False, "bottom_right") or Tq >= Tk
    return (not features and Tq <= _LOOP_ROWS and reaches_all
            and not _plain(q, k, causal, features))


def _all_heads(*arrays):
    if any(a.ndim != 4 for a in arrays):
        raise ValueError(f"with 4-D heads every array must be 4-D, got ndims "
                         f"{[a.ndim for a in arrays]}")


def _flat(a):
    """(B, H, T, c) -> a contiguous (B H, T, c) copy."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[2], a.shape[3])


def _unflat(a, B, H):
    """(B H, T, c) -> the (B, H, T, c) view of a (B, T, H, c) copy, as _flash returns heads."""
    a4 = a.reshape(B, H, a.shape[1], a.shape[2])
    return np.ascontiguousarray(a4.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def attention_forward(q, k, v, scale, causal, mask, **features):
    """The numba backend's fused forward: kernels._flash for the plain case, else
    features_forward. Arguments as kernels.loop_attention.attention_forward; also takes
    (B, H, T, .) heads (no bias) as kernels._flash.attention_forward does, and gives out and
    lse in its form whichever kernel runs."""
    if (q.ndim == 3 and mask is None and q.shape[1] <= _flash.FEW_ROWS
            and _plain(q, k, causal, features)):  # decoding: as _flash would, less Python
        return _flash.few_rows_forward(q, k, v, scale, causal)
    if q.ndim == 4:
        _all_heads(q, k, v)
        B, H, Tq, _ = q.shape
        if _plain(q, k, causal, features):
            return _flash.attention_forward(q, k, v, scale, causal, mask)
        out, lse = attention_forward(_flat(q), _flat(k), _flat(v), scale, causal, mask,
                                     **features)
        return _unflat(out, B, H), lse.reshape(B, H, Tq)
    if _plain(q, k, causal, features):
        return _flash.attention_forward(q, k, v, scale, causal, mask)
    return features_forward(q, k, v, scale, causal, mask, **features)


def attention_backward(dout, q, k, v, out, lse, scale, causal, mask, *, grads=None,
                       **features):
    """The numba backend's fused backward (as attention_forward chooses). Heads too, and then
    ``grads`` as kernels._flash.attention_backward takes it."""
    if q.ndim == 4:
        _all_heads(dout, q, k, v, out)
        if _plain(q, k, causal, features):
            return _flash.attention_backward(dout, q, k, v, out, lse, scale, causal, mask,
                                             grads=grads)
        if grads is not None:  # checked as kernels._flash checks them
            _flash._check_grads(grads, (q.shape, k.shape, v.shape), q.dtype)
        flat = attention_backward(_flat(dout), _flat(q), _flat(k), _flat(v), _flat(out),
                                  np.reshape(lse, (-1, q.shape[2])), scale, causal, mask,
                                  **features)
        if grads is None:
            return tuple(_unflat(g, *a.shape[:2]) for g, a in zip(flat, (q, k, v), strict=True))
        for g, into in zip(flat, grads, strict=True):
            into[...] = g.reshape(into.shape)
        return grads
    if grads is not None:
        raise ValueError("grads is for heads (4-D arrays) only")
    if _plain(q, k, causal, features):
        return _flash.attention_backward(dout, q, k, v, out, lse, scale, causal, mask)
    return features_backward(dout, q, k, v, out, lse, scale, causal, mask, **features)
