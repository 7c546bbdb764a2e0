"""Optimizers, gradient clipping, the Trainer, evaluation: behaviour and a training smoke test."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from helpers import adam_reference, assert_close

from dataset import sequence
from fastattn.commands.train import limit_threads
from fastattn.optim import SGD, Adam, clip_grads, lr_schedule
from fastattn.trainer import Trainer, eval_seq2seq, exact_match, remove_duplicate
from fastattn.transformer import TransformerSeq2seq

# comparisons of float64 arithmetic: rtol 1e-12


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one BLAS and one Numba thread, as ``fastattn train`` does by default: on a busy
    2-core machine, spinning thread pools can make a step many times slower."""
    with limit_threads(1):
        yield


def test_adam_matches_the_book_without_schedule():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 4))
    gs = [rng.standard_normal((3, 4)) for _ in range(5)]
    p = p0.copy()
    opt = Adam(lr=0.01)
    g = np.zeros_like(p)
    for step in gs:
        g[...] = step
        opt.update([p], [g])
    np.testing.assert_allclose(p, adam_reference(p0, gs, 0.01), rtol=1e-12)


def test_adam_uses_its_eps_and_betas(backend):
    """Non-default eps and betas reach the update kernel of every backend."""
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((3, 4))
    gs = [rng.standard_normal((3, 4)) for _ in range(4)]
    p, g = p0.copy(), np.zeros_like(p0)
    opt = Adam(lr=0.01, beta1=0.8, beta2=0.99, eps=0.5, backend=backend)
    for step in gs:
        g[...] = step
        opt.update([p], [g])
    want = adam_reference(p0, gs, 0.01, beta1=0.8, beta2=0.99, eps=0.5)
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)


def test_adam_updates_in_place_and_float32_stays_float32():
    p = np.ones(5, np.float32)
    ref = p
    Adam(lr=0.1).update([p], [np.ones(5, np.float32)])
    assert p is ref and p.dtype == np.float32
    assert np.all(p < 1)


def test_adam_keeps_its_moments_in_the_params_dtype(backend):
    """float32 params keep float32 moments (m and v are as large as the params: float64 ones
    would double the optimizer's memory and take the kernels off their one-dtype path)."""
    params = [np.ones((3, 2), np.float32), np.ones(4, np.float32)]
    grads = [np.full((3, 2), 0.5, np.float32), np.full(4, -0.5, np.float32)]
    opt = Adam(lr=0.1, backend=backend)
    for _ in range(2):
        opt.update(params, grads)
    for arrays in (opt.m, opt.v, params):
        assert [a.dtype for a in arrays] == [np.float32, np.float32]
        assert [a.shape for a in arrays] == [(3, 2), (4,)]


def test_sgd_step():
    p = np.array([1.0, 2.0])
    SGD(lr=0.5).update([p], [np.array([2.0, -2.0])])
    np.testing.assert_allclose(p, [0.0, 3.0], rtol=1e-12)


def test_lr_schedule_warmup_then_cosine_decay():
    lr = 1.0
    assert lr_schedule(1, lr, warmup_steps=10) == pytest.approx(0.1)
    assert lr_schedule(5, lr, warmup_steps=10) == pytest.approx(0.5)
    assert lr_schedule(10, lr, warmup_steps=10, total_steps=110) == pytest.approx(1.0)
    assert lr_schedule(60, lr, warmup_steps=10, total_steps=110) == pytest.approx(0.5)
    assert lr_schedule(110, lr, warmup_steps=10, total_steps=110) == pytest.approx(0.0, abs=1e-12)
    assert lr_schedule(500, lr, warmup_steps=10, total_steps=110, min_lr=0.1) == pytest.approx(0.1)
    lin = lr_schedule(35, lr, warmup_steps=10, total_steps=110, decay="linear")
    assert lin == pytest.approx(0.75)
    # the optimizer follows the schedule
    opt = Adam(lr=2.0, warmup_steps=4, total_steps=8)
    p, g = np.zeros(1), np.ones(1)
    seen = []
    for _ in range(8):
        opt.update([p], [g])
        seen.append(opt.current_lr)
    expected = [lr_schedule(s, 2.0, 4, 8) for s in range(1, 9)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_adam_schedule_uses_its_min_lr_and_decay():
    """Adam's schedule is lr_schedule with Adam's own min_lr and decay: warm-up over 2 updates,
    then a linear fall from lr 1.0 to min_lr 0.1 at update 6, written out here; the step each
    update takes is the book's Adam at that rate."""
    opt = Adam(lr=1.0, warmup_steps=2, total_steps=6, min_lr=0.1, decay="linear")
    want = [0.5, 1.0] + [0.1 + 0.9 * (1 - (s - 2) / 4) for s in range(3, 7)] + [0.1]
    p, g = np.zeros(1), np.ones(1)
    seen, steps = [], []
    for _ in want:
        before = p.copy()
        opt.update([p], [g])
        seen.append(opt.current_lr)
        steps.append(float((before - p)[0]))
    np.testing.assert_allclose(seen, want, rtol=1e-12)
    # a constant gradient 1: m = 1 - beta1^t and v = 1 - beta2^t, so the book's step
    # lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps) is lr / (1 + eps / sqrt(v))
    t = np.arange(1, len(want) + 1)
    np.testing.assert_allclose(steps, np.array(want) / (1 + 1e-7 / np.sqrt(1 - 0.999 ** t)),
                               rtol=1e-12)


def test_adam_rejects_a_params_list_of_another_length_than_its_first():
    opt = Adam()
    a, b = np.zeros(2), np.zeros(3)
    opt.update([a, b], [np.ones(2), np.ones(3)])
    with pytest.raises(ValueError, match="2 params, now 1"):
        opt.update([a], [np.ones(2)])
    with pytest.raises(ValueError, match="2 params, now 3"):
        opt.update([a, b, a], [np.ones(2), np.ones(3), np.ones(2)])


@pytest.mark.parametrize("shape", [(5,), (3, 1)], ids=["longer", "same-size"])
@pytest.mark.parametrize("backend", ["loop", "vectorized", "numba"])
def test_adam_rejects_params_of_other_shapes_than_its_moments(backend, shape):
    """The numba kernel ran over the new params' length with the old, shorter moments: reads
    and writes beyond their end (heap corruption), no error. A shape of the same size is
    another shape too (the other backends' errors named nothing)."""
    opt = Adam(backend=backend)
    opt.update([np.zeros(3)], [np.ones(3)])
    p = np.zeros(shape)
    with pytest.raises(ValueError, match=rf"^params\[0\] has shape {re.escape(str(shape))}; "
                                         "Adam was used"):
        opt.update([p], [np.ones(shape)])
    assert opt.iter == 1 and (p == 0).all()


def test_clip_grads_scales_float32_grads_whose_squares_overflow():
    """float32 entries of 1e20 square to inf: the norm was inf and every grad became 0."""
    g1 = np.array([3e20, 0.0], np.float32)
    g2 = np.array([[4e20]], np.float32)
    want = math.hypot(3e20, 4e20)  # float64
    norm = clip_grads([g1, g2], 1.0)
    assert norm == pytest.approx(want, rel=1e-6)  # float32 inputs: a few ulps
    np.testing.assert_allclose(np.concatenate([g1, g2.ravel()]), [0.6, 0.0, 0.8], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_clip_grads_returns_inf_or_nan_for_a_gradient_that_holds_one():
    """The norm of gradients holding inf is inf, and NaN with a NaN, as sqrt of their sum of
    squares (float32 and float64 alike)."""
    for dtype in (np.float32, np.float64):
        for bad, holds in ((np.inf, math.isinf), (-np.inf, math.isinf), (np.nan, math.isnan)):
            grads = [np.array([bad, 1.0], dtype), np.ones(2, dtype)]
            norm = clip_grads(grads, 1.0)
            assert holds(norm), (dtype, bad, norm)


def test_clip_grads_takes_float_arrays_only():
    with pytest.raises(TypeError, match=r"^grads\[1\] must be a float numpy array"):
        clip_grads([np.ones(2), [1.0, 2.0]], 1.0)  # was an AttributeError


def test_clip_grads_scales_to_max_norm():
    g1, g2 = np.array([3.0, 0.0]), np.array([[4.0]])
    norm = clip_grads([g1, g2], 1.0)
    assert norm == pytest.approx(5.0)
    total = math.sqrt(float((g1 ** 2).sum() + (g2 ** 2).sum()))
    assert total == pytest.approx(1.0, rel=1e-5)
    small = np.array([0.1, 0.1])
    clip_grads([small], 10.0)
    np.testing.assert_array_equal(small, [0.1, 0.1])


@pytest.mark.parametrize("row", [[1.0, 1.0, 1.0, 1.0], [1.0, -0.7, 0.3, 0.55]],
                         ids=["equal", "unequal"])
@pytest.mark.parametrize("big", [1e20, 3e38])
def test_clip_grads_of_float32_gradients_whose_squares_overflow(big, row):
    """float32 gradients of 1e20: their squares overflow float32, but their norm does not.
    The norm is the float64 one, and the gradients are scaled to max_norm (they were all set
    to 0: a norm of inf gave a rate of 0). Unequal entries: a sum of squares taken in float32
    would be off by float32 roundings."""
    grads = [(big * np.array(row)).astype(np.float32), np.array([[1.0, -2.0]], np.float32)]
    want64 = [g.astype(np.float64) for g in grads]
    norm64 = math.sqrt(sum(float((g ** 2).sum()) for g in want64))
    norm = clip_grads(grads, 1.0)
    assert abs(norm - norm64) <= 10 * np.finfo(np.float64).eps * norm64  # 6 terms, float64
    for g, w in zip(grads, want64, strict=True):  # g * rate: a few roundings of float32
        assert_close(g, w / (norm64 + 1e-6), terms=np.abs(w) / norm64, n=8)


def test_optimizer_errors():
    with pytest.raises(ValueError, match="lr"):
        Adam(lr=-1)
    with pytest.raises(ValueError, match="beta"):
        Adam(beta1=1.0)
    with pytest.raises(ValueError, match="same length"):
        Adam().update([np.zeros(2)], [])
    with pytest.raises(ValueError, match="shape"):
        Adam().update([np.zeros(2)], [np.zeros(3)])
    with pytest.raises(ValueError, match="max_norm"):
        clip_grads([np.zeros(2)], 0)


@pytest.mark.parametrize("make, err, msg", [
    (lambda: SGD(10**400), ValueError, "^lr must be a finite"),  # was an OverflowError
    (lambda: Adam(min_lr=10**400), ValueError, "^min_lr must be a finite"),
    (lambda: Adam(eps=0), ValueError, "^eps must be a finite positive"),  # NaN weights
    (lambda: Adam(warmup_steps=float("inf")), TypeError, "^warmup_steps must be an int"),
    (lambda: Adam(warmup_steps=2.5), TypeError, "^warmup_steps must be an int"),  # was 2
    (lambda: Adam(warmup_steps="a"), TypeError, "^warmup_steps must be an int"),
    (lambda: Adam(warmup_steps=-1), ValueError, "^warmup_steps must be >= 0"),
    (lambda: Adam(total_steps=float("nan")), TypeError, "^total_steps must be an int"),
    (lambda: Adam(total_steps=0), ValueError, "^total_steps must be >= 1"),
    (lambda: clip_grads([np.zeros(2)], 10**400), ValueError, "^max_norm must be a finite"),
    (lambda: SGD("0.1"), TypeError, "^lr must be a real number"),  # was taken as 0.1
    (lambda: Adam(min_lr=True), TypeError, "^min_lr must be a real number"),  # was 1.0
    (lambda: clip_grads([np.zeros(2)], "1"), TypeError, "^max_norm must be a real number"),
], ids=["lr-beyond-float", "min_lr-beyond-float", "eps-0", "warmup-inf", "warmup-fraction",
        "warmup-str", "warmup-negative", "total-nan", "total-0", "max_norm-beyond-float",
        "lr-str", "min_lr-bool", "max_norm-str"])
def test_optimizer_settings_are_checked_naming_them(make, err, msg):
    with pytest.raises(err, match=msg):
        make()


def test_adam_keeps_its_moments_when_the_params_layout_changes():
    """Moments made like F-ordered params were F-ordered too; a later update with C params of
    the same shape went to the numba kernel, which updated flattened copies of them: the moments
    never moved. Three updates, the first on F-ordered arrays, equal the book's three steps."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 4))
    p0 = rng.standard_normal((3, 4))
    want = adam_reference(p0, [g, g, g], 0.001)
    for backend in ("numba", "vectorized", "loop"):
        opt = Adam(backend=backend)
        pf = np.asfortranarray(p0)
        opt.update([pf], [np.asfortranarray(g)])  # makes the moments
        p = np.ascontiguousarray(pf)
        for _ in range(2):
            opt.update([p], [g.copy()])
        np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15, err_msg=backend)


def test_adam_takes_0d_arrays_as_its_step_counts():
    """int() took them before the counts were checked (a setting read back with np.load)."""
    opt = Adam(warmup_steps=np.array(4), total_steps=np.array(8, np.int32))
    assert (opt.warmup_steps, opt.total_steps) == (4, 8)
    assert type(opt.warmup_steps) is int and type(opt.total_steps) is int
    with pytest.raises(TypeError, match="^warmup_steps must be an int"):
        Adam(warmup_steps=np.array(2.5))


@pytest.mark.parametrize("backend", ["loop", "vectorized", "numba"])
def test_adam_eps_that_rounds_to_0_in_the_params_dtype_raises_naming_eps(backend):
    """eps=1e-50 is 0 in float32: a weight whose gradient is 0 became 0 / 0 = NaN."""
    opt = Adam(eps=1e-50, backend=backend)
    p = [np.ones(3, np.float32), np.ones(2, np.float32)]
    g = [np.zeros(3, np.float32), np.array([1.0, 0.0], np.float32)]
    with pytest.raises(ValueError, match="^eps must be > 0 in float32"):
        opt.update(p, g)
    assert opt.iter == 0 and all((a == 1).all() for a in p)  # nothing updated
    p64 = [a.astype(np.float64) for a in p]  # 1e-50 > 0 in float64
    opt.update(p64, [a.astype(np.float64) for a in g])
    assert all(np.isfinite(a).all() for a in p64) and (p64[0] == 1).all()


@pytest.mark.parametrize("opt", [SGD, Adam])
@pytest.mark.parametrize("params, grads, name", [
    ([[1.0, 2.0]], [np.ones(2)], r"params\[0\]"),  # was an AttributeError
    ([np.ones(2)], [[1.0, 2.0]], r"grads\[0\]"),
    ([np.ones(2, np.int64)], [np.ones(2, np.int64)], r"params\[0\]"),  # SGD: not updated
], ids=["list-param", "list-grad", "int-param"])
def test_optimizer_update_takes_float_arrays_only(opt, params, grads, name):
    with pytest.raises(TypeError, match=f"^{name} must be a float numpy array"):
        opt().update(params, grads)


def test_remove_duplicate_sums_shared_grads():
    a, b = np.zeros(2), np.zeros(3)
    ga1, gb, ga2 = np.ones(2), np.ones(3), 2 * np.ones(2)
    p, g = remove_duplicate([a, b, a], [ga1, gb, ga2])
    assert len(p) == 2 and p[0] is a and p[1] is b
    np.testing.assert_array_equal(g[0], [3.0, 3.0])


def test_remove_duplicate_sums_into_the_first_grad_of_each_weight_after_removals():
    """[a, a, b, c, b]: the second b's grad goes to b's grad, the second kept (a's second
    was removed before it), not to the third kept, c's."""
    a, b, c = np.zeros(2), np.zeros(3), np.zeros(3)
    grads = [np.full(2, 1.0), np.full(2, 2.0), np.full(3, 3.0), np.full(3, 4.0), np.full(3, 5.0)]
    p, g = remove_duplicate([a, a, b, c, b], grads)
    assert len(p) == 3 and p[0] is a and p[1] is b and p[2] is c
    np.testing.assert_array_equal(np.concatenate(g), [3, 3, 8, 8, 8, 4, 4, 4])


def test_remove_duplicate_keeps_views_of_other_shapes_apart():
    """A view that starts where a weight starts, with its strides but another shape, is not
    that weight: both are kept with their own grads."""
    W = np.zeros((3, 2))
    for view in (W[:1], W[:, :1], W.reshape(-1)[:2]):
        gW, gv = np.ones(W.shape), np.full(view.shape, 2.0)
        p, g = remove_duplicate([W, view], [gW, gv])
        assert len(p) == 2 and p[1] is view and g[0] is gW and (g[0] == 1).all()


@pytest.mark.parametrize("shape", [(3, 2), (3, 3)], ids=["VxD", "square"])
def test_remove_duplicate_sums_the_grad_of_a_transposed_view(shape):
    """The book's weight tying, TimeAffine(embed_W.T, b) beside TimeEmbedding(embed_W): the
    view's grad is added, transposed, to the weight's grad (as the book's remove_duplicate
    does); a square weight's transpose too. A copy with equal values is another weight."""
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal(shape), rng.standard_normal(shape[0])
    gW, gb, gWT = (rng.standard_normal(a.shape) for a in (W, b, W.T))
    want = gW + gWT.T
    p, g = remove_duplicate([W, b, W.T], [gW, gb, gWT])
    assert len(p) == 2 and p[0] is W and p[1] is b and g[0] is gW
    np.testing.assert_array_equal(g[0], want)  # one addition: exact
    p, g = remove_duplicate([W, W.T.copy()], [gW, gWT])
    assert len(p) == 2


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def date_subset():
    (x_train, t_train), (x_test, t_test) = sequence.load_data("date.txt")
    c2i, i2c = sequence.get_vocab()
    return x_train[:2048], t_train[:2048], x_test[:200], t_test[:200], c2i, i2c


def small_model(V, seed=0, backend=None):
    return TransformerSeq2seq(V, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=29,
                              backend=backend, seed=seed)


def test_training_smoke_loss_falls(date_subset):
    """48 steps on 2048 date examples with a small model: the running loss falls by more
    than half (it starts near log(V) ~ 4)."""
    x, t, *_ , c2i, _ = date_subset
    model = small_model(len(c2i))
    trainer = Trainer(model, Adam(lr=3e-3, warmup_steps=10), seed=0)
    first = model.forward(x[:64], t[:64])
    trainer.fit(x, t, max_epoch=3, batch_size=128, max_grad=1.0, eval_interval=4,
                progress=False)
    last = model.forward(x[:64], t[:64])
    assert len(trainer.loss_list) == 3 * 16 // 4
    assert first > 3.0
    assert last < 0.5 * first, (first, last)
    assert len(trainer.history) == 3 and trainer.history[-1]["epoch"] == 3
    assert trainer.loss_list[-1] < trainer.loss_list[0]
    assert trainer.train_seconds > 0


def test_trainer_callback_goes_into_history(date_subset):
    x, t, *_ , c2i, _ = date_subset
    model = small_model(len(c2i))
    calls = []

    def cb(tr, epoch):
        calls.append(epoch)
        return {"marker": epoch * 10}

    tr = Trainer(model, SGD(lr=0.0), seed=0)
    tr.fit(x[:256], t[:256], max_epoch=2, batch_size=128, eval_interval=None, callback=cb,
           progress=False)
    assert calls == [1, 2]
    assert [h["marker"] for h in tr.history] == [10, 20]
    assert tr.loss_list == []


def test_exact_match_counts_whole_answers():
    class Fixed:
        """A model whose greedy answers are fixed rows."""

        def __init__(self, answers):
            self.answers = answers
            self.calls = 0

        def generate_batch(self, xs, start_id, sample_size):
            self.calls += 1
            return self.answers[xs[:, 0]]

    t = np.array([[9, 1, 2], [9, 3, 4], [9, 5, 6], [9, 7, 8]])
    x = np.arange(4)[:, None]
    answers = t[:, 1:].copy()
    answers[1, 1] = 0  # one wrong character -> the whole answer is wrong
    model = Fixed(answers)
    assert exact_match(model, x, t, batch_size=3) == pytest.approx(0.75)
    assert model.calls == 2  # batched: two calls for four questions


def test_exact_match_agrees_with_eval_seq2seq(date_subset):
    """The batched evaluator and the book's one-question evaluator agree on every question."""
    x, t, x_test, t_test, c2i, i2c = date_subset
    model = small_model(len(c2i), seed=1)
    Trainer(model, Adam(lr=3e-3), seed=0).fit(x[:1024], t[:1024], max_epoch=1,
                                                batch_size=128, progress=False)
    xs, ts = x_test[:20], t_test[:20]
    one_by_one = [eval_seq2seq(model, xs[i:i + 1], ts[i:i + 1], i2c) for i in range(20)]
    assert exact_match(model, xs, ts) == pytest.approx(sum(one_by_one) / 20)


def test_eval_seq2seq_verbose_prints(capsys, date_subset):
    x, t, x_test, t_test, c2i, i2c = date_subset
    model = small_model(len(c2i))
    ok = eval_seq2seq(model, x_test[:1], t_test[:1], i2c, verbose=True)
    out = capsys.readouterr().out
    question = "".join(i2c[int(c)] for c in x_test[0])
    assert ok in (0, 1)
    assert "Q " + question in out
    assert "T " + "".join(i2c[int(c)] for c in t_test[0, 1:]) in out


class _RecordingModel:
    """A one-weight model whose loss is the mean of the batch's x, recording every batch."""

    def __init__(self):
        self.params, self.grads = [np.zeros(1)], [np.zeros(1)]
        self.batches = []

    def forward(self, x, t):
        self.batches.append((x.copy(), t.copy()))
        return float(x.mean())

    def backward(self):
        self.grads[0][...] = 0.0


@pytest.mark.parametrize("kw, err, msg", [
    (dict(eval_interval=0), ValueError, "^eval_interval must be >= 1"),  # ZeroDivisionError
    (dict(batch_size=2.5), TypeError, "^batch_size must be an int"),  # was taken as 2
    (dict(batch_size="4"), TypeError, "^batch_size must be an int"),
    (dict(max_epoch=1.5), TypeError, "^max_epoch must be an int"),  # was taken as 1
    (dict(max_epoch=-1), ValueError, "^max_epoch must be >= 0"),  # was no epoch
], ids=["interval-0", "batch-fraction", "batch-str", "epochs-fraction", "epochs-negative"])
def test_fit_checks_its_counts_naming_them_before_any_step(kw, err, msg):
    model = _RecordingModel()
    x = np.arange(8, dtype=np.float64)[:, None]
    args = dict(max_epoch=1, batch_size=4, progress=False, blas_threads=None) | kw
    with pytest.raises(err, match=msg):
        Trainer(model, SGD(lr=0.0), seed=0).fit(x, x, **args)
    assert model.batches == []


@pytest.mark.parametrize("batch_size, err", [(0, ValueError), (2.5, TypeError)])
def test_exact_match_checks_its_batch_size_naming_it(batch_size, err):
    """range() (step 0) and slicing (a float) raised errors that named nothing."""
    x, t = np.zeros((3, 2), np.int64), np.zeros((3, 3), np.int64)
    with pytest.raises(err, match="^batch_size must be"):
        exact_match(object(), x, t, batch_size=batch_size)


@pytest.mark.parametrize("seed", [0, None])
def test_trainer_reshuffles_every_epoch_and_keeps_x_with_t(seed):
    """Each epoch walks every row once, x beside its own t, in a new order each epoch."""
    n = 16
    x = np.arange(n, dtype=np.float64)[:, None]
    model = _RecordingModel()
    if seed is None:
        np.random.seed(0)
    Trainer(model, SGD(lr=0.0), seed=seed).fit(x, 10 * x, max_epoch=3, batch_size=4,
                                                 eval_interval=None, progress=False)
    orders = []
    for epoch in range(3):
        xs = np.concatenate([b[0] for b in model.batches[4 * epoch:4 * epoch + 4]])[:, 0]
        ts = np.concatenate([b[1] for b in model.batches[4 * epoch:4 * epoch + 4]])[:, 0]
        np.testing.assert_array_equal(ts, 10 * xs)
        np.testing.assert_array_equal(np.sort(xs), np.arange(n))
        orders.append(tuple(xs))
    assert len(set(orders)) == 3, orders  # 16! orders: a repeat is a shuffle that repeats


@pytest.mark.parametrize("seed", [3, None])
def test_trainer_shuffles_the_last_epochs_order_as_the_book(seed):
    """The book's fit shuffles x in place of x each epoch (x = x[permutation]), so epoch 2
    walks a shuffle of epoch 1's order: with the same random state the batches are the
    book's, also after the first epoch."""
    n, epochs = 12, 3
    x = np.arange(n, dtype=np.float64)[:, None]
    model = _RecordingModel()
    if seed is None:
        np.random.seed(5)
    Trainer(model, SGD(lr=0.0), seed=seed).fit(x, 10 * x, max_epoch=epochs, batch_size=4,
                                                 eval_interval=None, progress=False)
    if seed is None:
        np.random.seed(5)
        permutation = np.random.permutation
    else:
        permutation = np.random.default_rng(seed).permutation
    rows, want = x[:, 0], []
    for _ in range(epochs):  # the book's loop, written out
        rows = rows[permutation(n)]
        want.extend(rows)
    got = np.concatenate([b[0][:, 0] for b in model.batches])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("eval_interval", [4, 3])
def test_trainer_loss_list_is_the_book_running_mean_since_the_last_report(eval_interval):
    """The book's loss_list: at every eval_interval-th step of an epoch, the mean of the
    losses since the previous report, recomputed here from the recorded batches. Epochs of 5
    steps: with eval_interval 4 they end on a report (steps 0 and 4); with 3 (reports at
    steps 0 and 3) each epoch's step 4 counts toward the next epoch's first report, as the
    book's fit, which sets its running sum once, before the epochs."""
    x = np.random.default_rng(1).standard_normal((10, 1))
    model = _RecordingModel()
    tr = Trainer(model, SGD(lr=0.0), seed=2)
    tr.fit(x, x, max_epoch=3, batch_size=2, eval_interval=eval_interval, progress=False)
    losses = [float(b[0].mean()) for b in model.batches]
    want, window = [], []
    for i, loss in enumerate(losses):
        window.append(loss)
        if (i % 5) % eval_interval == 0:  # iters restarts at 0 each epoch of 5 steps
            want.append(sum(window) / len(window))
            window = []
    assert len(want) == 6  # two reports an epoch
    np.testing.assert_allclose(tr.loss_list, want, rtol=1e-12, atol=1e-15)


class _TiedModel:
    """loss = 0.5 mean((x W + x^2 W - t)^2) with W listed twice in params (tied weights): the
    grads are those of each use, so the gradient of W is their sum. ``transposed``: the second
    is W.T, a view (the book's tied embedding and affine), used as its transpose."""

    def __init__(self, W, transposed=False):
        self.transposed = transposed
        self.params = [W, W.T if transposed else W]
        self.grads = [np.zeros_like(p) for p in self.params]

    def _second(self):
        return self.params[1].T if self.transposed else self.params[1]

    def forward(self, x, t):
        self.x, self.r = x, x @ self.params[0] + (x * x) @ self._second() - t
        return float(0.5 * np.mean(np.sum(self.r ** 2, axis=1)))

    def backward(self):
        n = len(self.x)
        self.grads[0][...] = self.x.T @ self.r / n
        g = (self.x * self.x).T @ self.r / n
        self.grads[1][...] = g.T if self.transposed else g


def _tied_data():
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    return x, t, 0.1 * rng.standard_normal((3, 2))


@pytest.mark.parametrize("transposed", [False, True], ids=["same-array", "transposed-view"])
def test_trainer_updates_tied_weights_once_with_the_summed_gradient(transposed):
    """Adam on a weight listed twice: one update per step with the sum of both grads (the
    book's remove_duplicate), as Adam written out on the single weight gives it."""
    x, t, W0 = _tied_data()
    model = _TiedModel(W0.copy(), transposed)
    Trainer(model, Adam(lr=0.01), seed=0).fit(x, t, max_epoch=3, batch_size=8,
                                              eval_interval=None, progress=False)
    W, grads = W0.copy(), []
    for _ in range(3):  # the whole data is each step's batch: the order does not matter
        r = x @ W + (x * x) @ W - t
        grads.append((x.T @ r + (x * x).T @ r) / len(x))
        W = adam_reference(W0, grads, 0.01)
    np.testing.assert_allclose(model.params[0], W, rtol=1e-9, atol=1e-12)


def test_trainer_clips_the_summed_gradient_of_a_transposed_tie():
    """max_grad clips the gradient of the one tied weight (the sum of both uses), not the two
    uses' grads as if they were separate weights; SGD then takes one step with it."""
    x, t, W0 = _tied_data()
    model = _TiedModel(W0.copy(), transposed=True)
    max_grad, lr = 0.05, 0.1
    Trainer(model, SGD(lr=lr), seed=0).fit(x, t, max_epoch=2, batch_size=8, max_grad=max_grad,
                                           eval_interval=None, progress=False)
    W = W0.copy()
    for _ in range(2):
        r = x @ W + (x * x) @ W - t
        g = (x.T @ r + (x * x).T @ r) / len(x)
        norm = math.sqrt(float(np.sum(g * g)))
        assert norm > 2 * max_grad  # the clipping is in force
        W = W - lr * g * (max_grad / (norm + 1e-6))
    np.testing.assert_allclose(model.params[0], W, rtol=1e-12, atol=1e-15)


class _FixedGradModel:
    """Two weights whose gradients are the same fixed arrays at every step (joint norm 5)."""

    G = (np.array([3.0, 0.0]), np.array([0.0, 4.0, 0.0]))

    def __init__(self):
        self.params = [np.zeros(2), np.zeros(3)]
        self.grads = [np.zeros(2), np.zeros(3)]

    def forward(self, x, t):
        return 0.0

    def backward(self):
        for g, value in zip(self.grads, self.G, strict=True):
            g[...] = value


@pytest.mark.parametrize("max_grad", [1.0, None])
def test_fit_clips_the_joint_gradient_norm_before_each_update(max_grad):
    """fit(max_grad=m) scales each step's gradients, all of them together, to the joint norm
    m before the optimizer sees them, as the book's clip_grads does (rate m / (norm + 1e-6));
    without max_grad they reach it as they are. Two SGD steps of lr 0.5."""
    model = _FixedGradModel()
    x = np.zeros((4, 1))
    Trainer(model, SGD(lr=0.5), seed=0).fit(x, x, max_epoch=2, batch_size=4,
                                            max_grad=max_grad, eval_interval=None,
                                            progress=False)
    norm = math.sqrt(sum(float((g * g).sum()) for g in _FixedGradModel.G))
    rate = 1.0 if max_grad is None else min(1.0, max_grad / (norm + 1e-6))
    for p, g in zip(model.params, _FixedGradModel.G, strict=True):
        np.testing.assert_allclose(p, -2 * 0.5 * rate * g, rtol=1e-12, atol=0)


def test_history_holds_each_epochs_mean_loss_and_epochs_count_on_across_fits():
    """history: one entry per epoch with the mean of that epoch's step losses; a second fit
    goes on counting epochs from the first's (the book's current_epoch)."""
    x = np.random.default_rng(3).standard_normal((12, 1))
    model = _RecordingModel()
    tr = Trainer(model, SGD(lr=0.0), seed=4)
    tr.fit(x, x, max_epoch=2, batch_size=4, eval_interval=None, progress=False)
    tr.fit(x, x, max_epoch=1, batch_size=4, eval_interval=None, progress=False)
    assert [h["epoch"] for h in tr.history] == [1, 2, 3] and tr.current_epoch == 3
    losses = [float(b[0].mean()) for b in model.batches]  # 3 steps an epoch
    for epoch, h in enumerate(tr.history):
        want = sum(losses[3 * epoch:3 * epoch + 3]) / 3
        assert h["loss"] == pytest.approx(want, rel=1e-12, abs=1e-15), epoch


def test_train_seconds_sums_the_epochs_steps_without_the_callbacks(monkeypatch):
    """On a made-up clock that the model's steps move by 1 s and the callback by 100 s: each
    epoch's seconds are its steps' and train_seconds is their sum over the epochs and fits."""
    import types

    from fastattn import trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Ticking(_RecordingModel):
        def forward(self, x, t):
            clock[0] += 1.0
            return super().forward(x, t)

    def callback(tr, epoch):
        clock[0] += 100.0

    x = np.zeros((6, 1))
    tr = Trainer(Ticking(), SGD(lr=0.0), seed=0)
    tr.fit(x, x, max_epoch=2, batch_size=2, eval_interval=None, progress=False,
           callback=callback, blas_threads=None)
    tr.fit(x, x, max_epoch=1, batch_size=3, eval_interval=None, progress=False,
           callback=callback, blas_threads=None)
    assert [h["seconds"] for h in tr.history] == [3.0, 3.0, 2.0]
    assert tr.train_seconds == 8.0


def test_eval_seq2seq_prints_a_reversed_question_the_right_way_round(capsys):
    """is_reverse=True (the book's reversed inputs): the question is printed reversed back."""

    class Echo:
        def generate(self, question, start_id, sample_size):
            return [1] * sample_size

    i2c = {0: "a", 1: "b", 2: "c", 3: "_"}
    question, correct = np.array([[0, 1, 2]]), np.array([[3, 1, 1]])
    assert eval_seq2seq(Echo(), question, correct, i2c, verbose=True, is_reverse=True) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["Q cba", "T bb"]


def test_exact_match_starts_each_row_from_its_own_start_symbol():
    """Each row's answer starts from its own t[:, 0] (a task symbol, say), not row 0's."""

    class StartEcho:
        """Answers each row with its start id, repeated."""

        def generate_batch(self, xs, start_id, sample_size):
            start = np.broadcast_to(np.asarray(start_id), (len(xs),))
            return np.repeat(start[:, None], sample_size, axis=1)

    t = np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3]])
    assert exact_match(StartEcho(), np.zeros((3, 2), np.int64), t) == 1.0


class _SecondRank:
    """A Trainer ``comm`` as rank 1 of 2 sees it, recording every call: bcast gives rank 0's
    row order (here the rows reversed), shard this rank's half of a batch (the rows after
    the first half), allreduce_grads returns the global loss ``loss``."""

    rank, size = 1, 2

    def __init__(self, loss):
        self.loss, self.calls = loss, []

    def bcast(self, idx):
        self.calls.append(("bcast", len(idx)))
        return np.arange(len(idx))[::-1]

    def shard(self, *arrays):
        self.calls.append(("shard", len(arrays[0])))
        return tuple(a[len(a) // 2:] for a in arrays)

    def allreduce_grads(self, grads, loss=None, count=1):
        self.calls.append(("allreduce", count, grads[0] is self.grads))
        return self.loss

    def check_identical(self, params):
        self.calls.append(("check", [id(p) for p in params]))


def test_fit_with_comm_walks_rank_0s_order_trains_on_its_share_and_checks_each_epoch():
    """With ``comm``: each epoch's row order is rank 0's (bcast), each step trains on this
    rank's share of the global batch, allreduces the gradients with the share's row count
    and reports the global loss, and each epoch ends with a check that the weights are the
    same on every rank."""
    model = _RecordingModel()
    comm = _SecondRank(loss=0.25)
    comm.grads = model.grads[0]
    x = np.arange(8, dtype=np.float64)[:, None]
    tr = Trainer(model, SGD(lr=0.0), seed=0, comm=comm)
    tr.fit(x, 10 * x, max_epoch=2, batch_size=4, eval_interval=1, progress=False)
    step = [("shard", 4), ("allreduce", 2, True)]
    epoch = [("bcast", 8), *step, *step, ("check", [id(model.params[0])])]
    assert comm.calls == epoch + epoch
    # rows in rank 0's order 7, 6, ..., 0: batches [7 6 5 4] and [3 2 1 0], their second halves
    seen = [b[0][:, 0].tolist() for b in model.batches]
    assert seen == [[5.0, 4.0], [1.0, 0.0]] * 2
    assert all(np.array_equal(b[1], 10 * b[0]) for b in model.batches)
    assert tr.loss_list == [0.25] * 4 and [h["loss"] for h in tr.history] == [0.25, 0.25]


@pytest.mark.parametrize("seed, err", [("x", TypeError), (1.5, TypeError), (-1, ValueError)],
                         ids=["str", "float", "negative"])
def test_trainer_names_a_bad_seed(seed, err):
    """NumPy's own errors ('SeedSequence expects int or sequence of ints') named nothing."""
    model = TransformerSeq2seq(13, d_model=8, n_heads=2, n_layers=1, d_ff=8, max_len=6, seed=0)
    with pytest.raises(err, match="^seed must be"):
        Trainer(model, SGD(0.1), seed=seed)
    assert Trainer(model, SGD(0.1), seed=np.int64(3))._rng is not None
