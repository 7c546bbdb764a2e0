"""The book's recurrent layers (fastattn.recurrent) and their kernels.

References: the book's per-step algorithm written in the test helpers (``book_rnn``,
``book_lstm``: one cell object per step) and the loop kernels; float64 central differences.
float64 results must equal the book's to 1e-12 (relative to the array's largest entry);
float32 results are judged against the float64 book with a bound of 4 times the float32 book's
own error (plus one float32 ulp of the largest entry), so a float32 result passes exactly when
it is as accurate as the book's own float32 computation, up to a factor.
"""

from __future__ import annotations

import book_lstm
import book_rnn
import numpy as np
import pytest
from gradcheck import check_layer_grads
from helpers import assert_all_within_float32_error, assert_within_float32_error

import fastattn
from fastattn import _backend, kernels
from fastattn import recurrent as rec

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
TIME = {"rnn": (rec.TimeRNN, book_rnn.TimeRNN), "lstm": (rec.TimeLSTM, book_rnn.TimeLSTM),
        "gru": (rec.TimeGRU, book_rnn.TimeGRU)}
STEP = {"rnn": (rec.RNN, book_rnn.RNN), "lstm": (rec.LSTM, book_rnn.LSTM),
        "gru": (rec.GRU, book_rnn.GRU)}


def _weights(kind, D, H, dtype=np.float64, seed=0, scale=1.0):
    k = GATES[kind]
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal((D, k * H)) / np.sqrt(D)).astype(dtype),
            (scale * rng.standard_normal((H, k * H)) / np.sqrt(H)).astype(dtype),
            (scale * rng.standard_normal(k * H) * 0.5).astype(dtype)]


def _copies(arrays, dtype=None):
    return [np.array(a, dtype=dtype or a.dtype) for a in arrays]


def _close64(actual, expected, what=""):
    """float64 equality with the book's algorithm: 1e-12 relative to the largest entry."""
    scale = max(float(np.abs(expected).max(initial=0)), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12 * scale, err_msg=what)


def _close32(actual, book32, book64, what=""):
    """float32 within 4x the float32 book's own error against the float64 book (+ 1 ulp)."""
    assert actual.dtype == np.float32, what
    ref_err = float(np.abs(book32.astype(np.float64) - book64).max(initial=0))
    ulp = np.finfo(np.float32).eps * float(np.abs(book64).max(initial=0))
    err = float(np.abs(actual.astype(np.float64) - book64).max(initial=0))
    assert err <= 4 * ref_err + ulp, f"{what}: error {err:.3g} > 4 x {ref_err:.3g} + {ulp:.3g}"


def _sequence_run(layer, xs_list, dhs_list, kind):
    """Forward and backward over several calls; everything a user can read after each."""
    out = []
    for xs, dhs in zip(xs_list, dhs_list, strict=True):
        hs = layer.forward(xs)
        state = [layer.h, layer.c] if kind == "lstm" else [layer.h]
        dxs = layer.backward(dhs)
        out += [hs, *[np.array(s) for s in state], dxs, np.array(layer.dh),
                *[g.copy() for g in layer.grads]]
    return out


def _inputs(N, Ts, D, H, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((N, T, D)).astype(dtype) for T in Ts]
    dhs = [rng.standard_normal((N, T, H)).astype(dtype) for T in Ts]
    return xs, dhs


# --- equality with the book's algorithm ---------------------------------------------------


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize("kind", list(GATES))
def test_time_layer_equals_the_books_per_step_algorithm_float64(kind, backend, stateful):
    N, D, H = 3, 4, 5
    W = _weights(kind, D, H)
    fast_cls, book_cls = TIME[kind]
    fast = fast_cls(*_copies(W), stateful=stateful, backend=backend)
    book = book_cls(*_copies(W), stateful=stateful)
    xs, dhs = _inputs(N, [4, 1, 3], D, H)
    got = _sequence_run(fast, xs, dhs, kind)
    want = _sequence_run(book, xs, dhs, kind)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == np.float64
        _close64(a, b, f"item {k}")


@pytest.mark.parametrize("kind", list(GATES))
def test_set_state_and_reset_state_behave_as_the_books(kind, backend):
    N, D, H = 2, 3, 4
    W = _weights(kind, D, H, seed=2)
    fast_cls, book_cls = TIME[kind]
    fast = fast_cls(*_copies(W), stateful=True, backend=backend)
    book = book_cls(*_copies(W), stateful=True)
    rng = np.random.default_rng(3)
    h, c = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    xs, dhs = _inputs(N, [3, 2, 2], D, H, seed=4)
    for layer in (fast, book):
        if kind == "lstm":
            layer.set_state(h, c)
        else:
            layer.set_state(h)
    first = (fast.forward(xs[0]), book.forward(xs[0]))
    fast.backward(dhs[0])
    book.backward(dhs[0])
    _close64(fast.dh, book.dh, "dh after set_state")
    if kind == "lstm":  # set_state(h) alone: c starts from zeros
        fast.set_state(h)
        book.set_state(h)
    second = (fast.forward(xs[1]), book.forward(xs[1]))
    fast.reset_state()
    book.reset_state()
    third = (fast.forward(xs[2]), book.forward(xs[2]))
    for a, b in (first, second, third):
        _close64(a, b)
    assert fast.h is not None and np.array_equal(fast.h, third[0][:, -1])
    # the state really mattered: a run from zeros differs
    assert not np.allclose(first[0], fast_cls(*W, backend=backend).forward(xs[0]))


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: small pre-activations and states
@pytest.mark.parametrize("kind", list(GATES))
def test_time_layer_float32_is_as_accurate_as_the_books_float32(kind, backend, scale):
    N, D, H = 4, 6, 8
    W = _weights(kind, D, H, seed=5, scale=scale)
    xs, dhs = _inputs(N, [7, 3], D, H, seed=6)
    fast_cls, book_cls = TIME[kind]
    got = _sequence_run(fast_cls(*_copies(W, np.float32), stateful=True, backend=backend),
                        _copies(xs, np.float32), _copies(dhs, np.float32), kind)
    want32 = _sequence_run(book_cls(*_copies(W, np.float32), stateful=True),
                           _copies(xs, np.float32), _copies(dhs, np.float32), kind)
    want64 = _sequence_run(book_cls(*_copies(W), stateful=True), xs, dhs, kind)
    for k, (a, b32, b64) in enumerate(zip(got, want32, want64, strict=True)):
        _close32(a, b32, b64, f"item {k}")


@pytest.mark.parametrize("kind", list(GATES))
def test_step_layer_equals_the_books_cell(kind, backend):
    N, D, H = 3, 4, 5
    W = _weights(kind, D, H, seed=7)
    fast_cls, book_cls = STEP[kind]
    fast, book = fast_cls(*_copies(W), backend=backend), book_cls(*_copies(W))
    rng = np.random.default_rng(8)
    x, h, c, dh, dc = (rng.standard_normal(s) for s in [(N, D)] + [(N, H)] * 4)
    if kind == "lstm":
        for a, b in zip(fast.forward(x, h, c), book.forward(x, h, c), strict=True):
            _close64(a, b)
        got, want = fast.backward(dh, dc), book.backward(dh, dc)
    else:
        _close64(fast.forward(x, h), book.forward(x, h))
        got, want = fast.backward(dh), book.backward(dh)
    assert len(got) == len(want)
    for a, b in zip([*got, *fast.grads], [*want, *book.grads], strict=True):
        _close64(a, b)


def test_lstm_step_backward_without_dc_next_takes_zeros(backend):
    """LSTM.backward(dh_next) alone (a c_next that nothing used): the book's cell backward
    with dc_next = 0."""
    N, D, H = 3, 4, 5
    W = _weights("lstm", D, H, seed=33)
    fast, book = rec.LSTM(*_copies(W), backend=backend), book_rnn.LSTM(*_copies(W))
    rng = np.random.default_rng(34)
    x, h, c, dh = (rng.standard_normal(s) for s in [(N, D)] + [(N, H)] * 3)
    fast.forward(x, h, c)
    book.forward(x, h, c)
    got, want = fast.backward(dh), book.backward(dh, np.zeros((N, H)))
    for a, b in zip([*got, *fast.grads], [*want, *book.grads], strict=True):
        _close64(a, b)


def test_bilstm_equals_the_books(backend):
    N, T, D, H = 2, 5, 3, 4
    W = _weights("lstm", D, H, seed=9) + _weights("lstm", D, H, seed=10)
    fast = rec.TimeBiLSTM(*_copies(W), backend=backend)
    book = book_rnn.TimeBiLSTM(*_copies(W))
    xs, dhs = _inputs(N, [T], D, 2 * H, seed=11)
    _close64(fast.forward(xs[0]), book.forward(xs[0]))
    _close64(fast.backward(dhs[0]), book.backward(dhs[0]))
    assert len(fast.grads) == 6
    for a, b in zip(fast.grads, book.grads, strict=True):
        _close64(a, b)


def test_stateful_bilstm_equals_the_books(backend):
    """Both directions carry their states from one call to the next, as the book's do."""
    N, D, H = 2, 3, 4
    W = _weights("lstm", D, H, seed=30) + _weights("lstm", D, H, seed=31)
    fast = rec.TimeBiLSTM(*_copies(W), stateful=True, backend=backend)
    book = book_rnn.TimeBiLSTM(*_copies(W), stateful=True)
    xs, dhs = _inputs(N, [3, 2, 4], D, 2 * H, seed=32)
    for x, d in zip(xs, dhs, strict=True):
        _close64(fast.forward(x), book.forward(x))
        _close64(fast.backward(d), book.backward(d))
        for a, b in zip(fast.grads, book.grads, strict=True):
            _close64(a, b)
    # the states really mattered: the last call from zeros differs in both halves
    fresh = rec.TimeBiLSTM(*_copies(W), backend=backend).forward(xs[-1])
    carried = book.forward(xs[-1])
    assert not np.allclose(fresh[..., :H], carried[..., :H])
    assert not np.allclose(fresh[..., H:], carried[..., H:])


@pytest.mark.parametrize("kind", list(GATES))
def test_kernels_of_every_backend_match_the_loop_reference(kind, backend):
    """The kernels directly, with a given last-cell gradient for the LSTM."""
    N, T, D, H = 5, 4, 3, 6
    Wx, Wh, b = _weights(kind, D, H, seed=12)
    rng = np.random.default_rng(13)
    xs, dhs = rng.standard_normal((N, T, D)), rng.standard_normal((N, T, H))
    states = [rng.standard_normal((N, H)) for _ in range(2 if kind == "lstm" else 1)]
    head = (dhs, rng.standard_normal((N, H))) if kind == "lstm" else (dhs,)
    results = {}
    for be in ("loop", backend):
        saved = kernels.get(f"{kind}_forward", be)(xs, Wx, Wh, b, *states)
        saved = saved if isinstance(saved, tuple) else (saved,)
        grads = kernels.get(f"{kind}_backward", be)(*head, xs, Wx, Wh, *states, *saved)
        results[be] = (*saved, *grads)
    for a, r in zip(results[backend], results["loop"], strict=True):
        _close64(a, r)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GATES))
def test_time_layer_gradients_match_central_differences(kind, backend):
    N, T, D, H = 2, 3, 3, 4
    layer = TIME[kind][0](*_weights(kind, D, H, seed=14), stateful=True, backend=backend)
    rng = np.random.default_rng(15)
    xs, h0 = rng.standard_normal((N, T, D)), rng.standard_normal((N, H))

    def forward(xs, h0):  # from a given h0 (c0 = zeros for the LSTM), as a decoder does
        layer.set_state(h0)
        return layer.forward(xs)

    def backward(dhs):
        return layer.backward(dhs), layer.dh

    check_layer_grads(layer, forward, [xs, h0], backward_fn=backward, rtol=1e-6, atol=1e-8,
                      expect={"params", "inputs[0]", "inputs[1]"})


@pytest.mark.parametrize("kind", list(GATES))
def test_step_layer_gradients_match_central_differences(kind, backend):
    N, D, H = 2, 3, 4
    layer = STEP[kind][0](*_weights(kind, D, H, seed=16), backend=backend)
    rng = np.random.default_rng(17)
    x, h, c = rng.standard_normal((N, D)), rng.standard_normal((N, H)), rng.standard_normal((N, H))
    if kind == "lstm":
        check_layer_grads(layer, lambda x, h, c: np.concatenate(layer.forward(x, h, c), axis=1),
                          [x, h, c], backward_fn=lambda d: layer.backward(d[:, :H], d[:, H:]),
                          rtol=1e-6, atol=1e-8, expect={"params", "inputs[0]", "inputs[1]",
                                                        "inputs[2]"})
    else:
        check_layer_grads(layer, layer.forward, [x, h], rtol=1e-6, atol=1e-8,
                          expect={"params", "inputs[0]", "inputs[1]"})


def test_bilstm_gradients_match_central_differences(backend):
    N, T, D, H = 2, 3, 3, 2
    layer = rec.TimeBiLSTM(*_weights("lstm", D, H, seed=18), *_weights("lstm", D, H, seed=19),
                           backend=backend)
    xs = np.random.default_rng(20).standard_normal((N, T, D))
    check_layer_grads(layer, layer.forward, [xs], rtol=1e-6, atol=1e-8,
                      expect={"params", "inputs[0]"})


# --- paths, backends, views -----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GATES))
def test_numba_runs_row_shares_in_parallel_and_matches_the_loop(kind, monkeypatch):
    """Row shares of uneven sizes (4 and 5 rows, a smaller share size than the kernels' own so
    that the shapes stay small) on 2 threads and on 1: the same shares and parts of the weight
    gradients, bitwise the same results, and as accurate as the loop reference."""
    numba = pytest.importorskip("numba")
    from fastattn.kernels import _recurrent_numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 Numba threads")
    monkeypatch.setattr(_recurrent_numba, "_ROWS", 4)
    N, T, D, H = 18, 3, 4, 128  # N * H * kH above the parallel threshold for every kind
    W = _weights(kind, D, H, np.float32, seed=21)
    xs, dhs = _inputs(N, [T], D, H, np.float32, seed=22)
    before = numba.get_num_threads()
    runs = []
    try:
        for threads in (2, 1):
            numba.set_num_threads(threads)
            layer = TIME[kind][0](*_copies(W), backend="numba")
            hs = layer.forward(xs[0])
            assert _recurrent_numba.stats == {"shares": 4, "threads": threads, "parts": 0}
            dxs = layer.backward(dhs[0])  # and so did the backward, then the weight gradients
            assert _recurrent_numba.stats == {"shares": 4, "threads": threads, "parts": 2}
            runs.append([hs, dxs, layer.dh, *layer.grads])
    finally:
        numba.set_num_threads(before)
    want = {}
    for dt in (np.float32, np.float64):  # the loop reference in float32 and in float64
        ref = TIME[kind][0](*_copies(W, dt), backend="loop")
        want[dt] = [ref.forward(xs[0].astype(dt)), ref.backward(dhs[0].astype(dt)), ref.dh,
                    *ref.grads]
    for k, (two, one, r32, r64) in enumerate(zip(*runs, want[np.float32], want[np.float64],
                                                 strict=True)):
        np.testing.assert_array_equal(two, one)
        assert_within_float32_error(two, r64, r32, err_msg=f"{kind} result {k}")


@pytest.mark.parametrize(("N", "shares"), [(15, 1), (16, 2), (20, 2)])
@pytest.mark.parametrize("kind", list(GATES))
def test_numba_cuts_large_work_into_two_shares_when_it_has_rows_for_them(kind, N, shares):
    """Work above the parallel threshold on fewer rows than two of the kernels' 64-row
    shares: two shares when there are rows for two of their 8-row minimum (16 or 20), else
    one (15), whatever the thread count; every row computed as the loop reference computes
    it."""
    pytest.importorskip("numba")
    from fastattn.kernels import _recurrent_numba

    T, D, H = 2, 3, 144
    assert N * H * GATES[kind] * H >= _recurrent_numba._PARALLEL_MIN_MACS
    assert N < 2 * _recurrent_numba._ROWS and _recurrent_numba._MIN_SHARE_ROWS == 8
    W = _weights(kind, D, H, seed=35)
    xs, dhs = _inputs(N, [T], D, H, seed=36)
    layer, ref = TIME[kind][0](*W, backend="numba"), TIME[kind][0](*W, backend="loop")
    _close64(layer.forward(xs[0]), ref.forward(xs[0]), "hs")
    assert _recurrent_numba.stats["shares"] == shares
    _close64(layer.backward(dhs[0]), ref.backward(dhs[0]), "dxs")
    assert _recurrent_numba.stats["shares"] == shares
    for k, (a, b) in enumerate(zip([layer.dh, *layer.grads], [ref.dh, *ref.grads],
                                   strict=True)):
        _close64(a, b, f"gradient {k}")


def test_a_pool_handed_out_stays_usable_when_another_thread_asks_for_more_workers():
    """Numba's thread count is per Python thread: one thread may get the pool of its count
    while another asks for more workers. The first thread's pool must still take its work
    (it was shut down under it: RuntimeError, cannot schedule new futures)."""
    pytest.importorskip("numba")
    from fastattn.kernels import _flash

    pool = _flash.pool(1)
    bigger = _flash.pool(2)
    assert pool.submit(sum, [1, 2]).result(timeout=60) == 3
    assert bigger.submit(sum, [3, 4]).result(timeout=60) == 7
    assert _flash.pool(1) is pool, "kept for the next calls"


@pytest.mark.parametrize("kind", list(GATES))
def test_numba_without_blas_runs_the_numpy_recurrence(kind, monkeypatch):
    pytest.importorskip("numba")
    from fastattn.kernels import _recurrent_numba

    monkeypatch.setattr(_recurrent_numba._blas, "available", lambda: False)
    W = _weights(kind, 3, 4, seed=25)
    xs, dhs = _inputs(3, [4], 3, 4, seed=26)
    layer, ref = TIME[kind][0](*W, backend="numba"), TIME[kind][0](*W, backend="loop")
    _close64(layer.forward(xs[0]), ref.forward(xs[0]))
    assert _recurrent_numba.stats["shares"] == 0  # the fallback ran
    _close64(layer.backward(dhs[0]), ref.backward(dhs[0]))
    assert _recurrent_numba.stats["shares"] == 0


def test_empty_sequence_gives_empty_outputs_and_keeps_the_state(backend):
    W = _weights("lstm", 3, 4)
    layer = rec.TimeLSTM(*W, stateful=True, backend=backend)
    h = np.ones((2, 4))
    layer.set_state(h, h)
    hs = layer.forward(np.zeros((2, 0, 3)))
    assert hs.shape == (2, 0, 4)
    np.testing.assert_array_equal(layer.h, h)
    assert layer.backward(np.zeros((2, 0, 4))).shape == (2, 0, 3)
    np.testing.assert_array_equal(layer.dh, 0)
    assert all(not g.any() for g in layer.grads)


def test_non_contiguous_inputs_give_the_same_result(backend):
    W = _weights("gru", 3, 4)
    xs = np.random.default_rng(23).standard_normal((2, 6, 5))
    view = xs[:, ::-2, 1:4]  # negative stride, non-contiguous
    a, b = rec.TimeGRU(*W, backend=backend), rec.TimeGRU(*W, backend=backend)
    np.testing.assert_array_equal(a.forward(view), b.forward(view.copy()))
    dhs = np.ones((2, 3, 8))[:, :, ::2]
    np.testing.assert_array_equal(a.backward(dhs), b.backward(dhs.copy()))


@pytest.mark.parametrize("kind", list(GATES))
def test_changing_the_returned_states_in_place_leaves_backward_as_the_books(kind, backend):
    """The book's Time layers return hs, and its LSTM c_next, as arrays the caller owns: a
    caller that masks or scales them in place does not change the backward."""
    N, D, H = 2, 3, 4
    W = _weights(kind, D, H, seed=27)
    xs, dhs = _inputs(N, [3], D, H, seed=28)
    runs = []
    for edit in (False, True):
        layer = TIME[kind][0](*_copies(W), backend=backend)
        hs = layer.forward(xs[0])
        if edit:
            hs[:, 1:] = 0  # e.g. padded steps masked
        runs.append([layer.backward(dhs[0]), layer.dh, *layer.grads])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    if kind != "lstm":
        return
    runs = []
    for edit in (False, True):
        bi = rec.TimeBiLSTM(*_copies(W), *_copies(W), backend=backend)
        hs = bi.forward(xs[0])
        if edit:
            hs[:, 1:] = 0
        runs.append([bi.backward(np.concatenate([dhs[0], dhs[0]], axis=2)), *bi.grads])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(29)
    x, h, c, dh, dc = (rng.standard_normal(s) for s in [(N, D)] + [(N, H)] * 4)
    runs = []
    for edit in (False, True):
        step = rec.LSTM(*_copies(W), backend=backend)
        _, c_next = step.forward(x, h, c)
        if edit:
            c_next *= 0
        runs.append([*step.backward(dh, dc), *step.grads])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_backward_runs_on_the_backend_forward_ran_on(monkeypatch):
    calls = []
    original = _backend.kernel

    def spy(name, backend=None):
        calls.append((name, _backend.resolve(backend)))
        return original(name, backend)

    monkeypatch.setattr(_backend, "kernel", spy)
    layer = rec.TimeLSTM(*_weights("lstm", 3, 4))
    with fastattn.use_backend("vectorized"):
        hs = layer.forward(np.ones((2, 3, 3)))
    with fastattn.use_backend("loop"):
        layer.backward(np.ones_like(hs))
    assert calls == [("lstm_forward", "vectorized"), ("lstm_backward", "vectorized")]
    fixed = rec.TimeRNN(*_weights("rnn", 3, 4), backend="loop")
    with fastattn.use_backend("vectorized"):
        fixed.forward(np.ones((2, 3, 3)))
    assert calls[-1] == ("rnn_forward", "loop")


def test_fast_time_lstm_is_a_drop_in_for_the_books_in_the_attention_seq2seq():
    """book_lstm's attention seq2seq with fastattn's TimeLSTM: the same float32 losses over
    five Adam steps as with the book-style TimeLSTM (same seed, weights and batches)."""
    rng = np.random.default_rng(24)
    V, N, steps = 13, 8, 5
    xs = np.tile(rng.integers(0, V, size=(N, 7)), (steps, 1))  # one batch, again and again
    ts = np.tile(rng.integers(0, V, size=(N, 5)), (steps, 1))
    ref = book_lstm.AttentionSeq2seq(V, 8, 16, backend="numba", seed=0)
    fast = book_lstm.AttentionSeq2seq(V, 8, 16, backend="numba", seed=0,
                                      lstm=rec.TimeLSTM)
    assert isinstance(fast.encoder.lstm, rec.TimeLSTM)
    ref64 = book_lstm.AttentionSeq2seq(V, 8, 16, backend="numba", seed=0, dtype=np.float64)
    for p64, p32 in zip(ref64.params, ref.params, strict=True):  # the float32 run's weights
        p64[...] = p32
    ref_losses = book_lstm.train_steps(ref, xs, ts, N, steps, book_lstm.adam(1e-2))
    losses = book_lstm.train_steps(fast, xs, ts, N, steps, book_lstm.adam(1e-2))
    losses64 = book_lstm.train_steps(ref64, xs, ts, N, steps, book_lstm.adam(1e-2))
    assert ref_losses[-1] < ref_losses[0]
    assert_all_within_float32_error([np.asarray(losses, np.float32)], [np.asarray(losses64)],
                                    [np.asarray(ref_losses)], ["losses"])


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GATES))
def test_bad_weights_raise_naming_the_argument(kind):
    Wx, Wh, b = _weights(kind, 3, 4)
    cls = TIME[kind][0]
    with pytest.raises(ValueError, match="Wh"):
        cls(Wx, Wh[:, :-1], b)
    with pytest.raises(ValueError, match="Wx"):
        cls(Wx[:, :-1], Wh, b)
    with pytest.raises(ValueError, match="b"):
        cls(Wx, Wh, b[:-1])
    with pytest.raises(TypeError, match="dtype"):
        cls(Wx.astype(np.float32), Wh, b)
    with pytest.raises(TypeError, match="Wx"):
        cls(Wx.astype(np.int64), Wh, b)
    with pytest.raises(TypeError, match="Wh"):
        cls(Wx, Wh.tolist(), b)
    with pytest.raises(ValueError, match="valid backends"):
        cls(Wx, Wh, b, backend="gpu")


@pytest.mark.parametrize("kind", list(GATES))
def test_bad_inputs_and_states_raise_before_any_kernel(kind, backend):
    cls = TIME[kind][0]
    layer = cls(*_weights(kind, 3, 4), stateful=True, backend=backend)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="xs"):
        layer.forward(np.zeros((2, 5, 2)))  # D does not match Wx
    with pytest.raises(ValueError, match="xs"):
        layer.forward(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="xs"):
        layer.forward(np.zeros((2, 5, 3), dtype=np.int64))
    layer.set_state(np.zeros((3, 4)))  # a batch of 3; the input has 2
    with pytest.raises(ValueError, match="h must have shape"):
        layer.forward(np.zeros((2, 5, 3)))
    layer.set_state(np.zeros((2, 5)))  # wrong width
    with pytest.raises(ValueError, match="h must have shape"):
        layer.forward(np.zeros((2, 5, 3)))
    if kind == "lstm":
        layer.set_state(np.zeros((2, 4)), np.zeros((1, 4)))
        with pytest.raises(ValueError, match="c must have shape"):
            layer.forward(np.zeros((2, 5, 3)))
    layer.reset_state()
    hs = layer.forward(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="dhs"):
        layer.backward(np.zeros((2, 4, 4)))
    with pytest.raises(TypeError, match="dhs"):
        layer.backward(np.zeros(hs.shape, dtype=np.int32))


def test_bad_step_and_bilstm_inputs_raise(backend):
    lstm = rec.LSTM(*_weights("lstm", 3, 4), backend=backend)
    with pytest.raises(ValueError, match="c_prev"):
        lstm.forward(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="x must have shape"):
        lstm.forward(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(RuntimeError):
        lstm.backward(np.zeros((2, 4)), np.zeros((2, 4)))
    lstm.forward(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="dc_next"):
        lstm.backward(np.zeros((2, 4)), np.zeros((2, 5)))
    gru = rec.GRU(*_weights("gru", 3, 4), backend=backend)
    with pytest.raises(ValueError, match="h_prev"):
        gru.forward(np.zeros((2, 3)), np.zeros((1, 4)))
    W1, W2 = _weights("lstm", 3, 4), _weights("lstm", 2, 4)
    with pytest.raises(ValueError, match="Wx2"):
        rec.TimeBiLSTM(*W1, *W2)
    with pytest.raises(ValueError, match="Wh1"):
        rec.TimeBiLSTM(W1[0], W1[1][:, :8], W1[2], *W1)
    with pytest.raises(TypeError, match="Wx2"):  # halves of two dtypes: a dtype error
        rec.TimeBiLSTM(*W1, *_copies(W1, np.float32))
    bi = rec.TimeBiLSTM(*W1, *_weights("lstm", 3, 4, seed=1), backend=backend)
    bi.forward(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="dhs"):
        bi.backward(np.zeros((2, 5, 4)))


def test_the_layers_are_exported_lazily():
    for name in ("RNN", "TimeRNN", "LSTM", "TimeLSTM", "GRU", "TimeGRU", "TimeBiLSTM"):
        assert getattr(fastattn, name) is getattr(rec, name)
        assert name in fastattn.__all__
