r"""Dropout with inverted scaling, its mask drawn from Philox4x32-10 and never stored.

Forward and backward, with keep_i in {0, 1} and s = 1 / (1 - p)::

    y_i  = x_i  * (keep_i ? s : 0)
    dx_i = dy_i * (keep_i ? s : 0)

so E[y_i] = x_i. As in PyTorch, y is a product: a dropped NaN or inf stays NaN
(NaN * 0), a dropped -3 gives -0.

The mask (bit for bit the same on the numpy, cpu and cuda backends)
    The array is flattened in C order; element i, 0 <= i < n, is element d = offset + i of
    the random stream of ``seed``. Element d of the stream is word d % 4 of the Philox4x32-10
    block (:mod:`gpunn.philox`) with

        counter = (b mod 2^32,  b >> 32,  0,  0),   b = d // 4
        key     = (seed mod 2^32,  seed >> 32)

    i.e. one Philox call gives four consecutive elements. With the 32-bit word u_i,

        keep_i  =  u_i < t,   t = round((1 - p) * 2^32)

    evaluated in float64 (ties to even), so 0 <= t <= 2^32 and P(keep) = t / 2^32, within
    2^-33 of 1 - p. s is 1 / (1 - p) computed in float64 and rounded to the compute type (float32
    for float32 and the 16-bit types, float64 for float64); each product is rounded once in
    the compute type, then (16-bit types) to the storage type.
    seed: an integer in [0, 2^64). offset: an integer >= 0 with offset + n <= 2^64.

Offsets in a training loop
    offset counts stream elements consumed. Calls with one seed and offsets advanced by the
    size of each array (``offset += x.size``) use disjoint stretches of the stream, so no
    random word is ever used twice; the backward passes the forward's (p, seed, offset) and
    regenerates the same mask. (Different layers may equally take different seeds.)

Special cases
    training=False, or p = 0: the identity. ``dropout`` then returns ``x`` itself (as
    PyTorch does), or copies it bit for bit into ``out``; the backward copies dy.
    p = 1: t = 0, nothing is kept, y = x * 0 (zeros for finite x; NaN for NaN and inf, as
    PyTorch's input * 0).
    seed=None: a fresh seed is drawn from NumPy's global generator
    (``np.random.randint(0, 2**64, dtype=np.uint64)``), so ``np.random.seed(...)`` makes a
    run reproducible; only calls that draw a mask draw a seed (not the identity cases, not a
    call that raises). The drawn seed is not returned: to run the backward, pass a seed (or
    ask for ``return_mask=True`` and multiply by the mask yourself).

Where the mask lives
    ``dropout(..., return_mask=True)`` returns ``(y, mask)``, the mask a bool array of the
    caller's type on x's device (NumPy, CuPy, or a torch.bool tensor), written in the same
    pass as y. ``dropout_mask(shape, p, seed, offset, like=a)`` makes it alone, as an array of
    ``a``'s type on ``a``'s device (a CUDA torch tensor gets a CUDA torch.bool tensor); without
    ``like`` it is a NumPy array, or a CuPy array on the current device with ``backend="cuda"``.

Memory traffic: forward reads x and writes y, backward reads dy and writes dx: 2n elements
each, nothing stored between them (PyTorch's CPU dropout also writes and reads a mask of n
floats; its CUDA one n bytes). Generating the mask costs ten rounds of two 32 x 32 -> 64-bit
products per four elements: hidden behind the memory on a GPU. On the CPU it is about as
much work as the memory traffic: without a mask to store, the kernel computes 16 blocks at
a time as explicit vector code (vpmuludq on 64-bit lanes, four independent chains: 0.67 ns
an element on one core of the 2-core EPYC, in cache) and writes outputs of 16 MB or more
with non-temporal stores (:mod:`gpunn.cpu_vector`). 16M float32 on that shared machine:
forward and backward at ~90% of a copy-like kernel's speed, the forward 25x PyTorch's
F.dropout, the backward level with PyTorch's multiply by its stored mask.

In place: ``out=x`` for the forward, ``out=dy`` for the backward.
"""

from __future__ import annotations

import math
import operator
from numbers import Integral

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import backend as _backend
from .. import cuda
from .. import philox as ph
from ..cpu_vector import (STREAM_ALIGN, STREAM_MIN_BYTES, address, ir_splat, ir_store,
                          store_fence)
from ..backend import array_module, host_kernel, resolve
from ..philox import check_stream, cpu_rounds, fresh_seed, key_words
from ..validation import real

#: Philox blocks per reference chunk and per CPU chunk (each 16K elements).
REF_CHUNK = 1 << 16
CPU_CHUNK = 4096


# --- Parameters -------------------------------------------------------------------------------


def keep_threshold(p: float) -> int:
    """t = round((1 - p) * 2^32): element i is kept iff its random word u_i < t."""
    return round((1.0 - p) * 4294967296.0)


def scale_of(p: float) -> float:
    """1 / (1 - p), the factor of kept elements (0 for p = 1, where none is kept)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return bool(value)


def _size(shape) -> int:
    return math.prod(int(s) for s in shape)


# --- NumPy reference (runs on CuPy arrays too) ------------------------------------------------


def _ref_words(xp, n: int, seed: int, offset: int):
    """u_i for i < n: the uint32 stream words of elements offset .. offset + n - 1."""
    r, first = offset % 4, offset // 4
    blocks = (r + n + 3) // 4
    k0, k1 = (xp.uint64(k) for k in key_words(seed))
    zero = xp.uint64(0)
    words = xp.empty((blocks, 4), dtype=xp.uint32)
    for lo in range(0, blocks, REF_CHUNK):
        hi = min(lo + REF_CHUNK, blocks)
        b = xp.arange(first + lo, first + hi, dtype=xp.uint64)
        out = ph.rounds(b & xp.uint64(ph.MASK32), b >> xp.uint64(32), zero, zero, k0, k1, xp=xp)
        for w in range(4):
            words[lo:hi, w] = out[w]
    return words.reshape(-1)[r:r + n]


def _ref_mask(xp, n: int, p: float, seed: int, offset: int):
    return _ref_words(xp, n, seed, offset) < xp.uint64(keep_threshold(p))


def _numpy_dropout(x, y, mask, p, seed, offset):
    xp = array_module(x)
    keep = _ref_mask(xp, x.size, p, seed, offset)
    dtype = x.dtype.type
    factor = xp.where(keep, dtype(scale_of(p)), dtype(0))
    with np.errstate(invalid="ignore", over="ignore"):
        y.reshape(-1)[...] = x.reshape(-1) * factor
    if mask is not None:
        mask.reshape(-1)[...] = keep


def _numpy_mask(mask, p, seed, offset):
    mask.reshape(-1)[...] = _ref_mask(array_module(mask), mask.size, p, seed, offset)


# --- Numba CPU kernels ------------------------------------------------------------------------
# Chunks of CPU_CHUNK Philox blocks in parallel. A chunk's blocks are generated and applied in
# one loop over slices (a function of its own: inlined, or indexed from the whole array, LLVM
# gathers and scatters instead of vectorizing); the partial blocks at either end (at most three
# elements each) are done one element at a time. All stream arithmetic is uint64 (as in
# :func:`gpunn.philox.cpu_rounds`). Without a mask to store (the forward without return_mask,
# and the backward), groups of blocks are explicit vector code (:func:`_apply_block_group`).

_U0, _U2, _U3, _U32 = np.uint64(0), np.uint64(2), np.uint64(3), np.uint64(32)
_MASK32 = np.uint64(ph.MASK32)


@njit(inline="always", cache=True)
def _philox(b, k0, k1):
    """The four words of stream block b (uint64): counter (b mod 2^32, b >> 32, 0, 0)."""
    return cpu_rounds(b & _MASK32, b >> _U32, _U0, _U0, k0, k1)


@njit(inline="always", cache=True)
def _word(d, k0, k1):
    """u for stream element d (uint64)."""
    u0, u1, u2, u3 = _philox(d >> _U2, k0, k1)
    w = d & _U3
    return u0 if w == 0 else (u1 if w == 1 else (u2 if w == 2 else u3))


@njit(inline="always", cache=True)
def _layout(n, offset):
    """(head, nblocks, tail_start): elements [0, head) and [tail_start, n) are in partial
    blocks; [head, tail_start) is nblocks whole blocks, the first being (offset + head) / 4."""
    head = min(n, np.int64((np.uint64(4) - (offset & _U3)) & _U3))
    nblocks = (n - head) // 4
    return head, nblocks, head + 4 * nblocks


#: How far ahead of the elements it computes the explicit vector kernel prefetches x and y
#: (measured on the 2-core EPYC, 16M float32 on 2 threads: 5-15% faster at 512 to 2048 bytes).
PREFETCH_BYTES = 2048

#: Philox blocks one call of the explicit vector kernel computes: 16 blocks, 64 elements,
#: are four independent chains of four 64-bit lanes. The ten rounds of one chain are ten
#: multiply-shift-xor latencies in a row, and with one chain a call the core's vector
#: scheduler filled up before the next call's independent work entered it. One core, in
#: cache, 16K float32: 0.97 ns an element with one chain, 0.70 with two, 0.67 with three or
#: four (the loop vectorizer's code before: 1.25).
GROUP_BLOCKS = 16
#: Words of block lane k of each four land in ``_LANE_BLOCK[k]``: blocks b, b+2 | b+1, b+3
#: in the two 128-bit halves, so that gathering each lane's four words (one in-half unpack
#: per output vector) leaves blocks b, b+1 in one vector of eight and b+2, b+3 in the next.
_LANE_BLOCK = (0, 2, 1, 3)


@intrinsic
def _apply_block_group(typingctx, x, y, i, b, k0, k1, last_kept, s, streaming):
    """y[i:i+m] = x[i:i+m] * (u <= last_kept ? s : 0), m = 4 GROUP_BLOCKS, for the words u
    of the stream blocks b .. b + GROUP_BLOCKS - 1 (element i is word 0 of block b); b, k0,
    k1, last_kept uint64 (last_kept < 2^32), s in x's dtype. The caller keeps
    0 <= i <= x.size - m (nothing is checked here). ``streaming`` (a literal bool): y is
    written with non-temporal stores (:mod:`gpunn.cpu_vector`: &y[i] aligned to
    STREAM_ALIGN, the caller's promise, and its store_fence before anyone reads y).

    Written as vector IR, one block a 64-bit lane (vpmuludq with AVX2): left to the loop
    vectorizer, the same loop transposed x into block lanes and y back and spilled
    registers: 9.4 instructions an element, 4.6 of them around the rounds' 4.8. Here the
    keep masks are transposed instead: 6.2 an element, 1.4 around the rounds."""
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (x, y))
            and x.dtype == y.dtype == s and s in (types.float32, types.float64)
            and isinstance(i, types.Integer) and b == k0 == k1 == last_kept == types.uint64
            and isinstance(streaming, types.BooleanLiteral)):
        return None
    stream = streaming.literal_value

    def codegen(context, builder, sig, args):
        xa, ya = (context.make_array(x)(context, builder, v) for v in args[:2])
        start, block, key0, key1, last, scale = args[2:8]
        i32, i64 = ir.IntType(32), ir.IntType(64)
        lanes = ir.VectorType(i64, GROUP_BLOCKS)
        blocks = builder.add(ir_splat(builder, block, GROUP_BLOCKS), ir.Constant(
            lanes, [q + k for q in range(0, GROUP_BLOCKS, 4) for k in _LANE_BLOCK]))
        zero = ir.Constant(lanes, [0] * GROUP_BLOCKS)
        high = builder.lshr(blocks, ir.Constant(lanes, [32] * GROUP_BLOCKS))
        words = ph.ir_rounds(builder, blocks, high, zero, zero, key0, key1)

        def shuffle(a, c, order):
            return builder.shuffle_vector(a, c, ir.Constant(ir.VectorType(i32, len(order)),
                                                            order))

        limit = ir_splat(builder, builder.trunc(last, i32), 8)
        vec = ir.VectorType(context.get_value_type(x.dtype), 8)
        factor_kept, factor_dropped = ir_splat(builder, scale, 8), ir.Constant(vec, [0.0] * 8)
        size = context.get_abi_sizeof(context.get_value_type(x.dtype))
        # the lines PREFETCH_BYTES ahead, x for reading and y for writing: with ~100
        # instructions a line of float32, the hardware alone kept too few misses in flight
        i8p = ir.IntType(8).as_pointer()
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        for line in range(0, 4 * GROUP_BLOCKS * size, 64):
            ahead = builder.add(start, ir.Constant(start.type, (PREFETCH_BYTES + line) // size))
            # a plain gep: past the end is fine to prefetch; streamed y is not read for ownership
            for a, write in ((xa, 0),) if stream else ((xa, 0), (ya, 1)):
                builder.call(prefetch, [builder.bitcast(builder.gep(a.data, [ahead]), i8p),
                                        *(ir.Constant(i32, v) for v in (write, 3, 1))])
        for q in range(0, GROUP_BLOCKS, 4):
            # the four lanes q .. q+3 as 32-bit halves; the low halves [w0, w1] and [w2, w3]
            # of each lane, then lanes 0, 2 (blocks q, q+1) and lanes 1, 3 (q+2, q+3)
            four = [builder.bitcast(shuffle(w, w, list(range(q, q + 4))), ir.VectorType(i32, 8))
                    for w in words]
            pairs = [shuffle(four[w], four[w + 1], [0, 8, 2, 10, 4, 12, 6, 14]) for w in (0, 2)]
            for h, order in enumerate(([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])):
                factor = builder.select(builder.icmp_unsigned("<=", shuffle(*pairs, order), limit),
                                        factor_kept, factor_dropped)
                at = builder.add(start, ir.Constant(start.type, 4 * q + 8 * h))
                src, dst = (builder.bitcast(cgutils.gep_inbounds(builder, a.data, at),
                                            vec.as_pointer()) for a in (xa, ya))
                ir_store(builder, builder.fmul(builder.load(src, align=size), factor), dst,
                         stream, size)
        return context.get_dummy_value()

    return types.none(x, y, i, b, k0, k1, last_kept, s, streaming), codegen


@njit(inline="always", cache=True)
def _apply_block(xs, ys, j, b, k0, k1, t, s):
    """Elements 4j .. 4j+3 of ys from those of xs, block b of the stream."""
    z = type(s)(0)
    u0, u1, u2, u3 = _philox(b, k0, k1)
    ys[4 * j] = xs[4 * j] * (s if u0 < t else z)
    ys[4 * j + 1] = xs[4 * j + 1] * (s if u1 < t else z)
    ys[4 * j + 2] = xs[4 * j + 2] * (s if u2 < t else z)
    ys[4 * j + 3] = xs[4 * j + 3] * (s if u3 < t else z)


@njit(cache=True)
def _apply_blocks(xs, ys, b0, k0, k1, t, s, streaming):
    """ys = xs * (keep ? s : 0) for whole blocks b0, b0 + 1, ...; ``streaming``: write ys
    with non-temporal stores where it can be aligned for them."""
    nblocks = xs.size // 4
    first = 0  # blocks done one at a time before the groups, to align ys for streaming
    if streaming:
        start, step = address(ys), 4 * ys.itemsize
        first = (-start % STREAM_ALIGN) // step
        streaming = (start + first * step) % STREAM_ALIGN == 0 and first <= nblocks
        first = first if streaming else 0
    for j in range(first):
        _apply_block(xs, ys, j, b0 + np.uint64(j), k0, k1, t, s)
    # u < t is u <= t - 1 for t >= 1; t = 0 keeps nothing: a kept factor of 0 makes every
    # element x * 0 whatever the comparison says
    last_kept = (t - np.uint64(1)) & _MASK32
    kept = s if t else type(s)(0)
    groups = (nblocks - first) // GROUP_BLOCKS
    for g in range(groups):
        j = first + GROUP_BLOCKS * g
        if streaming:
            _apply_block_group(xs, ys, 4 * j, b0 + np.uint64(j), k0, k1, last_kept, kept, True)
        else:
            _apply_block_group(xs, ys, 4 * j, b0 + np.uint64(j), k0, k1, last_kept, kept, False)
    if streaming:
        store_fence()
    for j in range(first + GROUP_BLOCKS * groups, nblocks):
        _apply_block(xs, ys, j, b0 + np.uint64(j), k0, k1, t, s)


@njit(cache=True)
def _apply_blocks_mask(xs, ys, ms, b0, k0, k1, t, s):
    z = type(s)(0)
    for j in range(xs.size // 4):
        u0, u1, u2, u3 = _philox(b0 + np.uint64(j), k0, k1)
        m0, m1, m2, m3 = u0 < t, u1 < t, u2 < t, u3 < t
        ys[4 * j] = xs[4 * j] * (s if m0 else z)
        ys[4 * j + 1] = xs[4 * j + 1] * (s if m1 else z)
        ys[4 * j + 2] = xs[4 * j + 2] * (s if m2 else z)
        ys[4 * j + 3] = xs[4 * j + 3] * (s if m3 else z)
        ms[4 * j], ms[4 * j + 1], ms[4 * j + 2], ms[4 * j + 3] = m0, m1, m2, m3


@njit(cache=True)
def _mask_blocks(ms, b0, k0, k1, t):
    for j in range(ms.size // 4):
        u0, u1, u2, u3 = _philox(b0 + np.uint64(j), k0, k1)
        ms[4 * j], ms[4 * j + 1], ms[4 * j + 2], ms[4 * j + 3] = u0 < t, u1 < t, u2 < t, u3 < t


@njit(parallel=True, cache=True)
def _cpu_dropout(x, y, offset, k0, k1, t, s):
    """y = x * (keep ? s : 0) on flat arrays; offset, k0, k1, t uint64, s in x's dtype."""
    n = x.size
    streaming = n * x.itemsize >= STREAM_MIN_BYTES
    head, nblocks, tail = _layout(n, offset)
    z = type(s)(0)
    for i in range(head):
        y[i] = x[i] * (s if _word(offset + np.uint64(i), k0, k1) < t else z)
    for i in range(tail, n):
        y[i] = x[i] * (s if _word(offset + np.uint64(i), k0, k1) < t else z)
    b0 = (offset + np.uint64(head)) >> _U2
    for c in prange((nblocks + CPU_CHUNK - 1) // CPU_CHUNK):
        lo = c * CPU_CHUNK
        hi = min(lo + CPU_CHUNK, nblocks)
        a, e = head + 4 * lo, head + 4 * hi
        _apply_blocks(x[a:e], y[a:e], b0 + np.uint64(lo), k0, k1, t, s, streaming)


@njit(parallel=True, cache=True)
def _cpu_dropout_mask(x, y, m, offset, k0, k1, t, s):
    """As _cpu_dropout, also writing the keep mask m (bool)."""
    n = x.size
    head, nblocks, tail = _layout(n, offset)
    z = type(s)(0)
    for i in range(head):
        m[i] = _word(offset + np.uint64(i), k0, k1) < t
        y[i] = x[i] * (s if m[i] else z)
    for i in range(tail, n):
        m[i] = _word(offset + np.uint64(i), k0, k1) < t
        y[i] = x[i] * (s if m[i] else z)
    b0 = (offset + np.uint64(head)) >> _U2
    for c in prange((nblocks + CPU_CHUNK - 1) // CPU_CHUNK):
        lo = c * CPU_CHUNK
        hi = min(lo + CPU_CHUNK, nblocks)
        a, e = head + 4 * lo, head + 4 * hi
        _apply_blocks_mask(x[a:e], y[a:e], m[a:e], b0 + np.uint64(lo), k0, k1, t, s)


@njit(parallel=True, cache=True)
def _cpu_mask(m, offset, k0, k1, t):
    """m = keep (bool), flat."""
    n = m.size
    head, nblocks, tail = _layout(n, offset)
    for i in range(head):
        m[i] = _word(offset + np.uint64(i), k0, k1) < t
    for i in range(tail, n):
        m[i] = _word(offset + np.uint64(i), k0, k1) < t
    b0 = (offset + np.uint64(head)) >> _U2
    for c in prange((nblocks + CPU_CHUNK - 1) // CPU_CHUNK):
        lo = c * CPU_CHUNK
        hi = min(lo + CPU_CHUNK, nblocks)
        a, e = head + 4 * lo, head + 4 * hi
        _mask_blocks(m[a:e], b0 + np.uint64(lo), k0, k1, t)


def _stream_args(p, seed, offset):
    return np.uint64(offset), *key_words(seed), np.uint64(keep_threshold(p))


def _cpu_run(x, y, mask, p, seed, offset):
    s, stream = x.dtype.type(scale_of(p)), _stream_args(p, seed, offset)
    if mask is None:
        host_kernel(_cpu_dropout, x.size)(x.reshape(-1), y.reshape(-1), *stream, s)
    else:
        host_kernel(_cpu_dropout_mask, x.size)(x.reshape(-1), y.reshape(-1), mask.reshape(-1),
                                               *stream, s)


def _cpu_mask_run(mask, p, seed, offset):
    host_kernel(_cpu_mask, mask.size)(mask.reshape(-1), *_stream_args(p, seed, offset))


# --- CUDA launcher: kernels/dropout.cu --------------------------------------------------------

KERNELS = cuda.Family("dropout", [
    f"gpunn::dropout<{ctype}, {with_mask}>"
    for ctype in cuda.CTYPES.values() for with_mask in ("false", "true")]
    + ["gpunn::dropout_mask", "gpunn::philox4x32_10_blocks"])
BLOCK = 256


def _cuda_run(x, y, mask, p, seed, offset):
    import cupy

    n = x.size
    if n == 0:
        return
    with_mask = "false" if mask is None else "true"
    kernel = KERNELS.function(f"gpunn::dropout<{cuda.ctype(x.dtype)}, {with_mask}>")
    blocks = (n + offset % 4 + 3) // 4
    grid = cuda.grid_for(blocks, BLOCK, kernel)
    m = mask if mask is not None else cupy.empty(1, dtype=cupy.uint8)
    kernel((grid,), (BLOCK,), (x, y, m, np.int64(n), np.uint64(offset), np.uint64(seed),
                                np.uint64(keep_threshold(p)), np.float64(scale_of(p))))


def _cuda_mask_run(mask, p, seed, offset):
    n = mask.size
    if n == 0:
        return
    kernel = KERNELS.function("gpunn::dropout_mask")
    grid = cuda.grid_for((n + offset % 4 + 3) // 4, BLOCK, kernel)
    kernel((grid,), (BLOCK,), (mask, np.int64(n), np.uint64(offset), np.uint64(seed),
                                np.uint64(keep_threshold(p))))


def cuda_philox4x32_10(counter, key):
    """Philox4x32-10 of CuPy uint32 arrays ``counter`` (m, 4) and ``key`` (m, 2) on the GPU,
    as (m, 4) uint32: the raw generator of the CUDA kernels (for the known-answer tests)."""
    import cupy

    counter = cupy.ascontiguousarray(counter, dtype=cupy.uint32)
    key = cupy.ascontiguousarray(key, dtype=cupy.uint32)
    if counter.ndim != 2 or counter.shape[1] != 4 or key.shape != (counter.shape[0], 2):
        raise ValueError(f"cuda_philox4x32_10: counter must be (m, 4) and key (m, 2), got "
                         f"{counter.shape} and {key.shape}")
    out = cupy.empty_like(counter)
    if counter.shape[0]:
        kernel = KERNELS.function("gpunn::philox4x32_10_blocks")
        grid = cuda.grid_for(counter.shape[0], BLOCK, kernel)
        kernel((grid,), (BLOCK,), (counter, key, out, np.int64(counter.shape[0])))
    return out


IMPLS = {
    "numpy": (_numpy_dropout, _numpy_mask),
    "cpu": (_cpu_run, _cpu_mask_run),
    "cuda": (_cuda_run, _cuda_mask_run),
}


# --- Masks in the caller's array type ---------------------------------------------------------


def _filled_mask(call, shape, value: bool):
    """A bool mask of the caller's array type on the data's device, every element ``value``."""
    native = call.empty(shape, "bool")
    native.fill(value)
    return call.wrap(native)


# --- Public API -------------------------------------------------------------------------------


def dropout(x, p=0.5, training=True, seed=None, offset=0, *, out=None, backend=None,
            return_mask=False):
    """y = x * (keep ? 1/(1-p) : 0), keep_i drawn from Philox4x32-10 at (seed, offset + i).

    p in [0, 1]; training=False or p=0 returns x itself (or copies it into ``out``).
    seed: integer in [0, 2^64), or None for a fresh one from NumPy's global generator.
    offset: stream elements already consumed under this seed (see the module docstring).
    return_mask=True returns (y, mask), the bool keep mask of x's array type and device."""
    p = real("dropout", "p", p, 0.0, 1.0)
    training = _check_bool("dropout", "training", training)
    return_mask = _check_bool("dropout", "return_mask", return_mask)
    call = resolve("dropout", backend, x=x, out=out)
    with call.context():
        xn = call.native(x, "x")
        seed, offset = check_stream("dropout", seed, offset, xn.size, allow_none=True)
        identity = not training or p == 0.0
        if identity and out is None:
            return (x, _filled_mask(call, xn.shape, True)) if return_mask else x
        yn = call.output(out, xn, inputs={"x": xn})
        if identity:
            yn[...] = xn  # a bit copy (NaN payloads too); a no-op copy when out is x
            result = call.wrap(yn, out)
            return (result, _filled_mask(call, xn.shape, True)) if return_mask else result
        if seed is None:  # drawn only now: identity calls and failed calls leave NumPy's state
            seed = fresh_seed()
        mask = call.empty(xn.shape, "bool") if return_mask else None
        IMPLS[call.backend][0](xn, yn, mask, p, seed, offset)
    result = call.wrap(yn, out)
    return (result, call.wrap(mask)) if return_mask else result


def dropout_backward(dy, p, seed, offset=0, *, out=None, backend=None):
    """dx = dy * (keep ? 1/(1-p) : 0) with the forward's p, seed and offset (the mask is
    regenerated, not read). p = 0 copies dy."""
    p = real("dropout_backward", "p", p, 0.0, 1.0)
    call = resolve("dropout_backward", backend, dy=dy, out=out)
    with call.context():
        dyn = call.native(dy, "dy")
        seed, offset = check_stream("dropout_backward", seed, offset, dyn.size)
        dxn = call.output(out, dyn, inputs={"dy": dyn})
        if p == 0.0:
            dxn[...] = dyn
        else:
            IMPLS[call.backend][0](dyn, dxn, None, p, seed, offset)
    return call.wrap(dxn, out)


def dropout_mask(shape, p, seed, offset=0, *, like=None, backend=None):
    """The bool keep mask of ``dropout`` for an array of ``shape`` (bit for bit the mask the
    forward applies). Returned as an array of ``like``'s type on ``like``'s device (NumPy,
    CuPy, torch); without ``like``, a NumPy array, or a CuPy array on the current device when
    the cuda backend is asked for (``backend="cuda"`` or GPUNN_BACKEND=cuda)."""
    p = real("dropout_mask", "p", p, 0.0, 1.0)
    if isinstance(shape, (Integral, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"dropout_mask: shape must be an int or a sequence of ints, "
                        f"got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"dropout_mask: shape must not have negative sizes, got {shape}")
    seed, offset = check_stream("dropout_mask", seed, offset, _size(shape))
    if like is None:
        if _backend._requested(backend) == "cuda" and _backend.has_cupy():
            import cupy

            like = cupy.empty(0, dtype=cupy.uint8)
        else:
            like = np.empty(0, dtype=np.uint8)
    call = resolve("dropout_mask", backend, like=like)
    with call.context():
        if p == 0.0:
            return _filled_mask(call, shape, True)
        mask = call.empty(shape, "bool")
        IMPLS[call.backend][1](mask, p, seed, offset)
    return call.wrap(mask)
