r"""Softmax and log-softmax over one axis, forward and backward.

For a row x of length n, with m = max_j x_j and s = sum_j e^{x_j - m}:

    softmax      y_i = e^{x_i - m} / s           dx = y * (dy - sum_j dy_j y_j)
    log_softmax  y_i = x_i - m - log(s)          dx = dy - e^{y} * sum_j dy_j

Subtracting m keeps every exponent <= 0, so rows holding +-1e30 never overflow. Edge rows
behave as PyTorch's: a row of all -inf, or one holding +inf or NaN, gives NaN throughout
(those rows have no finite m to shift by); -inf entries beside finite ones give 0 (softmax)
and -inf (log_softmax).

Memory traffic: forward reads x and writes y, backward reads dy and y and writes dx. The CPU
kernel keeps each row in cache between its passes, and writes a softmax backward output of
16 MB or more with non-temporal stores (:mod:`gpunn.cpu_vector`); the GPU keeps a row of up to 32768
elements in registers (one block per row, online max/sum), so x is read once; longer rows
are read twice. A non-last ``axis`` costs a transposed copy in and out.
"""

from __future__ import annotations

import math
import operator

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .. import cpu_math as cm
from .. import cuda
from ..backend import array_module, host_kernel
from ..cpu_vector import STREAM_ALIGN, STREAM_MIN_BYTES, address, ir_splat, ir_store, store_fence
from ._apply import apply, compute_dtype

# --- NumPy reference (runs on CuPy arrays too) ------------------------------------------------


def _numpy_forward(x, y, log):
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    if xc.size == 0:
        return
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        shifted = xc - xc.max(axis=-1, keepdims=True)
        s = xp.exp(shifted).sum(axis=-1, keepdims=True)
        y[...] = shifted - xp.log(s) if log else xp.exp(shifted) / s


def _numpy_backward(dy, y, dx, log):
    xp = array_module(dy)
    dyc, yc = compute_dtype(xp, dy), compute_dtype(xp, y)
    with np.errstate(invalid="ignore", over="ignore"):
        if log:
            dx[...] = dyc - xp.exp(yc) * dyc.sum(axis=-1, keepdims=True)
        else:
            dx[...] = yc * (dyc - (dyc * yc).sum(axis=-1, keepdims=True))


# --- Numba CPU kernels: rows in parallel; each row's passes run in cache ----------------------
# The sums may reorder their additions (reassoc) so that they vectorize; they add blocks of
# SUM_BLOCK terms in the array's dtype and the block sums in float64, so a float32 row of 10^6
# keeps float32 accuracy. The exp pass is separate so reordering never touches its reduction.

SUM_BLOCK = 512


@njit(fastmath={"reassoc", "nsz"}, cache=True)
def _block_sum(a):
    s = type(a[0])(0)
    for j in range(a.size):
        s += a[j]
    return s


@njit(fastmath={"reassoc", "nsz"}, cache=True)
def _block_exp_sum(x, m, y):
    """y = e^{x - m}, returning sum(y). The reassoc flag reaches only this loop's own
    additions: cpu_math's exp is compiled apart from its callers, so keeps exact rounding."""
    s = type(m)(0)
    for j in range(x.size):
        y[j] = cm.exp(x[j] - m)
        s += y[j]
    return s


@njit(fastmath={"reassoc", "nsz"}, cache=True)
def _block_exp_total(x, m):
    """sum(e^{x - m}), storing nothing (log_softmax's y may be x itself)."""
    s = type(m)(0)
    for j in range(x.size):
        s += cm.exp(x[j] - m)
    return s


@njit(fastmath={"reassoc", "nsz"}, cache=True)
def _block_dot(a, b):
    s = type(a[0])(0)
    for j in range(a.size):
        s += a[j] * b[j]
    return s


# The blocks are passed as slices to functions of their own: inlined, or with start/stop
# bounds, LLVM was measured not to vectorize them (3x slower).


@njit(cache=True)
def _row_sum(a):
    """sum_j a_j"""
    total = 0.0
    for j in range(0, a.size, SUM_BLOCK):
        total += _block_sum(a[j:j + SUM_BLOCK])
    return type(a[0])(total)


@njit(cache=True)
def _row_exp_sum(x, m, y):
    """y = e^{x - m} and sum_j y_j"""
    total = 0.0
    for j in range(0, x.size, SUM_BLOCK):
        total += _block_exp_sum(x[j:j + SUM_BLOCK], m, y[j:j + SUM_BLOCK])
    return type(m)(total)


@njit(cache=True)
def _row_exp_total(x, m):
    """sum_j e^{x_j - m}"""
    total = 0.0
    for j in range(0, x.size, SUM_BLOCK):
        total += _block_exp_total(x[j:j + SUM_BLOCK], m)
    return type(m)(total)


@njit(cache=True)
def _row_dot(a, b):
    """sum_j a_j b_j"""
    total = 0.0
    for j in range(0, a.size, SUM_BLOCK):
        total += _block_dot(a[j:j + SUM_BLOCK], b[j:j + SUM_BLOCK])
    return type(a[0])(total)


def _row_max(a):
    """max_j a_j (NaN may be skipped: a NaN anywhere still turns the row's sum into NaN)."""
    raise TypeError("_row_max is only callable from Numba-compiled code")


@intrinsic
def _bitcast(typingctx, value, to):
    """Reinterpret the bits of ``value`` as the type ``to`` (a NumPy scalar type) names."""
    target = to.instance_type

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(target))

    return target(value, to), codegen


@overload(_row_max, jit_options={"cache": True})
def _row_max_impl(a):
    """Float max as an integer max over order-preserving images of the bits (v for v >= 0,
    v ^ 0x7f..f for v < 0): Numba's LLVM vectorizes integer max reductions, not float ones."""
    bits = 32 if a.dtype == types.float32 else 64
    int_t = np.int32 if bits == 32 else np.int64
    float_t = np.float32 if bits == 32 else np.float64
    shift, mask, lowest = int_t(bits - 1), int_t(2 ** (bits - 1) - 1), int_t(-(2 ** (bits - 1)))

    def impl(a):
        v = a.view(int_t)
        m = lowest
        for j in range(v.size):
            m = max(m, int_t(v[j] ^ ((v[j] >> shift) & mask)))
        return _bitcast(int_t(m ^ ((m >> shift) & mask)), float_t)

    return impl


@njit(parallel=True, cache=True)
def _cpu_forward(x, y, log):
    for r in prange(x.shape[0]):
        xr, yr = x[r], y[r]
        m = _row_max(xr)
        if log:  # y = x - m - log(s) reads x again: the sum pass must not write y (it may be x)
            log_s = type(m)(math.log(_row_exp_total(xr, m)))
            for j in range(xr.size):
                yr[j] = (xr[j] - m) - log_s
        else:
            s = _row_exp_sum(xr, m, yr)
            inv = type(s)(1) / s
            for j in range(xr.size):
                yr[j] *= inv


@intrinsic
def _softmax_grad_streamed(typingctx, dy, y, dx, j, s):
    """dx[j:j+8] = y (dy - s) elementwise, written with a non-temporal store
    (:mod:`gpunn.cpu_vector`: &dx[j] aligned to STREAM_ALIGN, the caller's promise)."""
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                for a in (dy, y, dx))
            and dy.dtype == y.dtype == dx.dtype == s and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vec = ir.VectorType(context.get_value_type(s), 8)
        size = context.get_abi_sizeof(context.get_value_type(s))
        dyp, yp, dxp = (
            builder.bitcast(cgutils.gep_inbounds(
                builder, context.make_array(a)(context, builder, v).data, args[3]),
                vec.as_pointer())
            for a, v in zip((dy, y, dx), args[:3]))
        diff = builder.fsub(builder.load(dyp, align=size), ir_splat(builder, args[4], 8))
        ir_store(builder, builder.fmul(builder.load(yp, align=size), diff), dxp, True, size)
        return context.get_dummy_value()

    return types.none(dy, y, dx, j, s), codegen


@njit(parallel=True, cache=True)
def _cpu_backward(dy, y, dx, log):
    # Large softmax outputs are streamed (gpunn.cpu_vector): the elements of a row before
    # its first aligned one, and after its last whole vector, with plain stores.
    # 16M float32 in rows of 1024 to 32768: 1.1-1.5x faster than plain stores throughout.
    streaming = not log and dx.size * dx.itemsize >= STREAM_MIN_BYTES
    for r in prange(dy.shape[0]):
        dyr, yr, dxr = dy[r], y[r], dx[r]
        if log:
            s = _row_sum(dyr)
            for j in range(dyr.size):
                dxr[j] = dyr[j] - cm.exp(yr[j]) * s
        else:
            s = _row_dot(dyr, yr)
            first = dyr.size  # the elements before the streamed vectors
            if streaming:
                skip = (-address(dxr) % STREAM_ALIGN) // dxr.itemsize
                if (address(dxr) + skip * dxr.itemsize) % STREAM_ALIGN == 0:
                    first = min(skip, dyr.size)
            body = first + 8 * ((dyr.size - first) // 8)
            for j in range(first):
                dxr[j] = yr[j] * (dyr[j] - s)
            for j in range(first, body, 8):
                _softmax_grad_streamed(dyr, yr, dxr, j, s)
            for j in range(body, dyr.size):
                dxr[j] = yr[j] * (dyr[j] - s)
            if streaming:
                store_fence()


# --- CUDA launcher: kernels/softmax.cu --------------------------------------------------------

ITEMS = (4, 8, 16, 32)  # row elements held per thread by the register-resident kernels
MAX_BLOCK = 1024
TARGET_ITEMS = 16
KERNELS = cuda.Family("softmax", [
    expr for ctype in cuda.CTYPES.values() for log in ("false", "true") for expr in (
        *(f"gpunn::softmax_{d}_rows<{ctype}, {log}, {items}>"
          for items in ITEMS for d in ("forward", "backward")),
        f"gpunn::softmax_forward_long<{ctype}, {log}>",
        f"gpunn::softmax_backward_long<{ctype}, {log}>")])


def launch_config(n: int) -> tuple[int | None, int]:
    """(items per thread, block size) for rows of length n; items None: the long-row kernel.

    Blocks are sized for about TARGET_ITEMS elements per thread (32 to 1024 threads): each
    thread's loads are independent, so more items per thread keep more bytes in flight per SM
    (a 256-thread block of 4 bfloat16 items each would leave ~8 KB in flight per SM, too
    little to cover memory latency). A row of 32768 takes 1024 threads x 32 items."""
    if n > MAX_BLOCK * ITEMS[-1]:
        return None, MAX_BLOCK
    wanted = -(-n // TARGET_ITEMS)
    block = min(MAX_BLOCK, max(32, 1 << (wanted - 1).bit_length()))
    return next(items for items in ITEMS if items * block >= n), block


def _cuda(direction, arrays, log):
    rows, n = arrays[0].shape
    if rows == 0 or n == 0:
        return
    ctype, flag = cuda.ctype(arrays[0].dtype), "true" if log else "false"
    items, block = launch_config(n)
    if items is None:
        kernel = KERNELS.function(f"gpunn::softmax_{direction}_long<{ctype}, {flag}>")
        n_arg = np.int64(n)
    else:
        kernel = KERNELS.function(f"gpunn::softmax_{direction}_rows<{ctype}, {flag}, {items}>")
        n_arg = np.int32(n)
    grid = cuda.grid_for(rows * block, block, kernel)  # one block per row, grid-stride
    kernel((grid,), (block,), (*arrays, np.int64(rows), n_arg))


IMPLS = {
    "numpy": (_numpy_forward, _numpy_backward),
    "cpu": (lambda x, y, log: host_kernel(_cpu_forward, x.size)(x, y, log),
            lambda dy, y, dx, log: host_kernel(_cpu_backward, dy.size)(dy, y, dx, log)),
    "cuda": (lambda x, y, log: _cuda("forward", (x, y), log),
             lambda dy, y, dx, log: _cuda("backward", (dy, y, dx), log)),
}


def _normalize_axis(op, axis, ndim):
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{op}: axis must be an int, got {axis!r}") from None
    if not -max(ndim, 1) <= axis < max(ndim, 1):
        raise ValueError(f"{op}: axis {axis} is out of range for an array of {ndim} dimensions")
    return axis % max(ndim, 1)


def _over_rows(impl, axis, *arrays):
    """Run ``impl`` on 2-D (rows, n) views with the reduced axis last; the last array is the
    output. A non-last axis is transposed into a contiguous copy and back."""
    ndim = arrays[0].ndim
    if ndim == 0:
        return impl(*(a.reshape(1, 1) for a in arrays))
    if axis == ndim - 1:
        n = arrays[0].shape[-1]
        rows = arrays[0].size // n if n else 0
        return impl(*(a.reshape(rows, n) for a in arrays))
    xp = array_module(arrays[0])
    moved = [xp.ascontiguousarray(xp.moveaxis(a, axis, -1)) for a in arrays[:-1]]
    result = xp.empty_like(moved[0])
    _over_rows(impl, ndim - 1, *moved, result)
    arrays[-1][...] = xp.moveaxis(result, -1, axis)


def _run(name, log, inputs, axis, out, backend):
    ndim = next(iter(inputs.values())).ndim
    axis = _normalize_axis(name, axis, ndim)
    direction = 1 if name.endswith("_backward") else 0

    def run(b, *arrays):
        _over_rows(lambda *rows: IMPLS[b][direction](*rows, log), axis, *arrays)

    return apply(name, backend, out, run, **inputs)


# --- Public API -------------------------------------------------------------------------------


def softmax(x, axis=-1, *, out=None, backend=None):
    """y = e^{x - max} / sum(e^{x - max}) along ``axis``."""
    return _run("softmax", False, {"x": x}, axis, out, backend)


def softmax_backward(dy, y, axis=-1, *, out=None, backend=None):
    """dx = y * (dy - sum(dy * y)) along ``axis``, from the forward's output y."""
    return _run("softmax_backward", False, {"dy": dy, "y": y}, axis, out, backend)


def log_softmax(x, axis=-1, *, out=None, backend=None):
    """y = x - max - log(sum(e^{x - max})) along ``axis``."""
    return _run("log_softmax", True, {"x": x}, axis, out, backend)


def log_softmax_backward(dy, y, axis=-1, *, out=None, backend=None):
    """dx = dy - e^{y} * sum(dy) along ``axis``, from the forward's output y."""
    return _run("log_softmax_backward", True, {"dy": dy, "y": y}, axis, out, backend)
