"""Attention problems with the features of issue 12, and error bounds to compare them with.

Shared by tests/test_attention_features.py and the property tests. A case is a dict: q, k, v,
dout and the keyword arguments ``kw`` of attention_forward/attention_backward.
"""

from __future__ import annotations

import numpy as np

import fastattn

GRAD_NAMES = ("dq", "dk", "dv", "dbias")


def make(rng, dtype=np.float64, *, N=1, H=2, Hkv=None, Tq=5, Tk=6, d=3, dv=2, **kw):
    """q (N, H, Tq, d), k (N, Hkv, Tk, d), v (N, Hkv, Tk, dv), dout like out, and kw."""
    Hkv = H if Hkv is None else Hkv
    q = rng.standard_normal((N, H, Tq, d)).astype(dtype)
    k = rng.standard_normal((N, Hkv, Tk, d)).astype(dtype)
    v = rng.standard_normal((N, Hkv, Tk, dv)).astype(dtype)
    dout = rng.standard_normal((N, H, Tq, dv)).astype(dtype)
    if "bias" in kw and isinstance(kw["bias"], tuple):  # a shape: random values, some -inf
        bias = rng.standard_normal(kw["bias"]).astype(dtype)
        bias[rng.random(bias.shape) < 0.1] = -np.inf
        kw["bias"] = bias
    return dict(q=q, k=k, v=v, dout=dout, kw=kw)


def run(case, backend):
    """(out, lse, dq, dk, dv[, dbias]) of the case on backend."""
    q, k, v, kw = case["q"], case["k"], case["v"], case["kw"]
    out, lse = fastattn.attention_forward(q, k, v, backend=backend, **kw)
    grads = fastattn.attention_backward(case["dout"], q, k, v, out, lse, backend=backend, **kw)
    return (out, lse) + tuple(grads)


def bounds(case):
    """Absolute error bounds for (out, lse, grads...) of a float32/float64 computation against
    the float64 reference, from the computation:

    * a score is a dot product of d terms plus a bias and an ALiBi term: its rounding error is
      at most about eps (d scale max|q| max|k| + max|bias| + max slope * T), call it ds;
    * exp, the row sum over Tk keys and the division add about eps (Tk + 4) relative to the
      terms, so p is off by p (2 ds + eps (Tk + 4)) and out, a weighted mean of v (times the
      dropout factor), by that times the dropout factor times max|v|; lse by ds + eps (Tk + 4);
    * each gradient entry sums at most Tq + Tk such products of O(max of the inputs) terms.

    A factor 4 covers the constants left out; dq/dk/dv/dbias get the same bound.
    """
    q, k, v, dout, kw = case["q"], case["k"], case["v"], case["dout"], case["kw"]
    eps = np.finfo(q.dtype).eps
    d, Tq, Tk = q.shape[-1], q.shape[-2], k.shape[-2]
    scale = kw.get("scale", 1 / np.sqrt(d))
    bias = kw.get("bias")
    bmax = 0.0 if bias is None else float(np.abs(bias[np.isfinite(bias)]).max(initial=0))
    slopes = kw.get("alibi_slopes")
    amax = 0.0 if slopes is None else float(np.abs(slopes).max()) * (Tq + Tk)
    ds = eps * (d * abs(scale) * np.abs(q).max() * np.abs(k).max() + bmax + amax + 1)
    drop = 1 / (1 - kw.get("dropout_p", 0.0))
    rel = 2 * ds + eps * (Tk + 4)
    big = max(1.0, np.abs(q).max(), np.abs(k).max(), np.abs(v).max(), np.abs(dout).max())
    out_b = 4 * rel * drop * np.abs(v).max()
    lse_b = 4 * (ds + eps * (Tk + 4)) * max(1.0, bmax + amax + d * np.abs(q).max() ** 2)
    grad_b = 4 * rel * drop * (Tq + Tk) * big**3 * max(1.0, abs(scale))
    return (out_b, lse_b) + (grad_b,) * 4


def assert_close(got, want, case, what=""):
    """Each result within its bound of the reference; same shapes; no NaN; -inf where the
    reference has -inf (lse of empty rows)."""
    for name, g, w, b in zip(("out", "lse") + GRAD_NAMES, got, want, bounds(case),
                             strict=False):
        assert g.shape == w.shape, (what, name)
        assert not np.isnan(g).any(), (what, name)
        fin = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(g), fin, err_msg=f"{what} {name}")
        err = np.abs(g[fin].astype(np.float64) - w[fin]).max(initial=0)
        assert err <= b, f"{what} {name}: error {err:.3g} above the bound {b:.3g}"
    assert len(got) == len(want), what
