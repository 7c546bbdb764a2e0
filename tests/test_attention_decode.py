"""The numba feature kernels' decode path (few queries, many keys: key shares merged),
their independence of the thread count, and non-contiguous inputs with features."""

from __future__ import annotations

import attention_cases as ac
import numpy as np
import pytest

import fastattn
from fastattn.kernels import _flash_features as ff

numba = pytest.importorskip("numba")


@pytest.mark.parametrize("kw", [{}, dict(causal="bottom_right", window=(300, None)),
                                dict(alibi_slopes=np.array([0.01, 0.02]), dropout_p=0.2,
                                     seed=3)],
                         ids=["plain", "bottom-right-window", "alibi-dropout"])
def test_decode_splits_the_keys_into_shares_and_matches_loop(kw):
    """One query row per head against 1024 keys: the forward takes the decode path (loop
    products, several key shares merged) and agrees with the loop reference."""
    case = ac.make(np.random.default_rng(0), np.float64, N=1, H=2, Hkv=1, Tq=1, Tk=1024, d=8,
                   dv=4, **kw)
    want = ac.run(case, "loop")
    got = ac.run(case, "numba")
    assert ff.LAST_TILES["forward_shares"] > 1
    ac.assert_close(got, want, case, "decode")


@pytest.mark.parametrize("kw", [dict(H=4, Hkv=2, Tq=96, Tk=160, causal="bottom_right",
                                     window=(40, 3), bias=(4, 1, 160), dropout_p=0.1, seed=9),
                                dict(H=1, Tq=128, Tk=512, window=(None, 8)),
                                dict(H=1, Tq=2, Tk=3000, alibi_slopes=np.array([0.01]))],
                         ids=["grouped-heads", "keys", "decode"])
def test_results_do_not_depend_on_the_thread_count(kw, threads):
    """Bitwise equal with 1 and 2 threads: work units and key shares follow the shapes only,
    dq parts and shares are summed in a fixed order. The shapes leave the serial path (several
    units and shares; checked)."""
    case = ac.make(np.random.default_rng(1), np.float32, d=16, dv=16, **kw)
    results = []
    for n in (1, 2):
        threads(n)
        results.append(ac.run(case, "numba"))
    if kw["Tq"] > 2:  # the backward splits by query heads with grouped heads, else by keys
        assert ff.LAST_TILES["backward_shares"] > 1
        assert ff.LAST_TILES["backward_split"] == ("heads" if kw["H"] > 1 else "keys")
    else:
        assert ff.LAST_TILES["forward_shares"] > 1
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_views_with_features_give_the_same_result():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 9, 3))
    k = rng.standard_normal((1, 2, 11, 3))
    v = rng.standard_normal((1, 2, 11, 2))
    bias = rng.standard_normal((4, 11, 9)).transpose(0, 2, 1)  # (4, 9, 11), transposed view
    kw = dict(bias=bias, causal="bottom_right", window=(3, 1), dropout_p=0.3, seed=1,
              cu_seqlens_q=np.array([0, 4, 9])[::1], cu_seqlens_k=np.array([0, 5, 11]))
    views = (q[:, :, ::-1], k[:, :, ::-1], v[:, :, ::-1])
    copies = [np.ascontiguousarray(a) for a in views]
    for backend in ("vectorized", "numba"):
        a = fastattn.attention_forward(*views, backend=backend, **kw)
        b = fastattn.attention_forward(*copies, backend=backend,
                                       **dict(kw, bias=np.ascontiguousarray(bias)))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_grouped_query_attention_needs_far_less_than_expanded_keys_and_values():
    """H=32 query heads over Hkv=4 (the issue's ratio): the memory that forward + backward
    allocate beyond inputs and outputs (tracemalloc sees NumPy's and the Numba kernels'
    arrays), less the kernels' tile buffers (per thread at most 3 bq bk + (d + dv) bk + 3 bq
    values, whatever the length), stays below a quarter of one copy of K and V expanded to
    32 heads, with the backward split into shares by heads (checked)."""
    import tracemalloc

    from fastattn.kernels import _tuning

    case = ac.make(np.random.default_rng(3), np.float32, H=32, Hkv=4, Tq=128, Tk=128, d=16,
                   dv=16)
    q, k, v, dout = case["q"], case["k"], case["v"], case["dout"]
    ac.run(case, "numba")  # compiled and warm
    tracemalloc.start()
    try:
        out, lse = fastattn.attention_forward(q, k, v, backend="numba")
        grads = fastattn.attention_backward(dout, q, k, v, out, lse, backend="numba")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ff.LAST_TILES["backward_shares"] > 1
    assert ff.LAST_TILES["backward_split"] == "heads"
    bq, bk = ff._tiles(32, 128, 128, False, _tuning.current()[0])
    tiles = numba.get_num_threads() * (3 * bq * bk + 32 * bk + 3 * bq) * 4
    results = out.nbytes + lse.nbytes + sum(g.nbytes for g in grads)
    expanded = 2 * 32 * 128 * 16 * 4  # K and V with one copy per query head, float32
    assert peak - results - tiles < expanded / 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, value", [("k", np.nan), ("k", np.inf), ("k", -np.inf),
                                         ("v", np.nan), ("v", np.inf), ("v", -np.inf)])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_decode_finds_nan_and_inf_in_k_and_v_without_a_separate_scan(dtype, name, value,
                                                                     causal):
    """The decode path checks k and v on the kernel's way (no extra pass over them): a
    non-finite entry anywhere still raises the ValueError naming its argument, whichever the
    sign of the score it makes (q of both signs: -inf scores would look like masked keys)."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 1, 8)).astype(dtype)
    q[0, 0, 0, 3], q[0, 1, 0, 3] = 1.0, -1.0  # the scores of k[..., 3] = inf: +inf and -inf
    k, v = (rng.standard_normal((1, 2, 1024, 8)).astype(dtype) for _ in range(2))
    qf, kf = q.reshape(2, 1, 8), k.reshape(2, 1024, 8)
    assert ff.scans_kv(qf, kf, causal, {})  # the path tested
    for h, j in [(0, 0), (1, 700), (0, 1023)]:
        kk, vv = k.copy(), v.copy()
        (kk if name == "k" else vv)[0, h, j, 3] = value
        with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
            fastattn.attention_forward(q, kk, vv, causal=causal, backend="numba")


@pytest.mark.parametrize("name, value", [("k", np.nan), ("k", np.inf), ("v", np.nan),
                                         ("v", -np.inf)])
def test_top_left_decode_finds_nan_and_inf_in_keys_its_rows_never_see(name, value):
    """Top-left causal with 2 query rows on 1024 keys (the decode path): the rows see keys 0
    and 0..1 only, so the kernel never reads the others; a non-finite entry there must still
    raise the ValueError naming its argument (the inputs' rule, not the band's)."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 2, 2, 8))
    k, v = (rng.standard_normal((1, 2, 1024, 8)) for _ in range(2))
    for h, j in [(0, 0), (1, 2), (0, 700), (1, 1023)]:
        kk, vv = k.copy(), v.copy()
        (kk if name == "k" else vv)[0, h, j, 3] = value
        with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
            fastattn.attention_forward(q, kk, vv, causal=True, backend="numba")


# ---- decoding steps' calls: the short way to the few-rows kernel ---------------------------


@pytest.fixture
def short_way_calls(monkeypatch):
    """The q shapes of the calls of kernels._flash.few_rows_forward from here on."""
    from fastattn.kernels import _flash

    calls = []
    short = _flash.few_rows_forward
    monkeypatch.setattr(_flash, "few_rows_forward",
                        lambda *a: calls.append(a[0].shape) or short(*a))
    return calls


@pytest.mark.parametrize("Tq, Tk, causal", [(1, 1, False), (1, 29, False), (2, 7, True),
                                            (2, 300, False), (1, 511, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decoding_calls_take_the_short_way_with_the_same_results(short_way_calls, Tq, Tk,
                                                                 causal, dtype):
    """The numba backend's attention_forward sends 3-D calls with at most FEW_ROWS query rows,
    no mask, no feature and fewer than 512 keys (a decoding step's) to few_rows_forward, which
    skips attention_forward's general preparation. Its results are bitwise those of the
    general way, which runs the same kernel, and agree with the loop reference."""
    from fastattn.kernels import _flash

    calls = short_way_calls
    rng = np.random.default_rng(Tk)
    q = rng.standard_normal((6, Tq, 8)).astype(dtype)
    k = rng.standard_normal((6, Tk, 8)).astype(dtype)
    v = rng.standard_normal((6, Tk, 5)).astype(dtype)
    got = fastattn.kernels.get("attention_forward", "numba")(q, k, v, 0.3, causal, None)
    assert calls == [q.shape]
    general = _flash.attention_forward(q, k, v, 0.3, causal, None)  # _prepare, _new, ...
    for g, w in zip(got, general, strict=True):
        np.testing.assert_array_equal(g, w)
    if dtype == np.float64:  # (float32: the general way's own tests hold it to the reference)
        want = fastattn.kernels.get("attention_forward", "loop")(q, k, v, 0.3, causal, None)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_other_calls_do_not_take_the_short_way(short_way_calls):
    """A mask, a feature, three query rows, 512 keys and more (the key-shares decode path) or
    heads (4-D) go the general way; a non-contiguous view takes the short way and gives what
    its contiguous copy gives."""
    calls = short_way_calls
    fwd = fastattn.kernels.get("attention_forward", "numba")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, T, 4)) for T in (1, 9, 9))
    fwd(q, k, v, 0.5, False, np.ones((2, 1, 9), bool))
    fwd(q, k, v, 0.5, False, None, window=(3, None))
    fwd(rng.standard_normal((2, 3, 4)), k, v, 0.5, False, None)
    fwd(q, *(rng.standard_normal((2, 512, 4)) for _ in range(2)), 0.5, False, None)
    fwd(q[:, None], k[:, None], v[:, None], 0.5, False, None)
    assert calls == []
    wide = rng.standard_normal((2, 9, 8))
    view = fwd(q, wide[:, :, ::2], v, 0.5, False, None)
    assert calls == [q.shape]
    for g, w in zip(view, fwd(q, np.ascontiguousarray(wide[:, :, ::2]), v, 0.5, False, None),
                    strict=True):
        np.testing.assert_array_equal(g, w)
