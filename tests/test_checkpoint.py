"""Checkpoints: round trip, atomic writes, no pickles, clear errors; translate's plumbing."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile

import numpy as np
import pytest

import fastattn
from dataset import sequence
from fastattn.checkpoint import load_model, save_model
from fastattn.transformer import TransformerSeq2seq
from fastattn.vocab import Vocabulary, attach_vocab, translate


@pytest.fixture(scope="module")
def vocab():
    sequence.load_data("date.txt")
    c2i, i2c = sequence.get_vocab()
    return c2i, i2c


def make_model(V, seed=0, **kw):
    cfg = dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=29)
    cfg.update(kw)
    return TransformerSeq2seq(V, **cfg, seed=seed)


def date_questions():
    return ["September 27, 1994", "2/10/93", "thursday, may 8, 1997", "OCT 25, 1999"]


def test_round_trip_gives_identical_outputs(tmp_path, vocab):
    c2i, _ = vocab
    model = make_model(len(c2i))
    attach_vocab(model, c2i, 29, 11)
    path = save_model(model, tmp_path / "m.npz")
    loaded = load_model(path)
    assert loaded.config == model.config
    for a, b in zip(model.params, loaded.params, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    xs = sequence.encode(date_questions(), c2i, 29)
    ts = np.random.default_rng(0).integers(0, len(c2i), (4, 11))
    assert model.forward(xs, ts) == loaded.forward(xs, ts)
    np.testing.assert_array_equal(model.generate_batch(xs, c2i["_"], 10),
                                  loaded.generate_batch(xs, c2i["_"], 10))
    assert loaded.translate(date_questions()) == model.translate(date_questions())


def test_a_checkpoint_in_the_version_1_layout_loads(tmp_path, vocab):
    """The archive written by hand, key by key, as version 1 lays it out (the config a JSON
    object of the constructor's arguments and the class, the vocabulary the characters in id
    order and the two widths): it loads into a model with those weights and vocabulary."""
    c2i, i2c = vocab
    model = make_model(len(c2i), seed=4)
    config = {"vocab_size": len(c2i), "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32,
              "max_len": 29, "pos": "both", "dtype": "float32", "model": "TransformerSeq2seq"}
    vocab_json = {"chars": [i2c[i] for i in range(len(i2c))], "question_width": 29,
                  "answer_width": 11}
    arrays = {"format": np.array("fastattn-checkpoint"), "version": np.array(1),
              "config": np.array(json.dumps(config)), "vocab": np.array(json.dumps(vocab_json)),
              "names": np.array(json.dumps(model.param_names)), "meta": np.array("{}")}
    arrays.update({f"w{i:03d}": p for i, p in enumerate(model.params)})
    path = tmp_path / "v1.npz"
    np.savez(path, **arrays)
    loaded = load_model(path)
    assert loaded.char_to_id == c2i and loaded.id_to_char == i2c
    assert (loaded.question_width, loaded.answer_width) == (29, 11)
    for a, b in zip(model.params, loaded.params, strict=True):
        np.testing.assert_array_equal(a, b)
    attach_vocab(model, c2i, 29, 11)
    assert loaded.translate(date_questions()) == model.translate(date_questions())
    resaved = np.load(save_model(loaded, tmp_path / "again.npz"))
    for key in ("config", "vocab", "names"):
        assert json.loads(str(resaved[key])) == json.loads(str(arrays[key])), key


def test_load_model_is_exported_and_carries_the_vocabulary(tmp_path, vocab):
    c2i, i2c = vocab
    model = make_model(len(c2i))
    attach_vocab(model, c2i, 29, 11)
    save_model(model, tmp_path / "m.npz")
    loaded = fastattn.load_model(tmp_path / "m.npz")
    assert loaded.char_to_id == c2i
    assert loaded.id_to_char == i2c


def test_translate_returns_what_generate_batch_decodes(vocab):
    c2i, i2c = vocab
    model = make_model(len(c2i), seed=3)
    attach_vocab(model, c2i, 29, 11)
    qs = date_questions()
    ids = model.generate_batch(sequence.encode(qs, c2i, 29), c2i["_"], 10)
    expected = [sequence.decode(row, i2c).rstrip(" ") for row in ids]
    assert model.translate(qs) == expected
    assert all(isinstance(a, str) and len(a) <= 10 for a in expected)
    assert model.translate([]) == []


def test_an_answer_width_of_max_len_plus_the_start_symbol_fits(vocab):
    """answer_width counts the start symbol, which the decoder is given, not asked for: a
    model of max_len positions answers with up to max_len ids, so answer_width max_len + 1
    fits (and translate decodes all of it) while max_len + 2 does not."""
    c2i, i2c = vocab
    model = make_model(len(c2i), seed=3, max_len=10)
    with pytest.raises(ValueError, match="answer_width"):
        attach_vocab(model, c2i, 10, 12)
    attach_vocab(model, c2i, 10, 11)
    qs = ["2/10/93", "oct 9, 85"]
    ids = model.generate_batch(sequence.encode(qs, c2i, 10), c2i["_"], 10)
    assert ids.shape == (2, 10)
    assert model.translate(qs) == [sequence.decode(row, i2c).rstrip(" ") for row in ids]


def test_translate_errors(vocab):
    c2i, _ = vocab
    model = make_model(len(c2i))
    with pytest.raises(RuntimeError, match="vocabulary"):
        translate(model, ["2/10/93"])
    attach_vocab(model, c2i, 29, 11)
    with pytest.raises(ValueError, match="'#'"):
        model.translate(["2/10/93#"])
    with pytest.raises(ValueError, match="empty"):
        model.translate([""])
    with pytest.raises(ValueError, match="width"):
        model.translate(["x" * 30])
    with pytest.raises(TypeError, match="list"):
        model.translate("2/10/93")
    for bad in (None, 5):  # Python's "object is not iterable" named nothing
        with pytest.raises(TypeError, match="^questions must be a list of strings, got"):
            model.translate(bad)

    def questions():  # a TypeError of the caller's own iterable is the caller's, unchanged
        yield "2/10/93"
        raise TypeError("the caller's own error")

    with pytest.raises(TypeError, match="^the caller's own error$"):
        model.translate(questions())


def test_a_question_of_only_spaces_is_an_empty_question(vocab):
    c2i, _ = vocab
    model = attach_vocab(make_model(len(c2i)), c2i, 29, 11)
    for question in ("", " ", "   "):
        with pytest.raises(ValueError, match=r"questions\[1\] is empty"):
            model.translate(["2/10/93", question])


@pytest.mark.parametrize("char_to_id", [{"a": 0, "_": 2}, {"a": 1, "_": 2}, {"a": 0, "_": 0}])
def test_a_char_to_id_whose_ids_are_not_0_to_v_minus_1_is_rejected(char_to_id):
    """The ids of a vocabulary are the rows of the model's embedding: a dictionary with a gap
    or a repeat would be silently renumbered, so it is an error."""
    with pytest.raises(ValueError, match="ids 0..1"):
        Vocabulary.from_char_to_id(char_to_id, 3, 2)
    assert Vocabulary.from_char_to_id({"_": 1, "a": 0}, 3, 2).chars == ("a", "_")


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, vocab, monkeypatch):
    c2i, _ = vocab
    model = make_model(len(c2i))
    path = tmp_path / "m.npz"
    save_model(model, path)
    before = path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]

    # a crash while writing: the old file is untouched and no temporary is left
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(make_model(len(c2i), seed=9), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_save_writes_a_temporary_then_renames(tmp_path, vocab, monkeypatch):
    c2i, _ = vocab
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst), os.path.exists(src)))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    save_model(make_model(len(c2i)), tmp_path / "m.npz")
    assert len(seen) == 1
    src, dst, existed = seen[0]
    assert dst == "m.npz" and src != "m.npz" and existed


def test_checkpoint_holds_no_pickles(tmp_path, vocab):
    c2i, _ = vocab
    model = make_model(len(c2i))
    attach_vocab(model, c2i, 29, 11)
    save_model(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        for key in z.files:
            assert z[key].dtype != object
        assert json.loads(str(z["config"]))["d_model"] == 16


def test_checkpoint_that_does_not_fit_the_model(tmp_path, vocab):
    c2i, _ = vocab
    save_model(make_model(len(c2i), d_model=16), tmp_path / "m.npz")
    other = make_model(len(c2i), d_model=32, n_heads=2)
    with pytest.raises(ValueError, match="does not fit.*d_model"):
        load_model(tmp_path / "m.npz", other)
    # same configuration, but a weight of another shape in the file
    model = make_model(len(c2i))
    save_model(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["w005"] = np.zeros((3, 3), np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"bad\.npz.*does not fit.*shape \(3, 3\)"):
        load_model(tmp_path / "bad.npz")
    # same configuration, a weight missing
    del arrays["w005"]
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(ValueError, match="short.npz"):
        load_model(tmp_path / "short.npz")


def test_load_into_a_fitting_model(tmp_path, vocab):
    c2i, _ = vocab
    src = make_model(len(c2i), seed=1)
    save_model(src, tmp_path / "m.npz")
    dst = make_model(len(c2i), seed=2)
    refs = list(dst.params)
    assert load_model(tmp_path / "m.npz", dst) is dst
    for a, b, r in zip(src.params, dst.params, refs, strict=True):
        np.testing.assert_array_equal(a, b)
        assert b is r  # loaded in place: an optimizer's references stay valid


def test_a_float32_checkpoint_loads_into_a_float64_model_of_the_same_configuration(
        tmp_path, vocab):
    """The dtype is not part of the fit: a float32 checkpoint loads into a float64 model of
    the same sizes (for a gradient check), each weight the float32 value exactly."""
    c2i, _ = vocab
    src = make_model(len(c2i), seed=1)
    save_model(src, tmp_path / "m.npz")
    dst = make_model(len(c2i), seed=2, dtype=np.float64)
    assert load_model(tmp_path / "m.npz", dst) is dst
    for a, b in zip(src.params, dst.params, strict=True):
        assert a.dtype == np.float32 and b.dtype == np.float64
        np.testing.assert_array_equal(b, a.astype(np.float64))


def test_load_model_builds_the_model_on_the_backend_it_is_given(tmp_path, vocab):
    """load_model(path, backend="vectorized") while numba is the current backend: every
    kernel the loaded model calls is a vectorized one."""
    c2i, _ = vocab
    save_model(make_model(len(c2i)), tmp_path / "m.npz")
    xs = sequence.encode(date_questions(), c2i, 29)
    ts = np.random.default_rng(0).integers(0, len(c2i), (4, 11))
    with fastattn.use_backend("numba"):
        loaded = load_model(tmp_path / "m.npz", backend="vectorized")
        with fastattn.profile(loaded) as prof:
            loaded.forward(xs, ts)
            loaded.backward()
    kernels = {e.name for e in prof.rows("kernel")}
    assert kernels and {name.split(":")[0] for name in kernels} == {"vectorized"}, kernels


def test_corrupt_truncated_and_foreign_files(tmp_path, vocab):
    c2i, _ = vocab
    good = tmp_path / "m.npz"
    save_model(make_model(len(c2i)), good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_model(truncated)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.npz"):
        load_model(garbage)

    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz"):
        load_model(empty)

    flipped = bytearray(data)
    # corrupt the middle of the first stored weight array (CRC mismatch on read)
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("w000.npy")
    mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    flipped[mid] ^= 0xFF
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt.npz"):
        load_model(corrupt)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, config=np.array([{"d_model": 16}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz"):
        load_model(pickled)

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(ValueError, match="foreign.npz.*not a fastattn checkpoint"):
        load_model(foreign)

    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.npz")


# ---- crafted checkpoints: nothing is allocated before the sizes are checked ------------------

def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _with_config(arrays, path, **change):
    config = json.loads(str(arrays["config"]))
    config.update(change)
    with open(path, "wb") as f:
        np.savez(f, **{**arrays, "config": np.array(json.dumps(config))})
    return path


@pytest.fixture
def small_checkpoint(tmp_path):
    return _arrays(save_model(make_model(11, d_model=8, d_ff=8, max_len=6), tmp_path / "s.npz"))


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if a model (and its weights) is allocated."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was built from an unchecked configuration")

    monkeypatch.setattr(TransformerSeq2seq, "__init__", refuse)


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=1 << 20, d_model=1 << 14), "asks for .* weights, more than the limit"),
    (dict(d_ff=1 << 30), "d_ff 1073741824 is above the limit of 65536"),
    (dict(max_len=10**12), "max_len 1000000000000 is above the limit"),
    (dict(n_layers=200), r"holds \d+ weight arrays, the model has \d+"),
    (dict(vocab_size=4000), "does not fit the model: weight w000"),
    (dict(d_model=8.0), "d_model must be an int"),
    (dict(n_layers=True), "n_layers must be an int"),
    (dict(vocab_size="11"), "vocab_size must be an int"),
    (dict(d_model=-8), "d_model must be at least 1"),
])
def test_a_config_that_asks_for_too_much_or_does_not_fit_fails_before_building(
        tmp_path, small_checkpoint, no_model_built, change, message):
    path = _with_config(small_checkpoint, tmp_path / "crafted.npz", **change)
    with pytest.raises(ValueError, match=r"crafted\.npz") as exc:
        load_model(path)
    assert re.search(message, str(exc.value)), str(exc.value)


def test_a_huge_config_is_rejected_without_allocating_memory(tmp_path, small_checkpoint):
    """A config of 2^34 weights (64 GiB) in a file of a few kB: refused with a few MB of
    allocations at most."""
    import tracemalloc

    path = _with_config(small_checkpoint, tmp_path / "huge.npz", vocab_size=1 << 20,
                        d_model=1 << 14, d_ff=1 << 16)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="limit"):
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_an_array_header_that_claims_more_than_its_entry_holds_is_rejected(
        tmp_path, small_checkpoint, no_model_built):
    """A .npy header may claim any shape: the claim is checked against the entry's size
    before any data is read."""
    path = tmp_path / "claims.npz"
    with open(path, "wb") as f:
        np.savez(f, **small_checkpoint)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1 << 20, 1 << 14)})
    entries["w000.npy"] = header.getvalue() + small_checkpoint["w000"].tobytes()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    with pytest.raises(ValueError, match=r"claims\.npz.*claims \d+ bytes"):
        load_model(path)


def test_a_json_text_entry_larger_than_the_limit_is_rejected_before_reading(
        tmp_path, small_checkpoint, no_model_built):
    """Valid JSON padded with blanks to just over MAX_TEXT_BYTES (16 MiB) is refused before
    a model is built."""
    from fastattn.checkpoint import MAX_TEXT_BYTES

    text = str(small_checkpoint["config"]) + " " * (MAX_TEXT_BYTES // 4)  # 4 bytes a char
    path = tmp_path / "big-text.npz"
    with open(path, "wb") as f:
        np.savez(f, **{**small_checkpoint, "config": np.array(text)})
    with pytest.raises(ValueError, match=rf"big-text\.npz: entry 'config' is larger than "
                                         rf"{MAX_TEXT_BYTES} bytes"):
        load_model(path)


@pytest.mark.parametrize("config", [
    dict(vocab_size=7, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_len=5),
    dict(vocab_size=9, d_model=12, n_heads=3, n_layers=3, d_ff=4, max_len=2, pos="learned"),
    dict(vocab_size=5, d_model=4, n_heads=1, n_layers=2, d_ff=8, max_len=3, pos="sinusoidal"),
    dict(vocab_size=6, d_model=8, n_heads=4, n_layers=1, d_ff=8, max_len=4, n_kv_heads=2),
    dict(vocab_size=6, d_model=8, n_heads=4, n_layers=2, d_ff=8, max_len=4, n_kv_heads=1),
])
def test_param_shapes_are_the_shapes_of_the_model_the_config_builds(config):
    from fastattn.checkpoint import param_shapes

    model = TransformerSeq2seq(**config)
    assert param_shapes(model.config) == [p.shape for p in model.params]
