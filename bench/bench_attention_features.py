"""Benchmarks of the attention features (the goals of issue 12), float32:

* ``window``: a sliding window of w keys (causal), forward+backward at two lengths; the time
  should grow linearly with T (at most 10x from T=2048 to T=16384 with w=256);
* ``gqa``: grouped-query attention, H=32 query heads over Hkv=4 key/value heads, against
  PyTorch's ``enable_gqa``;
* ``packed``: 8 sequences of lengths 64..1024 (4096 rows) packed with cu_seqlens, against the
  same batch padded to 1024 and masked (both fastattn);
* ``decode``: one query row against 8192 cached keys, 32 heads, forward only, against PyTorch;
* ``bias``: forward+backward with a float bias (and its gradient) against PyTorch's float
  ``attn_mask``.

CI runs smaller shapes; ``FASTATTN_BENCH_FULL=1`` runs the issue's shapes. Before timing,
each benchmark checks the exact configuration it times (the same arrays and keywords) against
a float64 NumPy reference written here (dense, on one key/value group of heads, in chunks of
query rows), with float32 bounds of the kind of ``tests/attention_cases.bounds``.

Run::

    python -m pytest bench/bench_attention_features.py --benchmark-only \
        --benchmark-columns=min,median --benchmark-group-by=group
    FASTATTN_BENCH_FULL=1 python -m pytest bench/bench_attention_features.py --benchmark-only
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import fastattn

FULL = os.environ.get("FASTATTN_BENCH_FULL") == "1"
DTYPE = np.float32
D = 64

WINDOW = 256 if FULL else 64
WINDOW_T = (2048, 16384) if FULL else (512, 2048)
WINDOW_H = 4
GQA = dict(H=32, Hkv=4, T=2048 if FULL else 256)
PACKED = [64, 128, 256, 512, 1024, 1024, 576, 512]  # sums to 4096
if not FULL:
    PACKED = [n // 8 for n in PACKED]
PACKED_H = 4
DECODE = dict(H=32, Tk=8192 if FULL else 1024)
BIAS = dict(H=8, T=1024 if FULL else 256)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(DTYPE)


def _warm_up(benchmark, fn, seconds=0.3):
    if benchmark.enabled:
        end = time.perf_counter() + seconds
        fn()
        while time.perf_counter() < end:
            fn()


# ---- the reference: dense float64 on one key/value group --------------------------------------


def _reference(q, k, v, dout, allowed, bias=None, chunk=256):
    """Attention of q (g, Tq, d) to k, v (Tk, d) in float64 with allowed(i0, i1) -> bool
    (i1 - i0, Tk) and bias (g or 1, Tq, Tk) or None: out, lse, dq (g, ...), dk, dv (summed
    over the g query heads), dbias (g, Tq, Tk) or None."""
    q, k, v, dout = (a.astype(np.float64) for a in (q, k, v, dout))
    g, Tq, d = q.shape
    scale = 1 / np.sqrt(d)
    out, lse, dq = np.zeros(dout.shape), np.full((g, Tq), -np.inf), np.zeros(q.shape)
    dk, dv = np.zeros(k.shape), np.zeros(v.shape)
    dbias = None if bias is None else np.zeros((g, Tq, k.shape[0]))
    for i0 in range(0, Tq, chunk):
        i1 = min(i0 + chunk, Tq)
        s = scale * q[:, i0:i1] @ k.T  # (g, c, Tk)
        if bias is not None:
            s = s + bias[:, i0:i1]
        s = np.where(allowed(i0, i1), s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        p = np.exp(s - m)
        tot = p.sum(axis=-1, keepdims=True)
        p /= np.where(tot > 0, tot, 1)
        o = p @ v
        out[:, i0:i1] = o
        lse[:, i0:i1] = np.where(tot[..., 0] > 0, (m + np.log(np.where(tot > 0, tot, 1)))[..., 0],
                                 -np.inf)
        do = dout[:, i0:i1]
        ds = p * (do @ v.T - (do * o).sum(axis=-1, keepdims=True))
        dq[:, i0:i1] = scale * ds @ k
        dk += scale * np.einsum("gij,gid->jd", ds, q[:, i0:i1])
        dv += np.einsum("gij,gid->jd", p, do)
        if dbias is not None:
            dbias[:, i0:i1] = ds
    return out, lse, dq, dk, dv, dbias


def _bound(got, want, n_terms):
    """float32 against float64: eps32 times the terms summed (n_terms) times their size."""
    eps = np.finfo(DTYPE).eps
    return 8 * eps * n_terms * max(1.0, float(np.abs(want).max()))


def _check(pairs, n_terms):
    for name, got, want in pairs:
        fin = np.isfinite(want)
        err = np.abs(got[fin].astype(np.float64) - want[fin]).max(initial=0)
        assert err <= _bound(got, want, n_terms), (name, err)


def _check_group(res, ref, heads, n_terms, grads=True):
    """res: fastattn's (out, lse, dq, dk, dv[, dbias]) with heads on axis 1 (batch entry 0);
    ref: _reference's results for query heads ``heads`` and key/value head 0."""
    out, lse = res[0][0, heads], res[1][0, heads]
    pairs = [("out", out, ref[0]), ("lse", lse, ref[1])]
    if grads:
        pairs += [("dq", res[2][0, heads], ref[2]), ("dk", res[3][0, 0], ref[3]),
                  ("dv", res[4][0, 0], ref[4])]
    _check(pairs, n_terms)


def _fwd_bwd(q, k, v, dout, **kw):
    out, lse = fastattn.attention_forward(q, k, v, backend="numba", **kw)
    return (out, lse) + tuple(fastattn.attention_backward(dout, q, k, v, out, lse,
                                                          backend="numba", **kw))


# ---- sliding window ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", WINDOW_T)
def test_window(benchmark, T):
    benchmark.group = f"window w={WINDOW} causal, H={WINDOW_H}, d={D}: fwd+bwd by T"
    rng = np.random.default_rng(0)
    q, k, v, dout = (_rand(rng, 1, WINDOW_H, T, D) for _ in range(4))
    kw = dict(causal=True, window=(WINDOW, 0))

    def allowed(i0, i1):
        i, j = np.arange(i0, i1)[:, None], np.arange(T)[None, :]
        return (j <= i) & (j >= i - WINDOW)

    res = _fwd_bwd(q, k, v, dout, **kw)
    _check_group(res, _reference(q[0, :1], k[0, 0], v[0, 0], dout[0, :1], allowed), [0],
                 WINDOW + D)
    _warm_up(benchmark, lambda: _fwd_bwd(q, k, v, dout, **kw))
    benchmark(_fwd_bwd, q, k, v, dout, **kw)
    benchmark.extra_info.update(T=T, window=WINDOW)


# ---- grouped-query attention vs torch enable_gqa ----------------------------------------------


def _torch_fwd_bwd(q, k, v, dout, **kw):
    torch = pytest.importorskip("torch")
    ts = [torch.from_numpy(a).requires_grad_(True) for a in (q, k, v)]
    mask = kw.pop("attn_mask", None)
    if mask is not None:
        mask = torch.from_numpy(mask).requires_grad_(mask.dtype != np.bool_)
        ts.append(mask)
    out = torch.nn.functional.scaled_dot_product_attention(*ts[:3], attn_mask=mask, **kw)
    wrt = [t for t in ts if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, torch.from_numpy(dout))
    return (out.detach().numpy(), None) + tuple(g.numpy() for g in grads)


@pytest.mark.parametrize("who", ["numba", "torch"])
def test_gqa(benchmark, who):
    H, Hkv, T = GQA["H"], GQA["Hkv"], GQA["T"]
    benchmark.group = f"gqa H={H} Hkv={Hkv} T={T} d={D}: fwd+bwd"
    rng = np.random.default_rng(1)
    q, dout = _rand(rng, 1, H, T, D), _rand(rng, 1, H, T, D)
    k, v = _rand(rng, 1, Hkv, T, D), _rand(rng, 1, Hkv, T, D)
    g = H // Hkv
    run = _fwd_bwd if who == "numba" else (lambda *a: _torch_fwd_bwd(*a, enable_gqa=True))
    res = run(q, k, v, dout)
    ref = _reference(q[0, :g], k[0, 0], v[0, 0], dout[0, :g],
                     lambda i0, i1: np.ones((i1 - i0, T), bool))
    pairs = [("out", res[0][0, :g], ref[0]), ("dq", res[2][0, :g], ref[2]),
             ("dk", res[3][0, 0], ref[3]), ("dv", res[4][0, 0], ref[4])]
    if who == "numba":
        pairs.append(("lse", res[1][0, :g], ref[1]))
    _check(pairs, T + D)
    _warm_up(benchmark, lambda: run(q, k, v, dout))
    benchmark(run, q, k, v, dout)


# ---- packed vs padded and masked --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_packed(benchmark, layout):
    lengths = PACKED
    total, Lmax, n = sum(lengths), max(lengths), len(lengths)
    benchmark.group = f"packed {n} sequences {min(lengths)}..{Lmax} ({total} rows), " \
                      f"H={PACKED_H}: fwd+bwd"
    rng = np.random.default_rng(2)
    q, k, v, dout = (_rand(rng, 1, PACKED_H, total, D) for _ in range(4))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    if layout == "packed":
        args, kw = (q, k, v, dout), dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    else:
        pad = [np.zeros((n, PACKED_H, Lmax, D), DTYPE) for _ in range(4)]
        for s, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
            for p, x in zip(pad, (q, k, v, dout), strict=True):
                p[s, :, : b - a] = x[0, :, a:b]
        keys = np.arange(Lmax)[None, :] < np.array(lengths)[:, None]  # (n, Lmax)
        args, kw = tuple(pad), dict(mask=keys[:, None, None, :])
    res = _fwd_bwd(*args, **kw)
    s = int(np.argmax(lengths))  # check the longest sequence, head 0, in both layouts
    a, b = cu[s], cu[s + 1]
    ref = _reference(q[0, :1, a:b], k[0, 0, a:b], v[0, 0, a:b], dout[0, :1, a:b],
                     lambda i0, i1: np.ones((i1 - i0, b - a), bool))
    if layout == "packed":
        got = [x[:, :, a:b] for x in res]
    else:
        got = [x[s: s + 1, :, : b - a] for x in res]
    _check_group(got, ref, [0], Lmax + D)
    _warm_up(benchmark, lambda: _fwd_bwd(*args, **kw))
    benchmark(_fwd_bwd, *args, **kw)


# ---- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["numba", "torch"])
def test_decode(benchmark, who):
    H, Tk = DECODE["H"], DECODE["Tk"]
    benchmark.group = f"decode Tq=1 Tk={Tk} H={H} d={D}: forward"
    rng = np.random.default_rng(3)
    q, k, v = _rand(rng, 1, H, 1, D), _rand(rng, 1, H, Tk, D), _rand(rng, 1, H, Tk, D)
    if who == "numba":
        def run():
            return fastattn.attention_forward(q, k, v, causal="bottom_right", backend="numba")
    else:
        torch = pytest.importorskip("torch")
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

        def run():
            with torch.no_grad():
                return (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).numpy(),)
    out = run()[0]
    for h in (0, H - 1):
        ref = _reference(q[0, h:h + 1], k[0, h], v[0, h], np.zeros((1, 1, D), DTYPE),
                         lambda i0, i1: np.ones((i1 - i0, Tk), bool))
        _check([("out", out[0, h], ref[0][0])], Tk + D)
    _warm_up(benchmark, run)
    benchmark(run)


# ---- bias vs torch's float mask ---------------------------------------------------------------


@pytest.mark.parametrize("who", ["numba", "torch"])
def test_bias(benchmark, who):
    H, T = BIAS["H"], BIAS["T"]
    benchmark.group = f"bias (H, T, T) H={H} T={T} d={D}: fwd+bwd with dbias"
    rng = np.random.default_rng(4)
    q, k, v, dout = (_rand(rng, 1, H, T, D) for _ in range(4))
    bias = _rand(rng, H, T, T)
    if who == "numba":
        def run():
            return _fwd_bwd(q, k, v, dout, bias=bias)
    else:
        def run():
            return _torch_fwd_bwd(q, k, v, dout, attn_mask=bias)
    res = run()
    ref = _reference(q[0, :1], k[0, 0], v[0, 0], dout[0, :1],
                     lambda i0, i1: np.ones((i1 - i0, T), bool), bias=bias[:1])
    _check([("out", res[0][0, :1], ref[0]), ("dq", res[2][0, :1], ref[2]),
            ("dbias", res[5][:1], ref[5])], T + D)
    _warm_up(benchmark, run)
    benchmark(run)
