"""Tests of the data generators and of the book-compatible loader ``dataset.sequence``."""

import datetime
import re
import sys

import numpy as np
import pytest

from dataset import generate, sequence

N_LINES = 50000

# The date task as the contract describes it, written out here independently of the generator.
FIRST_DAY = datetime.date(1970, 1, 1)
LAST_DAY = datetime.date(2017, 7, 24)
MONTHS = {
    "january": 1,
    "february": 2,
    "march": 3,
    "april": 4,
    "may": 5,
    "june": 6,
    "july": 7,
    "august": 8,
    "september": 9,
    "october": 10,
    "november": 11,
    "december": 12,
}
ABBREVIATIONS = {
    "jan": 1,
    "feb": 2,
    "mar": 3,
    "apr": 4,
    "may": 5,
    "jun": 6,
    "jul": 7,
    "aug": 8,
    "sep": 9,
    "oct": 10,
    "nov": 11,
    "dec": 12,
}
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]

_FULL = "|".join(m.capitalize() for m in MONTHS)
_ANY = "|".join(m.capitalize() for m in list(MONTHS) + list(ABBREVIATIONS))
_DAY = "[1-9]|[12][0-9]|3[01]"
_MONTH_FORM = rf"(?P<month>{_ANY}) (?P<day>{_DAY}), (?P<year>[0-9]{{4}})"
_WEEKDAY_FORM = (
    rf"(?P<weekday>{'|'.join(w.capitalize() for w in WEEKDAYS)}), "
    rf"(?P<month>{_FULL}) (?P<day>{_DAY}), (?P<year>[0-9]{{4}})"
)


def _cased(pattern, case):
    """The pattern with its capitalised names lower- or upper-cased (group names are lower)."""
    change = str.lower if case == "lower" else str.upper
    return re.sub(r"[A-Z][a-z]+", lambda m: change(m.group()), pattern)


# (share in percent, compiled full-match pattern)
DATE_FORMS = [
    (25, re.compile(rf"(?P<month>1[0-2]|[1-9])/(?P<day>{_DAY})/(?P<yy>[0-9]{{2}})")),
    (25, re.compile(_MONTH_FORM)),
    (13, re.compile(_cased(_MONTH_FORM, "lower"))),
    (12, re.compile(_cased(_MONTH_FORM, "upper"))),
    (12, re.compile(_WEEKDAY_FORM)),
    (6, re.compile(_cased(_WEEKDAY_FORM, "lower"))),
    (6, re.compile(_cased(_WEEKDAY_FORM, "upper"))),
]
MONTH_FORMS = (1, 2, 3)
WEEKDAY_FORMS = (4, 5, 6)


@pytest.fixture(scope="module")
def date_lines():
    return generate.date_lines(N_LINES)


@pytest.fixture(scope="module")
def addition_lines():
    return generate.addition_lines(N_LINES)


def _classify(question):
    """Indices of the forms the question matches, and the last match."""
    hits = [(i, m) for i, (_, p) in enumerate(DATE_FORMS) if (m := p.fullmatch(question))]
    return [i for i, _ in hits], (hits[-1][1] if hits else None)


def _parse(form, match):
    """The date a matched question names, computed without the generator's tables."""
    day = int(match["day"])
    if form == 0:
        yy = int(match["yy"])
        year = 1900 + yy if yy >= 70 else 2000 + yy
        return datetime.date(year, int(match["month"]), day)
    name = match["month"].lower()
    month = MONTHS.get(name) or ABBREVIATIONS[name]
    return datetime.date(int(match["year"]), month, day)


def _write(tmp_path, name, lines, ending="\n"):
    path = tmp_path / name
    path.write_bytes("".join(line + ending for line in lines).encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- generators


def test_date_questions_match_exactly_one_format_and_name_the_answer(date_lines):
    for line in date_lines:
        question, answer = line[:29].rstrip(" "), line[30:]
        forms, match = _classify(question)
        assert len(forms) == 1, (line, forms)
        day = datetime.date.fromisoformat(answer)
        assert answer == day.isoformat()  # zero-padded ISO form
        assert FIRST_DAY <= day <= LAST_DAY, line
        assert _parse(forms[0], match) == day, line
        if forms[0] in WEEKDAY_FORMS:
            assert match["weekday"].lower() == WEEKDAYS[day.weekday()], line


def test_date_questions_also_parse_with_strptime(date_lines):
    # A second, library-based parse of a sample: strptime matches names case-insensitively.
    for line in date_lines[:2000]:
        question, answer = line[:29].rstrip(" "), line[30:]
        for fmt in ("%m/%d/%y", "%B %d, %Y", "%b %d, %Y", "%A, %B %d, %Y"):
            try:
                parsed = datetime.datetime.strptime(question, fmt).date()
                break
            except ValueError:
                continue
        else:
            pytest.fail(f"strptime parses none of the formats: {line!r}")
        assert parsed.isoformat() == answer, line


def test_date_format_shares_are_as_specified(date_lines):
    counts = np.zeros(len(DATE_FORMS))
    for line in date_lines:
        counts[_classify(line[:29].rstrip(" "))[0][0]] += 1
    n = len(date_lines)
    shares = counts / n
    expected = np.array([share for share, _ in DATE_FORMS], dtype=float)
    expected /= expected.sum()
    # Each count is binomial: a share is off by sigma = sqrt(p (1 - p) / n) (0.15 to 0.19
    # points here); 5 sigma passes a right generator and fails one whose shares are a whole
    # point off (13 and 12 exchanged, say: about 6.6 sigma).
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(shares - expected) <= 5 * sigma), (shares, expected, sigma)


def test_month_forms_mix_full_and_abbreviated_names(date_lines):
    full = abbreviated = 0
    for line in date_lines:
        forms, match = _classify(line[:29].rstrip(" "))
        if forms[0] in MONTH_FORMS:
            name = match["month"].lower()
            if name == "may":  # both the full name and its abbreviation
                continue
            if name in MONTHS:
                full += 1
            else:
                abbreviated += 1
        elif forms[0] in WEEKDAY_FORMS:
            assert match["month"].lower() in MONTHS, line
    # full or abbreviated with probability 1/2 each: within 5 binomial standard deviations
    n = full + abbreviated
    assert abs(full / n - 0.5) <= 5 * np.sqrt(0.25 / n), (full, abbreviated)


class _ConstantRandom:
    """Stands in for ``random.Random``: every ``random()`` draw returns the same value."""

    value = 0.0

    def __init__(self, seed=None):
        pass

    def random(self):
        return self.value


@pytest.mark.parametrize("u, answer", [(0.0, FIRST_DAY), (1.0 - 2.0 ** -53, LAST_DAY)])
def test_the_lowest_and_highest_draws_give_the_first_and_last_day(monkeypatch, u, answer):
    """Both ends of the date range are inclusive. The generator draws only through
    ``random.Random(seed).random()``, and a uniform draw in [0, 1) maps onto the days in order:
    the lowest draw is the first day, the highest (the float just below 1) the last one."""
    monkeypatch.setattr(generate.random, "Random", type("R", (_ConstantRandom,), {"value": u}))
    [line] = generate.date_lines(1)
    assert line[30:] == answer.isoformat(), line
    [line] = generate.addition_lines(1)
    expect = "0+0" if u == 0.0 else "999+999"
    assert line[:7].rstrip(" ") == expect, line


def test_date_dates_cover_the_whole_range(date_lines):
    days = sorted({line[30:] for line in date_lines})
    years = {int(d[:4]) for d in days}
    assert years == set(range(FIRST_DAY.year, LAST_DAY.year + 1))


def test_date_lines_are_40_chars_with_question_padded_to_29(date_lines):
    assert len(date_lines) == N_LINES
    for line in date_lines:
        assert len(line) == 40, line
        assert line[29] == "_" and line.index("_") == 29, line
        assert line[:29] == line[:29].rstrip(" ").ljust(29), line
        assert not line[:29].startswith(" "), line


def test_longest_date_question_fits():
    question = generate.format_date(datetime.date(2016, 9, 28), "weekday_month_d_yyyy")
    assert question == "Wednesday, September 28, 2016"
    assert len(question) <= 29


def test_addition_lines_are_12_chars_and_sum_correctly(addition_lines):
    assert len(addition_lines) == N_LINES
    pattern = re.compile(r"(?P<a>0|[1-9][0-9]{0,2})\+(?P<b>0|[1-9][0-9]{0,2}) *")
    first, second = set(), set()
    for line in addition_lines:
        assert len(line) == 12, line
        question, answer = line[:7], line[7:]
        match = pattern.fullmatch(question)
        assert match, line
        assert answer.startswith("_") and answer == answer.rstrip(" ").ljust(5), line
        a, b = int(match["a"]), int(match["b"])
        assert int(answer[1:]) == a + b, line
        first.add(a)
        second.add(b)
    # each operand on its own takes every value 0..999 (50 draws of each expected)
    assert first == set(range(1000)) and second == set(range(1000))


def test_generators_are_deterministic(date_lines, addition_lines):
    assert generate.date_lines(N_LINES) == date_lines
    assert generate.addition_lines(N_LINES) == addition_lines
    assert generate.date_lines(100) == date_lines[:100]
    assert generate.date_lines(100, seed=1) != date_lines[:100]


@pytest.mark.parametrize("gen", [generate.date_lines, generate.addition_lines])
@pytest.mark.parametrize("n", [-1, True, 2.0, "3", None])
def test_a_line_count_that_is_not_a_non_negative_int_raises(gen, n):
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        gen(n)


def test_generators_leave_global_random_state_alone():
    import random

    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.random())
    random.seed(7)
    np.random.seed(7)
    generate.date_lines(100)
    generate.addition_lines(100)
    assert (random.random(), np.random.random()) == expected


# ----------------------------------------------------------------------------- load_data


def test_load_data_twice_gives_identical_arrays_and_vocab():
    first = sequence.load_data("date.txt")
    vocab = sequence.get_vocab()
    second = sequence.load_data("date.txt")
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert sequence.get_vocab() == vocab


def test_generated_date_file_has_the_book_shapes():
    (x, t), (x_test, t_test) = sequence.load_data("date.txt")
    assert x.shape == (N_LINES - N_LINES // 10, 29) and t.shape == (len(x), 11)
    assert x_test.shape == (N_LINES // 10, 29) and t_test.shape == (len(x_test), 11)
    char_to_id, _ = sequence.get_vocab()
    assert np.all(t[:, 0] == char_to_id["_"]) and np.all(t_test[:, 0] == char_to_id["_"])
    assert np.issubdtype(x.dtype, np.integer)


def test_vocabulary_is_in_order_of_first_appearance(tmp_path):
    lines = ["ab _xa", "ca _by", "zz _zq"]
    path = _write(tmp_path, "toy.txt", lines)
    sequence.load_data(path, seed=0)
    char_to_id, id_to_char = sequence.get_vocab()
    expected = []
    for line in lines:  # question, then answer, line by line
        for c in line:
            if c not in expected:
                expected.append(c)
    assert list(char_to_id) == expected
    assert char_to_id == {c: i for i, c in enumerate(expected)}
    assert id_to_char == {i: c for c, i in char_to_id.items()}


def test_arrays_hold_each_lines_question_and_answer(tmp_path):
    lines = [f"{i:>3}+{i % 7}_{i + i % 7:<4}" for i in range(40)]
    path = _write(tmp_path, "sums.txt", lines)
    (x, t), (x_test, t_test) = sequence.load_data(path, seed=3)
    char_to_id, id_to_char = sequence.get_vocab()
    rows = [
        sequence.decode(q, id_to_char) + sequence.decode(a, id_to_char)
        for q, a in zip(np.concatenate([x, x_test]), np.concatenate([t, t_test]), strict=True)
    ]
    assert sorted(rows) == sorted(lines)
    assert all(sequence.decode(a, id_to_char).startswith("_") for a in t)


def test_split_and_shuffle_follow_the_book(tmp_path):
    n, seed = 25, 42
    lines = [f"{i:02d}_{i:02d}" for i in range(n)]
    path = _write(tmp_path, "split.txt", lines)
    (x, t), (x_test, t_test) = sequence.load_data(path, seed=seed)
    assert len(x_test) == n // 10 and len(x) == n - n // 10
    order = np.arange(n)
    np.random.seed(seed)
    np.random.shuffle(order)
    _, id_to_char = sequence.get_vocab()
    got = [int(sequence.decode(row, id_to_char)) for row in np.concatenate([x, x_test])]
    assert got == order.tolist()


def test_seed_none_shuffles_with_the_global_state(tmp_path):
    n = 30
    path = _write(tmp_path, "none.txt", [f"{i:02d}_{i:02d}" for i in range(n)])
    np.random.seed(5)
    (x, t), (x_test, t_test) = sequence.load_data(path, seed=None)
    assert x.shape == (n - n // 10, 2) and t.shape == (n - n // 10, 3)
    assert x_test.shape == (n // 10, 2) and t_test.shape == (n // 10, 3)
    np.random.seed(5)
    again = sequence.load_data(path, seed=None)
    assert np.array_equal(again[0][0], x)


@pytest.mark.parametrize("seed, err", [("x", TypeError), (1.5, TypeError),
                                       ([1, 2, "a"], TypeError), (-1, ValueError),
                                       (2**32, ValueError)],
                         ids=["str", "float", "list-with-str", "negative", "beyond-2**32"])
def test_a_bad_seed_raises_naming_seed_before_anything_changes(tmp_path, seed, err):
    """NumPy's own errors from numpy.random.seed ('Cannot cast scalar from dtype', 'Seed must
    be between 0 and 2**32 - 1') named no argument, and came after the vocabulary was
    replaced."""
    path = _write(tmp_path, "seed.txt", ["ab_c", "de_f"])
    sequence.load_data(path, seed=0)
    vocab = sequence.get_vocab()
    with pytest.raises(err, match="^seed must be None or an int in \\[0, 2\\*\\*32\\)"):
        sequence.load_data(_write(tmp_path, "other.txt", ["xy_z"]), seed=seed)
    assert sequence.get_vocab() == vocab
    sequence.load_data(path, seed=np.uint32(2**32 - 1))  # NumPy integers are seeds


def test_written_date_file_loads_like_the_built_in_one(tmp_path, date_lines):
    path = _write(tmp_path, "date.txt", date_lines)
    from_file = sequence.load_data(str(path))
    vocab_file = sequence.get_vocab()
    built_in = sequence.load_data("date.txt")
    vocab_built_in = sequence.get_vocab()
    for a, b in zip(from_file[0] + from_file[1], built_in[0] + built_in[1], strict=True):
        assert np.array_equal(a, b)
    assert vocab_file == vocab_built_in
    assert list(vocab_file[0]) == list(vocab_built_in[0])


def test_crlf_file_loads_like_lf_and_trailing_spaces_are_kept(tmp_path):
    lines = ["1+1  _2  ", "10+10_20 ", "3+4  _7  "]
    lf = sequence.load_data(_write(tmp_path, "lf.txt", lines), seed=1)
    vocab_lf = sequence.get_vocab()
    crlf = sequence.load_data(_write(tmp_path, "crlf.txt", lines, ending="\r\n"), seed=1)
    assert sequence.get_vocab() == vocab_lf
    for a, b in zip(lf[0] + lf[1], crlf[0] + crlf[1], strict=True):
        assert np.array_equal(a, b)
    assert lf[0][1].shape[1] == 4  # "_2  ": the answer's padding is data
    assert "\r" not in vocab_lf[0] and "\n" not in vocab_lf[0]


def test_last_line_without_newline_keeps_its_last_character(tmp_path):
    path = tmp_path / "nonl.txt"
    path.write_text("ab_cd\nef_gh", encoding="utf-8")
    assert sequence.get_lines(path) == ["ab_cd", "ef_gh"]
    sequence.load_data(path)
    assert "h" in sequence.get_vocab()[0]


def test_vocab_is_rebuilt_by_each_load(tmp_path):
    sequence.load_data(_write(tmp_path, "a.txt", ["ab_c"]))
    sequence.load_data(_write(tmp_path, "b.txt", ["xy_z"]))
    assert sequence.get_vocab() == (
        {"x": 0, "y": 1, "_": 2, "z": 3},
        {0: "x", 1: "y", 2: "_", 3: "z"},
    )


def test_a_leading_byte_order_mark_is_ignored(tmp_path):
    lines = ["1+1  _2  ", "10+10_20 ", "3+4  _7  "]
    plain = sequence.load_data(_write(tmp_path, "plain.txt", lines), seed=1)
    vocab = sequence.get_vocab()
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(line + "\n" for line in lines).encode("utf-8"))
    assert sequence.get_lines(path) == lines
    with_bom = sequence.load_data(path, seed=1)
    assert sequence.get_vocab() == vocab and "\ufeff" not in vocab[0]
    for a, b in zip(plain[0] + plain[1], with_bom[0] + with_bom[1], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["date.txt", "addition.txt"])
def test_an_existing_file_of_a_generated_name_is_read_not_generated(tmp_path, monkeypatch, name):
    """The book's own date.txt (or any file so named) is what load_data reads, by path or by
    a name relative to the working directory; generation is only for a missing file."""
    lines = ["ab _xy", "ba _yx", "aa _xx", "bb _yy"]
    path = _write(tmp_path, name, lines)
    for given in (path, str(path), name):
        monkeypatch.chdir(tmp_path)
        assert sequence.get_lines(given) == lines
        (x, t), (x_test, t_test) = sequence.load_data(given, seed=0)
        assert len(x) + len(x_test) == len(lines) and x.shape[1] == 3 and t.shape[1] == 3
        assert list(sequence.get_vocab()[0]) == ["a", "b", " ", "_", "x", "y"]


def test_a_file_beside_the_dataset_package_is_found_by_its_name(tmp_path, monkeypatch):
    """As in the book, whose data files sit in its dataset folder: a name that is not found
    from the working directory is looked for beside the dataset.sequence module."""
    package = tmp_path / "package"
    package.mkdir()
    monkeypatch.setattr(sequence, "__file__", str(package / "sequence.py"))
    _write(package, "date.txt", ["ab_c", "de_f"])
    _write(package, "toy.txt", ["gh_i", "jk_l"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert sequence.get_lines("toy.txt") == ["gh_i", "jk_l"]
    assert sequence.get_lines("date.txt") == ["ab_c", "de_f"]  # read, not generated
    assert sequence.get_lines(elsewhere / "toy.txt") == ["gh_i", "jk_l"]  # by base name


def test_the_books_dataset_folder_on_sys_path_is_read_not_generated(tmp_path, monkeypatch):
    """The book's scripts run in its chapter folders and append the repository to sys.path,
    where dataset/date.txt lies; this installed package hides the book's dataset package, but
    its loader still reads that file (its ids are the book's) instead of generating lines."""
    book = tmp_path / "book"
    (book / "dataset").mkdir(parents=True)
    (book / "ch08").mkdir()
    lines = ["ab _xy", "ba _yx", "aa _xx", "bb _yy"]
    _write(book / "dataset", "date.txt", lines)
    _write(book / "dataset", "toy.txt", ["gh_i", "jk_l"])
    monkeypatch.chdir(book / "ch08")
    monkeypatch.syspath_prepend(str(tmp_path / "unrelated"))  # an entry without the file
    monkeypatch.setattr(sys, "path", [*sys.path, ".."])  # sys.path.append('..'), as the book
    assert sequence.get_lines("date.txt") == lines
    assert sequence.get_lines("toy.txt") == ["gh_i", "jk_l"]
    want = sequence.load_data(book / "dataset" / "date.txt", seed=0)
    got = sequence.load_data("date.txt", seed=0)
    for a, b in zip(want[0] + want[1], got[0] + got[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert list(sequence.get_vocab()[0]) == ["a", "b", " ", "_", "x", "y"]


def test_a_file_beside_the_package_comes_before_one_in_a_sys_path_dataset_folder(tmp_path,
                                                                                  monkeypatch):
    """The order of the look-up: as given, beside the dataset.sequence module, then the
    dataset folders of sys.path, so a file in such a folder does not shadow the one beside."""
    package = tmp_path / "package"
    package.mkdir()
    monkeypatch.setattr(sequence, "__file__", str(package / "sequence.py"))
    _write(package, "toy.txt", ["ab_c"])
    (tmp_path / "book" / "dataset").mkdir(parents=True)
    _write(tmp_path / "book" / "dataset", "toy.txt", ["de_f"])
    monkeypatch.syspath_prepend(str(tmp_path / "book"))
    monkeypatch.chdir(tmp_path)
    assert sequence.get_lines("toy.txt") == ["ab_c"]
    _write(tmp_path, "toy.txt", ["gh_i"])
    assert sequence.get_lines("toy.txt") == ["gh_i"]  # as given: from the working directory


def test_get_lines_of_a_generated_file_is_a_fresh_list_each_time():
    lines = sequence.get_lines("addition.txt")
    assert isinstance(lines, list) and len(lines) == N_LINES
    lines.clear()
    assert len(sequence.get_lines("addition.txt")) == N_LINES
    (x, _), (x_test, _) = sequence.load_data("addition.txt")
    assert len(x) + len(x_test) == N_LINES


def test_relative_path_is_resolved_from_the_working_directory(tmp_path, monkeypatch):
    _write(tmp_path, "rel.txt", ["qq_a", "rr_b"])
    monkeypatch.chdir(tmp_path)
    (x, t), _ = sequence.load_data("rel.txt", seed=0)
    assert x.shape == (2, 2)


# ----------------------------------------------------------------------------- errors


def test_missing_file_of_another_name_raises_file_not_found(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        sequence.load_data(missing)


@pytest.mark.parametrize("file_name", [5, None, 1.5, b"date.txt", ["date.txt"]],
                         ids=["int", "none", "float", "bytes", "list"])
def test_a_file_name_that_is_not_a_str_or_path_raises_type_error_naming_it(file_name):
    """5, None, 1.5 and a list gave os.fspath's 'expected str, bytes or os.PathLike object',
    which named no argument."""
    for call in (sequence.load_data, sequence.get_lines):
        with pytest.raises(TypeError, match="^file_name must be a str or path"):
            call(file_name)


def test_line_without_underscore_names_file_and_line(tmp_path):
    path = _write(tmp_path, "broken.txt", ["ab_c", "de_f", "ghij", "kl_m"])
    with pytest.raises(ValueError, match=r"broken\.txt.*line 3"):
        sequence.load_data(path)


def test_lines_of_different_lengths_name_the_line(tmp_path):
    path = _write(tmp_path, "ragged.txt", ["ab_c", "de_f", "g_hi", "jk_l"])
    with pytest.raises(ValueError, match=r"ragged\.txt.*line 3"):
        sequence.load_data(path)
    path = _write(tmp_path, "longer.txt", ["ab_c", "de_f", "gh_i", "jk_lm"])
    with pytest.raises(ValueError, match=r"longer\.txt.*line 4"):
        sequence.load_data(path)


@pytest.mark.parametrize("first", ["_abc", "ab_"], ids=["empty question", "empty answer"])
def test_an_empty_question_or_answer_names_file_and_line(tmp_path, first):
    path = _write(tmp_path, "hollow.txt", [first, first])
    with pytest.raises(ValueError, match=r"hollow\.txt.*line 1.*empty"):
        sequence.load_data(path)


def test_empty_file_raises_value_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt"):
        sequence.load_data(path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ab_c\nd\xe9_f\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*line 2"):
        sequence.load_data(path)


# ----------------------------------------------------------------------------- encode/decode


def test_encode_pads_with_spaces_and_decode_inverts():
    char_to_id = {c: i for i, c in enumerate("12+ _")}
    id_to_char = {i: c for c, i in char_to_id.items()}
    ids = sequence.encode(["1+2", "21"], char_to_id, 5)
    assert ids.shape == (2, 5) and np.issubdtype(ids.dtype, np.integer)
    assert [sequence.decode(row, id_to_char) for row in ids] == ["1+2  ", "21   "]


def test_encode_unknown_character_names_it():
    char_to_id = {c: i for i, c in enumerate("12+ ")}
    with pytest.raises(ValueError, match="'x'"):
        sequence.encode(["1+x"], char_to_id, 4)


def test_encode_names_the_padding_space_when_the_vocabulary_lacks_it():
    char_to_id = {c: i for i, c in enumerate("12+")}
    assert sequence.encode(["1+2"], char_to_id, 3).tolist() == [[0, 2, 1]]  # no padding
    with pytest.raises(ValueError, match="characters not in the vocabulary: ' '"):
        sequence.encode(["1+2", "12"], char_to_id, 3)


def test_encode_too_long_question_raises():
    char_to_id = {c: i for i, c in enumerate("12+ ")}
    with pytest.raises(ValueError, match="width"):
        sequence.encode(["1+2+1"], char_to_id, 4)


def test_decode_unknown_id_raises():
    with pytest.raises(ValueError, match="7"):
        sequence.decode([0, 7], {0: "a"})
