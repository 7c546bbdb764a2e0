"""Training and evaluation with the book's interface, plus batched exact-match evaluation.

``Trainer(model, optimizer).fit(x, t, max_epoch=10, batch_size=32, max_grad=None,
eval_interval=20)`` works for any model with the book's ``forward(x, t) -> loss``,
``backward()``, ``params`` and ``grads`` (the Transformer, or a seq2seq model of the book's).
It shows a progress bar (tqdm) with the running loss and the steps per second.

``eval_seq2seq`` is the book's one-question evaluator; ``exact_match`` scores a whole split
with batched greedy decoding (``model.generate_batch``), the way to evaluate thousands of
questions.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from fastattn import _checks
from fastattn._adaptive_blas import AdaptiveBlas
from fastattn._layer import make_rng
from fastattn.optim import clip_grads

__all__ = ["Trainer", "eval_seq2seq", "exact_match", "remove_duplicate"]


def _layout(a):
    """Where and how an array lies in memory: two arrays with the same layout are one weight."""
    if not isinstance(a, np.ndarray):
        return ("object", id(a))
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


def _tied(params):
    """For each param, None when it is the first of its weight, else (the index of that
    weight's first param, True when this one is its transpose).

    A weight listed twice is the same array (``W``, ``W``) or a view of the same memory laid
    out the same way; a transposed view (``W``, ``W.T``: the book's weight tying of an
    embedding and the output affine) shares the weight too. Equal values in separate memory
    are separate weights.
    """
    first, out = {}, []
    for i, p in enumerate(params):
        key = _layout(p)
        j, transposed = first.get(key), False
        if j is None and isinstance(p, np.ndarray) and p.ndim == 2:
            j = first.get(_layout(p.T))
            transposed = j is not None
        if j is None:
            first[key] = i
            out.append(None)
        else:
            out.append((j, transposed))
    return out


def remove_duplicate(params, grads):
    """Params listed more than once (shared weights) kept once, their grads summed, as the
    book's ``remove_duplicate``.

    A param shares the weight of an earlier one when it is the same array or a view of the
    same memory, also a transposed one (``TimeAffine(embed_W.T, b)`` tied to
    ``TimeEmbedding(embed_W)``): its grad is added (transposed back) to the grad of the
    weight's first param. The book found transposed pairs by comparing values; here the memory
    decides, so two weights that happen to hold equal values stay apart.

    Returns new lists (the input lists are not changed); the grads of a shared weight are
    summed into the grad array of its first occurrence.
    """
    if len(params) != len(grads):
        raise ValueError(f"params and grads must have the same length, got {len(params)} and "
                         f"{len(grads)}")
    return _merge_tied(params, grads, _tied(params))


def _merge_tied(params, grads, ties):
    """remove_duplicate with the ties of ``params`` (:func:`_tied`) already found."""
    out_p, out_g, where = [], [], {}
    for i, (p, g, tie) in enumerate(zip(params, grads, ties, strict=True)):
        if tie is None:
            where[i] = len(out_p)
            out_p.append(p)
            out_g.append(g)
        else:
            j, transposed = tie
            out_g[where[j]] += g.T if transposed else g
    return out_p, out_g


class Trainer:
    """The book's ``Trainer``: mini-batch training with a progress bar.

    Attributes after ``fit``: ``loss_list`` (at every ``eval_interval``-th step of an epoch,
    the mean loss since the last report, across epochs, as in the book), ``history`` (one
    dict per epoch: ``epoch``, ``loss`` (mean over the epoch), ``seconds``, plus what the
    ``callback`` returned), ``train_seconds`` (time in training steps, callbacks excluded),
    ``current_epoch``.

    A weight listed more than once in ``model.params`` (shared by two layers, or tied as a
    transposed view, ``TimeAffine(embed_W.T, b)``) is clipped and updated once, with the sum
    of its grads (:func:`remove_duplicate`), as in the book.

    ``seed``: None shuffles with ``np.random.permutation`` (NumPy's global state, as the
    book); an int uses a private generator. As the book's, each epoch of a ``fit`` call
    shuffles the order of the epoch before (the first shuffles the rows as given), so
    after ``np.random.seed(s)`` the batches are the book's batches, epoch after epoch.

    ``comm``: a :class:`fastattn.distributed.Comm` (``distributed.active()`` under mpiexec):
    each rank trains on its share of every batch (``batch_size`` stays the global batch), the
    gradients are averaged over the ranks before clipping, and only rank 0 shows progress.
    """

    def __init__(self, model, optimizer, *, seed=None, comm=None):
        self.model = model
        self.optimizer = optimizer
        self.loss_list = []
        self.eval_interval = None
        self.current_epoch = 0
        self.history = []
        self.train_seconds = 0.0
        self.blas_counts = []  # fit(blas_threads="auto"): each step's BLAS thread count
        self._rng = None if seed is None else make_rng(seed)
        self.comm = comm  # a fastattn.distributed.Comm: data-parallel over its ranks

    def _permutation(self, n):
        return np.random.permutation(n) if self._rng is None else self._rng.permutation(n)

    def fit(self, x, t, max_epoch=10, batch_size=32, max_grad=None, eval_interval=20, *,
            callback=None, progress=True, blas_threads="auto"):
        """Train on (x, t) for ``max_epoch`` epochs of ``len(x) // batch_size`` steps.

        max_epoch (an int >= 0) and batch_size (an int >= 1, at most len(x)): TypeError or
        ValueError naming them otherwise, before any step.

        max_grad: clip the joint gradient norm to this (None: no clipping).
        eval_interval: steps between loss reports, an int >= 1 (None: no reports).
        callback(trainer, epoch) -> dict or None, called after each epoch; a dict is merged
        into that epoch's ``history`` entry (and shown in the progress bar).
        progress: show a tqdm progress bar.
        blas_threads: ``"auto"`` (the default) chooses, from the steps' times, between BLAS's
        thread count and one thread (one is faster when another process keeps a core busy;
        :mod:`fastattn._adaptive_blas`); None leaves BLAS's thread count as it is.
        ``blas_counts`` lists the count each step ran with (empty with None); the
        evaluations in ``callback`` run with BLAS's own count. The choice changes the speed
        only: it is made only when every BLAS loaded is OpenBLAS, whose products are the same
        bits on any thread count (else the count stays BLAS's own), and not with ``comm``
        (the ranks wait for each other at every step, so a step's time is not the rank's
        own; ``fastattn train`` gives each rank its share of the cores instead).
        """
        from tqdm.auto import tqdm

        x = np.asarray(x)
        t = np.asarray(t)
        if len(x) != len(t):
            raise ValueError(f"x and t must have the same length, got {len(x)} and {len(t)}")
        batch_size = _checks.int_at_least(batch_size, "batch_size", 1)
        max_epoch = _checks.int_at_least(max_epoch, "max_epoch", 0)
        if eval_interval is not None:  # steps % 0 was a ZeroDivisionError
            eval_interval = _checks.int_at_least(eval_interval, "eval_interval", 1)
        data_size = len(x)
        max_iters = data_size // batch_size
        if max_iters == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the data ({data_size})")
        if blas_threads not in (None, "auto"):
            raise ValueError(f"blas_threads must be None or 'auto', got {blas_threads!r}")
        self.eval_interval = eval_interval
        model, optimizer = self.model, self.optimizer
        params, grads = model.params, model.grads
        ties = _tied(params)  # once a fit: the model's lists do not change between steps
        shared = any(tie is not None for tie in ties)
        comm = self.comm
        if comm is not None:
            progress = progress and comm.rank == 0
        adaptive = AdaptiveBlas() if blas_threads == "auto" and comm is None else None
        self.blas_counts = adaptive.counts if adaptive is not None else []

        total_loss, loss_count = 0.0, 0  # as the book: losses after an epoch's last report
        idx = np.arange(data_size)  # the rows in the order of the last epoch
        for _ in range(max_epoch):  # count toward the next epoch's first one
            epoch = self.current_epoch + 1
            idx = idx[self._permutation(data_size)]  # as the book: shuffle the last order
            if comm is not None:
                idx = comm.bcast(idx)  # every rank walks the rows in rank 0's order
            xe, te = x[idx], t[idx]
            epoch_loss = 0.0
            bar = tqdm(total=max_iters, desc=f"epoch {epoch}", unit="step", disable=not progress,
                       dynamic_ncols=True, leave=True)
            start = time.perf_counter()
            with adaptive or contextlib.nullcontext():
                for iters in range(max_iters):
                    t_step = time.perf_counter()
                    batch_x = xe[iters * batch_size:(iters + 1) * batch_size]
                    batch_t = te[iters * batch_size:(iters + 1) * batch_size]
                    if comm is not None:
                        batch_x, batch_t = comm.shard(batch_x, batch_t)
                    loss = model.forward(batch_x, batch_t)
                    model.backward()
                    p, g = _merge_tied(params, grads, ties) if shared else (params, grads)
                    if comm is not None:  # the global batch's gradient and loss, every rank
                        loss = comm.allreduce_grads(g, loss, count=len(batch_x))
                    if max_grad is not None:
                        clip_grads(g, max_grad)
                    optimizer.update(p, g)
                    if adaptive is not None:
                        adaptive.step(time.perf_counter() - t_step)
                    total_loss += loss
                    loss_count += 1
                    epoch_loss += loss
                    if eval_interval is not None and iters % eval_interval == 0:
                        avg_loss = total_loss / loss_count
                        self.loss_list.append(float(avg_loss))
                        total_loss, loss_count = 0.0, 0
                        bar.set_postfix(loss=f"{avg_loss:.4f}", refresh=False)
                    bar.update(1)
            seconds = time.perf_counter() - start
            if comm is not None:
                comm.check_identical(params)
            self.train_seconds += seconds
            self.current_epoch = epoch
            entry = {"epoch": epoch, "loss": epoch_loss / max_iters, "seconds": seconds}
            if callback is not None:
                extra = callback(self, epoch)
                if extra:
                    entry.update(extra)
                    bar.set_postfix({"loss": f"{entry['loss']:.4f}",
                                     **{k: (f"{v:.4f}" if isinstance(v, float) else v)
                                        for k, v in extra.items()}})
            bar.close()
            self.history.append(entry)
        return self

    def plot(self, ylim=None):
        """Plot ``loss_list`` with matplotlib's pyplot (the book's ``plot``)."""
        import matplotlib.pyplot as plt

        x = np.arange(len(self.loss_list))
        if ylim is not None:
            plt.ylim(*ylim)
        plt.plot(x, self.loss_list, label="train")
        plt.xlabel(f"iterations (x{self.eval_interval})")
        plt.ylabel("loss")
        plt.show()


def exact_match(model, x, t, batch_size=1000, *, comm=None):
    """The share of rows whose greedy answer equals ``t[:, 1:]`` exactly, 0..1.

    x (N, S) question ids, t (N, T+1) answers with their start symbol in column 0. Decodes
    ``batch_size`` (an int >= 1) rows at a time with ``model.generate_batch``. ``comm`` (a
    :class:`fastattn.distributed.Comm`): each rank decodes its share of the rows.
    """
    x = np.asarray(x)
    t = np.asarray(t)
    if len(x) != len(t):
        raise ValueError(f"x and t must have the same length, got {len(x)} and {len(t)}")
    if t.ndim != 2 or t.shape[1] < 2:
        raise ValueError(f"t must be (N, T+1) answers with a start symbol, got {t.shape}")
    if len(x) == 0:
        raise ValueError("exact_match needs at least one example")
    batch_size = _checks.int_at_least(batch_size, "batch_size", 1)
    n = len(x)
    if comm is not None:
        x, t = comm.shard(x, t, strict=False)
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, tb = x[i:i + batch_size], t[i:i + batch_size]
        guess = model.generate_batch(xb, tb[:, 0], tb.shape[1] - 1)
        correct += int((guess == tb[:, 1:]).all(axis=1).sum())
    if comm is not None:
        correct = int(comm.sum(correct))
    return correct / n


def eval_seq2seq(model, question, correct, id_to_char, verbose=False, is_reverse=False, *,
                 verbos=None):
    """The book's ``eval_seq2seq``: 1 when the model's greedy answer to one question is right.

    question (1, S) ids, correct (1, T+1) ids starting with the start symbol. ``verbose``
    prints the question, the right answer and the guess (``verbos`` is the book's spelling).
    """
    if verbos is not None:
        verbose = verbos
    correct = np.asarray(correct).flatten()
    start_id = int(correct[0])
    correct = correct[1:]
    guess = model.generate(question, start_id, len(correct))

    q_text = "".join(id_to_char[int(c)] for c in np.asarray(question).flatten())
    c_text = "".join(id_to_char[int(c)] for c in correct)
    g_text = "".join(id_to_char[int(c)] for c in guess)

    if verbose:
        if is_reverse:
            q_text = q_text[::-1]
        ok, fail, close = "\033[92m", "\033[91m", "\033[0m"
        print("Q", q_text)
        print("T", c_text)
        windows = os.name == "nt"
        if c_text == g_text:
            mark = "O" if windows else ok + "☑" + close
        else:
            mark = "X" if windows else fail + "☒" + close
        print(mark + " " + g_text)
        print("---")
    return 1 if g_text == c_text else 0
