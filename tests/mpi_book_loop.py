"""A book-style training loop on ``fastattn.distributed``'s helpers, run by
tests/test_distributed.py under ``mpiexec -n 2`` (and without mpiexec, as one process).

``python tests/mpi_book_loop.py OUT`` writes ``OUT/rank{R}.npz`` on every rank (a test's
doing: a real script writes on rank 0 only) with:

- ``grad_err_dist``, ``grad_err_single``: the distance of the first step's gradient, as the
  ranks' allreduce gives it and as one process computes it on the whole global batch, from a
  float64 computation on the whole batch (the same weights); ``loss_dist``, ``loss_single``,
  ``loss64``: the first step's loss the same three ways;
- ``w000``, ...: the weights after a few steps of Adam with gradient clipping;
- ``trainer_err_dist``, ``trainer_err_single``: the distance of the weights after a few
  steps of ``Trainer.fit`` (SGD, gradient clipping always active) from a float64 run, with
  ``comm`` (the ranks) and without (one process on the whole batch, on every rank);
- ``world_size``, ``rank``, ``checksum``, ``allreduce_calls``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from dataset import sequence
from fastattn import distributed as dist
from fastattn.optim import SGD, Adam, clip_grads
from fastattn.trainer import Trainer
from fastattn.transformer import TransformerSeq2seq

GLOBAL_BATCH = 7  # 4 + 3 rows on 2 ranks: unequal shares
STEPS = 6
SEED = 3


def build(dtype=np.float32):
    return TransformerSeq2seq(VOCAB, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=29,
                              dtype=dtype, seed=SEED)


def grad_norm_distance(grads, ref):
    return float(np.sqrt(sum(np.sum((g.astype(np.float64) - r) ** 2)
                             for g, r in zip(grads, ref, strict=True))))


(x_all, t_all), _ = sequence.load_data("date.txt")
VOCAB = len(sequence.get_vocab()[0])


def trainer_errors(x, t):
    """Trainer.fit with and without the ranks against float64: SGD, so that the weights move
    linearly with the gradients, and a max_grad below every gradient's norm, so that clipping
    acts at every step (on the global batch's gradient, as one process clips it)."""
    runs = {}
    for name, dtype, comm in (("64", np.float64, None), ("single", np.float32, None),
                              ("dist", np.float32, dist.active())):
        model = build(dtype)
        if dtype == np.float64:
            init = build()
            for p64, p in zip(model.params, init.params, strict=True):
                p64[...] = p
        trainer = Trainer(model, SGD(lr=0.5), seed=SEED, comm=comm)
        trainer.fit(x[:4 * GLOBAL_BATCH], t[:4 * GLOBAL_BATCH], max_epoch=1,
                    batch_size=GLOBAL_BATCH, max_grad=0.05, progress=False)
        runs[name] = [p.astype(np.float64) for p in model.params]
    return {f"trainer_err_{k}": grad_norm_distance(runs[k], runs["64"])
            for k in ("single", "dist")}


def main(out):
    x, t = x_all[:GLOBAL_BATCH * STEPS], t_all[:GLOBAL_BATCH * STEPS]
    bx, bt = x[:GLOBAL_BATCH], t[:GLOBAL_BATCH]

    # the first step's gradient: float64 on the whole batch, float32 on the whole batch, and
    # float32 by the ranks (every rank computes the first two, the same)
    model64 = build(np.float64)
    single = build()
    for p64, p in zip(model64.params, single.params, strict=True):
        p64[...] = p
    loss64 = model64.forward(bx, bt)
    model64.backward()
    ref = [g.copy() for g in model64.grads]
    loss_single = single.forward(bx, bt)
    single.backward()

    model = build()
    xb, tb = dist.shard(bx, bt)
    loss = model.forward(xb, tb)
    model.backward()
    loss_dist = dist.allreduce_grads(model.grads, loss, count=len(xb))
    result = {
        "grad_err_dist": grad_norm_distance(model.grads, ref),
        "grad_err_single": grad_norm_distance(single.grads, ref),
        "grad_norm": grad_norm_distance([np.zeros_like(g) for g in ref], ref),
        "loss_dist": loss_dist, "loss_single": float(loss_single), "loss64": float(loss64),
    }

    # a few steps of a book-style loop: shard, forward, backward, allreduce, clip, update
    model = build()
    optimizer = Adam(lr=1e-2)
    for i in range(STEPS):
        batch_x = x[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        batch_t = t[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        xb, tb = dist.shard(batch_x, batch_t)
        loss = model.forward(xb, tb)
        model.backward()
        dist.allreduce_grads(model.grads, loss, count=len(xb))
        clip_grads(model.grads, 0.5)  # the global gradient: the same clipping on every rank
        optimizer.update(model.params, model.grads)
    result["checksum"] = dist.check_identical(model.params)
    result.update(trainer_errors(x, t))
    result["world_size"] = dist.world_size()
    result["rank"] = dist.rank()
    result["allreduce_calls"] = dist.init().allreduce_calls if dist.launched() else 0
    for i, p in enumerate(model.params):
        result[f"w{i:03d}"] = p
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"rank{dist.rank()}.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])
