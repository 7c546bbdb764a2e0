"""Helpers shared by the tests and the benchmarks (pytest puts ``tests/`` on ``sys.path``;
see ``pythonpath`` in pyproject.toml): ``from helpers import assert_close``.

One rule judges every floating-point result against its reference:

    |actual - ref| <= n * eps * terms + n * eps**2 * max(terms)

* ``ref`` is a float64 reference, or a reference that is the exact result rounded once to the
  dtype of ``actual`` (the loop backend sums in Python floats and rounds once at the end);
* ``eps`` is the machine epsilon of ``actual``'s dtype (1.2e-7 for float32, 2.2e-16 for
  float64);
* ``terms`` (float64, broadcastable to ``ref``) is, for each output, the sum of the absolute
  values of the terms it adds up: ``|A| @ |B|`` for a product ``A @ B``; for a result computed
  from other rounded results (a softmax, an attention), their own error bounds carried through
  (see ``bounds``);
* ``n`` (a number or an array broadcastable to ``ref``) counts the roundings along the longest
  chain that produces an output: a sum of L terms in any order (pairwise, blocked, by a BLAS
  tile or one at a time) is off by at most about L * eps * sum|terms|, plus one rounding for
  each operation after it.

The bound is a worst case over every summation order, so it holds on every CPU and with every
BLAS kernel; a wrong formula (a dropped scale, a missing term, a flipped sign) is off by a
fraction of ``terms`` itself, which is 1 / (n eps) -- thousands of times -- beyond it. The last
term is an absolute floor tied to eps: it covers outputs whose terms are all zero or underflow
(the float32 exp of -100 is 0). Entries where ``ref`` is +-inf or NaN must be the same in
``actual``.

``bounds`` derives ``terms`` and ``n`` for the kernels and the attention functions.

Where no bound can be carried through by hand (a whole network, a training run of many steps),
the second form applies (``assert_within_float32_error``): the result may be off its float64
reference by at most K = 16 times the reference's own float32 error (the same reference code
run in float32 on the same inputs, measured against its float64 run), plus K roundings of the
reference's largest value. Another summation order in float32 makes errors of the same kind:
a sum of n terms taken one by one errs like sqrt(n) eps on average, a pairwise or blocked one
like sqrt(log n) eps, and 16 covers that ratio for the sums of up to a few thousand terms that
the tests run. A bug makes errors of the size of the result, 1 / (16 eps sqrt(n)) times more.
For the many results of one computation (a loss and every gradient of a network),
``assert_all_within_float32_error`` takes the reference's largest relative float32 error over
all of them as the computation's error level: one array alone may understate it (a sum that the
reference happens to take in float64 is exact to float32).
"""

from __future__ import annotations

import numpy as np

from .bounds import (
    attention_bounds,
    attention_probs,
    book_attention_bounds,
    kernel_attention_probs,
    kernel_attention_scores,
    kernel_bounds,
    matmul_terms,
)

__all__ = [
    "assert_close",
    "assert_within_float32_error",
    "assert_all_within_float32_error",
    "assert_all_close",
    "assert_attention_close",
    "attention_bounds",
    "attention_probs",
    "book_attention_bounds",
    "kernel_attention_probs",
    "kernel_attention_scores",
    "kernel_bounds",
    "matmul_terms",
    "SMALL_VOCAB",
    "rand",
    "ids",
]


def assert_close(actual, ref, *, terms, n, err_msg=""):
    """Assert ``|actual - ref| <= n * eps * terms + n * eps**2 * max(terms)`` elementwise (the
    module's rule). Returns the largest ratio of error to bound (0 when exact), for reports.
    """
    actual = np.asarray(actual)
    ref = np.asarray(ref, dtype=np.float64)
    if actual.shape != ref.shape:
        raise AssertionError(f"{err_msg}: shape {actual.shape}, reference {ref.shape}")
    if actual.dtype.kind != "f":
        raise AssertionError(f"{err_msg}: dtype {actual.dtype} is not a float dtype")
    eps = float(np.finfo(actual.dtype).eps)
    terms = np.broadcast_to(np.asarray(terms, dtype=np.float64), ref.shape)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), ref.shape)
    if not (np.all(np.isfinite(terms)) and np.all(terms >= 0) and np.all(n >= 1)):
        raise ValueError(f"{err_msg}: terms must be finite and >= 0, n >= 1")
    a = actual.astype(np.float64)
    finite = np.isfinite(ref)
    same = (a == ref) | (np.isnan(a) & np.isnan(ref))
    if not np.all(same[~finite]):
        j = np.argwhere(~finite & ~same)[0]
        raise AssertionError(f"{err_msg}: at {tuple(map(int, j))} got {a[tuple(j)]!r}, "
                             f"reference {ref[tuple(j)]!r}")
    floor = eps * eps * (float(terms.max()) if terms.size else 0.0)
    bound = n * eps * terms + n * floor
    err = np.where(finite, np.abs(a - np.where(finite, ref, 0.0)), 0.0)
    bad = ~(err <= bound)
    if bad.any():
        ratio = np.where(bad, err / np.maximum(bound, np.finfo(np.float64).tiny), 0.0)
        j = tuple(map(int, np.unravel_index(np.argmax(ratio), ref.shape)))
        raise AssertionError(
            f"{err_msg}: {int(bad.sum())} of {ref.size} elements beyond n*eps*terms; worst at {j}:"
            f" got {a[j]!r}, reference {ref[j]!r}, error {err[j]:.3g} > bound {bound[j]:.3g} "
            f"(n={n[j]:.4g}, eps={eps:.3g}, terms={terms[j]:.3g})")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, err / bound, 0.0)
    return float(ratio.max()) if ratio.size else 0.0


K_FLOAT32 = 16


def assert_within_float32_error(actual, ref64, ref32, *, k=K_FLOAT32, err_msg=""):
    """Assert ``max|actual - ref64| <= k * (max|ref32 - ref64| + eps * max|ref64|)`` over the
    array, where ref32 is the reference computed in ``actual``'s dtype (the module's second
    form). Returns the ratio of the error to that bound."""
    actual = np.asarray(actual)
    ref64, ref32 = np.asarray(ref64, dtype=np.float64), np.asarray(ref32, dtype=np.float64)
    if not actual.shape == ref64.shape == ref32.shape:
        raise AssertionError(f"{err_msg}: shapes {actual.shape}, {ref64.shape}, {ref32.shape}")
    eps = float(np.finfo(actual.dtype).eps)
    if not (np.isfinite(actual).all() and np.isfinite(ref64).all()):
        raise AssertionError(f"{err_msg}: non-finite values")
    own = float(np.abs(ref32 - ref64).max(initial=0.0))
    bound = k * (own + eps * float(np.abs(ref64).max(initial=0.0)))
    err = float(np.abs(actual.astype(np.float64) - ref64).max(initial=0.0))
    if not err <= bound:
        raise AssertionError(f"{err_msg}: error {err:.3g} > {k} x (the reference's own float32 "
                             f"error {own:.3g} + eps x max|ref|) = {bound:.3g}")
    return err / bound if bound else 0.0


def assert_all_within_float32_error(actuals, refs64, refs32, names, *, k=K_FLOAT32,
                                    err_msg=""):
    """The second form for the many results of one computation (a network's loss and its
    gradients): each result's largest error, relative to its reference's largest value, is at
    most k times the largest such relative float32 error of the reference over all of them
    (the computation's float32 error level, which one array alone may understate: a sum the
    reference happens to take in float64 is exact to float32). Returns the largest ratio."""
    actuals, refs64, refs32 = list(actuals), list(refs64), list(refs32)
    if not len(actuals) == len(refs64) == len(refs32) == len(names):
        raise AssertionError(f"{err_msg}: {len(actuals)} results, {len(refs64)} and "
                             f"{len(refs32)} references, {len(names)} names")

    def rel(a, r):
        a, r = np.asarray(a, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if a.shape != r.shape or not np.isfinite(a).all():
            raise AssertionError(f"{err_msg}: shape {a.shape} vs {r.shape}, or non-finite")
        top = float(np.abs(r).max(initial=0.0))
        return float(np.abs(a - r).max(initial=0.0)) / top if top else 0.0

    eps = float(np.finfo(np.asarray(actuals[0]).dtype).eps)
    level = max(rel(r32, r64) for r32, r64 in zip(refs32, refs64, strict=True))
    bound = k * (level + eps)
    worst = 0.0
    for a, r64, name in zip(actuals, refs64, names, strict=True):
        e = rel(a, r64)
        if not e <= bound:
            raise AssertionError(f"{err_msg} {name}: error {e:.3g} of max|ref| > {k} x (the "
                                 f"reference's float32 error level {level:.3g} + eps)")
        worst = max(worst, e / bound)
    return worst


def assert_all_close(got, want, bounds, names=None, err_msg=""):
    """``assert_close`` for parallel sequences of results, references and (terms, n) pairs;
    also checks each result's dtype against the first one's. Returns the largest ratio."""
    got, want, bounds = list(got), list(want), list(bounds)
    if not len(got) == len(want) == len(bounds):
        raise AssertionError(f"{err_msg}: {len(got)} results, {len(want)} references, "
                             f"{len(bounds)} bounds")
    names = names or [f"result {i}" for i in range(len(got))]
    worst = 0.0
    for g, w, (terms, n), name in zip(got, want, bounds, names, strict=True):
        worst = max(worst, assert_close(g, w, terms=terms, n=n, err_msg=f"{err_msg} {name}"))
    return worst


ATTENTION_RESULTS = ("out", "lse", "dq", "dk", "dv", "dbias")


def public_attention_bounds(q, k, v, dout=None, **kw):
    """``attention_bounds`` for ``fastattn.attention_forward(q, k, v, **kw)`` (and its
    backward), with P read off the loop reference through the public function."""
    import fastattn

    kw = {key: val for key, val in kw.items() if key != "backend"}
    q = np.asarray(q)
    scale = kw.get("scale")
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale

    kw64 = {key: (np.asarray(val, dtype=np.float64) if isinstance(val, np.ndarray)
                  and val.dtype.kind == "f" else val) for key, val in kw.items()}

    def probs(**extra):
        def forward(q, k, v):
            return fastattn.attention_forward(q, k, v, backend="loop", **{**kw64, **extra})
        return attention_probs(forward, q, k)

    bias_abs = 0.0
    if kw.get("bias") is not None:
        b = np.asarray(kw["bias"], dtype=np.float64)
        bias_abs += float(np.abs(b[np.isfinite(b)]).max(initial=0.0))
    if kw.get("alibi_slopes") is not None:
        slopes = np.abs(np.asarray(kw["alibi_slopes"], dtype=np.float64)).max(initial=0.0)
        bias_abs += float(slopes) * (q.shape[-2] + np.shape(k)[-2])
    P = probs(dropout_p=0.0) if kw.get("dropout_p") else probs()
    P_drop = probs() if kw.get("dropout_p") else None
    bounds = attention_bounds(q, k, v, P, scale=scale, dout=dout, P_drop=P_drop,
                              bias_abs=bias_abs)
    if dout is not None and kw.get("bias") is not None:  # dS summed to the bias's shape
        E, n_s = bounds["ds"]
        shape = np.shape(kw["bias"])
        lead = E.ndim - len(shape)
        axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                          if n == 1 and E.shape[lead + i] != 1)
        summed = int(np.prod([E.shape[a] for a in axes], dtype=np.int64))
        terms = E.sum(axis=axes, keepdims=True).reshape(shape)
        bounds["dbias"] = (terms, float(np.max(n_s, initial=1.0)) + summed)
    return bounds


def assert_attention_close(got, want, q, k, v, dout=None, *, bounds=None, err_msg="", **kw):
    """Judge (out, lse[, dq, dk, dv]) against the reference's by ``attention_bounds``.

    ``kw`` are the keywords of ``fastattn.attention_forward`` the results were computed with
    (used to read P off the loop reference); or pass ``bounds`` already computed. Returns the
    largest ratio of error to bound.
    """
    got, want = list(got), list(want)
    if bounds is None:
        bounds = public_attention_bounds(q, k, v, dout, **kw)
    names = ATTENTION_RESULTS[:len(got)]
    return assert_all_close(got, want, [bounds[x] for x in names], names, err_msg)


#: The vocabulary size of the id-taking layers in the layer tests.
SMALL_VOCAB = 6


def rand(*shape, seed=0):
    """A float64 standard-normal array of ``shape``, the same for the same seed."""
    return np.random.default_rng(seed).standard_normal(shape)


def ids(B=2, T=3, seed=0, V=SMALL_VOCAB):
    """(B, T) int64 token ids in [0, V), the same for the same seed."""
    return np.random.default_rng(seed).integers(0, V, (B, T))


def blas_thread_count():
    """The BLAS thread count in force: the largest of the loaded BLAS libraries' (1 with none;
    what a benchmark records beside its times)."""
    from threadpoolctl import threadpool_info

    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"),
               default=1)


def load_repo_file(relative, name):
    """The repository's file ``relative`` (say ``examples/seed_demo.py``) run as a module of
    its own named ``name``: for files that are not in an installed package."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / relative
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adam_reference(p, grads, lr, beta1=0.9, beta2=0.999, eps=1e-7):
    """Adam written out as the book writes it, in p's dtype: p after one step per gradient of
    ``grads`` (a list), from zero moments."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    p = p.copy()
    for it, g in enumerate(grads, start=1):
        lr_t = lr * np.sqrt(1 - beta2 ** it) / (1 - beta1 ** it)
        m += (1 - beta1) * (g - m)
        v += (1 - beta2) * (g ** 2 - v)
        p -= lr_t * m / (np.sqrt(v) + eps)
    return p


def floats_as(dtype, args):
    """``args`` with every float array cast to ``dtype`` (to run a kernel's call again in
    float64, say); anything else as it is."""
    return tuple(a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
                 for a in args)


def _fresh_copy(kernel, *args):
    """An uncached copy of Numba kernel ``kernel`` with its own options (fastmath, error
    model...), compiled by running it once on ``args``: Numba does not show the code of
    cached functions."""
    from numba import njit

    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = njit(**options)(kernel.py_func)
    fresh(*args)
    return fresh


def machine_code(kernel, *args):
    """The machine code of Numba kernel ``kernel`` compiled for ``args`` (see _fresh_copy)."""
    fresh = _fresh_copy(kernel, *args)
    return fresh.inspect_asm(fresh.signatures[0])


def llvm_ir(kernel, *args):
    """The LLVM IR of Numba kernel ``kernel`` compiled for ``args`` (see _fresh_copy)."""
    fresh = _fresh_copy(kernel, *args)
    return fresh.inspect_llvm(fresh.signatures[0])


def record_syncs_and_renames(monkeypatch):
    """Spy on ``os.fsync`` and ``os.replace`` (they still run): a list that receives, in
    order, ``("fsync", size)`` with the size on disk of the file synced, and ``("replace",
    src, dst)`` with the names' last parts and the size of ``src``. For the atomic writers: a
    file synced whole before the rename survives a crash of the machine."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst),
                       os.path.getsize(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events
