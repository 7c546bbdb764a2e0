"""The rules of the attention features that every backend shares, in plain Python.

* **Spans.** With packed sequences (``cu_seqlens_q``, ``cu_seqlens_k``) sequence ``n`` owns
  query rows ``cu_q[n]:cu_q[n + 1]`` and key rows ``cu_k[n]:cu_k[n + 1]``; without them one
  sequence owns everything. Positions count from each sequence's own start.
* **Band.** causal and window together allow local key ``j`` for local query ``i`` when
  ``-left <= j - (i + off) <= right``, where ``off = Lk - Lq`` (the sequence's key and query
  lengths) with ``causal="bottom_right"`` and 0 otherwise; causal itself is ``right = 0``
  (a window's right bound is then ``min(right, 0)``); None is unbounded.
* **Dropout.** Entry (b, i, j) (b the flattened batch-and-head index, i, j the rows of the
  packed T axes) is kept when the top 32 bits of a counter-based hash of (seed, b, i, j) are
  at least ``threshold = floor(dropout_p * 2**32)``. The hash is three SplitMix64 rounds for
  the row key ``mix(mix(mix(seed) ^ b) ^ i)``, then one more: ``mix(row_key ^ j)``.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2**64 / golden ratio)
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def mix(x: int) -> int:
    """One SplitMix64 step: x + GAMMA, then its finaliser (a bijection of 64-bit ints)."""
    z = (x + GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def row_key(seed: int, b: int, i: int) -> int:
    """The hash state of query row i of batch entry b, shared by the row's keys."""
    return mix(mix(mix(seed & MASK64) ^ b) ^ i)


def keep(seed: int, b: int, i: int, j: int, threshold: int) -> bool:
    """Dropout's decision for entry (b, i, j): True when the entry is kept."""
    return (mix(row_key(seed, b, i) ^ j) >> 32) >= threshold


def dropout_threshold(dropout_p: float) -> int:
    """The 32-bit threshold of :func:`keep`: an entry is dropped with probability
    threshold / 2**32 = dropout_p to within 2**-32."""
    return int(dropout_p * 2.0**32)


def spans(cu_seqlens_q, cu_seqlens_k, Tq: int, Tk: int) -> list:
    """[(qs, qe, ks, ke)] per sequence: its query rows qs:qe and key rows ks:ke."""
    if cu_seqlens_q is None:
        return [(0, Tq, 0, Tk)]
    cq = [int(x) for x in cu_seqlens_q]
    ck = [int(x) for x in cu_seqlens_k]
    return [(cq[n], cq[n + 1], ck[n], ck[n + 1]) for n in range(len(cq) - 1)]


def band(causal, window):
    """(left, right, bottom_right): the allowed band of j - (i + off); None is unbounded."""
    left, right = (None, None) if window is None else window
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right, causal == "bottom_right"


def offset(bottom_right: bool, Lq: int, Lk: int) -> int:
    """The alignment offset: query i lines up with key i + off."""
    return Lk - Lq if bottom_right else 0


def in_band(i: int, j: int, off: int, left, right) -> bool:
    """True when local key j is within the band of local query i."""
    delta = j - i - off
    return (right is None or delta <= right) and (left is None or delta >= -left)


def key_range(i0: int, i1: int, Lk: int, off: int, left, right):
    """The local keys [j0, j1) that some query of rows [i0, i1) may see (whole blocks outside
    it are skipped)."""
    j0 = 0 if left is None else max(0, i0 + off - left)
    j1 = Lk if right is None else min(Lk, i1 - 1 + off + right + 1)
    return j0, max(j0, j1)


def query_range(j0: int, j1: int, Lq: int, off: int, left, right):
    """The local queries [i0, i1) that may see some key of rows [j0, j1)."""
    i0 = 0 if right is None else max(0, j0 - off - right)
    i1 = Lq if left is None else min(Lq, j1 - 1 - off + left + 1)
    return i0, max(i0, i1)
