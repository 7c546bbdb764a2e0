"""One training step of the default ``fastattn train`` model, against the same model in PyTorch.

A step is forward (teacher forcing, mean cross-entropy), backward and an Adam update, on a
batch of the date task (the default batch size of ``fastattn train``). The PyTorch model below
is the same architecture, written for this comparison: pre-LN encoder and decoder blocks, the
same position table, ReLU feed-forward, ``scaled_dot_product_attention``. Before timing, it is
loaded with fastattn's weights and must give the same loss (float32, rtol 1e-4).

Group ``train step``: the fastattn model on the numba and vectorized backends, with the thread
setting of ``fastattn train`` (``--threads`` for BLAS, all cores by default, and
``--numba-threads``, one by default), and
PyTorch (when installed) with ``torch.set_num_threads(os.cpu_count())``. The fastattn numba
test also times PyTorch, with as many threads as cores and with one thread, each in a fresh
process of its own (PyTorch's OpenMP pool and the Numba/BLAS pools slow each other down when
they share a process on 2 cores), and puts the medians and the ratios into ``extra_info``
(``torch_over_fastattn`` > 1 means fastattn is faster per step).

Run::

    python -m pytest bench/bench_train_step.py                      # timings
    python -m pytest bench/bench_train_step.py --benchmark-disable  # as plain tests
    python bench/bench_train_step.py                                # ratios, in turns
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from fastattn.commands.train import TrainSettings, build_model, limit_threads, load_task
from fastattn.optim import Adam
from fastattn.transformer import TransformerConfig as MODEL

GROUP = (f"train step (date task, batch {TrainSettings.batch_size}, d_model {MODEL.d_model}, "
         f"{MODEL.n_heads} heads, {MODEL.n_layers}+{MODEL.n_layers} layers, "
         f"d_ff {MODEL.d_ff}, float32)")
LOSS_RTOL = 1e-4  # fastattn float32 loss vs PyTorch float32 loss with the same weights


def _batch():
    task = load_task("date.txt")
    B = TrainSettings.batch_size
    return task, task.x_train[:B], task.t_train[:B]


def fastattn_step(backend):
    """(step function, model) for the default model on ``backend``; the step returns the loss."""
    task, xs, ts = _batch()
    model = build_model(task, backend=backend, seed=0)
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
    """Load fastattn's weights into the PyTorch model (Linear weights are transposed)."""
    import torch

    def put(param, arr, transpose=False):
        a = np.asarray(arr).T if transpose else np.asarray(arr)
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(a)))

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


def torch_step(threads=None):
    """Step function of the same model in PyTorch, with fastattn's initial weights, on
    ``threads`` threads (default: one per core); raises AssertionError when the two models'
    losses differ."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    _, xs, ts = _batch()
    model = fastattn_step("vectorized")[1]
    c = model.config
    tm = _torch_model_class()(c.vocab_size, c.d_model, c.n_heads, c.n_layers, c.d_ff, c.max_len)
    _copy_weights(model, tm)
    txs, tts = torch.from_numpy(xs), torch.from_numpy(ts)
    ours = model.forward(xs, ts)
    with torch.no_grad():
        theirs = float(tm(txs, tts))
    np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
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


def _blocked_ms(fns, reps, rounds=3):
    """Median ms per call of each function, timed in blocks of ``reps`` calls, the functions
    taking turns for ``rounds`` rounds (a function's ``setup()``, if any, runs before each of
    its blocks)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            getattr(fn, "setup", lambda: None)()
            fn()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def torch_ms_in_subprocess(threads, reps):
    """Median ms of PyTorch's step on ``threads`` threads, timed in a fresh interpreter.

    In the same process as the Numba kernels, PyTorch's OpenMP threads and the other thread
    pools spin against each other on a 2-core machine, which can slow PyTorch down many
    times; a process of its own gives PyTorch its best conditions.
    """
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch", str(threads),
                          str(reps)], capture_output=True, text=True, timeout=600, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("backend", ["numba", "vectorized"])
def test_train_step_fastattn(benchmark, backend):
    with limit_threads(TrainSettings.threads, TrainSettings.numba_threads):
        step, model = fastattn_step(backend)
        first = step()  # compiles the kernels; not timed
        assert np.isfinite(first)
        benchmark.group = GROUP
        benchmark.extra_info["backend"] = backend
        benchmark.extra_info["blas_threads"] = TrainSettings.threads or os.cpu_count()
        benchmark.extra_info["numba_threads"] = TrainSettings.numba_threads
        benchmark.extra_info["n_params"] = int(sum(p.size for p in model.params))
        if backend == "numba" and _have_torch():
            reps = 1 if benchmark.disabled else 10
            ours, = _blocked_ms([step], reps)
            theirs = torch_ms_in_subprocess(os.cpu_count() or 1, 3 * reps)
            theirs1 = torch_ms_in_subprocess(1, 3 * reps)
            benchmark.extra_info["fastattn_ms"] = round(ours, 3)
            benchmark.extra_info["torch_ms"] = round(theirs, 3)
            benchmark.extra_info["torch_1thread_ms"] = round(theirs1, 3)
            benchmark.extra_info["torch_over_fastattn"] = round(theirs / ours, 3)
            benchmark.extra_info["torch_1thread_over_fastattn"] = round(theirs1 / ours, 3)
        benchmark(step)


def test_train_step_torch(benchmark):
    pytest.importorskip("torch")
    step = torch_step()
    step.setup()
    step()
    benchmark.group = GROUP
    benchmark.extra_info["backend"] = "torch"
    benchmark.extra_info["threads"] = os.cpu_count()
    benchmark(step)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--torch":  # the subprocess of torch_ms_in_subprocess
        step = torch_step(int(sys.argv[2]))
        print(_blocked_ms([step], int(sys.argv[3]), rounds=1)[0])
        return
    reps = int(os.environ.get("FASTATTN_BENCH_REPS", "15"))
    with limit_threads(TrainSettings.threads, TrainSettings.numba_threads):
        fns, names = [], []
        for backend in ("numba", "vectorized"):
            fns.append(fastattn_step(backend)[0])
            names.append(f"fastattn {backend} (train's threads)")
        ms = _blocked_ms(fns, reps)
    if _have_torch():
        for threads in (os.cpu_count() or 1, 1):
            ms.append(torch_ms_in_subprocess(threads, 3 * reps))
            names.append(f"torch ({threads} thread{'s' if threads > 1 else ''}, own process)")
    print(GROUP)
    for name, m in zip(names, ms, strict=True):
        print(f"  {name:36s} {m:8.2f} ms/step   {m / ms[0]:5.2f}x fastattn numba")


if __name__ == "__main__":
    main()
