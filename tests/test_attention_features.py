"""The attention features of DESIGN "Public functions" on every backend, forward and backward:
grouped-query heads, causal alignment, windows, bias (with dbias), ALiBi, dropout, packed
sequences, masks, and their combinations.

References: the loop backend (the source of truth), PyTorch's scaled_dot_product_attention
where it has the feature (masks built here from DESIGN's formulas, independently of the
kernels), and float64 central differences. Bounds: ``helpers.attention_bounds``.
"""

from __future__ import annotations

import zlib

import attention_cases as ac
import numpy as np
import pytest
from gradcheck import numerical_grad
from helpers import (
    ATTENTION_RESULTS,
    assert_all_close,
    assert_attention_close,
    public_attention_bounds,
)
from helpers.paths import use_products

import fastattn
from fastattn import kernels

FAST = ("vectorized", "numba")
CU_Q = np.array([0, 2, 2, 5, 7])  # 4 sequences of query lengths 2, 0, 3, 2
CU_K = np.array([0, 3, 4, 4, 8])  # key lengths 3, 1, 0, 4


def _cases():
    """name -> (make kwargs) for one feature each, then combinations."""
    all_kw = dict(Hkv=2, H=4, Tq=7, Tk=8, causal="bottom_right", window=(2, 1),
                  cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K, bias=(4, 1, 8),
                  alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0]), dropout_p=0.25, seed=11)
    return {
        "plain": {},
        "gqa": dict(H=4, Hkv=2),
        "mqa": dict(H=3, Hkv=1),
        "top_left": dict(causal=True, Tq=6, Tk=8),
        "top_left_more_queries": dict(causal="top_left", Tq=8, Tk=5),
        "bottom_right": dict(causal="bottom_right", Tq=4, Tk=9),
        "bottom_right_more_queries": dict(causal="bottom_right", Tq=9, Tk=4),
        "window": dict(window=(2, 1), Tq=8, Tk=8),
        "window_left_only": dict(window=(3, None), Tq=8, Tk=6),
        "window_right_only": dict(window=(None, 0), Tq=6, Tk=8),
        "window_bottom_right": dict(window=(2, None), causal="bottom_right", Tq=4, Tk=9),
        "bias_full": dict(bias=(1, 2, 5, 6)),
        "bias_heads_rows": dict(bias=(2, 1, 6)),
        "bias_2d": dict(bias=(5, 6)),
        "bias_one_key": dict(bias=(5, 1)),
        "alibi": dict(alibi_slopes=np.array([0.5, 0.125])),
        "dropout": dict(dropout_p=0.3, seed=7),
        "packed": dict(Tq=7, Tk=8, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K),
        "packed_causal": dict(Tq=7, Tk=8, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K, causal=True),
        "mask": dict(mask="random"),
        "gqa_window_bias": dict(H=4, Hkv=1, window=(1, 1), bias=(4, 5, 6), Tq=5, Tk=6),
        "alibi_dropout_causal": dict(alibi_slopes=np.array([0.3, 0.1]), dropout_p=0.5,
                                     seed=3, causal=True),
        "all": all_kw,
        "all_top_left_masked": dict(all_kw, causal=True, mask="random", window=(None, 2)),
        "all_batch": dict(all_kw, N=2, bias=(2, 1, 7, 8), window=(1, None)),
    }


CASES = _cases()


def _case(name, rng, dtype=np.float64):
    kw = dict(CASES[name])
    if kw.get("mask") == "random":
        kw["mask"] = rng.random((kw.get("Tq", 5), kw.get("Tk", 6))) < 0.7
    shape = {n: kw.pop(n) for n in ("N", "H", "Hkv", "Tq", "Tk", "d", "dv") if n in kw}
    return ac.make(rng, dtype, **shape, **kw)


@pytest.fixture(scope="module")
def loop_results():
    """The loop reference of every case (float64), computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            case = _case(name, np.random.default_rng(zlib.crc32(name.encode())))
            cache[name] = (case, ac.run(case, "loop"))
        return cache[name]

    return get


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_feature_matches_loop_reference(name, backend, dtype, loop_results):
    case64, want = loop_results(name)
    case = dict(case64, q=case64["q"].astype(dtype), k=case64["k"].astype(dtype),
                v=case64["v"].astype(dtype), dout=case64["dout"].astype(dtype),
                kw={n: (x.astype(dtype) if n == "bias" else x) for n, x in case64["kw"].items()})
    got = ac.run(case, backend)
    assert all(g.dtype == dtype for g in got)
    ac.assert_close(got, want, case, f"{name} on {backend}")


def test_reference_cases_are_not_trivial(loop_results):
    """Each masking case leaves some rows empty or some keys out, and results differ from the
    plain problem on the same inputs (a feature that did nothing would pass the comparison)."""
    for name in CASES:
        if name in ("plain", "bias_one_key"):  # a bias constant along each row changes no
            continue  # softmax (its -inf entries aside): that case is there for dbias's shape
        case, want = loop_results(name)
        plain = dict(case, kw={})
        if case["q"].shape[-3] != case["k"].shape[-3]:
            continue  # grouped heads: the plain problem has other shapes
        base = ac.run(plain, "loop")
        assert not np.allclose(base[0], want[0]), name


# ---- gradients: float64 central differences ---------------------------------------------------


GRAD_CASES = ["gqa", "bottom_right", "window", "bias_heads_rows", "bias_one_key", "alibi",
              "dropout", "packed_causal", "mask", "all"]


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_match_central_differences(name, backend):
    """loss = sum(out * dout): each analytic gradient (dq, dk, dv, dbias) against central
    differences of the loss in float64 (step 1e-6, error about 1e-9 on O(1) values: bound
    1e-6 relative to max(1, max |gradient|)). With a fixed seed dropout is a fixed function."""
    rng = np.random.default_rng(5)
    case = _case(name, rng)
    case["kw"].pop("mask", None) if name != "mask" else None
    q, k, v, dout, kw = case["q"], case["k"], case["v"], case["dout"], case["kw"]
    if name == "mask":
        kw["mask"] = rng.random(q.shape[-2:-1] + k.shape[-2:-1]) < 0.7
    out, lse = fastattn.attention_forward(q, k, v, backend=backend, **kw)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    wrt = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    assert len(grads) == len(wrt)

    def loss():
        return float((fastattn.attention_forward(q, k, v, backend=backend, **kw)[0]
                      * dout).sum())

    for name_g, g, x in zip(ac.GRAD_NAMES, grads, wrt, strict=False):
        fin = np.isfinite(x)  # -inf bias entries have no gradient
        num = numerical_grad(loss, x, index=np.flatnonzero(fin))
        tol = 1e-6 * max(1.0, np.abs(num).max())
        np.testing.assert_allclose(g[fin], num[fin], rtol=0, atol=tol, err_msg=name_g)
    assert np.abs(grads[0]).max() > 0


# ---- PyTorch, where it has the feature --------------------------------------------------------


def _torch_grads(q, k, v, dout, **kw):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    mask = kw.pop("attn_mask", None)
    tm = None
    if mask is not None:
        tm = torch.tensor(mask, requires_grad=mask.dtype != bool)
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, **kw)
    out.backward(torch.tensor(dout))
    grads = [tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()]
    if tm is not None and tm.requires_grad:
        grads.append(tm.grad.numpy())
    return out.detach().numpy(), grads


def _ours(q, k, v, dout, backend, **kw):
    """(out, (dq, dk, dv[, dbias]), bounds): ours, and the float64 error bounds of the
    computation (``helpers.public_attention_bounds``) that _assert_torch judges PyTorch's
    results by, as test_attention's comparison with PyTorch does."""
    out, lse = fastattn.attention_forward(q, k, v, backend=backend, **kw)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    return out, grads, public_attention_bounds(q, k, v, dout, **kw)


def _assert_torch(got, want):
    (out, grads, bounds), (tout, tgrads) = got, want
    assert len(grads) == len(tgrads)
    names = [n for n in ATTENTION_RESULTS if n != "lse"][:1 + len(grads)]  # no lse
    assert_all_close([out, *grads], [tout, *tgrads], [bounds[n] for n in names],
                     names, "ours against PyTorch")


def _band_mask(Tq, Tk, left, right, bottom_right):
    """DESIGN's window rule, written out: i' - left <= j <= i' + right."""
    i = np.arange(Tq)[:, None] + (Tk - Tq if bottom_right else 0)
    j = np.arange(Tk)[None, :]
    ok = np.ones((Tq, Tk), bool)
    if left is not None:
        ok &= j >= i - left
    if right is not None:
        ok &= j <= i + right
    return ok


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_gqa_matches_torch_enable_gqa(backend):
    rng = np.random.default_rng(1)
    c = ac.make(rng, N=2, H=6, Hkv=2, Tq=5, Tk=7)
    want = _torch_grads(c["q"], c["k"], c["v"], c["dout"], enable_gqa=True)
    _assert_torch(_ours(c["q"], c["k"], c["v"], c["dout"], backend), want)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 3, 4, 6), (3, 1, 6), (4, 6), (3, 4, 1)])
def test_bias_and_dbias_match_torch_float_mask(backend, shape):
    """torch's float attn_mask is our bias; its autograd gradient (summed over broadcast
    dimensions) is our dbias."""
    rng = np.random.default_rng(2)
    c = ac.make(rng, N=2, H=3, Tq=4, Tk=6)
    bias = rng.standard_normal(shape)
    want = _torch_grads(c["q"], c["k"], c["v"], c["dout"], attn_mask=bias)
    got = _ours(c["q"], c["k"], c["v"], c["dout"], backend, bias=bias)
    assert got[1][3].shape == bias.shape
    _assert_torch(got, want)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("Tq, Tk, window", [(3, 7, None), (7, 7, (2, 1)), (4, 9, (3, 0)),
                                            (6, 6, (None, 1)), (5, 8, (1, None))])
def test_bottom_right_causal_and_windows_match_torch_explicit_mask(backend, Tq, Tk, window):
    rng = np.random.default_rng(3)
    c = ac.make(rng, Tq=Tq, Tk=Tk)
    left, right = window if window else (None, None)
    right = 0 if right is None else min(right, 0)
    allowed = _band_mask(Tq, Tk, left, right, bottom_right=True)
    assert allowed.any(axis=1).all()  # torch gives NaN for an empty row
    want = _torch_grads(c["q"], c["k"], c["v"], c["dout"], attn_mask=allowed)
    got = _ours(c["q"], c["k"], c["v"], c["dout"], backend, causal="bottom_right",
                window=window)
    _assert_torch(got, want)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_packed_sequences_match_torch_block_mask(backend):
    """Packed sequences = one sequence with a block-diagonal mask, positions restarting at
    each sequence's start (bottom-right causal inside each block)."""
    rng = np.random.default_rng(4)
    cu_q, cu_k = np.array([0, 3, 5, 9]), np.array([0, 4, 6, 12])
    c = ac.make(rng, Tq=9, Tk=12)
    allowed = np.zeros((9, 12), bool)
    for n in range(3):
        qs, qe, ks, ke = cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]
        allowed[qs:qe, ks:ke] = _band_mask(qe - qs, ke - ks, None, 0, bottom_right=True)
    want = _torch_grads(c["q"], c["k"], c["v"], c["dout"], attn_mask=allowed)
    got = _ours(c["q"], c["k"], c["v"], c["dout"], backend, causal="bottom_right",
                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    _assert_torch(got, want)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_packed_bottom_right_with_equal_totals_is_each_sequence_on_its_own(backend):
    """Bottom-right alignment is per sequence (off = Lk - Lq of each): packed totals Tq = Tk
    do not make it top-left when the sequences' own lengths differ (2 queries on 3 keys, then
    3 on 2, whose first row has no key). Reference: each sequence alone, unpacked, by the
    loop backend; its rows of out, lse, dq and its key rows of dk, dv must match."""
    rng = np.random.default_rng(8)
    cu_q, cu_k = np.array([0, 2, 5]), np.array([0, 3, 5])
    c = ac.make(rng, H=2, Tq=5, Tk=5)
    kw = dict(causal="bottom_right", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out, lse, dq, dk, dv = ac.run(dict(c, kw=kw), backend)
    for n in range(2):
        rq, rk = np.s_[..., cu_q[n]:cu_q[n + 1], :], np.s_[..., cu_k[n]:cu_k[n + 1], :]
        seq = dict(q=c["q"][rq], k=c["k"][rk], v=c["v"][rk], dout=c["dout"][rq],
                   kw=dict(causal="bottom_right"))
        want = ac.run(seq, "loop")
        got = (out[rq], lse[..., cu_q[n]:cu_q[n + 1]], dq[rq], dk[rk], dv[rk])
        ac.assert_close(got, want, seq, f"sequence {n} on {backend}")
    assert np.isneginf(lse[..., 2]).all()  # sequence 1's row 0: no key at or left of -1


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_alibi_matches_torch_with_the_alibi_bias_written_out(backend):
    rng = np.random.default_rng(6)
    c = ac.make(rng, H=2, Tq=4, Tk=7)
    slopes = np.array([0.7, 0.2])
    i, j = np.arange(4)[:, None], np.arange(7)[None, :]
    bias = -slopes[:, None, None] * np.abs(i + 7 - 4 - j)  # (H, Tq, Tk)
    want = _torch_grads(c["q"], c["k"], c["v"], c["dout"], attn_mask=bias)[0]
    got = fastattn.attention_forward(c["q"], c["k"], c["v"], alibi_slopes=slopes,
                                     backend=backend)[0]
    bound = public_attention_bounds(c["q"], c["k"], c["v"], alibi_slopes=slopes)["out"]
    assert_all_close([got], [want], [bound], ["out"], "ours against PyTorch")


# ---- the numba kernels' own paths: tile edges, key shares, decoding, skipped blocks --------

# top_left_more_queries: a query tile's key range (blocks skipped) has offset 0, not Tk - Tq
PATH_CASES = ["gqa", "top_left_more_queries", "bottom_right_more_queries", "window",
              "bias_heads_rows", "alibi", "dropout", "packed_causal", "all", "all_batch"]


@pytest.fixture
def numba_with(monkeypatch):
    """Run the numba backend's fused kernels with given tiles and key shares (features path)."""
    from functools import partial

    from fastattn.kernels import _flash_features as ff

    mod = kernels.module("numba")

    def use(tiles, shares, split):
        monkeypatch.setattr(mod, "attention_forward",
                            partial(ff.features_forward, tiles=tiles, key_shares=shares))
        monkeypatch.setattr(mod, "attention_backward",
                            partial(ff.features_backward, tiles=tiles,
                                    **{f"{split}_shares": shares}))
    return use


@pytest.mark.parametrize("tiles, shares, split", [
    ((2, 3), 1, "key"), ((1, 1), 3, "key"), ((3, 2), 2, "head"), ((64, 2), 1, "key"),
    ((5, 4), 4, "key"), ((2, 2), 3, "head")])
@pytest.mark.parametrize("name", PATH_CASES)
def test_numba_tiles_and_shares_match_loop(name, tiles, shares, split, numba_with,
                                           loop_results):
    """Small and odd tiles put tile edges inside the band and the sequences; several shares
    take the forward's split-and-merge over keys and the backward's private dq parts (split
    by keys) or dk/dv parts (split by query heads); 64-row tiles take the transposed-key
    path, 1..4-row tiles the loop (decode) products."""
    case, want = loop_results(name)
    numba_with(tiles, shares, split)
    ac.assert_close(ac.run(case, "numba"), want, case, f"{name} tiles {tiles} {split} x{shares}")


@pytest.mark.parametrize("own", [0, 1], ids=["blas", "own"])
@pytest.mark.parametrize("name", PATH_CASES)
def test_numba_features_take_either_tile_product(name, own, numba_with, loop_results,
                                                 monkeypatch):
    """The features kernels with BLAS tile products and with their own micro-kernel (one of
    them is this machine's default), at 5x4 tiles and at 64x8 (transposed key tiles); the
    kernels were given the flag (the spy)."""
    seen = use_products(monkeypatch, own)
    case, want = loop_results(name)
    for tiles in ((5, 4), (64, 8)):
        numba_with(tiles, 1, "key")
        ac.assert_close(ac.run(case, "numba"), want, case, f"{name} tiles {tiles} own {own}")
    assert seen and set(seen) == {own}


@pytest.mark.parametrize("own", [0, 1], ids=["blas", "own"])
def test_numba_decoding_makes_no_transposed_copy_of_the_keys(own, monkeypatch):
    """A decoding step (one query row, its keys in loops): the features forward gets the
    stand-in, not a transposed copy of k (which cost more than the step itself), whichever
    the tile products."""
    from fastattn.kernels import _flash_features as ff

    seen = use_products(monkeypatch, own)
    kts = []
    run = ff._in_parallel

    def spy(fn, n_units, flops, serial_flops, *args):
        if fn is ff._forward_units:
            kts.append(args[2].size)  # kT
        return run(fn, n_units, flops, serial_flops, *args)

    monkeypatch.setattr(ff, "_in_parallel", spy)
    rng = np.random.default_rng(21)
    q = rng.standard_normal((2, 4, 1, 16))
    k, v = (rng.standard_normal((2, 2, 700, 16)) for _ in range(2))  # grouped keys
    got = fastattn.attention_forward(q, k, v, backend="numba")
    want = fastattn.attention_forward(q, k, v, backend="loop")
    assert_attention_close(got, want, q, k, v)
    assert kts == [1] and set(seen) == {own}


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_kernels_default_bias_map_is_entry_min_b_and_the_last(backend):
    """The kernels' bias_map default (kernels.loop_attention): query entry b uses bias entry
    min(b, Bb - 1). Without bias_map, forward and backward give bitwise what the map
    [0, 1, 1] written out gives (the same kernel on the same values), and that differs from
    [0, 0, 0] (so the comparison can tell a wrong default)."""
    rng = np.random.default_rng(9)
    q, dout = rng.standard_normal((3, 4, 3)), rng.standard_normal((3, 4, 2))
    k, v = rng.standard_normal((3, 5, 3)), rng.standard_normal((3, 5, 2))
    bias = rng.standard_normal((2, 4, 5))
    fwd, bwd = (kernels.get(f"attention_{x}", backend) for x in ("forward", "backward"))

    def run(**kw):
        out, lse = fwd(q, k, v, 0.5, False, None, bias=bias, window=(2, None), **kw)
        return (out, lse, *bwd(dout, q, k, v, out, lse, 0.5, False, None, bias=bias,
                               window=(2, None), **kw))

    default, written, first = run(), run(bias_map=np.array([0, 1, 1])), run(
        bias_map=np.array([0, 0, 0]))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), default, written,
                          strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.allclose(written[0], first[0]) and not np.allclose(written[5], first[5])


def _visited(Tq, Tk, tiles, causal=False, **kw):
    from fastattn.kernels import _flash_features as ff

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, Tq, 4)), rng.standard_normal((1, Tk, 4))
    out, lse = ff.features_forward(q, k, k, 0.5, causal, None, tiles=tiles, key_shares=1, **kw)
    ff.features_backward(out, q, k, k, out, lse, 0.5, causal, None, tiles=tiles, key_shares=1,
                         **kw)
    return ff.LAST_TILES["forward"], ff.LAST_TILES["backward"]


def test_numba_visits_only_tiles_inside_the_band():
    """Counted tiles (forward; backward): all 8 x 8 = 64 of a 64 x 64 problem in tiles of 8;
    the 8 * 9 / 2 = 36 on and below the diagonal with causal; 1 + 7 * 2 = 15 with a window of
    8 keys to the left (each query tile sees its own key tile and the one before); and with
    4 times the length, 4 times the window's tiles, not 16 times."""
    assert _visited(64, 64, (8, 8)) == (64, 64)
    assert _visited(64, 64, (8, 8), causal=True) == (36, 36)
    assert _visited(64, 64, (8, 8), window=(8, 0)) == (15, 15)
    assert _visited(256, 256, (8, 8), window=(8, 0)) == (63, 63)


def test_numba_packed_sequences_visit_only_their_own_blocks():
    """Sequences of 16, 16 and 32 rows in tiles of 8: 2*2 + 2*2 + 4*4 = 24 tiles, not 64."""
    cu = np.array([0, 16, 32, 64])
    assert _visited(64, 64, (8, 8), cu_seqlens_q=cu, cu_seqlens_k=cu) == (24, 24)


def test_numba_compiles_once_whatever_the_read_only_flags_of_the_feature_arrays(monkeypatch):
    """Masks, biases, slopes and sequence offsets reach the fused kernels read-only however
    the caller made them: np.broadcast_to gives read-only views (np.ascontiguousarray keeps
    them; the public functions' compact masks are such views), the stand-ins of features
    that are off are arrays of the package's own, and each mix of read-only and writeable
    arrays was a compilation of its own (6 s and more for a fused kernel). The numba
    backend's fused kernels without the arrays (stand-ins), with writeable ones, then with
    read-only views of the same values: the kernels ran every time (plain with a mask, and
    with features), the last two to the same bits, and only the first compiled anything."""
    from fastattn.kernels import _flash
    from fastattn.kernels import _flash_features as ff

    units = (_flash._forward_units, _flash._backward_units, ff._forward_units,
             ff._backward_units)
    ran = []
    for module in (_flash, ff):
        def spy(fn, *args, _run=module._in_parallel):
            ran.append(fn)
            return _run(fn, *args)

        monkeypatch.setattr(module, "_in_parallel", spy)
    forward, backward = (kernels.get(f"attention_{x}", "numba") for x in ("forward", "backward"))
    rng = np.random.default_rng(41)
    q, k, v, dout = (rng.standard_normal((2, 7 if i in (0, 3) else 8, 4)) for i in range(4))
    arrays = dict(plain=dict(mask=rng.random((1, 7, 8)) < 0.7),
                  features=dict(bias=rng.standard_normal((2, 7, 8)), bias_map=np.arange(2),
                                alibi=np.array([0.5, 0.25]), cu_seqlens_q=CU_Q,
                                cu_seqlens_k=CU_K))
    results, compiled = {}, None
    for flags in ("stand-ins", "writeable", "read-only"):
        for path, kw in arrays.items():
            kw = {n: None if flags == "stand-ins" else
                  np.broadcast_to(a, a.shape) if flags == "read-only" else a
                  for n, a in kw.items()}
            assert all(a.flags.writeable == (flags == "writeable") for a in kw.values()
                       if a is not None)
            if path == "features":
                kw = dict(kw, mask=None, window=(3, None))
            del ran[:]
            out, lse = forward(q, k, v, 0.5, False, **kw)
            grads = backward(dout, q, k, v, out, lse, 0.5, False, **kw)
            module = _flash if path == "plain" else ff
            assert module._forward_units in ran and module._backward_units in ran, (path, ran)
            results.setdefault(path, []).append((out, lse, *grads))
        if compiled is not None:
            assert [len(fn.signatures) for fn in units] == compiled, f"compiled again: {flags}"
        compiled = [len(fn.signatures) for fn in units]
    for path, (_, first, second) in results.items():
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=path)
