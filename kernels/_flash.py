"""Fused flash-attention kernels in Numba: ``attention_forward`` and ``attention_backward``.

Same signatures, results and masking rule as ``kernels.loop``: entry (b, i, j) is allowed when
``mask`` (None, or the compact bool array (1 or B, 1 or Tq, Tk)) is True there and, with
``causal``, j <= i; a row with nothing allowed gives out 0, lse -inf and zero gradients.

How it is built (flash attention, as in Dao et al.):

* Forward, parallel over (batch, query block): for each key/value block, the score tile
  ``S = scale Q_i K_j^T`` (bq, bk), masked with -inf, an online softmax (running row maximum
  and row sum, the output rescaled when the maximum grows) and ``O_i += P V_j``. The row
  log-sum-exp ``lse = m + log(l)`` is kept for the backward.
* Backward, parallel over batch entries (each owns its dq, dk, dv rows, so no races), or over
  (batch, share of the key blocks) when there are few batch entries, with a private dq per
  share summed at the end. Per key block and query block, P is recomputed
  from lse, then ``dV_j += P^T dO_i``, ``dP = dO_i V_j^T``, ``dS = P (dP - D_i)`` with
  ``D_i = rowsum(dO_i * O_i)``, ``dQ_i += scale dS K_j`` and ``dK_j += scale dS^T Q_i``.
* One or two query rows per batch entry (``FEW_ROWS``: a decoding step) skip the tiles:
  ``_few_rows_units`` takes a few entries per unit and computes each row's scores, softmax and
  P V with loops, which at these sizes beats two BLAS calls per entry (3-10x, measured).
* Tile products go to single-threaded BLAS sgemm/dgemm (``kernels._blas.gemm``), with the
  BLAS thread pool set to one thread for the duration of the call, or, where the setting in
  force says so (heads up to ``own_dim`` wide: all on AVX2), to the kernels' own micro-kernel
  (``kernels._micro``), which beats BLAS at tile sizes there. Exponentials use a polynomial
  exp that LLVM vectorises (``kernels._numba_math``).

Heads in place: the kernels index every array as (B, H, T, .), and a 3-D (B, T, .) call is
H = 1. MultiHeadAttention passes its heads as strided views of the projections' (B T, H d)
columns and gets out back as the heads of a (B, Tq, H, dv) array, and the gradients in the
columns it gives: no split or merge copies (the tile products take strided rows). Measured at
the date model's attentions (B 128, 4 heads of 16, T 29 and 10, one thread): forward plus
backward 13.3 ms with the copies, 11.1 ms without.

Prefetching: when a head's whole attention is one tile (Tq <= bq and Tk <= bk: short
sequences), each unit asks for the next (batch entry, head)'s rows of every array it will read
or add to (``_numba_math.prefetch_rows``) before it computes its own. Such a unit takes a few
microseconds, too short for the CPU's prefetchers to get ahead of its rows, which lie 768
bytes apart in a (B, T, 3 H d) projection, and in a training step those rows have left the
caches since they were written. Measured on a 2-core AMD EPYC (Zen 4), one thread, at the date
model's encoder attention (B 128, 4 heads of 16, T 29, heads in place) after a 64 MB sweep of
memory: backward 1.78-1.88 ms against 2.52-3.20 without, forward 1.05-1.23 against 1.48-1.50; with
the data already in cache both the same (1.56 and 0.88). In the training step of ``fastattn
train`` the three attentions' backward went from 6.3-6.6 ms to 4.0-4.4 ms a step. Longer
sequences (several tiles per head) are left to the CPU's prefetchers.

Only tiles of (bq, bk) scores exist at a time: memory beyond inputs and outputs is
O(threads * bq * bk), plus at most 8 Tq d when the backward splits few batch entries.

Threads: ``nogil`` kernels on the caller's thread and a small pool's take work units from a
shared atomic counter (why not ``prange``: the ``kernels`` package docstring), a whole batch
entry's units at a time when there are heads and enough entries (``_chunk``: so that two
threads do not write the neighbouring heads of one entry); a unit's result never depends on
the thread count or on which thread ran it.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import get_num_threads, literal_unroll

from . import _blas_workers, _thread_choice, _tuning
from ._blas import OneThread as _OneBlasThread
from ._blas import gemm
from ._micro import mm
from ._numba_math import (
    FASTMATH,
    borrow,
    fmax,
    keep_alive,
    njit_cached,
    prefetch_rows,
    read_only,
    take_unit,
    vexp,
    wide_vectors,
)

_FM = set(FASTMATH)
_NO_MASK = read_only(np.ones((1, 1, 1), dtype=np.bool_))  # stand-in when mask is None
FEW_ROWS = 2  # query rows per batch entry up to which the forward runs _few_rows_units
_NO_KT = {np.dtype(t): np.zeros((1, 1, 1, 1), dtype=t) for t in (np.float32, np.float64)}

# ---- tile products: single-threaded BLAS (kernels._blas.gemm) or, with own, the kernels' own
# micro-kernel (kernels._micro.mm; heads up to the setting's own_dim). Inlined into the
# kernels: a call of its own took some 25 ns, a fifth of a small tile's product --------------


@njit_cached(fastmath=_FM, inline="always")
def _mm_nn(a, b, c, alpha, coef, own):
    """c = alpha a b. a (m, k), b (k, n), c (m, n); rows may be strided."""
    if own:
        mm(a, False, b, c, alpha, False)
    else:
        gemm(False, False, a, b, c, alpha, c.dtype.type(0), coef)


@njit_cached(fastmath=_FM, inline="always")
def _mm_nt(a, b, c, alpha, coef):
    """c = alpha a b^T. a (m, k), b (n, k), c (m, n), BLAS only (slower than _mm_nn: used
    when a transposed copy of b would not be reused; with own, the kernels transpose)."""
    gemm(False, True, a, b, c, alpha, c.dtype.type(0), coef)


@njit_cached(fastmath=_FM, inline="always")
def _mm_nn_acc(a, b, c, alpha, coef, own):
    """c += alpha a b. a (m, k), b (k, n), c (m, n)."""
    if own:
        mm(a, False, b, c, alpha, True)
    else:
        gemm(False, False, a, b, c, alpha, c.dtype.type(1), coef)


@njit_cached(fastmath=_FM, inline="always")
def _mm_tn_acc(a, b, c, alpha, coef, own):
    """c += alpha a^T b. a (k, m), b (k, n), c (m, n)."""
    if own:
        mm(a, True, b, c, alpha, True)
    else:
        gemm(True, False, a, b, c, alpha, c.dtype.type(1), coef)


# ---- the pieces of a tile ---------------------------------------------------------------------


@njit_cached(fastmath=_FM)
def _transpose_into(x, xt):
    """xt[:, :n] = x (n, c) transposed (xt (c, >= n))."""
    wide_vectors()
    for r in range(x.shape[0]):
        for p in range(x.shape[1]):
            xt[p, r] = x[r, p]


#: LLVM's loop gives each step one vector, and one vector's exp is a chain of some 20
#: dependent instructions. On 32-byte vectors two independent chains per step (the array's
#: two halves) took float32 tiles from 0.64-0.91 to 0.37-0.56 ns an item on a 2-core AMD EPYC
#: (Zen 4), its AVX2 code paths; its AVX-512 code went from 0.24-0.26 to 0.28-0.34, so
#: AVX-512 code keeps the one chain.
_EXP_HALVES = _tuning.compiled_isa() != "avx512"


@njit_cached(fastmath=_FM)
def _exp_inplace(x):
    """x = exp(x) for a 1-D array, in one loop that LLVM vectorises; without AVX-512, over
    the two halves at once (_EXP_HALVES)."""
    wide_vectors()
    n = x.shape[0]
    h = n // 2 if _EXP_HALVES else 0
    for i in range(h):
        x[i] = vexp(x[i])
        x[h + i] = vexp(x[h + i])
    for i in range(2 * h, n):
        x[i] = vexp(x[i])


@njit_cached(fastmath=_FM)
def _mask_tile(s, i0, j0, causal, maskb, has_mask):
    """Set the forbidden entries of the score tile s (rows i0.., keys j0..) to -inf.

    maskb is the batch entry's (1 or Tq, Tk) mask.
    """
    wide_vectors()
    nq, nk = s.shape
    ninf = s.dtype.type(-np.inf)
    for r in range(nq):
        i = i0 + r
        if has_mask:
            mrow = maskb[min(i, maskb.shape[0] - 1)]
            for c in range(nk):
                if not mrow[j0 + c]:
                    s[r, c] = ninf
        if causal:
            for c in range(max(i - j0 + 1, 0), nk):  # keys j = j0 + c > i
                s[r, c] = ninf


@njit_cached(fastmath=_FM)
def _first_maxima(s, m):
    """The first key tile of the score rows s (nq, nk): m[r] = row r's maximum and s - m in
    place, s - 0 on a row with nothing allowed (all -inf, which stays so: P 0). The online
    softmax's later tiles take max(m, new) and rescale what came before; on the first there
    is nothing before, and a select instead of their branch for empty rows made a one-tile
    forward 5-10% faster at the date model's heads (29 x 16 and 10 x 16, Zen 4)."""
    wide_vectors()
    ninf, zero = s.dtype.type(-np.inf), s.dtype.type(0)
    for r in range(s.shape[0]):
        row = s[r]
        mx = ninf
        for c in range(s.shape[1]):
            mx = fmax(mx, row[c])
        m[r] = mx
        mx = zero if mx == ninf else mx
        for c in range(s.shape[1]):
            row[c] -= mx


@njit_cached(fastmath=_FM)
def _online_softmax(s, m, lsum, ob, scratch, first):
    """One tile of the online softmax: new row maxima m, s = exp(s - m) in place, row sums
    lsum and the output rows ob rescaled to the new maxima. scratch is s's flat buffer.
    ``first``: the rows' first tile, whose maxima and sums are the rows' so far: m and lsum
    are set, not read (_first_maxima), and ob, which the caller's P V then sets, is left
    alone."""
    wide_vectors()
    nq, nk = s.shape
    dt = s.dtype.type
    ninf, zero, one = dt(-np.inf), dt(0), dt(1)
    if first:
        _first_maxima(s, m)
    else:
        for r in range(nq):
            row = s[r]
            mx = ninf
            for c in range(nk):
                mx = fmax(mx, row[c])
            m_new = max(m[r], mx)
            if m_new == ninf:
                continue  # nothing allowed in this row so far: s stays -inf, exp 0
            for c in range(nk):
                row[c] -= m_new
            resc = vexp(m[r] - m_new)  # 0 when m[r] is -inf
            m[r] = m_new
            lsum[r] *= resc
            if resc != one:
                for c in range(ob.shape[1]):
                    ob[r, c] *= resc
    _exp_inplace(scratch)
    for r in range(nq):
        total = zero
        for c in range(nk):
            total += s[r, c]
        lsum[r] = total if first else lsum[r] + total


@njit_cached(inline="always")
def _prefetch_head(a, bh, H):
    """Prefetch hints for the rows of (batch entry, head) bh of a (B, H, T, c) array."""
    rows = a[bh // H, bh % H]
    prefetch_rows(rows, 0, rows.shape[0])


@njit_cached(inline="always")
def _next_unit(counter, pos, n_units, chunk):
    """This thread's next work unit, or n_units when none is left. Units go out in chunks of
    ``chunk`` consecutive ones (one shared counter hands out chunk numbers); pos (int64 next,
    end) is the thread's own place in its chunk. A unit's result does not depend on which
    thread runs it, so chunks change nothing but speed (see _chunk)."""
    if pos[0] == pos[1]:
        c = take_unit(counter) * chunk
        pos[0], pos[1] = min(c, n_units), min(c + chunk, n_units)
        if pos[0] == pos[1]:
            return n_units
    u = pos[0]
    pos[0] = u + 1
    return u


@njit_cached(nogil=True, fastmath=_FM)
def _forward_units(counter, q, k, kT, v, out, lse, scale, causal, mask, has_mask, bq, bk,
                   use_kT, chunk, own):
    """Takes work units from counter until none are left; unit u is batch entry and head
    bh = u // nqb (b = bh // H, h = bh % H), query block u % nqb: fills those rows of out
    (B, H, Tq, dv) and lse (B H, Tq). q (B, H, Tq, d), k (B, H, Tk, d), v (B, H, Tk, dv) and
    out may be strided views (rows contiguous), the mask is indexed by bh. With use_kT, kT
    (B, H, d, >= Tk) is k transposed (transposed_keys), so that both tile products are plain
    BLAS products (the fastest kind); worth it for query tiles of the setting's kt_rows rows
    and more. With own (the tile products by kernels._micro, which takes no transposed b;
    never with use_kT), each unit transposes its key tiles itself: the micro-kernel reads b's
    rows in place, and the rows of a transposed copy of k, Tk items apart, thrash its
    caches."""
    wide_vectors()
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    dv = v.shape[3]
    nqb = (Tq + bq - 1) // bq
    dt = q.dtype.type
    ninf = dt(-np.inf)
    zero, one = dt(0), dt(1)
    # no reference counting on the arrays or any view of them (_numba_math.borrow: why)
    q, k, kT, v, out, lse, mask = (borrow(q), borrow(k), borrow(kT), borrow(v), borrow(out),
                                   borrow(lse), borrow(mask))
    owned = (np.empty(2, dtype=q.dtype), np.empty(min(bq, Tq) * min(bk, Tk), dtype=q.dtype),
             np.empty(q.shape[3] * min(bk, Tk) if own else 0, dtype=q.dtype),
             np.empty(bq, dtype=q.dtype), np.empty(bq, dtype=q.dtype),
             np.zeros(2, dtype=np.int64))
    coef, sbuf, ktbuf = borrow(owned[0]), borrow(owned[1]), borrow(owned[2])
    m, lsum, pos = borrow(owned[3]), borrow(owned[4]), borrow(owned[5])
    # m: running row maximum; lsum: running row sum of exp(s - m)
    one_tile = Tq <= bq and Tk <= bk  # a head's whole attention is one tile: prefetch
    while True:
        u = _next_unit(counter, pos, B * H * nqb, chunk)
        if u >= B * H * nqb:
            break
        bh = u // nqb
        b, h = bh // H, bh % H
        i0 = (u % nqb) * bq
        i1 = min(i0 + bq, Tq)
        nq = i1 - i0
        qb, vb = q[b, h, i0:i1], v[b, h]  # (nq, d), (Tk, dv)
        if one_tile and bh + 1 < B * H:  # the next unit's rows, while this one runs
            for a in literal_unroll((q, k, v, out)):
                _prefetch_head(a, bh + 1, H)
        ob = out[b, h, i0:i1]  # (nq, dv)
        maskb = mask[min(bh, mask.shape[0] - 1)]  # (1 or Tq, Tk)
        jend = min(Tk, i1) if causal else Tk  # causal: no row here sees a key j >= i1
        if jend == 0:  # no keys: out 0, lse -inf (else the first tile sets m and lsum)
            ob[:, :] = zero
            lsum[:] = zero
        for j0 in range(0, jend, bk):  # the first tile sets ob, the next ones add to it
            j1 = min(j0 + bk, jend)
            nk = j1 - j0
            s = sbuf[: nq * nk].reshape((nq, nk))
            if use_kT:  # S = scale Q_i K_j^T (nq, nk)
                _mm_nn(qb, kT[b, h, :, j0:j1], s, scale, coef, False)
            elif own:
                kj = k[b, h, j0:j1]
                kTj = ktbuf[: kj.shape[1] * nk].reshape((kj.shape[1], nk))
                _transpose_into(kj, kTj)
                _mm_nn(qb, kTj, s, scale, coef, own)
            else:
                _mm_nt(qb, k[b, h, j0:j1], s, scale, coef)
            if has_mask or (causal and j1 - 1 > i0):
                _mask_tile(s, i0, j0, causal, maskb, has_mask)
            # P = exp(S - m) with the new row maxima m, row sums; out rescaled to them
            _online_softmax(s, m, lsum, ob, sbuf[: nq * nk], j0 == 0)
            if j0 == 0:  # O_i = P V_0
                _mm_nn(s, vb[j0:j1], ob, one, coef, own)
            else:  # O_i += P V_j
                _mm_nn_acc(s, vb[j0:j1], ob, one, coef, own)
        for r in range(nq):
            if lsum[r] > zero:
                inv = one / lsum[r]
                for c in range(dv):
                    ob[r, c] *= inv
                lse[bh, i0 + r] = m[r] + np.log(lsum[r])
            else:
                lse[bh, i0 + r] = ninf  # nothing to attend to: out stays 0
    keep_alive(owned)


@njit_cached(fastmath=_FM)
def _dots(qi, kb, s, jend, scale):
    """s[j] = scale qi . kb[j] for j < jend, four keys per pass over qi (independent sums)."""
    wide_vectors()
    d = qi.shape[0]
    zero = s.dtype.type(0)
    j = 0
    while j + 4 <= jend:
        k0, k1, k2, k3 = kb[j], kb[j + 1], kb[j + 2], kb[j + 3]
        a0, a1, a2, a3 = zero, zero, zero, zero
        for p in range(d):
            x = qi[p]
            a0 += x * k0[p]
            a1 += x * k1[p]
            a2 += x * k2[p]
            a3 += x * k3[p]
        s[j], s[j + 1], s[j + 2], s[j + 3] = scale * a0, scale * a1, scale * a2, scale * a3
        j += 4
    for jj in range(j, jend):
        acc = zero
        for p in range(d):
            acc += qi[p] * kb[jj, p]
        s[jj] = scale * acc


@njit_cached(fastmath=_FM)
def _weighted_rows(s, vb, ob, jend):
    """ob = sum_j s[j] vb[j] over j < jend, four value rows per pass over ob (ob may alias vb
    for all the compiler knows, so each pass loads and stores it)."""
    wide_vectors()
    dv = ob.shape[0]
    ob[:] = s.dtype.type(0)
    j = 0
    while j + 4 <= jend:
        f0, f1, f2, f3 = s[j], s[j + 1], s[j + 2], s[j + 3]
        v0, v1, v2, v3 = vb[j], vb[j + 1], vb[j + 2], vb[j + 3]
        for p in range(dv):
            ob[p] += (f0 * v0[p] + f1 * v1[p]) + (f2 * v2[p] + f3 * v3[p])
        j += 4
    for jj in range(j, jend):
        f = s[jj]
        for p in range(dv):
            ob[p] += f * vb[jj, p]


@njit_cached(nogil=True, fastmath=_FM)
def _few_rows_units(counter, q, k, v, out, lse, scale, causal, mask, has_mask, per):
    """The forward for a few query rows per batch entry (decoding): unit u is batch entries
    u per .. u per + per - 1, each row's scores over all its keys, softmax and P V by loops
    (no BLAS call, no tiles). Same results and masking rule as _forward_units."""
    wide_vectors()
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    dt = q.dtype.type
    ninf, zero, one = dt(-np.inf), dt(0), dt(1)
    # no reference counting on the arrays or any view of them (_numba_math.borrow: why)
    q, k, v, out, lse, mask = (borrow(q), borrow(k), borrow(v), borrow(out), borrow(lse),
                               borrow(mask))
    owned = np.empty(max(Tk, 1), dtype=q.dtype)
    s = borrow(owned)
    while True:
        u = take_unit(counter)
        if u * per >= B * H:
            break
        for bh in range(u * per, min(B * H, u * per + per)):
            b, h = bh // H, bh % H
            maskb = mask[min(bh, mask.shape[0] - 1)]
            for i in range(Tq):
                ob = out[b, h, i]
                jend = min(Tk, i + 1) if causal else Tk
                _dots(q[b, h, i], k[b, h], s, jend, scale)
                mrow = maskb[min(i, maskb.shape[0] - 1)]
                mx = ninf
                for j in range(jend):
                    if has_mask and not mrow[j]:
                        s[j] = ninf
                    mx = fmax(mx, s[j])
                if mx == ninf:  # nothing allowed: out 0, lse -inf
                    ob[:] = zero
                    lse[bh, i] = ninf
                    continue
                total = zero
                for j in range(jend):
                    s[j] = vexp(s[j] - mx)
                    total += s[j]
                _weighted_rows(s, v[b, h], ob, jend)
                inv = one / total
                for p in range(ob.shape[0]):
                    ob[p] *= inv
                lse[bh, i] = mx + np.log(total)
    keep_alive(owned)


@njit_cached(nogil=True, fastmath=_FM)
def _backward_units(counter, dout, q, k, v, out, lse, dq, dk, dv, dq_part, scale, causal,
                    mask, has_mask, bq, bk, nsplit, use_kT, chunk, own):
    """Takes work units from counter until none are left; unit u is batch entry and head
    bh = u // nsplit (b = bh // H, h = bh % H) and its key blocks share, share + nsplit, ...
    (share = u % nsplit). Accumulates into dk, dv (those key rows) and into dq, or
    dq_part[u] (B H nsplit, Tq, d) when nsplit > 1; all zeroed by the caller. Arrays
    (B, H, T, .) as in _forward_units, lse (B H, Tq)."""
    wide_vectors()
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    dt = q.dtype.type
    ninf = dt(-np.inf)
    zero, one = dt(0), dt(1)
    # no reference counting on the arrays or any view of them (_numba_math.borrow: why)
    dout, q, k, v, out, lse, mask = (borrow(dout), borrow(q), borrow(k), borrow(v),
                                     borrow(out), borrow(lse), borrow(mask))
    dq, dk, dv, dq_part = borrow(dq), borrow(dk), borrow(dv), borrow(dq_part)
    owned = (np.empty(2, dtype=q.dtype), np.empty(min(bq, Tq) * min(bk, Tk), dtype=q.dtype),
             np.empty(min(bq, Tq) * min(bk, Tk), dtype=q.dtype),
             np.empty(q.shape[3] * min(bk, Tk), dtype=q.dtype),
             np.empty(v.shape[3] * min(bk, Tk), dtype=q.dtype), np.empty(Tq, dtype=q.dtype),
             np.zeros(2, dtype=np.int64))
    coef, sbuf, pbuf = borrow(owned[0]), borrow(owned[1]), borrow(owned[2])
    ktbuf, vtbuf, D = borrow(owned[3]), borrow(owned[4]), borrow(owned[5])
    pos = borrow(owned[6])
    one_tile = Tq <= bq and Tk <= bk  # a head's whole attention is one tile: prefetch
    while True:
        u = _next_unit(counter, pos, B * H * nsplit, chunk)
        if u >= B * H * nsplit:
            break
        bh = u // nsplit
        b, h = bh // H, bh % H
        share = u % nsplit
        dob, qb, kb, vb, lseb = dout[b, h], q[b, h], k[b, h], v[b, h], lse[bh]
        ob = out[b, h]
        maskb = mask[min(bh, mask.shape[0] - 1)]  # (1 or Tq, Tk)
        dqb = dq[b, h] if nsplit == 1 else dq_part[u]  # (Tq, d)
        if one_tile and bh + 1 < B * H:  # the next unit's rows, while this one runs
            for a in literal_unroll((dout, q, k, v, out, dq, dk, dv)):
                _prefetch_head(a, bh + 1, H)
        for i in range(Tq):  # D[i] = dout[b, h, i] . out[b, h, i] = sum_j P[i, j] dP[i, j]
            acc = zero
            for c in range(dob.shape[1]):
                acc += dob[i, c] * ob[i, c]
            D[i] = acc
        for j0 in range(share * bk, Tk, nsplit * bk):  # this unit's key blocks
            j1 = min(j0 + bk, Tk)
            nk = j1 - j0
            kj, vj = kb[j0:j1], vb[j0:j1]  # (nk, d), (nk, dv)
            kTj = ktbuf[: kj.shape[1] * nk].reshape((kj.shape[1], nk))  # K_j^T (d, nk)
            vTj = vtbuf[: vj.shape[1] * nk].reshape((vj.shape[1], nk))  # V_j^T (dv, nk)
            if use_kT:  # transposed once, used by every query block
                _transpose_into(kj, kTj)
                _transpose_into(vj, vTj)
            dkj, dvj = dk[b, h, j0:j1], dv[b, h, j0:j1]
            istart = (j0 // bq) * bq if causal else 0  # causal: rows i < j0 see none of these
            for i0 in range(istart, Tq, bq):
                i1 = min(i0 + bq, Tq)
                nq = i1 - i0
                s = sbuf[: nq * nk].reshape((nq, nk))
                dp = pbuf[: nq * nk].reshape((nq, nk))
                qi, doi = qb[i0:i1], dob[i0:i1]  # (nq, d), (nq, dv)
                if use_kT:  # S = scale Q_i K_j^T
                    _mm_nn(qi, kTj, s, scale, coef, own)
                else:
                    _mm_nt(qi, kj, s, scale, coef)
                if has_mask or (causal and j1 - 1 > i0):
                    _mask_tile(s, i0, j0, causal, maskb, has_mask)
                for r in range(nq):  # P = exp(S - lse): 0 where masked and on dead rows
                    row = s[r]
                    lr = lseb[i0 + r]
                    if lr == ninf:
                        row[:] = ninf
                    else:
                        for c in range(nk):
                            row[c] -= lr
                _exp_inplace(sbuf[: nq * nk])
                _mm_tn_acc(s, doi, dvj, one, coef, own)  # dV_j += P^T dO_i
                if use_kT:  # dP = dO_i V_j^T
                    _mm_nn(doi, vTj, dp, one, coef, own)
                else:
                    _mm_nt(doi, vj, dp, one, coef)
                for r in range(nq):  # dS = P (dP - D_i), in place of dP
                    d_r = D[i0 + r]
                    for c in range(nk):
                        dp[r, c] = s[r, c] * (dp[r, c] - d_r)
                _mm_nn_acc(dp, kj, dqb[i0:i1], scale, coef, own)  # dQ_i += sc dS K_j
                _mm_tn_acc(dp, qi, dkj, scale, coef, own)  # dK_j += sc dS^T Q_i
    keep_alive(owned)


# ---- Python side ------------------------------------------------------------------------------


def _tiles(B, Tq, Tk, causal, st):
    """Query and key block sizes (bq, bk) from the setting ``st`` (kernels._tuning): square
    causal tiles (causal wastes the masked half of the tiles on the diagonal, so it takes
    smaller ones), else (block_q, block_k). Few long sequences get smaller query blocks, so
    that the forward has ``st.min_units`` (batch entry, query block) units to share out. The
    choice depends on the shapes and the setting only, never on the thread count, so results
    do not either."""
    if causal:
        bq = bk = st.causal_block_small if max(Tq, Tk) <= 256 else st.causal_block
    else:
        bq, bk = st.block_q, st.block_k
    if B * math.ceil(Tq / bq) < st.min_units:
        bq = min(bq, max(16, math.ceil(Tq / math.ceil(st.min_units / B))))
    return max(1, min(bq, Tq)), max(1, min(bk, Tk))


def _key_shares(B, Tq, Tk, d, bk, st):
    """Into how many shares the backward splits each batch entry's key blocks: 1 when there
    are ``st.min_units`` batch entries or the work is small, else enough for that many units
    (each share then sums into a private dq; shapes only decide, so dq does not depend on the
    thread count)."""
    if B >= st.min_units or 10 * B * Tq * Tk * d < st.serial_flops:
        return 1
    return min(math.ceil(Tk / bk), math.ceil(st.min_units / B))


def _chunk(B, H, n_units, st):
    """Units per chunk that a thread takes at once (_next_unit): with heads (H > 1) and
    ``st.min_units`` batch entries or more, all of a batch entry's (heads, query blocks or
    key shares); else one (the finest sharing, best when a thread is slowed down by other
    work on the machine). Units are numbered batch entry first, so with one unit at a time
    the threads work on neighbouring heads of one entry, whose rows of a (B, T, H, d) array
    (MultiHeadAttention's heads in place) share cache lines: both threads writing them took
    the date model's encoder attention (B 128, 4 heads of 16, T 29) from 1.20 ms on one
    thread to only 1.11-1.13 on two, against 0.87-0.92 with the threads on different
    entries. Shapes alone decide; results do not depend on it."""
    return n_units // B if H > 1 and B >= st.min_units else 1


def _as_heads(a):
    """a (B, T, c) -> a (B, 1, T, c) view; a (B, H, T, c) view whose rows are contiguous (the
    heads of a (B, T, H, c) array, say) as it is; anything else a contiguous copy."""
    if a.ndim == 3:
        return np.ascontiguousarray(a)[:, None]
    if (a.strides[3] != a.itemsize or a.strides[2] < a.shape[3] * a.itemsize
            or a.strides[2] % a.itemsize):  # BLAS takes rows a whole number of items apart
        return np.ascontiguousarray(a)
    return a


def _new(heads, B, H, T, c, dtype, zero=False):
    """A new result as the kernels index it, (B, H, T, c), and as it is returned: with heads,
    a (B, H, T, c) view of a (B, T, H, c) array (written head by head, it is the heads'
    merge (B, T, H c) with no copy); else (B, T, c) (H is 1)."""
    a = (np.zeros if zero else np.empty)((B, T, H, c) if heads else (B, T, c), dtype=dtype)
    return (a.transpose(0, 2, 1, 3),) * 2 if heads else (a[:, None], a)


def _check_grads(grads, shapes, dtype):
    """grads (three arrays the backward accumulates into) must be writeable (B, H, T, c)
    arrays of the inputs' dtype and shapes whose rows BLAS can write: contiguous rows, a
    whole number of items apart. They cannot be copied, so anything else is an error."""
    if len(grads) != 3:
        raise ValueError(f"grads must be three arrays (dq, dk, dv), got {len(grads)}")
    for name, g, shape in zip(("dq", "dk", "dv"), grads, shapes, strict=True):
        if not isinstance(g, np.ndarray) or g.dtype != dtype or g.shape != shape:
            raise ValueError(f"grads' {name} must be a {dtype} array of shape {shape}, got "
                             f"{getattr(g, 'dtype', type(g).__name__)} "
                             f"{getattr(g, 'shape', '')}")
        if (not g.flags.writeable or g.strides[3] != g.itemsize
                or g.strides[2] < shape[3] * g.itemsize or g.strides[2] % g.itemsize
                or min(g.strides) < 0):
            raise ValueError(f"grads' {name} must be writeable with contiguous rows a whole "
                             f"number of items apart, got strides {g.strides}")


def _prepare(arrays, scale, mask):
    if len({a.ndim for a in arrays}) != 1 or arrays[0].ndim not in (3, 4):
        raise ValueError(f"the arrays must all be 3-D (B, T, .) or all 4-D heads "
                         f"(B, H, T, .), got ndims {[a.ndim for a in arrays]}")
    if arrays[0].ndim == 3:  # the common case, with the least Python work (decoding steps)
        arrays = [np.ascontiguousarray(a)[:, None] for a in arrays]
    else:
        arrays = [_as_heads(a) for a in arrays]
    dtype = arrays[0].dtype
    if mask is None:
        mask, has_mask = _NO_MASK, False
    else:
        mask, has_mask = read_only(np.ascontiguousarray(mask, dtype=np.bool_)), True
    return arrays, dtype.type(scale), mask, has_mask


_pool = {}  # (user, threads beside the calling one) -> its ThreadPoolExecutor
_pool_lock = threading.Lock()


def pool(workers, user="kernels"):
    """The kept ThreadPoolExecutor of ``workers`` threads for ``user``, made on first use; the
    fused and the recurrent kernels share theirs. None is shut down while the interpreter runs:
    another Python thread (with its own Numba thread count) may be submitting to it. Work
    that calls kernels (``fastattn._threads``) has pools of its own, so a kernel that it runs
    never waits for a thread that is waiting for the kernel."""
    with _pool_lock:
        p = _pool.get((user, workers))
        if p is None:
            p = _pool[(user, workers)] = ThreadPoolExecutor(
                workers, thread_name_prefix=f"fastattn-{user}")
        return p


@atexit.register
def _shutdown_pools():
    """Stop the pools' threads at interpreter exit (and let a test do it)."""
    with _pool_lock:
        pools = list(_pool.values())
        _pool.clear()
    for p in pools:
        p.shutdown(wait=True)


def _in_parallel(fn, n_units, flops, serial_flops, *args):
    """Run fn(counter, *args) on min(threads, n_units) threads, the calling one and helpers
    (NumPy's OpenBLAS workers where they can be had, ``_blas_workers``, else a pool's):
    fn is a nogil kernel that takes units from the shared counter until none are left, so a
    thread slowed down by other work on the machine simply takes fewer. Small work
    (``flops``) runs on the calling thread alone, and so does other work where that has
    measured faster for its kind of call (``_thread_choice``: say, while another process
    holds the helper's core)."""
    counter = np.zeros(1, dtype=np.int64)
    n = 1 if flops < serial_flops else max(1, min(get_num_threads(), n_units))
    if n == 1:
        fn(counter, *args)
        return
    timed = _thread_choice.active()
    if timed:
        key = (fn, n_units, flops, n)
        n = _thread_choice.choice.pick(key, n)
        t0 = time.perf_counter()
    if n == 1:
        fn(counter, *args)
    elif not _blas_workers.run(n, fn, counter, *args):  # NumPy's BLAS workers help, else ours
        futures = [pool(n - 1).submit(fn, counter, *args) for _ in range(n - 1)]
        try:
            fn(counter, *args)
        finally:
            for f in futures:
                f.result()
    if timed:
        _thread_choice.choice.record(key, n, time.perf_counter() - t0)


def attention_forward(q, k, v, scale, causal, mask, *, tiles=None):
    """out = softmax(scale q k^T, masked) v (B, Tq, dv), lse (B, Tq); see kernels.loop.

    Also takes the heads of a (B, T, H, d) array without copying them: q, k, v as
    (B, H, T, .) views with contiguous rows (``x.transpose(0, 2, 1, 3)``), with the mask's
    first axis over (1 or B H) and lse (B, H, Tq). out (B, H, Tq, dv) is then the same kind
    of view of a new (B, Tq, H, dv) array, so ``out.transpose(0, 2, 1, 3)`` is contiguous.

    ``tiles`` (bq, bk) overrides the block sizes (for tests).
    """
    heads = q.ndim == 4
    (q, k, v), scale, mask, has_mask = _prepare((q, k, v), scale, mask)
    B, H, Tq, _ = q.shape
    st = _tuning.current()[0]
    out, result = _new(heads, B, H, Tq, v.shape[3], q.dtype)
    lse = np.empty((B * H, Tq), dtype=q.dtype)
    flops = 4 * q.size * k.shape[2]
    if Tq <= FEW_ROWS and tiles is None:  # decoding: loops per entry, no BLAS or tiles
        _few_rows(q, k, v, out, lse, scale, causal, mask, has_mask, st)
    else:
        bq, bk = tiles or _tiles(B * H, Tq, k.shape[2], causal, st)
        own = q.shape[3] <= st.own_dim
        with _blas_held(own):
            use_kT = min(Tq, bq) >= st.kt_rows and not own
            kT = (transposed_keys(k, flops, st.serial_flops) if use_kT
                  else _NO_KT[q.dtype])
            n_units = B * H * math.ceil(Tq / bq)
            chunk = _chunk(B, H, n_units, st)
            _in_parallel(_forward_units, math.ceil(n_units / chunk), flops, st.serial_flops,
                         q, k, kT, v, out, lse, scale, bool(causal), mask, has_mask, bq, bk,
                         use_kT, chunk, own)
    return result, (lse.reshape(B, H, Tq) if heads else lse)


def transposed_keys(k, flops=0, serial_flops=1):
    """k (..., Tk, d) transposed for the forward's score tiles: a C-contiguous (..., d, ld)
    array whose first Tk columns are k^T. Its rows are ld >= Tk items long, one cache line
    more than Tk when Tk items take a multiple of 1 KiB: rows a multiple of 1 KiB apart fall
    into a few sets of the L1 cache, so a (d, bk) tile of them (64 rows) evicts itself
    while BLAS reads it. Measured natively (Intel Xeon, Emerald Rapids, 2 threads, in one
    process, interleaved, forward only): float32 (32, 512, 64) 1.08x, (16, 1024, 64) 1.04x
    and (8, 2048, 64) 1.08x as fast as without the extra line; float64 1.08-1.12x, also
    at (256, 128, 64); level where Tk is no such multiple. The kernels read columns < Tk
    only, so the extra line stays unset.

    The copy runs on the kernels' threads, one (batch entry, head) per unit
    (``_transpose_units``), when ``flops`` (the forward's) is at least ``serial_flops``, else
    on this thread."""
    Tk, d = k.shape[-2:]
    ld = Tk + 64 // k.itemsize if (Tk * k.itemsize) % 1024 == 0 else Tk
    kT = np.empty(k.shape[:-2] + (d, ld), dtype=k.dtype)
    k4, kT4 = (k, kT) if k.ndim == 4 else (k.reshape(-1, 1, Tk, d), kT.reshape(-1, 1, d, ld))
    _in_parallel(_transpose_units, k4.shape[0] * k4.shape[1], flops, serial_flops, k4, kT4)
    return kT


#: from this many keys on, _transpose_units copies by rows of k, else by rows of kT. One
#: thread, d = 64, interleaved in one process (Intel Xeon, AVX-512): by rows of k, Tk = 512
#: and 2048 took 0.67-0.68 ms (float32) and 1.23-1.33 (float64) against 1.10-1.21 and
#: 1.57-2.49 by rows of kT and 1.13-1.23 and 1.67-2.59 by NumPy's copy; at Tk = 128 (B = 256)
#: 3.55 and 5.45 against 2.39 and 4.54 by rows of kT (NumPy 2.58 and 4.72)
_LONG_KEYS = 256


@njit_cached(nogil=True, fastmath=_FM)
def _transpose_units(counter, k, kT):
    """Unit u: kT[b, h, :, :Tk] = k[b, h] transposed (b, h = divmod(u, H)); k (B, H, Tk, d)
    with contiguous rows (heads may be strided views), kT (B, H, d, >= Tk)."""
    wide_vectors()
    B, H, Tk, d = k.shape
    k, kT = borrow(k), borrow(kT)
    while True:
        u = take_unit(counter)
        if u >= B * H:
            break
        src, dst = k[u // H, u % H], kT[u // H, u % H]
        if Tk >= _LONG_KEYS:  # by rows of k: reads whole rows, writes d lines at a time
            _transpose_into(src, dst)
        else:  # by rows of kT: writes whole rows, reads d items apart
            for p in range(d):
                out = dst[p]
                for r in range(Tk):
                    out[r] = src[r, p]


def _blas_held(own):
    """BLAS at one thread while the kernel runs, unless ``own``: with the own tile products
    the forward and backward units call no BLAS, and holding it costs some 5-10 us a call (a
    small attention's own time)."""
    return contextlib.nullcontext() if own else _OneBlasThread()


def few_rows_forward(q, k, v, scale, causal):
    """attention_forward for 3-D q (B, Tq, d), k, v with Tq <= FEW_ROWS and no mask (a
    decoding step's call), with the least Python work around the kernel: the same kernel and
    arguments as attention_forward gives it, so the same results. A decoding step makes a few
    such calls per layer, each some microseconds of kernel, so the Python around it counts."""
    q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)
    B, Tq, _ = q.shape
    out = np.empty((B, Tq, v.shape[2]), dtype=q.dtype)
    lse = np.empty((B, Tq), dtype=q.dtype)
    _few_rows(q[:, None], k[:, None], v[:, None], out[:, None], lse, q.dtype.type(scale),
              causal, _NO_MASK, False, _tuning.current()[0])
    return out, lse


def _few_rows(q, k, v, out, lse, scale, causal, mask, has_mask, st):
    """_few_rows_units on (B, H, T, .) arrays, in units of up to 64 batch entries and heads
    (by the shapes only), on the kernels' threads above the setting's serial_flops."""
    BH = q.shape[0] * q.shape[1]
    per = max(1, min(64, BH // 16))  # entries per unit
    _in_parallel(_few_rows_units, math.ceil(BH / per), 4 * q.size * k.shape[2],
                 st.serial_flops, q, k, v, out, lse, scale, bool(causal), mask, has_mask, per)


def attention_backward(dout, q, k, v, out, lse, scale, causal, mask, *, tiles=None,
                       grads=None):
    """Gradients of attention_forward -> dq (B, Tq, d), dk (B, Tk, d), dv (B, Tk, dv).

    Takes heads as attention_forward does (dout and out (B, H, Tq, dv) views, lse (B, H, Tq));
    dq, dk, dv are then (B, H, T, .) views of new (B, T, H, .) arrays, or ``grads``: three
    zeroed (B, H, T, .) views with contiguous rows that receive them (the columns of one
    (B T, 3 H d) array, say), returned.

    ``tiles`` (bq, bk) overrides the block sizes (for tests).
    """
    heads = q.ndim == 4
    (dout, q, k, v, out), scale, mask, has_mask = _prepare((dout, q, k, v, out), scale, mask)
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    lse = np.ascontiguousarray(lse).reshape(B * H, Tq)
    st = _tuning.current()[0]
    bq, bk = tiles or _tiles(B * H, Tq, Tk, causal, st)
    nsplit = _key_shares(B * H, Tq, Tk, d, bk, st)
    if grads is None:
        (dq, dq_r), (dk, dk_r), (dv, dv_r) = (
            _new(heads, B, H, T, c, q.dtype, zero=True)
            for T, c in ((Tq, d), (Tk, d), (Tk, v.shape[3])))
    elif not heads:
        raise ValueError("grads is for heads (4-D arrays) only")
    else:
        _check_grads(grads, (q.shape, k.shape, v.shape), q.dtype)
        dq, dk, dv = dq_r, dk_r, dv_r = grads
    dq_part = np.zeros((B * H * nsplit if nsplit > 1 else 0, Tq, d), dtype=dq.dtype)
    own = d <= st.own_dim
    with _blas_held(own):
        chunk = _chunk(B, H, B * H * nsplit, st)
        _in_parallel(_backward_units, math.ceil(B * H * nsplit / chunk),
                     10 * B * H * Tq * Tk * d, st.serial_flops, dout, q, k, v, out, lse, dq,
                     dk, dv, dq_part, scale, bool(causal), mask, has_mask, bq, bk, nsplit,
                     own or min(Tq, bq) >= st.kt_rows or d <= st.kt_dim, chunk, own)
    if nsplit > 1:
        dq += dq_part.reshape(B, H, nsplit, Tq, d).sum(axis=2)
    return dq_r, dk_r, dv_r
