"""Determinism of the numba backend: repeated calls, and different thread counts.

Findings (what these tests pin down):

* With the same thread count, every numba kernel and the public attention functions give
  bitwise-identical results from call to call.
* Across thread counts (``numba.set_num_threads(1)`` vs 2), every unfused kernel and the
  fused forward and backward (out, lse, dq, dk, dv) are bitwise identical, also when the batch
  has fewer entries than there are threads. The flash kernels split the work by the shapes
  only: the backward then splits each batch entry's key blocks into a number of shares that
  the shapes decide, each share sums into its own dq, and the shares are added in a fixed
  order at the end; which thread runs a share does not change its bits. The recurrent
  kernels cut the batch into row shares that the shapes decide, too (BLAS may round a
  product of fewer rows differently, so the shares must not follow the thread count).
  (The unfused matrix products can still differ in the last bits at larger work with fewer
  batch entries than threads, where they move from per-entry gemms to NumPy's matmul; see
  ``kernels.numba_backend``. With 2 threads that needs B = 1, which always takes the gemms.)

The thread-count tests force the parallel paths (work thresholds at 0, ``helpers.paths``) and
assert that the 2-thread run took them: a test that stayed serial would prove nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.paths import glue_chunks, record_paths, use_products

import fastattn
from fastattn import kernels
from fastattn.kernels import _tuning

numba = pytest.importorskip("numba")

DTYPES = [np.float32, np.float64]
GLUE = ("layernorm_forward", "layernorm_backward", "bias_add", "bias_relu_forward",
        "bias_relu_backward", "softmax_xent_forward", "softmax_xent_backward", "adam_update")
CHUNKED = ("layernorm_backward", "bias_relu_backward")  # column sums over row chunks


def _recurrent_args(name, dtype, B, rng):
    """Arguments of a recurrent kernel (B rows, T=17 steps, D=5, H=8)."""
    kind, direction = name.split("_")
    k = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    T, D, H = 17, 5, 8
    xs, Wx, Wh, b = (rng.standard_normal(s).astype(dtype) / 2
                     for s in [(B, T, D), (D, k * H), (H, k * H), (k * H,)])
    states = tuple(rng.standard_normal((B, H)).astype(dtype) for _ in range(1 + (kind == "lstm")))
    if direction == "forward":
        return (xs, Wx, Wh, b, *states)
    saved = kernels.get(f"{kind}_forward", "vectorized")(xs, Wx, Wh, b, *states)
    saved = saved if isinstance(saved, tuple) else (saved,)
    head = (rng.standard_normal((B, T, H)).astype(dtype),) + states[1:]  # dhs (and dc)
    return (*head, xs, Wx, Wh, *states, *saved)


def _kernel_args(name, dtype, B, rng):
    """Arguments of kernel ``name`` (B batch entries, Tq=17, Tk=19, d=8)."""
    if name.split("_")[0] in ("rnn", "lstm", "gru"):
        return _recurrent_args(name, dtype, B, rng)
    Tq, Tk, d = 17, 19, 8

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    scale = 1 / np.sqrt(d)
    mask = rng.random((B, Tq, Tk)) < 0.8
    y = kernels.get("softmax_forward", "vectorized")(r(B, Tq, Tk))
    q, k, v = r(B, Tq, d), r(B, Tk, d), r(B, Tk, d)
    out, lse = kernels.get("attention_forward", "vectorized")(q, k, v, scale, True, mask)
    x, g, b = r(40 * B, 24), r(24), r(24)  # glue kernels: rows (N, C), several row chunks
    _, mean, rstd = kernels.get("layernorm_forward", "vectorized")(x, g, b, 1e-5)
    t = rng.integers(-1, 24, size=40 * B)
    lse_x = kernels.get("softmax_xent_forward", "vectorized")(x, t)[1]
    return {
        "layernorm_forward": (x, g, b, 1e-5),
        "layernorm_backward": (r(40 * B, 24), x, g, mean, rstd),
        "bias_add": (x, g),
        "bias_relu_forward": (x, g),
        "bias_relu_backward": (r(40 * B, 24), np.maximum(x, 0)),
        "softmax_xent_forward": (x, t),
        "softmax_xent_backward": (x, t, lse_x, 0.5),
        "adam_update": ([x, g], [r(40 * B, 24), r(24)], [r(40 * B, 24), r(24)],
                        [np.abs(r(40 * B, 24)), np.abs(r(24))], 0.01, 0.9, 0.999, 1e-7),
        "softmax_forward": (r(B, Tq, Tk),),
        "softmax_backward": (r(B, Tq, Tk), y),
        "weighted_sum_forward": (y, r(B, Tk, d)),
        "weighted_sum_backward": (r(B, Tq, d), y, r(B, Tk, d)),
        "scores_forward": (q, k, scale),
        "scores_backward": (r(B, Tq, Tk), q, k, scale),
        "attention_forward": (q, k, v, scale, True, mask),
        "attention_backward": (r(B, Tq, d), q, k, v, out, lse, scale, True, mask),
        "embedding_backward": (rng.integers(0, 7, size=(B, Tq)), r(B, Tq, d), 7),
    }[name]


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _call(name, args):
    """The kernel's results; for the kernels that work in place, on copies (adam_update returns
    None: the updated arrays of a copy of its lists)."""
    fn = kernels.get(name, "numba")
    if name == "bias_add":  # in place: on a copy
        return (fn(args[0].copy(), *args[1:]),)
    if name != "adam_update":
        return _as_tuple(fn(*args))
    lists = [[a.copy() for a in lst] for lst in args[:4]]
    fn(*lists, *args[4:])
    return (*lists[0], *lists[2], *lists[3])


def _attention(q, k, v, dout, **kw):
    out, lse = fastattn.attention_forward(q, k, v, backend="numba", **kw)
    return (out, lse, *fastattn.attention_backward(dout, q, k, v, out, lse, backend="numba",
                                                   **kw))


def _qkv(B, Tq, Tk, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype)
                 for s in [(B, Tq, d), (B, Tk, d), (B, Tk, d), (B, Tq, d)])


# (B, Tq, Tk, d): more batch entries than threads; single entries with one or more query and
# key blocks (the last two have enough work that the backward splits their key blocks into
# shares, 4 to 8 of them, which run on different threads)
ATTN_SHAPES = [(5, 9, 11, 8), (1, 70, 70, 8), (1, 8, 1200, 8), (1, 200, 200, 16),
               (1, 64, 1200, 16)]


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
def test_numba_kernel_is_bitwise_repeatable(name, dtype, B):
    args = _kernel_args(name, dtype, B, np.random.default_rng(1))
    first = _call(name, args)
    for _ in range(3):
        for a, b in zip(first, _call(name, args), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_public_attention_is_bitwise_repeatable(dtype, shape):
    q, k, v, dout = _qkv(*shape, dtype)
    first = _attention(q, k, v, dout, causal=True)
    for _ in range(3):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first,
                              _attention(q, k, v, dout, causal=True), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
def test_numba_kernel_does_not_depend_on_the_thread_count(threads, monkeypatch, name, dtype, B):
    args = _kernel_args(name, dtype, B, np.random.default_rng(2))
    log = record_paths(monkeypatch, force=True)
    threads(1)
    one = _call(name, args)
    assert not log.parallel, "one thread ran a parallel path"
    threads(2)
    log.clear()
    two = _call(name, args)
    if name in GLUE:  # prange over rows always; the column sums over row chunks
        assert not (log.unfused or log.fused)
        assert name not in CHUNKED or (glue_chunks(40 * B) >= 2) == (B > 1), name
    elif name.split("_")[0] in ("rnn", "lstm", "gru"):
        # forced: 2 rows per share, so B = 5 runs 2 shares (2 and 3 rows), one per thread;
        # the shares follow the shapes only, so 1 thread runs the same shares in turn (OpenBLAS's
        # AVX2 gemm may round a share's rows differently from all rows: the same bits need
        # the same shares)
        assert log.unfused == [B > 1], log.unfused
    else:
        # every kernel shares B = 5 entries out; with B = 1 the fused forward shares query
        # blocks and the scatter-add token ids, while the others have nothing to share at
        # these shapes (one key block: the backward's key shares are tested below)
        serial_only = B == 1 and name not in ("attention_forward", "embedding_backward")
        assert log.parallel != serial_only, f"2 threads: paths {log.unfused} {log.fused}"
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("own", [0, 1], ids=["blas", "own"])
def test_public_attention_across_thread_counts(threads, monkeypatch, dtype, shape, own):
    """Bitwise equal with 1 and 2 threads, including dq when there are fewer batch entries than
    threads (the backward then splits key blocks into shares that the shapes decide), with
    both kinds of tile product (BLAS, the kernels' own). The two largest shapes reach the
    parallel backward at the kernels' own thresholds; the others are forced onto the parallel
    paths."""
    q, k, v, dout = _qkv(*shape, dtype, seed=3)
    # the backward's work, B Tq Tk d, against the setting's threshold
    natural = 10 * np.prod(shape) >= _tuning.current()[0].serial_flops
    assert natural == (shape in ATTN_SHAPES[-2:])
    log = record_paths(monkeypatch, force=not natural)
    seen = use_products(monkeypatch, own)  # after record_paths: its spy sees the kernels
    for causal in (False, True):
        threads(1)
        one = _attention(q, k, v, dout, causal=causal)
        threads(2)
        log.clear()
        two = _attention(q, k, v, dout, causal=causal)
        # the big shapes' backward shares key blocks out at the setting's own threshold; the
        # forced ones share query blocks (the forward) or key shares (the backward, when the
        # setting's tiles give more than one key block)
        ran = log.fused[-1] if natural else max(log.fused)
        assert ran == 2, f"fused calls ran on {log.fused} thread(s)"
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, two, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, causal={causal}")
    assert seen and set(seen) == {own}
