"""The losses' Numba CPU kernels: per-row cross-entropy and NLL, MSE in chunks; sums in
float64, in a fixed order."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ... import cpu_math as cm
from ..softmax import SUM_BLOCK, _row_exp_sum, _row_max

# Rows in parallel; per row a max pass (_row_max, an integer max that vectorizes) and one exp
# pass over SUM_BLOCK blocks, each block summed in the row's dtype (reassociated to vectorize)
# and the blocks in float64 (softmax.py's scheme). Per-row scalars are float64.


# O(N) passes over labels run serially: a parallel region costs more to start (tens of us
# when the threads sleep) than a vectorized scan of 10^5 labels.


@njit(cache=True)
def cpu_label_stats(labels, n_classes, ignore):
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
def cpu_ce_forward(x, labels, ignore, eps, losses, lse, want_lse):
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
def cpu_ce_backward(x, labels, ignore, eps, w, w_stride, lse, have_lse, dx):
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
def cpu_nll_forward(v, labels, ignore, losses):
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
def cpu_nll_backward(labels, ignore, w, w_stride, dx):
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
def cpu_mse_chunks(x, t, parts):
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
def cpu_mse_none(x, t, out):
    for i in prange(x.size):
        d = x[i] - t[i]
        out[i] = d * d


@njit(parallel=True, cache=True)
def cpu_mse_backward(x, t, norm_w, dx):
    """dx = norm_w * (x - t), norm_w in x's dtype."""
    for i in prange(x.size):
        dx[i] = norm_w * (x[i] - t[i])


@njit(parallel=True, cache=True)
def cpu_mse_backward_none(g, x, t, norm, dx):
    """dx = (norm * (x - t)) * g, norm in x's dtype."""
    for i in prange(x.size):
        dx[i] = (norm * (x[i] - t[i])) * g[i]
