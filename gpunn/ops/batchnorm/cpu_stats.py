"""Batch normalization on the CPU, part 1: the Numba reductions. Per-channel partial
statistics (forward: count, mean, M2) and gradient sums (backward: sum g, sum g (x - mean)) of
many pieces in parallel, then a serial, deterministic finalize per channel. The rows and
columns shapes and the overflow handling are described in :mod:`gpunn.ops.batchnorm`; the
elementwise passes and the drivers that call these kernels are in
:mod:`gpunn.ops.batchnorm.cpu`."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

#: NCHW inputs whose spatial extent B is at least this use the rows reduction on the CPU.
CPU_ROWS_MIN = 64
#: CPU: values per two-pass block of a row (8 KB of float32: the second pass reads L1).
BLOCK = 2048
#: CPU columns reduction: columns per tile and rows per two-pass block.
COL_TILE = 512
ROW_BLOCK = 32

# --- Numba CPU kernels: reductions ----------------------------------------------------------------
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


@njit(parallel=True, cache=True, error_model="numpy")
def stats_rows(x3, S, pmu, pm2):
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


# Four rows a pass: each d[i], q[i] (sa[i], sb[i]) is loaded and stored once per four rows, not
# per row; the stores had bound the one-row loop (256 x 1024 float32, one core: 21 -> 13 us).


@njit(cache=True, error_model="numpy")
def _cols_shifted(d, q, xs, shift, K):
    """d[i] += e, q[i] += e^2 with e = xs[r*K + i] - shift[i], over the rows r of the block xs
    (xs ends at the last row's d.size-th value); in float64 when shift is float64."""
    w = d.size
    rows = (xs.size - w) // K + 1
    r = 0
    while r + 4 <= rows:
        x0, x1 = xs[r * K:r * K + w], xs[(r + 1) * K:(r + 1) * K + w]
        x2, x3 = xs[(r + 2) * K:(r + 2) * K + w], xs[(r + 3) * K:(r + 3) * K + w]
        for i in range(w):
            s = shift[i]
            e0, e1, e2, e3 = x0[i] - s, x1[i] - s, x2[i] - s, x3[i] - s
            d[i] += (e0 + e1) + (e2 + e3)
            q[i] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
        r += 4
    for r in range(r, rows):
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
def stats_cols(x2, S, pmu, pm2):
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


# A merge takes one item of every channel's partials (index base + c*stride) as a 1-D view:
# contiguous where stride is 1 (the columns plans), so that it vectorizes (strided, one item
# of 1024 channels took ~1.2 us).


@njit(cache=True, error_model="numpy")
def _merge_item(mu, m2, pmu, pm2, base, stride, wb, nwb):
    """Chan's update of every channel's (mu, m2) with one partial each, all of the same
    count: weights wb = count / (n + count) and nwb = n * wb."""
    C = mu.size
    if stride == 1:
        _merge_view(mu, m2, pmu[base:base + C], pm2[base:base + C], wb, nwb)
    else:
        _merge_view(mu, m2, pmu[base:base + C * stride:stride],
                    pm2[base:base + C * stride:stride], wb, nwb)


@njit(cache=True, error_model="numpy")
def _merge_view(mu, m2, pmu, pm2, wb, nwb):
    for c in range(mu.size):
        delta = pmu[c] - mu[c]
        mu[c] += delta * wb
        m2[c] += pm2[c] + delta * delta * nwb


@njit(cache=True, error_model="numpy")
def _add_item(acc, partials, base, stride):
    """acc[c] += partials[base + c*stride] (a view as _merge_item's)."""
    C = acc.size
    if stride == 1:
        _add_float64(acc, partials[base:base + C])
    else:
        _add_float64(acc, partials[base:base + C * stride:stride])


@njit(cache=True, error_model="numpy")
def finalize_forward(S, total, pmu, pm2, sm, Bc, count, w, b, rm, rv, mean, invstd, scale, beta,
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
    # scalar branches only, each array loop of its own: an array chosen inside the channel
    # loop (w[c] if w.size > 0 else ...) made Numba incref and decref arrays on every channel,
    # 100 ns a channel (C = 1024: 100 us, more than the rest of a (256, 1024) forward)
    if use_batch:
        for c in range(C):
            mean[c] = mu[c]
            invstd[c] = 1.0 / math.sqrt(m2[c] / count + eps)
        if update:
            for c in range(C):
                rm[c] = (1.0 - factor) * rm[c] + factor * mu[c]
                rv[c] = (1.0 - factor) * rv[c] + factor * (m2[c] / (count - 1.0))
    else:
        for c in range(C):
            mean[c] = rm[c]
            invstd[c] = 1.0 / math.sqrt(float(rv[c]) + eps)
    if w.size > 0:
        for c in range(C):
            scale[c] = invstd[c] * w[c]
    else:
        for c in range(C):
            scale[c] = invstd[c]
    if b.size > 0:
        for c in range(C):
            beta[c] = b[c]
    else:
        for c in range(C):
            beta[c] = 0


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
def grad_rows(dy3, x3, mean, scale, beta, relu, S, pa, pb):
    """Partial sums of g and g * (x - mean) of piece t = c*S + s (as stats_rows)."""
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


@njit(inline="always", cache=True)
def _gate(g, xm, sc, be, relu):
    """g, or (BN + ReLU) 0 where the recomputed z = xm * sc + be <= 0."""
    if relu and xm * sc + be <= type(g)(0):
        return type(g)(0)
    return g


@njit(cache=True, error_model="numpy")
def _cols_grad(sa, sb, gs, xs, m, sc, be, K, relu):
    """sa[i] += g, sb[i] += g * (x - m[i]) over the rows of the block (as _cols_shifted); g = dy,
    or 0 where the recomputed z <= 0 (BN + ReLU). The sums and products are in sa's dtype."""
    w = sa.size
    S = type(sa[0])
    rows = (xs.size - w) // K + 1
    r = 0
    while r + 4 <= rows:
        x0, x1 = xs[r * K:r * K + w], xs[(r + 1) * K:(r + 1) * K + w]
        x2, x3 = xs[(r + 2) * K:(r + 2) * K + w], xs[(r + 3) * K:(r + 3) * K + w]
        g0, g1 = gs[r * K:r * K + w], gs[(r + 1) * K:(r + 1) * K + w]
        g2, g3 = gs[(r + 2) * K:(r + 2) * K + w], gs[(r + 3) * K:(r + 3) * K + w]
        for i in range(w):
            mi, si, bi = m[i], sc[i], be[i]
            e0, e1, e2, e3 = x0[i] - mi, x1[i] - mi, x2[i] - mi, x3[i] - mi
            h0, h1 = _gate(g0[i], e0, si, bi, relu), _gate(g1[i], e1, si, bi, relu)
            h2, h3 = _gate(g2[i], e2, si, bi, relu), _gate(g3[i], e3, si, bi, relu)
            sa[i] += (h0 + h1) + (h2 + h3)
            sb[i] += (S(h0) * e0 + S(h1) * e1) + (S(h2) * e2 + S(h3) * e3)
        r += 4
    for r in range(r, rows):
        xr, gr = xs[r * K:r * K + w], gs[r * K:r * K + w]
        for i in range(w):
            xm = xr[i] - m[i]
            h = _gate(gr[i], xm, sc[i], be[i], relu)
            sa[i] += h
            sb[i] += S(h) * xm


@njit(cache=True, error_model="numpy")
def _add_float64(acc, part):
    for i in range(acc.size):
        acc[i] += part[i]


@njit(parallel=True, cache=True, error_model="numpy")
def grad_cols(dy2, x2, meank, scalek, betak, relu, S, pa, pb):
    """Partial sums of g and g * (x - mean) of every column of (A, K) over the s-th of S row
    slices (as stats_cols); meank, scalek, betak are per column. Blocks of ROW_BLOCK rows are
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
def finalize_backward(pa, pb, sp, S, Bc, count, invstd, w, training, dw, db, k1, k2, k3):
    """Per channel: the sums over its S*Bc partials (index c*sp[0] + s*sp[1] + j*sp[2]),
    dbias, dweight and the dx coefficients dx = k1 (g + k2 (x - mean) + k3)."""
    C = invstd.size
    sa = np.zeros(C)
    sb = np.zeros(C)
    for s in range(S):  # per channel in the order s, then j
        for j in range(Bc):
            _add_item(sa, pa, s * sp[1] + j * sp[2], sp[0])
            _add_item(sb, pb, s * sp[1] + j * sp[2], sp[0])
    for c in range(invstd.size):  # loops as finalize_forward's
        istd = np.float64(invstd[c])
        db[c] = sa[c]
        dw[c] = sb[c] * istd
        k1[c] = istd
        k2[c] = -istd * istd * sb[c] / count if training else 0.0
        k3[c] = -sa[c] / count if training else 0.0
    if w.size > 0:
        for c in range(invstd.size):
            k1[c] = np.float64(w[c]) * np.float64(invstd[c])
