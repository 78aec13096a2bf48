"""The losses' CUDA launchers (kernels/losses.cu): label checks, per-row kernels, then
deterministic chunked sums finished on the device."""

from __future__ import annotations

import math

import numpy as np

from ... import cuda
from ...backend import to_host
from ..softmax import ITEMS, launch_config
from .reference import raise_bad_label

LABEL_CTYPES = {"int64": "long long"}  # int32 labels are widened first: half the NVRTC time
REDUCE_BLOCK = 256
FINISH_BLOCK = 1024
ROW_CHUNK = 4096  # row losses per partial sum
ELEMENT_CHUNK = 1 << 14  # MSE elements per partial sum (a multiple of every vector width)
NULL = np.uint64(0)  # a null pointer argument
KERNELS = cuda.Family("losses", [
    *(f"gpunn::label_stats<{lt}>" for lt in LABEL_CTYPES.values()),
    *(expr for ct in cuda.CTYPES.values() for lt in LABEL_CTYPES.values() for expr in (
        *(f"gpunn::ce_{d}_rows<{ct}, {items}, {lt}>" for d in ("forward", "backward")
          for items in ITEMS),
        f"gpunn::ce_forward_long<{ct}, {lt}>", f"gpunn::ce_backward_long<{ct}, {lt}>",
        f"gpunn::nll_forward<{ct}, {lt}>", f"gpunn::nll_backward<{ct}, {lt}>")),
    "gpunn::sum_chunks<float>", "gpunn::sum_chunks<double>",
    *(f"gpunn::{k}<{ct}>" for ct in cuda.CTYPES.values()
      for k in ("mse_chunks", "loss_finish", "mse_none", "mse_backward")),
])


def _grid(n_items, block, kernel):
    return cuda.grid_for(max(1, n_items), block, kernel)


def cuda_label_stats(labels, n_classes, ignore):
    """A device array [count of used rows, rows - first bad row (0: none)] (uint64)."""
    import cupy

    stats = cupy.zeros(2, dtype=cupy.uint64)
    kernel = KERNELS.function(f"gpunn::label_stats<{LABEL_CTYPES[labels.dtype.name]}>")
    rows = labels.size
    kernel((_grid(rows, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
           (labels, np.int64(rows), np.int64(n_classes), np.int64(ignore), stats))
    return stats


def cuda_check(op, labels, n_classes, ignore, stats):
    """Read the stats (synchronizes the current stream, torch's for torch callers) and raise
    for a bad label."""
    worst = int(to_host(stats[1]))
    if worst:
        row = labels.size - worst
        raise_bad_label(op, row, int(to_host(labels[row])), n_classes, ignore)


def cuda_labels(op, labels, n_classes, ignore, reduction, check):
    """The label stats where they are needed (``check``, or the count of a "mean"), else None;
    with ``check``, raises for a bad label first (this synchronizes)."""
    if not (check or reduction == "mean"):
        return None
    stats = cuda_label_stats(labels, n_classes, ignore)
    if check:
        cuda_check(op, labels, n_classes, ignore, stats)
    return stats


def cuda_row_losses(x, reduction):
    """The per-row losses a reduction sums (float64 for float64 x, else float32), or None for
    "none" (the kernels write the losses out directly)."""
    import cupy

    if reduction == "none":
        return None
    return cupy.empty(x.shape[0], dtype=cupy.float64 if x.dtype == cupy.float64 else cupy.float32)


def cuda_finish(parts, count, scale, out):
    kernel = KERNELS.function(f"gpunn::loss_finish<{cuda.ctype(out.dtype)}>")
    kernel((1,), (FINISH_BLOCK,), (parts, np.int64(parts.size),
                                   NULL if count is None else count, np.float64(scale), out))


def cuda_reduce_rows(row_loss, count, reduction, out):
    """out[()] = sum(row_loss) (/ count for "mean"), deterministic."""
    import cupy

    rows = row_loss.size
    parts = cupy.empty(-(-rows // ROW_CHUNK), dtype=cupy.float64)
    if parts.size:
        kernel = KERNELS.function(f"gpunn::sum_chunks<{cuda.ctype(row_loss.dtype)}>")
        kernel((_grid(parts.size * REDUCE_BLOCK, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
               (row_loss, np.int64(rows), np.int64(ROW_CHUNK), parts))
    cuda_finish(parts, count if reduction == "mean" else None, 1.0, out)


def _row_kernel(name, ctype, ltype, n):
    """(kernel, block, n argument) for a cross-entropy row kernel over rows of n."""
    items, block = launch_config(n)
    if items is None:
        return KERNELS.function(f"gpunn::ce_{name}_long<{ctype}, {ltype}>"), block, np.int64(n)
    return (KERNELS.function(f"gpunn::ce_{name}_rows<{ctype}, {items}, {ltype}>"), block,
            np.int32(n))


def cuda_ce_forward(op, x, labels, eps, ignore, reduction, out, lse, check):
    rows, n = x.shape
    ctype, ltype = cuda.ctype(x.dtype), LABEL_CTYPES[labels.dtype.name]
    stats = cuda_labels(op, labels, n, ignore, reduction, check)
    row_loss = cuda_row_losses(x, reduction)
    if rows:
        kernel, block, n_arg = _row_kernel("forward", ctype, ltype, n)
        kernel((_grid(rows * block, block, kernel),), (block,),
               (x, labels, np.int64(rows), n_arg, np.int64(ignore), np.float64(eps),
                NULL if row_loss is None else row_loss, out if row_loss is None else NULL,
                NULL if lse is None else lse))
    if row_loss is not None:
        cuda_reduce_rows(row_loss, stats, reduction, out)


def cuda_weights(dloss):
    """(pointer or NULL, stride, value) of the upstream gradient for the kernels."""
    if isinstance(dloss, float):
        return NULL, np.int64(0), np.float64(dloss)
    return dloss, np.int64(0 if dloss.size == 1 and dloss.ndim == 0 else 1), np.float64(0)


def cuda_ce_backward(op, dloss, x, labels, eps, ignore, reduction, lse, dx, check):
    rows, n = x.shape
    stats = cuda_labels(op, labels, n, ignore, reduction, check)
    if rows == 0 or n == 0:
        return
    kernel, block, n_arg = _row_kernel("backward", cuda.ctype(x.dtype),
                                       LABEL_CTYPES[labels.dtype.name], n)
    kernel((_grid(rows * block, block, kernel),), (block,),
           (x, labels, np.int64(rows), n_arg, np.int64(ignore), np.float64(eps),
            *cuda_weights(dloss), stats if reduction == "mean" else NULL,
            NULL if lse is None else lse, dx))


def cuda_nll_forward(op, v, labels, ignore, reduction, out, check):
    rows, n = v.shape
    ctype, ltype = cuda.ctype(v.dtype), LABEL_CTYPES[labels.dtype.name]
    stats = cuda_labels(op, labels, n, ignore, reduction, check)
    row_loss = cuda_row_losses(v, reduction)
    if rows:
        kernel = KERNELS.function(f"gpunn::nll_forward<{ctype}, {ltype}>")
        kernel((_grid(rows, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
               (v, labels, np.int64(rows), np.int64(n), np.int64(ignore),
                NULL if row_loss is None else row_loss, out if row_loss is None else NULL))
    if row_loss is not None:
        cuda_reduce_rows(row_loss, stats, reduction, out)


def cuda_nll_backward(op, dloss, labels, ignore, reduction, dx, check):
    rows, n = dx.shape
    stats = cuda_labels(op, labels, n, ignore, reduction, check)
    if dx.size:
        dx.data.memset_async(0, dx.nbytes)
    if rows == 0:
        return
    kernel = KERNELS.function(
        f"gpunn::nll_backward<{cuda.ctype(dx.dtype)}, {LABEL_CTYPES[labels.dtype.name]}>")
    kernel((_grid(rows, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
           (labels, np.int64(rows), np.int64(n), np.int64(ignore), *cuda_weights(dloss),
            stats if reduction == "mean" else NULL, dx))


def cuda_mse_forward(x, t, reduction, out):
    import cupy

    ctype, n = cuda.ctype(x.dtype), x.size
    if reduction == "none":
        if n:
            kernel = KERNELS.function(f"gpunn::mse_none<{ctype}>")
            per_thread = 16 // x.dtype.itemsize
            kernel((_grid(-(-n // per_thread), REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
                   (x, t, out, np.int64(n)))
        return
    parts = cupy.empty(-(-n // ELEMENT_CHUNK), dtype=cupy.float64)
    if parts.size:
        kernel = KERNELS.function(f"gpunn::mse_chunks<{ctype}>")
        kernel((_grid(parts.size * REDUCE_BLOCK, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
               (x, t, np.int64(n), np.int64(ELEMENT_CHUNK), parts))
    scale = (1.0 / n if n else math.nan) if reduction == "mean" else 1.0
    cuda_finish(parts, None, scale, out)


def cuda_mse_backward(dloss, x, t, norm, dx):
    n = x.size
    if n == 0:
        return
    kernel = KERNELS.function(f"gpunn::mse_backward<{cuda.ctype(x.dtype)}>")
    per_thread = 16 // x.dtype.itemsize
    kernel((_grid(-(-n // per_thread), REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
           (*cuda_weights(dloss), x, t, dx, np.int64(n), np.float64(norm)))
