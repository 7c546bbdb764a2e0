"""The Numba configuration and small building blocks shared by every fastattn Numba kernel.

* :data:`FASTMATH`: the one set of fastmath flags of the kernels.
* :func:`njit_cached`: ``numba.njit(cache=True, ...)`` whose cache goes stale with any module
  of this package, or plain ``njit`` where no cache location is writable.
* :func:`vexp`: an exp of ``x <= 0`` that LLVM vectorises.
* :func:`vtanh`: a tanh that LLVM vectorises (on :func:`vexp`; a polynomial near 0).
* :func:`fmax`: a max of two floats that LLVM vectorises.
* :func:`wide_vectors`: a function's loops vectorised with 64-byte vectors on AVX-512 code.
* :func:`take_unit`: hands out work units to threads from a shared counter.
* :func:`finite_flat`: no NaN or inf in an array, in one pass (the input checks use it).
* :func:`read_only`: an array as the kernels take the arrays they only read.
* :func:`borrow`, :func:`keep_alive`: an array without its reference count, and keeping a
  borrowed local array alive.

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

import functools
import hashlib
import math
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload

#: The fastmath flags of every fastattn Numba kernel. Never ``nnan``/``ninf``: the kernels mask
#: with ``-inf`` and rely on ``exp(-inf) == 0`` and on comparisons with ``-inf``. No ``afn``
#: either: no kernel gains from approximate library functions, and it would give LLVM leave to
#: replace ``log`` (the flash kernels' log-sum-exp) by something less accurate.
FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})

#: The flags of :func:`vexp`: FASTMATH without ``reassoc`` (see the module docstring).
_EXP_FASTMATH = FASTMATH - {"reassoc"}


@functools.cache
def _package_stamp() -> bytes | None:
    """A digest of every module of this package (None when they cannot be read)."""
    digest = hashlib.sha256()
    try:
        for path in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    except OSError:
        return None
    return digest.digest()


def _stale_with_the_package(dispatcher):
    """Make the cached machine code of ``dispatcher`` stale when any module of this package
    changes, not only the function's own file: Numba compares only that file with the cache,
    and a kernel inlines helpers from the other modules (a changed helper would otherwise run
    as its old machine code). Numba's cache index keeps a source stamp; the package's digest
    joins it, and so does the module's name: the same file imported under another name (the
    repository's ``kernels`` from its root, against the installed ``fastattn.kernels``) wrote
    machine code whose environment imports that other name, and loading it failed with
    ModuleNotFoundError. Where that private attribute is missing (another Numba), nothing
    changes."""
    index = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    stamp = _package_stamp()
    if index is not None and hasattr(index, "_source_stamp") and stamp is not None:
        index._source_stamp = (index._source_stamp, stamp, dispatcher.py_func.__module__)
    return dispatcher


def njit_cached(**options):
    """Decorator: ``numba.njit(cache=True, **options)``, its cache stale whenever any module
    of this package changes; or ``numba.njit(**options)`` when Numba finds no writable cache
    location for the function (a read-only install with a read-only home), where it refuses
    ``cache=True`` at decoration time."""

    def decorate(fn):
        try:
            return _stale_with_the_package(njit(cache=True, **options)(fn))
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if "cannot cache" not in str(exc):
                raise
            return njit(**options)(fn)

    return decorate


def read_only(a: np.ndarray) -> np.ndarray:
    """``a`` as a read-only view (``a`` itself when it is one already), without a copy.

    Numba types a read-only array apart from a writeable one, so a kernel compiles once more
    for every mix of the two among its arguments: a fused attention kernel 6 s and more each
    time. Callers hand the arrays a kernel only reads either way (``np.broadcast_to`` and
    its reshapes give read-only views, ``np.ascontiguousarray`` keeps them), so the Python
    side passes those (masks, biases, sequence offsets, slopes, stand-ins for features that
    are off) read-only always."""
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


@njit_cached(nogil=True)  # no fastmath: it would let LLVM assume there is no NaN or inf
def finite_flat(x):
    """True when the 1-D x holds no NaN or inf (x - x is NaN for both), in one pass."""
    wide_vectors()
    ok = True
    for i in range(x.size):
        ok &= (x[i] - x[i]) == 0
    return ok


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

def vexp(x):
    """exp(x) for a float32/float64 scalar x <= 0 or -inf, vectorisable inside Numba kernels
    (see the module docstring); ``np.exp`` from Python."""
    return np.exp(x)


def _exp_of(ft, it, lo, ln2_hi, ln2_lo, poly, cephes):
    """The vexp of float type ``ft`` (``it`` the int of its width): exp(x) = 2**n exp(r) with
    x = n ln2 + r, ln2 = ln2_hi + ln2_lo (n * ln2_hi is exact), exp(r) by the polynomial
    ``poly`` (coefficients, highest degree first): exp(r) = poly(r) or, with ``cephes``,
    1 + r + r**2 poly(r)."""
    lo, log2e, half, one, zero = ft(lo), ft(1.4426950408889634), ft(0.5), ft(1.0), ft(0.0)
    nan = ft(np.nan)
    ln2_hi, ln2_lo = ft(ln2_hi), ft(ln2_lo)
    c0, cs = ft(poly[0]), tuple(ft(c) for c in poly[1:])
    bias, shift = it(np.finfo(ft).maxexp - 1), it(np.finfo(ft).nmant)

    def exp(x):
        xc = max(x, lo)
        n = np.floor(xc * log2e + half)
        r = (xc - n * ln2_hi) - n * ln2_lo  # |r| <= ln2/2
        p = c0
        for c in cs:
            p = p * r + c
        if cephes:
            p = p * (r * r) + r + one
        scale = _as_float(it((it(n) + bias) << shift))  # 2**n
        y = p * scale if x >= lo else zero
        # NaN stays NaN; a NaN constant, not x: with x, LLVM turns ``x[i] = vexp(x[i])``
        # into a store of the non-NaN lanes only, a masked store that is slow on AVX2 (on a
        # Zen 4 the float32 loop took 2.5 times the time of the AVX-512 one, 2.3 cycles an
        # item)
        return nan if x != x else y

    return exp


# float32: exp(-87) ~ 1.6e-38, above the smallest normal number; Cephes' ln2 split and
# polynomial (degree 7 in all)
_exp32 = _exp_of(np.float32, np.int32, -87.0, 0.693359375, -2.12194440e-4,
                 (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                  1.6666665459e-1, 5.0000001201e-1), cephes=True)
# float64: exp(-708) ~ 3.3e-308, above the smallest normal number; fdlibm's ln2 split and the
# Taylor polynomial of degree 13 (1/k!)
_exp64 = _exp_of(np.float64, np.int64, -708.0, 6.93147180369123816490e-01,
                 1.90821492927058770002e-10,
                 tuple(1.0 / math.factorial(k) for k in range(13, -1, -1)), cephes=False)


def _per_float_type(fn, impl32, impl64):
    """Give ``fn`` inside Numba kernels the implementation of its argument's float type,
    compiled as its own function with the flags of :func:`vexp` (LLVM inlines it into the
    calling loop and keeps each instruction's flags)."""

    @overload(fn, jit_options={"fastmath": set(_EXP_FASTMATH)})
    def _overload(x):
        return {types.float32: impl32, types.float64: impl64}.get(x)


_per_float_type(vexp, _exp32, _exp64)


# ---- vtanh ------------------------------------------------------------------------------------

def vtanh(x):
    """tanh(x) for a float32/float64 scalar, vectorisable inside Numba kernels as :func:`vexp`
    is; ``np.tanh`` from Python."""
    return np.tanh(x)


def _tanh_of(ft, p, q):
    """The vtanh of float type ``ft``: for |x| >= 0.625, (1 - e) / (1 + e) with e =
    exp(-2|x|) (no cancellation: e <= 0.29); below, where 1 - e would lose the relative
    accuracy of small x, Cephes' x + x^3 P(x^2) / Q(x^2) (coefficients highest degree
    first; ``q=None``: Q = 1, no division)."""
    zero, one, cut = ft(0.0), ft(1.0), ft(0.625)
    ps, qs, rational = tuple(ft(c) for c in p), tuple(ft(c) for c in q or (1.0,)), bool(q)

    def tanh(x):
        a = abs(x)
        e = vexp(-(a + a))
        z = a * a
        pz = zero
        for c in ps:
            pz = pz * z + c
        if rational:
            qz = zero
            for c in qs:
                qz = qz * z + c
            pz = pz / qz
        t = (one - e) / (one + e) if a >= cut else a + a * z * pz
        return t if x >= 0 else -t

    return tanh


_per_float_type(vtanh,
                _tanh_of(np.float32, (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2,
                                      1.33314422036e-1, -3.33332819422e-1), None),
                _tanh_of(np.float64, (-9.64399179425052238628e-1, -9.92877231001918586564e1,
                                      -1.61468768441708447952e3),
                         (1.0, 1.12811678491632931402e2, 2.23548839060100448583e3,
                          4.84406305325125486048e3)))


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


@intrinsic
def borrow(typingctx, a):
    """``a`` without its reference count: the same array (data, shape, strides) with no
    meminfo, so that neither it nor any view taken of it (a row, a slice, a reshape) touches
    the count. Numba counts references with atomic instructions, and a kernel that takes a view
    per row or per tile, or passes arrays to a helper, pays for two of them per view: on a
    2-core Intel Xeon (Emerald Rapids) they took a third of the fused forward's time.

    The caller keeps ``a`` alive while the borrowed array is in use: an argument of the kernel
    (its caller holds it), or a local array passed to :func:`keep_alive` after the last use. A
    borrowed array must not leave the kernel (returned, or stored in another array)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        ary = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        ary.parent = cgutils.get_null_value(ary.parent.type)
        return ary._getvalue()

    return a(a), codegen


@intrinsic
def generic(typingctx, x):
    """``x`` typed generically: an array as layout 'A' (the same array, not a copy), a literal
    as its plain type. A helper that its callers reach through this compiles once per dtype,
    not once for every mix of contiguous and strided arguments and constant flags that they
    pass (each a compilation of its own, some seconds for the tile products)."""
    to = x.copy(layout="A") if isinstance(x, types.Array) else types.unliteral(x)

    def codegen(context, builder, signature, args):
        (fromty,), toty = signature.args, signature.return_type
        return impl_ret_borrowed(context, builder, toty,
                                 context.cast(builder, args[0], fromty, toty))

    return to(x), codegen


@intrinsic
def keep_alive(typingctx, a):
    """Does nothing, but counts as a use of ``a``: Numba releases a local array after its last
    use, so a kernel that works on a :func:`borrow` of one names it here after that."""
    sig = types.none(a)

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return sig, codegen


#: The function attribute that :func:`wide_vectors` sets (LLVM's, as clang's
#: ``-mprefer-vector-width=512`` sets it)
_WIDE_ATTRIBUTE = '"prefer-vector-width"="512"'


@functools.cache
def _wide() -> bool:
    """Whether :func:`wide_vectors` asks for 512-bit vectors: when Numba makes AVX-512 code."""
    from ._tuning import compiled_isa

    return compiled_isa() == "avx512"


@intrinsic
def wide_vectors(typingctx):
    """Does nothing at run time; compiled into a function, it has LLVM vectorise that
    function's loops with the widest registers of AVX-512 code (64 bytes), not 32.

    LLVM's tuning for Intel's AVX-512 CPUs (``prefer-256-bit``) has its loop vectoriser use
    32-byte vectors, which halves the width of every loop that it vectorises (AMD's Zen 4 and
    5 have no such tuning). Numba compiles for the host CPU, so on a 2-core Intel Xeon (under
    KVM, which LLVM takes for a Rocket Lake) the kernels' exponentials ran at 0.54-0.77 ns an
    item with it and 0.35-0.54 without (float32, a 128 x 64 tile refilled each time, one
    thread). The attribute is a function's own, so every kernel function with a loop of its
    own names this first (a helper compiled apart, not inlined by Numba, is vectorised on its
    own). Nothing changes in code for AVX2 or older. The register-blocked micro-kernel
    (``kernels._micro``) writes its vectors out and needs none of this."""

    def codegen(context, builder, signature, args):
        attrs = builder.function.attributes
        if _wide() and isinstance(attrs, set):
            # llvmlite's FunctionAttributes takes only LLVM's keyword attributes; a string
            # attribute, written as LLVM's assembly spells it, goes in as the set's item
            set.add(attrs, _WIDE_ATTRIBUTE)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def prefetch_rows(typingctx, a, r0, r1):
    """Asks the CPU to bring rows r0 <= r < r1 of the 2-D array ``a`` (each row's items
    contiguous) into its L2 cache: one prefetch hint (``llvm.prefetch``: read, locality 2,
    data) per 64 bytes of each row. A hint changes no result and cannot fault, whatever the
    address, so the rows are not checked.

    For kernels whose units are too short for the CPU's own prefetchers to get ahead: the
    fused attention at the date model's heads (one 29 x 29 tile per head, a few microseconds)
    waited on memory for each head's scattered rows (kernels._flash says how much)."""
    if not (isinstance(a, types.Array) and a.ndim == 2):
        return None
    sig = types.none(a, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        _, r0v, r1v = args
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32),
                                                            ir.IntType(32)]),
            "llvm.prefetch.p0")
        base = builder.bitcast(ary.data, i8p)
        strides = cgutils.unpack_tuple(builder, ary.strides, 2)
        shape = cgutils.unpack_tuple(builder, ary.shape, 2)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(aty.dtype)))
        row_bytes = builder.mul(shape[1], itemsize)
        i32 = ir.IntType(32)
        with cgutils.for_range_slice(builder, r0v, r1v, context.get_constant(types.intp, 1),
                                     inc=True) as (r, _):
            start = builder.mul(r, strides[0])
            with cgutils.for_range_slice(builder, context.get_constant(types.intp, 0),
                                         row_bytes, context.get_constant(types.intp, 64),
                                         inc=True) as (off, _):
                p = builder.gep(base, [builder.add(start, off)])
                builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 2),
                                  ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
