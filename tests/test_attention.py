"""The fused Numba attention kernels (kernels._flash) against the loop reference and PyTorch.

Each case runs forward and backward on both implementations from the same inputs and compares
out, lse, dq, dk and dv, each within the error bound of ``helpers.attention_bounds`` (n * eps
times the sum of |terms| each result adds up, carried through the softmax).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import (
    assert_attention_close,
    assert_close,
    attention_bounds,
    kernel_attention_probs,
    public_attention_bounds,
)
from helpers.paths import record_paths, use_products

import fastattn
from fastattn import kernels
from fastattn.kernels import _flash, _tuning, loop

DTYPES = [np.float32, np.float64]


@pytest.fixture
def numba_flash(monkeypatch):
    """Make the numba backend's fused kernels the ones under test, for the public functions."""
    mod = kernels.module("numba")
    monkeypatch.setattr(mod, "attention_forward", _flash.attention_forward, raising=False)
    monkeypatch.setattr(mod, "attention_backward", _flash.attention_backward, raising=False)
    return mod


def _inputs(rng, B, Tq, Tk, d, dv, dtype):
    q = rng.standard_normal((B, Tq, d)).astype(dtype)
    k = rng.standard_normal((B, Tk, d)).astype(dtype)
    v = rng.standard_normal((B, Tk, dv)).astype(dtype)
    dout = rng.standard_normal((B, Tq, dv)).astype(dtype)
    return q, k, v, dout


def _run(mod, q, k, v, dout, scale, causal, mask, **kw):
    out, lse = mod.attention_forward(q, k, v, scale, causal, mask, **kw)
    dq, dk, dv = mod.attention_backward(dout, q, k, v, out, lse, scale, causal, mask, **kw)
    return out, lse, dq, dk, dv


# tile sizes (bq, bk) besides the kernels' own choice: small and odd ones put tile edges
# (partial tiles, causal diagonals crossing tiles) inside small test shapes; query tiles of
# 64 rows and more take the kernels' other path (transposed key and value tiles)
TILES = [None, (4, 8), (3, 5), (1, 1), (64, 16)]


def _assert_matches_loop(q, k, v, dout, causal, mask, scale=None, tiles=TILES):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    want = _run(loop, q, k, v, dout, scale, causal, mask)
    P = kernel_attention_probs(q, k, scale, causal, mask)
    bounds = attention_bounds(q, k, v, P, scale=scale, dout=dout)
    for t in tiles:
        got = _run(_flash, q, k, v, dout, scale, causal, mask, tiles=t)
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
            assert g.dtype == q.dtype, name
            assert g.shape == w.shape, name
            assert not np.isnan(g).any(), name
        assert_attention_close(got, want, q, k, v, dout, bounds=bounds, err_msg=f"tiles {t}")
    return got


# (B, Tq, Tk, d, dv): T=1, Tq != Tk both ways, odd sizes, sizes that cross q- and kv-tile edges
SHAPES = [
    (2, 1, 1, 4, 4),
    (3, 5, 5, 8, 8),
    (2, 7, 13, 5, 3),
    (2, 13, 7, 6, 9),
    (1, 1, 40, 8, 8),
    (2, 29, 29, 16, 16),
    (1, 70, 67, 8, 5),
]


PRODUCTS = pytest.mark.parametrize("own", [0, 1], ids=["blas", "own"])


@PRODUCTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_matches_loop_without_mask(shape, causal, dtype, own, monkeypatch):
    """Both kinds of tile product (BLAS, the kernels' own micro-kernel), whichever is this
    machine's default; the kernels were given the flag (the spy)."""
    seen = use_products(monkeypatch, own)
    rng = np.random.default_rng(0)
    q, k, v, dout = _inputs(rng, *shape, dtype)
    _assert_matches_loop(q, k, v, dout, causal, None)
    assert seen and set(seen) == {own}


def test_kernel_matches_loop_across_long_key_tiles():
    """Tk larger than any key/value tile, Tq across query tiles, with a padding mask."""
    rng = np.random.default_rng(1)
    B, Tq, Tk, d = 1, 37, 1100, 4
    q, k, v, dout = _inputs(rng, B, Tq, Tk, d, d, np.float64)
    mask = rng.random((B, 1, Tk)) < 0.9
    _assert_matches_loop(q, k, v, dout, False, mask)
    _assert_matches_loop(q, k, v, dout, True, None)


@PRODUCTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["key_padding", "full", "shared", "row"])
def test_kernel_matches_loop_with_mask(kind, causal, dtype, own, monkeypatch):
    use_products(monkeypatch, own)
    rng = np.random.default_rng(2)
    B, Tq, Tk, d = 3, 11, 9, 8
    q, k, v, dout = _inputs(rng, B, Tq, Tk, d, d, dtype)
    shape = {"key_padding": (B, 1, Tk), "full": (B, Tq, Tk), "shared": (1, Tq, Tk),
             "row": (1, 1, Tk)}[kind]
    mask = rng.random(shape) < 0.6
    mask[..., 0] = True  # keep most rows alive; dead rows are tested below
    _assert_matches_loop(q, k, v, dout, causal, mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_give_zeros_and_minus_inf(dtype):
    rng = np.random.default_rng(3)
    B, Tq, Tk, d = 2, 6, 5, 4
    q, k, v, dout = _inputs(rng, B, Tq, Tk, d, d, dtype)
    mask = rng.random((B, Tq, Tk)) < 0.7
    mask[0, 2] = False
    mask[1, 4] = False
    mask[1, 0] = False
    out, lse, dq, dk, dv = _assert_matches_loop(q, k, v, dout, False, mask)
    for b, i in [(0, 2), (1, 4), (1, 0)]:
        assert np.all(out[b, i] == 0)
        assert lse[b, i] == -np.inf
        assert np.all(dq[b, i] == 0)
    # the whole of batch entry 1 masked: every gradient of it is zero
    mask[1] = False
    out, lse, dq, dk, dv = _assert_matches_loop(q, k, v, dout, True, mask)
    assert np.all(lse[1] == -np.inf) and not np.any(out[1])
    assert not np.any(dq[1]) and not np.any(dk[1]) and not np.any(dv[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_key_tiles_path_with_mask_and_causal(dtype):
    """Query tiles of >= 64 rows: S and dP from transposed key/value tiles, partial tiles."""
    rng = np.random.default_rng(12)
    q, k, v, dout = _inputs(rng, 2, 100, 90, 8, 6, dtype)
    mask = rng.random((2, 100, 90)) < 0.8
    mask[1, 7] = False  # a dead row
    tiles = [(64, 24), (70, 90), (100, 7)]
    _assert_matches_loop(q, k, v, dout, False, mask, tiles=tiles)
    _assert_matches_loop(q, k, v, dout, True, mask, tiles=tiles)


def test_causal_with_fewer_keys_than_queries_kills_no_row():
    """Causal with Tq > Tk: rows i >= Tk see every key; row 0 sees key 0 only."""
    rng = np.random.default_rng(4)
    q, k, v, dout = _inputs(rng, 2, 9, 4, 3, 3, np.float64)
    out, lse, *_ = _assert_matches_loop(q, k, v, dout, True, None)
    assert_close(out[:, 0], v[:, 0], terms=np.abs(v[:, 0]), n=2, err_msg="row 0 = value 0")


def test_kernel_accepts_non_contiguous_inputs():
    rng = np.random.default_rng(5)
    q, k, v, dout = _inputs(rng, 2, 8, 8, 4, 4, np.float64)
    want = _run(_flash, q, k, v, dout, 0.5, False, None)
    got = _run(_flash, q[:, ::-1].copy()[:, ::-1], k[:, ::-1].copy()[:, ::-1],
               v[:, ::-1].copy()[:, ::-1], dout, 0.5, False, None)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_scale_is_applied():
    rng = np.random.default_rng(6)
    q, k, v, dout = _inputs(rng, 2, 6, 7, 4, 4, np.float64)
    _assert_matches_loop(q, k, v, dout, False, None, scale=0.1)
    _assert_matches_loop(q, k, v, dout, True, None, scale=2.0)


# ---- through the public functions ------------------------------------------------------------

def _public(q, k, v, dout, backend, **kw):
    out, lse = fastattn.attention_forward(q, k, v, backend=backend, **kw)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    return (out, lse, *grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_public_functions_with_leading_dims_and_mask(numba_flash, causal, dtype):
    rng = np.random.default_rng(7)
    lead, Tq, Tk, d = (2, 3), 6, 7, 8
    q = rng.standard_normal(lead + (Tq, d)).astype(dtype)
    k = rng.standard_normal(lead + (Tk, d)).astype(dtype)
    v = rng.standard_normal(lead + (Tk, 5)).astype(dtype)
    dout = rng.standard_normal(lead + (Tq, 5)).astype(dtype)
    mask = rng.random((2, 1, 1, Tk)) < 0.7  # key padding per first leading dim
    mask[..., 0] = True
    got = _public(q, k, v, dout, "numba", causal=causal, mask=mask)
    want = _public(q, k, v, dout, "loop", causal=causal, mask=mask)
    shapes = [lead + (Tq, 5), lead + (Tq,), q.shape, k.shape, v.shape]
    for g, shape in zip(got, shapes, strict=True):
        assert g.shape == shape
    assert_attention_close(got, want, q, k, v, dout, causal=causal, mask=mask)


def test_public_functions_accept_reversed_views(numba_flash):
    """The book reverses inputs with x[:, ::-1]; a view gives what a contiguous copy gives."""
    rng = np.random.default_rng(8)
    q, k, v, dout = _inputs(rng, 3, 9, 9, 8, 8, np.float32)
    views = [a[:, ::-1] for a in (q, k, v, dout)]
    copies = [np.ascontiguousarray(a) for a in views]
    got = _public(*views, "numba", causal=True)
    want = _public(*copies, "numba", causal=True)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    ref = _public(*copies, "loop", causal=True)
    assert_attention_close(got, ref, *copies, causal=True)


# ---- against PyTorch -------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_matches_torch_sdpa(numba_flash, causal, with_mask):
    """Against torch's scaled_dot_product_attention (float64), forward and backward.

    torch's boolean attn_mask means True = attend, as here. torch gives NaN for fully masked
    rows, so those rows are excluded from the comparison (and their dout set to zero).
    """
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    B, H, Tq, Tk, d = 2, 3, 10, 12, 8
    q = rng.standard_normal((B, H, Tq, d))
    k = rng.standard_normal((B, H, Tk, d))
    v = rng.standard_normal((B, H, Tk, d))
    dout = rng.standard_normal((B, H, Tq, d))
    mask = None
    if with_mask:
        mask = rng.random((B, 1, Tq, Tk)) < 0.5
        mask[0, 0, 3] = False  # one dead row
    allowed = np.ones((B, H, Tq, Tk), bool)
    if mask is not None:
        allowed = allowed & mask
    if causal:
        allowed = allowed & np.tril(np.ones((Tq, Tk), bool))
    live = allowed.any(-1)  # (B, H, Tq)
    dout = dout * live[..., None]
    out, lse, dq, dk, dv = _public(q, k, v, dout, "numba", causal=causal, mask=mask)

    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    # dead rows get everything allowed in torch (no NaN) and zero dout: they add nothing to
    # dk and dv, and their out and dq are left out of the comparison
    tmask = torch.tensor(allowed | ~live[..., None])
    tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
    tout.backward(torch.tensor(dout))
    b = public_attention_bounds(q, k, v, dout, causal=causal, mask=mask)
    assert_close(out[live], tout.detach().numpy()[live], terms=b["out"][0][live],
                 n=np.broadcast_to(b["out"][1], out.shape)[live], err_msg="out")
    assert_close(dq[live], tq.grad.numpy()[live], terms=b["dq"][0][live],
                 n=np.broadcast_to(b["dq"][1], dq.shape)[live], err_msg="dq")
    assert_close(dk, tk.grad.numpy(), terms=b["dk"][0], n=b["dk"][1], err_msg="dk")
    assert_close(dv, tv.grad.numpy(), terms=b["dv"][0], n=b["dv"][1], err_msg="dv")
    assert np.all(out[~live] == 0) and np.all(lse[~live] == -np.inf)


def _no_serial_threshold(monkeypatch, threads):
    """``threads`` threads, and even the smallest work handed out to them."""
    monkeypatch.setattr(_flash, "get_num_threads", lambda: threads)
    monkeypatch.setitem(_tuning._state, "current", (dataclasses.replace(
        _tuning.current()[0], serial_flops=0), "no serial threshold (a test)"))


def test_thread_pools_are_shut_down_at_exit(monkeypatch):
    """The fused kernels' pool threads stop when _shutdown_pools runs; a later call starts a
    new pool and gives the same result."""
    _no_serial_threshold(monkeypatch, 3)
    rng = np.random.default_rng(12)
    q, k, v, _ = _inputs(rng, 4, 16, 16, 8, 8, np.float64)
    first = _flash.attention_forward(q, k, v, 0.3, False, None, tiles=(4, 4))
    pools = list(_flash._pool.values())
    assert pools, "the call did not reach the thread pool"
    _flash._shutdown_pools()
    assert not _flash._pool
    assert all(p._shutdown for p in pools)
    again = _flash.attention_forward(q, k, v, 0.3, False, None, tiles=(4, 4))
    np.testing.assert_array_equal(again[0], first[0])


def test_interpreter_exit_shuts_the_pools_down():
    """_shutdown_pools runs at interpreter exit (atexit): a process that used the pool
    reports its shutdown as it ends."""
    import subprocess
    import sys

    code = """if True:
        import os
        os.environ["FASTATTN_BLAS_WORKERS"] = "off"  # the kernels' own pool helps
        import numpy as np
        import dataclasses
        from fastattn.kernels import _flash, _tuning
        _flash.get_num_threads = lambda: 2
        _tuning.use(dataclasses.replace(_tuning.current()[0], serial_flops=0))
        q = np.ones((2, 8, 4))
        _flash.attention_forward(q, q, q, 0.5, False, None, tiles=(4, 4))
        (pool,) = _flash._pool.values()
        shutdown = pool.shutdown
        pool.shutdown = lambda **kw: (print("pool shut down"), shutdown(**kw))
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "pool shut down"


def test_backward_splits_key_blocks_when_batch_is_smaller_than_threads(monkeypatch):
    """B = 1 with 2+ threads: key blocks shared out, dq summed from private copies."""
    _no_serial_threshold(monkeypatch, 3)
    rng = np.random.default_rng(11)
    q, k, v, dout = _inputs(rng, 1, 30, 40, 8, 8, np.float64)
    _assert_matches_loop(q, k, v, dout, False, None, tiles=[(8, 8), (7, 16)])
    _assert_matches_loop(q, k, v, dout, True, None, tiles=[(8, 8)])


def _spy_few_rows(monkeypatch):
    """The entries per unit of every _few_rows_units call (a list), and the path log."""
    calls = []
    few_rows = _flash._few_rows_units

    def spy(counter, *args):
        calls.append(args[-1])  # entries per unit
        return few_rows(counter, *args)

    monkeypatch.setattr(_flash, "_few_rows_units", spy)
    return calls, record_paths(monkeypatch, force=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_few_query_rows_take_the_loop_kernel(monkeypatch, threads, dtype):
    """Up to FEW_ROWS query rows per entry (decoding), the forward runs _few_rows_units (loops
    per entry, no tiles): it matches the loop reference with masks of every broadcast, causal,
    rows with nothing allowed and a key sequence of one; it ran, on 2 threads when forced,
    and gives the same bits on 1 thread."""
    calls, log = _spy_few_rows(monkeypatch)
    rng = np.random.default_rng(12)
    for B, Tq, Tk in [(5, 1, 9), (4, _flash.FEW_ROWS, 17), (3, 2, 1)]:
        q, k, v, dout = _inputs(rng, B, Tq, Tk, 8, 5, dtype)
        masks = [None, rng.random((B, Tq, Tk)) < 0.6, rng.random((1, 1, Tk)) < 0.6]
        masks[1][0, 0] = False  # a row with nothing allowed
        for causal in (False, True):
            for mask in masks:
                threads(2)
                calls.clear()
                log.clear()
                two = _flash.attention_forward(q, k, v, 0.5, causal, mask)
                assert calls and log.fused == [2], (calls, log.fused)
                _assert_matches_loop(q, k, v, dout, causal, mask, scale=0.5, tiles=[None])
                threads(1)
                one = _flash.attention_forward(q, k, v, 0.5, causal, mask)
                for a, b in zip(one, two, strict=True):
                    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_few_query_rows_with_several_entries_per_unit(monkeypatch, threads, dtype):
    """From 32 batch entries (and heads) on, each _few_rows_units unit takes several entries;
    every entry, the last unit's short run included, matches the loop reference, on one
    thread and on two (the spy: the units did take more than one entry)."""
    calls, log = _spy_few_rows(monkeypatch)
    rng = np.random.default_rng(15)
    for B, Tq in [(37, 1), (50, _flash.FEW_ROWS)]:  # 2 and 3 entries per unit, a short last
        q, k, v, dout = _inputs(rng, B, Tq, 6, 8, 5, dtype)
        for n in (1, 2):
            threads(n)
            calls.clear()
            log.clear()
            _assert_matches_loop(q, k, v, dout, True, None, scale=0.5, tiles=[None])
            assert calls and min(calls) > 1 and B % calls[0], calls
            assert log.fused[0] == n, log.fused


# ---- heads read and written in place: (B, H, T, d) views of (B, T, H, d) columns


def _heads_of(buf, i, B, H):
    """The (B, H, T, d) heads view of part i of buf (B, T, n, H, d): rows strided, no copy."""
    return buf[:, :, i].transpose(0, 2, 1, 3)


def _to_entries(a4):
    """(B, H, T, c) -> (B*H, T, c), entry b*H + h, as the 3-D kernels number them."""
    return np.ascontiguousarray(a4).reshape(-1, a4.shape[2], a4.shape[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 11, 11, 8), (2, 2, 1, 9, 4), (1, 2, 6, 40, 8)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@PRODUCTS
def test_kernel_takes_heads_in_place(monkeypatch, shape, causal, masked, dtype, own):
    """q, k, v given as the heads of (B, T, 3, H, d) columns (MultiHeadAttention's layout):
    the kernels read them with no copy (a spy sees the strided views), out comes back as the
    heads of a (B, Tq, H, dv) array, the gradients go into the columns given, and all match
    the loop reference on the (B*H, T, d) entries, with the mask's first axis over them. The
    last shape, with 3 threads, no serial threshold and small tiles, splits the key blocks
    (private dq per share)."""
    B, H, Tq, Tk, d = shape
    if Tk > 20:
        _no_serial_threshold(monkeypatch, 3)
    own_seen = use_products(monkeypatch, own)
    rng = np.random.default_rng(14)
    qbuf = rng.standard_normal((B, Tq, 1, H, d)).astype(dtype)
    kvbuf = rng.standard_normal((B, Tk, 2, H, d)).astype(dtype)
    q, k, v = _heads_of(qbuf, 0, B, H), _heads_of(kvbuf, 0, B, H), _heads_of(kvbuf, 1, B, H)
    dout = rng.standard_normal((B, H, Tq, d)).astype(dtype)
    mask = rng.random((B * H, 1, Tk)) < 0.7 if masked else None
    if masked:
        mask[..., 0] = True
    seen = []
    for name in ("_forward_units", "_few_rows_units", "_backward_units"):
        real = getattr(_flash, name)
        monkeypatch.setattr(_flash, name, lambda counter, *a, real=real, name=name: (
            seen.append((name, a[0], a[1], name == "_backward_units" and len(a[9]))),
            real(counter, *a))[1])
    scale = 1 / np.sqrt(d)
    tiles = (4, 8) if Tk > 20 else None
    out, lse = _flash.attention_forward(q, k, v, scale, causal, mask, tiles=tiles)
    assert out.shape == (B, H, Tq, d) and lse.shape == (B, H, Tq)
    assert out.transpose(0, 2, 1, 3).flags.c_contiguous  # the merged heads, no copy needed
    gbuf = np.zeros((B, Tq, 1, H, d), dtype)
    gkv = np.zeros((B, Tk, 2, H, d), dtype)
    grads = (_heads_of(gbuf, 0, B, H), _heads_of(gkv, 0, B, H), _heads_of(gkv, 1, B, H))
    got = _flash.attention_backward(dout, q, k, v, out, lse, scale, causal, mask, grads=grads,
                                    tiles=tiles)
    assert all(g is w for g, w in zip(got, grads, strict=True))
    forward = "_few_rows_units" if Tq <= _flash.FEW_ROWS else "_forward_units"
    assert list(dict.fromkeys(n for n, *_ in seen)) == [forward, "_backward_units"]
    for name, a0, a1, _ in seen:  # the views themselves reached the kernels: no copies
        assert (a0, a1) == ((q, k) if name == forward else (dout, q))
    assert own_seen and set(own_seen) == {own}
    split = [n_part for name, *_, n_part in seen if name == "_backward_units"]
    assert split[0] == (B * H * 4 if Tk > 20 else 0)  # private dq per key share, or none
    flat = [_to_entries(a) for a in (q, k, v, dout)]
    want = _run(loop, *flat, scale, causal, mask)
    P = kernel_attention_probs(flat[0], flat[1], scale, causal, mask)
    bounds = attention_bounds(*flat[:3], P, scale=scale, dout=flat[3])
    have = (_to_entries(out), lse.reshape(B * H, Tq)) + tuple(_to_entries(g) for g in got)
    assert_attention_close(have, want, *flat, bounds=bounds)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_take_a_whole_batch_entry_at_a_time(monkeypatch, threads, dtype):
    """With heads and the setting's min_units batch entries or more, the fused kernels hand a
    thread all of an entry's units at once (heads x query blocks forward, heads backward), so
    that two threads do not write neighbouring heads of one entry (rows that share cache
    lines); with fewer entries, or one head, one unit at a time. Either way every unit runs
    exactly once: on 2 threads (the log proves it), the results match the loop reference and
    are the same bits as on 1 thread."""
    log = record_paths(monkeypatch, force=True)
    seen = []
    run = _flash._in_parallel

    def spy(fn, n_units, flops, serial_flops, *args):
        seen.append((fn.__name__, n_units, args[-2]))  # chunks, units per chunk
        return run(fn, n_units, flops, serial_flops, *args)

    monkeypatch.setattr(_flash, "_in_parallel", spy)
    min_units = _tuning.current()[0].min_units
    T, d, bq = 13, 8, 4
    nqb = -(-T // bq)
    rng = np.random.default_rng(16)
    for B, H in ((min_units, 3), (2, 3), (min_units, 1)):
        buf = rng.standard_normal((B, T, 3, H, d)).astype(dtype)
        q, k, v = (_heads_of(buf, i, B, H) for i in range(3))
        dout = rng.standard_normal((B, H, T, d)).astype(dtype)
        got = {}
        for n in (2, 1):
            threads(n)
            seen.clear()
            log.clear()
            out, lse = _flash.attention_forward(q, k, v, 0.4, True, None, tiles=(bq, 8))
            grads = _flash.attention_backward(dout, q, k, v, out, lse, 0.4, True, None,
                                              tiles=(bq, 8))
            got[n] = (out, lse, *grads)
            assert log.fused == [n, n]
            if B >= min_units and H > 1:
                assert seen == [("_forward_units", B, H * nqb), ("_backward_units", B, H)]
            else:  # (the backward may split key blocks too: more units, still one each)
                assert seen[0] == ("_forward_units", B * H * nqb, 1)
                assert seen[1][0] == "_backward_units" and seen[1][2] == 1
                assert seen[1][1] % (B * H) == 0
        for a, b in zip(got[1], got[2], strict=True):
            np.testing.assert_array_equal(a, b)
        flat = [_to_entries(a) for a in (q, k, v, dout)]
        want = _run(loop, *flat, 0.4, True, None)
        P = kernel_attention_probs(flat[0], flat[1], 0.4, True, None)
        bounds = attention_bounds(*flat[:3], P, scale=0.4, dout=flat[3])
        out, lse, *grads = got[2]
        have = (_to_entries(out), lse.reshape(B * H, T)) + tuple(_to_entries(g) for g in grads)
        assert_attention_close(have, want, *flat, bounds=bounds)


def test_next_unit_hands_out_each_unit_once_in_chunks():
    """_next_unit on one thread: units 0..n-1 in order, in chunks taken from the counter,
    then n for ever; a chunk past the end takes nothing."""
    from numba import njit

    @njit
    def drain(counter, n_units, chunk, calls):
        pos = np.zeros(2, np.int64)
        got = np.empty(calls, np.int64)
        for i in range(calls):
            got[i] = _flash._next_unit(counter, pos, n_units, chunk)
        return got

    for n_units, chunk in ((10, 4), (8, 4), (5, 1), (3, 7)):
        counter = np.zeros(1, np.int64)
        got = drain(counter, n_units, chunk, n_units + 3)
        assert list(got) == list(range(n_units)) + [n_units] * 3, (n_units, chunk)
        assert counter[0] >= -(-n_units // chunk) + 1  # every chunk, then one past the end


def test_numba_backend_takes_heads_with_features_through_copies():
    """Heads with a feature that kernels._flash does not have (a window, grouped keys): the
    numba backend computes them on (B*H, T, d) copies and gives them back as heads; the same
    numbers as the 3-D call."""
    from fastattn.kernels import numba_backend as nb

    rng = np.random.default_rng(15)
    B, H, Hkv, T, d = 2, 4, 2, 9, 8
    q = rng.standard_normal((B, T, H, d)).transpose(0, 2, 1, 3)
    k = rng.standard_normal((B, T, Hkv, d)).transpose(0, 2, 1, 3)
    v = rng.standard_normal((B, T, Hkv, d)).transpose(0, 2, 1, 3)
    dout = rng.standard_normal((B, H, T, d))
    for kw in ({"window": (2, 1)}, {}):
        out, lse = nb.attention_forward(q, k, v, 0.4, True, None, **kw)
        grads = nb.attention_backward(dout, q, k, v, out, lse, 0.4, True, None, **kw)
        flat = [_to_entries(a) for a in (q, k, v, dout)]
        out3, lse3 = nb.attention_forward(*flat[:3], 0.4, True, None, **kw)
        grads3 = nb.attention_backward(flat[3], *flat[:3], out3, lse3, 0.4, True, None, **kw)
        np.testing.assert_array_equal(_to_entries(out), out3)
        np.testing.assert_array_equal(lse.reshape(-1, T), lse3)
        for g, g3 in zip(grads, grads3, strict=True):
            np.testing.assert_array_equal(_to_entries(g), g3)
            assert g.transpose(0, 2, 1, 3).flags.c_contiguous


def test_heads_calls_reject_bad_grads_and_mixed_ranks():
    """grads (written, so never copied) must have the heads' shapes, the dtype, and rows BLAS
    can write; a 3-D call takes no grads; 3-D and 4-D arrays do not mix. Each is a ValueError
    before any kernel runs, from kernels._flash and from the numba backend alike (whose
    fallback for features checks grads the same way)."""
    from fastattn.kernels import numba_backend as nb

    rng = np.random.default_rng(16)
    B, H, T, d = 2, 2, 5, 4
    buf = rng.standard_normal((B, T, 3, H, d))
    q, k, v = (buf[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    out, lse = _flash.attention_forward(q, k, v, 0.5, False, None)
    dout = np.ones_like(out)

    def grads_like(make):
        return tuple(make(np.zeros((B, H, T, d))) for _ in range(3))

    bad = {
        "reversed rows": grads_like(lambda a: a[..., ::-1]),
        "column-major": grads_like(np.asfortranarray),
        "float32": grads_like(lambda a: a.astype(np.float32)),
        "shape": grads_like(lambda a: a[:, :, :-1]),
        "read-only": grads_like(lambda a: np.lib.stride_tricks.as_strided(a, writeable=False)),
        "two arrays": grads_like(lambda a: a)[:2],
    }
    for fn in (_flash.attention_backward, nb.attention_backward):
        for kw in ({}, {"window": (1, 1)}):
            if fn is _flash.attention_backward and kw:
                continue
            for what, grads in bad.items():
                with pytest.raises(ValueError, match="grads"):
                    fn(dout, q, k, v, out, lse, 0.5, False, None, grads=grads, **kw)
                assert all(not np.any(g) for g in grads if g.dtype == np.float64), what
        flat = [np.ascontiguousarray(a).reshape(B * H, T, d) for a in (q, k, v, dout, out)]
        with pytest.raises(ValueError, match="grads"):
            fn(flat[3], *flat[:3], flat[4], lse.reshape(B * H, T), 0.5, False, None,
               grads=grads_like(lambda a: a))
        with pytest.raises(ValueError, match="4-D|3-D"):
            fn(dout, q, k, v, flat[4], lse, 0.5, False, None)
    for fn in (_flash.attention_forward, nb.attention_forward):
        with pytest.raises(ValueError, match="4-D|3-D"):
            fn(q, flat[1], v, 0.5, False, None)
