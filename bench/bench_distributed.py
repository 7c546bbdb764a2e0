"""The cost of the allreduce: a training step of the default model on 2 ranks x 1 thread
against 1 rank x 2 threads.

A step is what ``fastattn train`` does (forward, backward, one allreduce of one flat buffer of
all gradients, gradient clipping, an Adam update) on a global batch of the date task of
``fastattn train``'s default size. Each configuration runs in fresh processes:

- ``2 ranks x 1 thread``: ``mpiexec -n 2``, each rank with 1 BLAS thread and 1 Numba thread,
  half the batch each;
- ``1 rank x 2 threads``: one process, BLAS on 2 threads, Numba on 1 (``fastattn train``'s
  default on 2 cores), the whole batch.

Per step it reports (medians over the timed steps): the step time, the time in the allreduce
(the call, waiting for the slower rank included) and its share of the step, and the time of a
bare allreduce of the same buffer after a barrier (the transfer alone). Before timing, every
rank checks that the allreduced loss of the first batch equals one process's loss on the whole
batch (float32, rtol 1e-5), so that what is timed is the data-parallel step.

Run::

    python bench/bench_distributed.py              # both configurations, a table and JSON
    python bench/bench_distributed.py --steps 200  # more timed steps
    python -m pytest bench/bench_distributed.py --benchmark-disable   # a quick check (CI)

The same numbers for a whole training run are in ``metrics.json`` (``allreduce_ms_per_step``,
``allreduce_share``): ``mpiexec -n 2 fastattn train --threads 1`` against
``fastattn train --threads 2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

LOSS_RTOL = 1e-5  # the allreduced loss of the ranks vs one process's loss on the whole batch


def _worker(steps: int, warmup: int, threads: int, batch: int) -> dict:
    from fastattn import distributed as dist
    from fastattn.commands.train import TrainSettings, build_model, limit_threads, load_task
    from fastattn.optim import Adam, clip_grads

    task = load_task("date.txt")
    x, t = task.x_train, task.t_train
    comm = dist.active()
    with limit_threads(threads, 1):
        model = build_model(task, seed=0)  # the default model
        # the reference: one process's loss on the whole first batch, the same weights
        full_loss = model.forward(x[:batch], t[:batch])
        opt = Adam(lr=TrainSettings.lr)
        step_s, comm_s, bare_s = [], [], []
        n_steps = len(x) // batch
        for i in range(warmup + steps):
            j = i % n_steps
            bx, bt = x[j * batch:(j + 1) * batch], t[j * batch:(j + 1) * batch]
            if comm is not None:
                comm.sum(0)  # start the step together: the step time is the ranks' time
            t0 = time.perf_counter()
            c0 = comm.allreduce_seconds if comm is not None else 0.0
            xb, tb = dist.shard(bx, bt)
            loss = model.forward(xb, tb)
            model.backward()
            if comm is not None:
                loss = comm.allreduce_grads(model.grads, loss, count=len(xb))
            if i == 0 and abs(loss - full_loss) > LOSS_RTOL * abs(full_loss):
                raise AssertionError(f"the ranks' loss {loss} is not one process's {full_loss}")
            clip_grads(model.grads, TrainSettings.max_grad)
            opt.update(model.params, model.grads)
            if i >= warmup:
                step_s.append(time.perf_counter() - t0)
                comm_s.append((comm.allreduce_seconds - c0) if comm is not None else 0.0)
        if comm is not None:  # the transfer alone: the same buffer, the ranks already together
            buf = comm._buffer.copy()
            for _ in range(steps):
                comm._comm.Barrier()
                t0 = time.perf_counter()
                comm._comm.Allreduce(comm._MPI.IN_PLACE, buf, op=comm._MPI.SUM)
                bare_s.append(time.perf_counter() - t0)
    n_params = int(sum(p.size for p in model.params))
    step_ms = 1000 * statistics.median(step_s)
    allreduce_ms = 1000 * statistics.median(comm_s)
    return {"ranks": 1 if comm is None else comm.size, "threads": threads, "batch": batch,
            "steps": steps, "n_params": n_params, "bytes_per_allreduce": (n_params + 2) * 4,
            "step_ms": step_ms, "allreduce_ms": allreduce_ms,
            "allreduce_share": allreduce_ms / step_ms,
            "bare_allreduce_ms": 1000 * statistics.median(bare_s) if bare_s else 0.0}


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def _launch(cmd, timeout=1800) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def measure(steps: int = 50, warmup: int = 5, batch: int | None = None) -> list[dict]:
    """Both configurations, each in fresh processes: [2 ranks x 1 thread, 1 rank x 2 threads]."""
    from fastattn.commands.train import TrainSettings

    batch = batch or TrainSettings.batch_size
    mpiexec = _mpiexec()
    if mpiexec is None:
        raise RuntimeError("no mpiexec: pip install 'fastattn[mpi]'")
    worker = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(steps),
              "--warmup", str(warmup), "--batch", str(batch)]
    return [_launch([mpiexec, "-n", "2", *worker, "--threads", "1"]),
            _launch([*worker, "--threads", "2"])]


def table(results) -> str:
    rows = ["| configuration | ms/step | allreduce ms/step | allreduce share | bare allreduce ms |",
            "|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['ranks']} rank(s) x {r['threads']} thread(s) | {r['step_ms']:.2f} | "
                    f"{r['allreduce_ms']:.3f} | {100 * r['allreduce_share']:.1f}% | "
                    f"{r['bare_allreduce_ms']:.3f} |")
    return "\n".join(rows)


@pytest.mark.skipif(_mpiexec() is None or importlib.util.find_spec("mpi4py") is None,
                    reason="needs mpi4py and mpiexec (pip install 'fastattn[mpi]')")
def test_distributed_step_measures_both_configurations():
    """A quick run of both configurations (3 timed steps): the numbers are there and sane."""
    two, one = measure(steps=3, warmup=1)
    assert (two["ranks"], two["threads"], one["ranks"], one["threads"]) == (2, 1, 1, 2)
    assert two["bytes_per_allreduce"] == 4 * (two["n_params"] + 2)
    assert 0 < two["allreduce_ms"] < two["step_ms"] and two["bare_allreduce_ms"] > 0
    assert one["allreduce_ms"] == 0
    assert "2 rank(s) x 1 thread(s)" in table([two, one])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: train's)")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from fastattn import distributed as dist
        from fastattn.commands.train import TrainSettings

        def work():
            result = _worker(args.steps, args.warmup, args.threads,
                             args.batch or TrainSettings.batch_size)
            print(json.dumps(result), flush=True)  # rank 0's alone: the others' is discarded
            return 0

        if dist.launched():  # an error on one rank ends both (MPI_Abort), never a hang
            return dist.run_on_all_ranks(work, prog="bench_distributed")
        return work()
    results = measure(args.steps, args.warmup, args.batch or None)
    print(table(results))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
