"""Deterministic generators for the toy seq2seq tasks of ``dataset.sequence``.

Two tasks, each a list of ``question_answer`` lines (without line endings):

* ``date_lines``: a date written in one of seven human formats, answered in ISO form,
  e.g. ``'Wednesday, October 9, 1985    _1985-10-09'`` (40 characters).
* ``addition_lines``: ``a+b`` with ``0 <= a, b <= 999``, e.g. ``'16+75  _91  '`` (12 characters).

All randomness comes from a local ``random.Random(seed)`` and only through its ``random()``
method, whose sequence Python guarantees to stay the same across versions for an integer seed.
The global ``random`` and ``numpy.random`` states are never touched, and the same seed always
gives the same lines.
"""

import bisect
import datetime
import itertools
import random

__all__ = [
    "DATE_SEED",
    "ADDITION_SEED",
    "DATE_FIRST",
    "DATE_LAST",
    "DATE_QUESTION_WIDTH",
    "DATE_FORMATS",
    "ADDITION_QUESTION_WIDTH",
    "ADDITION_ANSWER_WIDTH",
    "date_lines",
    "addition_lines",
    "format_date",
]

DATE_SEED = 20170724
ADDITION_SEED = 1984

DATE_FIRST = datetime.date(1970, 1, 1)
DATE_LAST = datetime.date(2017, 7, 24)  # inclusive
DATE_QUESTION_WIDTH = 29  # len("Wednesday, September 28, 2016")

ADDITION_QUESTION_WIDTH = 7  # len("999+999")
ADDITION_ANSWER_WIDTH = 5  # len("_1998")

# (name, weight): the question formats of the date task and their shares.
DATE_FORMATS = (
    ("m/d/yy", 25),
    ("month_d_yyyy", 25),
    ("month_d_yyyy_lower", 13),
    ("month_d_yyyy_upper", 12),
    ("weekday_month_d_yyyy", 12),
    ("weekday_month_d_yyyy_lower", 6),
    ("weekday_month_d_yyyy_upper", 6),
)

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _uniform_int(rng, k):
    """An int in 0..k-1 from one ``rng.random()`` draw (k is small, so the bias is < 2**-30)."""
    return min(int(rng.random() * k), k - 1)


def _case(text, fmt):
    if fmt.endswith("_lower"):
        return text.lower()
    if fmt.endswith("_upper"):
        return text.upper()
    return text


def format_date(day, fmt, abbreviate=False):
    """Write ``day`` (a ``datetime.date``) as a question in format ``fmt``.

    ``fmt`` is one of the names in ``DATE_FORMATS``. ``abbreviate`` selects the three-letter
    month name in the ``month_d_yyyy`` forms; the weekday forms always use the full name.
    Month and weekday names are English whatever the locale.
    """
    month = _MONTHS[day.month - 1]
    if fmt == "m/d/yy":
        return f"{day.month}/{day.day}/{day.year % 100:02d}"
    if fmt.startswith("month_d_yyyy"):
        if abbreviate:
            month = month[:3]
        return _case(f"{month} {day.day}, {day.year}", fmt)
    if fmt.startswith("weekday_month_d_yyyy"):
        weekday = _WEEKDAYS[day.weekday()]
        return _case(f"{weekday}, {month} {day.day}, {day.year}", fmt)
    raise ValueError(f"unknown date format {fmt!r}; expected one of {[f for f, _ in DATE_FORMATS]}")


def date_lines(n=50000, seed=DATE_SEED):
    """Return ``n`` lines of the date task, each exactly 40 characters (no line ending).

    A line is the question left-justified in 29 characters, then ``_YYYY-MM-DD``. Dates are
    uniform over the days from 1970-01-01 to 2017-07-24 inclusive; each line's format is drawn
    with the shares of ``DATE_FORMATS`` (normalised); in the ``Month D, YYYY`` forms the month is
    the full name or its three-letter abbreviation with probability 1/2 each.
    """
    _check_n(n)
    rng = random.Random(seed)
    n_days = (DATE_LAST - DATE_FIRST).days + 1
    names = [name for name, _ in DATE_FORMATS]
    cumulative = list(itertools.accumulate(w for _, w in DATE_FORMATS))
    total = float(cumulative[-1])
    lines = []
    for _ in range(n):
        day = DATE_FIRST + datetime.timedelta(days=_uniform_int(rng, n_days))
        fmt = names[min(bisect.bisect_right(cumulative, rng.random() * total), len(names) - 1)]
        abbreviate = fmt.startswith("month_d_yyyy") and rng.random() < 0.5
        question = format_date(day, fmt, abbreviate)
        lines.append(f"{question:<{DATE_QUESTION_WIDTH}}_{day.isoformat()}")
    return lines


def addition_lines(n=50000, seed=ADDITION_SEED):
    """Return ``n`` lines of the addition task, each exactly 12 characters (no line ending).

    A line is ``a+b`` (``a``, ``b`` uniform in 0..999) left-justified in 7 characters, then
    ``_`` and the sum, left-justified in 5 characters: ``'16+75  _91  '``.
    """
    _check_n(n)
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a = _uniform_int(rng, 1000)
        b = _uniform_int(rng, 1000)
        question = f"{a}+{b}"
        answer = f"_{a + b}"
        lines.append(f"{question:<{ADDITION_QUESTION_WIDTH}}{answer:<{ADDITION_ANSWER_WIDTH}}")
    return lines
