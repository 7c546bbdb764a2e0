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
    from fastattn.commands.train import DEFAULTS, _nonneg_int, _positive_int
    from fastattn.kernels import BACKENDS

    parser.add_argument("--steps", type=_positive_int, default=5,
                        help="training steps to time after the warm-up (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"],
                        help="examples per step (default: %(default)s)")
    parser.add_argument("--data", default=DEFAULTS["data"],
                        help="data file (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="kernel backend (default: the current one, normally numba)")
    parser.add_argument("--threads", type=_nonneg_int, default=DEFAULTS["threads"],
                        help="BLAS threads, as in 'fastattn train' (0: BLAS's own default; "
                             "default: %(default)s)")
    parser.add_argument("--numba-threads", type=_nonneg_int, default=DEFAULTS["numba_threads"],
                        help="Numba threads, as in 'fastattn train' (0: Numba's default; "
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

    from dataset import sequence
    from fastattn import _backend
    from fastattn.commands.train import DEFAULTS, limit_threads
    from fastattn.optim import Adam, clip_grads
    from fastattn.profiling import profile
    from fastattn.transformer import TransformerSeq2seq

    backend = _backend.resolve(args.backend)
    try:
        (x_train, t_train), _ = sequence.load_data(args.data)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"fastattn profile: error: {exc}", file=sys.stderr)
        return 2
    char_to_id, _ = sequence.get_vocab()
    S, T = x_train.shape[1], t_train.shape[1]
    model = TransformerSeq2seq(len(char_to_id), d_model=DEFAULTS["d_model"],
                               n_heads=DEFAULTS["heads"], n_layers=DEFAULTS["layers"],
                               d_ff=DEFAULTS["d_ff"], max_len=max(S, T), pos=DEFAULTS["pos"],
                               backend=backend, seed=DEFAULTS["seed"])
    optimizer = Adam(lr=DEFAULTS["lr"])
    rng = np.random.default_rng(0)
    B = min(args.batch_size, len(x_train))

    def step():
        idx = rng.integers(0, len(x_train), B)
        model.forward(x_train[idx], t_train[idx])
        model.backward()
        clip_grads(model.grads, DEFAULTS["max_grad"])
        optimizer.update(model.params, model.grads)

    threads = limit_threads(args.threads, args.numba_threads)
    with threads:
        prof, profiler = _timed_steps(model, step, args.steps, args.cprofile, profile)

    print(f"fastattn profile: {args.steps} training steps of the default model "
          f"(batch {B}, backend {backend}, BLAS threads {args.threads or 'default'}, "
          f"Numba threads {args.numba_threads or 'default'}): "
          f"{1e3 * prof.wall / args.steps:.1f} ms per step")
    print(prof.table(sort=args.sort, limit=args.limit))
    if profiler is not None:
        profiler.dump_stats(args.cprofile)
        print(f"wrote {args.cprofile} (view with: python -m pstats {args.cprofile})")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"steps": args.steps, "batch_size": B, "backend": backend,
                       **prof.as_dict()}, f, indent=2)
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
