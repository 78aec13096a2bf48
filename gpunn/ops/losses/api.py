r"""Losses: softmax cross-entropy (label smoothing, ignore_index), NLL and MSE, forward and
backward, with PyTorch's semantics (``torch.nn.functional.cross_entropy``, ``nll_loss``,
``mse_loss``).

Cross-entropy of logits x (N, C) and integer labels y (N,), label smoothing eps, for a row
with m = max_j x_j, s = sum_j e^{x_j - m}, t = sum_j (x_j - m), lse = m + log(s):

    loss_i = (1 - eps) * (log(s) - (x_{i,y_i} - m)) + eps / C * (C * log(s) - t)
           = -sum_j q_ij * log_softmax(x)_ij,     q = (1 - eps) * onehot(y) + eps / C
    dx_ij  = w_i * (e^{x_ij - lse_i} - q_ij)

Both terms of each line are >= 0, so logits of +-1e4 lose nothing to cancellation (t is summed
after subtracting m). w_i is the upstream gradient (dloss_i for reduction "none", the scalar
dloss for "sum", dloss / count for "mean"), count the number of rows whose label is not
ignore_index. A row labelled ignore_index has loss 0 and gradient 0 (its logits are not even
read, so NaN there does not spread; PyTorch's gradient would be NaN for such a row). "mean"
with every row ignored is 0/0 = NaN, as PyTorch's. NaN or +inf in a used row gives NaN; -inf
logits beside finite ones are fine (an -inf at the label gives loss inf, with eps > 0 any -inf
does, as PyTorch's).

NLL of values v (N, C) (``log_softmax`` output): loss_i = -v_{i,y_i}, dx_ij = -w_i [j = y_i].
MSE of x and t (any shape, n elements): loss = (x - t)^2, dx = 2 w (x - t) with w = dloss
(per element for "none"), / n for "mean".

Reductions are deterministic: per-row (or per-chunk) values, then a sum in a fixed order with
float64 accumulation (float32 for 16-bit inputs would be enough per row, not for 10^6 rows).

Labels: int32 or int64. A label outside [0, C) that is not ignore_index raises IndexError
before anything is written (PyTorch raises too). On the CPU backends the check is a pass over
the labels; on CUDA it is a small kernel whose result the host reads, which synchronizes the
stream: ``check_labels=False`` skips the check (no synchronization), and a bad row then gets a
NaN loss and a NaN gradient row, never an out-of-bounds read.

Saved values: ``cross_entropy_forward`` returns ``(loss, lse)``, lse (N,) float64 for every row
(ignored ones included). Passed to ``cross_entropy_backward(..., lse=lse)`` it spares the
backward the row max and sum: one pass that reads x and writes dx. lse is float64 because
e^{x - lse} with lse rounded to float32 would be off by |lse| * 2^-24 relative (6e-4 for
logits near 1e4); the kernels split it into two float32s hi + lo and compute
e^{(x - hi) - lo}, as accurate as the recomputed softmax.

Memory traffic (the fewest bytes, s = bytes per element, l per label):
    cross-entropy forward   read N*C*s + N*l, write N*s ("none") or s (+ 8N for lse)
    cross-entropy backward  read N*C*s + N*l (+ 8N lse, + N*s dloss for "none"), write N*C*s
    NLL forward             read N*s + N*l;  backward write N*C*s, read N*l
    MSE forward             read 2n*s, write n*s or s; backward read 2n*s (+ n*s), write n*s
CPU: each row is read in one pass for the max and one for the exp-sum (from cache). The
backward without lse writes e^{x - m} into dx and scales it in place. GPU: one block per row
(softmax.cu's launch shapes), rows up to 32768 held in registers: x read once.

Rough CPU figures (float32, this shared 2-core Xeon, noisy; gpunn bench losses): (4096, 1000)
cross-entropy forward 2.7 ms vs torch 4.3 ms, backward 2.6 ms (2.5 with lse) vs 4.3 ms for
torch's nll_loss_backward + _log_softmax_backward_data; on one thread each, 4.6 vs 6.9 ms and
4.9 (4.6) vs 7.7 ms. With label smoothing 0.1: 1.3x (forward) and 2.3x (backward) torch's.
MSE over 16M: forward 3.9x torch's (which materializes (x - t)^2), backward at the memory
limit, as torch's.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
from numba import njit, prange

from .. import cpu_math as cm
from .. import cuda
from ..backend import array_module, dtype_name, resolve, to_host
from ..cpu_jit import threaded
from ..validation import choice, real
from ._apply import compute_dtype
from .softmax import ITEMS, SUM_BLOCK, _row_exp_sum, _row_max, launch_config

REDUCTIONS = ("none", "mean", "sum")
LABEL_DTYPES = ("int32", "int64")
_INT64 = np.iinfo(np.int64)

# --- NumPy reference (runs on CuPy arrays too; 16-bit inputs computed in float32) -------------


def _ref_label_stats(labels, n_classes, ignore):
    """(rows not ignored, first row with a bad label or -1)."""
    xp = array_module(labels)
    used = labels != ignore
    bad = used & ((labels < 0) | (labels >= n_classes))
    first = int(xp.argmax(bad)) if bool(bad.any()) else -1
    return int(used.sum()), first


def _ref_masks(labels, n_classes, ignore):
    """used (label is not ignore_index), ok (used and in range), labels made safe to index."""
    xp = array_module(labels)
    used = labels != ignore
    ok = used & (labels >= 0) & (labels < n_classes)
    return used, ok, xp.where(ok, labels, 0).astype(xp.int64)


def _ref_ce_forward(x, labels, eps, ignore, want_lse):
    """Per-row losses (compute dtype) and lse (float64 or None)."""
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    rows, n = xc.shape
    used, ok, safe = _ref_masks(labels, n, ignore)
    if n == 0:  # every label is ignored (or bad)
        loss = xp.where(used, xc.dtype.type(np.nan), xc.dtype.type(0))
        return loss, (xp.full(rows, -np.inf) if want_lse else None)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = xc.max(axis=1, keepdims=True)
        shifted = xc - m  # <= 0
        s = xp.exp(shifted).sum(axis=1)
        log_s = xp.log(s)
        picked = xp.take_along_axis(shifted, safe[:, None], axis=1)[:, 0]
        loss = log_s - picked
        if eps > 0:
            e = xc.dtype.type(eps)
            loss = (1 - e) * loss + e / n * (n * log_s - shifted.sum(axis=1))
        loss = xp.where(ok, loss, xc.dtype.type(np.nan))
        loss = xp.where(used, loss, xc.dtype.type(0))
        lse = m[:, 0].astype(xp.float64) + xp.log(s.astype(xp.float64)) if want_lse else None
    return loss, lse


def _ref_ce_backward(x, labels, eps, ignore, w, lse):
    """dx = w * (softmax(x) - q); w (N,) in the compute dtype."""
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    rows, n = xc.shape
    used, ok, safe = _ref_masks(labels, n, ignore)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if lse is not None:
            p = xp.exp(xc.astype(xp.float64) - lse[:, None]).astype(xc.dtype)
        elif n:
            shifted = xc - xc.max(axis=1, keepdims=True)
            e = xp.exp(shifted)
            p = e / e.sum(axis=1, keepdims=True)
        else:
            p = xc
        q = xp.full((rows, n), xc.dtype.type(eps / n) if n else 0, dtype=xc.dtype)
        q[xp.arange(rows)[ok], safe[ok]] += xc.dtype.type(1 - eps)
        dx = w[:, None] * (p - q)
    dx = xp.where(ok[:, None], dx, xc.dtype.type(np.nan))
    return xp.where(used[:, None], dx, xc.dtype.type(0))


def _ref_nll_forward(v, labels, ignore):
    xp = array_module(v)
    vc = compute_dtype(xp, v)
    rows, n = vc.shape
    used, ok, safe = _ref_masks(labels, n, ignore)
    picked = xp.take_along_axis(vc, safe[:, None], axis=1)[:, 0] if n else xp.zeros(rows, vc.dtype)
    loss = xp.where(ok, -picked, vc.dtype.type(np.nan))
    return xp.where(used, loss, vc.dtype.type(0))


def _ref_nll_backward(labels, ignore, w, dx):
    xp = array_module(dx)
    rows, n = dx.shape
    used, ok, safe = _ref_masks(labels, n, ignore)
    dx[...] = 0
    dx[xp.arange(rows)[ok], safe[ok]] = -w[ok]
    dx[used & ~ok] = np.nan


def _ref_mse_forward(x, t, reduction):
    xp = array_module(x)
    d = compute_dtype(xp, x) - compute_dtype(xp, t)
    sq = d * d
    if reduction == "none":
        return sq
    total = sq.sum(dtype=xp.float64)
    if reduction == "sum":
        return total
    return total / sq.size if sq.size else math.nan  # the mean of nothing is NaN


def _ref_mse_backward(w, x, t, norm):
    """dx = (norm * (x - t)) * w, w a scalar or an array like x."""
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    d = xc - compute_dtype(xp, t)
    return (xc.dtype.type(norm) * d) * w


# --- Numba CPU kernels ------------------------------------------------------------------------
# Rows in parallel; per row a max pass (_row_max, an integer max that vectorizes) and one exp
# pass over SUM_BLOCK blocks, each block summed in the row's dtype (reassociated to vectorize)
# and the blocks in float64 (softmax.py's scheme). Per-row scalars are float64.


# O(N) passes over labels run serially: a parallel region costs more to start (tens of us
# when the threads sleep) than a vectorized scan of 10^5 labels.


@njit(cache=True)
def _cpu_label_stats(labels, n_classes, ignore):
    """(rows not ignored, first row with a bad label or labels.size)."""
    count = 0
    bad = 0
    for r in range(labels.size):
        y = labels[r]
        count += y != ignore
        bad += (y != ignore) & ((y < 0) | (y >= n_classes))
    if bad == 0:
        return count, labels.size
    for r in range(labels.size):
        y = labels[r]
        if y != ignore and (y < 0 or y >= n_classes):
            return count, r
    return count, labels.size


@njit(fastmath={"reassoc", "nsz"}, cache=True)
def _block_exp_shift_sums(x, m):
    """sum_j e^{x_j - m} and sum_j (x_j - m), in x's dtype."""
    s = type(m)(0)
    t = type(m)(0)
    for j in range(x.size):
        d = x[j] - m
        s += cm.exp(d)
        t += d
    return s, t


@njit(cache=True)
def _row_exp_shift_sums(x, m):
    """(sum_j e^{x_j - m}, sum_j (x_j - m)) in float64."""
    s = 0.0
    t = 0.0
    for j in range(0, x.size, SUM_BLOCK):
        a, b = _block_exp_shift_sums(x[j:j + SUM_BLOCK], m)
        s += a
        t += b
    return s, t


@njit(parallel=True, cache=True)
def _cpu_ce_forward(x, labels, ignore, eps, losses, lse, want_lse):
    """losses[r] = the loss of row r (float64 buffer, or the "none" output); lse[r] if wanted."""
    rows, n = x.shape
    for r in prange(rows):
        y = labels[r]
        ignored = y == ignore
        if ignored and not want_lse:
            losses[r] = 0.0
            continue
        xr = x[r]
        m = _row_max(xr)
        s, t = _row_exp_shift_sums(xr, m)
        log_s = math.log(s)
        m64 = np.float64(m)
        if want_lse:
            lse[r] = m64 + log_s
        if ignored:
            losses[r] = 0.0
        elif y < 0 or y >= n:
            losses[r] = np.nan
        else:
            nll = log_s - (np.float64(xr[y]) - m64)
            if eps > 0.0:
                losses[r] = (1.0 - eps) * nll + eps / n * (n * log_s - t)
            else:
                losses[r] = nll


@njit(parallel=True, cache=True)
def _cpu_ce_backward(x, labels, ignore, eps, w, w_stride, lse, have_lse, dx):
    """dx[r] = w_r * (e^{x_r - lse_r} - q_r); w_r = w[r * w_stride] (float64)."""
    rows, n = x.shape
    for r in prange(rows):
        y = labels[r]
        dxr = dx[r]
        if y == ignore:
            for j in range(n):
                dxr[j] = 0
            continue
        if y < 0 or y >= n:
            for j in range(n):
                dxr[j] = np.nan
            continue
        xr = x[r]
        wr = w[r * w_stride]
        if have_lse:
            hi = type(xr[0])(lse[r])
            lo = type(xr[0])(lse[r] - np.float64(hi))
            a = type(xr[0])(wr)
            b = type(xr[0])(wr * eps / n)
            for j in range(n):
                dxr[j] = a * cm.exp((xr[j] - hi) - lo) - b
        else:
            m = _row_max(xr)
            s = _row_exp_sum(xr, m, dxr)  # dxr = e^{x - m}
            a = type(m)(wr / np.float64(s))
            b = type(m)(wr * eps / n)
            for j in range(n):
                dxr[j] = dxr[j] * a - b
        dxr[y] -= type(xr[0])(wr * (1.0 - eps))


@njit(cache=True)
def _cpu_nll_forward(v, labels, ignore, losses):
    rows, n = v.shape
    for r in range(rows):
        y = labels[r]
        if y == ignore:
            losses[r] = 0.0
        elif y < 0 or y >= n:
            losses[r] = np.nan
        else:
            losses[r] = -np.float64(v[r, y])


@njit(parallel=True, cache=True)
def _cpu_nll_backward(labels, ignore, w, w_stride, dx):
    rows, n = dx.shape
    for r in prange(rows):
        y = labels[r]
        dxr = dx[r]
        for j in range(n):  # a plain fill (a select in this loop halved its speed)
            dxr[j] = 0
        if y == ignore:
            continue
        if 0 <= y < n:
            dxr[y] = -w[r * w_stride]
        else:
            for j in range(n):
                dxr[j] = np.nan


MSE_CHUNK = 1 << 16  # elements per partial sum (fixed: the result does not depend on threads)


@njit(fastmath={"reassoc", "nsz"}, cache=True)
def _block_sq_diff(a, b):
    s = type(a[0])(0)
    for j in range(a.size):
        d = a[j] - b[j]
        s += d * d
    return s


@njit(parallel=True, cache=True)
def _cpu_mse_chunks(x, t, parts):
    """parts[c] = sum over chunk c of (x - t)^2, float64 over SUM_BLOCK blocks."""
    n = x.size
    for c in prange(parts.size):
        lo = c * MSE_CHUNK
        hi = min(n, lo + MSE_CHUNK)
        total = 0.0
        for j in range(lo, hi, SUM_BLOCK):
            k = min(hi, j + SUM_BLOCK)
            total += _block_sq_diff(x[j:k], t[j:k])
        parts[c] = total


@njit(parallel=True, cache=True)
def _cpu_mse_none(x, t, out):
    for i in prange(x.size):
        d = x[i] - t[i]
        out[i] = d * d


@njit(parallel=True, cache=True)
def _cpu_mse_backward(x, t, norm_w, dx):
    """dx = norm_w * (x - t), norm_w in x's dtype."""
    for i in prange(x.size):
        dx[i] = norm_w * (x[i] - t[i])


@njit(parallel=True, cache=True)
def _cpu_mse_backward_none(g, x, t, norm, dx):
    """dx = (norm * (x - t)) * g, norm in x's dtype."""
    for i in prange(x.size):
        dx[i] = (norm * (x[i] - t[i])) * g[i]


# --- CUDA launchers: kernels/losses.cu --------------------------------------------------------

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


def _cuda_label_stats(labels, n_classes, ignore):
    """A device array [count of used rows, rows - first bad row (0: none)] (uint64)."""
    import cupy

    stats = cupy.zeros(2, dtype=cupy.uint64)
    kernel = KERNELS.function(f"gpunn::label_stats<{LABEL_CTYPES[labels.dtype.name]}>")
    rows = labels.size
    kernel((_grid(rows, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
           (labels, np.int64(rows), np.int64(n_classes), np.int64(ignore), stats))
    return stats


def _cuda_check(op, labels, n_classes, ignore, stats):
    """Read the stats (synchronizes the current stream, torch's for torch callers) and raise
    for a bad label."""
    worst = int(to_host(stats[1]))
    if worst:
        row = labels.size - worst
        _raise_bad_label(op, row, int(to_host(labels[row])), n_classes, ignore)


def _cuda_labels(op, labels, n_classes, ignore, reduction, check):
    """The label stats where they are needed (``check``, or the count of a "mean"), else None;
    with ``check``, raises for a bad label first (this synchronizes)."""
    if not (check or reduction == "mean"):
        return None
    stats = _cuda_label_stats(labels, n_classes, ignore)
    if check:
        _cuda_check(op, labels, n_classes, ignore, stats)
    return stats


def _cuda_row_losses(x, reduction):
    """The per-row losses a reduction sums (float64 for float64 x, else float32), or None for
    "none" (the kernels write the losses out directly)."""
    import cupy

    if reduction == "none":
        return None
    return cupy.empty(x.shape[0], dtype=cupy.float64 if x.dtype == cupy.float64 else cupy.float32)


def _cuda_finish(parts, count, scale, out):
    kernel = KERNELS.function(f"gpunn::loss_finish<{cuda.ctype(out.dtype)}>")
    kernel((1,), (FINISH_BLOCK,), (parts, np.int64(parts.size),
                                   NULL if count is None else count, np.float64(scale), out))


def _cuda_reduce_rows(row_loss, count, reduction, out):
    """out[()] = sum(row_loss) (/ count for "mean"), deterministic."""
    import cupy

    rows = row_loss.size
    parts = cupy.empty(-(-rows // ROW_CHUNK), dtype=cupy.float64)
    if parts.size:
        kernel = KERNELS.function(f"gpunn::sum_chunks<{cuda.ctype(row_loss.dtype)}>")
        kernel((_grid(parts.size * REDUCE_BLOCK, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
               (row_loss, np.int64(rows), np.int64(ROW_CHUNK), parts))
    _cuda_finish(parts, count if reduction == "mean" else None, 1.0, out)


def _row_kernel(name, ctype, ltype, n):
    """(kernel, block, n argument) for a cross-entropy row kernel over rows of n."""
    items, block = launch_config(n)
    if items is None:
        return KERNELS.function(f"gpunn::ce_{name}_long<{ctype}, {ltype}>"), block, np.int64(n)
    return (KERNELS.function(f"gpunn::ce_{name}_rows<{ctype}, {items}, {ltype}>"), block,
            np.int32(n))


def _cuda_ce_forward(op, x, labels, eps, ignore, reduction, out, lse, check):
    rows, n = x.shape
    ctype, ltype = cuda.ctype(x.dtype), LABEL_CTYPES[labels.dtype.name]
    stats = _cuda_labels(op, labels, n, ignore, reduction, check)
    row_loss = _cuda_row_losses(x, reduction)
    if rows:
        kernel, block, n_arg = _row_kernel("forward", ctype, ltype, n)
        kernel((_grid(rows * block, block, kernel),), (block,),
               (x, labels, np.int64(rows), n_arg, np.int64(ignore), np.float64(eps),
                NULL if row_loss is None else row_loss, out if row_loss is None else NULL,
                NULL if lse is None else lse))
    if row_loss is not None:
        _cuda_reduce_rows(row_loss, stats, reduction, out)


def _cuda_weights(dloss):
    """(pointer or NULL, stride, value) of the upstream gradient for the kernels."""
    if isinstance(dloss, float):
        return NULL, np.int64(0), np.float64(dloss)
    return dloss, np.int64(0 if dloss.size == 1 and dloss.ndim == 0 else 1), np.float64(0)


def _cuda_ce_backward(op, dloss, x, labels, eps, ignore, reduction, lse, dx, check):
    rows, n = x.shape
    stats = _cuda_labels(op, labels, n, ignore, reduction, check)
    if rows == 0 or n == 0:
        return
    kernel, block, n_arg = _row_kernel("backward", cuda.ctype(x.dtype),
                                       LABEL_CTYPES[labels.dtype.name], n)
    kernel((_grid(rows * block, block, kernel),), (block,),
           (x, labels, np.int64(rows), n_arg, np.int64(ignore), np.float64(eps),
            *_cuda_weights(dloss), stats if reduction == "mean" else NULL,
            NULL if lse is None else lse, dx))


def _cuda_nll_forward(op, v, labels, ignore, reduction, out, check):
    rows, n = v.shape
    ctype, ltype = cuda.ctype(v.dtype), LABEL_CTYPES[labels.dtype.name]
    stats = _cuda_labels(op, labels, n, ignore, reduction, check)
    row_loss = _cuda_row_losses(v, reduction)
    if rows:
        kernel = KERNELS.function(f"gpunn::nll_forward<{ctype}, {ltype}>")
        kernel((_grid(rows, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
               (v, labels, np.int64(rows), np.int64(n), np.int64(ignore),
                NULL if row_loss is None else row_loss, out if row_loss is None else NULL))
    if row_loss is not None:
        _cuda_reduce_rows(row_loss, stats, reduction, out)


def _cuda_nll_backward(op, dloss, labels, ignore, reduction, dx, check):
    rows, n = dx.shape
    stats = _cuda_labels(op, labels, n, ignore, reduction, check)
    if dx.size:
        dx.data.memset_async(0, dx.nbytes)
    if rows == 0:
        return
    kernel = KERNELS.function(
        f"gpunn::nll_backward<{cuda.ctype(dx.dtype)}, {LABEL_CTYPES[labels.dtype.name]}>")
    kernel((_grid(rows, REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
           (labels, np.int64(rows), np.int64(n), np.int64(ignore), *_cuda_weights(dloss),
            stats if reduction == "mean" else NULL, dx))


def _cuda_mse_forward(x, t, reduction, out):
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
    _cuda_finish(parts, None, scale, out)


def _cuda_mse_backward(dloss, x, t, norm, dx):
    n = x.size
    if n == 0:
        return
    kernel = KERNELS.function(f"gpunn::mse_backward<{cuda.ctype(x.dtype)}>")
    per_thread = 16 // x.dtype.itemsize
    kernel((_grid(-(-n // per_thread), REDUCE_BLOCK, kernel),), (REDUCE_BLOCK,),
           (*_cuda_weights(dloss), x, t, dx, np.int64(n), np.float64(norm)))


# --- Argument checks and the call path --------------------------------------------------------


def _check_ignore(op, ignore_index):
    try:
        ignore = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}") from None
    if not _INT64.min <= ignore <= _INT64.max:
        raise ValueError(f"{op}: ignore_index must fit in int64, got {ignore}")
    return ignore


def _raise_bad_label(op, row, value, n_classes, ignore):
    raise IndexError(f"{op}: labels[{row}] = {value} is out of range [0, {n_classes}) and is "
                     f"not ignore_index ({ignore})")


def _native_labels(call, labels):
    """labels as a C-contiguous NumPy/CuPy int32 or int64 array."""
    name = dtype_name(labels)
    if name not in LABEL_DTYPES:
        raise TypeError(f"{call.op}: labels must be int32 or int64 class indices, got dtype "
                        f"{name}")
    return call.contiguous(call.view(labels))


def _rows_inputs(op, call, x, labels, x_name):
    """(x as (N, C), labels as (N,), shape of a "none" loss, the native arrays as given by
    name, for the overlap check of an output) after the shape checks. The kernels take int64
    labels: int32 ones are widened (a copy of N labels costs less than compiling every kernel
    twice)."""
    xn = call.native(x, x_name)
    given = _native_labels(call, labels)
    read = {x_name: xn, "labels": given}
    ln = given if call.backend == "numpy" else given.astype(call.xp.int64, copy=False)
    if xn.ndim == 2:
        if ln.shape != (xn.shape[0],):
            raise ValueError(f"{op}: labels has shape {ln.shape}, expected ({xn.shape[0]},) "
                             f"for {x_name} of shape {xn.shape}")
        return xn, ln, (xn.shape[0],), read
    if xn.ndim == 1:
        if ln.shape != ():
            raise ValueError(f"{op}: labels has shape {ln.shape}, expected () for {x_name} of "
                             f"shape {xn.shape}")
        return xn.reshape(1, -1), ln.reshape(1), (), read
    raise ValueError(f"{op}: {x_name} must have shape (N, C) or (C,), got {xn.shape}")


def _label_stats(call, labels, n_classes, ignore, check):
    """Host backends: (count of used rows, and raise for a bad label when check)."""
    if call.backend == "numpy":
        count, first = _ref_label_stats(labels, n_classes, ignore)
    else:
        count, first = _cpu_label_stats(labels, n_classes, ignore)
        first = -1 if first == labels.size else first
    if check and first >= 0:
        _raise_bad_label(call.op, first, int(labels[first]), n_classes, ignore)
    return count


def _host_dloss(call, dloss, shape, like, name="dloss"):
    """dloss as a float (a Python or NumPy number), or as a native array after checking its
    shape (``shape``) and dtype (``like``'s, as torch's autograd passes it)."""
    if isinstance(dloss, numbers.Real) and not isinstance(dloss, bool):
        return float(dloss)
    d = call.native(dloss, name)
    if dtype_name(d) != dtype_name(like):
        raise TypeError(f"{call.op}: {name} has dtype {dtype_name(d)}, expected "
                        f"{dtype_name(like)} (the dtype of the input)")
    if d.shape != shape:
        raise ValueError(f"{call.op}: {name} has shape {d.shape}, expected {shape}")
    return d


def _weights(call, dloss, rows):
    """(w, stride) for the CPU kernels: float64 weights, w[r * stride] for row r."""
    if isinstance(dloss, float):
        return np.full(1, dloss), 0
    w = np.asarray(dloss, dtype=np.float64).reshape(-1)
    return w, (1 if w.size == rows and dloss.ndim else 0)


def _ref_weights(call, dloss, rows, dtype, scale):
    """(N,) weights in the compute dtype for the reference."""
    xp = call.xp
    if isinstance(dloss, float):
        return xp.full(rows, dloss * scale, dtype=dtype)
    w = compute_dtype(xp, dloss).reshape(-1).astype(dtype) * dtype.type(scale)
    return xp.broadcast_to(w, (rows,)) if w.size == 1 and dloss.ndim == 0 else w


def _scale(reduction, count):
    """The weight's factor: 1 / count for "mean" (0 when no row is used: none reads it)."""
    return (1.0 / count if count else 0.0) if reduction == "mean" else 1.0


def _finish_host(call, total, count, reduction, out):
    """out[()] = total (/ count for "mean"; 0 / 0 is NaN)."""
    if reduction == "mean":
        total = total / count if count else math.nan
    out[...] = total


def _dloss_input(g):
    """{"dloss": g} for an array dloss (native), {} for a number: an output's overlap check."""
    return {} if isinstance(g, float) else {"dloss": g}


def _dloss_arrays(dloss):
    return {} if isinstance(dloss, numbers.Real) and not isinstance(dloss, bool) else {
        "dloss": dloss}


# --- Public API -------------------------------------------------------------------------------


def _ce(op, logits, labels, reduction, label_smoothing, ignore_index, backend, check_labels,
        want_lse):
    choice(op, "reduction", reduction, REDUCTIONS)
    eps = real(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, logits=logits, labels=labels)
    with call.context():
        x, y, none_shape, _ = _rows_inputs(op, call, logits, labels, "logits")
        rows, n = x.shape
        out = call.empty(none_shape if reduction == "none" else (), x.dtype)
        lse = call.empty((rows,), np.float64) if want_lse else None
        if call.backend == "cuda":
            _cuda_ce_forward(op, x, y, eps, ignore, reduction, out.reshape(-1) if
                             reduction == "none" else out, lse, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            if call.backend == "numpy" or n == 0:  # no classes: nothing for a kernel to do
                losses, lse_ref = _ref_ce_forward(x, y, eps, ignore, want_lse)
                if want_lse:
                    lse[...] = lse_ref
                if reduction == "none":
                    out.reshape(-1)[...] = losses
                else:
                    _finish_host(call, losses.sum(dtype=call.xp.float64), count, reduction, out)
            else:
                losses = np.empty(rows)  # float64 (one specialization for every output dtype)
                threaded(_cpu_ce_forward)(x, y, np.int64(ignore), eps, losses,
                                          lse if want_lse else np.empty(0), want_lse)
                if reduction == "none":
                    out.reshape(-1)[...] = losses
                else:
                    _finish_host(call, losses.sum(), count, reduction, out)
        loss = call.wrap(out)
        return (loss, call.wrap(lse)) if want_lse else loss


def cross_entropy(logits, labels, reduction="mean", label_smoothing=0.0, ignore_index=-100,
                  backend=None, *, check_labels=True):
    """Softmax cross-entropy of ``logits`` (N, C) (or (C,)) against class indices ``labels``
    (N,) (or ()), int32 or int64, as ``torch.nn.functional.cross_entropy``.

    reduction: "none" (a loss per row, in the logits' dtype), "mean" (over rows whose label is
    not ``ignore_index``) or "sum" (0-d arrays). ``label_smoothing`` eps in [0, 1]: the target
    is (1 - eps) * onehot + eps / C. ``check_labels``: see the module docstring (labels out of
    range raise IndexError; on CUDA the check synchronizes)."""
    return _ce("cross_entropy", logits, labels, reduction, label_smoothing, ignore_index,
               backend, check_labels, want_lse=False)


def cross_entropy_forward(logits, labels, reduction="mean", label_smoothing=0.0,
                          ignore_index=-100, backend=None, *, check_labels=True):
    """``cross_entropy`` returning ``(loss, lse)``: lse (N,) float64 is the log-sum-exp of each
    row, for ``cross_entropy_backward(..., lse=lse)`` (one pass, no row reduction)."""
    return _ce("cross_entropy_forward", logits, labels, reduction, label_smoothing,
               ignore_index, backend, check_labels, want_lse=True)


def cross_entropy_backward(dloss, logits, labels, reduction="mean", label_smoothing=0.0,
                           ignore_index=-100, out=None, backend=None, *, lse=None,
                           check_labels=True):
    """d loss / d logits = w * (softmax(logits) - q), q = (1 - eps) * onehot + eps / C, with
    w = dloss (a scalar for "mean"/"sum": a number or a 0-d array; (N,) for "none"), divided
    by the count of non-ignored rows for "mean"; 0 for ignored rows. ``lse``: the forward's
    saved log-sum-exp (``cross_entropy_forward``); without it the row max and sum are
    recomputed. ``out``: a C-contiguous array like ``logits`` (may be ``logits`` itself)."""
    op = "cross_entropy_backward"
    choice(op, "reduction", reduction, REDUCTIONS)
    eps = real(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, logits=logits, labels=labels, **_dloss_arrays(dloss),
                   **({} if lse is None else {"lse": lse}), out=out)
    with call.context():
        x, y, none_shape, read = _rows_inputs(op, call, logits, labels, "logits")
        rows, n = x.shape
        g = _host_dloss(call, dloss, none_shape if reduction == "none" else (), x)
        saved = None
        if lse is not None:
            saved = call.native(lse, "lse")
            if dtype_name(saved) != "float64" or saved.shape != (rows,):
                raise ValueError(f"{op}: lse must be the float64 array of shape ({rows},) that "
                                 f"cross_entropy_forward returns, got {dtype_name(saved)} "
                                 f"{saved.shape}")
        dx = call.output(out, x.reshape(none_shape + (n,)),
                         inputs={**read, **_dloss_input(g), "lse": saved})
        dx2 = dx.reshape(rows, n)
        if call.backend == "cuda":
            _cuda_ce_backward(op, g, x, y, eps, ignore, reduction, saved, dx2, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            scale = _scale(reduction, count)
            if call.backend == "numpy":
                w = _ref_weights(call, g, rows, compute_dtype(call.xp, x).dtype, scale)
                dx2[...] = _ref_ce_backward(x, y, eps, ignore, w, saved)
            else:
                w, stride = _weights(call, g, rows)
                threaded(_cpu_ce_backward)(x, y, np.int64(ignore), eps, w * scale, stride,
                                           saved if saved is not None else np.empty(0),
                                           saved is not None, dx2)
    return call.wrap(dx, out)


def nll_loss(log_probs, labels, reduction="mean", ignore_index=-100, backend=None, *,
             check_labels=True):
    """Negative log-likelihood: -log_probs[i, labels[i]] per row (0 for ignore_index), as
    ``torch.nn.functional.nll_loss`` (no class weights). With ``log_softmax`` it is the
    cross-entropy; ``cross_entropy`` does both in one pass."""
    op = "nll_loss"
    choice(op, "reduction", reduction, REDUCTIONS)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, log_probs=log_probs, labels=labels)
    with call.context():
        v, y, none_shape, _ = _rows_inputs(op, call, log_probs, labels, "log_probs")
        rows, n = v.shape
        out = call.empty(none_shape if reduction == "none" else (), v.dtype)
        if call.backend == "cuda":
            _cuda_nll_forward(op, v, y, ignore, reduction,
                              out.reshape(-1) if reduction == "none" else out, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            if call.backend == "numpy":
                losses = _ref_nll_forward(v, y, ignore)
            else:
                losses = np.empty(rows)
                _cpu_nll_forward(v, y, np.int64(ignore), losses)
            if reduction == "none":
                out.reshape(-1)[...] = losses
            else:
                _finish_host(call, losses.sum(dtype=call.xp.float64), count, reduction, out)
        return call.wrap(out)


def nll_loss_backward(dloss, log_probs, labels, reduction="mean", ignore_index=-100, out=None,
                      backend=None, *, check_labels=True):
    """d loss / d log_probs: -w at each row's label, 0 elsewhere (and on ignored rows); w as
    in ``cross_entropy_backward``."""
    op = "nll_loss_backward"
    choice(op, "reduction", reduction, REDUCTIONS)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, log_probs=log_probs, labels=labels, **_dloss_arrays(dloss),
                   out=out)
    with call.context():
        v, y, none_shape, read = _rows_inputs(op, call, log_probs, labels, "log_probs")
        rows, n = v.shape
        g = _host_dloss(call, dloss, none_shape if reduction == "none" else (), v)
        dx = call.output(out, v.reshape(none_shape + (n,)), inputs={**read, **_dloss_input(g)})
        dx2 = dx.reshape(rows, n)
        if call.backend == "cuda":
            _cuda_nll_backward(op, g, y, ignore, reduction, dx2, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            scale = _scale(reduction, count)
            if call.backend == "numpy":
                w = _ref_weights(call, g, rows, compute_dtype(call.xp, v).dtype, scale)
                _ref_nll_backward(y, ignore, w, dx2)
            else:
                w, stride = _weights(call, g, rows)
                threaded(_cpu_nll_backward)(y, np.int64(ignore), w * scale, stride, dx2)
    return call.wrap(dx, out)


def _mse_inputs(op, call, input, target):
    x = call.native(input, "input")
    t = call.native(target, "target")
    if t.shape != x.shape:
        raise ValueError(f"{op}: target has shape {t.shape}, expected {x.shape} (the shape of "
                         "input)")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: target has dtype {dtype_name(t)}, expected {dtype_name(x)}")
    return x, t


def mse_loss(input, target, reduction="mean", backend=None):
    """(input - target)^2: elementwise ("none"), summed, or averaged over all elements (NaN
    for no elements), as ``torch.nn.functional.mse_loss``."""
    op = "mse_loss"
    choice(op, "reduction", reduction, REDUCTIONS)
    call = resolve(op, backend, input=input, target=target)
    with call.context():
        x, t = _mse_inputs(op, call, input, target)
        out = call.empty(x.shape if reduction == "none" else (), x.dtype)
        if call.backend == "cuda":
            _cuda_mse_forward(x.reshape(-1), t.reshape(-1), reduction, out.reshape(-1))
        elif call.backend == "numpy":
            out[...] = _ref_mse_forward(x, t, reduction)
        elif reduction == "none":
            threaded(_cpu_mse_none)(x.reshape(-1), t.reshape(-1), out.reshape(-1))
        else:
            parts = np.empty(-(-x.size // MSE_CHUNK))
            threaded(_cpu_mse_chunks)(x.reshape(-1), t.reshape(-1), parts)
            total = parts.sum()
            out[...] = total if reduction == "sum" else (total / x.size if x.size else math.nan)
        return call.wrap(out)


def mse_loss_backward(dloss, input, target, reduction="mean", out=None, backend=None):
    """d loss / d input = 2 * (input - target) * dloss (/ numel for "mean"); dloss is a
    scalar for "mean"/"sum" and shaped like input for "none". (d/d target is its negative.)"""
    op = "mse_loss_backward"
    choice(op, "reduction", reduction, REDUCTIONS)
    call = resolve(op, backend, input=input, target=target, **_dloss_arrays(dloss), out=out)
    with call.context():
        x, t = _mse_inputs(op, call, input, target)
        g = _host_dloss(call, dloss, x.shape if reduction == "none" else (), x)
        norm = 2.0 / x.size if reduction == "mean" and x.size else 2.0
        dx = call.output(out, x, inputs={"input": x, "target": t, **_dloss_input(g)})
        if call.backend == "cuda":
            _cuda_mse_backward(g, x.reshape(-1), t.reshape(-1), norm, dx.reshape(-1))
        elif call.backend == "numpy":
            w = g if isinstance(g, float) else compute_dtype(call.xp, g)
            dx[...] = _ref_mse_backward(w, x, t, norm)
        elif isinstance(g, float) or g.ndim == 0:
            k = x.dtype.type(norm * float(g))
            threaded(_cpu_mse_backward)(x.reshape(-1), t.reshape(-1), k, dx.reshape(-1))
        else:
            threaded(_cpu_mse_backward_none)(g.reshape(-1), x.reshape(-1), t.reshape(-1),
                                             x.dtype.type(norm), dx.reshape(-1))
    return call.wrap(dx, out)
