"""Numerical gradient check for book-style layers (float64 central differences).

Usage from any test module in ``tests/`` (pytest puts this directory on ``sys.path``)::

    from gradcheck import check_layer_grads

    layer = TimeAffine(W, b)                                   # float64 weights
    check_layer_grads(layer, layer.forward, [x], expect={"params", "inputs[0]"})

The check takes the scalar loss ``L = sum(forward_fn(*inputs) * R)`` for a fixed random ``R``
(seeded by ``dout_seed``; for a forward that already returns a scalar loss, ``R = 1``), runs
``backward(R)`` once for the analytic gradients, then compares every element of every param
(and of every float input that has a gradient) with ``(L(x + eps) - L(x - eps)) / (2 eps)``.
It also checks that ``backward`` wrote ``layer.grads`` in place (the same array objects as
before, with the shapes of ``layer.params``). Params listed twice (tied weights) are checked
against the sum of their grads.

The layer's params and the float inputs must be float64. ``forward_fn`` must be deterministic
(reseed inside it for random layers).
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_layer_grads", "numerical_grad"]


def numerical_grad(f, x, eps=1e-6, index=None):
    """Central-difference gradient of the scalar ``f()`` with respect to the array ``x``,
    perturbed in place and restored. ``index``: the flat indices to compute (default all);
    entries not computed are NaN.
    """
    grad = np.full(x.shape, np.nan)
    flat_x = x.reshape(-1)  # a view: x must be contiguous
    flat_g = grad.reshape(-1)
    for i in range(x.size) if index is None else index:
        old = flat_x[i]
        flat_x[i] = old + eps
        fp = f()
        flat_x[i] = old - eps
        fm = f()
        flat_x[i] = old
        flat_g[i] = (fp - fm) / (2 * eps)
    return grad


def _as_list(ret, n_inputs, float_positions):
    """Map what backward returned to one gradient (or None) per input."""
    if ret is None:
        return [None] * n_inputs
    if isinstance(ret, np.ndarray):
        out = [None] * n_inputs
        out[float_positions[0] if float_positions else 0] = ret
        return out
    ret = list(ret)
    if len(ret) != n_inputs:
        raise ValueError(f"backward returned {len(ret)} gradients for {n_inputs} inputs; pass a "
                         "backward_fn returning one gradient (or None) per input")
    return ret


def check_layer_grads(layer, forward_fn, inputs, *, backward_fn=None, dout_seed=0, eps=1e-6,
                      rtol=1e-5, atol=1e-7, max_per_array=None, no_grad=(), expect):
    """Assert that ``layer``'s analytic gradients match float64 central differences.

    layer: has ``params`` and ``grads`` (float64 arrays).
    forward_fn(*inputs) -> output array (loss = sum(out * R)) or a scalar loss (R = 1).
    inputs: list of arguments; float arrays are converted to contiguous float64 copies and
        checked against the gradient backward returns for them; integer ones (token ids) are
        passed unchanged.
    backward_fn(dout) -> None, one array (the gradient of the first float input) or a
        sequence with one gradient or None per input. Default ``layer.backward``.
    max_per_array: check at most this many randomly chosen elements of each array.
    no_grad: positions of float inputs that take no gradient (backward returns None for them);
        any other float input whose gradient is None fails the check, and so does a check
        that compares nothing. Every param and every other float input is checked.
    expect: what the test says it checks: names "params[k]" and "inputs[i]", "params" for
        every param; the check fails unless it compares exactly these.
    Tolerance, per element: ``|analytic - numeric| <= atol + rtol * |numeric|``.

    Returns {name: max abs error} for the arrays checked ("params[k]", "inputs[k]").
    """
    inputs = [np.array(x, dtype=np.float64, order="C") if _is_float(x) else x for x in inputs]
    float_positions = [i for i, x in enumerate(inputs) if _is_float(x)]
    for k, p in enumerate(layer.params):
        if p.dtype != np.float64:
            raise ValueError(f"gradient checks need float64 params; params[{k}] is {p.dtype}")
    if len(layer.params) != len(layer.grads):
        raise AssertionError(f"{len(layer.params)} params but {len(layer.grads)} grads")
    backward_fn = layer.backward if backward_fn is None else backward_fn

    out = forward_fn(*inputs)
    scalar = np.ndim(out) == 0
    rng = np.random.default_rng(dout_seed)
    R = 1.0 if scalar else rng.standard_normal(np.shape(out))
    grads_before = list(layer.grads)
    ret = backward_fn(R if scalar else R.astype(np.asarray(out).dtype))
    for k, (g, g0, p) in enumerate(zip(layer.grads, grads_before, layer.params, strict=True)):
        if g is not g0:
            raise AssertionError(f"backward rebound grads[{k}] instead of writing it in place")
        if g.shape != p.shape:
            raise AssertionError(f"grads[{k}] has shape {g.shape}, params[{k}] {p.shape}")
    dinputs = _as_list(ret, len(inputs), float_positions)

    # analytic gradients, params tied by identity summed
    by_id = {}
    for p, g in zip(layer.params, layer.grads, strict=True):
        if id(p) in by_id:
            by_id[id(p)][1] += g
        else:
            by_id[id(p)] = [p, np.array(g, dtype=np.float64)]

    def loss():
        o = forward_fn(*inputs)
        return float(o) if scalar else float(np.sum(np.asarray(o, dtype=np.float64) * R))

    checks = []
    seen = set()
    for k, p in enumerate(layer.params):
        if id(p) in seen:
            continue
        seen.add(id(p))
        checks.append((f"params[{k}]", p, by_id[id(p)][1]))
    for i in float_positions:
        if i in no_grad:
            if dinputs[i] is not None:
                raise AssertionError(f"backward returned a gradient for inputs[{i}], declared "
                                     "to take none")
            continue
        if dinputs[i] is None:
            raise AssertionError(f"backward returned no gradient (None) for the float "
                                 f"inputs[{i}]; pass no_grad=({i},) if it takes none")
        checks.append((f"inputs[{i}]", inputs[i], np.array(dinputs[i], dtype=np.float64)))
    if not checks:
        raise AssertionError("nothing to check: no params and no float input with a gradient")
    named = set(expect) - {"params"}
    if "params" in expect:
        named |= {name for name, _, _ in checks if name.startswith("params[")}
    if named != {name for name, _, _ in checks}:
        raise AssertionError(f"checked {sorted(name for name, _, _ in checks)}, "
                             f"expected {sorted(named)}")

    errors = {}
    for name, x, analytic in checks:
        if analytic.shape != x.shape:
            raise AssertionError(f"gradient of {name} has shape {analytic.shape}, "
                                 f"expected {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous to be perturbed in place")
        index = None
        if max_per_array is not None and x.size > max_per_array:
            index = rng.choice(x.size, size=max_per_array, replace=False)
        numeric = numerical_grad(loss, x, eps=eps, index=index)
        sel = np.isfinite(numeric)
        diff = np.abs(analytic - numeric)
        bad = sel & ~(diff <= atol + rtol * np.abs(numeric))
        if bad.any():
            j = np.unravel_index(np.argmax(np.where(bad, diff, -1.0)), x.shape)
            raise AssertionError(
                f"gradient of {name} {x.shape} is wrong at {tuple(map(int, j))}: analytic "
                f"{analytic[j]!r}, numeric {numeric[j]!r} ({int(bad.sum())} of "
                f"{int(sel.sum())} elements fail atol={atol}, rtol={rtol})"
            )
        errors[name] = float(diff[sel].max()) if sel.any() else 0.0
    return errors


def _is_float(x):
    return isinstance(x, np.ndarray) and x.dtype.kind == "f"
