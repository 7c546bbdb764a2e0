"""``fastattn profile``: where one training step of the default model spends its time.

Times each layer and each kernel, forward and backward apart, over a few training steps of
the default Transformer on the date task (after a warm-up step that compiles the kernels),
and prints them slowest first. ``--cprofile FILE`` also writes a cProfile stats file for the
usual viewers (``python -m pstats FILE``, snakeviz, ...).
"""

from __future__ import annotations

import sys

HELP = "time per layer and per kernel of a training step of the default model, on the CPU"


def configure(parser):
    from fastattn.commands.train import TrainSettings as d
    from fastattn.commands.train import _positive_int, add_run_flags

    parser.add_argument("--steps", type=_positive_int, default=5,
                        help="training steps to time after the warm-up (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                        help="examples per step (default: %(default)s)")
    parser.add_argument("--data", default=d.data,
                        help="data file (default: %(default)s)")
    add_run_flags(parser, "BLAS threads, as in 'fastattn train' (0: BLAS's own default; "
                          "default: %(default)s)",
                  "Numba threads, as in 'fastattn train' (0: Numba's default; "
                  "default: %(default)s)")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help="show at most this many rows of each table")
    parser.add_argument("--sort", choices=("self_time", "total", "calls"), default="self_time",
                        help="sort key of the tables (default: %(default)s)")
    parser.add_argument("--cprofile", metavar="FILE", default=None,
                        help="also write cProfile statistics of the timed steps to FILE")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the table as JSON to FILE")


def run(args) -> int:
    import json
    import os

    import numpy as np

    from fastattn import _backend
    from fastattn._hostload import Watch
    from fastattn.commands.train import TrainSettings, build_model, limit_threads, load_task
    from fastattn.optim import Adam, clip_grads
    from fastattn.profiling import profile

    backend = _backend.resolve(args.backend)
    try:
        task = load_task(args.data)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"fastattn profile: error: {exc}", file=sys.stderr)
        return 2
    x_train, t_train = task.x_train, task.t_train
    model = build_model(task, backend=backend)  # the default model
    optimizer = Adam(lr=TrainSettings.lr)
    rng = np.random.default_rng(0)
    B = min(args.batch_size, len(x_train))

    def step():
        idx = rng.integers(0, len(x_train), B)
        model.forward(x_train[idx], t_train[idx])
        model.backward()
        clip_grads(model.grads, TrainSettings.max_grad)
        optimizer.update(model.params, model.grads)

    threads = limit_threads(args.threads, args.numba_threads)
    with threads:
        watch = Watch()
        prof, profiler = _timed_steps(model, step, args.steps, args.cprofile, profile)
        host = watch.describe()

    print(f"fastattn profile: {args.steps} training steps of the default model "
          f"(batch {B}, backend {backend}, BLAS threads {args.threads or 'default'}, "
          f"Numba threads {args.numba_threads or 'default'}): "
          f"{1e3 * prof.wall / args.steps:.1f} ms per step")
    print(f"host while profiling: {host}")
    print(prof.table(sort=args.sort, limit=args.limit))
    if profiler is not None:
        profiler.dump_stats(args.cprofile)
        print(f"wrote {args.cprofile} (view with: python -m pstats {args.cprofile})")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"steps": args.steps, "batch_size": B, "backend": backend,
                       "host_load": host, **prof.as_dict()}, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


def _timed_steps(model, step, n, cprofile_path, profile):
    """One warm-up step (compiles or loads the kernels), then ``n`` profiled steps."""
    import cProfile

    step()
    profiler = cProfile.Profile() if cprofile_path else None
    with profile(model) as prof:
        if profiler is not None:
            profiler.enable()
        for _ in range(n):
            step()
        if profiler is not None:
            profiler.disable()
    return prof, profiler
