"""``fastattn train``: train a Transformer on a sequence task (default: the date task).

Writes into ``--out`` (default ``runs/``): ``model.npz`` (configuration, vocabulary and
weights), ``metrics.json`` (test accuracy, timings, per-epoch history), ``curves.png`` (loss
and accuracy) and ``attention.png`` (cross-attention heatmaps for a few test questions).

The command is four steps, each a function: :func:`load` (the task, checked against the
flags), :func:`build` (the model, and a first step that compiles the kernels), :func:`train`
and :func:`report` (the files and the summary). :func:`load_task` and :func:`build_model`
also serve ``fastattn profile`` and the training-step benchmark, so that the default model is
built in one place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

HELP = "train a Transformer on the date task (or another sequence file) and save it"



@dataclass(frozen=True)
class TrainSettings:
    """The defaults of ``fastattn train`` besides the model's (those are
    :class:`~fastattn.transformer.TransformerConfig`'s): with the default model, a schedule
    that reaches >= 99.9% exact match on the date task."""

    data: str = "date.txt"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    warmup: int = 200
    max_grad: float = 1.0
    threads: int | str = "auto"  # BLAS: all cores, or one when that is faster (0: BLAS's own)
    numba_threads: int = 0  # Numba's own count: the fused kernels' helpers are BLAS's workers
    seed: int = 0
    out: str = "runs"


@dataclass
class Task:
    """A sequence task: its splits of question ids (N, S) and answer ids (N, T), answers
    starting with the start symbol, and its vocabulary."""

    x_train: Any
    t_train: Any
    x_test: Any
    t_test: Any
    char_to_id: dict
    id_to_char: dict

    @property
    def widths(self) -> tuple[int, int]:
        """(question width S, answer width T)."""
        return self.x_train.shape[1], self.t_train.shape[1]


def load_task(data: str) -> Task:
    """The task in the file ``data`` (``date.txt`` and ``addition.txt`` are built in).
    Raises what ``dataset.sequence.load_data`` raises for a missing or malformed file."""
    from dataset import sequence

    (x_train, t_train), (x_test, t_test) = sequence.load_data(data)
    return Task(x_train, t_train, x_test, t_test, *sequence.get_vocab())


def build_model(task: Task, *, backend=None, seed=TrainSettings.seed, **sizes):
    """The model for ``task``: :class:`~fastattn.transformer.TransformerConfig`'s defaults
    (the default model) unless ``sizes`` (d_model=..., n_heads=..., ...) say otherwise,
    positions for the task's longest sequence, and the task's vocabulary attached."""
    from fastattn.transformer import TransformerConfig, TransformerSeq2seq
    from fastattn.vocab import attach_vocab

    S, T = task.widths
    config = TransformerConfig(len(task.char_to_id), max_len=max(S, T), **sizes)
    model = TransformerSeq2seq.from_config(config, backend=backend, seed=seed)
    return attach_vocab(model, task.char_to_id, S, T)


def _number(convert, ok, expected: str, *, unreadable: str | None = None):
    """An argparse type: ``convert(text)`` when ``ok`` accepts it, else the error "expected
    ``expected``" (``unreadable`` when ``convert`` fails, if given)."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {unreadable or expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0,
                          "a positive finite number", unreadable="a positive number")


def _threads_or_auto(text: str):
    return "auto" if text == "auto" else _nonneg_int(text)


def start_threads(threads) -> int:
    """The BLAS threads that a run starts with: ``"auto"`` starts on BLAS's own count (0)."""
    return 0 if threads == "auto" else threads


def add_run_flags(parser, threads_help: str, numba_threads_help: str, *,
                  auto: bool = False) -> None:
    """--backend, --threads (BLAS; with ``auto`` also "auto", the default) and
    --numba-threads, as train and profile take them."""
    from fastattn.kernels import BACKENDS

    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="kernel backend (default: the current one, normally numba)")
    parser.add_argument("--threads", type=_threads_or_auto if auto else _nonneg_int,
                        default=TrainSettings.threads if auto else 0, help=threads_help)
    parser.add_argument("--numba-threads", type=_nonneg_int,
                        default=TrainSettings.numba_threads, help=numba_threads_help)


def configure(parser):
    from fastattn.transformer import TransformerConfig as m

    d = TrainSettings
    parser.add_argument("--data", default=d.data,
                        help="data file: date.txt or addition.txt (built in) or a path to a "
                             "file of 'question_answer' lines (default: %(default)s)")
    for flag, default, text in [  # the counts and sizes: positive integers
            ("--epochs", d.epochs, "passes over the training split (default: %(default)s)"),
            ("--batch-size", d.batch_size, "examples per step (default: %(default)s)"),
            ("--d-model", m.d_model, "model width (default: %(default)s)"),
            ("--heads", m.n_heads, "attention heads; must divide --d-model (default: "
                                   "%(default)s)"),
            ("--layers", m.n_layers, "encoder blocks and decoder blocks (default: %(default)s "
                                     "each)"),
            ("--d-ff", m.d_ff, "feed-forward width (default: %(default)s)")]:
        parser.add_argument(flag, type=_positive_int, default=default, help=text)
    parser.add_argument("--lr", type=_positive_float, default=d.lr,
                        help="peak learning rate of Adam, reached after the warm-up and "
                             "then decayed to 0 by a cosine (default: %(default)s)")
    parser.add_argument("--warmup", type=_nonneg_int, default=d.warmup,
                        help="warm-up steps (default: %(default)s)")
    parser.add_argument("--max-grad", type=_positive_float, default=d.max_grad,
                        help="clip the gradient norm to this (default: %(default)s)")
    add_run_flags(parser, "BLAS threads: 'auto' starts on all cores and switches to one "
                          "thread while that makes the steps faster, as when another "
                          "process keeps a core busy (it measures the steps: now and then "
                          "3 run on the other count); N runs on N threads; 0 leaves BLAS's "
                          "own default, all cores (default: %(default)s)",
                  "threads of the Numba kernels; 0 leaves Numba's default, all cores (the "
                  "fused attention's second thread is then NumPy's BLAS worker, which "
                  "spins between the products anyway) (default: %(default)s)", auto=True)
    parser.add_argument("--seed", type=_nonneg_int, default=d.seed,
                        help="seed of the weights and the batch order (default: %(default)s)")
    parser.add_argument("--out", default=d.out,
                        help="output directory (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(_train_parser=parser)


def limit_threads(blas: int, numba_threads: int | None = None):
    """A context manager that runs BLAS on ``blas`` threads and the Numba kernels on
    ``numba_threads`` (default: the same as ``blas``); 0 leaves a library as it is. BLAS is
    limited with threadpoolctl, when it is installed, and only BLAS."""
    import contextlib

    if numba_threads is None:
        numba_threads = blas
    stack = contextlib.ExitStack()
    if numba_threads > 0:
        try:
            import numba

            old = numba.get_num_threads()
            numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))
            stack.callback(numba.set_num_threads, old)
        except ImportError:
            pass
    if blas > 0:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            warnings.warn("threadpoolctl is not installed: BLAS keeps its own thread count "
                          "(pip install threadpoolctl)", RuntimeWarning, stacklevel=2)
        else:
            stack.enter_context(threadpool_limits(limits=blas, user_api="blas"))
    return stack


def _error(msg: str) -> int:
    print(f"fastattn train: error: {msg}", file=sys.stderr)
    return 2


class _Failure(Exception):
    """Bad arguments or input: ``fastattn train: error: ...`` and exit status 2."""


def _fail(args, msg: str, *, usage: bool = False):
    """Stop with ``msg``; a bad flag (``usage``) exits through the parser with its usage
    line, when there is one."""
    parser = getattr(args, "_train_parser", None)
    if usage and parser is not None:
        parser.error(msg)  # exits with status 2
    raise _Failure(msg)


def run(args) -> int:
    from fastattn import distributed

    if distributed.launched():  # under mpiexec: data-parallel, see fastattn.distributed
        return distributed.run_train(args, _run_limited)
    return _run_limited(args)


def _run_limited(args) -> int:
    with limit_threads(start_threads(args.threads), args.numba_threads):
        return _run(args)


def _run(args) -> int:
    """Load the task, build the model, train it and report: the four steps of the command.
    Under mpiexec every rank trains its share of each batch and rank 0 alone reports."""
    from fastattn import _backend, distributed

    t_start = time.perf_counter()
    try:
        if args.d_model % args.heads:
            _fail(args, f"--d-model {args.d_model} is not a multiple of --heads {args.heads}",
                  usage=True)
        backend = _backend.resolve(args.backend)
        seconds = {}
        task = load(args, seconds)
        comm = distributed.active()  # None without mpiexec; else rank 0 alone writes
        if comm is None or comm.rank == 0:
            _make_dir(args.out)  # after the data: a bad --data leaves nothing behind
        model = build(args, task, backend, seconds, comm)
        trainer = train(args, task, model, backend, seconds, comm)
        if comm is None or comm.rank == 0:
            report(args, task, model, trainer, backend, seconds, t_start, comm)
    except _Failure as exc:
        return _error(str(exc))
    return 0


def load(args, seconds: dict) -> Task:
    """Step 1: the task of ``--data``, checked against the other flags."""
    t0 = time.perf_counter()
    try:
        task = load_task(args.data)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise _Failure(str(exc)) from None
    if len(task.x_test) == 0:
        _fail(args, f"{args.data} has fewer than 10 lines: no test split")
    if "_" not in task.char_to_id:
        _fail(args, f"{args.data} has no start symbol '_'")
    if args.batch_size > len(task.x_train):
        _fail(args, f"--batch-size {args.batch_size} is larger than the training split "
                    f"({len(task.x_train)} examples)", usage=True)
    seconds["data"] = time.perf_counter() - t0
    return task


def _make_dir(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise _Failure(f"cannot create the output directory {out_dir!r}: {exc}") from None


def build(args, task: Task, backend: str, seconds: dict, comm=None):
    """Step 2: the model of the flags, and first steps that compile the kernels (timed
    apart). On the numba backend, a step of the size that this process's training steps
    take (the batch, or under mpiexec this rank's share of it, ``comm.shard``'s rows): each
    array layout the kernels get is a compilation of its own, so a step of that size
    compiles what training runs and nothing else, whatever rule picks the layouts. The
    other backends compile nothing: a step on two examples (a batch on the loop backend
    takes seconds). Then a greedy decoding of two questions, as the evaluation and the
    examples run it."""
    from fastattn.distributed import shard_bounds

    model = build_model(task, backend=backend, seed=args.seed, d_model=args.d_model,
                        n_heads=args.heads, n_layers=args.layers, d_ff=args.d_ff)
    T = task.widths[1]
    t0 = time.perf_counter()
    if backend != "numba":
        n = 2
    elif comm is None:
        n = args.batch_size
    else:
        lo, hi = shard_bounds(args.batch_size, comm.size, comm.rank)
        n = hi - lo
    model.forward(task.x_train[:n], task.t_train[:n])
    model.backward()
    model.generate_batch(task.x_test[:2], task.t_test[:2, 0], T - 1)
    seconds["compile"] = time.perf_counter() - t0
    return model


def train(args, task: Task, model, backend: str, seconds: dict, comm=None):
    """Step 3: Adam with warm-up and cosine decay, exact match on the test split at each
    evaluation; returns the Trainer (its history, losses and training time). With ``comm``
    (a :class:`fastattn.distributed.Comm`) the ranks share each batch and the evaluation."""
    from fastattn.optim import Adam
    from fastattn.trainer import Trainer, exact_match

    steps_per_epoch, total_steps = _steps(args, task)
    optimizer = Adam(lr=args.lr, warmup_steps=min(args.warmup, total_steps),
                     total_steps=total_steps)
    n_params = int(sum(p.size for p in model.params))
    print(f"fastattn train: {args.data}: {len(task.x_train)} train / {len(task.x_test)} test "
          f"examples, vocabulary {len(task.char_to_id)}; model d_model={args.d_model} "
          f"heads={args.heads} layers={args.layers} d_ff={args.d_ff} ({n_params} parameters); "
          f"backend {backend}; {args.epochs} epochs x {steps_per_epoch} steps of "
          f"{args.batch_size}", flush=True)
    seconds["eval"] = 0.0

    def evaluate(trainer, epoch):
        t1 = time.perf_counter()
        acc = exact_match(model, task.x_test, task.t_test, comm=comm)
        seconds["eval"] += time.perf_counter() - t1
        return {"test_accuracy": acc, "lr": optimizer.current_lr}

    trainer = Trainer(model, optimizer, seed=args.seed, comm=comm)
    trainer.fit(task.x_train, task.t_train, max_epoch=args.epochs, batch_size=args.batch_size,
                max_grad=args.max_grad, eval_interval=20, callback=evaluate,
                progress=not args.no_progress,
                blas_threads="auto" if args.threads == "auto" else None)  # fit: none with comm
    return trainer


def _steps(args, task: Task) -> tuple[int, int]:
    """(steps per epoch, steps in all) of the training."""
    steps_per_epoch = len(task.x_train) // args.batch_size
    return steps_per_epoch, steps_per_epoch * args.epochs


def report(args, task: Task, model, trainer, backend: str, seconds: dict, t_start: float,
           comm=None):
    """Step 4: a few translations, then model.npz, metrics.json and the plots in ``--out``,
    and the summary on standard output."""
    from fastattn import distributed
    from fastattn.checkpoint import save_model

    n_show = min(3, len(task.x_test))
    guess, examples = _examples(model, task, n_show)
    accuracy = trainer.history[-1]["test_accuracy"]
    total_steps = _steps(args, task)[1]
    total_seconds = time.perf_counter() - t_start
    metrics = {
        "test_accuracy": accuracy,
        "train_seconds": trainer.train_seconds,
        "data_seconds": seconds["data"],
        "compile_seconds": seconds["compile"],
        "eval_seconds": seconds["eval"],
        "total_seconds": total_seconds,
        "steps": total_steps,
        "ms_per_step": 1000.0 * trainer.train_seconds / max(total_steps, 1),
        "history": trainer.history,
        "config": model.config.as_dict(),
        "n_params": int(sum(p.size for p in model.params)),
        **distributed.metrics(comm, total_steps, trainer.train_seconds),
        "args": {"data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
                 "lr": args.lr, "warmup": args.warmup, "max_grad": args.max_grad,
                 "backend": backend, "threads": args.threads,
                 "numba_threads": args.numba_threads, "seed": args.seed},
        # steps per BLAS thread count ("auto" chooses it; {} when the count was fixed)
        "blas_thread_steps": {str(n): trainer.blas_counts.count(n)
                              for n in sorted(set(trainer.blas_counts), reverse=True)},
        "examples": examples,
    }
    model_path = os.path.join(args.out, "model.npz")
    save_model(model, model_path, meta={"test_accuracy": accuracy, "data": args.data})
    metrics_path = os.path.join(args.out, "metrics.json")
    _write_json(metrics_path, metrics)
    written = [model_path, metrics_path] + _plots(args.out, model, task, trainer, guess,
                                                  examples)
    print(f"test accuracy (exact match, {len(task.x_test)} questions): {100 * accuracy:.2f}%")
    print(f"time: {total_seconds:.1f} s in all = data {seconds['data']:.1f} s + compile "
          f"{seconds['compile']:.1f} s + training {trainer.train_seconds:.1f} s "
          f"({metrics['ms_per_step']:.1f} ms/step) + evaluation {seconds['eval']:.1f} s + rest")
    for e in examples:
        verdict = "ok" if e["guess"] == e["answer"] else f"expected {e['answer']!r}"
        print(f"  {e['question']!r} -> {e['guess']!r} ({verdict})")
    print("wrote " + ", ".join(written))


def _examples(model, task: Task, n: int):
    """The model's answers (ids) to the first n test questions, and the questions, answers
    and guesses as text."""
    from dataset import sequence

    guess = model.generate_batch(task.x_test[:n], task.t_test[:n, 0], task.widths[1] - 1)
    text = [{"question": sequence.decode(task.x_test[i], task.id_to_char).rstrip(" "),
             "answer": sequence.decode(task.t_test[i, 1:], task.id_to_char).rstrip(" "),
             "guess": sequence.decode(guess[i], task.id_to_char).rstrip(" ")}
            for i in range(n)]
    return guess, text


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _plots(out_dir: str, model, task: Task, trainer, guess, examples) -> list:
    """curves.png and attention.png in out_dir (the paths written); none, with a warning,
    without matplotlib."""
    import numpy as np

    from dataset import sequence
    from fastattn import plots

    if not plots.matplotlib_available():
        warnings.warn("matplotlib is not installed: no plots written (pip install "
                      "'fastattn[plot]')", RuntimeWarning, stacklevel=1)
        return []
    n = len(examples)
    curves = os.path.join(out_dir, "curves.png")
    plots.plot_history(trainer.history, curves, loss_list=trainer.loss_list,
                       eval_interval=trainer.eval_interval)
    answers_in = np.concatenate([task.t_test[:n, :1], guess[:, :-1]], axis=1)
    weights = model.cross_attention(task.x_test[:n], answers_in)
    heat = os.path.join(out_dir, "attention.png")
    S = task.widths[0]
    plots.plot_attention(list(weights), [e["question"].ljust(S) for e in examples],
                         [sequence.decode(g, task.id_to_char) for g in guess], heat)
    return [curves, heat]
