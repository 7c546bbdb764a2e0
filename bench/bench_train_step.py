"""One training step of the default ``fastattn train`` model, against the same model in PyTorch.

A step is forward (teacher forcing, mean cross-entropy), backward and an Adam update, on a
batch of the date task (the default batch size of ``fastattn train``). The PyTorch model below
is the same architecture, written for this comparison: pre-LN encoder and decoder blocks, the
same position table, ReLU feed-forward, ``scaled_dot_product_attention``.

Before anything is timed (``check_then_time`` of ``bench/conftest.py``), the loss and every
parameter gradient of the timed step's first call are checked against the other fastattn
backend in float64 with the same weights, and against PyTorch's float64 model with the same
weights when PyTorch is installed, each to ``helpers.K_FLOAT32`` times the float32 error level
of that reference (``helpers.assert_all_within_float32_error``).

Group ``train step``: the fastattn model on the numba and vectorized backends, with the thread
setting of ``fastattn train`` (``--threads`` for BLAS, ``auto`` by default, and
``--numba-threads``, Numba's own count by default), the numba backend with the library's own
thread counts (``numba_library_threads``: Numba's and BLAS's defaults, as a Python user who
builds the model gets them), and PyTorch (when installed) with
``torch.set_num_threads(os.cpu_count())``. PyTorch's OpenMP pool and the Numba/BLAS pools slow
each other down when they share a process on 2 cores: for a fair ratio, time the contenders in
processes of their own (``fastattn bench train_step --apart N``).

Group ``greedy decoding``: ``generate_batch`` answering 2,000 test questions (as ``fastattn
train`` scores the test split) with the default model, on each backend. Before it is timed,
each answer is checked to be greedy: at every step, the chosen id's score in a float64
recomputation of the whole decoder on the answer's prefix is the largest, to within
``helpers.K_FLOAT32`` times that score row's float32 error.

Group ``one question at a time``: 100 calls of ``generate_batch`` with one test question each
(``translate`` of a single question, ``fastattn translate`` with one argument), checked the
same way. Here the Python around each decoding step's small kernels is most of the time.

Group ``Trainer.fit next to a busy core``: ``Trainer.fit`` with the library's defaults
(Numba's and BLAS's own thread counts) for one epoch of ``FIT_STEPS`` steps of the default
model, on a quiet machine and with another process spinning (it keeps about one core busy),
with ``fit``'s default ``blas_threads="auto"`` and with the count fixed (``None``). Before
it is timed, each fit is checked to run as configured: every step counted on a BLAS count
(one per step with ``auto``), the spinning process alive from the first step to the last,
and the loss falling. Compare a busy row's time with the quiet row's of the same setting.

Run::

    python -m pytest bench/bench_train_step.py -k fastattn --benchmark-only   # timings
    python -m pytest bench/bench_train_step.py -k torch --benchmark-only
    python -m pytest bench/bench_train_step.py --benchmark-disable  # as plain tests
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from helpers import K_FLOAT32, assert_all_within_float32_error, blas_thread_count

from fastattn.commands.train import (
    TrainSettings,
    build_model,
    limit_threads,
    load_task,
    start_threads,
)
from fastattn.optim import Adam
from fastattn.trainer import Trainer
from fastattn.transformer import TransformerConfig as MODEL

GROUP = (f"train step (date task, batch {TrainSettings.batch_size}, d_model {MODEL.d_model}, "
         f"{MODEL.n_heads} heads, {MODEL.n_layers}+{MODEL.n_layers} layers, "
         f"d_ff {MODEL.d_ff}, float32)")
OTHER = {"numba": "vectorized", "vectorized": "numba"}


def _batch():
    task = load_task("date.txt")
    B = TrainSettings.batch_size
    return task, task.x_train[:B], task.t_train[:B]


def _model(backend, dtype="float32"):
    """The default model on ``backend``; in float64, with the float32 model's weights (and its
    sinusoid tables)."""
    task, _, _ = _batch()
    model = build_model(task, backend=backend, seed=0)
    if dtype != "float32":
        weights, model = model, build_model(task, backend=backend, seed=0, dtype=dtype)
        for p, w in zip(model.params, weights.params, strict=True):
            p[...] = w
        for pe, w in ((model.src_pos, weights.src_pos), (model.tgt_pos, weights.tgt_pos)):
            if pe.fixed is not None:
                pe.fixed[...] = w.fixed
    return model


def _loss_and_grads(model):
    """[loss, grads...] of one forward and backward on the benchmark's batch, in float64."""
    _, xs, ts = _batch()
    loss = model.forward(xs, ts)
    model.backward()
    return [np.float64(loss)] + [g.astype(np.float64) for g in model.grads]


def check_step(backend, got, names):
    """``got``: [loss, grads...] of the default model's first step on ``backend`` (float32),
    against the other backend in float64 and, when installed, PyTorch in float64, all from the
    same initial weights; returns the names of the references checked against."""
    other = OTHER[backend]
    ref64, ref32 = _loss_and_grads(_model(other, "float64")), _loss_and_grads(_model(other))
    assert_all_within_float32_error(got, ref64, ref32, names, err_msg=f"{backend} vs {other}:")
    if not _have_torch():
        return [other]
    fresh = _model(other)
    t64, t32 = _torch_loss_and_grads(fresh, "float64"), _torch_loss_and_grads(fresh, "float32")
    assert_all_within_float32_error(got, t64, t32, names, err_msg=f"{backend} vs PyTorch:")
    return [other, "torch"]


def fastattn_step(backend):
    """(step function, model) for the default model on ``backend``; the step returns the loss."""
    _, xs, ts = _batch()
    model = _model(backend)
    opt = Adam(lr=TrainSettings.lr)

    def step():
        loss = model.forward(xs, ts)
        model.backward()
        opt.update(model.params, model.grads)
        return loss

    return step, model


# --------------------------------------------------------------------------- PyTorch


def _torch_model_class():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class MHA(nn.Module):
        def __init__(self, C, H, causal=False):
            super().__init__()
            self.C, self.H, self.causal = C, H, causal
            self.inp = nn.Linear(C, 3 * C)
            self.out = nn.Linear(C, C)

        def forward(self, xq, xkv=None):
            B, Tq, C = xq.shape
            H, dh = self.H, C // self.H
            if xkv is None:
                q, k, v = self.inp(xq).split(C, dim=2)
            else:
                W, b = self.inp.weight, self.inp.bias
                q = F.linear(xq, W[:C], b[:C])
                k, v = F.linear(xkv, W[C:], b[C:]).split(C, dim=2)
            Tk = k.shape[1]
            q = q.view(B, Tq, H, dh).transpose(1, 2)  # (B, H, Tq, dh)
            k = k.view(B, Tk, H, dh).transpose(1, 2)
            v = v.view(B, Tk, H, dh).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            return self.out(o.transpose(1, 2).reshape(B, Tq, C))

    def ffn(C, Fd):
        return nn.Sequential(nn.Linear(C, Fd), nn.ReLU(), nn.Linear(Fd, C))

    class Enc(nn.Module):
        def __init__(self, C, H, Fd):
            super().__init__()
            self.ln1, self.attn = nn.LayerNorm(C), MHA(C, H)
            self.ln2, self.ffn = nn.LayerNorm(C), ffn(C, Fd)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.ffn(self.ln2(x))

    class Dec(nn.Module):
        def __init__(self, C, H, Fd):
            super().__init__()
            self.ln1, self.self_attn = nn.LayerNorm(C), MHA(C, H, causal=True)
            self.ln2, self.cross_attn = nn.LayerNorm(C), MHA(C, H)
            self.ln3, self.ffn = nn.LayerNorm(C), ffn(C, Fd)

        def forward(self, x, mem):
            x = x + self.self_attn(self.ln1(x))
            x = x + self.cross_attn(self.ln2(x), mem)
            return x + self.ffn(self.ln3(x))

    class Seq2seq(nn.Module):
        """The architecture of fastattn's TransformerSeq2seq."""

        def __init__(self, V, C, H, L, Fd, max_len):
            super().__init__()
            self.src_emb, self.tgt_emb = nn.Embedding(V, C), nn.Embedding(V, C)
            self.src_pos = nn.Parameter(torch.zeros(max_len, C))
            self.tgt_pos = nn.Parameter(torch.zeros(max_len, C))
            self.enc = nn.ModuleList(Enc(C, H, Fd) for _ in range(L))
            self.enc_ln = nn.LayerNorm(C)
            self.dec = nn.ModuleList(Dec(C, H, Fd) for _ in range(L))
            self.dec_ln = nn.LayerNorm(C)
            self.out = nn.Linear(C, V)

        def forward(self, xs, ts):
            h = self.src_emb(xs) + self.src_pos[: xs.shape[1]]
            for block in self.enc:
                h = block(h)
            mem = self.enc_ln(h)
            yin, target = ts[:, :-1], ts[:, 1:]
            h = self.tgt_emb(yin) + self.tgt_pos[: yin.shape[1]]
            for block in self.dec:
                h = block(h, mem)
            logits = self.out(self.dec_ln(h))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    return Seq2seq


def _copy_weights(model, tm):
    """Load fastattn's weights into the PyTorch model (Linear weights are transposed); returns
    [(fastattn param, torch param, transposed)] for every parameter the two share."""
    import torch

    pairs = []

    def put(param, arr, transpose=False):
        a = np.asarray(arr).T if transpose else np.asarray(arr)
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(param.dtype))
        pairs.append((arr, param, transpose))

    def mha(t, f):
        W_in, b_in, W_out, b_out = f.params
        put(t.inp.weight, W_in, True)
        put(t.inp.bias, b_in)
        put(t.out.weight, W_out, True)
        put(t.out.bias, b_out)

    def ln(t, f):
        put(t.weight, f.params[0])
        put(t.bias, f.params[1])

    def ffn(t, f):
        W1, b1, W2, b2 = f.params
        put(t[0].weight, W1, True)
        put(t[0].bias, b1)
        put(t[2].weight, W2, True)
        put(t[2].bias, b2)

    put(tm.src_emb.weight, model.src_embed.params[0])
    put(tm.tgt_emb.weight, model.tgt_embed.params[0])
    # the whole position table (fixed sinusoids plus learned part, if any): a constant added
    # to a parameter changes neither its gradient nor its Adam updates
    put(tm.src_pos, model.src_pos.table(model.src_pos.max_len))
    put(tm.tgt_pos, model.tgt_pos.table(model.tgt_pos.max_len))
    # the learned part of each position table takes the gradient of the whole table
    pairs[-2:] = [(pe.params[0], t, False) for pe, t in
                  ((model.src_pos, tm.src_pos), (model.tgt_pos, tm.tgt_pos)) if pe.params]
    for t, f in zip(tm.enc, model.encoder, strict=True):
        ln(t.ln1, f.ln1)
        mha(t.attn, f.attn)
        ln(t.ln2, f.ln2)
        ffn(t.ffn, f.ffn)
    ln(tm.enc_ln, model.enc_ln)
    for t, f in zip(tm.dec, model.decoder, strict=True):
        ln(t.ln1, f.ln1)
        mha(t.self_attn, f.self_attn)
        ln(t.ln2, f.ln2)
        mha(t.cross_attn, f.cross_attn)
        ln(t.ln3, f.ln3)
        ffn(t.ffn, f.ffn)
    ln(tm.dec_ln, model.dec_ln)
    put(tm.out.weight, model.out.params[0], True)
    put(tm.out.bias, model.out.params[1])
    return pairs


def _torch_loss_and_grads(model, dtype):
    """[loss, grads...] of the PyTorch model in ``dtype`` with ``model``'s weights, the grads
    in the order of model.params (summed over a param's uses), as float64 arrays."""
    import torch

    _, xs, ts = _batch()
    c = model.config
    tm = _torch_model_class()(c.vocab_size, c.d_model, c.n_heads, c.n_layers, c.d_ff,
                              c.max_len).to(getattr(torch, dtype))
    pairs = _copy_weights(model, tm)
    loss = tm(torch.from_numpy(xs), torch.from_numpy(ts))
    loss.backward()
    grads = {id(p): np.zeros(p.shape) for p in model.params}
    for arr, param, transpose in pairs:
        g = param.grad.double().numpy()
        grads[id(arr)] += g.T if transpose else g
    assert {id(p) for p in model.params} == {id(a) for a, _, _ in pairs}, \
        "every fastattn parameter has its PyTorch twin"
    return [np.float64(loss.item())] + [grads[id(p)] for p in model.params]


def torch_step(threads=None):
    """Step function of the same model in PyTorch, with fastattn's initial weights, on
    ``threads`` threads (default: one per core). (``check_step`` compares the two models'
    losses and gradients.)"""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    _, xs, ts = _batch()
    model = fastattn_step("vectorized")[1]
    c = model.config
    tm = _torch_model_class()(c.vocab_size, c.d_model, c.n_heads, c.n_layers, c.d_ff, c.max_len)
    _copy_weights(model, tm)
    txs, tts = torch.from_numpy(xs), torch.from_numpy(ts)
    opt = torch.optim.Adam(tm.parameters(), lr=TrainSettings.lr)

    n_threads = torch.get_num_threads()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = tm(txs, tts)
        loss.backward()
        opt.step()
        return loss.item()

    # PyTorch's thread count is global: set it before a block of this step's calls (setting
    # it on every call would rebuild the thread pool each time)
    step.setup = lambda: torch.set_num_threads(n_threads)
    return step


def _have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("backend, threads", [
    ("numba", "train"), ("vectorized", "train"), ("numba", "library")],
    ids=["numba", "vectorized", "numba_library_threads"])
def test_train_step_fastattn(benchmark, check_then_time, backend, threads):
    """``threads``: "train", ``fastattn train``'s thread setting; "library", the library's
    own (Numba's and BLAS's defaults), as a Python user who builds the model gets them."""
    library = threads == "library"
    with (contextlib.nullcontext() if library else
          limit_threads(start_threads(TrainSettings.threads), TrainSettings.numba_threads)):
        step, model = fastattn_step(backend)
        names = ["loss"] + [f"grads[{i}] {p.shape}" for i, p in enumerate(model.params)]

        def check(loss):  # the first step's grads, taken at the initial weights
            got = [np.float64(loss)] + [g.astype(np.float64) for g in model.grads]
            benchmark.extra_info["checked_against"] = check_step(backend, got, names)

        benchmark.group = GROUP
        benchmark.extra_info["backend"] = backend
        # the thread setting that is timed is the one named: Numba's own count, or train's
        asked = TrainSettings.numba_threads
        assert numba.get_num_threads() == (
            numba.config.NUMBA_NUM_THREADS if library or not asked else asked), threads
        benchmark.extra_info["threads"] = threads
        benchmark.extra_info["blas_threads"] = blas_thread_count()
        benchmark.extra_info["numba_threads"] = numba.get_num_threads()
        benchmark.extra_info["n_params"] = int(sum(p.size for p in model.params))
        check_then_time(step, check=check, warmup=0)


def test_train_step_torch(benchmark, check_then_time):
    pytest.importorskip("torch")
    step = torch_step()
    step.setup()
    fresh = _model("vectorized")
    ref64, ref32 = (_torch_loss_and_grads(fresh, d)[0] for d in ("float64", "float32"))

    def check(loss):  # PyTorch's own first loss, to its float32 error level
        assert_all_within_float32_error([np.float32(loss)], [ref64], [ref32], ["loss"],
                                        err_msg="torch")

    benchmark.group = GROUP
    benchmark.extra_info["backend"] = "torch"
    benchmark.extra_info["threads"] = os.cpu_count()
    check_then_time(step, check=check, warmup=0)


# --------------------------------------------------------------------------- greedy decoding


def check_greedy(ids, xs, start, model):
    """Each id of ``ids`` (N, L) is the argmax of ``model``'s (the default model's) next-id
    scores after the ids before it, recomputed by the whole decoder in float64 from the same
    weights (and by ``model`` itself, for the float32 error level), to within K_FLOAT32 times
    that float32 error."""
    backend = model.backend
    m64, m32 = _model(backend, "float64"), model
    ys = np.concatenate([np.broadcast_to(start, (len(xs), 1)), ids[:, :-1]], axis=1)
    s64 = m64._decode(ys, m64.encode(xs))  # (N, L, V)
    s32 = m32._decode(ys, m32.encode(xs)).astype(np.float64)
    chosen = np.take_along_axis(s64, ids[:, :, None], axis=2)[:, :, 0]
    gap = s64.max(axis=2) - chosen  # 0 where the chosen id has the largest score
    level = np.abs(s32 - s64).max(axis=2) + np.finfo(np.float32).eps * np.abs(s64).max(axis=2)
    worst = np.unravel_index(np.argmax(gap - K_FLOAT32 * level), gap.shape)
    assert np.all(gap <= K_FLOAT32 * level), (
        f"{backend}: question {worst[0]}, step {worst[1]}: the chosen id scores {gap[worst]:.3g} "
        f"below the best, more than {K_FLOAT32} x the float32 error {level[worst]:.3g}")


@pytest.mark.parametrize("backend", ["numba", "vectorized"])
@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["batch", "one_at_a_time"])
def test_generate_batch_fastattn(benchmark, check_then_time, backend, one_at_a_time):
    task, _, _ = _batch()
    xs = task.x_test[:100 if one_at_a_time else 2000]
    start, L = task.t_test[0, 0], task.t_test.shape[1] - 1
    model = _model(backend)
    benchmark.group = (f"one question at a time ({len(xs)} calls, {L} ids each, default model)"
                       if one_at_a_time else
                       f"greedy decoding ({len(xs)} questions, {L} ids each, default model)")
    benchmark.extra_info["backend"] = backend

    def decode():
        if not one_at_a_time:
            return model.generate_batch(xs, start, L)
        return np.concatenate([model.generate_batch(xs[i:i + 1], start, L)
                               for i in range(len(xs))])

    check_then_time(decode, check=lambda ids: check_greedy(ids, xs, start, model),
                    work={"kquestions/s": len(xs) * 1e6})


# --------------------------------------------------------------------------- next to a busy core

FIT_STEPS = 48


@pytest.fixture(params=[False, True], ids=["quiet", "busy_core"])
def spinner(request):
    """None, or another process spinning for the test's duration (about one core kept busy)."""
    if not request.param:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("blas_threads", ["auto", None], ids=["auto", "fixed"])
def test_fit_next_to_a_busy_core(benchmark, check_then_time, spinner, blas_threads):
    task, _, _ = _batch()
    n = FIT_STEPS * TrainSettings.batch_size
    x, t = task.x_train[:n], task.t_train[:n]
    model = _model("numba")
    trainer = Trainer(model, Adam(lr=TrainSettings.lr), seed=TrainSettings.seed)
    seen = {}

    def fit():
        seen["spinning"] = spinner is None or spinner.poll() is None
        trainer.fit(x, t, max_epoch=1, batch_size=TrainSettings.batch_size, eval_interval=1,
                    progress=False, blas_threads=blas_threads)
        seen["spinning"] &= spinner is None or spinner.poll() is None
        return trainer

    def check(trainer):
        assert seen["spinning"], "the spinning process ended before the fit did"
        counts = trainer.blas_counts
        assert len(counts) == (FIT_STEPS if blas_threads == "auto" else 0), counts
        losses = trainer.loss_list[-FIT_STEPS:]
        assert len(losses) == FIT_STEPS and np.all(np.isfinite(losses))
        assert np.mean(losses[-8:]) < np.mean(losses[:8]), "the loss did not fall"
        benchmark.extra_info["one_thread_steps"] = int(sum(c == 1 for c in counts))

    benchmark.group = (f"Trainer.fit next to a busy core ({FIT_STEPS} steps of the default "
                       f"model, library's thread defaults)")
    benchmark.extra_info["blas_threads"] = blas_threads
    benchmark.extra_info["load"] = "quiet" if spinner is None else "one core busy"
    check_then_time(fit, check=check, rounds=3, work={"steps/s": FIT_STEPS * 1e9})
