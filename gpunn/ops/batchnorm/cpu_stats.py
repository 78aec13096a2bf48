r"""Batch normalization, forward and backward, and batch normalization fused with ReLU.

x is seen as (A, C, B), C-contiguous: channels on axis 1 (NCHW: A = N, B = H*W*...) or, with
``channels_last=True``, on the last axis (NHWC: A = N*H*W*..., B = 1). Per channel c, over
its n = A*B values (a (N, C) input is the B = 1 case of either layout):

    training forward   mean_c = sum x / n,  var_c = sum (x - mean_c)^2 / n   (biased)
                       invstd_c = 1 / sqrt(var_c + eps)
                       y = (x - mean_c) * (w_c * invstd_c) + b_c
                       running_mean <- (1 - f) running_mean + f mean_c
                       running_var  <- (1 - f) running_var  + f var_c * n / (n - 1)  (unbiased)
                       with f = momentum, or 1 / num_batches_tracked when momentum is None
                       (cumulative average, as torch.nn.BatchNorm: the caller passes the number
                       of batches seen, this one included)
    eval forward       the same y with mean = running_mean, invstd = 1/sqrt(running_var + eps)
    backward           xhat = (x - mean) * invstd,  g = dy  (BN+ReLU: g = dy where y > 0, else 0)
                       dbias_c = sum g,  dweight_c = sum g * xhat
                       training: dx = w invstd (g - dbias_c / n - xhat dweight_c / n)
                       eval:     dx = w invstd g    (the statistics are constants)

affine=False is weight = bias = None (w = 1, b = 0); track_running_stats=False is
running_mean = running_var = None, which uses the batch statistics in eval mode too (as
torch.nn.BatchNorm does). The forward returns (y, mean, invstd), torch's saved statistics,
never a copy of x; in eval mode they are the running statistics the output used.

The fused BN+ReLU computes y = max(z, 0) with z the batch-norm output (NaN stays NaN). Its
backward RECOMPUTES z from x, mean, invstd, weight and bias (it needs x anyway) instead of
reading a saved y: no extra array is stored or read. The mask is "z > 0" with z computed by the
same arithmetic as the forward of the same backend, and on the GPU z rounded to the storage type
first, so the mask is exactly torch's ``y > 0`` on the stored output (also for float16 values
that round to 0).

Statistics are accurate for data with a large mean (mean 1e4, spread 1 in float32), and with
outliers: the values are never summed raw. Short blocks get their own (mean, M2), and blocks
are combined with Chan's update of (count, mean, M2): on the GPU and in the CPU rows reduction
a block's mean and centered sum of squares take two passes over it (registers, or cache); the
CPU columns reduction sums each block once, shifted by the running mean of the rows before it
(see _stats_cols for why that cannot cancel badly). Running sums are float64 on the CPU,
float32 (float64 for float64 data) on the GPU. No float atomics anywhere: results are the same run to run. (y and dx use the saved
mean, rounded to the compute dtype like torch's: with a mean of 1e4 in float32 that rounding,
up to 5e-4, shows as an absolute error of up to 5e-4 * invstd * |w| in y, below the 1e-3
spacing of the float32 inputs themselves there; mean, invstd and the running statistics stay
at float32 accuracy.)

Memory traffic (what the kernels move; bench/ counts the same): training forward reads x twice
(statistics, then normalize) and writes y: 3 arrays. Eval forward reads x once and writes y: 2.
Training backward reads dy and x twice (the two sums, then dx) and writes dx: 5 arrays; the
single-pass minimum (dy, x, dx) would need the whole batch held on chip. Per-channel partials
and coefficients are O(C * splits), negligible.

Decomposition (CPU and GPU alike): the per-channel reduction is split into many pieces, each
writing partial statistics, which a second, deterministic pass merges per channel; so a
handful of channels still keeps every core busy, and 4096 channels do not overload anything.
Two shapes of the reduction:
  rows     B large (NCHW with a spatial extent): piece = (channel, slice of its A*B values),
           walked along contiguous rows of B.
  columns  B small (channels-last, (N, C), NCHW with tiny spatial): x as (A, K = C*B), piece =
           (slice of the A rows, tile of columns), vectorized across columns; the merge folds
           the B columns of a channel too.
The rows shape is used from B >= CPU_ROWS_MIN (64) on the CPU and B >= GPU_ROWS_MIN (32) on
the GPU. The elementwise passes (normalize, dx) walk rows of B for B > 1 and blocks of whole
channels-last rows for B = 1. One channel is one long row (A, C, B) = (1, 1, n).

Layouts: ``channels_last`` says where the channels are in the array as given (C-contiguous);
it is the same flag for the forward and the backward, and y, dx come back in that layout. A
torch tensor in the channels_last memory format but NCHW shape is not C-contiguous and is
copied first; pass ``x.permute(0, 2, 3, 1)`` (a contiguous view) with channels_last=True to
use it in place.

Dtypes: float32/float64 on the CPU backends, float16/bfloat16/float32/float64 on CUDA (float32
statistics and math for the 16-bit types). weight, bias and the running statistics share one
dtype: x's, or float32 when x is 16-bit (torch's mixed precision). mean and invstd are float32
for 16-bit x, else x's dtype. dweight and dbias come back even when weight is None (they are the
gradients of an implicit weight of ones and bias of zeros), in the dtype of weight (x's when
weight is None).

Errors are raised before anything is written (running statistics included): x with fewer than
2 dimensions, per-channel arrays of the wrong shape (ValueError; torch raises RuntimeError) or
dtype (TypeError), only one of running_mean and running_var, in training a non-contiguous or
read-only running statistic or one sharing memory with another argument, out partly
overlapping an input (out=x is fine), training with one value per channel (ValueError with
torch's message), momentum=None without num_batches_tracked. NaN in x makes its channel's
statistics, running statistics and outputs NaN, as in torch; in BN+ReLU's backward a NaN z
passes dy, as torch's threshold_backward does. An empty batch in training gives NaN mean/invstd and leaves the
running statistics untouched (torch leaves them too).
"""

from __future__ import annotations

import math
import operator
from numbers import Real

import numpy as np
from numba import get_num_threads, njit, prange

from .. import cuda
from ..backend import array_module, check_no_overlap, check_writable, dtype_name, resolve
from ..cpu_jit import threaded

#: NCHW inputs whose spatial extent B is at least this use the rows reduction on the CPU.
CPU_ROWS_MIN = 64
#: ... and on the GPU.
GPU_ROWS_MIN = 32
#: CPU: values per two-pass block of a row (8 KB of float32: the second pass reads L1).
BLOCK = 2048
#: CPU columns reduction: columns per tile and rows per two-pass block.
COL_TILE = 512
ROW_BLOCK = 32

# --- NumPy reference (runs on CuPy arrays too) ------------------------------------------------
# Arrays are (A, C, B) views; per-channel arrays broadcast as [:, None]. Statistics in float64,
# elementwise math in the compute dtype (float32 for 16-bit input), the same formulas as the
# kernels: y = (x - mean) * (invstd * w) + b and dx = k1 * (g + k2 * (x - mean) + k3).


def _compute(xp, a):
    return a.astype(xp.float32) if a.dtype.itemsize < 4 else a


def _numpy_forward(x3, w, b, rm, rv, mean, invstd, y3, use_batch, update, factor, eps, relu):
    xp = array_module(x3)
    xc = _compute(xp, x3)
    cd = xc.dtype
    if use_batch:
        n = x3.shape[0] * x3.shape[2]
        mu = xc.mean(axis=(0, 2), dtype=xp.float64)
        var = xp.square(xc - mu[:, None]).mean(axis=(0, 2))  # two passes: exact for a large mean
        mean[...] = mu
        invstd[...] = 1 / xp.sqrt(var + eps)
        if update:
            rm[...] = (1 - factor) * rm.astype(xp.float64) + factor * mu
            with np.errstate(over="ignore"):  # beyond float32's range: inf, as the kernels
                rv[...] = (1 - factor) * rv.astype(xp.float64) + factor * var * (n / (n - 1))
    else:
        mean[...] = rm
        invstd[...] = 1 / xp.sqrt(rv.astype(xp.float64) + eps)
    scale = invstd.astype(cd) * (w.astype(cd) if w is not None else cd.type(1))
    beta = b.astype(cd) if b is not None else xp.zeros(scale.shape, cd)
    z = (xc - mean.astype(cd)[:, None]) * scale[:, None] + beta[:, None]
    y3[...] = xp.where(z < 0, cd.type(0), z) if relu else z


def _numpy_backward(dy3, x3, mean, invstd, w, b, dx3, dw, db, training, relu):
    xp = array_module(x3)
    xc, gc = _compute(xp, x3), _compute(xp, dy3)
    cd = xc.dtype
    n = x3.shape[0] * x3.shape[2]
    m = mean.astype(cd)
    scale = invstd.astype(cd) * (w.astype(cd) if w is not None else cd.type(1))
    xmu = xc - m[:, None]
    if relu:
        beta = b.astype(cd) if b is not None else xp.zeros(scale.shape, cd)
        z = xmu * scale[:, None] + beta[:, None]
        gc = xp.where(z <= 0, cd.type(0), gc)
    sum_g = gc.sum(axis=(0, 2), dtype=xp.float64)
    sum_gx = xp.multiply(gc, xmu, dtype=xp.float64).sum(axis=(0, 2))  # float32 products overflow
    inv = invstd.astype(xp.float64)
    db[...] = sum_g
    dw[...] = sum_gx * inv
    k1 = (w.astype(xp.float64) if w is not None else 1.0) * inv
    if training:
        k2 = -inv * inv * sum_gx / n
        k3 = -sum_g / n
        dx3[...] = k1.astype(cd)[:, None] * (gc + k2.astype(cd)[:, None] * xmu
                                             + k3.astype(cd)[:, None])
    else:
        dx3[...] = k1.astype(cd)[:, None] * gc


# --- Numba CPU kernels ------------------------------------------------------------------------
# Inner loops take 1-D slices as arguments of functions of their own, so LLVM vectorizes them
# (softmax.py measured the same). Only the pure sums carry fastmath (reassoc): the ReLU mask and
# every normalized value are computed without it, so the forward, the backward and the NumPy
# reference round z alike and agree on its sign.
#
# Numba's float() keeps a float32 a float32: np.float64() widens.
#
# Overflow: a block's sums are in the data's dtype, and for float32 data of magnitude ~1e18 and
# beyond its squares (or its products g * (x - mean)) overflow. A block whose float32 sums
# come out inf or NaN is summed again in float64 (a check per block, not per value: finite
# sums mean no value overflowed); so the statistics of any finite data are finite, and data
# holding inf or NaN still gives NaN. The dx coefficients keep (x - mean) * invstd^2 from
# underflowing: dx = k1 * (g + k2 (x - mean) + k3), k2 = -invstd^2 sum(g (x - mean)) / n ~ 1/std.


@njit(inline="always", cache=True)
def _merge(n, mu, m2, nb, mub, m2b):
    """Chan's update: (n, mu, m2) of a set, combined with (nb, mub, m2b) of another."""
    if nb == 0.0:
        return n, mu, m2
    if n == 0.0:
        return nb, mub, m2b
    t = n + nb
    delta = mub - mu
    wb = nb / t
    return t, mu + delta * wb, m2 + m2b + delta * delta * n * wb


@njit(fastmath={"reassoc", "nsz"}, cache=True, error_model="numpy")
def _block_moments(seg):
    """(n, mean, M2) of a short block in float64, by two passes over it in its dtype: its
    rounded mean m, then the sums of e = x - m and e^2, corrected by (sum e)^2 / n. M2 is
    inf or NaN where a float32 sum overflowed (see _block_moments64)."""
    s = type(seg[0])(0)
    for i in range(seg.size):
        s += seg[i]
    m = s / type(s)(seg.size)
    d = type(s)(0)
    q = type(s)(0)
    for i in range(seg.size):
        e = seg[i] - m
        d += e
        q += e * e
    nf = float(seg.size)
    dd = np.float64(d)
    m2 = np.float64(q) - dd * dd / nf
    return nf, np.float64(m) + dd / nf, m2 if m2 > 0.0 else m2 * 0.0  # keeps NaN, drops -0 rounding


@njit(fastmath={"reassoc", "nsz"}, cache=True, error_model="numpy")
def _block_moments64(seg):
    """_block_moments with every sum in float64: for a block whose float32 sums overflowed."""
    s = 0.0
    for i in range(seg.size):
        s += np.float64(seg[i])
    m = s / seg.size
    q = 0.0
    for i in range(seg.size):
        e = np.float64(seg[i]) - m
        q += e * e
    return float(seg.size), m, q


@njit(cache=True, error_model="numpy")
def _count_nonfinite(a):
    """How many values of a are inf or NaN (a - a is exactly 0 for the others; vectorizes)."""
    n = 0
    for i in range(a.size):
        n += (a[i] - a[i]) != 0
    return n


# Where each parallel piece works (the same split for the statistics, the gradient sums and the
# elementwise passes of a layout):


@njit(inline="always", cache=True)
def _row_slice(t, S, L):
    """Piece t = c*S + s of a rows reduction: (c, j, j1), the s-th of S slices
    [s*L // S, (s+1)*L // S) of channel c's L = A*B values in flat (a, b) order."""
    c = t // S
    s = t - c * S
    return c, s * L // S, (s + 1) * L // S


@njit(inline="always", cache=True)
def _row_segment(j, j1, B):
    """(a, b0, b1): the part [b0, b1) of row a that flat values [j, j1) start with."""
    a = j // B
    b0 = j - a * B
    return a, b0, min(B, b0 + (j1 - j))


@njit(inline="always", cache=True)
def _col_piece(t, T, S, A, K):
    """Piece t = s*T + tile of a columns reduction over (A, K): (s, k0, k1, a0, a1), the
    columns [k0, k1) of the tile (COL_TILE wide) and the rows [a0, a1), the s-th of S slices."""
    s = t // T
    k0 = (t - s * T) * COL_TILE
    return s, k0, min(K, k0 + COL_TILE), s * A // S, (s + 1) * A // S


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


@njit(parallel=True, cache=True, error_model="numpy")
def _stats_rows(x3, S, pmu, pm2):
    """Partial (mean, M2) of piece t = c*S + s: the s-th of S slices of channel c's L = A*B
    values, [s*L // S, (s+1)*L // S) in flat (a, b) order, walked row segment by row segment,
    BLOCK values at a time."""
    A, C, B = x3.shape
    for t in prange(C * S):
        c, j, j1 = _row_slice(t, S, A * B)
        n, mu, m2 = 0.0, 0.0, 0.0
        while j < j1:
            a, b0, b1 = _row_segment(j, j1, B)
            row = x3[a, c]
            for k in range(b0, b1, BLOCK):
                seg = row[k:min(k + BLOCK, b1)]
                bn, bmu, bm2 = _block_moments(seg)
                if not math.isfinite(bm2):
                    bn, bmu, bm2 = _block_moments64(seg)
                n, mu, m2 = _merge(n, mu, m2, bn, bmu, bm2)
            j += b1 - b0
        pmu[t] = mu
        pm2[t] = m2


# The columns kernels hand their helpers a 1-D slice from a block's first value to its last
# (rows of K, of which a tile uses w); the helpers take each row as a slice of its own:
# measured 3.6x faster than indexing xs[r*K + i] (which LLVM did not vectorize) and 1.6x
# faster than a call per row for C = 64 channels last.


@njit(cache=True, error_model="numpy")
def _cols_shifted(d, q, xs, shift, K):
    """d[i] += e, q[i] += e^2 with e = xs[r*K + i] - shift[i], over the rows r of the block xs
    (xs ends at the last row's d.size-th value); in float64 when shift is float64."""
    w = d.size
    for r in range((xs.size - w) // K + 1):
        row = xs[r * K:r * K + w]
        for i in range(w):
            e = row[i] - shift[i]
            d[i] += e
            q[i] += e * e


@njit(cache=True, error_model="numpy")
def _set_shift(shift, mu, first_row, first):
    """The block's shift: its first row for the first block, else the running mean. Loops,
    not ``shift[:] = first_row``: a slice assignment compiles Numba's shape-mismatch error
    message (unicode formatting), ~4 s of CPU on a cold cache."""
    if first:
        for i in range(shift.size):
            shift[i] = first_row[i]
    else:
        for i in range(shift.size):
            shift[i] = mu[i]


@njit(cache=True, error_model="numpy")
def _merge_columns(n, mu, m2, g, bm, bd, bq):
    """Chan's update of each column's float64 (mu, m2), over n rows so far, with a block of g
    rows given by its sums bd, bq of e and e^2, e = x - bm: block mean bm + bd/g, block M2
    bq - bd^2/g. The weights are the same for every column: no division in the loop."""
    inv_g = 1.0 / g
    wb = g / (n + g)
    nwb = n * wb
    for i in range(mu.size):
        dd = np.float64(bd[i])
        gm = np.float64(bm[i]) + dd * inv_g
        gq = np.float64(bq[i]) - dd * dd * inv_g
        delta = gm - mu[i]
        mu[i] += delta * wb
        m2[i] += gq + delta * delta * nwb


@njit(parallel=True, cache=True, error_model="numpy")
def _stats_cols(x2, S, pmu, pm2):
    """Partial (mean, M2) of every column of x2 (A, K) over the s-th of S slices of its rows,
    [s*A // S, (s+1)*A // S): pmu[s, k], pm2[s, k]. Pieces are (row slice, tile of COL_TILE
    columns), blocks of ROW_BLOCK rows, vectorized across columns. A block is one pass of sums
    shifted by the running mean of the rows before it (the first block: by its first row),
    then Chan's update in float64. The cancellation in M2 = sum e^2 - (sum e)^2 / g is at most
    a factor g = ROW_BLOCK even for a first row far out (a value lies within sqrt(g - 1)
    standard deviations of the mean of its g-value block), and ~1 later (the shift is the mean
    of the rows so far); measured: var of mean-1e4 float32 data to 1e-7, as the two-pass."""
    A, K = x2.shape
    xf = x2.reshape(-1)
    T = (K + COL_TILE - 1) // COL_TILE
    for t in prange(S * T):
        s, k0, k1, a0, a1 = _col_piece(t, T, S, A, K)
        mu = np.zeros(k1 - k0)
        m2 = np.zeros(k1 - k0)
        shift = np.empty(k1 - k0, x2.dtype)
        bd = np.empty(k1 - k0, x2.dtype)
        bq = np.empty(k1 - k0, x2.dtype)
        n = 0.0
        for ab in range(a0, a1, ROW_BLOCK):
            ae = min(ab + ROW_BLOCK, a1)
            block = xf[ab * K + k0:(ae - 1) * K + k1]
            _set_shift(shift, mu, block[:k1 - k0], ab == a0)
            bd[:] = 0
            bq[:] = 0
            _cols_shifted(bd, bq, block, shift, K)
            if _count_nonfinite(bq) == 0:
                _merge_columns(n, mu, m2, float(ae - ab), shift, bd, bq)
            else:  # a float32 sum overflowed (or x holds inf/NaN): the block again in float64
                shift64 = block[:k1 - k0].astype(np.float64) if ab == a0 else mu.copy()
                bd64 = np.zeros(k1 - k0)
                bq64 = np.zeros(k1 - k0)
                _cols_shifted(bd64, bq64, block, shift64, K)
                _merge_columns(n, mu, m2, float(ae - ab), shift64, bd64, bq64)
            n += ae - ab
        for i in range(k1 - k0):  # not pmu[s, k0:k1] = mu: see _set_shift
            pmu[s, k0 + i] = mu[i]
            pm2[s, k0 + i] = m2[i]


@njit(cache=True, error_model="numpy")
def _merge_item(mu, m2, pmu, pm2, base, stride, wb, nwb):
    """Chan's update of every channel's (mu, m2) with one partial each (index base + c*stride),
    all of the same count: weights wb = count / (n + count) and nwb = n * wb."""
    for c in range(mu.size):
        i = base + c * stride
        delta = pmu[i] - mu[c]
        mu[c] += delta * wb
        m2[c] += pm2[i] + delta * delta * nwb


@njit(cache=True, error_model="numpy")
def _finalize_forward(S, total, pmu, pm2, sm, Bc, count, w, b, rm, rv, mean, invstd, scale, beta,
                      use_batch, update, factor, eps):
    """Per channel: merge its partials, items (s, j) for s < S, j < Bc at index
    c*sm[0] + s*sm[1] + j*sm[2], item (s, j) of the s-th of S slices of ``total`` rows or
    values (the same counts for every channel, so the merge runs across channels with scalar
    weights); or take the running statistics. Writes mean, invstd, the normalize coefficients
    scale = invstd * w and beta = b, and updates the running statistics. w, b, rm, rv may be
    empty (absent)."""
    C = mean.size
    mu = np.zeros(C)
    m2 = np.zeros(C)
    if use_batch:
        n = 0.0
        for s in range(S):
            g = float((s + 1) * total // S - s * total // S)
            if g == 0.0:
                continue
            for j in range(Bc):
                wb = g / (n + g)
                _merge_item(mu, m2, pmu, pm2, s * sm[1] + j * sm[2], sm[0], wb, n * wb)
                n += g
    for c in range(C):
        if use_batch:
            istd = 1.0 / math.sqrt(m2[c] / count + eps)
            if update:
                rm[c] = (1.0 - factor) * rm[c] + factor * mu[c]
                rv[c] = (1.0 - factor) * rv[c] + factor * (m2[c] / (count - 1.0))
            mean[c] = mu[c]
        else:
            istd = 1.0 / math.sqrt(float(rv[c]) + eps)
            mean[c] = rm[c]
        invstd[c] = istd
        scale[c] = invstd[c] * w[c] if w.size > 0 else invstd[c]
        beta[c] = b[c] if b.size > 0 else 0


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
def _seg_mask(gs, xs, m, sc, be, out):
    """out = g where z = (x - m) * sc + be > 0, else 0 (z as the forward computes it)."""
    zero = type(m)(0)
    for i in range(xs.size):
        z = (xs[i] - m) * sc + be
        out[i] = zero if z <= zero else gs[i]


@njit(fastmath={"reassoc", "nsz"}, cache=True, error_model="numpy")
def _block_grad_sums(gs, xs, m):
    """(sum g, sum g * (x - m)) of a short block, in its dtype."""
    sa = type(m)(0)
    sb = type(m)(0)
    for i in range(xs.size):
        sa += gs[i]
        sb += gs[i] * (xs[i] - m)
    return np.float64(sa), np.float64(sb)


@njit(fastmath={"reassoc", "nsz"}, cache=True, error_model="numpy")
def _block_grad_sums64(gs, xs, m):
    """_block_grad_sums in float64: for a block whose float32 sums overflowed."""
    sa = 0.0
    sb = 0.0
    for i in range(xs.size):
        sa += np.float64(gs[i])
        sb += np.float64(gs[i]) * (np.float64(xs[i]) - np.float64(m))
    return sa, sb


@njit(parallel=True, cache=True, error_model="numpy")
def _grad_rows(dy3, x3, mean, scale, beta, relu, S, pa, pb):
    """Partial sums of g and g * (x - mean) of piece t = c*S + s (as _stats_rows)."""
    A, C, B = x3.shape
    for t in prange(C * S):
        c, j, j1 = _row_slice(t, S, A * B)
        m, sc, be = mean[c], scale[c], beta[c]
        g = np.empty(BLOCK if relu else 0, x3.dtype)
        sa, sb = 0.0, 0.0
        while j < j1:
            a, b0, b1 = _row_segment(j, j1, B)
            xr, gr = x3[a, c], dy3[a, c]
            for k in range(b0, b1, BLOCK):
                k1 = min(k + BLOCK, b1)
                if relu:
                    gk = g[:k1 - k]
                    _seg_mask(gr[k:k1], xr[k:k1], m, sc, be, gk)
                else:
                    gk = gr[k:k1]
                ba, bb = _block_grad_sums(gk, xr[k:k1], m)
                if not (math.isfinite(ba) and math.isfinite(bb)):
                    ba, bb = _block_grad_sums64(gk, xr[k:k1], m)
                sa += ba
                sb += bb
            j += b1 - b0
        pa[t] = sa
        pb[t] = sb


@njit(cache=True, error_model="numpy")
def _cols_grad(sa, sb, gs, xs, m, sc, be, K, relu):
    """sa[i] += g, sb[i] += g * (x - m[i]) over the rows of the block (as _cols_shifted); g = dy,
    or 0 where the recomputed z <= 0 (BN + ReLU). The sums and products are in sa's dtype."""
    w = sa.size
    zero = type(m[0])(0)
    S = type(sa[0])
    if relu:
        for r in range((xs.size - w) // K + 1):
            xr, gr = xs[r * K:r * K + w], gs[r * K:r * K + w]
            for i in range(w):
                xm = xr[i] - m[i]
                z = xm * sc[i] + be[i]
                g = zero if z <= zero else gr[i]
                sa[i] += g
                sb[i] += S(g) * xm
    else:
        for r in range((xs.size - w) // K + 1):
            xr, gr = xs[r * K:r * K + w], gs[r * K:r * K + w]
            for i in range(w):
                sa[i] += gr[i]
                sb[i] += S(gr[i]) * (xr[i] - m[i])


@njit(cache=True, error_model="numpy")
def _add_float64(acc, part):
    for i in range(acc.size):
        acc[i] += part[i]


@njit(parallel=True, cache=True, error_model="numpy")
def _grad_cols(dy2, x2, meank, scalek, betak, relu, S, pa, pb):
    """Partial sums of g and g * (x - mean) of every column of (A, K) over the s-th of S row
    slices (as _stats_cols); meank, scalek, betak are per column. Blocks of ROW_BLOCK rows are
    summed in the dtype, the blocks in float64."""
    A, K = x2.shape
    xf, gf = x2.reshape(-1), dy2.reshape(-1)
    T = (K + COL_TILE - 1) // COL_TILE
    for t in prange(S * T):
        s, k0, k1, a0, a1 = _col_piece(t, T, S, A, K)
        ta = np.zeros(k1 - k0)
        tb = np.zeros(k1 - k0)
        ba = np.empty(k1 - k0, x2.dtype)
        bb = np.empty(k1 - k0, x2.dtype)
        m, sc, be = meank[k0:k1], scalek[k0:k1], betak[k0:k1]
        for ab in range(a0, a1, ROW_BLOCK):
            lo = ab * K + k0
            hi = (min(ab + ROW_BLOCK, a1) - 1) * K + k1
            ba[:] = 0
            bb[:] = 0
            _cols_grad(ba, bb, gf[lo:hi], xf[lo:hi], m, sc, be, K, relu)
            if _count_nonfinite(ba) + _count_nonfinite(bb) == 0:
                _add_float64(ta, ba)
                _add_float64(tb, bb)
            else:  # a float32 sum overflowed (or the data holds inf/NaN): again in float64
                _cols_grad(ta, tb, gf[lo:hi], xf[lo:hi], m, sc, be, K, relu)
        for i in range(k1 - k0):  # not pa[s, k0:k1] = ta: see _set_shift
            pa[s, k0 + i] = ta[i]
            pb[s, k0 + i] = tb[i]


@njit(cache=True, error_model="numpy")
def _finalize_backward(pa, pb, sp, S, Bc, count, invstd, w, training, dw, db, k1, k2, k3):
    """Per channel: the sums over its S*Bc partials (index c*sp[0] + s*sp[1] + j*sp[2]),
    dbias, dweight and the dx coefficients dx = k1 (g + k2 (x - mean) + k3)."""
    for c in range(invstd.size):
        sa, sb = 0.0, 0.0
        for s in range(S):
            for j in range(Bc):
                i = c * sp[0] + s * sp[1] + j * sp[2]
                sa += pa[i]
                sb += pb[i]
        istd = np.float64(invstd[c])
        db[c] = sa
        dw[c] = sb * istd
        kk = (np.float64(w[c]) if w.size > 0 else 1.0) * istd
        k1[c] = kk
        k2[c] = -istd * istd * sb / count if training else 0.0
        k3[c] = -sa / count if training else 0.0


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
            _stats_rows(x3, S, pmu, pm2)
        else:
            K = C * B
            _stats_cols(x3.reshape(A, K), S, pmu.reshape(S, K), pm2.reshape(S, K))
    total = A * B if B >= CPU_ROWS_MIN else A  # values (rows) or rows (columns) per channel
    scale = np.empty(C, x3.dtype)
    beta = np.empty(C, x3.dtype)
    _finalize_forward(S, total, pmu, pm2, sm, Bc, float(A * B), w, b, rm, rv, mean, invstd,
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
        _stats_cols(x2, S, pmu.reshape(S, C), pm2.reshape(S, C))
    scale = np.empty(C, x2.dtype)
    beta = np.empty(C, x2.dtype)
    _finalize_forward(S, A, pmu, pm2, sm, Bc, float(A), w, b, rm, rv, mean, invstd, scale,
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
        _grad_rows(dy3, x3, mean, scale, beta, relu, S, pa, pb)
    else:
        K = C * B
        _grad_cols(dy3.reshape(A, K), x3.reshape(A, K), np.repeat(mean, B), np.repeat(scale, B),
                   np.repeat(beta, B), relu, S, pa.reshape(S, K), pb.reshape(S, K))
    k1 = np.empty(C, x3.dtype)
    k2 = np.empty(C, x3.dtype)
    k3 = np.empty(C, x3.dtype)
    _finalize_backward(pa, pb, sp, S, Bc, float(A * B), invstd, w, training, dw, db, k1, k2, k3)
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
    _grad_cols(dy2, x2, mean, scale, beta, relu, S, pa.reshape(S, C), pb.reshape(S, C))
    k1 = np.empty(C, x2.dtype)
    k2 = np.empty(C, x2.dtype)
    k3 = np.empty(C, x2.dtype)
    _finalize_backward(pa, pb, sp, S, Bc, float(A), invstd, w, training, dw, db, k1, k2, k3)
    if x2.size:
        _dx_cols(dy2, x2, mean, scale, beta, k1, k2, k3, relu, dx2, _block_rows(C))


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0)}


def _cpu_forward(x3, w, b, rm, rv, mean, invstd, y3, use_batch, update, factor, eps, relu):
    e = _EMPTY[x3.dtype]
    if not update and rm is not None and not (rm.flags.writeable and rv.flags.writeable):
        rm, rv = rm.copy(), rv.copy()  # only read, but the kernel is typed for writing them
    threads = get_num_threads()
    if x3.shape[2] == 1:
        A, C = x3.shape[:2]
        x3, y3, driver = x3.reshape(A, C), y3.reshape(A, C), _cpu_forward_flat
    else:
        driver = _cpu_forward_driver
    threaded(driver)(x3, _or(w, e), _or(b, e), _or(rm, e), _or(rv, e), mean, invstd, y3,
                     use_batch, update, float(factor), float(eps), relu, threads)


def _cpu_backward(dy3, x3, mean, invstd, w, b, dx3, dw, db, training, relu):
    e = _EMPTY[x3.dtype]
    if x3.shape[2] == 1:
        A, C = x3.shape[:2]
        dy3, x3, dx3 = dy3.reshape(A, C), x3.reshape(A, C), dx3.reshape(A, C)
        driver = _cpu_backward_flat
    else:
        driver = _cpu_backward_driver
    threaded(driver)(dy3, x3, mean, invstd, _or(w, e), _or(b, e), dx3, dw, db, training, relu,
                     get_num_threads())


def _or(a, default):
    return default if a is None else a


# --- CUDA launcher: kernels/batchnorm.cu ------------------------------------------------------

THREADS = 256  # every kernel's block size (BN_THREADS in the .cu)
UNROLL = 4  # vectors a thread loads at once in the reductions (BN_UNROLL)
#: Least values per channel slice of a GPU reduction block (fewer: more blocks than work).
GPU_MIN_PIECE = 2048


def _vec_width(dtype) -> int:
    """Elements in 16 bytes (Vec<T>::N)."""
    return 16 // np.dtype(dtype).itemsize


#: Elements per 16-byte vector (Vec<T>::N), by dtype.
VEC_N = {"float16": 8, "bfloat16": 8, "float32": 4, "float64": 2}
KERNELS = cuda.Family("batchnorm", [
    expr for dt, ctype in cuda.CTYPES.items() for expr in (
        *(f"gpunn::bn_reduce_{shape}<{ctype}, {v}, {bwd}>"
          for shape in ("rows", "cols") for v in (1, VEC_N[dt]) for bwd in ("false", "true")),
        *(f"gpunn::bn_{kind}_{shape}<{ctype}, {v}>"
          for kind in ("normalize", "dx") for shape in ("flat", "cols") for v in (1, VEC_N[dt])),
        f"gpunn::bn_finalize_forward<{ctype}>",
        f"gpunn::bn_finalize_backward<{ctype}>")])


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _aligned(*arrays) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _kernel(name: str, x, vec: bool):
    """The compiled instantiation of ``name`` ({ctype}, {v} filled) for x's dtype."""
    v = VEC_N[np.dtype(x.dtype).name] if vec else 1
    return KERNELS.function(name.format(ctype=cuda.ctype(x.dtype), v=v))


_NULL = np.uint64(0)


def _ptr(a):
    return _NULL if a is None else a


def rows_plan(A: int, C: int, B: int, V: int, capacity: int) -> tuple[int, int, int, int]:
    """(s_a, s_b, b_chunk, tpr) of bn_reduce_rows: S = s_a * s_b slices per channel, enough for
    about one wave of ``capacity`` blocks over all channels, none under GPU_MIN_PIECE values;
    rows split first, then columns in chunks of b_chunk (a multiple of V); tpr threads per row,
    the least power of two covering a chunk's vectors (at most a block)."""
    S = max(1, min(-(-capacity // C), -(-(A * B) // GPU_MIN_PIECE)))
    s_a = min(S, A)
    s_b = -(-S // s_a)
    b_chunk = -(-(-(-B // s_b)) // V) * V  # ceil(B / s_b), rounded up to a multiple of V
    s_b = -(-B // b_chunk)
    tpr = min(THREADS, _pow2_at_least(-(-min(B, b_chunk) // V)))
    return s_a, s_b, b_chunk, tpr


def cols_plan(A: int, K: int, V: int, capacity: int, rows_per_thread: int) -> tuple[int, int, int]:
    """(tx, tiles, slices) of the columns kernels: tx threads of V columns across a tile (a
    power of two, at most a warp), THREADS / tx rows at once, row slices (grid y) for about one
    wave, each thread getting at least rows_per_thread rows."""
    tx = min(32, _pow2_at_least(-(-K // V)))
    ty = THREADS // tx
    tiles = -(-K // (tx * V))
    slices = max(1, min(-(-capacity // tiles), -(-A // (ty * rows_per_thread)), 65535))
    return tx, tiles, slices


def _cuda_reduce(kind_bwd: bool, x3, dy3, mean, invstd, w, b, params_f32, relu):
    """Launch the partial-reduction kernel; returns (partials, part_stride, stride_c, stride_s,
    S, Bc): partial f of item (c, s, j) is part[f * part_stride + c*stride_c + s*stride_s + j]."""
    import cupy

    A, C, B = x3.shape
    cdt = cupy.float64 if x3.dtype == np.float64 else cupy.float32
    nvals = 2 if kind_bwd else 3
    bwd = "true" if kind_bwd else "false"
    n_vec = _vec_width(x3.dtype)
    ins = [a for a in (x3, dy3) if a is not None]
    if B >= GPU_ROWS_MIN:
        vec = B % n_vec == 0 and _aligned(*ins)
        V = n_vec if vec else 1
        kernel = _kernel(f"gpunn::bn_reduce_rows<{{ctype}}, {{v}}, {bwd}>", x3, vec)
        s_a, s_b, b_chunk, tpr = rows_plan(A, C, B, V, cuda.grid_for(1 << 40, THREADS, kernel))
        S = s_a * s_b
        part = cupy.empty(nvals * C * S, cdt)
        kernel((C * S,), (THREADS,), (
            x3, _ptr(dy3), _ptr(w), _ptr(b), _ptr(mean), _ptr(invstd), np.int32(params_f32),
            np.int32(relu), part, np.int64(C * S), np.int64(A), np.int64(C), np.int64(B),
            np.int32(s_a), np.int32(s_b), np.int64(b_chunk), np.int32(tpr)))
        return part, C * S, S, 1, S, 1
    K = C * B
    vec = K % n_vec == 0 and _aligned(*ins)
    V = n_vec if vec else 1
    kernel = _kernel(f"gpunn::bn_reduce_cols<{{ctype}}, {{v}}, {bwd}>", x3, vec)
    tx, tiles, S = cols_plan(A, K, V, cuda.grid_for(1 << 40, THREADS, kernel), UNROLL)
    part = cupy.empty(nvals * S * K, cdt)
    kernel((tiles, S), (THREADS,), (
        x3, _ptr(dy3), _ptr(w), _ptr(b), _ptr(mean), _ptr(invstd), np.int32(params_f32),
        np.int32(relu), part, np.int64(S * K), np.int64(A), np.int64(K), np.int64(B),
        np.int32(tx)))
    return part, S * K, B, K, S, B


def _cuda_elementwise(kind: str, arrays, coef, relu):
    """normalize (x, y) or dx (dy, x, dx) over (A, C, B), coefficients per channel."""
    A, C, B = arrays[0].shape
    n_vec = _vec_width(arrays[0].dtype)
    if B == 1:  # channels last: columns = channels, each thread keeps its channels
        vec = C % n_vec == 0 and _aligned(*arrays)
        kernel = _kernel(f"gpunn::bn_{kind}_cols<{{ctype}}, {{v}}>", arrays[0], vec)
        tx, tiles, gy = cols_plan(A, C, n_vec if vec else 1,
                                  cuda.grid_for(1 << 40, THREADS, kernel), 2)
        kernel((tiles, gy), (THREADS,), (*arrays, coef, np.int64(A), np.int64(C), np.int32(tx),
                                         np.int32(relu)))
        return
    vec = B % n_vec == 0 and _aligned(*arrays)
    V = n_vec if vec else 1
    kernel = _kernel(f"gpunn::bn_{kind}_flat<{{ctype}}, {{v}}>", arrays[0], vec)
    nvec = A * C * B // V
    grid = cuda.grid_for(-(-nvec // 2), THREADS, kernel)  # two vectors per thread per step
    kernel((grid,), (THREADS,), (*arrays, coef, np.int64(nvec), np.int64(B // V), np.int64(C),
                                 np.int32(relu)))


def _warps_grid(C: int) -> int:
    return -(-C * 32 // THREADS)


def _cuda_forward(x3, w, b, rm, rv, mean, invstd, y3, use_batch, update, factor, eps, relu):
    import cupy

    A, C, B = x3.shape
    params_f32 = _params_f32(x3, w, b, rm, rv)
    if use_batch:
        part, stride, sc, ss, S, Bc = _cuda_reduce(False, x3, None, None, None, None, None,
                                                   params_f32, False)
    else:
        part, stride, sc, ss, S, Bc = None, 0, 0, 0, 0, 0
    coef = cupy.empty(4 * C, mean.dtype)
    running = update or not use_batch  # read (eval) or updated (training)
    finalize = _kernel("gpunn::bn_finalize_forward<{ctype}>", x3, False)
    finalize((_warps_grid(C),), (THREADS,), (
        _ptr(part), np.int64(stride), np.int64(sc), np.int64(ss), np.int32(S), np.int64(Bc),
        np.int64(C), np.float64(A * B), np.int32(use_batch), mean, invstd, coef,
        _ptr(rm if running else None), _ptr(rv if running else None),
        np.int32(update), _ptr(w), _ptr(b), np.int32(params_f32), np.float64(factor),
        np.float64(eps), x3, np.int64(A), np.int64(B)))
    if x3.size:
        _cuda_elementwise("normalize", (x3, y3), coef, relu)


def _cuda_backward(dy3, x3, mean, invstd, w, b, dx3, dw, db, training, relu):
    import cupy

    A, C, B = x3.shape
    params_f32 = _params_f32(x3, w, b, dw)
    part, stride, sc, ss, S, Bc = _cuda_reduce(True, x3, dy3, mean, invstd, w, b, params_f32,
                                               relu)
    coef = cupy.empty(8 * C, mean.dtype)
    finalize = _kernel("gpunn::bn_finalize_backward<{ctype}>", x3, False)
    finalize((_warps_grid(C),), (THREADS,), (
        part, np.int64(stride), np.int64(sc), np.int64(ss), np.int32(S), np.int64(Bc),
        np.int64(C), np.float64(A * B), np.int32(training), mean, invstd, _ptr(w), _ptr(b),
        np.int32(params_f32), dw, db, coef, dy3, x3, np.int64(A), np.int64(B), np.int32(relu)))
    if x3.size:
        _cuda_elementwise("dx", (dy3, x3, dx3), coef, relu)


def _params_f32(x, *params) -> int:
    """1 when the per-channel arrays are float32 beside 16-bit x (their storage type)."""
    if x.dtype.itemsize != 2:
        return 0
    return int(any(p is not None and p.dtype == np.float32 for p in params))


IMPLS = {
    "numpy": (_numpy_forward, _numpy_backward),
    "cpu": (_cpu_forward, _cpu_backward),
    "cuda": (_cuda_forward, _cuda_backward),
}

# --- Argument checks and the call path --------------------------------------------------------


def _layout(shape, channels_last: bool) -> tuple[int, int, int]:
    """(A, C, B) of the C-contiguous view; one channel collapses to (1, 1, n): one long row."""
    if channels_last:
        A, C, B = math.prod(shape[:-1]), shape[-1], 1
    else:
        A, C, B = shape[0], shape[1], math.prod(shape[2:])
    if C == 1:
        A, B = 1, A * B
    return A, C, B


def _real(op, name, value):
    if type(value) is float:  # the common case, without the ABC check (~2 us)
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: {name} must be a real number, got {value!r}")
    return float(value)


def _channels(op, x, channels_last):
    if x.ndim < 2:
        raise ValueError(f"{op}: x must have at least 2 dimensions ((N, C, ...) or, channels "
                         f"last, (N, ..., C)), got shape {tuple(x.shape)}")
    return int(x.shape[-1] if channels_last else x.shape[1])


def _check_per_channel(op, arrays: dict, C: int):
    for name, a in arrays.items():
        if a is not None and tuple(a.shape) != (C,):
            raise ValueError(f"{op}: {name} should contain {C} elements (one per channel, "
                             f"shape ({C},)), got shape {tuple(a.shape)}")


def _compute_dtype_name(x_dt: str) -> str:
    return "float32" if x_dt in ("float16", "bfloat16") else x_dt


def _check_param_dtypes(op, x_dt: str, params: dict) -> str:
    """The params' common dtype: x's, or float32 beside 16-bit x."""
    allowed = (x_dt, "float32") if x_dt in ("float16", "bfloat16") else (x_dt,)
    given = {name: dtype_name(a) for name, a in params.items() if a is not None}
    for name, dt in given.items():
        if dt not in allowed:
            raise TypeError(f"{op}: {name} has dtype {dt}, expected {' or '.join(allowed)} "
                            f"(x is {x_dt})")
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{n} {d}" for n, d in given.items())
        raise TypeError(f"{op}: weight, bias and the running statistics must share one dtype, "
                        f"got {listed}")
    return next(iter(given.values()), x_dt)


def _check_updated(op, call, name, a):
    """A running statistic the call updates in place: contiguous (a copy would lose the
    update) and writeable."""
    contiguous = a.is_contiguous() if call.kind == "torch" else a.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"{op}: {name} is updated in place and must be contiguous")
    check_writable(op, name, a)


def _alloc(call, n: int, dt: str, like=None):
    """A new native 1-D array of n elements of dtype dt (from torch's allocator for torch
    callers); ``like``: an array whose dtype object is dt (for bfloat16 on CuPy)."""
    if call.kind == "torch":
        import torch

        return call.native(torch.empty(n, dtype=getattr(torch, dt), device=call.device), dt)
    if like is not None and dtype_name(like) == dt:
        return call.xp.empty(n, like.dtype)
    return call.xp.empty(n, dt)


def _factor(op, training, has_running, momentum, num_batches_tracked) -> float:
    if momentum is not None:
        momentum = _real(op, "momentum", momentum)
    if not (training and has_running):
        return 0.0
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(f"{op}: momentum=None (cumulative moving average) needs "
                         "num_batches_tracked, the number of training batches seen including "
                         "this one (torch.nn.BatchNorm's counter after its increment)")
    try:
        count = operator.index(num_batches_tracked)
    except TypeError:
        raise TypeError(f"{op}: num_batches_tracked must be an int, got "
                        f"{num_batches_tracked!r}") from None
    if count < 1:
        raise ValueError(f"{op}: num_batches_tracked must be >= 1 (this batch included), "
                         f"got {count}")
    return 1.0 / count


def _forward(op, relu, x, running_mean, running_var, weight, bias, training, momentum, eps,
             channels_last, num_batches_tracked, out, backend):
    call = resolve(op, backend, x=x, running_mean=running_mean, running_var=running_var,
                   weight=weight, bias=bias, out=out)
    C = _channels(op, x, channels_last)
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight,
              "bias": bias}
    _check_per_channel(op, params, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must either both be None or "
                         "neither be None")
    call.check_dtype(x, "x")
    x_dt = dtype_name(x)
    _check_param_dtypes(op, x_dt, params)
    eps = _real(op, "eps", eps)
    has_running = running_mean is not None
    use_batch = bool(training) or not has_running
    update = bool(training) and has_running
    if update:
        for name in ("running_mean", "running_var"):
            _check_updated(op, call, name, params[name])
    factor = _factor(op, bool(training), has_running, momentum, num_batches_tracked)
    shape = tuple(x.shape)
    A, _, B = _layout(shape, channels_last)
    if use_batch and A * B == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{shape}")
    with call.context():
        xn = call.native(x, "x")
        w, b = call.native(weight, "weight"), call.native(bias, "bias")
        rm, rv = call.native(running_mean, "running_mean"), call.native(running_var, "running_var")
        read = {"x": xn, "weight": w, "bias": b}
        y = call.output(out, xn, inputs={**read, "running_mean": rm, "running_var": rv})
        if update:  # written after other arrays were read or before they are: no overlap at all
            check_no_overlap(op, "running_mean", rm, {**read, "running_var": rv})
            check_no_overlap(op, "running_var", rv, read)
        cdt = _compute_dtype_name(x_dt)
        mean, invstd = _alloc(call, C, cdt), _alloc(call, C, cdt)
        A, C3, B = _layout(shape, channels_last)
        if use_batch and A * B == 0:  # an empty batch: no statistics, running ones untouched
            mean[...] = np.nan
            invstd[...] = np.nan
        elif C3 > 0:
            IMPLS[call.backend][0](xn.reshape(A, C3, B), w, b, rm, rv, mean, invstd,
                                   y.reshape(A, C3, B), use_batch, update, factor, eps, relu)
    return call.wrap(y, out), call.wrap(mean), call.wrap(invstd)


def _backward(op, relu, dy, x, mean, invstd, weight, bias, training, channels_last, out,
              backend):
    call = resolve(op, backend, dy=dy, x=x, mean=mean, invstd=invstd, weight=weight, bias=bias,
                   out=out)
    C = _channels(op, x, channels_last)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, expected {tuple(x.shape)} "
                         "(the shape of x)")
    call.check_dtype(x, "x")
    x_dt = dtype_name(x)
    if dtype_name(dy) != x_dt:
        raise TypeError(f"{op}: dy has dtype {dtype_name(dy)}, expected {x_dt}")
    _check_per_channel(op, {"mean": mean, "invstd": invstd, "weight": weight, "bias": bias}, C)
    cdt = _compute_dtype_name(x_dt)
    for name, a in (("mean", mean), ("invstd", invstd)):
        if dtype_name(a) != cdt:
            raise TypeError(f"{op}: {name} has dtype {dtype_name(a)}, expected {cdt} (the "
                            "forward's saved statistics)")
    p_dt = _check_param_dtypes(op, x_dt, {"weight": weight, "bias": bias})
    shape = tuple(x.shape)
    with call.context():
        dyn, xn = call.native(dy, "dy"), call.native(x, "x")
        mn, isn = call.native(mean, "mean"), call.native(invstd, "invstd")
        w, b = call.native(weight, "weight"), call.native(bias, "bias")
        dx = call.output(out, xn, inputs={"dy": dyn, "x": xn, "mean": mn, "invstd": isn,
                                          "weight": w, "bias": b})
        like = w if w is not None else xn
        dw, db = _alloc(call, C, p_dt, like), _alloc(call, C, p_dt, like)
        A, C3, B = _layout(shape, channels_last)
        if xn.size == 0:
            dw[...] = 0
            db[...] = 0
        else:
            IMPLS[call.backend][1](dyn.reshape(A, C3, B), xn.reshape(A, C3, B), mn, isn, w, b,
                                   dx.reshape(A, C3, B), dw, db, bool(training), relu)
    return call.wrap(dx, out), call.wrap(dw), call.wrap(db)


# --- Public API -------------------------------------------------------------------------------


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, channels_last=False, num_batches_tracked=None,
                       out=None, backend=None):
    """Batch normalization; returns (y, mean, invstd), the statistics the backward needs.

    Arguments as :func:`batch_norm`. In training (or without running statistics) mean and
    invstd = 1/sqrt(biased var + eps) are the batch's (torch's saved statistics); in eval
    they are running_mean and 1/sqrt(running_var + eps)."""
    return _forward("batch_norm_forward", False, x, running_mean, running_var, weight, bias,
                    training, momentum, eps, channels_last, num_batches_tracked, out, backend)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, channels_last=False, num_batches_tracked=None,
               out=None, backend=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias per channel, as
    ``torch.nn.functional.batch_norm``: channels on axis 1, or on the last axis with
    ``channels_last=True``. training=True normalizes with the batch statistics and updates
    running_mean / running_var in place (unbiased variance) with ``momentum``;
    ``momentum=None`` is the cumulative average, which needs ``num_batches_tracked`` (the
    batches seen, this one included). running_mean = running_var = None uses the batch
    statistics in eval mode too (track_running_stats=False)."""
    return batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum,
                              eps, channels_last=channels_last,
                              num_batches_tracked=num_batches_tracked, out=out,
                              backend=backend)[0]


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, channels_last=False,
                        out=None, backend=None):
    """(dx, dweight, dbias) from dy, the forward's input x and its saved mean and invstd.

    training=False is the backward of an eval-mode forward (the statistics are constants:
    dx = dy * weight * invstd). dweight and dbias are returned also when weight is None."""
    return _backward("batch_norm_backward", False, dy, x, mean, invstd, weight, None, training,
                     channels_last, out, backend)


def batch_norm_relu_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                            momentum=0.1, eps=1e-5, *, channels_last=False,
                            num_batches_tracked=None, out=None, backend=None):
    """relu(batch_norm(x, ...)) in one pass over x for the output; returns (y, mean, invstd)."""
    return _forward("batch_norm_relu_forward", True, x, running_mean, running_var, weight, bias,
                    training, momentum, eps, channels_last, num_batches_tracked, out, backend)


def batch_norm_relu(x, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, channels_last=False, num_batches_tracked=None,
                    out=None, backend=None):
    """relu(batch_norm(x, ...)), fused; arguments as :func:`batch_norm`."""
    return batch_norm_relu_forward(x, running_mean, running_var, weight, bias, training,
                                   momentum, eps, channels_last=channels_last,
                                   num_batches_tracked=num_batches_tracked, out=out,
                                   backend=backend)[0]


def batch_norm_relu_backward(dy, x, mean, invstd, weight=None, bias=None, *, training=True,
                             channels_last=False, out=None, backend=None):
    """(dx, dweight, dbias) of relu(batch_norm(x)). The ReLU mask is recomputed from x, mean,
    invstd, weight and bias (pass the same ones as the forward), not read from a saved y."""
    return _backward("batch_norm_relu_backward", True, dy, x, mean, invstd, weight, bias,
                     training, channels_last, out, backend)
