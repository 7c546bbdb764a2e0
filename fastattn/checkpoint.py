"""Checkpoints: a model's configuration, vocabulary and weights in one ``.npz`` file.

``save_model(model, path)`` writes to a temporary file in the same directory, then renames it
over ``path`` (``os.replace``), so a crash never leaves a half-written checkpoint. The temporary
is hidden and does not end in ``.npz`` (``.tmp-<name>.<random>.part``), so one left behind by a
killed process is not mistaken for a checkpoint; the checkpoint gets the permissions of any new
file (``0o666`` less the umask).
``load_model(path)`` reads it back with ``allow_pickle=False``: the configuration and the
vocabulary are JSON text in NumPy unicode arrays, never pickled objects.

Layout of the archive: ``format`` ("fastattn-checkpoint"), ``version`` (1), ``config`` (JSON:
the model's constructor arguments and its class), ``vocab`` (JSON: the characters in id order,
the question width and the answer width; empty when the model has none), ``names`` (JSON: one
name per weight), ``meta`` (JSON, free-form), and the weights ``w000``, ``w001``, ... in the
order of ``model.params``.

A checkpoint is untrusted input: before anything is allocated, ``load_model`` reads only the
archive's directory and each array's ``.npy`` header, checks the configuration's sizes against
``LIMITS`` and ``MAX_WEIGHTS`` and the shapes it implies against the stored arrays' shapes,
and refuses entries larger than they say. A crafted file that asks for a huge model raises
ValueError instead of exhausting memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib

import numpy as np

from fastattn.kernels._atomic import atomic_open

__all__ = ["load_model", "save_model"]

FORMAT = "fastattn-checkpoint"
VERSION = 1

#: The largest size a checkpoint's configuration may ask for, per field.
LIMITS = {"vocab_size": 1 << 20, "d_model": 1 << 14, "n_heads": 1 << 10, "n_layers": 1 << 8,
          "d_ff": 1 << 16, "max_len": 1 << 16}
#: The most weights (elements) a checkpoint may hold: 1 GiB of float32.
MAX_WEIGHTS = 1 << 28
#: The largest JSON text entry (format, version, configuration, vocabulary, names), in bytes.
MAX_TEXT_BYTES = 1 << 24


def _text(obj) -> np.ndarray:
    return np.array(json.dumps(obj))  # a 0-d unicode array, loadable without pickle


def save_model(model, path, *, meta=None):
    """Write ``model`` (a :class:`~fastattn.TransformerSeq2seq`) to ``path`` atomically.

    The checkpoint holds ``model.config``, the vocabulary attached with
    :func:`fastattn.vocab.attach_vocab` (if any), the weights, and ``meta`` (a
    JSON-serialisable dict, e.g. metrics).
    Returns the path written.
    """
    path = os.fspath(path)
    if not hasattr(model, "config") or not hasattr(model, "params"):
        raise TypeError(f"model must have config and params, got {type(model).__name__}")
    vocab = getattr(model, "vocab", None)
    vocab = {} if vocab is None else vocab.as_dict()
    config = dict(_config_dict(model.config), model=type(model).__name__)
    arrays = {
        "format": np.array(FORMAT),
        "version": np.array(VERSION),
        "config": _text(config),
        "vocab": _text(vocab),
        "names": _text(list(getattr(model, "param_names", [f"w{i}" for i in
                                                            range(len(model.params))]))),
        "meta": _text(meta or {}),
    }
    for i, p in enumerate(model.params):
        arrays[f"w{i:03d}"] = np.asarray(p)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
_TEXT = ("format", "version", "config", "vocab", "names")


def _headers(path):
    """{entry: (shape, dtype)} from the ``.npy`` header of every entry of the archive, read
    without loading any data; ValueError naming the file for anything else."""
    try:
        headers = {}
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"entry {info.filename!r} is not a .npy array")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    raise ValueError(f"entry {info.filename!r} holds Python objects, which a "
                                     "checkpoint never does (they would need unpickling)")
                if _nbytes(shape, dtype) > info.file_size:
                    raise ValueError(f"entry {info.filename!r} claims {_nbytes(shape, dtype)} "
                                     f"bytes, holds {info.file_size}")
                headers[info.filename[:-4]] = (tuple(shape), dtype)
    except _READ_ERRORS as exc:
        raise ValueError(f"{path} is not a readable fastattn checkpoint "
                         f"({type(exc).__name__}: {exc})") from None
    for key in _TEXT:
        if key in headers and _nbytes(*headers[key]) > MAX_TEXT_BYTES:
            raise ValueError(f"{path}: entry {key!r} is larger than {MAX_TEXT_BYTES} bytes")
    return headers


def _nbytes(shape, dtype):
    return dtype.itemsize * int(np.prod(shape, dtype=object))


def _read(path, keys):
    """The arrays ``keys`` of the archive, or ValueError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in keys}
    except _READ_ERRORS as exc:
        raise ValueError(f"{path} is not a readable fastattn checkpoint "
                         f"({type(exc).__name__}: {exc})") from None


def param_shapes(config):
    """The shapes of ``TransformerSeq2seq.from_config(config).params``, in order, computed
    without building the model (tests/test_checkpoint.py checks them against real models)."""
    C, F, T = config.d_model, config.d_ff, config.max_len
    Ckv = (config.n_kv_heads or config.n_heads) * C // config.n_heads
    ln = [(C,), (C,)]
    mha = [(C, C + 2 * Ckv), (C + 2 * Ckv,), (C, C), (C,)]
    ffn = [(C, F), (F,), (F, C), (C,)]
    pos = [(T, C)] if config.pos in ("learned", "both") else []
    V, L = config.vocab_size, config.n_layers
    return ([(V, C), (V, C)] + pos + pos + (ln + mha + ln + ffn) * L + ln
            + (ln + mha + ln + mha + ln + ffn) * L + ln + [(C, V), (V,)])


def _check_sizes(config, headers, path):
    """Before anything is allocated: the configuration builds a model, its sizes are within
    LIMITS, its weights number at most MAX_WEIGHTS, and the stored weights have the shapes
    the configuration implies."""
    from fastattn.transformer import TransformerConfig

    try:
        cfg = TransformerConfig(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the stored configuration does not build a model "
                         f"({exc})") from None
    for key, limit in LIMITS.items():
        if getattr(cfg, key) > limit:
            raise ValueError(f"{path}: the stored configuration does not build a model ({key} "
                             f"{getattr(cfg, key)} is above the limit of {limit})")
    shapes = param_shapes(cfg)
    total = sum(int(np.prod(s, dtype=object)) for s in shapes)
    if total > MAX_WEIGHTS:
        raise ValueError(f"{path}: the stored configuration asks for {total} weights, more "
                         f"than the limit of {MAX_WEIGHTS}")
    stored = [k for k in headers if k.startswith("w") and k[1:].isdigit()]
    if len(stored) != len(shapes):
        raise ValueError(f"{path}: the checkpoint holds {len(stored)} weight arrays, the model "
                         f"has {len(shapes)}")
    for i, shape in enumerate(shapes):
        key = f"w{i:03d}"
        if key not in headers:
            raise ValueError(f"{path}: weight {key} is missing")
        if headers[key][0] != tuple(shape):
            raise ValueError(f"{path}: the checkpoint does not fit the model: weight {key} has "
                             f"shape {headers[key][0]} in the checkpoint, {tuple(shape)} in "
                             f"the model its configuration describes")


def _json(data, key, path):
    if key not in data:
        raise ValueError(f"{path} is not a fastattn checkpoint: it has no {key!r} entry")
    arr = data[key]
    if arr.dtype.kind != "U" or arr.ndim != 0:
        raise ValueError(f"{path}: entry {key!r} must be JSON text, got {arr.dtype} {arr.shape}")
    try:
        return json.loads(str(arr))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: entry {key!r} is not valid JSON ({exc})") from None


def load_model(path, model=None, *, backend=None):
    """Load a checkpoint written by :func:`save_model`.

    Without ``model``: builds the model from the stored configuration (``backend`` passed to
    it) and returns it with its weights, ``char_to_id``, ``id_to_char`` and ``translate``.
    With ``model``: copies the weights into that model (which must have the same
    configuration and shapes, in any float dtype: the weights are cast to it), attaches the
    stored vocabulary if there is one, and returns it.

    Raises FileNotFoundError for a missing file, ValueError naming the file for a corrupt,
    truncated or foreign file, or for weights whose shapes do not fit the model.
    """
    from fastattn._layer import check_backend
    from fastattn.vocab import attach_vocab

    path = os.fspath(path)
    check_backend(backend)  # the caller's argument, not the file's fault
    if model is not None and not (hasattr(model, "config") and hasattr(model, "params")):
        raise TypeError(f"model must be None or a model with config and params, got "
                        f"{type(model).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file {path!r}")
    headers = _headers(path)
    data = _read(path, [k for k in _TEXT if k in headers])
    config, vocab, names = _header(data, path)
    _check_sizes(config, headers, path)
    model = _model_for(config, model, backend, path)
    data.update(_read(path, [f"w{i:03d}" for i in range(len(model.params))]))
    _copy_weights(data, names, model, path)
    if vocab:
        try:
            attach_vocab(model, {c: i for i, c in enumerate(vocab["chars"])},
                         vocab["question_width"], vocab["answer_width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: the stored vocabulary is invalid ({exc})") from None
    return model


def _header(data, path):
    """The checkpoint's configuration (a dict without the model class), vocabulary and
    weight names, after checking its format marker and version."""
    if "format" not in data or str(data["format"]) != FORMAT:
        raise ValueError(f"{path} is not a fastattn checkpoint (no 'format' marker)")
    try:
        version = int(data["version"]) if "version" in data else None
    except (TypeError, ValueError):
        version = repr(data["version"])
    if version != VERSION:
        raise ValueError(f"{path}: checkpoint version {version} is not supported "
                         f"(this fastattn reads version {VERSION})")
    config = _json(data, "config", path)
    vocab = _json(data, "vocab", path)
    names = _json(data, "names", path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the configuration must be a JSON object")
    config = dict(config)
    kind = config.pop("model", "TransformerSeq2seq")
    if kind != "TransformerSeq2seq":
        raise ValueError(f"{path}: unknown model class {kind!r}")
    return config, vocab, names


def _config_dict(config) -> dict:
    """A model's configuration as stored: its ``as_dict()`` when it has one (options at their
    defaults left out), else every field."""
    return config.as_dict() if hasattr(config, "as_dict") else dataclasses.asdict(config)


def _model_for(config, model, backend, path):
    """A new model built from ``config``, or ``model`` after checking that it fits."""
    from fastattn.transformer import TransformerConfig, TransformerSeq2seq

    if model is None:
        try:
            return TransformerSeq2seq.from_config(TransformerConfig(**config), backend=backend)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: the stored configuration does not build a model "
                             f"({exc})") from None
    config = {k: v for k, v in config.items() if k != "dtype"}
    mine = {k: v for k, v in _config_dict(model.config).items() if k != "dtype"}
    if mine != config:
        diff = sorted(k for k in set(mine) | set(config) if mine.get(k) != config.get(k))
        detail = ", ".join(f"{k}: checkpoint {config.get(k)!r}, model {mine.get(k)!r}"
                           for k in diff)
        raise ValueError(f"{path}: the checkpoint does not fit the model ({detail})")
    return model


def _copy_weights(data, names, model, path):
    """Check the stored weights against the model's and copy them in (all or nothing)."""
    n = len(model.params)
    stored = sorted(k for k in data if k.startswith("w") and k[1:].isdigit())
    if len(stored) != n:
        raise ValueError(f"{path}: the checkpoint holds {len(stored)} weight arrays, the model "
                         f"has {n}")
    model_names = getattr(model, "param_names", [f"w{i}" for i in range(n)])
    arrays = []
    for i, p in enumerate(model.params):
        key = f"w{i:03d}"
        if key not in data:
            raise ValueError(f"{path}: weight {key} is missing")
        w = data[key]
        name = names[i] if isinstance(names, list) and i < len(names) else model_names[i]
        if w.dtype.kind != "f":
            raise ValueError(f"{path}: weight {name} has dtype {w.dtype}, expected floats")
        if w.shape != p.shape:
            raise ValueError(f"{path}: the checkpoint does not fit the model: weight {name} "
                             f"has shape {w.shape} in the checkpoint, {p.shape} in the model")
        if not np.isfinite(w).all():
            raise ValueError(f"{path}: weight {name} contains NaN or inf")
        arrays.append(w)
    for p, w in zip(model.params, arrays, strict=True):
        p[...] = w
