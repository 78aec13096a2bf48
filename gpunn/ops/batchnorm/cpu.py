"""Batch normalization on the CPU, part 2: the Numba elementwise passes (normalize, dx) and
the jitted drivers that run a whole forward or backward (reduction kernels of
:mod:`gpunn.ops.batchnorm.cpu_stats`, finalize, elementwise pass), and their Python entry
points :func:`cpu_forward` and :func:`cpu_backward`."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...backend import host_kernel, host_thread_count
from .cpu_stats import (COL_TILE, CPU_ROWS_MIN, ROW_BLOCK, finalize_backward, finalize_forward,
                        grad_cols, grad_rows, stats_cols, stats_rows)

# --- Numba CPU kernels: elementwise passes --------------------------------------------------------
# The same split of rows into pieces as the reductions; the ReLU mask and every normalized
# value are computed without fastmath (see cpu_stats).


@njit(inline="always", cache=True)
def _row_piece(t, NB, C, B):
    """Piece t of an elementwise pass over rows: (a, c, b0, b1), the q-th of the NB pieces
    [b0, b1) of row (a, c), t = (a*C + c)*NB + q."""
    r = t // NB
    q = t - r * NB
    a = r // C
    return a, r - a * C, q * B // NB, (q + 1) * B // NB


@njit(inline="always", cache=True)
def _rows_block(t, NR, A, C):
    """Block t of an elementwise channels-last pass: flat values [lo, hi) of rows
    [t*NR, (t+1)*NR) of C channels (fewer at the end)."""
    return t * NR * C, min(A, (t + 1) * NR) * C


@njit(cache=True, error_model="numpy")
def _seg_normalize(xs, ys, m, sc, be):
    for i in range(xs.size):
        ys[i] = (xs[i] - m) * sc + be


@njit(cache=True, error_model="numpy")
def _seg_normalize_relu(xs, ys, m, sc, be):
    zero = type(m)(0)
    for i in range(xs.size):
        z = (xs[i] - m) * sc + be
        ys[i] = zero if z < zero else z


@njit(parallel=True, cache=True, error_model="numpy")
def _normalize_rows(x3, mean, scale, beta, y3, relu, NB):
    """y = (x - mean) * scale + beta (then ReLU) over rows of B, each row in NB pieces."""
    A, C, B = x3.shape
    for t in prange(A * C * NB):
        a, c, b0, b1 = _row_piece(t, NB, C, B)
        if relu:
            _seg_normalize_relu(x3[a, c, b0:b1], y3[a, c, b0:b1], mean[c], scale[c], beta[c])
        else:
            _seg_normalize(x3[a, c, b0:b1], y3[a, c, b0:b1], mean[c], scale[c], beta[c])


@njit(cache=True, error_model="numpy")
def _block_normalize(xs, ys, mean, scale, beta, relu):
    """Whole rows of C = mean.size channels: ys = (xs - mean) * scale + beta (then ReLU)."""
    C = mean.size
    zero = type(mean[0])(0)
    if relu:
        for r in range(xs.size // C):
            o = r * C
            for i in range(C):
                z = (xs[o + i] - mean[i]) * scale[i] + beta[i]
                ys[o + i] = zero if z < zero else z
    else:
        for r in range(xs.size // C):
            o = r * C
            for i in range(C):
                ys[o + i] = (xs[o + i] - mean[i]) * scale[i] + beta[i]


@njit(parallel=True, cache=True, error_model="numpy")
def _normalize_cols(x2, mean, scale, beta, y2, relu, NR):
    """Channels last (B = 1): blocks of NR rows of C channels, vectorized across channels."""
    A, C = x2.shape
    xf, yf = x2.reshape(-1), y2.reshape(-1)
    for t in prange((A + NR - 1) // NR):
        lo, hi = _rows_block(t, NR, A, C)
        _block_normalize(xf[lo:hi], yf[lo:hi], mean, scale, beta, relu)


@njit(cache=True, error_model="numpy")
def _seg_dx(gs, xs, dxs, m, sc, be, a1, a2, a3, relu):
    zero = type(m)(0)
    if relu:
        for i in range(xs.size):
            xm = xs[i] - m
            z = xm * sc + be
            g = zero if z <= zero else gs[i]
            dxs[i] = a1 * (g + a2 * xm + a3)
    else:
        for i in range(xs.size):
            dxs[i] = a1 * (gs[i] + a2 * (xs[i] - m) + a3)


@njit(parallel=True, cache=True, error_model="numpy")
def _dx_rows(dy3, x3, mean, scale, beta, k1, k2, k3, relu, dx3, NB):
    A, C, B = x3.shape
    for t in prange(A * C * NB):
        a, c, b0, b1 = _row_piece(t, NB, C, B)
        _seg_dx(dy3[a, c, b0:b1], x3[a, c, b0:b1], dx3[a, c, b0:b1], mean[c], scale[c], beta[c],
                k1[c], k2[c], k3[c], relu)


@njit(cache=True, error_model="numpy")
def _block_dx(gs, xs, dxs, m, sc, be, a1, a2, a3, relu):
    """Whole rows of C = m.size channels: dx = a1 (g + a2 (x - m) + a3)."""
    C = m.size
    zero = type(m[0])(0)
    if relu:
        for r in range(xs.size // C):
            o = r * C
            for i in range(C):
                xm = xs[o + i] - m[i]
                z = xm * sc[i] + be[i]
                g = zero if z <= zero else gs[o + i]
                dxs[o + i] = a1[i] * (g + a2[i] * xm + a3[i])
    else:
        for r in range(xs.size // C):
            o = r * C
            for i in range(C):
                dxs[o + i] = a1[i] * (gs[o + i] + a2[i] * (xs[o + i] - m[i]) + a3[i])


@njit(parallel=True, cache=True, error_model="numpy")
def _dx_cols(dy2, x2, mean, scale, beta, k1, k2, k3, relu, dx2, NR):
    A, C = x2.shape
    gf, xf, df = dy2.reshape(-1), x2.reshape(-1), dx2.reshape(-1)
    for t in prange((A + NR - 1) // NR):
        lo, hi = _rows_block(t, NR, A, C)
        _block_dx(gf[lo:hi], xf[lo:hi], df[lo:hi], mean, scale, beta, k1, k2, k3, relu)


# The drivers are jitted too: one dispatch per op instead of four, and no NumPy calls from
# Python (measured: 15 -> 4 us a call; a (256, 1024) batch norm takes ~250 us in all).


@njit(inline="always", cache=True)
def _cpu_pieces(n_outer, per_outer, min_piece, threads):
    """Slices per channel (or per column tile) so that there are a few pieces per thread,
    none smaller than min_piece values."""
    wanted = -(-4 * threads // max(n_outer, 1))
    return max(1, min(wanted, per_outer // min_piece))


@njit(inline="always", cache=True)
def _row_pieces(rows, B, threads):
    """Pieces per row for the elementwise passes: 1 unless there are too few rows."""
    if rows >= 4 * threads:
        return 1
    return max(1, min(-(-4 * threads // max(rows, 1)), B // 4096))


@njit(inline="always", cache=True)
def _block_rows(C):
    """Rows per block of the channels-last elementwise passes: about 16K values."""
    return max(1, (1 << 14) // max(C, 1))


@njit(cache=True, error_model="numpy")
def _cpu_plan(A, C, B, threads):
    """(S, strides, Bc) of a CPU reduction over (A, C, B): the rows shape (B >= CPU_ROWS_MIN)
    has S slices per channel, partial c*S + s (strides (S, 1, 0), Bc = 1); the columns shape
    S row slices of K = C*B columns, partial s*K + c*B + j (strides (B, K, 1), Bc = B).
    Either way S * C * Bc partials."""
    sp = np.zeros(3, np.int64)
    if B >= CPU_ROWS_MIN:
        S = _cpu_pieces(C, A * B, 1 << 15, threads)
        sp[0] = S
        sp[1] = 1
        return S, sp, 1
    K = C * B
    S = _cpu_pieces((K + COL_TILE - 1) // COL_TILE, A, ROW_BLOCK, threads)
    sp[0] = B
    sp[1] = K
    sp[2] = 1
    return S, sp, B


@njit(cache=True, error_model="numpy")
def _cpu_forward_driver(x3, w, b, rm, rv, mean, invstd, y3, use_batch, update, factor, eps,
                        relu, threads):
    """The whole CPU forward for B > 1 (B = 1: _cpu_forward_flat): partial statistics
    (rows or columns), finalize, normalize. w, b, rm, rv may be empty (absent)."""
    A, C, B = x3.shape
    S, sm, Bc = _cpu_plan(A, C, B, threads)
    pmu = np.empty(S * C * Bc if use_batch else 0)
    pm2 = np.empty(pmu.size)
    if use_batch:
        if B >= CPU_ROWS_MIN:
            stats_rows(x3, S, pmu, pm2)
        else:
            K = C * B
            stats_cols(x3.reshape(A, K), S, pmu.reshape(S, K), pm2.reshape(S, K))
    total = A * B if B >= CPU_ROWS_MIN else A  # values (rows) or rows (columns) per channel
    scale = np.empty(C, x3.dtype)
    beta = np.empty(C, x3.dtype)
    finalize_forward(S, total, pmu, pm2, sm, Bc, float(A * B), w, b, rm, rv, mean, invstd,
                      scale, beta, use_batch, update, factor, eps)
    if x3.size:
        _normalize_rows(x3, mean, scale, beta, y3, relu, _row_pieces(A * C, B, threads))


@njit(cache=True, error_model="numpy")
def _cpu_forward_flat(x2, w, b, rm, rv, mean, invstd, y2, use_batch, update, factor, eps,
                      relu, threads):
    """The CPU forward of (A, C) data (B = 1: BatchNorm1d, channels last): columns
    statistics, finalize, normalize by blocks of rows. A driver of its own, so that such a
    job compiles none of the rows kernels."""
    A, C = x2.shape
    S, sm, Bc = _cpu_plan(A, C, 1, threads)
    pmu = np.empty(S * C if use_batch else 0)
    pm2 = np.empty(pmu.size)
    if use_batch:
        stats_cols(x2, S, pmu.reshape(S, C), pm2.reshape(S, C))
    scale = np.empty(C, x2.dtype)
    beta = np.empty(C, x2.dtype)
    finalize_forward(S, A, pmu, pm2, sm, Bc, float(A), w, b, rm, rv, mean, invstd, scale,
                      beta, use_batch, update, factor, eps)
    if x2.size:
        _normalize_cols(x2, mean, scale, beta, y2, relu, _block_rows(C))


@njit(cache=True, error_model="numpy")
def _cpu_backward_driver(dy3, x3, mean, invstd, w, b, dx3, dw, db, training, relu, threads):
    """The whole CPU backward for B > 1 (B = 1: _cpu_backward_flat): partial sums (rows or
    columns), finalize, dx. w, b may be empty (absent)."""
    A, C, B = x3.shape
    scale = invstd * w if w.size > 0 else invstd.copy()
    beta = b.copy() if b.size > 0 else np.zeros(C, x3.dtype)
    S, sp, Bc = _cpu_plan(A, C, B, threads)
    pa = np.empty(S * C * Bc)
    pb = np.empty(pa.size)
    if B >= CPU_ROWS_MIN:
        grad_rows(dy3, x3, mean, scale, beta, relu, S, pa, pb)
    else:
        K = C * B
        grad_cols(dy3.reshape(A, K), x3.reshape(A, K), np.repeat(mean, B), np.repeat(scale, B),
                   np.repeat(beta, B), relu, S, pa.reshape(S, K), pb.reshape(S, K))
    k1 = np.empty(C, x3.dtype)
    k2 = np.empty(C, x3.dtype)
    k3 = np.empty(C, x3.dtype)
    finalize_backward(pa, pb, sp, S, Bc, float(A * B), invstd, w, training, dw, db, k1, k2, k3)
    if x3.size:
        _dx_rows(dy3, x3, mean, scale, beta, k1, k2, k3, relu, dx3,
                 _row_pieces(A * C, B, threads))


@njit(cache=True, error_model="numpy")
def _cpu_backward_flat(dy2, x2, mean, invstd, w, b, dx2, dw, db, training, relu, threads):
    """The CPU backward of (A, C) data (B = 1; see _cpu_forward_flat): columns sums,
    finalize, dx by blocks of rows."""
    A, C = x2.shape
    scale = invstd * w if w.size > 0 else invstd.copy()
    beta = b.copy() if b.size > 0 else np.zeros(C, x2.dtype)
    S, sp, Bc = _cpu_plan(A, C, 1, threads)
    pa = np.empty(S * C)
    pb = np.empty(pa.size)
    grad_cols(dy2, x2, mean, scale, beta, relu, S, pa.reshape(S, C), pb.reshape(S, C))
    k1 = np.empty(C, x2.dtype)
    k2 = np.empty(C, x2.dtype)
    k3 = np.empty(C, x2.dtype)
    finalize_backward(pa, pb, sp, S, Bc, float(A), invstd, w, training, dw, db, k1, k2, k3)
    if x2.size:
        _dx_cols(dy2, x2, mean, scale, beta, k1, k2, k3, relu, dx2, _block_rows(C))


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0)}


def cpu_forward(x3, w, b, rm, rv, mean, invstd, y3, use_batch, update, factor, eps, relu):
    e = _EMPTY[x3.dtype]
    if not update and rm is not None and not (rm.flags.writeable and rv.flags.writeable):
        rm, rv = rm.copy(), rv.copy()  # only read, but the kernel is typed for writing them
    if x3.shape[2] == 1:
        A, C = x3.shape[:2]
        x3, y3, driver = x3.reshape(A, C), y3.reshape(A, C), _cpu_forward_flat
    else:
        driver = _cpu_forward_driver
    host_kernel(driver, x3.size)(x3, _or(w, e), _or(b, e), _or(rm, e), _or(rv, e), mean, invstd,
                                 y3, use_batch, update, float(factor), float(eps), relu,
                                 host_thread_count(x3.size))


def cpu_backward(dy3, x3, mean, invstd, w, b, dx3, dw, db, training, relu):
    e = _EMPTY[x3.dtype]
    if x3.shape[2] == 1:
        A, C = x3.shape[:2]
        dy3, x3, dx3 = dy3.reshape(A, C), x3.reshape(A, C), dx3.reshape(A, C)
        driver = _cpu_backward_flat
    else:
        driver = _cpu_backward_driver
    host_kernel(driver, x3.size)(dy3, x3, mean, invstd, _or(w, e), _or(b, e), dx3, dw, db,
                                 training, relu, host_thread_count(x3.size))


def _or(a, default):
    return default if a is None else a
