"""PNG plots of training: loss and accuracy curves, and cross-attention heatmaps.

matplotlib is imported only when a plot is drawn (it is an optional dependency: the ``plot``
extra). The figures are drawn on matplotlib's Agg canvas directly, without pyplot, so nothing
global (the pyplot backend, open figures) changes.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["matplotlib_available", "plot_attention", "plot_history"]


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_history(history, path, *, loss_list=None, eval_interval=None):
    """Loss and test accuracy per epoch (and the running loss per ``eval_interval`` steps,
    when ``loss_list`` is given) as a PNG at ``path``.

    history: list of dicts with ``epoch``, ``loss`` and optionally ``test_accuracy``.
    """
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    if loss_list:
        steps = np.arange(len(loss_list)) * (eval_interval or 1)
        ax1.plot(steps, loss_list, lw=1, label="running loss")
        ax1.set_xlabel("step")
    else:
        ax1.plot([h["epoch"] for h in history], [h["loss"] for h in history], "o-",
                 label="epoch mean loss")
        ax1.set_xlabel("epoch")
    ax1.set_yscale("log")
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_title("training loss")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    acc = [(h["epoch"], h["test_accuracy"]) for h in history if "test_accuracy" in h]
    if acc:
        ep, a = zip(*acc, strict=True)
        ax2.plot(ep, [100 * v for v in a], "o-", color="tab:green")
        for e, v in acc:
            ax2.annotate(f"{100 * v:.2f}%", (e, 100 * v), textcoords="offset points",
                         xytext=(0, 6), ha="center", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("exact match on the test split (%)")
    ax2.set_title("test accuracy")
    ax2.set_ylim(0, 108)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return path


def plot_attention(weights, questions, answers, path, *, title="cross-attention"):
    """Heatmaps of attention weights, one panel per example, as a PNG at ``path``.

    weights: list of (T_answer, T_question) arrays (rows: answer characters, columns:
    question characters); questions/answers: the strings labelling the columns/rows.
    """
    n = len(weights)
    if n == 0:
        raise ValueError("plot_attention needs at least one example")
    fig = _figure(4.2 * n, 4.0)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, w, q, a in zip(axes, weights, questions, answers, strict=True):
        w = np.asarray(w)
        ax.imshow(w, cmap="Greys_r", vmin=0.0, vmax=float(max(w.max(), 1e-12)), aspect="auto")
        ax.set_xticks(range(w.shape[1]))
        ax.set_xticklabels(list(q[: w.shape[1]]), fontsize=7)
        ax.set_yticks(range(w.shape[0]))
        ax.set_yticklabels(list(a[: w.shape[0]]), fontsize=8)
        ax.set_xlabel("question")
        ax.set_ylabel("answer")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return path
