"""Toy sequence-to-sequence data with the API of the book's ``dataset.sequence``.

A data file holds one example per line, ``question_answer``: the line is split at its first
``_``, and the answer keeps that ``_``, which is the decoder's start symbol::

    16+75  _91
    Wednesday, October 9, 1985    _1985-10-09

``load_data`` turns such a file into int arrays of character ids, shuffled and split exactly as
the book does it, so that the book's own ``date.txt`` gives the same arrays and vocabulary as
the book's loader. A name is found as given, beside this module, or in a ``dataset`` folder of
a ``sys.path`` entry, where the book's scripts find the book's files. When ``date.txt`` or
``addition.txt`` is asked for and no such file exists, the lines come from
``dataset.generate`` instead (the same lines every time; not the book's lines, so the
characters get other ids and weights trained on the book's file do not fit them).

Differences from the book's loader, all on paths where the book misbehaved:

* the vocabulary is rebuilt by every ``load_data`` call (the book kept adding to one global
  dictionary across calls, so loading a second file changed the ids of the first);
* a missing file raises ``FileNotFoundError`` (the book printed a message and returned None);
* malformed lines raise ``ValueError`` naming the file and line (the book produced wrong arrays
  or a confusing NumPy error);
* only the line ending is removed (the book cut the last character of every line, which lost a
  real character on a last line without a newline); files are read as UTF-8, and a leading byte
  order mark is ignored.
"""

import os
import sys

import numpy as np

from dataset import generate

__all__ = ["load_data", "get_vocab", "get_lines", "encode", "decode"]

# Generators for the book's two files, used when the file itself cannot be found.
_GENERATORS = {
    "date.txt": generate.date_lines,
    "addition.txt": generate.addition_lines,
}
_generated = {}  # base name -> tuple of generated lines, filled on first use

# The vocabulary of the most recent ``load_data`` call (rebound, never mutated, by each call).
char_to_id = {}
id_to_char = {}


def _resolve(file_name):
    """Return ``(path, None)`` for a file to read, or ``(None, base_name)`` for a generated one.

    Order: the path as given (absolute, or relative to the working directory); a file of the
    same base name next to this module; one in a ``dataset`` folder of a ``sys.path`` entry
    (the book's layout: its scripts append the repository to ``sys.path`` and read
    ``dataset/date.txt`` there, which this installed package would otherwise hide); the
    built-in generator for ``date.txt`` and ``addition.txt``. Anything else raises
    ``FileNotFoundError``.
    """
    name = os.fspath(file_name) if isinstance(file_name, (str, os.PathLike)) else None
    if not isinstance(name, str):  # None, a number, bytes (names are text here)
        raise TypeError(f"file_name must be a str or path, got {file_name!r:.80}")
    if os.path.isfile(name):
        return name, None
    base = os.path.basename(name)
    if base:
        here = os.path.dirname(os.path.abspath(__file__))
        folders = [here] + [os.path.join(entry or os.curdir, "dataset") for entry in sys.path
                            if isinstance(entry, str)]
        for folder in folders:
            candidate = os.path.join(folder, base)
            if os.path.isfile(candidate):
                return candidate, None
    if base in _GENERATORS:
        return None, base
    raise FileNotFoundError(
        f"no data file {name!r} (looked for it as given, beside the dataset package and in "
        f"the dataset folders of sys.path; only {sorted(_GENERATORS)} can be generated)"
    )


def _read_lines(path):
    """The lines of a UTF-8 file with their line endings (``\\n`` or ``\\r\\n``) removed."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line_no}: not valid UTF-8 ({err.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text after the last newline
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _lines_and_source(file_name):
    path, base = _resolve(file_name)
    if path is not None:
        return _read_lines(path), path
    if base not in _generated:
        _generated[base] = tuple(_GENERATORS[base]())
    return list(_generated[base]), f"{base} (generated)"


def get_lines(file_name="addition.txt"):
    """Return the lines ``load_data(file_name)`` would read, without line endings, unshuffled.

    The file is found as ``load_data`` finds it (see ``_resolve``); for a generated
    ``date.txt`` or ``addition.txt`` these are the generated lines. The list is a fresh copy.
    """
    return _lines_and_source(file_name)[0]


def _check_lines(lines, source):
    """Check that every line is ``question_answer`` with the first line's lengths, and that
    neither the question nor the answer after the ``_`` is empty.

    Returns the question length. Errors name ``source`` and the 1-based line number.
    """
    if not lines:
        raise ValueError(f"{source}: the file is empty; expected lines 'question_answer'")
    q_len = a_len = None
    for line_no, line in enumerate(lines, start=1):
        idx = line.find("_")
        if idx < 0:
            raise ValueError(
                f"{source}: line {line_no}: no '_' separating question and answer: {line!r}"
            )
        if q_len is None:
            q_len, a_len = idx, len(line) - idx
            if q_len == 0 or a_len < 2:
                part = "question" if q_len == 0 else "answer after the '_'"
                raise ValueError(f"{source}: line {line_no}: the {part} is empty: {line!r}")
        elif idx != q_len or len(line) - idx != a_len:
            raise ValueError(
                f"{source}: line {line_no}: question and answer have lengths "
                f"{idx} and {len(line) - idx}, but line 1 has {q_len} and {a_len}; "
                f"all lines must be padded to the same lengths: {line!r}"
            )
    return q_len


def _to_ids(lines):
    """Map equal-length lines to ids in order of first appearance.

    A line's question followed by its answer is the line itself, so reading questions and
    answers line by line is reading the concatenation of the lines.
    Returns ``ids (N, L)``, ``char_to_id``, ``id_to_char``.
    """
    n = len(lines)
    codes = np.frombuffer("".join(lines).encode("utf-32-le"), dtype="<u4")  # (N*L,)
    uniq, first = np.unique(codes, return_index=True)  # sorted codes, first position of each
    order = np.argsort(first, kind="stable")  # uniq[order] is in order of first appearance
    id_of_uniq = np.empty(len(uniq), dtype=np.int64)
    id_of_uniq[order] = np.arange(len(uniq))
    ids = id_of_uniq[np.searchsorted(uniq, codes)].reshape(n, -1)  # (N, L)
    chars = [chr(c) for c in uniq[order]]
    c2i = {c: i for i, c in enumerate(chars)}
    i2c = dict(enumerate(chars))
    return ids, c2i, i2c


def _check_seed(seed):
    """A seed that ``numpy.random.seed`` takes, or its TypeError/ValueError again naming
    ``seed`` (NumPy's own, 'Cannot cast scalar from dtype', names no argument). Checked on a
    separate ``RandomState``: NumPy's global state is untouched."""
    if seed is None:
        return
    try:
        np.random.RandomState(seed)
    except (TypeError, ValueError) as e:
        raise type(e)(f"seed must be None or an int in [0, 2**32) (or a sequence of them), "
                      f"got {seed!r:.80} ({e})") from None


def load_data(file_name="addition.txt", seed=1984):
    """Load a ``question_answer`` file as the book's ``load_data`` does.

    Returns ``(x_train, t_train), (x_test, t_test)``: int64 arrays of character ids, ``x`` of
    shape (N, question length) and ``t`` of shape (N, answer length) including the leading
    ``_``. The rows are shuffled with ``numpy.random.seed(seed)`` (skipped when ``seed`` is
    None) then ``numpy.random.shuffle`` of the row indices, which uses and changes NumPy's
    global random state exactly as the book does; the last ``N // 10`` rows are the test split.
    The vocabulary, read back with ``get_vocab()``, is rebuilt by every call.

    ``file_name`` may be a path; see ``get_lines`` for how it is found. Raises
    ``FileNotFoundError`` for a missing file (other than ``date.txt``/``addition.txt``, which
    are then generated) and ``ValueError`` naming the file and line for a malformed one; a
    ``seed`` that ``numpy.random.seed`` refuses raises TypeError/ValueError naming ``seed``
    before anything is read or changed.
    """
    global char_to_id, id_to_char
    _check_seed(seed)
    lines, source = _lines_and_source(file_name)
    q_len = _check_lines(lines, source)
    ids, c2i, i2c = _to_ids(lines)
    x = ids[:, :q_len]  # (N, Tq)
    t = ids[:, q_len:]  # (N, Ta)
    char_to_id, id_to_char = c2i, i2c

    indices = np.arange(len(x))
    if seed is not None:
        np.random.seed(seed)
    np.random.shuffle(indices)
    x = x[indices]
    t = t[indices]

    split_at = len(x) - len(x) // 10
    (x_train, x_test) = x[:split_at], x[split_at:]
    (t_train, t_test) = t[:split_at], t[split_at:]
    return (x_train, t_train), (x_test, t_test)


def get_vocab():
    """Return ``(char_to_id, id_to_char)`` of the most recent ``load_data`` call.

    Both are empty before the first call. Loading the same file again gives equal dictionaries.
    """
    return char_to_id, id_to_char


def encode(questions, char_to_id, width):
    """Encode questions as a (N, width) int64 array of ids, each padded with spaces to ``width``.

    ``questions`` is a list of plain strings (not padded, not reversed). Raises ``ValueError``
    naming the offending characters when some are not in ``char_to_id`` (a space, used for
    padding, included) and naming the question when one is longer than ``width``.
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not one string; wrap it in a list")
    questions = list(questions)
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise TypeError(f"questions[{i}] must be a str, got {type(q).__name__}")
        if len(q) > width:
            raise ValueError(
                f"questions[{i}] has {len(q)} characters, more than the width {width}: {q!r}"
            )
    padded = [q.ljust(width) for q in questions]
    unknown = sorted({c for q in padded for c in q if c not in char_to_id})
    if unknown:
        raise ValueError(f"characters not in the vocabulary: {', '.join(repr(c) for c in unknown)}")
    out = np.empty((len(padded), width), dtype=np.int64)  # (N, width)
    for i, q in enumerate(padded):
        out[i] = [char_to_id[c] for c in q]
    return out


def decode(ids, id_to_char):
    """Turn a 1-D sequence of ids into the string of their characters (nothing stripped).

    Raises ``ValueError`` for ids that are not in ``id_to_char`` or input that is not 1-D.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    try:
        return "".join(id_to_char[int(i)] for i in arr)
    except KeyError as err:
        raise ValueError(f"id {err.args[0]} is not in the vocabulary") from None
