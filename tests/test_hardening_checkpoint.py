"""Checkpoint files: atomic writes that survive a killed writer, no unpickling, clear errors.

Every unreadable checkpoint (random bytes, a truncated file, pickled objects, missing or
malformed entries, shapes that do not fit) raises ValueError naming the file; a missing file
raises FileNotFoundError. A writer killed with SIGKILL at any moment leaves the target either
the old checkpoint or the new one, never a mix; its temporary file may stay behind, under a
hidden name that does not end in ``.npz``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fastattn.checkpoint import load_model, save_model
from fastattn.transformer import TransformerSeq2seq
from fastattn.vocab import attach_vocab

CHARS = " _0123456789/-,abcdefghijklmnopqrstuvwxyz"
C2I = {c: i for i, c in enumerate(CHARS)}


def make_model(seed=0, **kw):
    cfg = dict(d_model=8, n_heads=2, n_layers=1, d_ff=16, max_len=12)
    cfg.update(kw)
    model = TransformerSeq2seq(len(CHARS), **cfg, seed=seed)
    attach_vocab(model, C2I, 10, 6)
    return model


@pytest.fixture
def saved(tmp_path):
    """A valid checkpoint: (path, its arrays as a dict)."""
    path = save_model(make_model(), tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return tmp_path / "model.npz", arrays


def assert_same_params(a, b):
    for p, q in zip(a.params, b.params, strict=True):
        np.testing.assert_array_equal(p, q)


def temporaries(directory, target="model.npz"):
    return sorted(p for p in os.listdir(directory) if p != target)


# ============================================================================ writing


def test_save_writes_a_hidden_temporary_in_the_same_directory_then_renames(saved,
                                                                           monkeypatch):
    path, _ = saved
    before = path.read_bytes()
    seen = []
    real = os.replace

    def spy(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        # at the moment of the rename: the target is untouched and the temporary is complete
        seen.append((src, dst, path.read_bytes() == before, load_model(src).config))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    new = make_model(seed=5)
    save_model(new, path)
    assert len(seen) == 1
    src, dst, untouched, config = seen[0]
    assert os.path.dirname(src) == os.path.dirname(dst) == str(path.parent)
    name = os.path.basename(src)
    assert name.startswith(".tmp-") and not name.endswith(".npz")
    assert untouched and config == new.config
    assert temporaries(path.parent) == []
    assert_same_params(load_model(path), new)


def test_save_syncs_the_whole_temporary_to_disk_before_the_rename(saved, monkeypatch):
    """A crash of the machine right after the rename must not find an empty or partial
    checkpoint: the temporary is synced once, at its full size, before it is renamed."""
    from helpers import record_syncs_and_renames

    path, _ = saved
    events = record_syncs_and_renames(monkeypatch)
    save_model(make_model(seed=5), path)
    size = path.stat().st_size
    assert [e[0] for e in events] == ["fsync", "replace"], events
    assert events[0] == ("fsync", size)
    assert events[1][1].startswith(".tmp-") and events[1][2:] == ("model.npz", size)


def test_saved_checkpoint_has_the_permissions_of_a_new_file(tmp_path):
    """Not the 0o600 of a ``mkstemp`` temporary: others may read a shared model."""
    ref = tmp_path / "ref"
    ref.write_bytes(b"")
    path = save_model(make_model(), tmp_path / "model.npz")
    assert os.stat(path).st_mode & 0o777 == ref.stat().st_mode & 0o777


def test_a_failed_rename_keeps_the_old_checkpoint_and_removes_the_temporary(saved,
                                                                           monkeypatch):
    path, _ = saved
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        save_model(make_model(seed=5), path)
    assert path.read_bytes() == before
    assert temporaries(path.parent) == []


# ============================================================================ pickles


class _Payload:
    """Unpickling this creates the directory ``path`` (a marker that code ran)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _pickled_array(marker):
    a = np.empty(1, dtype=object)
    a[0] = _Payload(marker)
    return a


def _npz_with(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("where", ["config-entry", "extra-entry", "npy-file", "raw-pickle"])
def test_pickled_objects_are_never_unpickled(tmp_path, saved, where):
    _, arrays = saved
    marker = tmp_path / "MARKER"
    bad = tmp_path / "evil.npz"
    if where == "config-entry":
        _npz_with(bad, {**arrays, "config": _pickled_array(marker)})
    elif where == "extra-entry":
        _npz_with(bad, {**arrays, "zzz": _pickled_array(marker)})
    elif where == "npy-file":
        with open(bad, "wb") as f:
            np.save(f, _pickled_array(marker), allow_pickle=True)
    else:
        bad.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"evil\.npz"):
        load_model(bad)
    assert not marker.exists()


def test_the_pickle_payload_is_live():
    """The control for the test above: loading the payload with pickles allowed runs it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        marker = os.path.join(d, "MARKER")
        path = os.path.join(d, "evil.npy")
        np.save(path, _pickled_array(marker), allow_pickle=True)
        np.load(path, allow_pickle=True)
        assert os.path.isdir(marker)


# ============================================================================ unreadable files


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY\x01\x00",
                                    b"\x80\x04", b"{"], ids=["plain", "zip-local", "zip-end",
                                                             "npy", "pickle", "json"])
def test_random_bytes_raise_value_error_naming_the_file(tmp_path, prefix):
    bad = tmp_path / "random.npz"
    bad.write_bytes(prefix + np.random.default_rng(0).bytes(3000))
    with pytest.raises(ValueError, match=r"random\.npz"):
        load_model(bad)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, "all-but-one"])
def test_a_truncated_checkpoint_raises_value_error_naming_the_file(saved, fraction):
    path, _ = saved
    data = path.read_bytes()
    n = len(data) - 1 if fraction == "all-but-one" else int(len(data) * fraction)
    bad = path.parent / "truncated.npz"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"truncated\.npz"):
        load_model(bad)


def test_a_missing_file_or_a_directory_raises_file_not_found(tmp_path):
    for bad in (tmp_path / "none.npz", tmp_path):
        with pytest.raises(FileNotFoundError, match=str(bad.name)):
            load_model(bad)


# ============================================================================ bad contents


def _drop(key):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _set(key, value):
    return lambda a: {**a, key: value}


def _json_edit(key, edit):
    def f(a):
        obj = json.loads(str(a[key]))
        edit(obj)
        return {**a, key: np.array(json.dumps(obj))}
    return f


def _last_weight(a):
    return max(k for k in a if k.startswith("w") and k[1:].isdigit())


BAD_CONTENTS = {
    # missing entries
    "no-format": (_drop("format"), "format"),
    "no-version": (_drop("version"), "version"),
    "no-config": (_drop("config"), "config"),
    "no-vocab": (_drop("vocab"), "vocab"),
    "no-names": (_drop("names"), "names"),
    "no-first-weight": (_drop("w000"), "weight"),
    "no-last-weight": (lambda a: _drop(_last_weight(a))(a), "weight"),
    "extra-weight": (_set("w999", np.zeros(3, np.float32)), "weight"),
    # malformed entries
    "version-text": (_set("version", np.array("one")), "version"),
    "version-array": (_set("version", np.array([1, 1])), "version"),
    "version-2": (_set("version", np.array(2)), "version"),
    "config-not-json": (_set("config", np.array("{d_model: 8")), "JSON"),
    "config-a-list": (_set("config", np.array("[1, 2]")), "JSON object"),
    "config-numbers": (_set("config", np.arange(3)), "config"),
    "config-unknown-key": (_json_edit("config", lambda c: c.update(colour="red")),
                           "configuration"),
    "config-bad-dtype": (_json_edit("config", lambda c: c.update(dtype="int32")),
                         "configuration"),
    "config-bad-heads": (_json_edit("config", lambda c: c.update(n_heads=3)),
                         "configuration"),
    "config-dropout-beyond-float": (_json_edit("config", lambda c: c.update(dropout=10**400)),
                                    "configuration.*dropout"),
    "vocab-too-short": (_json_edit("vocab", lambda v: v["chars"].pop()), "vocabulary"),
    "vocab-multichar": (_json_edit("vocab", lambda v: v["chars"].__setitem__(0, "ab")),
                        "vocabulary"),
    "vocab-no-start": (_json_edit("vocab", lambda v: v["chars"].__setitem__(1, "!")),
                       "vocabulary"),
    "vocab-wider-than-max_len": (_json_edit("vocab", lambda v: v.update(question_width=13)),
                                 "vocabulary"),
    # widths that are not ints: inf was an OverflowError, 2.5 and true silently 2 and 1
    "vocab-infinite-width": (_json_edit("vocab", lambda v: v.update(question_width=1e400)),
                             "vocabulary.*question_width must be an int"),
    "vocab-fractional-width": (_json_edit("vocab", lambda v: v.update(answer_width=5.5)),
                               "vocabulary.*answer_width must be an int"),
    "vocab-bool-width": (_json_edit("vocab", lambda v: v.update(question_width=True)),
                         "vocabulary.*question_width must be an int"),
    "weight-nan": (lambda a: {**a, "w000": np.full_like(a["w000"], np.nan)}, "NaN"),
    "weight-int": (lambda a: {**a, "w000": a["w000"].astype(np.int32)}, "dtype"),
    "weight-complex": (lambda a: {**a, "w000": a["w000"].astype(np.complex64)}, "dtype"),
    # shapes that do not fit the model the configuration builds
    "weight-transposed": (lambda a: {**a, "w000": np.ascontiguousarray(a["w000"].T)},
                          "does not fit"),
    "weight-one-row-short": (lambda a: {**a, "w000": a["w000"][:-1]}, "does not fit"),
    "weights-swapped": (lambda a: {**a, "w000": a["w002"], "w002": a["w000"]},
                        "does not fit"),
    "config-wider-model": (_json_edit("config", lambda c: c.update(d_model=16)),
                           "does not fit"),
    "config-larger-vocab": (_json_edit("config", lambda c: c.update(vocab_size=50)),
                            "does not fit|vocabulary"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENTS))
def test_bad_contents_raise_value_error_naming_the_file(saved, case):
    path, arrays = saved
    edit, message = BAD_CONTENTS[case]
    bad = path.parent / "bad-contents.npz"
    _npz_with(bad, edit(arrays))
    with pytest.raises(ValueError, match=r"bad-contents\.npz") as exc:
        load_model(bad)
    assert len(str(exc.value).splitlines()) == 1
    assert re.search(message, str(exc.value)), str(exc.value)


def test_bad_model_or_backend_arguments_are_named_not_blamed_on_the_file(saved):
    """model=5 was an AttributeError; an unknown backend said the stored configuration does
    not build a model."""
    path, _ = saved
    with pytest.raises(TypeError, match="^model must be None or a model"):
        load_model(path, 5)
    with pytest.raises(ValueError, match="^unknown backend 'gpu'"):
        load_model(path, backend="gpu")


def test_loading_into_a_model_that_does_not_fit_names_file_and_difference(saved):
    path, _ = saved
    with pytest.raises(ValueError, match=r"model\.npz.*does not fit.*d_ff"):
        load_model(path, make_model(d_ff=32))


def test_a_bad_last_weight_leaves_the_model_it_loads_into_untouched(saved):
    """Loading into a model is all or nothing: a checkpoint whose first weights are good and
    whose last one holds NaN raises and changes none of the model's weights."""
    path, arrays = saved
    last = _last_weight(arrays)
    bad = path.parent / "bad-last.npz"
    _npz_with(bad, {**arrays, last: np.full_like(arrays[last], np.nan)})
    target = make_model(seed=1)
    before = [p.copy() for p in target.params]
    assert not np.array_equal(before[0], arrays["w000"]), "a load would show"
    with pytest.raises(ValueError, match=r"bad-last\.npz.*NaN"):
        load_model(bad, target)
    for p, q in zip(target.params, before, strict=True):
        np.testing.assert_array_equal(p, q)


def test_the_unedited_arrays_load(saved):
    """The control for the table above: re-saving the arrays unchanged gives a checkpoint."""
    path, arrays = saved
    copy = path.parent / "copy.npz"
    _npz_with(copy, arrays)
    assert_same_params(load_model(copy), make_model())


# ============================================================================ a killed writer

CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from fastattn.checkpoint import save_model
    from fastattn.transformer import TransformerSeq2seq

    path, mode = sys.argv[1], sys.argv[2]
    CFG = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=12)
    models = {s: TransformerSeq2seq(41, **CFG, seed=s) for s in (1, 2)}
    real_savez = np.savez

    class SlowFile:
        # the file np.savez writes to, slowed down (loop) or stopped half-way (half)
        def __init__(self, f, half):
            self.f, self.written, self.half = f, 0, half
        def write(self, b):
            n = self.f.write(b)
            self.written += len(b)
            if mode == "half" and self.written >= self.half:
                self.f.flush()
                print("half", flush=True)
                time.sleep(600)
            time.sleep(0.002)
            return n
        def __getattr__(self, name):
            return getattr(self.f, name)

    def slow_savez(f, **arrays):
        half = sum(a.nbytes for a in arrays.values()) // 2
        return real_savez(SlowFile(f, half), **arrays)

    np.savez = slow_savez
    seed = 1
    while True:
        save_model(models[seed], path, meta={"seed": seed})
        print("saved", seed, flush=True)
        seed = 3 - seed
""")
CHILD_CFG = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=12)


def _start_writer(tmp_path, path, mode):
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(path), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def _expect_line(proc, prefix):
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        _kill(proc)
        raise AssertionError(f"writer said {line!r}; stderr: {proc.stderr.read()}")
    return line


def _check_target(path, old_bytes=None):
    """The target loads, and is the checkpoint of the model its meta names."""
    model = load_model(path)
    with np.load(path, allow_pickle=False) as z:
        seed = json.loads(str(z["meta"])).get("seed")
    if seed is None:  # the checkpoint written before the writer started
        assert path.read_bytes() == old_bytes
        return None
    assert_same_params(model, TransformerSeq2seq(41, **CHILD_CFG, seed=seed))
    return seed


def test_a_writer_killed_half_way_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "model.npz"
    save_model(TransformerSeq2seq(41, **CHILD_CFG, seed=7), path)
    old = path.read_bytes()
    proc = _start_writer(tmp_path, path, "half")
    try:
        _expect_line(proc, "half")
        partial = temporaries(tmp_path, "model.npz")
        partial = [p for p in partial if p != "writer.py"]
        assert len(partial) == 1 and os.path.getsize(tmp_path / partial[0]) > 0
    finally:
        _kill(proc)
    assert path.read_bytes() == old
    assert _check_target(path, old) is None
    # the temporary left behind is hidden, is no checkpoint, and is not read as one
    name = partial[0]
    assert name.startswith(".tmp-") and not name.endswith(".npz")
    with pytest.raises(ValueError, match=re.escape(name)):
        load_model(tmp_path / name)
    # the next save works beside it
    save_model(TransformerSeq2seq(41, **CHILD_CFG, seed=2), path, meta={"seed": 2})
    assert _check_target(path) == 2


def test_a_writer_killed_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "model.npz"
    save_model(TransformerSeq2seq(41, **CHILD_CFG, seed=7), path)
    old = path.read_bytes()
    seeds = []
    for delay in (0.0, 0.07, 0.23, 0.41):
        proc = _start_writer(tmp_path, path, "loop")
        try:
            if delay:
                _expect_line(proc, "saved")  # one whole save done: now in the next one
            time.sleep(delay)
        finally:
            _kill(proc)
        seeds.append(_check_target(path, old))
        tmps = [p for p in temporaries(tmp_path) if p != "writer.py"]
        assert all(p.startswith(".tmp-") and not p.endswith(".npz") for p in tmps)
    # some kill landed mid-write (a save is mostly writing), each leaving a temporary
    assert [p for p in temporaries(tmp_path) if p != "writer.py"]
    assert set(seeds[1:]) <= {1, 2}
