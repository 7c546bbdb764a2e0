"""Public functions: checked entry points to the fused attention kernels, and softmax."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastattn import _attention_args as args
from fastattn import _backend, _checks
from fastattn.kernels.vectorized_attention import merge_parts


def _overflow(what: str, dtype) -> ValueError:
    hint = ("" if what == "attention_forward"
            else " (or out and lse are not what attention_forward gave for these inputs)")
    return ValueError(
        f"{what}: the logits scale * q k^T overflow {np.dtype(dtype).name}; "
        f"scale q, k or scale down, or use float64{hint}"
    )


def _run_kernel(fn, what: str, dtype, *args, **features):
    """Call a kernel; a logit overflow that shows as a Python OverflowError (the loop kernels)
    becomes the ValueError that the callers also raise for inf/NaN in the results.
    """
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return fn(*args, **features)
    except OverflowError:
        raise _overflow(what, dtype) from None


def _rows_with_keys(mask, causal: bool, Tq: int):
    """Which query rows have at least one allowed key: bool (1 or B, Tq) from the compact
    mask (1 or B, 1 or Tq, Tk), or None when every row has one (no mask: key 0 is always
    allowed, causal or not).
    """
    if mask is None:
        return None
    if not causal:
        return np.broadcast_to(mask.any(axis=-1), mask.shape[:1] + (Tq,))
    first = mask.argmax(axis=-1)  # (Bm, Tqm): the first allowed key, 0 if none
    return mask.any(axis=-1) & (first <= np.arange(Tq))  # (Bm, Tq): it exists and j <= i


def _check_qkv(q, k, v, finite_kv=True):
    q = _checks.float_array(q, "q", ndim_min=2)
    k = _checks.float_array(k, "k", ndim_min=2, finite=finite_kv)
    v = _checks.float_array(v, "v", ndim_min=2, finite=finite_kv)
    dtype = _checks.same_dtype({"q": q, "k": k, "v": v})
    args.check_heads(q, k, v)  # axis -3 may hold fewer key/value heads than query heads
    Tq, d = q.shape[-2:]
    Tk = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"k must have last dimension d={d} like q, got shape {k.shape}")
    if v.shape[-2] != Tk:
        raise ValueError(f"v must have Tk={Tk} rows like k, got shape {v.shape}")
    if Tq == 0 or Tk == 0 or d == 0 or v.shape[-1] == 0:
        raise ValueError(
            f"sequence lengths and feature sizes must be at least 1, got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    return q, k, v, dtype


def _flat3(x):
    return x.reshape((-1,) + x.shape[-2:])


@dataclass
class _Call:
    """Checked inputs of an attention call, in the kernels' form."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dtype: np.dtype
    scale: float
    causal: object  # False, True (top-left) or "bottom_right"
    mask: object  # None or bool (1 or B, 1 or Tq, Tk)
    bias: object  # None or args.Bias
    features: dict  # the kernels' keyword arguments beyond (q, k, v, scale, causal, mask)

    @property
    def lead(self):
        return self.q.shape[:-2]

    @property
    def B(self):
        return int(np.prod(self.lead, dtype=np.int64))

    def kernel_args(self):
        return (_flat3(self.q), _flat3(self.k), _flat3(self.v), self.scale, self.causal,
                self.mask)


def _prepare(q, k, v, mask, bias, causal, window, alibi_slopes, dropout_p, seed,
             cu_seqlens_q, cu_seqlens_k, scale, finite_kv=True) -> _Call:
    """Check everything and convert it to the kernels' form; ``finite_kv=False`` leaves
    the NaN/inf scan of k and v to the caller (:func:`_scan_kv`)."""
    q, k, v, dtype = _check_qkv(q, k, v, finite_kv)
    lead, (Tq, d), Tk = q.shape[:-2], q.shape[-2:], k.shape[-2]
    s = args.scale_of(scale, d)
    causal = args.check_causal(causal)
    window = args.check_window(window, Tq + Tk)
    p, seed = args.check_dropout(dropout_p, seed)
    cu_q, cu_k = args.check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, Tq, Tk)
    if causal == "bottom_right" and cu_q is None and Tq == Tk:
        causal = "top_left"  # the same alignment
    features = {}
    if window is not None:
        features["window"] = window
    if p > 0:
        features.update(dropout_p=p, seed=seed)
    if cu_q is not None:
        features.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if alibi_slopes is not None:
        features["alibi"] = args.check_alibi(alibi_slopes, lead)
    if mask is not None:
        mask = _checks.bool_mask(mask, lead + (Tq, Tk))
    if bias is not None:
        bias = args.check_bias(bias, lead, Tq, Tk, dtype)
        features.update(bias=bias.array, bias_map=bias.bias_map)
    return _Call(q, k, v, dtype, s, True if causal == "top_left" else causal, mask, bias,
                 features)


def _scan_kv(call: _Call) -> None:
    """ValueError naming k or v when it holds NaN or inf."""
    for name, x in (("k", call.k), ("v", call.v)):
        if x.size and not _checks.all_finite(x):
            raise ValueError(f"{name} contains NaN or inf")


def _kernel_scans_kv(call: _Call, backend) -> bool:
    """True when the forward kernel itself tells NaN/inf in k and v (NaN results), so the
    separate scan, a full extra pass over K and V, is needed only when the results are not
    finite: the numba decode path, which reads every key and value (see
    kernels._flash_features.scans_kv)."""
    if _backend.resolve(backend) != "numba" or call.mask is not None:
        return False
    from fastattn.kernels import _flash_features  # numba: only for this backend

    return _flash_features.scans_kv(_flat3(call.q), _flat3(call.k), call.causal, call.features)


def _empty_rows_are_real(call: _Call, empty) -> bool:
    """False when a row that came back empty (lse -inf) has an allowed key after all, i.e.
    its scores overflowed; decidable from mask and top-left causal alone (with the other
    features an empty row may be real, and only NaN/inf in the results tell an overflow)."""
    if call.features or call.causal == "bottom_right":
        return True
    has_key = _rows_with_keys(call.mask, bool(call.causal), call.q.shape[-2])
    return has_key is not None and not (empty & has_key).any()


def attention_forward(q, k, v, *, mask=None, bias=None, causal=False, window=None,
                      alibi_slopes=None, dropout_p=0.0, seed=None, cu_seqlens_q=None,
                      cu_seqlens_k=None, scale=None, backend=None):
    """softmax(scale q k^T + bias + alibi, masked) v with dropout, fused: the (Tq, Tk) score
    matrix is never kept.

    q (..., H, Tq, d); k (..., Hkv, Tk, d) and v (..., Hkv, Tk, dv) with H a multiple of Hkv
    (grouped-query attention; query head h reads key/value head h // (H // Hkv)); one float
    dtype. Keywords (each combines with every other; see the README and DESIGN):

    * ``mask``: bool broadcastable to (..., Tq, Tk), True where a query may attend;
    * ``bias``: float of q's dtype broadcastable to (..., H, Tq, Tk), added to the scaled
      scores (-inf masks);
    * ``causal``: False, True or "top_left" (key j <= query i), "bottom_right"
      (j <= i + Tk - Tq);
    * ``window``: (left, right), ints >= 0 or None: keys i' - left <= j <= i' + right, with
      i' = i, or i + Tk - Tq with bottom-right alignment; whole key blocks outside are skipped;
    * ``alibi_slopes``: (H,) or (..., H): adds -slope |i + Tk - Tq - j|;
    * ``dropout_p``, ``seed``: dropout on the probabilities, decided by a hash of (seed, batch
      entry, i, j), so the backward regenerates it; ``seed`` is required when dropout_p > 0;
    * ``cu_seqlens_q``, ``cu_seqlens_k``: int (n + 1,) offsets of n sequences packed along the
      T axes; each attends to its own keys, positions count from its start;
    * ``scale``: defaults to 1/sqrt(d).

    Returns out (..., H, Tq, dv) and lse (..., H, Tq), the row log-sum-exp before dropout
    (-inf for a row with nothing to attend to, whose out is zero).

    Raises TypeError for a dtype other than float32/float64 or mixed dtypes (no promotion),
    ValueError for shapes that do not fit, NaN/inf in the inputs, bad keywords or logits that
    overflow the dtype. An empty batch (a leading dimension of 0) gives empty results.
    """
    call = _prepare(q, k, v, mask, bias, causal, window, alibi_slopes, dropout_p, seed,
                    cu_seqlens_q, cu_seqlens_k, scale, finite_kv=False)
    lead, Tq, dv, dtype = call.lead, call.q.shape[-2], call.v.shape[-1], call.dtype
    fn = _backend.kernel("attention_forward", backend)
    if call.B == 0 or call.k.size == 0:
        return np.zeros(lead + (Tq, dv), dtype), np.full(lead + (Tq,), -np.inf, dtype)
    scanned = not _kernel_scans_kv(call, backend)
    if scanned:
        _scan_kv(call)
    out, lse = _run_kernel(fn, "attention_forward", dtype, *call.kernel_args(),
                           **call.features)
    if not _checks.all_finite(out) or np.isnan(lse).any() or np.isposinf(lse).any():
        if not scanned:
            _scan_kv(call)
        raise _overflow("attention_forward", dtype)
    empty = np.isneginf(lse)  # (B, Tq): rows the kernel found nothing to attend to
    if empty.any() and not _empty_rows_are_real(call, empty):
        raise _overflow("attention_forward", dtype)
    return out.reshape(lead + (Tq, dv)), lse.reshape(lead + (Tq,))


def attention_backward(dout, q, k, v, out, lse, *, mask=None, bias=None, causal=False,
                       window=None, alibi_slopes=None, dropout_p=0.0, seed=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, scale=None, backend=None):
    """Gradients of :func:`attention_forward`: (dq, dk, dv) shaped like (q, k, v), and dbias
    shaped like bias (summed over its broadcast dimensions) when a bias is given.

    ``out`` and ``lse`` are what attention_forward returned for the same inputs and keywords;
    dout is shaped like out. Errors as for :func:`attention_forward`.
    """
    call = _prepare(q, k, v, mask, bias, causal, window, alibi_slopes, dropout_p, seed,
                    cu_seqlens_q, cu_seqlens_k, scale)
    lead, Tq, dv, dtype = call.lead, call.q.shape[-2], call.v.shape[-1], call.dtype
    dout = _checks.float_array(dout, "dout", ndim_min=2)
    out = _checks.float_array(out, "out", ndim_min=2)
    lse = _checks.float_array(lse, "lse", ndim_min=1, finite=False)
    _checks.same_dtype({"q": call.q, "dout": dout, "out": out, "lse": lse})
    _checks.shape_is(dout, lead + (Tq, dv), "dout")
    _checks.shape_is(out, lead + (Tq, dv), "out")
    _checks.shape_is(lse, lead + (Tq,), "lse")
    if np.isnan(lse).any() or np.isposinf(lse).any():
        raise ValueError("lse contains NaN or +inf; pass the lse that attention_forward returned")
    fn = _backend.kernel("attention_backward", backend)
    if call.B == 0 or call.k.size == 0:
        grads = (np.zeros_like(call.q), np.zeros_like(call.k), np.zeros_like(call.v))
        return grads if call.bias is None else grads + (np.zeros(call.bias.shape, dtype),)
    qf, kf, vf, *rest = call.kernel_args()
    grads = _run_kernel(fn, "attention_backward", dtype, _flat3(dout), qf, kf, vf,
                        _flat3(out), lse.reshape(-1, Tq), *rest, **call.features)
    if not all(_checks.all_finite(g) for g in grads if g.size):
        raise _overflow("attention_backward", dtype)
    dq, dk, dvv = grads[:3]
    res = (dq.reshape(call.q.shape), dk.reshape(call.k.shape), dvv.reshape(call.v.shape))
    return res if call.bias is None else res + (call.bias.grad(grads[3]),)


def merge_attention(outs, lses):
    """Combine attentions of the same queries over disjoint key sets.

    outs: a sequence of n >= 1 arrays (..., Tq, dv); lses: n arrays (..., Tq), as
    :func:`attention_forward` returns them. lse = logsumexp over the parts of the lses,
    out = sum_i exp(lse_i - lse) out_i; a part whose lse is -inf adds nothing, and a row that
    is -inf in every part gives out 0, lse -inf.
    """
    bad = TypeError("outs and lses must be sequences (lists or tuples) of arrays")
    if isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray):
        raise bad
    try:
        outs, lses = list(outs), list(lses)
    except TypeError:  # None, a number: not iterable
        raise bad from None
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of one length, got {len(outs)} "
                         f"and {len(lses)}")
    outs = [_checks.float_array(o, f"outs[{i}]", ndim_min=1) for i, o in enumerate(outs)]
    lses = [_checks.float_array(x, f"lses[{i}]", ndim_min=0, finite=False)
            for i, x in enumerate(lses)]
    _checks.same_dtype({f"outs[{i}]": o for i, o in enumerate(outs)}
                       | {f"lses[{i}]": x for i, x in enumerate(lses)})
    for i, (o, x) in enumerate(zip(outs, lses, strict=True)):
        _checks.shape_is(o, outs[0].shape, f"outs[{i}]")
        _checks.shape_is(x, outs[0].shape[:-1], f"lses[{i}]")
        if np.isnan(x).any() or np.isposinf(x).any():
            raise ValueError(f"lses[{i}] contains NaN or +inf")
    return merge_parts(np.stack(outs), np.stack(lses))


def softmax(x, *, backend=None):
    """Softmax over the last axis of an array of any ndim (the book's ``softmax``).

    x float32/float64, any shape with a last axis of at least 1 -> same shape and dtype.
    """
    x = _checks.float_array(x, "x", ndim_min=1, finite=False)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("x contains NaN or +inf")
    if x.shape[-1] == 0:  # as the Softmax layer; the book's np.max of nothing raises too
        raise ValueError(f"x must have a last axis of at least 1, got shape {x.shape}")
    if x.size == 0:
        return x.copy()
    y = _backend.kernel("softmax_forward", backend)(x.reshape(1, -1, x.shape[-1]))
    return y.reshape(x.shape)
