"""fastattn.plots: what the training curves and attention heatmaps show, read back from the
figures they draw (the PNG files themselves are checked by the command-line tests)."""

from __future__ import annotations

import numpy as np
import pytest

from fastattn import plots

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots draw, in order."""
    drawn = []
    make = plots._figure

    def recording(*size):
        fig = make(*size)
        drawn.append(fig)
        return fig

    monkeypatch.setattr(plots, "_figure", recording)
    return drawn


def test_history_curves_put_the_running_loss_at_its_steps_and_accuracy_in_percent(
        tmp_path, figures):
    """The running loss, reported every eval_interval steps, is drawn at steps 0, 20, 40;
    the test accuracy (0..1 in history) at its epochs, in percent."""
    history = [{"epoch": 1, "loss": 2.0, "test_accuracy": 0.25},
               {"epoch": 2, "loss": 1.0, "test_accuracy": 0.875}]
    path = plots.plot_history(history, tmp_path / "curves.png", loss_list=[3.0, 2.0, 1.5],
                              eval_interval=20)
    assert path.read_bytes()[:4] == b"\x89PNG"
    loss_ax, acc_ax = figures[-1].axes
    (loss,) = loss_ax.lines
    np.testing.assert_array_equal(loss.get_xdata(), [0, 20, 40])
    np.testing.assert_array_equal(loss.get_ydata(), [3.0, 2.0, 1.5])
    (acc,) = acc_ax.lines
    np.testing.assert_array_equal(acc.get_xdata(), [1, 2])
    np.testing.assert_array_equal(acc.get_ydata(), [25.0, 87.5])


def test_history_curves_without_a_loss_list_show_the_epoch_means(tmp_path, figures):
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 0.5}]
    plots.plot_history(history, tmp_path / "curves.png")
    (loss,) = figures[-1].axes[0].lines
    np.testing.assert_array_equal(loss.get_xdata(), [1, 2])
    np.testing.assert_array_equal(loss.get_ydata(), [2.0, 0.5])
    assert not figures[-1].axes[1].lines  # no accuracy recorded: nothing drawn


def test_attention_heatmaps_show_answer_rows_by_question_columns(tmp_path, figures):
    """One panel per example: the weights as given (row i: answer character i, column j:
    question character j), labelled with those characters."""
    rng = np.random.default_rng(0)
    weights = [rng.random((3, 4)), rng.random((2, 5))]
    questions, answers = ["abcd", "vwxyz"], ["ABC", "PQ"]
    plots.plot_attention(weights, questions, answers, tmp_path / "attention.png")
    panels = figures[-1].axes
    assert len(panels) == 2
    for ax, w, q, a in zip(panels, weights, questions, answers, strict=True):
        (image,) = ax.images
        np.testing.assert_array_equal(image.get_array(), w)
        assert image.origin == "upper"  # row 0 (the first answer character) at the top
        assert [t.get_text() for t in ax.get_xticklabels()] == list(q)
        assert [t.get_text() for t in ax.get_yticklabels()] == list(a)
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_attention([], [], [], tmp_path / "none.png")
