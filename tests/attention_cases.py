"""Attention problems with the features of issue 12, and their comparison with a reference.

Shared by tests/test_attention_features.py and the property tests. A case is a dict: q, k, v,
dout and the keyword arguments ``kw`` of attention_forward/attention_backward.
"""

from __future__ import annotations

import numpy as np
from helpers import assert_attention_close

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


def assert_close(got, want, case, what=""):
    """Each result within its error bound of the reference by the tests' one rule
    (``helpers.assert_attention_close``: n eps times the sum of |terms| of each entry, carried
    through the softmax); same shapes; no NaN; -inf exactly where the reference has -inf."""
    assert len(got) == len(want), what
    for name, g, w in zip(("out", "lse") + GRAD_NAMES, got, want, strict=False):
        assert g.shape == w.shape, (what, name)
        assert not np.isnan(g).any(), (what, name)
    assert_attention_close(got, want, case["q"], case["k"], case["v"], case["dout"],
                           err_msg=what, **case["kw"])
