"""Which kernel backend runs: "loop", "vectorized" or "numba".

Chosen, most specific first, by a layer's or function's ``backend=`` argument, the innermost
``with use_backend(name):``, ``set_backend(name)``, the environment variable
``FASTATTN_BACKEND``, and the default "numba" (or "vectorized", with a warning, when numba
cannot be imported).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings

from fastattn import kernels
from fastattn.kernels import BACKENDS

ENV_VAR = "FASTATTN_BACKEND"

_global_backend: str | None = None
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastattn_backend", default=None
)
_numba_error: str | None = None  # why numba could not be imported, once known
_numba_checked = False
_fallback_warned = False  # the fallback warning is given once per process
_profiler = None  # a fastattn.profiling.Profile while one is active


def numba_available() -> bool:
    """True when numba imports; the reason it does not is kept for the warning."""
    global _numba_checked, _numba_error
    if not _numba_checked:
        _numba_checked = True
        try:
            import numba  # noqa: F401
        except Exception as exc:  # any import failure means: no numba backend
            _numba_error = f"{type(exc).__name__}: {exc}"
    return _numba_error is None


def _default_backend() -> str:
    global _fallback_warned
    if numba_available():
        return "numba"
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"numba cannot be imported ({_numba_error}); fastattn falls back to the "
            "'vectorized' backend",
            RuntimeWarning,
            stacklevel=3,
        )
    return "vectorized"


def set_backend(name: str) -> None:
    """Set the process-wide backend (None restores the environment/default choice)."""
    global _global_backend
    _global_backend = None if name is None else kernels.check_backend(name)


def get_backend() -> str:
    """The name of the backend in force here (without a ``backend=`` argument)."""
    name = _context_backend.get()
    if name is not None:
        return name
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return kernels.check_backend(env.strip())
        except ValueError:
            raise ValueError(
                f"environment variable {ENV_VAR}={env!r} names no backend; valid backends "
                f"are: {', '.join(map(repr, BACKENDS))}"
            ) from None
    return _default_backend()


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("loop"): ...`` runs the block on that backend."""
    token = _context_backend.set(kernels.check_backend(name))
    try:
        yield name
    finally:
        _context_backend.reset(token)


def resolve(backend: str | None) -> str:
    """``backend`` itself when given (checked), else the backend in force."""
    if backend is None:
        return get_backend()
    return kernels.check_backend(backend)


_checked: dict = {}  # (kernel name, backend) -> its module, once the pair has been checked


def kernel(name: str, backend: str | None = None):
    """The kernel ``name`` of the resolved backend.

    A pair already checked takes one dict lookup (layers call this once per kernel call; a
    decoding step makes about a dozen calls). The kernel is read from its module on every
    call, so a function that a test puts in its place is found.
    """
    b = get_backend() if backend is None else backend
    try:
        mod = _checked.get((name, b))
    except TypeError:  # unhashable: kernels.get below names the bad argument
        mod = None
    if mod is not None:
        fn = getattr(mod, name)
    else:
        b = resolve(backend)
        if b == "numba" and not numba_available():
            raise ImportError(
                f"the 'numba' backend needs numba, which cannot be imported: {_numba_error}"
            )
        fn = kernels.get(name, b)
        _checked[(name, b)] = kernels.module(b, kernels.family_of(name))
    if _profiler is not None:
        fn = _profiler.wrap_kernel(name, b, fn)
    return fn


def set_profiler(profiler):
    """Install ``profiler`` (or None) to time kernels; returns the previous one."""
    global _profiler
    previous, _profiler = _profiler, profiler
    return previous
