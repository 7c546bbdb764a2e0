"""``fastattn train`` and ``fastattn translate``: outputs, flags, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataset import sequence
from fastattn import plots
from fastattn.checkpoint import load_model
from fastattn.cli import main

TINY = ["--epochs", "1", "--batch-size", "32", "--d-model", "16", "--heads", "2",
        "--layers", "1", "--d-ff", "32", "--warmup", "5", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """400 lines of the date task in a file of their own."""
    path = tmp_path_factory.mktemp("data") / "dates.txt"
    path.write_text("\n".join(sequence.get_lines("date.txt")[:400]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    """One tiny training run: (output directory, exit code, stdout)."""
    out = tmp_path_factory.mktemp("run")
    cap = io.StringIO()
    old = sys.stdout
    sys.stdout = cap
    try:
        code = main(["train", "--data", str(small_data), "--out", str(out), *TINY])
    finally:
        sys.stdout = old
    return out, code, cap.getvalue()


def test_train_writes_model_metrics_and_plots(trained):
    out, code, stdout = trained
    assert code == 0
    assert "test accuracy" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "train_seconds", "data_seconds", "compile_seconds",
                "eval_seconds", "total_seconds", "history", "config", "ms_per_step"):
        assert key in metrics, key
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["train_seconds"] > 0
    assert len(metrics["history"]) == 1
    entry = metrics["history"][0]
    assert entry["epoch"] == 1 and "loss" in entry and "test_accuracy" in entry
    assert metrics["test_accuracy"] == entry["test_accuracy"]
    assert metrics["config"]["d_model"] == 16
    # --threads auto (the default) chose a BLAS thread count at every step
    assert metrics["args"]["threads"] == "auto"
    assert sum(metrics["blas_thread_steps"].values()) == metrics["steps"]
    model = load_model(out / "model.npz")
    assert model.config.d_model == 16 and model.config.n_heads == 2
    assert model.question_width == 29 and model.answer_width == 11
    if plots.matplotlib_available():
        for name in ("curves.png", "attention.png"):
            assert (out / name).read_bytes()[:8] == PNG, name
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_train_accuracy_is_the_models_exact_match(trained, small_data):
    """metrics.json's test_accuracy is what the saved model scores on the test split."""
    out, _, _ = trained
    from fastattn.trainer import exact_match

    (_, _), (x_test, t_test) = sequence.load_data(str(small_data))
    model = load_model(out / "model.npz")
    metrics = json.loads((out / "metrics.json").read_text())
    assert exact_match(model, x_test, t_test) == pytest.approx(metrics["test_accuracy"])


def test_train_without_matplotlib_warns_and_skips_plots(tmp_path, small_data, monkeypatch):
    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="matplotlib"):
        code = main(["train", "--data", str(small_data), "--out", str(tmp_path), *TINY])
    assert code == 0
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "model.npz"]


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--d-model", "16", "--heads", "3"], "multiple"),
    (["--backend", "cuda"], "--backend"),
    (["--threads", "many"], "--threads"),
    (["--threads", "-1"], "--threads"),
    (["--no-such-flag"], "unrecognized"),
])
def test_train_bad_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_train_missing_data_file_exits_2(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nothing.txt"), "--out", str(tmp_path)])
    assert code == 2
    assert "nothing.txt" in capsys.readouterr().err


# --------------------------------------------------------------------------- translate


def test_translate_prints_one_answer_a_line(trained, capsys):
    out, _, _ = trained
    qs = ["September 27, 1994", "2/10/93", "thursday, may 8, 1997"]
    assert main(["translate", "--model", str(out / "model.npz"), *qs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == load_model(out / "model.npz").translate(qs)


def test_translate_reads_stdin(trained, capsys, monkeypatch):
    out, _, _ = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO("September 27, 1994\n2/10/93\n"))
    assert main(["translate", "--model", str(out / "model.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == load_model(out / "model.npz").translate(["September 27, 1994", "2/10/93"])


@pytest.mark.parametrize("question, message", [
    ("", "empty"),
    ("x" * 40, "more than"),
    ("Sept 27 1994 ??", "'?'"),
    ("2/10/93 é", "'é'"),
])
def test_translate_bad_questions_exit_2(trained, capsys, question, message):
    out, _, _ = trained
    code = main(["translate", "--model", str(out / "model.npz"), "2/10/93", question])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and message in err and "question 2" in err


def test_translate_missing_or_corrupt_model(tmp_path, capsys):
    assert main(["translate", "--model", str(tmp_path / "none.npz"), "2/10/93"]) == 1
    assert "none.npz" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    assert main(["translate", "--model", str(bad), "2/10/93"]) == 1
    assert "bad.npz" in capsys.readouterr().err


def test_translate_console_script_error_has_no_traceback(trained):
    """Through the real entry point in a fresh interpreter: status 2, one line, no traceback."""
    out, _, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "fastattn.cli", "translate", "--model", str(out / "model.npz"),
         "2/10/93#"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "'#'" in proc.stderr


def test_translated_answers_have_no_start_symbol(trained):
    out, _, _ = trained
    model = load_model(out / "model.npz")
    answers = model.translate(["September 27, 1994"])
    assert len(answers) == 1 and not answers[0].startswith("_")
    ids = model.generate_batch(sequence.encode(["September 27, 1994"], model.char_to_id, 29),
                               model.char_to_id["_"], 10)
    assert answers[0] == sequence.decode(ids[0], model.id_to_char).rstrip(" ")
    assert np.all(ids >= 0)


_WARM_SCRIPT = """
import sys
from types import SimpleNamespace
from numba.core.registry import CPUDispatcher
from fastattn.commands.train import build, load_task
from fastattn.kernels import _flash, _glue_numba, _micro

batch, ranks = int(sys.argv[1]), int(sys.argv[2])
task = load_task("date.txt")
args = SimpleNamespace(seed=0, d_model=16, heads=2, layers=1, d_ff=32, batch_size=batch)
comm = None if ranks == 1 else SimpleNamespace(size=ranks, rank=ranks - 1)
model = build(args, task, "numba", {}, comm)
dispatchers = {name: f for mod in (_flash, _glue_numba, _micro)
               for name, f in vars(mod).items() if isinstance(f, CPUDispatcher)}
before = {name: len(f.signatures) for name, f in dispatchers.items()}
assert before["_forward_units"] and before["_backward_units"], before
n = batch // ranks  # a rank's share of the batch
model.forward(task.x_train[40:40 + n], task.t_train[40:40 + n])
model.backward()
model.generate_batch(task.x_test[:1], task.t_test[:1, 0], 5)  # one question, as the examples
after = {name: len(f.signatures) for name, f in dispatchers.items()}
new = sorted(name for name in after if after[name] != before[name])
assert not new, f"compiled or loaded after build: {new}"
print("ok")
"""


@pytest.mark.parametrize("batch, ranks", [(32, 1), (8, 4)])
def test_train_compiles_the_kernels_of_a_training_step_before_it_trains(batch, ranks):
    """build's first steps compile what a training step runs, on a batch or on each MPI
    rank's share of it (each array layout the kernels get is a compilation of its own), and
    what decoding one question runs, so ms/step does not count compilation. In a process of
    its own, whose kernels start with no signatures (ones loaded from the cache count): in
    this one, other tests have run them all."""
    pytest.importorskip("numba")
    done = subprocess.run([sys.executable, "-c", _WARM_SCRIPT, str(batch), str(ranks)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
