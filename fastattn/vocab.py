"""The vocabulary of a character-level seq2seq task, and translating text with a model.

A model works on token ids; :class:`Vocabulary` knows the characters behind them and the
widths the model was trained with (the padded question length, and the answer length with its
start symbol ``_``). :func:`translate` turns plain-text questions into answers with a model and
a vocabulary. :func:`attach_vocab` gives a model its vocabulary: it sets ``vocab``,
``char_to_id``, ``id_to_char``, ``question_width``, ``answer_width`` and ``translate`` on the
model, which is what :func:`fastattn.load_model` returns for a checkpoint that holds one.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

from dataset.sequence import decode, encode
from fastattn import _checks
from fastattn._layer import positive_int

__all__ = ["Vocabulary", "attach_vocab", "translate"]

START = "_"  # the start symbol that begins every answer


@dataclass(frozen=True)
class Vocabulary:
    """Characters in id order (``chars[i]`` is the character of id i) and the widths.

    Every character is a single character and appears once, and the start symbol ``_`` is one
    of them; ValueError otherwise.
    """

    chars: tuple
    question_width: int
    answer_width: int

    def __post_init__(self):
        chars = tuple(self.chars)
        object.__setattr__(self, "chars", chars)
        if not all(isinstance(c, str) for c in chars):
            raise ValueError("the characters must be strings")
        long = [c for c in chars if len(c) != 1]
        if long:
            raise ValueError(f"char_to_id must map single characters, got {long[0]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("the characters must be distinct")
        if START not in chars:
            raise ValueError(f"char_to_id must contain the start symbol {START!r}")
        for name in ("question_width", "answer_width"):
            object.__setattr__(self, name, positive_int(_checks.scalar(getattr(self, name)),
                                                        name))

    @classmethod
    def from_char_to_id(cls, char_to_id, question_width, answer_width) -> Vocabulary:
        """The vocabulary of ``char_to_id`` (characters -> the ids 0..V-1, ints; NumPy
        integers too, bool not); TypeError/ValueError naming char_to_id otherwise."""
        c2i = {}
        for c, i in dict(char_to_id).items():
            if not _checks.is_int(i):
                raise TypeError(f"char_to_id must map characters to int ids, got {i!r:.40} "
                                f"for {c!r:.40}")
            c2i[str(c)] = int(i)
        if sorted(c2i.values()) != list(range(len(c2i))):
            raise ValueError(f"char_to_id must map {len(c2i)} characters to the ids "
                             f"0..{len(c2i) - 1}")
        chars = sorted(c2i, key=c2i.__getitem__)
        return cls(tuple(chars), question_width, answer_width)

    @functools.cached_property
    def char_to_id(self) -> dict:
        return {c: i for i, c in enumerate(self.chars)}

    @functools.cached_property
    def id_to_char(self) -> dict:
        return dict(enumerate(self.chars))

    def check_fits(self, vocab_size: int, max_len: int) -> None:
        """ValueError unless a model of ``vocab_size`` ids and ``max_len`` positions can use
        this vocabulary."""
        if len(self.chars) != vocab_size:
            raise ValueError(f"char_to_id must map {vocab_size} characters to the ids "
                             f"0..{vocab_size - 1}")
        if self.question_width > max_len or self.answer_width - 1 > max_len:
            raise ValueError(f"question_width {self.question_width} and answer_width - 1 "
                             f"{self.answer_width - 1} must be at most max_len {max_len}")

    def as_dict(self) -> dict:
        """The JSON form a checkpoint stores."""
        return {"chars": list(self.chars), "question_width": self.question_width,
                "answer_width": self.answer_width}


def translate(model, questions, vocab: Vocabulary | None = None) -> list[str]:
    """Answers for questions given as plain text (unpadded, not reversed): list[str] ->
    list[str], each without the start symbol and without trailing padding.

    ``vocab`` defaults to the model's own (see :func:`attach_vocab`). Raises RuntimeError when
    there is none, ValueError naming characters outside the vocabulary, an empty question or
    one longer than the question width.
    """
    vocab = getattr(model, "vocab", None) if vocab is None else vocab
    if vocab is None:
        raise RuntimeError("the model has no vocabulary; attach one with "
                           "fastattn.vocab.attach_vocab or use load_model")
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not one string")
    try:
        items = iter(questions)
    except TypeError:  # None, a number: Python's "not iterable" named nothing
        raise TypeError(f"questions must be a list of strings, got "
                        f"{type(questions).__name__}") from None
    questions = list(items)
    for i, q in enumerate(questions):
        if isinstance(q, str) and not q.strip():
            raise ValueError(f"questions[{i}] is empty")
    if not questions:
        return []
    xs = encode(questions, vocab.char_to_id, vocab.question_width)  # (N, question_width)
    ids = model.generate_batch(xs, vocab.char_to_id[START], vocab.answer_width - 1)
    return [decode(row, vocab.id_to_char).rstrip(" ") for row in ids]


def _translate(model, questions):
    """Answers for questions given as plain text: see :func:`fastattn.vocab.translate`."""
    return translate(model, questions)


def attach_vocab(model, char_to_id, question_width=None, answer_width=None):
    """Give ``model`` its vocabulary (a :class:`Vocabulary`, or a dict characters -> ids
    0..V-1 with the padded question width and the answer width including its start symbol):
    sets ``model.vocab``,
    ``char_to_id``, ``id_to_char``, ``question_width``, ``answer_width`` and
    ``model.translate(questions)``. Returns the model.

    ValueError when the vocabulary does not fit the model's ``config`` (vocab_size, max_len).
    """
    vocab = (char_to_id if isinstance(char_to_id, Vocabulary)
             else Vocabulary.from_char_to_id(char_to_id, question_width, answer_width))
    vocab.check_fits(model.config.vocab_size, model.config.max_len)
    model.vocab = vocab
    model.char_to_id = vocab.char_to_id
    model.id_to_char = vocab.id_to_char
    model.question_width = vocab.question_width
    model.answer_width = vocab.answer_width
    model.translate = types.MethodType(_translate, model)
    return model
