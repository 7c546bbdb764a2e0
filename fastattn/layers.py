"""The book's base layers (``common.layers`` and ``common.time_layers``), on fastattn's kernels.

Same class names, constructors, ``forward``/``backward`` signatures, return values and
attributes as the book, so that changing an import is all a user of the book's code does:
``Affine``, ``Softmax``, ``SoftmaxWithLoss``, ``Embedding``, ``TimeEmbedding``, ``TimeAffine``,
``TimeSoftmaxWithLoss``, ``TimeDropout``.

Conventions (as in the book):

* ``self.params`` and ``self.grads`` are flat lists of arrays of the same shapes; the weights
  passed to a constructor are kept by reference (an optimizer updates them in place), and
  ``backward`` writes each gradient in place (``self.grads[0][...] = dW``).
* The weights fix the dtype (float32 or float64; anything else is a ``TypeError``); float
  inputs of the other float dtype are cast to it, and so is ``dout`` (to the forward's dtype).
* ``backend=None`` runs the kernels of the backend in force when ``forward`` is called
  (see :func:`fastattn.use_backend`); a name fixes it for this layer (checked when the layer
  is built). ``backward`` runs on the backend its forward ran on.

Checks the book does not make: token ids must be integers in [0, V) (``ValueError`` /
``TypeError`` before any kernel runs), ``dout`` must have the shape of the forward output
(``ValueError``; for the losses, one real number), and ``backward`` before ``forward`` raises
``RuntimeError``.

Differences from the book, on paths where the book misbehaves or that it leaves open:

* the losses take ``log`` of the softmax probability clipped at the dtype's smallest normal
  number instead of giving ``inf`` (the book's ``TimeSoftmaxWithLoss``); ``SoftmaxWithLoss``
  does not add the book's ``1e-7`` inside the log, so its loss is the exact cross-entropy whose
  gradient ``backward`` returns;
* ``TimeSoftmaxWithLoss`` with every target ignored gives loss 0 and a zero gradient (the book
  divided by zero);
* ``TimeDropout`` in evaluation mode (``train_flg = False``) passes ``dout`` through in
  ``backward`` (the book reused a stale mask, or failed).
"""

from __future__ import annotations

import numpy as np

from fastattn import _backend, _checks
from fastattn._attention_args import check_ratio
from fastattn._layer import (
    check_backend,
    dout_array,
    float_input,
    forward_backend,
    make_rng,
    matmul,
    not_yet,
    scalar_dout,
)

__all__ = [
    "Affine",
    "Embedding",
    "Softmax",
    "SoftmaxWithLoss",
    "TimeAffine",
    "TimeDropout",
    "TimeEmbedding",
    "TimeSoftmaxWithLoss",
]


# --------------------------------------------------------------------------- helpers


def _param(x, name: str, ndim: int) -> np.ndarray:
    """A weight array, kept by reference: float32/float64 numpy array of ``ndim`` dims, each
    of length >= 1."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if 0 in x.shape:  # a (B*T, 0) reshape is ambiguous, and the kernels assume sizes >= 1
        raise ValueError(f"{name} must have no axis of length 0, got shape {x.shape}")
    return x


def _affine_params(W, b):
    """Check an affine layer's W (D, H) and b (H,): one dtype, matching sizes."""
    W = _param(W, "W", 2)
    b = _param(b, "b", 1)
    _checks.same_dtype({"W": W, "b": b})
    if b.shape[0] != W.shape[1]:
        raise ValueError(f"b must have shape ({W.shape[1]},) to match W {W.shape}, got {b.shape}")
    return W, b


def _softmax_rows(x2, backend) -> np.ndarray:
    """Softmax over the last axis of a 2-D array, by the ``softmax_forward`` kernel."""
    x3 = np.ascontiguousarray(x2).reshape(1, x2.shape[0], x2.shape[1])  # (1, N, C)
    return _backend.kernel("softmax_forward", backend)(x3).reshape(x2.shape)


def _one_hot_dtype(t: np.ndarray, name: str) -> None:
    """One-hot targets hold numbers (float, int or bool) for argmax to read, else TypeError:
    argmax would order strings, objects, complex numbers or dates and return ids all the
    same."""
    if t.dtype.kind not in "biuf":
        raise TypeError(f"{name} as one-hot targets must be numbers (float, int or bool), got "
                        f"dtype {t.dtype}")


def _labels(t, N: int, C: int, name: str, *, ignore_label=None):
    """Targets as int64 ids (N,), from ids (N,) or one-hot (N, C) (argmax, as the book does).

    Ids must be in [0, C), or equal to ``ignore_label`` when one is given.
    Returns (ids with ignored entries set to 0, keep mask (N,) bool or None).
    """
    if not isinstance(t, np.ndarray):
        t = _checks.as_array(t, name)
    if t.ndim == 2 and t.shape == (N, C):
        _one_hot_dtype(t, name)
        t = t.argmax(axis=1)  # one-hot targets
    if t.shape != (N,):
        raise ValueError(f"{name} must be ids of shape {(N,)} or one-hot of shape {(N, C)}, "
                         f"got shape {t.shape}")
    if t.dtype == bool or not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    keep = None
    if ignore_label is not None:
        keep = t != ignore_label
        t = np.where(keep, t, 0)
    t = _checks.token_ids(t, C, name, ndim=1)
    return t, keep


def _cross_entropy(y, t, x):
    """-mean(log y[n, t[n]]); y (N, C) = softmax(x) probabilities, t (N,) ids. Where y[n, t[n]]
    is below the dtype's smallest normal number (underflowed, say to 0 when the scores span
    1e4), log y is taken from the scores instead: x[n, t[n]] - logsumexp(x[n]), in float64."""
    N = y.shape[0]
    p = y[np.arange(N), t]  # (N,)
    low = p < np.finfo(y.dtype).tiny
    logp = np.log(np.where(low, 1, p))
    if low.any():
        xl = x[low].astype(np.float64)  # (n, C)
        m = xl.max(axis=1)  # (n,)
        with np.errstate(invalid="ignore"):  # a row of -inf: NaN, as it has no distribution
            lse = m + np.log(np.exp(xl - m[:, None]).sum(axis=1))
            logp[low] = xl[np.arange(len(xl)), t[low]] - lse
    return float(-logp.sum() / max(N, 1))


# --------------------------------------------------------------------------- common.layers


class _AffineMap:
    """out = x W + b over the last axis of x (..., D) -> (..., H): the body of Affine and
    TimeAffine, which differ in the shapes of x they accept (``_check_shape``). On the numba
    backend the products run on the kernels' threads (``kernels._products``), else NumPy's.

    ``_own_products = False`` (an instance's attribute) gives NumPy's products on every
    backend: for a layer among NumPy products, whose BLAS threads are awake anyway, as the
    Transformer's output layer is (see ``TransformerSeq2seq``)."""

    _own_products = True

    def __init__(self, W, b, backend=None):
        W, b = _affine_params(W, b)
        self.params = [W, b]
        self.grads = [np.zeros_like(W), np.zeros_like(b)]
        self.backend = check_backend(backend)
        self.x = None
        self._backend = None

    def _check_shape(self, x, W):
        raise NotImplementedError

    def _mm(self, a, b, ta=False, tb=False):
        return matmul(self._backend if self._own_products else None, a, b, ta, tb)

    def forward(self, x):
        W, b = self.params
        x = float_input(x, "x", W.dtype, ndim_min=2)
        self._check_shape(x, W)
        self.x, self._backend = x, forward_backend(self)
        out = self._mm(x.reshape(-1, W.shape[0]), W)  # (N*T, H)
        out = _backend.kernel("bias_add", self._backend)(out, b)
        return out.reshape(x.shape[:-1] + (W.shape[1],))

    def backward(self, dout):
        if self.x is None:
            raise not_yet(self)
        W, _ = self.params
        x = self.x
        dout = dout_array(dout, x.shape[:-1] + (W.shape[1],), W.dtype)
        rd = dout.reshape(-1, W.shape[1])  # (N*T, H)
        rx = x.reshape(-1, W.shape[0])  # (N*T, D)
        self.grads[0][...] = self._mm(rx, rd, ta=True)  # (D, H)
        self.grads[1][...] = rd.sum(axis=0)  # (H,)
        return self._mm(rd, W, tb=True).reshape(x.shape)


class Affine(_AffineMap):
    """out = x W + b. W (D, H), b (H,); x (N, D) -> (N, H); backward(dout) -> dx (N, D)."""

    def _check_shape(self, x, W):
        if x.ndim != 2 or x.shape[1] != W.shape[0]:
            raise ValueError(f"x must have shape (N, {W.shape[0]}), got {x.shape}")


class Softmax:
    """Softmax over the last axis; x any shape -> same shape; backward(dout) -> dx."""

    def __init__(self, backend=None):
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.out = None
        self._ran_on = None  # the backend of the last forward, which backward runs on

    def forward(self, x):
        x = _checks.float_array(x, "x", ndim_min=1, finite=False)
        if x.shape[-1] == 0:
            raise ValueError(f"x must have a last axis of at least 1, got shape {x.shape}")
        x2 = x.reshape(-1, x.shape[-1])  # (rows, C)
        backend = forward_backend(self)
        self.out = _softmax_rows(x2, backend).reshape(x.shape)
        self._ran_on = backend
        return self.out

    def backward(self, dout):
        if self.out is None:
            raise not_yet(self)
        y = self.out
        dout = dout_array(dout, y.shape, y.dtype)
        C = y.shape[-1]
        dx = _backend.kernel("softmax_backward", self._ran_on)(
            dout.reshape(1, -1, C), y.reshape(1, -1, C)
        )
        return dx.reshape(y.shape)


class SoftmaxWithLoss:
    """Softmax then mean cross-entropy. forward(x (N, C), t ids (N,) or one-hot (N, C)) -> loss.

    backward(dout=1) -> dx (N, C) = (softmax(x) - onehot(t)) * dout / N.
    """

    def __init__(self, backend=None):
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.y = None  # softmax output (N, C)
        self.t = None  # target ids (N,)

    def forward(self, x, t):
        x = _checks.float_array(x, "x", ndim_min=2, finite=False)
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D scores (N, C), got shape {x.shape}")
        N, C = x.shape
        t, _ = _labels(t, N, C, "t")
        self.t = t
        self.y = _softmax_rows(x, forward_backend(self))  # backward runs no kernel
        return _cross_entropy(self.y, t, x)

    def backward(self, dout=1):
        if self.y is None:
            raise not_yet(self)
        N = self.y.shape[0]
        dout = scalar_dout(dout, self.y.dtype)
        dx = self.y.copy()
        dx[np.arange(N), self.t] -= 1
        dx *= dout / dx.dtype.type(max(N, 1))
        return dx


class Embedding:
    """Row lookup out = W[idx]. W (V, D); idx int ids of any shape -> idx.shape + (D,).

    backward(dout) -> None; dW is the scatter-add of dout's rows at idx (repeated ids sum),
    by the ``embedding_backward`` kernel.
    """

    _ids = ("idx", None)  # the name and ndim (None: any) of forward's argument

    def __init__(self, W, backend=None):
        W = _param(W, "W", 2)
        self.params = [W]
        self.grads = [np.zeros_like(W)]
        self.backend = check_backend(backend)
        self.idx = None
        self._ran_on = None  # the backend of the last forward, which backward runs on

    def forward(self, idx):
        W, = self.params
        backend = forward_backend(self)
        name, ndim = self._ids
        idx = _checks.token_ids(idx, W.shape[0], name, ndim=ndim)
        self.idx, self._ran_on = idx, backend
        return W[idx]  # idx.shape + (D,); not self.idx, which another thread may have set

    def backward(self, dout):
        if self.idx is None:
            raise not_yet(self)
        W, = self.params
        V, D = W.shape
        dout = dout_array(dout, self.idx.shape + (D,), W.dtype)
        dW = _backend.kernel("embedding_backward", self._ran_on)(
            self.idx.reshape(1, -1), dout.reshape(1, -1, D), V
        )
        self.grads[0][...] = dW
        return None


# --------------------------------------------------------------------------- common.time_layers


class TimeEmbedding(Embedding):
    """Embedding of a batch of sequences. W (V, D); xs (N, T) ids -> (N, T, D).

    backward(dout (N, T, D)) -> None, dW by the ``embedding_backward`` scatter-add kernel.
    """

    _ids = ("xs", 2)

    def __init__(self, W, backend=None):
        super().__init__(W, backend)
        self.W = self.params[0]
        self.layers = None  # the book kept one Embedding per time step; this layer needs none

    def forward(self, xs):
        return super().forward(xs)  # (N, T, D)


class TimeAffine(_AffineMap):
    """The affine map at every time step. W (D, H), b (H,); x (N, T, D) -> (N, T, H).

    Any number (at least one) of leading dimensions works: x (..., D) -> (..., H).
    backward(dout) -> dx shaped like x.
    """

    def _check_shape(self, x, W):
        if x.shape[-1] != W.shape[0]:
            raise ValueError(f"x must have last dimension {W.shape[0]} (W is {W.shape}), "
                             f"got shape {x.shape}")


class TimeSoftmaxWithLoss:
    """Softmax and mean cross-entropy at every time step, with ignored targets.

    forward(xs (N, T, V), ts ids (N, T) or one-hot (N, T, V)) -> loss, the mean over the
    targets not equal to ``ignore_label`` (-1). backward(dout=1) -> dxs (N, T, V).
    """

    def __init__(self, backend=None):
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.cache = None  # (xs (N*T, V), ts (N*T,), lse (N*T,), count, (N, T, V), backend)
        self.ignore_label = -1

    def forward(self, xs, ts):
        xs = _checks.float_array(xs, "xs", ndim_min=3, finite=False)
        if xs.ndim != 3:
            raise ValueError(f"xs must be 3-D scores (N, T, V), got shape {xs.shape}")
        N, T, V = xs.shape
        if not isinstance(ts, np.ndarray):
            ts = _checks.as_array(ts, "ts")
        if ts.ndim == 3 and ts.shape == (N, T, V):
            _one_hot_dtype(ts, "ts")
            ts = ts.argmax(axis=2)  # one-hot targets
        if ts.shape != (N, T):
            raise ValueError(f"ts must be ids of shape {(N, T)} or one-hot of shape "
                             f"{(N, T, V)}, got shape {ts.shape}")
        t, keep = _labels(ts.reshape(N * T), N * T, V, "ts", ignore_label=self.ignore_label)
        n = N * T
        if keep is not None:  # ignored targets are -1 for the kernels
            t = np.where(keep, t, -1)
            n = int(keep.sum())
        backend = forward_backend(self)
        x2 = xs.reshape(N * T, V)
        loss, lse = _backend.kernel("softmax_xent_forward", backend)(x2, t)  # (N*T,) each
        self.cache = (x2, t, lse, n, (N, T, V), backend)
        return float(loss.sum(dtype=np.float64) / n) if n else 0.0

    def backward(self, dout=1):
        if self.cache is None:
            raise not_yet(self)
        x2, t, lse, n, shape, backend = self.cache
        dout = scalar_dout(dout, x2.dtype)
        scale = dout / x2.dtype.type(max(n, 1))  # d(mean loss)/d(loss of one row)
        dx = _backend.kernel("softmax_xent_backward", backend)(x2, t, lse, scale)
        return dx.reshape(shape)


class TimeDropout:
    """Inverted dropout: in training (``train_flg = True``) each element is kept with
    probability 1 - dropout_ratio and scaled by 1 / (1 - dropout_ratio); in evaluation
    (``train_flg = False``) forward and backward pass their input through.

    The mask comes from ``np.random.rand`` (so ``np.random.seed`` repeats it, as in the book),
    or from ``np.random.default_rng(seed)`` when a ``seed`` is given. It runs no kernel;
    ``backend`` is accepted (and checked) for the same signature as the other layers.
    """

    def __init__(self, dropout_ratio=0.5, seed=None, backend=None):
        ratio = check_ratio(dropout_ratio, "dropout_ratio")
        self.params, self.grads = [], []
        self.backend = check_backend(backend)
        self.dropout_ratio = ratio
        self.mask = None
        self.train_flg = True
        self._rng = None if seed is None else make_rng(seed)
        self._like = None  # (shape, dtype) of the last forward's output

    def forward(self, xs):
        xs = _checks.float_array(xs, "xs", ndim_min=1, finite=False)
        self._like = (xs.shape, xs.dtype)
        if not self.train_flg:
            self.mask = None
            return xs
        u = np.random.rand(*xs.shape) if self._rng is None else self._rng.random(xs.shape)
        scale = 1.0 / (1.0 - self.dropout_ratio)
        self.mask = ((u > self.dropout_ratio) * scale).astype(xs.dtype)
        return xs * self.mask

    def backward(self, dout):
        if self._like is None:
            raise not_yet(self)
        dout = dout_array(dout, *self._like)
        if self.mask is None:
            return dout
        return dout * self.mask
