"""An exp that LLVM can vectorise inside Numba kernels.

``np.exp`` inside ``@njit`` is a call to the scalar libm ``exp``, which stops the loop
vectoriser. :func:`fast_exp` is written with float arithmetic only (plus one bit cast), so a
loop that applies it element by element compiles to SIMD code:

* range reduction ``x = n ln2 + r`` with ``n = floor(x log2(e) + 1/2)`` and ``|r| <= ln2/2``;
  ``ln2`` is split into a short high part (``n * LN2_HI`` is exact) and a low part;
* ``exp(r)`` by a polynomial: float32 degree 6, coefficients from a relative-error-weighted
  Chebyshev least-squares fit on ``[-ln2/2, ln2/2]`` (fit error 2e-8); float64 the Taylor
  polynomial of degree 13 (truncation error 5e-18);
* ``2**n`` built from exponent bits as two factors ``2**(n//2) * 2**(n - n//2)``, so that
  results near the overflow and in the subnormal range come out right without integer
  arithmetic: the bit pattern ``(m + bias) * 2**mantissa_bits`` is an exactly representable
  float that is converted to an integer and reinterpreted as a float.

Inputs below ``LO`` (including ``-inf``) give exactly 0, inputs above ``HI`` give ``inf``, NaN
gives NaN. The error against ``np.exp`` is a few ulp (see ``tests/test_kernels.py``).

Use from a Numba kernel with ``fast_exp(x)`` on a float32 or float64 scalar; called from Python
it is ``np.exp``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

#: The fastmath flags of every fastattn Numba kernel. Never ``nnan``/``ninf``: the kernels mask
#: with ``-inf`` and rely on ``exp(-inf) == 0`` and on comparisons with ``-inf``.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# float32 constants
_LOG2E_32 = np.float32(1.4426950408889634)
_LN2_HI_32 = np.float32(0.693145751953125)  # 16 significant bits: n * _LN2_HI_32 is exact
_LN2_LO_32 = np.float32(1.4286068203094173e-06)  # ln2 - _LN2_HI_32
_LO_32 = np.float32(-104.0)  # exp(-104) < 2**-150: rounds to 0
_HI_32 = np.float32(89.0)  # exp(89) > float32 max
_P32 = tuple(
    np.float32(c)
    for c in (
        1.0,
        1.0,
        0.49999991059303284,
        0.1666642129421234,
        0.0416683591902256,
        0.0083747748285532,
        0.001382942427881062,
    )
)
_P32_0, _P32_1, _P32_2, _P32_3, _P32_4, _P32_5, _P32_6 = _P32
_HALF_32 = np.float32(0.5)
_ZERO_32 = np.float32(0.0)
_BIAS_32 = np.float32(127.0)
_MANT_32 = np.float32(2.0**23)

# float64 constants
_LOG2E_64 = np.float64(1.4426950408889634)
_LN2_HI_64 = np.float64(0.6931471806019545)  # 32 significant bits: n * _LN2_HI_64 is exact
_LN2_LO_64 = np.float64(-4.2009150726810846e-11)  # ln2 - _LN2_HI_64
_LO_64 = np.float64(-746.0)  # exp(-746) < 2**-1075: rounds to 0
_HI_64 = np.float64(710.0)  # exp(710) > float64 max
_INV_FACT = tuple(np.float64(1.0 / np.prod(np.arange(1.0, k + 1))) for k in range(14))  # 1/k!
(_F0, _F1, _F2, _F3, _F4, _F5, _F6, _F7, _F8, _F9, _F10, _F11, _F12, _F13) = _INV_FACT
_HALF_64 = np.float64(0.5)
_ZERO_64 = np.float64(0.0)
_BIAS_64 = np.float64(1023.0)
_MANT_64 = np.float64(2.0**52)


@intrinsic
def _bits_to_float(typingctx, bits):
    """Reinterpret an int32 as float32 or an int64 as float64 (a bit cast, no conversion)."""
    if bits == types.int32:
        sig, lltype = types.float32(bits), ir.FloatType()
    elif bits == types.int64:
        sig, lltype = types.float64(bits), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], lltype)

    return sig, codegen


def fast_exp(x):
    """exp(x) for a float32 or float64 scalar, vectorisable inside Numba kernels.

    From Python (or with NUMBA_DISABLE_JIT=1) this is ``np.exp``.
    """
    return np.exp(x)


def _exp32(x):
    xc = min(max(x, _LO_32), _HI_32)
    n = np.floor(xc * _LOG2E_32 + _HALF_32)  # float32, in [-150, 128]
    r = (xc - n * _LN2_HI_32) - n * _LN2_LO_32  # |r| <= ln2/2
    p = _P32_6
    p = p * r + _P32_5
    p = p * r + _P32_4
    p = p * r + _P32_3
    p = p * r + _P32_2
    p = p * r + _P32_1
    p = p * r + _P32_0
    n1 = np.floor(n * _HALF_32)  # 2**n = 2**n1 * 2**n2, each factor a normal float
    n2 = n - n1
    s1 = _bits_to_float(np.int32((n1 + _BIAS_32) * _MANT_32))
    s2 = _bits_to_float(np.int32((n2 + _BIAS_32) * _MANT_32))
    y = p * s1 * s2
    y = _ZERO_32 if x < _LO_32 else y
    return x if x != x else y  # NaN stays NaN


def _exp64(x):
    xc = min(max(x, _LO_64), _HI_64)
    n = np.floor(xc * _LOG2E_64 + _HALF_64)  # in [-1076, 1025]
    r = (xc - n * _LN2_HI_64) - n * _LN2_LO_64  # |r| <= ln2/2
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
    n1 = np.floor(n * _HALF_64)
    n2 = n - n1
    s1 = _bits_to_float(np.int64((n1 + _BIAS_64) * _MANT_64))
    s2 = _bits_to_float(np.int64((n2 + _BIAS_64) * _MANT_64))
    y = p * s1 * s2
    y = _ZERO_64 if x < _LO_64 else y
    return x if x != x else y


# Compiled as its own function, without "reassoc" (which would undo the two-part ln2 and the
# order of the two scale factors); LLVM inlines it into the calling loop and keeps each
# instruction's own flags.
_EXP_FASTMATH = FASTMATH - {"reassoc"}


@overload(fast_exp, jit_options={"fastmath": _EXP_FASTMATH})
def _fast_exp_overload(x):
    if x == types.float32:
        return _exp32
    if x == types.float64:
        return _exp64
    return None
