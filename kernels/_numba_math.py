"""The Numba configuration and small building blocks shared by every fastattn Numba kernel.

* :data:`FASTMATH`: the one set of fastmath flags of the kernels.
* :func:`njit_cached`: ``numba.njit(cache=True, ...)``, or plain ``njit`` where no cache
  location is writable.
* :func:`vexp`: an exp of ``x <= 0`` that LLVM vectorises.
* :func:`fmax`: a max of two floats that LLVM vectorises.
* :func:`take_unit`: hands out work units to threads from a shared counter.

``vexp``
    ``np.exp`` inside ``@njit`` is a call to the scalar libm ``exp``, which stops LLVM's loop
    vectoriser. ``vexp`` uses float arithmetic and one bit cast only, so a loop that applies it
    element by element compiles to SIMD code:

    * range reduction ``x = n ln2 + r`` with ``n = floor(x log2(e) + 1/2)`` and
      ``|r| <= ln2/2``; ``ln2`` is split into a high part (``n * LN2_HI`` is exact) and a low
      part;
    * ``exp(r)`` by a polynomial: float32 the Cephes coefficients (degree 7), float64 the
      Taylor polynomial of degree 13 (truncation error 5e-18);
    * ``2**n`` from exponent bits.

    Its contract is the input range of the kernels: scores minus a row maximum or minus the
    row's log-sum-exp, i.e. ``x <= 0`` (it stays exact up to ``x = 80`` in float32 and ``700``
    in float64; above that it is out of contract) or ``-inf``. ``x < LO`` (``-87`` in float32,
    ``-708`` in float64, where ``exp`` is about the smallest normal number), ``-inf`` included,
    gives exactly 0; NaN gives NaN. Within ``[LO, 0]`` it is within 1 ulp of the correctly
    rounded ``np.exp`` (``tests/test_kernels.py`` checks this). It is compiled without
    ``reassoc``: with it LLVM folds the two-part ``ln2`` back together, and the float64 error
    grows to some 200 ulp near ``LO`` (4 ulp in float32).

``fmax(a, b)``
    LLVM's ``maxnum`` with the no-NaN flag on that one call: a row maximum written with it
    vectorises (Numba's ``max`` handles NaN and stays scalar). Scores are never NaN (the
    public functions reject NaN inputs); ``-inf`` is an ordinary value for it.

``take_unit(counter)``
    An atomic fetch-and-add on ``counter[0]`` (a 1-D int64 array): each thread takes the next
    work unit when it is free.

From Python (or with ``NUMBA_DISABLE_JIT=1``) ``vexp`` is ``np.exp``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

#: The fastmath flags of every fastattn Numba kernel. Never ``nnan``/``ninf``: the kernels mask
#: with ``-inf`` and rely on ``exp(-inf) == 0`` and on comparisons with ``-inf``. No ``afn``
#: either: no kernel gains from approximate library functions, and it would give LLVM leave to
#: replace ``log`` (the flash kernels' log-sum-exp) by something less accurate.
FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})

#: The flags of :func:`vexp`: FASTMATH without ``reassoc`` (see the module docstring).
_EXP_FASTMATH = FASTMATH - {"reassoc"}


def njit_cached(**options):
    """Decorator: ``numba.njit(cache=True, **options)``, or ``numba.njit(**options)`` when
    Numba finds no writable cache location for the function (a read-only install with a
    read-only home), where it refuses ``cache=True`` at decoration time."""

    def decorate(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if "cannot cache" not in str(exc):
                raise
            return njit(**options)(fn)

    return decorate


@intrinsic
def _as_float(typingctx, bits):
    """The bits of an int32 as a float32, of an int64 as a float64 (a bit cast, no
    conversion)."""
    if bits == types.int32:
        sig, lltype = types.float32(bits), ir.FloatType()
    elif bits == types.int64:
        sig, lltype = types.float64(bits), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], lltype)

    return sig, codegen


# ---- vexp -------------------------------------------------------------------------------------

_LO32 = np.float32(-87.0)  # exp(-87) ~ 1.6e-38, above the smallest normal float32
_LOG2E32 = np.float32(1.4426950408889634)
_LN2HI32 = np.float32(0.693359375)  # Cephes split: n * _LN2HI32 is exact
_LN2LO32 = np.float32(-2.12194440e-4)
_C32 = tuple(np.float32(c) for c in (
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1))
_C32_0, _C32_1, _C32_2, _C32_3, _C32_4, _C32_5 = _C32
_ONE32 = np.float32(1.0)
_HALF32 = np.float32(0.5)
_ZERO32 = np.float32(0.0)

_LO64 = np.float64(-708.0)  # exp(-708) ~ 3.3e-308, above the smallest normal float64
_LOG2E64 = np.float64(1.4426950408889634)
_LN2HI64 = np.float64(6.93147180369123816490e-01)  # fdlibm split: n * _LN2HI64 is exact
_LN2LO64 = np.float64(1.90821492927058770002e-10)
_F64 = tuple(np.float64(1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(14))
(_F0, _F1, _F2, _F3, _F4, _F5, _F6, _F7, _F8, _F9, _F10, _F11, _F12, _F13) = _F64  # 1/k!
_HALF64 = np.float64(0.5)
_ZERO64 = np.float64(0.0)


def vexp(x):
    """exp(x) for a float32/float64 scalar x <= 0 or -inf, vectorisable inside Numba kernels
    (see the module docstring); ``np.exp`` from Python."""
    return np.exp(x)


def _exp32(x):
    xc = max(x, _LO32)
    n = np.floor(xc * _LOG2E32 + _HALF32)
    r = (xc - n * _LN2HI32) - n * _LN2LO32  # |r| <= ln2/2
    p = _C32_0
    p = p * r + _C32_1
    p = p * r + _C32_2
    p = p * r + _C32_3
    p = p * r + _C32_4
    p = p * r + _C32_5
    p = p * (r * r) + r + _ONE32
    scale = _as_float(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))  # 2**n
    y = p * scale if x >= _LO32 else _ZERO32
    return x if x != x else y  # NaN stays NaN


def _exp64(x):
    xc = max(x, _LO64)
    n = np.floor(xc * _LOG2E64 + _HALF64)
    r = (xc - n * _LN2HI64) - n * _LN2LO64  # |r| <= ln2/2
    p = _F13
    p = p * r + _F12
    p = p * r + _F11
    p = p * r + _F10
    p = p * r + _F9
    p = p * r + _F8
    p = p * r + _F7
    p = p * r + _F6
    p = p * r + _F5
    p = p * r + _F4
    p = p * r + _F3
    p = p * r + _F2
    p = p * r + _F1
    p = p * r + _F0
    scale = _as_float((np.int64(n) + np.int64(1023)) << np.int64(52))  # 2**n
    y = p * scale if x >= _LO64 else _ZERO64
    return x if x != x else y  # NaN stays NaN


# Compiled as its own function with its own flags; LLVM inlines it into the calling loop and
# keeps each instruction's flags.
@overload(vexp, jit_options={"fastmath": set(_EXP_FASTMATH)})
def _vexp_overload(x):
    if x == types.float32:
        return _exp32
    if x == types.float64:
        return _exp64
    return None


# ---- fmax, take_unit --------------------------------------------------------------------------


@intrinsic
def fmax(typingctx, a, b):
    """max(a, b) of two floats of one type, as llvm.maxnum with nnan/nsz on the call."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        lltype = context.get_value_type(signature.return_type)
        name = "llvm.maxnum.f32" if lltype == ir.FloatType() else "llvm.maxnum.f64"
        fn = cgutils.get_or_insert_function(builder.module,
                                            ir.FunctionType(lltype, [lltype, lltype]), name)
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return a(a, b), codegen


@intrinsic
def take_unit(typingctx, counter):
    """Atomically counter[0] += 1; returns the value before (counter: 1-D int64 array)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64
            and counter.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", ary.data, one, "seq_cst")

    return types.int64(counter), codegen
