"""The multi-tensor walker: one optimizer step over a table of tensors, on the cpu (Numba)
and cuda (kernels/optim.cu) backends, knowing no algorithm.

A table (:class:`gpunn.optim.fused.Table`) has one row of :data:`ROW` 64-bit words per
tensor: the addresses of the parameter, its gradient, up to three states (an algorithm's
``states``, in order; 0 for those a step does not use), its float32 master copy (0 if
none), its float32 step count, and its element count. Its chunk list holds (row, first
element) pairs of :data:`CHUNK` elements each. A step is

1. the prologue: the gradients' global L2 norm and inf/NaN check when clipping or AMP asks
   for it (one pass over the gradients), the factor gmul = clip / grad_scale, the skip
   decision, and the step counts advanced (not when skipped);
2. the update: per chunk, the algorithm's row constants (from its scalars and the row's
   step count t), then per element the common gradient (gpunn.optim.prologue) and the
   algorithm's update: on the CPU its ``update`` function inside the loop :func:`cpu_step`
   builds for it, on the GPU its functor inside the ``step`` kernel.

The row layout, CHUNK, UNROLL and SCALARS reach kernels/optim.cu as constants
(:func:`kernels`), defined here only.
"""

from __future__ import annotations

import math
import sys
import types as pytypes

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from .. import cuda
from ..backend import describe, host_kernel
from .prologue import host_scale, needs_grad_pass, prologue

#: The words of a table row, in order (kernels/optim.cu reads them as COLUMN_<name>).
ROW = ("P", "G", "S0", "S1", "S2", "MASTER", "STEP", "N")
P, G, S0, S1, S2, MASTER, STEP, N = range(len(ROW))
COLUMNS = len(ROW)
#: Elements per chunk: the unit of work of one thread (cpu) or one block (cuda).
CHUNK = 16384
#: The most scalars an algorithm passes its kernels (besides lr).
SCALARS = 4


# --- CPU: Numba loops over the table -----------------------------------------------------------

@intrinsic
def _pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to ``like``'s element type."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen

@njit(inline="always")
def _chunk(rows, chunks, c, column, like):
    """Elements [start, stop) of one column of chunk c's row."""
    r, start = chunks[c, 0], chunks[c, 1]
    return carray(_pointer(rows[r, column], like), rows[r, N])[
        start:min(start + CHUNK, rows[r, N])]

@njit(inline="always")
def _step_count(rows, chunks, c, step_like):
    return float(carray(_pointer(rows[chunks[c, 0], STEP], step_like), 1)[0])

@njit(parallel=True, cache=True)
def _cpu_grad_sumsq(rows, chunks, like, scale):
    """Per-chunk (sum of (scale g)^2 in float64, inf/NaN count, max |g|)."""
    partial = np.zeros((chunks.shape[0], 3))
    for c in prange(chunks.shape[0]):
        g = _chunk(rows, chunks, c, G, like)
        acc, bad, big = 0.0, 0.0, 0.0
        for i in range(g.size):
            v = np.float64(g[i])  # float() would keep float32 and overflow at 1.8e19
            acc += (v * scale) * (v * scale)
            bad += 0.0 if math.isfinite(v) else 1.0
            big = max(big, abs(v))
        partial[c, 0], partial[c, 1], partial[c, 2] = acc, bad, big
    return partial

def cpu_grad_norm(rows, chunks, like, size: int) -> tuple[float, bool]:
    """(norm, any inf/NaN) of a table's gradients, ``size`` elements in all
    (prologue.grad_norm's rule)."""
    kernel = host_kernel(_cpu_grad_sumsq, size)
    partial = kernel(rows, chunks, like, 1.0)
    sumsq, bad = float(np.sum(partial[:, 0])), bool(np.any(partial[:, 1]))
    if bad or math.isfinite(sumsq):
        return math.sqrt(sumsq), bad
    m = float(np.max(partial[:, 2]))
    rescaled = kernel(rows, chunks, like, 1.0 / m)
    return m * math.sqrt(float(np.sum(rescaled[:, 0]))), False

@njit(cache=True)
def _cpu_advance(rows, step_like):
    """Advance every step count; first, without writing, return the first row whose count
    is not a whole number >= 0 (-1 if none)."""
    for r in range(rows.shape[0]):
        t = carray(_pointer(rows[r, STEP], step_like), 1)[0]
        if not (t >= 0 and t == math.floor(t)):
            return r
    for r in range(rows.shape[0]):
        carray(_pointer(rows[r, STEP], step_like), 1)[0] += np.float32(1.0)
    return -1

@njit(inline="always")
def _gradient(p, g, gmul, sign, weight_decay, l1):
    """g * gmul, negated to maximize, plus L2 and L1 penalty gradients."""
    g = g * gmul * sign
    if weight_decay != 0:
        g = g + weight_decay * p
    if l1 != 0:  # l1 * sign(p), as selects (np.sign is a call that stops vectorizing)
        g = g + (l1 if p > 0 else (-l1 if p < 0 else l1 - l1))
    return g


# The two templates of an algorithm's step, compiled once per algorithm by cpu_step with
# these names bound to its functions: ROW_CONSTANTS(k, k64, t) -> the row's constants r,
# ROW_VARIANT(variant, t) -> the row's variant, UPDATE(i, g, p_i, p, s0, s1, s2, r, variant)
# updates element i (g: the gradient, p_i: p[i] after the decoupled decay); VARIANTS: how
# many variants it has; ELEMENTS: its loop.
ROW_CONSTANTS = ROW_VARIANT = UPDATE = ELEMENTS = None
VARIANTS = 1

@njit(inline="always")
def same_variant(variant, t):
    """Every row runs the step's variant."""
    return variant

def _elements(p, g, s0, s1, s2, gk, r, variant):
    """One chunk; ``variant`` is a literal at each call, so every loop compiles without the
    branches of the others and vectorizes."""
    gmul, sign, weight_decay, l1, decay = gk
    for i in range(p.size):
        UPDATE(i, _gradient(p[i], g[i], gmul, sign, weight_decay, l1), p[i] * decay, p,
               s0, s1, s2, r, variant)

def _step(rows, chunks, like, step_like, gk, k, k64, variant):
    """``gk``: (gmul, sign, weight_decay into g, l1, decay) and ``k``: (lr, the algorithm's
    scalars), in the compute type; ``k64``: ``k`` in float64."""
    for c in prange(chunks.shape[0]):
        t = _step_count(rows, chunks, c, step_like)
        r, v = ROW_CONSTANTS(k, k64, t), ROW_VARIANT(variant, t)
        p, g = _chunk(rows, chunks, c, P, like), _chunk(rows, chunks, c, G, like)
        s0, s1 = _chunk(rows, chunks, c, S0, like), _chunk(rows, chunks, c, S1, like)
        s2 = _chunk(rows, chunks, c, S2, like)
        if v == 0:  # the VARIANTS tests are constants: Numba drops the loops never used
            ELEMENTS(p, g, s0, s1, s2, gk, r, 0)
        elif VARIANTS > 1 and v == 1:
            ELEMENTS(p, g, s0, s1, s2, gk, r, 1)
        elif VARIANTS > 2 and v == 2:
            ELEMENTS(p, g, s0, s1, s2, gk, r, 2)
        elif VARIANTS > 3 and v == 3:
            ELEMENTS(p, g, s0, s1, s2, gk, r, 3)
        elif VARIANTS > 4 and v == 4:
            ELEMENTS(p, g, s0, s1, s2, gk, r, 4)


def cpu_step(module: str, row, update, variants: int, row_variant=same_variant):
    """The parallel Numba step of the algorithm of ``module`` (its ``__name__``): the
    templates above with ``row``, ``update`` and ``row_variant`` (``@njit(inline="always")``
    functions of that module) bound, compiled as a function of that module: its disk cache
    sits beside the module and goes stale with it (edits of this file's templates change
    the bytecode in the cache key). A closure over the jitted functions would compile too,
    but its cache key holds them pickled, with a per-process id: it never hits."""
    if not 1 <= variants <= 5:
        raise ValueError(f"variants must be 1 to 5, got {variants}")
    scope = dict(globals(), ROW_CONSTANTS=row, ROW_VARIANT=row_variant, UPDATE=update,
                 VARIANTS=variants)
    name = module.rsplit(".", 1)[-1]
    filename = sys.modules[module].__file__
    scope["ELEMENTS"] = njit(inline="always")(
        _bound(_elements, scope, f"_{name}_elements", module, filename))
    return njit(parallel=True, cache=True)(
        _bound(_step, scope, f"_{name}_step", module, filename))


def _bound(template, scope: dict, name: str, module: str, filename: str):
    code = template.__code__.replace(co_name=name, co_qualname=name, co_filename=filename)
    f = pytypes.FunctionType(code, scope, name)
    f.__qualname__, f.__module__, f.__doc__ = name, module, template.__doc__
    return f


def cpu_run(table, h, grad_scale, found_inf, totals=None):
    """One step of ``table`` on the cpu backend; returns 1.0 (a 0-d array) if skipped."""
    like = np.empty(0, table.dtype)
    gmul, skip = prologue(h, grad_scale, found_inf, totals,
                          lambda: cpu_grad_norm(table.rows, table.chunks, like, table.size))
    if skip:
        return np.asarray(1.0)
    step_like = np.empty(0, np.float32)
    bad = _cpu_advance(table.rows, step_like)
    if bad >= 0:
        value = float(table.natives[2][bad])
        raise ValueError(f"{table.op}: state_steps[{bad}] is {value}; step counts are "
                         "whole numbers >= 0")
    f = like.dtype.type
    gk = tuple(map(f, (gmul, -1.0 if h.maximize else 1.0,
                       0.0 if h.decoupled else h.weight_decay, h.l1,
                       1.0 - h.lr * h.weight_decay if h.decoupled else 1.0)))
    k64 = tuple(map(float, (h.lr, *h.algorithm.scalars(h))))
    host_kernel(h.algorithm.cpu_step, table.size)(table.rows, table.chunks, like, step_like,
                                                  gk, tuple(map(f, k64)), k64,
                                                  h.algorithm.variant(h))
    return np.asarray(0.0)


# --- CUDA: kernels/optim.cu ----------------------------------------------------------------------

FAMILY = "optim"
BLOCK = 256
#: Loads in flight per thread in the update kernel.
UNROLL = 4
_STEP_TYPES = {"float16": ("gpunn::half", "float"), "bfloat16": ("gpunn::bfloat16", "float"),
               "float32": ("float", "float"), "float64": ("double", "double")}


def kernels(functors) -> cuda.Family:
    """Declare kernels/optim.cu's instantiations: the prologue, the gradient pass per dtype,
    and the step per (dtype, algorithm functor)."""
    return cuda.Family(FAMILY, ["gpunn::optim::prologue"] + [
        f"gpunn::optim::grad_norm<{t}>" for t, _ in _STEP_TYPES.values()] + [
        f"gpunn::optim::step<{t}, {s}, gpunn::optim::{functor}>"
        for t, s in _STEP_TYPES.values() for functor in functors], constants={
        **{f"COLUMN_{name}": i for i, name in enumerate(ROW)}, "COLUMNS": COLUMNS,
        "CHUNK": CHUNK, "UNROLL": UNROLL, "SCALARS": SCALARS})


def _function(expression: str):
    return cuda.FAMILIES[FAMILY].function(expression)


def _device_scalar(value, name, device):
    """(host value, device float32 pointer) of grad_scale / found_inf: a number, or a
    one-element float32 array on the parameters' device."""
    if value is None or isinstance(value, (int, float)):
        return value, 0
    kind, dev, dtype, shape, _, address = describe(value, name)
    if dev != device or dtype != "float32" or math.prod(shape) != 1:
        raise ValueError(f"{name} must be a number or a one-element float32 array on {device}, "
                         f"got {dtype} {tuple(shape)} on {dev}")
    return None, address


def cuda_grad_norm(table, max_norm, scale, scale_ptr, found_ptr, control, totals):
    """The gradient pass: ends in finish() (control, step counts), or with ``totals``
    adds the table's sums to them instead (the first phase of a multi-table step)."""
    import cupy

    rows, chunks = table.device_tables()
    kernel = _function(f"gpunn::optim::grad_norm<{_STEP_TYPES[table.dtype][0]}>")
    grid = cuda.grid_for(len(table.chunks) * BLOCK, BLOCK, kernel)
    if table.scratch is None or len(table.scratch[0]) < 2 * grid:
        # per table: two optimizers on two streams must not share the partials
        table.scratch = (cupy.empty(2 * grid, np.float64), cupy.zeros(1, np.uint32))
    partials, counter = table.scratch
    null = np.uint64(0)
    kernel((grid,), (BLOCK,), (rows, np.int64(len(table.rows)), chunks,
                               np.int64(len(table.chunks)), np.float64(max_norm),
                               np.float64(scale), np.uint64(scale_ptr), np.uint64(found_ptr),
                               partials, counter, null if control is None else control,
                               null if totals is None else totals))


def cuda_run(table, h, grad_scale, found_inf, totals=None):
    """One step of ``table`` on the cuda backend; returns the skip flag (a 0-d device
    array, 1 if skipped): nothing waits for the device."""
    import cupy

    scale, scale_ptr = _device_scalar(grad_scale, "grad_scale", table.device)
    found, found_ptr = _device_scalar(found_inf, "found_inf", table.device)
    if scale is not None:
        host_scale(scale, None)  # a number must be finite and > 0 (a device one skips if not)
    control = cupy.empty(2, np.float64)
    if found:  # a host-side found_inf: nothing to launch
        control.fill(1.0)
        return control[1]
    rows, chunks = table.device_tables()
    t, s = _STEP_TYPES[table.dtype]
    scale = 1.0 if scale is None else float(scale)
    max_norm = -1.0 if h.max_grad_norm is None else h.max_grad_norm
    if totals is None and needs_grad_pass(h, grad_scale, found_inf):
        cuda_grad_norm(table, max_norm, scale, scale_ptr, found_ptr, control, None)
    else:  # the step's totals are known (or not needed): one block
        kernel = _function("gpunn::optim::prologue")
        kernel((1,), (BLOCK,), (rows, np.int64(len(table.rows)),
                                np.uint64(0) if totals is None else totals,
                                np.float64(max_norm), np.float64(scale), np.uint64(scale_ptr),
                                np.uint64(found_ptr), control))
    algorithm = h.algorithm
    scalars = [np.float64(v) for v in algorithm.scalars(h)]
    scalars += [np.float64(0.0)] * (SCALARS - len(scalars))
    kernel = _function(f"gpunn::optim::step<{t}, {s}, gpunn::optim::{algorithm.functor}>")
    grid = cuda.grid_for(len(table.chunks) * BLOCK, BLOCK, kernel)
    kernel((grid,), (BLOCK,), (rows, chunks, np.int64(len(table.chunks)), control,
                               np.float64(h.lr), np.float64(h.weight_decay), np.float64(h.l1),
                               np.bool_(h.maximize), np.bool_(h.decoupled), *scalars,
                               np.int32(algorithm.variant(h))))
    return control[1]
