"""``fastattn translate``: answer questions with a trained model, one answer a line.

    fastattn translate "September 27, 1994" "2/10/93"
    printf 'September 27, 1994\\n2/10/93\\n' | fastattn translate

Questions come from the arguments, or from standard input (one a line) when there are none.
A question that is empty, too long or has characters outside the model's vocabulary is a
one-line error and exit status 2.
"""

from __future__ import annotations

import sys

HELP = "translate questions (e.g. dates) with a model saved by 'fastattn train'"


def configure(parser):
    from fastattn.kernels import BACKENDS

    parser.add_argument("text", nargs="*", metavar="TEXT",
                        help="questions; read from standard input, one a line, when none given")
    parser.add_argument("--model", default="runs/model.npz",
                        help="checkpoint written by 'fastattn train' (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="kernel backend (default: the current one, normally numba)")


def _error(msg: str, code: int = 2) -> int:
    print(f"fastattn translate: error: {msg}", file=sys.stderr)
    return code


def _problem(i: int, q: str, model) -> str | None:
    """Why question number i (1-based) cannot be translated, or None."""
    if not q:
        return f"question {i} is empty"
    if len(q) > model.question_width:
        return (f"question {i} {q!r} has {len(q)} characters, more than the model's "
                f"{model.question_width}")
    unknown = sorted({c for c in q if c not in model.char_to_id})
    if unknown:
        return (f"question {i} {q!r} has characters outside the model's vocabulary: "
                + ", ".join(repr(c) for c in unknown))
    return None


def run(args) -> int:
    from fastattn.checkpoint import load_model

    if args.text:
        questions = [q.strip() for q in args.text]
    else:
        try:
            questions = [line.rstrip("\r\n").strip() for line in sys.stdin]
        except UnicodeDecodeError as exc:
            return _error(f"standard input is not valid {exc.encoding} text ({exc.reason})")
        if not questions:
            return _error("no questions: give them as arguments or on standard input")
    try:
        model = load_model(args.model, backend=args.backend)
    except FileNotFoundError:
        return _error(f"no model at {args.model!r}; train one with 'fastattn train' or pass "
                      f"--model PATH", 1)
    except ValueError as exc:
        return _error(str(exc).replace("\n", " "), 1)
    if getattr(model, "vocab", None) is None:
        return _error(f"{args.model} holds no vocabulary; it cannot translate text", 1)
    for i, q in enumerate(questions, start=1):
        problem = _problem(i, q, model)
        if problem:
            return _error(problem)
    for answer in model.translate(questions):
        print(answer)
    return 0
