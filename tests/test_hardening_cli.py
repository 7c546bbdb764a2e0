"""Bad input to ``fastattn translate`` and ``fastattn train``, and malformed data files.

The commands run in-process through ``fastattn.cli.main`` (an argparse usage error is a
SystemExit(2)); a few run as ``python -m fastattn.cli`` to see what a user's terminal shows.
Every error is one line on stderr, names what is wrong, and shows no traceback; nothing is
printed on stdout and a failed ``train`` writes no output directory.

Exit statuses: 2 for a bad question or a bad flag value; 1 for a model file that is missing or
cannot be read (as ``fastattn translate`` documents, and ``tests/test_cli.py`` checks).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from dataset import sequence
from fastattn.checkpoint import save_model
from fastattn.cli import main
from fastattn.transformer import TransformerSeq2seq
from fastattn.vocab import attach_vocab

# the characters of the date task
CHARS = (" _0123456789/-,abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
QUESTION_WIDTH, ANSWER_WIDTH = 29, 11


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny untrained model with the date task's vocabulary and widths, saved."""
    model = TransformerSeq2seq(len(CHARS), d_model=8, n_heads=2, n_layers=1, d_ff=16,
                               max_len=QUESTION_WIDTH, seed=0)
    attach_vocab(model, {c: i for i, c in enumerate(CHARS)}, QUESTION_WIDTH, ANSWER_WIDTH)
    return str(save_model(model, tmp_path_factory.mktemp("model") / "model.npz"))


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``fastattn ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *needles):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ============================================================================ translate


def test_translate_answers_a_good_question(model_path, capsys):
    """The control: the same command with good questions succeeds (one answer a line)."""
    code, out, err = run(["translate", "--model", model_path, "--backend", "vectorized",
                          "2/10/93", "September 27, 1994"], capsys)
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 2


def test_translate_takes_a_question_exactly_as_wide_as_the_model(model_path, capsys):
    """A question of question_width characters is not too long: it gets the model's answer."""
    from fastattn.checkpoint import load_model

    question = "Wednesday, September 28, 2016"
    assert len(question) == QUESTION_WIDTH
    code, out, err = run(["translate", "--model", model_path, "--backend", "vectorized",
                          "2/10/93", question], capsys)
    assert code == 0 and err == ""
    want = load_model(model_path, backend="vectorized").translate(["2/10/93", question])
    assert out.splitlines() == want


def test_translate_runs_the_model_on_the_backend_it_is_given(model_path, capsys):
    """--backend vectorized while numba is the current backend: every kernel the model calls
    is a vectorized one."""
    import fastattn

    with fastattn.use_backend("numba"), fastattn.profile() as prof:
        code, out, err = run(["translate", "--model", model_path, "--backend", "vectorized",
                              "2/10/93"], capsys)
    assert code == 0 and err == ""
    kernels = {e.name for e in prof.rows("kernel")}
    assert kernels and {name.split(":")[0] for name in kernels} == {"vectorized"}, kernels


@pytest.mark.parametrize("question, needles", [
    pytest.param("", ["question 2 is empty"], id="empty"),
    pytest.param("   ", ["question 2 is empty"], id="blank"),
    pytest.param("x" * 30, ["30 characters", "29"], id="one-too-long"),
    pytest.param("9" * 500, ["500 characters"], id="very-long"),
    pytest.param("2/10/93 #", ["'#'"], id="one-unknown"),
    pytest.param("é~2/10?", ["'?'", "'é'", "'~'"], id="several-unknown"),
    pytest.param("2/10\n93", ["'\\n'"], id="newline-inside"),
    pytest.param("2/10\t93", ["'\\t'"], id="tab-inside"),
    pytest.param("\x1b[31m2/10", ["'\\x1b'", "'['"], id="terminal-escape"),
    pytest.param("2/10/93\x00", ["'\\x00'"], id="nul"),
    pytest.param("日付", ["'日'", "'付'"], id="cjk"),
])
def test_translate_bad_question_is_a_one_line_error_exit_2(model_path, capsys, question,
                                                           needles):
    code, out, err = run(["translate", "--model", model_path, "2/10/93", question], capsys)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, "fastattn translate", *needles)


@pytest.mark.parametrize("stdin, needles", [
    pytest.param(b"", ["no questions"], id="empty"),
    pytest.param(b"2/10/93\n\n", ["question 2 is empty"], id="blank-line"),
    pytest.param(b"2/10/93\n#\n", ["question 2", "'#'"], id="unknown-character"),
    pytest.param(b"2/10/93\n\xff\xfe\n", ["standard input", "utf-8"], id="not-utf8"),
])
def test_translate_bad_standard_input_is_a_one_line_error_exit_2(model_path, capsys,
                                                                 monkeypatch, stdin, needles):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code, out, err = run(["translate", "--model", model_path], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, *needles)


def _bad_model_files(tmp_path, model_path):
    good = open(model_path, "rb").read()
    files = {
        "missing": None,
        "directory": "dir",
        "random": np.random.default_rng(0).bytes(500),
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    }
    for name, content in files.items():
        path = tmp_path / f"{name}.npz"
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        yield name, path
    no_vocab = tmp_path / "no-vocab.npz"
    save_model(TransformerSeq2seq(len(CHARS), d_model=8, n_heads=2, d_ff=16, max_len=29),
               no_vocab)
    yield "no-vocab", no_vocab


def test_translate_missing_or_unreadable_model_is_a_one_line_error_exit_1(tmp_path,
                                                                          model_path, capsys):
    for name, path in _bad_model_files(tmp_path, model_path):
        code, out, err = run(["translate", "--model", str(path), "2/10/93"], capsys)
        assert code == 1, name
        assert out == "", name
        assert_one_line_error(err, "fastattn translate", path.name)


# ============================================================================ train


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """40 lines of the date task: 36 for training, 4 for the test split."""
    path = tmp_path_factory.mktemp("data") / "dates.txt"
    path.write_text("\n".join(sequence.get_lines("date.txt")[:40]) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("flags, flag", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "x"], "--epochs"),
    (["--epochs", "1.5"], "--epochs"),
    (["--epochs", ""], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "1e-3x"], "--lr"),
    (["--heads", "3", "--d-model", "64"], "--heads"),
    (["--heads", "0"], "--heads"),
    (["--d-model", "-8"], "--d-model"),
    (["--layers", "0"], "--layers"),
    (["--d-ff", "0"], "--d-ff"),
    (["--batch-size", "0"], "--batch-size"),
    (["--warmup", "-1"], "--warmup"),
    (["--max-grad", "0"], "--max-grad"),
    (["--threads", "-1"], "--threads"),
    (["--seed", "-3"], "--seed"),
    (["--backend", "bogus"], "--backend"),
    (["--epochs"], "--epochs"),
])
def test_train_bad_flag_value_is_a_usage_error_exit_2(tmp_path, capsys, flags, flag):
    out_dir = tmp_path / "out"
    code, out, err = run(["train", "--out", str(out_dir), "--no-progress", *flags], capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: fastattn train")
    assert lines[-1].startswith("fastattn train: error:") and flag in lines[-1], lines[-1]
    assert not out_dir.exists()


def test_train_batch_size_bigger_than_the_data_is_a_usage_error_exit_2(tmp_path, capsys,
                                                                       small_data):
    out_dir = tmp_path / "out"
    code, out, err = run(["train", "--data", small_data, "--batch-size", "37",
                          "--out", str(out_dir), "--no-progress"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: fastattn train")
    assert "--batch-size 37" in err and "36 examples" in err and "Traceback" not in err
    assert not out_dir.exists()


class _Stop(Exception):
    """Raised by a Trainer.fit stand-in once it has seen its arguments."""


def _stop_at_fit(monkeypatch, record=None):
    """Put a Trainer.fit stand-in in place that raises _Stop; returns the dict it fills with
    fit's keywords, the rows it got, the optimizer and what ``record()`` returns then."""
    from fastattn.trainer import Trainer

    seen = {}

    def fit(self, x, t, **kw):
        seen.update(kw, rows=len(x), optimizer=self.optimizer)
        if record is not None:
            seen.update(record())
        raise _Stop

    monkeypatch.setattr(Trainer, "fit", fit)
    return seen


# a small model on the vectorized backend, on one BLAS thread (runs repeat exactly)
SMALL = ["--backend", "vectorized", "--d-model", "8", "--heads", "2", "--layers", "1",
         "--d-ff", "8", "--no-progress"]


def test_train_hands_its_flags_to_the_optimizer_and_the_trainer(tmp_path, capsys,
                                                                 small_data, monkeypatch):
    """--epochs, --batch-size, --lr, --warmup and --max-grad, none of them the default, reach
    Adam and Trainer.fit (36 training examples: 9 steps of 4 per epoch, 27 in all)."""
    seen = _stop_at_fit(monkeypatch)
    with pytest.raises(_Stop):
        main(["train", "--data", small_data, "--out", str(tmp_path / "out"), "--backend",
              "vectorized", "--epochs", "3", "--batch-size", "4", "--lr", "0.02", "--warmup",
              "5", "--max-grad", "0.25", "--d-model", "8", "--heads", "2", "--d-ff", "8",
              "--no-progress"])
    capsys.readouterr()
    assert (seen["rows"], seen["max_epoch"], seen["batch_size"]) == (36, 3, 4)
    assert seen["max_grad"] == 0.25 and seen["progress"] is False
    opt = seen["optimizer"]
    assert (opt.lr, opt.warmup_steps, opt.total_steps) == (0.02, 5, 27)


def test_train_takes_a_batch_as_large_as_the_training_split(tmp_path, capsys, small_data,
                                                             monkeypatch):
    """--batch-size 36 with 36 training examples is one step per epoch, not an error."""
    seen = _stop_at_fit(monkeypatch)
    with pytest.raises(_Stop):
        main(["train", "--data", small_data, "--out", str(tmp_path / "out"), *SMALL,
              "--batch-size", "36"])
    capsys.readouterr()
    assert (seen["rows"], seen["batch_size"]) == (36, 36)


def test_train_warmup_longer_than_the_run_still_reaches_the_peak_learning_rate(
        tmp_path, capsys, small_data, monkeypatch):
    """--lr is the peak, reached after the warm-up: with --warmup 1000 on a run of 9 steps
    (36 examples, batches of 4, one epoch) the warm-up is cut to the run, and the optimizer
    that train builds steps at 0.01 by its 9th and last update, never above."""
    seen = _stop_at_fit(monkeypatch)
    with pytest.raises(_Stop):
        main(["train", "--data", small_data, "--out", str(tmp_path / "out"), *SMALL,
              "--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--warmup", "1000"])
    capsys.readouterr()
    opt, params, grads = seen["optimizer"], [np.zeros(3)], [np.ones(3)]
    lrs = []
    for _ in range(9):
        opt.update(params, grads)
        lrs.append(opt.current_lr)
    assert lrs[-1] == pytest.approx(0.01, rel=1e-12) and max(lrs) <= 0.01 * (1 + 1e-12), lrs


def test_train_runs_on_the_blas_and_numba_threads_its_flags_ask_for(tmp_path, capsys,
                                                                    small_data, monkeypatch,
                                                                    threads):
    """--threads 2 --numba-threads 1 in a process whose BLAS runs one thread and Numba two:
    BLAS on two threads and Numba on one while the model trains, each as before afterwards."""
    import numba
    from helpers import blas_thread_count
    from threadpoolctl import threadpool_limits

    from fastattn.kernels import _blas

    _blas.available()  # SciPy's BLAS, which the kernels call, loaded: limited too
    threads(2)
    with threadpool_limits(limits=2, user_api="blas"):
        if blas_thread_count() != 2:
            pytest.skip("BLAS does not run 2 threads here")
    seen = _stop_at_fit(monkeypatch, lambda: {"blas": blas_thread_count(),
                                              "numba": numba.get_num_threads()})
    with threadpool_limits(limits=1, user_api="blas"):
        with pytest.raises(_Stop):
            main(["train", "--data", small_data, "--out", str(tmp_path / "out"), *SMALL,
                  "--batch-size", "4", "--threads", "2", "--numba-threads", "1"])
        capsys.readouterr()
        assert (seen["blas"], seen["numba"]) == (2, 1)
        assert (blas_thread_count(), numba.get_num_threads()) == (1, 2)


def _train(small_data, out, *flags):
    """A run of ``fastattn train`` of a small model on small_data (9 steps of 4 an epoch):
    its metrics.json and the weights of its model.npz."""
    from fastattn.checkpoint import load_model

    assert main(["train", "--data", small_data, "--out", str(out), *SMALL, "--threads", "1",
                 "--batch-size", "4", *flags]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, load_model(out / "model.npz").params


def _record_training(monkeypatch):
    """Make Trainer.fit record the model's weights as training starts and the question
    batches its steps train on (in order), then train as usual; returns the record."""
    from fastattn.trainer import Trainer

    real_fit, record = Trainer.fit, {}

    def fit(self, x, t, **kw):
        record["first_weights"] = [p.copy() for p in self.model.params]
        record["batches"] = batches = []
        forward = self.model.forward

        def recording(xs, ts):
            batches.append(xs.copy())
            return forward(xs, ts)

        self.model.forward = recording
        try:
            return real_fit(self, x, t, **kw)
        finally:
            del self.model.forward

    monkeypatch.setattr(Trainer, "fit", fit)
    return record


def test_train_seed_decides_the_weights_and_the_batch_order(tmp_path, capsys, small_data,
                                                            monkeypatch):
    """The same --seed repeats a run exactly (first weights, batch order, losses, trained
    weights); another seed starts from other weights and takes the batches in another
    order."""
    record = _record_training(monkeypatch)
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        metrics, weights = _train(small_data, tmp_path / name, "--epochs", "1", "--seed",
                                  seed)
        runs[name] = dict(record, metrics=metrics, weights=weights)
    capsys.readouterr()
    a, b, c = runs["a"], runs["b"], runs["c"]
    for key in ("first_weights", "batches", "weights"):
        for p, q in zip(a[key], b[key], strict=True):
            np.testing.assert_array_equal(p, q, err_msg=key)
    assert [h["loss"] for h in a["metrics"]["history"]] == [
        h["loss"] for h in b["metrics"]["history"]]
    assert len(a["batches"]) == len(c["batches"]) == 9
    assert not all(np.array_equal(p, q) for p, q in zip(a["first_weights"],
                                                         c["first_weights"], strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a["batches"], c["batches"],
                                                         strict=True))


def test_train_metrics_hold_the_last_evaluation_and_milliseconds_per_step(
        tmp_path, capsys, small_data, monkeypatch):
    """Two epochs, each evaluated (a stand-in scores 0.25, then 0.75): metrics.json's
    test_accuracy is the last epoch's, the history has both, the summary prints 75.00%, and
    ms_per_step is the training time in milliseconds over the 18 steps."""
    from fastattn import trainer

    scores = iter([0.25, 0.75])
    monkeypatch.setattr(trainer, "exact_match", lambda *a, **kw: next(scores))
    metrics, _ = _train(small_data, tmp_path / "out", "--epochs", "2")
    out = capsys.readouterr().out
    assert [h["test_accuracy"] for h in metrics["history"]] == [0.25, 0.75]
    assert metrics["test_accuracy"] == 0.75 and "75.00%" in out
    assert metrics["steps"] == 18 and metrics["train_seconds"] > 0
    assert metrics["ms_per_step"] == pytest.approx(1000 * metrics["train_seconds"] / 18,
                                                   rel=1e-9)


def test_train_writes_into_runs_by_default_where_translate_looks(tmp_path, capsys, small_data,
                                                                 monkeypatch):
    """Without --out, train writes runs/model.npz in the current folder, and translate
    without --model answers with that model."""
    from fastattn.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", small_data, *SMALL, "--threads", "1", "--batch-size", "4",
                 "--epochs", "1"]) == 0
    assert (tmp_path / "runs" / "model.npz").is_file()
    assert (tmp_path / "runs" / "metrics.json").is_file()
    capsys.readouterr()
    code, out, err = run(["translate", "2/10/93"], capsys)
    assert code == 0 and err == ""
    assert out.splitlines() == load_model(tmp_path / "runs" / "model.npz").translate(["2/10/93"])


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD_DATA = {  # name -> (file content or None for a missing file, words the error must hold)
    "missing": (None, ["missing.txt"]),
    "empty": ("", ["empty.txt", "empty"]),
    "no-underscore": ("ab_c\nabcd\n", ["no-underscore.txt", "line 2"]),
    "ragged": ("ab_c\nab_c\na_bcd\n", ["ragged.txt", "line 3"]),
    "blank-line": ("ab_c\n\nab_c\n", ["blank-line.txt", "line 2"]),
    "empty-question": ("_abc\n" * 20, ["empty-question.txt", "line 1", "question"]),
    "empty-answer": ("abc_\n" * 20, ["empty-answer.txt", "line 1", "answer"]),
    "too-few-lines": ("ab_c\n" * 9, ["too-few-lines.txt", "test split"]),
    "not-utf8": (None, ["not-utf8.txt", "line 2", "UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_train_bad_data_file_is_a_one_line_error_exit_2(tmp_path, capsys, case):
    content, needles = BAD_DATA[case]
    path = tmp_path / f"{case}.txt"
    if case == "not-utf8":
        path.write_bytes(b"ab_c\na\xe9_c\n")
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    out_dir = tmp_path / "out"
    code, out, err = run(["train", "--data", str(path), "--out", str(out_dir),
                          "--batch-size", "2", "--no-progress"], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, "fastattn train", *needles)
    assert not out_dir.exists()  # a failed run leaves no output directory behind


def test_train_output_path_that_is_a_file_is_a_one_line_error_exit_2(tmp_path, capsys,
                                                                    small_data):
    out_file = tmp_path / "a-file"
    out_file.write_text("x")
    code, out, err = run(["train", "--data", small_data, "--out", str(out_file),
                          "--batch-size", "4", "--no-progress"], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(err, "output directory", "a-file")


# ============================================================================ data files


@pytest.mark.parametrize("text, line", [
    ("ab_c\n\nab_c\n", 2),  # a blank line has no '_'
    ("ab_c\nab_c\n\n", 3),  # nor has a trailing blank line
    ("_abc\n_abc\n", 1),  # an empty question
    ("abc_\nabc_\n", 1),  # an answer that is only the start symbol
])
def test_blank_lines_and_empty_questions_or_answers_name_file_and_line(tmp_path, text, line):
    path = _write(tmp_path, "odd.txt", text)
    with pytest.raises(ValueError, match=rf"odd\.txt: line {line}:"):
        sequence.load_data(path)


def test_a_directory_as_data_file_raises_file_not_found(tmp_path):
    (tmp_path / "date.d").mkdir()
    with pytest.raises(FileNotFoundError, match=r"date\.d"):
        sequence.load_data(tmp_path / "date.d")


# ============================================================================ a real terminal


@pytest.mark.parametrize("args, status, needle", [
    pytest.param(["translate", "--model", "{model}", "2/10/93 #"], 2, "'#'", id="translate"),
    pytest.param(["translate", "--model", "{missing}", "2/10/93"], 1, "missing.npz",
                 id="translate-no-model"),
    pytest.param(["train", "--epochs", "x"], 2, "--epochs", id="train-flag"),
    pytest.param(["train", "--data", "{missing}", "--out", "{out}"], 2, "missing.npz",
                 id="train-no-data"),
])
def test_python_m_fastattn_cli_shows_no_traceback(tmp_path, model_path, args, status, needle):
    fill = dict(model=model_path, missing=str(tmp_path / "missing.npz"),
                out=str(tmp_path / "out"))
    argv = [a.format(**fill) for a in args]
    proc = subprocess.run([sys.executable, "-m", "fastattn.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]
