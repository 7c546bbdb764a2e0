"""The fused kernels' own tile products: a register-blocked micro-kernel, no BLAS call.

``mm(a, a_t, b, c, alpha, acc)``: ``c = alpha op(a) b``, or ``c += alpha op(a) b`` with
``acc``, where ``op(a)`` is ``a`` (m, k) or, with ``a_t``, ``a.T`` of an ``a`` (k, m); ``b``
is (k, n) and ``c`` (m, n). Rows may be strided (the heads of a (B, T, H, d) array) but each
row's items must be contiguous.

Why: BLAS is built for large products. At the fused kernels' tile sizes its fixed costs
(packing both operands into buffers, choosing a kernel) weigh: on a 2-core AMD EPYC (Zen 4)
with OpenBLAS's Haswell (AVX2) kernels, one thread, float32, a 29 x 29 x 64 product ran at
42 GFLOP/s and a 128 x 64 x 64 one at 87; this micro-kernel ran them at 86 and 101, and a
product with a transposed ``a`` (the backward's P^T dO and dS^T Q) at 98 against 78.
OpenBLAS's SkylakeX (AVX-512) kernels have a fast path of their own for small products, so
there the two are about level; which one the fused kernels call is a tuning choice
(``kernels._tuning``, ``own_dim``).

How: ``c`` is cut into blocks of up to 6 rows by two vectors (``VBYTES``: 64 bytes, 16 float32
or 8 float64 items, when the CPU Numba compiles for has AVX-512, else 32 bytes). On a 2-core
Intel Xeon (Emerald Rapids), natively, one thread, float32, the 64-byte vectors took the
fused forward plus backward at the default model's heads (16 wide; B H = 512, T = 29) from
3.33-3.46 to 2.74-2.82 ms (three alternations, each version in its own process), and ran a
29 x 29 x 64 product at 81 GFLOP/s against 46 with 32-byte ones (OpenBLAS SkylakeX: 95).

A block's 12 sums stay in vector registers while it runs over k: per step it loads two
vectors of a row of ``b``, broadcasts one item of ``a`` per row and issues two fused
multiply-adds per row. The six items of ``a`` are read at offsets from one or two running
pointers that LLVM cannot tie together (``_opaque``): left to itself, it reached each row from
the one before with an add, a serial chain of seven adds per step, longer than the step's
twelve multiply-adds on 32-byte vectors. On a 2-core AMD EPYC (Zen 4), its AVX2 code paths,
one thread, float32, three alternations: 103-109 against 80-87 GFLOP/s at 128 x 64 x 64,
93-109 against 89-91 at 256 x 128 x 64, 75-101 against 61-76 at 29 x 29 x 64; its AVX-512
code (100-114) did not change. The last vector's lane mask compares ints as wide as the items
(one compare for float32, where 64-bit lanes took two compares and four packing steps that
LLVM repeated in every k step of a masked 6-row block, all 16 registers being taken): same
setting, widths that end in a part vector, 128 x 64 x 29 at 67-85 against 54-66 GFLOP/s,
29 x 16 x 29 at 59-60 against 37-55. Without packing, ``a``'s rows (or, with ``a_t``, its columns)
and ``b``'s rows are read in place; the last block of columns reads and writes with masks,
so nothing outside the arrays is touched. The block is emitted as LLVM IR (a Numba
intrinsic), once per block height and width, because LLVM does not keep the sums of such a
loop in registers when it is written in Python.

Results do not depend on anything but the shapes (each item of ``c`` is one sum over k in
order, then scaled by alpha, then added to ``c``).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_math import generic, njit_cached
from ._tuning import compiled_isa

MR = 6  # rows of a block
#: bytes of a vector, the widest registers of the CPU Numba compiles for (its code is cached
#: per CPU); a block is two vectors wide
VBYTES = 64 if compiled_isa() == "avx512" else 32

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _splat(builder, x, vty):
    """x broadcast to every lane of vty."""
    undef = ir.Constant(vty, None)
    one = builder.insert_element(undef, x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vty.count),
                                                          [0] * vty.count))


def _opaque(builder, x):
    """x (i64), through an empty inline assembly: LLVM cannot see how it was computed, so its
    loop optimisation does not fold the addresses built on it back into one chain."""
    return builder.asm(ir.FunctionType(_I64, [_I64]), "", "=r,0", [x], side_effect=False)


class _Emitter:
    """Emits the blocks of one call of ``_block`` (its arguments already lowered)."""

    def __init__(self, context, builder, sig, args):
        (a, self.ao, self.sai, self.sap, b, self.bo, self.ldb, c, self.co, self.ldc, self.k,
         self.mr, self.nrem, self.alpha, self.acc) = args
        self.builder = builder
        fty = context.get_value_type(sig.args[0].dtype)
        self.isz = 4 if fty == ir.FloatType() else 8
        self.W = VBYTES // self.isz
        self.vty = vty = ir.VectorType(fty, self.W)
        self.a = context.make_array(sig.args[0])(context, builder, a).data
        self.b = context.make_array(sig.args[4])(context, builder, b).data
        self.c = context.make_array(sig.args[7])(context, builder, c).data
        mod = builder.module
        name = f"v{self.W}f{self.isz * 8}"
        mty = ir.VectorType(ir.IntType(1), self.W)
        vptr = vty.as_pointer()
        self.fma = cgutils.get_or_insert_function(
            mod, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fma.{name}")
        self.mload = cgutils.get_or_insert_function(
            mod, ir.FunctionType(vty, [vptr, _I32, mty, vty]), f"llvm.masked.load.{name}.p0")
        self.mstore = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [vty, vptr, _I32, mty]),
            f"llvm.masked.store.{name}.p0")
        self.zero = ir.Constant(vty, [0.0] * self.W)
        self.align = ir.Constant(_I32, self.isz)

    def _last_mask(self, nv):
        """Lanes of the block's last vector that are columns of c: lane < nrem - (nv-1) W."""
        builder, W = self.builder, self.W
        # lanes as ints as wide as the floats: one compare makes the mask (with 64-bit lanes
        # for float32, two compares and four packing steps, which LLVM repeated in every k
        # step of a block that had no register left to keep the mask in)
        ity = ir.IntType(8 * self.isz)
        left = builder.sub(self.nrem, ir.Constant(_I64, (nv - 1) * W))  # 1..W
        if ity != _I64:
            left = builder.trunc(left, ity)
        lanes = ir.Constant(ir.VectorType(ity, W), list(range(W)))
        return builder.icmp_signed("<", lanes, _splat(builder, left, ir.VectorType(ity, W)))

    def _load(self, ptr, mask):
        vp = self.builder.bitcast(ptr, self.vty.as_pointer())
        if mask is None:
            return self.builder.load(vp, align=self.isz)
        return self.builder.call(self.mload, [vp, self.align, mask, self.zero])

    def _store(self, value, ptr, mask):
        vp = self.builder.bitcast(ptr, self.vty.as_pointer())
        if mask is None:
            self.builder.store(value, vp, align=self.isz)
        else:
            self.builder.call(self.mstore, [value, vp, self.align, mask])

    def block(self, mr, nv, mask):
        """The block of mr rows by nv vectors; mask: None, or the last vector's lane mask."""
        builder, W = self.builder, self.W
        a = builder.gep(self.a, [self.ao])
        b = builder.gep(self.b, [self.bo])
        c = builder.gep(self.c, [self.co])
        masks = [mask if v == nv - 1 else None for v in range(nv)]
        sums = [[cgutils.alloca_once_value(builder, self.zero) for _ in range(nv)]
                for _ in range(mr)]  # allocas that LLVM promotes to registers
        # a's rows from two running pointers (rows 0-2, 3-5), each row 0, 1 or 2 sai from
        # one of them, all offsets opaque (see the module docstring): LLVM may still
        # rearrange the addresses (it kept one pointer and an offset per row), but it can no
        # longer reach each row from the one before with an add, a serial chain per step
        step = [_opaque(builder, builder.mul(self.sai, ir.Constant(_I64, r)))
                for r in range(3)]
        a3 = builder.gep(a, [_opaque(builder, builder.mul(self.sai, ir.Constant(_I64, 3)))])
        pa = [cgutils.alloca_once_value(builder, a), cgutils.alloca_once_value(builder, a3)]
        pb = cgutils.alloca_once_value(builder, b)
        with cgutils.for_range(builder, self.k):
            brow = builder.load(pb)
            bv = [self._load(builder.gep(brow, [ir.Constant(_I64, v * W)]), masks[v])
                  for v in range(nv)]
            bases = [builder.load(p) for p in pa]
            for r in range(mr):
                at = builder.gep(bases[r // 3], [step[r % 3]])
                x = _splat(builder, builder.load(at), self.vty)
                for v in range(nv):
                    s = builder.call(self.fma, [x, bv[v], builder.load(sums[r][v])])
                    builder.store(s, sums[r][v])
            for p, base in zip(pa, bases, strict=True):
                builder.store(builder.gep(base, [self.sap]), p)
            builder.store(builder.gep(brow, [self.ldb]), pb)
        alpha = _splat(builder, self.alpha, self.vty)
        out = [[builder.gep(c, [builder.add(builder.mul(self.ldc, ir.Constant(_I64, r)),
                                            ir.Constant(_I64, v * W))]) for v in range(nv)]
               for r in range(mr)]
        with builder.if_else(self.acc) as (then, otherwise):
            with then:
                for r in range(mr):
                    for v in range(nv):
                        old = self._load(out[r][v], masks[v])
                        new = builder.fmul(builder.load(sums[r][v]), alpha)
                        self._store(builder.fadd(old, new), out[r][v], masks[v])
            with otherwise:
                for r in range(mr):
                    for v in range(nv):
                        new = builder.fmul(builder.load(sums[r][v]), alpha)
                        self._store(new, out[r][v], masks[v])


@intrinsic
def _block(typingctx, a, ao, sai, sap, b, bo, ldb, c, co, ldc, k, mr, nrem, alpha, acc):
    """c[co + r ldc + j] (=, or += with acc) alpha sum_p a[ao + r sai + p sap] b[bo + p ldb
    + j] for r < mr (1..MR), j < nrem (1..2 W), p < k; offsets and strides in items of the
    arrays' data (their first item), which must hold every item named."""
    arrays = (a, b, c)
    if not (all(isinstance(x, types.Array) for x in arrays) and a.dtype == b.dtype == c.dtype
            and a.dtype in (types.float32, types.float64)):
        return None
    sig = types.void(a, types.int64, types.int64, types.int64, b, types.int64, types.int64,
                     c, types.int64, types.int64, types.int64, types.int64, types.int64,
                     a.dtype, types.boolean)

    def codegen(context, builder, signature, args):
        em = _Emitter(context, builder, signature, args)
        end = builder.append_basic_block("micro.end")
        switch = builder.switch(em.mr, end)
        for rows in range(1, MR + 1):
            case = builder.append_basic_block(f"micro.rows{rows}")
            switch.add_case(ir.Constant(_I64, rows), case)
            builder.position_at_end(case)
            two = builder.icmp_signed(">", em.nrem, ir.Constant(_I64, em.W))
            with builder.if_else(two) as (wide, narrow):
                for nv, branch in ((2, wide), (1, narrow)):
                    with branch:
                        full = builder.icmp_signed("==", em.nrem,
                                                   ir.Constant(_I64, nv * em.W))
                        with builder.if_else(full) as (whole, part):
                            with whole:
                                em.block(rows, nv, None)
                            with part:
                                em.block(rows, nv, em._last_mask(nv))
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


@njit_cached(inline="always")
def mm(a, a_t, b, c, alpha, acc):
    """c (m, n) = alpha op(a) b, or c += that with acc; op(a) is a (m, k), or a.T of a (k, m)
    with a_t; b (k, n). Each row's items contiguous, rows a whole number of items apart;
    shapes are trusted (callers check). Compiles once per dtype, whatever the arrays' layouts
    and the flags (``generic``)."""
    _mm(generic(a), generic(a_t), generic(b), generic(c), generic(alpha), generic(acc))


@njit_cached(error_model="numpy")
def _mm(a, a_t, b, c, alpha, acc):
    """mm, for arrays of layout 'A' and flags that are not literals."""
    m, n = c.shape
    k = b.shape[0]
    # strides in items by shifts (both round down, so they agree with floor division): a
    # division, with Python's rounding rule, took some 50 ns of each call, more than a
    # small tile's product
    sh = 2 if c.itemsize == 4 else 3
    w2 = 2 * (VBYTES >> sh)
    if a_t:
        sai, sap = 1, a.strides[0] >> sh
    else:
        sai, sap = a.strides[0] >> sh, 1
    ldb = b.strides[0] >> sh
    ldc = c.strides[0] >> sh
    for j0 in range(0, n, w2):
        nrem = min(w2, n - j0)
        for i0 in range(0, m, MR):
            _block(a, i0 * sai, sai, sap, b, j0, ldb, c, i0 * ldc + j0, ldc, k,
                   min(MR, m - i0), nrem, alpha, acc)
