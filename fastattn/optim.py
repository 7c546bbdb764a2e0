"""Optimizers with the book's interface, ``update(params, grads)`` in place, and gradient clipping.

``SGD`` and ``Adam`` behave as the book's ``common.optimizer`` (Adam with the book's bias
correction folded into the step size and ``1e-7`` added to ``sqrt(v)``). ``Adam`` also takes
an optional learning-rate schedule: a linear warm-up over ``warmup_steps`` updates, then a
cosine (or linear) decay to ``min_lr`` at update ``total_steps``.

>>> opt = Adam(lr=2e-3, warmup_steps=100, total_steps=2000)
>>> opt.update(model.params, model.grads)   # params change in place
"""

from __future__ import annotations

import math

import numpy as np

from fastattn import _backend, _checks
from fastattn._layer import check_backend

__all__ = ["SGD", "Adam", "clip_grads", "lr_schedule"]


def _steps(value, name: str, *, low: int, none: bool = False):
    """A count of updates: an int >= ``low`` (or None when ``none``), else TypeError or
    ValueError naming it (no truncation of 2.5, no OverflowError for inf)."""
    value = _checks.scalar(value)
    if value is None and none:
        return None
    if not _checks.is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if none else ''}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{' or None' if none else ''}, got {value!r}")
    return int(value)


def _float_array(a, name: str, i: int) -> None:
    """TypeError naming ``name[i]`` unless ``a`` is a float numpy array (updated in place: no
    conversion)."""
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name}[{i}] must be a float numpy array, got {got}")


def _check_lists(params, grads):
    if len(params) != len(grads):
        raise ValueError(f"params and grads must have the same length, got {len(params)} and "
                         f"{len(grads)}")
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        _float_array(p, "params", i)
        _float_array(g, "grads", i)
        if p.shape != g.shape:
            raise ValueError(f"grads[{i}] has shape {g.shape}, params[{i}] has {p.shape}")


def clip_grads(grads, max_norm):
    """Scale all ``grads`` in place so that their joint L2 norm is at most ``max_norm``.

    Returns the norm before clipping (the book's ``clip_grads``, which returned nothing). A
    norm whose square overflows the grads' dtype (float32 entries beyond about 1.8e19) is
    computed on scaled values, so such grads are scaled down rather than zeroed. ``grads``
    must be float numpy arrays (TypeError naming ``grads[i]``).
    """
    max_norm = _checks.finite_real(max_norm, "max_norm", positive=True)
    grads = list(grads)
    for i, g in enumerate(grads):
        _float_array(g, "grads", i)
    total = 0.0
    with np.errstate(over="ignore"):  # an overflow is taken again below
        for g in grads:
            flat = g.reshape(-1)
            total += float(np.dot(flat, flat))
    total_norm = math.sqrt(total)
    if not math.isfinite(total_norm):  # overflowed (float32 gradients of 1e19), or inf/NaN
        total_norm = _scaled_norm(grads)
    rate = max_norm / (total_norm + 1e-6)
    if rate < 1:
        for g in grads:
            g *= g.dtype.type(rate)
    return total_norm


def _scaled_norm(grads) -> float:
    """The joint L2 norm of ``grads`` whose sum of squares overflows their dtype: in float64,
    each divided by the largest |g| first; inf or NaN when some gradient holds one."""
    tops = [float(np.abs(g).max()) for g in grads if g.size]
    if any(math.isnan(t) for t in tops):
        return math.nan
    top = max(tops, default=0.0)
    if not 0.0 < top < math.inf:
        return top
    total = 0.0
    for g in grads:
        flat = g.reshape(-1).astype(np.float64) / top
        total += float(np.dot(flat, flat))
    return top * math.sqrt(total)


def lr_schedule(step: int, lr: float, warmup_steps: int = 0, total_steps: int | None = None,
                min_lr: float = 0.0, decay: str = "cosine") -> float:
    """The learning rate of update number ``step`` (1-based): linear warm-up from lr/warmup to
    lr over ``warmup_steps``, then (when ``total_steps`` is given) a cosine or linear decay
    reaching ``min_lr`` at ``total_steps`` and staying there."""
    factor = 1.0
    if warmup_steps and step < warmup_steps:
        factor = step / warmup_steps
    if total_steps is None or step <= warmup_steps:
        return lr * factor
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_lr + (lr - min_lr) * shape


class SGD:
    """Stochastic gradient descent: ``param -= lr * grad`` for each pair."""

    def __init__(self, lr=0.01):
        self.lr = _checks.finite_real(lr, "lr")

    def update(self, params, grads):
        _check_lists(params, grads)
        for p, g in zip(params, grads, strict=True):
            p -= p.dtype.type(self.lr) * g


class Adam:
    """Adam (Kingma and Ba), the book's version, with an optional warm-up/decay schedule.

    Adam(lr=0.001, beta1=0.9, beta2=0.999, *, warmup_steps=0, total_steps=None, min_lr=0.0,
    decay="cosine", eps=1e-7, backend=None). Without ``warmup_steps``/``total_steps`` the
    learning rate is constant, as in the book. ``current_lr`` is the scheduled rate of the last
    update (before the first, the rate the first will use); ``iter`` counts updates. The
    moments are made at the first update: later updates take params of the same number and
    shapes (ValueError otherwise). The update of all parameters is one call of the
    ``adam_update`` kernel of ``backend`` (None: the backend in force); the numba one needs
    C-contiguous arrays of one dtype, and others go to the vectorized one. ``eps`` must be
    > 0 also in the dtype of the params (1e-50 is 0 in float32): an update raises ValueError
    before changing anything otherwise.
    """

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, *, warmup_steps=0, total_steps=None,
                 min_lr=0.0, decay="cosine", eps=1e-7, backend=None):
        self.backend = check_backend(backend)
        self.lr = _checks.finite_real(lr, "lr")
        self.beta1 = _checks.finite_real(beta1, "beta1")
        self.beta2 = _checks.finite_real(beta2, "beta2")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1!r}, {beta2!r}")
        self.warmup_steps = _steps(warmup_steps, "warmup_steps", low=0)
        self.total_steps = _steps(total_steps, "total_steps", low=1, none=True)
        self.min_lr = _checks.finite_real(min_lr, "min_lr")
        if decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")
        self.decay = decay
        self.eps = _checks.finite_real(eps, "eps", positive=True)  # 0: 0 / 0 where m = v = 0
        self.iter = 0
        self.m = None
        self.v = None
        self.current_lr = lr_schedule(1, self.lr, self.warmup_steps, self.total_steps,
                                      self.min_lr, self.decay)

    def update(self, params, grads):
        _check_lists(params, grads)
        for dt in {p.dtype for p in params}:  # the kernels compute in the params' dtype
            if not dt.type(self.eps) > 0:  # 0 / 0 where m = v = 0, as for eps=0
                raise ValueError(f"eps must be > 0 in {dt.name} (the dtype of params), got "
                                 f"{self.eps!r}, which rounds to 0 there")
        if self.m is None:
            # C-contiguous whatever the params' layout: a later update may take C params to the
            # numba kernel, which would update flattened copies of F-ordered moments
            self.m = [np.zeros(p.shape, p.dtype) for p in params]
            self.v = [np.zeros(p.shape, p.dtype) for p in params]
        else:
            if len(self.m) != len(params):
                raise ValueError(f"Adam was used with {len(self.m)} params, now {len(params)}")
            for i, (p, m) in enumerate(zip(params, self.m, strict=True)):
                if p.shape != m.shape:  # the kernels would read and write m and v beyond their end
                    raise ValueError(f"params[{i}] has shape {p.shape}; Adam was used with "
                                     f"shape {m.shape} there")
        self.iter += 1
        lr = lr_schedule(self.iter, self.lr, self.warmup_steps, self.total_steps, self.min_lr,
                         self.decay)
        self.current_lr = lr
        lr_t = lr * math.sqrt(1.0 - self.beta2 ** self.iter) / (1.0 - self.beta1 ** self.iter)
        backend = _backend.resolve(self.backend)
        if backend == "numba" and not _one_contiguous_dtype([*params, *self.m, *self.v], grads):
            backend = "vectorized"
        # m += (1 - beta1) (g - m); v += (1 - beta2) (g^2 - v); p -= lr_t m / (sqrt(v) + eps),
        # with the moments as beta m + (1 - beta) g (see kernels.glue_loop.adam_update)
        _backend.kernel("adam_update", backend)(params, grads, self.m, self.v, lr_t,
                                                self.beta1, self.beta2, self.eps)


def _one_contiguous_dtype(params, grads):
    arrays = [*params, *grads]
    return all(a.flags.c_contiguous and a.dtype == arrays[0].dtype for a in arrays)
