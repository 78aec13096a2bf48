r"""Data augmentation: a random affine warp (rotation, translation, scale, stretch, shear) and
a horizontal flip per sample, with bilinear sampling and zero padding, in one fused pass.

The warp (``affine_warp``)
    For images x of shape (N, C, H, W) (or (N, H, W), one channel) and matrices theta (N, 2, 3),
    the result is that of PyTorch's

        grid = F.affine_grid(theta, x.shape, align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    theta[n] maps an OUTPUT point in normalized coordinates (x_o, y_o) in [-1, 1]^2 (pixel
    centres at x_o = (2j + 1) / W - 1, y_o = (2i + 1) / H - 1) to the INPUT point it samples:

        (g_x, g_y) = theta[n] @ (x_o, y_o, 1)
        i_x = ((g_x + 1) W - 1) / 2,   i_y = ((g_y + 1) H - 1) / 2      (input pixel units)

    Substituting gives the per-sample pixel map the kernels use (computed once per sample in
    float64, then rounded to the compute type):

        i_x = t00 j + t01 (W / H) i + (W t02 + t00 (1 - W) + t01 W (1 - H) / H + W - 1) / 2
        i_y = t10 (H / W) j + t11 i + (H t12 + t10 H (1 - W) / W + t11 (1 - H) + H - 1) / 2

    (the identity theta gives i_x = j, i_y = i exactly). With x0 = floor(i_x), y0 = floor(i_y),
    the four taps and their weights are

        y[n, c, i, j] = sum over (xx, yy) in {x0, x0 + 1} x {y0, y0 + 1} that lie inside the
                        image of  x[n, c, yy, xx] (1 - |i_x - xx|) (1 - |i_y - yy|)

    added in PyTorch's order (x0y0, x1y0, x0y1, x1y1); taps outside the image contribute
    nothing (zero padding), so a pixel whose (i_x, i_y) is outside (-1, W) x (-1, H) is 0.
    As PyTorch's CPU grid_sample, a non-finite coordinate (NaN or inf, from a non-finite
    theta) gives NaN. The math is in float32 for float32 and the 16-bit types, float64 for
    float64.

The augmentation (``random_affine``, ``augment``)
    Sample n draws its parameters from Philox4x32-10 (:mod:`gpunn.philox`) with

        key = (seed mod 2^32, seed >> 32),  counter = (d mod 2^32, d >> 32, b, TAG),
        d = offset + n,  b in {0, 1},  TAG = 0x41554730 ("AUG0")

    eight 32-bit words, two blocks; word w becomes u = (w >> 8) 2^-24, a float64 uniform in
    [0, 1) (exactly the same on every backend). Block 0 gives (u_rot, u_tx, u_ty, u_scale),
    block 1 (u_stretch, u_shear, u_flip, unused). All are drawn whatever the options, so
    turning one transformation on does not change the others' draws; a sample's draw depends
    only on (seed, offset + n), not on the batch size. TAG keeps the counters apart from
    dropout's stream (counter words 2 and 3 are 0 there). The parameters:

        rotation     a  = degrees (2 u_rot - 1)           degrees, counter-clockwise on screen
        translation  fx = translate[0] (2 u_tx - 1),  fy = translate[1] (2 u_ty - 1)
                     (fractions of the width and height; 2 fx, 2 fy in normalized units)
        scale        s  = scale[0] + (scale[1] - scale[0]) u_scale    (s > 1 zooms in)
        stretch      e  = stretch (2 u_stretch - 1): x is scaled by exp(e), y by exp(-e)
        shear        k  = tan(shear (2 u_shear - 1) degrees): x += k y
        flip         f  = -1 if u_flip < flip_p else 1

    The content moves by (in "square" coordinates (a x, y), a = W / H the aspect, so rotations
    are true rotations on non-square images too; a = 1 in ``random_affine`` unless given)

        q = R(a) Sh(k) diag(s e^e, s e^-e) p + (2 a fx, 2 fy),   then x -> f x (the flip),
        R(a) = [[cos a, sin a], [-sin a, cos a]],  Sh(k) = [[1, k], [0, 1]]

    and theta is its inverse, the output -> input map:

        M = diag(e^-e / s, e^e / s) Sh(-k) R(-a)
          = [[(c - k s_) e^-e / s, -(s_ + k c) e^-e / s], [s_ e^e / s, c e^e / s]]
            (c = cos a, s_ = sin a)
        A = [[M00, M01 / aspect], [M10 aspect, M11]]
        theta = [A @ diag(f, 1) | -A @ (2 fx, 2 fy)]

    computed in float64 and rounded to float32 (``random_affine``'s output). ``augment`` is
    ``affine_warp(x, random_affine(N, seed, offset, ..., aspect=W/H))`` with the float32
    matrices widened to the compute type, fused: the CUDA kernel draws each sample's matrix in
    the block that warps it (one launch); the CPU kernel draws all N in one parallel loop and
    warps in a second, inside one Numba call. seed: an integer in [0, 2^64) (None: a fresh one
    from NumPy's global generator); offset >= 0, offset + N <= 2^64. Advance offset by N per
    batch to give every sample of an epoch its own draw.

Memory traffic: the fewest bytes are one read of x and one write of y (2 N C H W elements;
plus 24 N or 48 N bytes of theta for ``affine_warp``). A tap is re-read by up to four output
pixels (more when zooming out), from cache: the input is read about once from memory while
the scale is near 1. The CUDA kernel runs one thread per output pixel (all channels), so the
coordinates and weights are computed once per pixel. The CPU kernel copies each sample into a
zero-bordered plane ((H + 3) x (W + 2) per channel, a spare zero row for the pixels outside:
every tap of a pixel inside (-1, W) x (-1, H) is in it, so no tap is bounds-tested), computes
a row's taps once (the top-left tap's index and four weights, branch-free, vectorized) and
applies them to each channel. On one thread of the 2-core EPYC, float32, that is 1.9-2.25x
the per-pixel branching loop it replaced and 1.73-2.75x torch's affine_grid + grid_sample on
the bench's shapes (341 x 3 x 32 x 32: 4.3 ms, torch 7.5 ms; 27 x 3 x 224 x 224: 14.4 ms,
torch 39.6 ms).
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from numba import njit, prange

from .. import cuda
from .. import philox as ph
from ..backend import (array_module, check_no_overlap, compute_dtype_name, dtype_name,
                       host_kernel, host_thread_count, resolve)
from ..philox import check_stream, cpu_rounds, fresh_seed, key_words
from ..validation import integer, real

#: Counter word 3 of the augmentation's Philox blocks (dropout's stream has 0 there).
TAG = 0x41554730
#: 2^-24: u = (w >> 8) * 2^-24.
_TWO_M24 = 5.9604644775390625e-08
_DEG = math.pi / 180.0
_U0, _U1, _U8, _U32 = np.uint64(0), np.uint64(1), np.uint64(8), np.uint64(32)
_MASK32, _TAG = np.uint64(ph.MASK32), np.uint64(TAG)


# --- Parameters -------------------------------------------------------------------------------


def _pair(op, name, value):
    """Two numbers from a pair (or one number used twice)."""
    if isinstance(value, (Real, np.number)) and not isinstance(value, (bool, np.bool_)):
        return value, value
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a pair of numbers, got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{op}: {name} must be a pair of numbers, got {value!r}")
    return items


def _params(op, degrees, translate, scale, stretch, shear, flip_p, aspect=1.0):
    """The options checked, as the float64 tuple the kernels take:
    (degrees, translate_x, translate_y, scale_lo, scale_hi, stretch, shear, flip_p, aspect)."""
    degrees = real(op, "degrees", degrees, 0.0)
    tx, ty = (real(op, "translate", t, 0.0, 1.0) for t in _pair(op, "translate", translate))
    s_lo, s_hi = (real(op, "scale", s, 0.0, lo_open=True) for s in _pair(op, "scale", scale))
    if s_lo > s_hi:
        raise ValueError(f"{op}: scale must be (min, max) with min <= max, got {scale!r}")
    stretch = real(op, "stretch", stretch, 0.0)
    shear = real(op, "shear", shear, 0.0, 90.0, hi_open=True)
    flip_p = real(op, "flip_p", flip_p, 0.0, 1.0)
    aspect = real(op, "aspect", aspect, 0.0, lo_open=True)
    return (degrees, tx, ty, s_lo, s_hi, stretch, shear, flip_p, aspect)


def _theta_from_uniforms(u_rot, u_tx, u_ty, u_scale, u_stretch, u_shear, u_flip,
                         degrees, translate_x, translate_y, scale_lo, scale_hi, stretch, shear,
                         flip_p, aspect):
    """The six entries of theta (float64) from the seven uniforms (module docstring).
    Arrays (NumPy or CuPy) or scalars; compiled by Numba as it is for the CPU kernel."""
    angle = (degrees * (2.0 * u_rot - 1.0)) * _DEG
    fx = translate_x * (2.0 * u_tx - 1.0)
    fy = translate_y * (2.0 * u_ty - 1.0)
    s = scale_lo + (scale_hi - scale_lo) * u_scale
    e = stretch * (2.0 * u_stretch - 1.0)
    k = np.tan((shear * (2.0 * u_shear - 1.0)) * _DEG)
    f = 1.0 - 2.0 * (u_flip < flip_p)
    c, sn = np.cos(angle), np.sin(angle)
    ex = np.exp(-e) / s
    ey = np.exp(e) / s
    a00 = (c - k * sn) * ex
    a01 = (-(sn + k * c) * ex) / aspect
    a10 = (sn * ey) * aspect
    a11 = c * ey
    t0, t1 = 2.0 * fx, 2.0 * fy
    return (f * a00, a01, -(a00 * t0 + a01 * t1), f * a10, a11, -(a10 * t0 + a11 * t1))


# --- NumPy reference (runs on CuPy arrays too) ------------------------------------------------


def _ref_thetas(xp, n, seed, offset, params):
    """(n, 2, 3) float32: the matrices of samples offset .. offset + n - 1."""
    k0, k1 = (xp.uint64(k) for k in key_words(seed))
    d = xp.arange(n, dtype=xp.uint64) + xp.uint64(offset)
    lo, hi = d & xp.uint64(ph.MASK32), d >> xp.uint64(32)
    words = []
    for b in (0, 1):
        words += ph.rounds(lo, hi, xp.uint64(b), xp.uint64(TAG), k0, k1, xp=xp)
    u = [(w >> xp.uint64(8)).astype(xp.float64) * _TWO_M24 for w in words[:7]]
    entries = _theta_from_uniforms(*u, *params)
    theta = xp.stack([xp.broadcast_to(xp.asarray(v, dtype=xp.float64), (n,)) for v in entries],
                     axis=-1)
    return theta.reshape(n, 2, 3).astype(xp.float32)


def _numpy_warp(x, theta, y):
    """y = grid_sample(x, affine_grid(theta)) on (N, C, H, W), vectorized over the batch,
    written as PyTorch defines it (normalized grid, then unnormalize)."""
    xp = array_module(x)
    xc = x.astype(xp.float32) if x.dtype.itemsize < 4 else x
    dt = xc.dtype
    n, c, h, w = xc.shape
    if xc.size == 0:
        return
    t = theta.astype(dt)
    xs = ((2 * xp.arange(w, dtype=xp.float64) + 1) / w - 1).astype(dt)
    ys = ((2 * xp.arange(h, dtype=xp.float64) + 1) / h - 1).astype(dt)
    gx = (t[:, 0, 0, None, None] * xs[None, None, :] + t[:, 0, 1, None, None] * ys[None, :, None]
          + t[:, 0, 2, None, None])  # (N, H, W)
    gy = (t[:, 1, 0, None, None] * xs[None, None, :] + t[:, 1, 1, None, None] * ys[None, :, None]
          + t[:, 1, 2, None, None])
    ix = ((gx + dt.type(1)) * dt.type(w) - dt.type(1)) / dt.type(2)
    iy = ((gy + dt.type(1)) * dt.type(h) - dt.type(1)) / dt.type(2)
    finite = xp.isfinite(ix) & xp.isfinite(iy)
    with np.errstate(invalid="ignore"):
        inside = (ix > -1) & (ix < w) & (iy > -1) & (iy < h)  # NaN: outside
    ix = xp.where(inside, ix, dt.type(0))
    iy = xp.where(inside, iy, dt.type(0))
    x0, y0 = xp.floor(ix), xp.floor(iy)
    flat = xc.reshape(n, c, h * w)
    acc = xp.zeros((n, c, h * w), dtype=dt)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xx, yy = x0 + dx, y0 + dy
        weight = ((1 - xp.abs(ix - xx)) * (1 - xp.abs(iy - yy))).astype(dt)
        valid = inside & (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        index = xp.where(valid, yy * w + xx, 0).astype(xp.int64).reshape(n, 1, h * w)
        vals = xp.take_along_axis(flat, xp.broadcast_to(index, (n, c, h * w)), axis=2)
        with np.errstate(invalid="ignore", over="ignore"):
            acc += xp.where(valid.reshape(n, 1, h * w), vals * weight.reshape(n, 1, h * w),
                            dt.type(0))
    acc = xp.where(finite.reshape(n, 1, h * w), acc, dt.type(np.nan))
    y[...] = acc.reshape(n, c, h, w)


def _numpy_augment(x, y, seed, offset, params):
    xp = array_module(x)
    theta = _ref_thetas(xp, x.shape[0], seed, offset, params)
    _numpy_warp(x, theta.astype(xp.float64) if x.dtype == xp.float64 else theta, y)


# --- Numba CPU kernels: the maps in one parallel loop, then one loop per output row -----------

_theta_nb = njit(inline="always", cache=True)(_theta_from_uniforms)


@njit(inline="always", cache=True)
def _uniform(w):
    return np.float64(w >> _U8) * _TWO_M24


@njit(inline="always", cache=True)
def _pixel_map(t00, t01, t02, t10, t11, t12, h, w):
    """The pixel map (module docstring) of one theta, float64."""
    fw, fh = np.float64(w), np.float64(h)
    return (t00, t01 * (fw / fh),
            0.5 * (fw * t02 + t00 * (1.0 - fw) + t01 * (fw * (1.0 - fh) / fh) + (fw - 1.0)),
            t10 * (fh / fw), t11,
            0.5 * (fh * t12 + t10 * (fh * (1.0 - fw) / fw) + t11 * (1.0 - fh) + (fh - 1.0)))


@njit(inline="always", cache=True)
def _store_map(maps, s, t00, t01, t02, t10, t11, t12, h, w):
    m = _pixel_map(t00, t01, t02, t10, t11, t12, h, w)
    for k in range(6):
        maps[s, k] = m[k]


@njit(inline="always", cache=True)
def _random_theta(d, k0, k1, params):
    """theta of stream sample d (uint64), float64 values of the float32 matrix."""
    lo, hi = d & _MASK32, d >> _U32
    a0, a1, a2, a3 = cpu_rounds(lo, hi, _U0, _TAG, k0, k1)
    b0, b1, b2, _ = cpu_rounds(lo, hi, _U1, _TAG, k0, k1)
    t = _theta_nb(_uniform(a0), _uniform(a1), _uniform(a2), _uniform(a3), _uniform(b0),
                  _uniform(b1), _uniform(b2), params[0], params[1], params[2], params[3],
                  params[4], params[5], params[6], params[7], params[8])
    return (np.float64(np.float32(t[0])), np.float64(np.float32(t[1])),
            np.float64(np.float32(t[2])), np.float64(np.float32(t[3])),
            np.float64(np.float32(t[4])), np.float64(np.float32(t[5])))


@njit(inline="always", cache=True, error_model="numpy")
def _pad_sample(x, s, pad):
    """pad[c, 1:h+1, 1:w+1] = x[s, c]; the border and the spare row below it stay zero
    (loops, not a slice assignment: see batchnorm.cpu_stats._set_shift)."""
    channels, h, w = x.shape[1], x.shape[2], x.shape[3]
    for c in range(channels):
        for i in range(h):
            row, source = pad[c, i + 1], x[s, c, i]
            for j in range(w):
                row[j + 1] = source[j]


@njit(inline="always", cache=True, error_model="numpy")
def _row_taps(a00, a10, bx, by, w, h, first, w00, w01, w10, w11):
    """The taps of one output row in a zero-bordered plane of width w + 2: the index of the
    top-left tap (x0 + 1, y0 + 1) and the four weights. A pixel outside the image points at
    rows h + 1 and h + 2 (four zeros) with weights 0, NaN for a non-finite coordinate.
    Branch-free (int32 math, selects): the loop vectorizes."""
    T, I = type(a00), np.int32
    one, zero, neg, fw, fh = T(1), T(0), T(-1), T(w), T(h)
    stride = I(w + 2)
    nowhere = I(h + 1) * stride
    for j in range(w):
        fj = T(j)
        ix, iy = a00 * fj + bx, a10 * fj + by
        inside = (ix > neg) & (ix < fw) & (iy > neg) & (iy < fh)
        finite = (ix - ix == zero) & (iy - iy == zero)
        cx, cy = (ix, iy) if inside else (zero, zero)
        tx, ty = I(cx), I(cy)
        x0, y0 = tx - I(T(tx) > cx), ty - I(T(ty) > cy)  # floor, from the truncation
        fx0, fy0 = T(x0), T(y0)
        wx1, wy1 = ix - fx0, iy - fy0
        wx0, wy0 = (fx0 + one) - ix, (fy0 + one) - iy
        first[j] = (y0 + I(1)) * stride + (x0 + I(1)) if inside else nowhere
        outer = zero if finite else T(np.nan)
        w00[j] = wx0 * wy0 if inside else outer
        w01[j] = wx1 * wy0 if inside else outer
        w10[j] = wx0 * wy1 if inside else outer
        w11[j] = wx1 * wy1 if inside else outer


@njit(inline="always", cache=True, error_model="numpy")
def _row_apply(plane, stride, out, first, w00, w01, w10, w11):
    """One output row of one channel: the four taps in PyTorch's order (a border tap adds
    0 * weight = +0, what skipping it leaves: the same bits)."""
    for j in range(out.size):
        k = first[j]
        acc = plane[k] * w00[j]
        acc += plane[k + 1] * w01[j]
        acc += plane[k + stride] * w10[j]
        acc += plane[k + stride + 1] * w11[j]
        out[j] = acc


@njit(inline="always", cache=True, error_model="numpy")
def _warp_rows(x, y, maps, s, i0, i1, zero):
    """Output rows [i0, i1) of sample s, every channel, through the pixel map maps[s]: the
    sample copied into a zero-bordered plane (no bounds test per tap; one more zero row for
    the pixels outside), then per row its taps once and each channel's four-tap sums."""
    channels, h, w = x.shape[1], x.shape[2], x.shape[3]
    T = type(zero)
    pad = np.zeros((channels, h + 3, w + 2), x.dtype)
    _pad_sample(x, s, pad)
    first = np.empty(w, np.int32)
    weights = np.empty((4, w), x.dtype)
    a00, a01, a02 = T(maps[s, 0]), T(maps[s, 1]), T(maps[s, 2])
    a10, a11, a12 = T(maps[s, 3]), T(maps[s, 4]), T(maps[s, 5])
    for i in range(i0, i1):
        fi = T(i)
        _row_taps(a00, a10, a01 * fi + a02, a11 * fi + a12, w, h, first, weights[0],
                  weights[1], weights[2], weights[3])
        for c in range(channels):
            _row_apply(pad[c].reshape(-1), w + 2, y[s, c, i], first, weights[0], weights[1],
                       weights[2], weights[3])


@njit(parallel=True, cache=True, error_model="numpy")
def _cpu_warp(x, y, theta, maps, draw, offset, k0, k1, params, zero, parts):
    """y = warp(x, theta_s) on (N, C, H, W): theta_s = theta[s] (N, 2, 3, x's compute dtype),
    or when ``draw`` the matrix of stream sample offset + s (uint64) under key (k0, k1).
    maps: (N, 6) float64 scratch for the pixel maps. Each sample's rows in ``parts`` pieces
    (more than one when there are fewer samples than threads; each piece pads the sample).
    One kernel for both ops: one compile per dtype."""
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    for s in prange(n):
        if draw:
            t = _random_theta(offset + np.uint64(s), k0, k1, params)
        else:
            t = (np.float64(theta[s, 0, 0]), np.float64(theta[s, 0, 1]),
                 np.float64(theta[s, 0, 2]), np.float64(theta[s, 1, 0]),
                 np.float64(theta[s, 1, 1]), np.float64(theta[s, 1, 2]))
        _store_map(maps, s, t[0], t[1], t[2], t[3], t[4], t[5], h, w)
    for r in prange(n * parts):
        s, q = r // parts, r % parts
        _warp_rows(x, y, maps, s, q * h // parts, (q + 1) * h // parts, zero)


@njit(cache=True)
def _cpu_thetas(n, offset, k0, k1, params):
    """(n, 2, 3) float32: the matrices the CPU kernel draws (for the tests)."""
    out = np.empty((n, 2, 3), dtype=np.float32)
    for s in range(n):
        t = _random_theta(offset + np.uint64(s), k0, k1, params)
        for k in range(6):
            out[s, k // 3, k % 3] = np.float32(t[k])
    return out


_NO_PARAMS = np.zeros(9, dtype=np.float64)


def _cpu_warp_call(x, y, theta, draw, offset, key, params):
    """_cpu_warp on the threads x's size gets, each sample's rows in enough pieces for
    every thread to get one."""
    parts = max(1, -(-host_thread_count(x.size) // max(x.shape[0], 1)))
    maps = np.empty((x.shape[0], 6), dtype=np.float64)
    host_kernel(_cpu_warp, x.size)(x, y, theta, maps, draw, np.uint64(offset), *key, params,
                                   x.dtype.type(0), parts)


def _cpu_warp_run(x, theta, y):
    _cpu_warp_call(x, y, theta, False, 0, (np.uint64(0), np.uint64(0)), _NO_PARAMS)


def _cpu_augment_run(x, y, seed, offset, params):
    _cpu_warp_call(x, y, np.empty((0, 2, 3), dtype=x.dtype), True, offset, key_words(seed),
                   np.asarray(params, dtype=np.float64))


# --- CUDA launcher: kernels/augment.cu --------------------------------------------------------

KERNELS = cuda.Family("augment", [
    f"gpunn::{kernel}<{ctype}>" for kernel in ("affine_warp", "augment")
    for ctype in cuda.CTYPES.values()], constants={"AUGMENT_TAG": TAG, "DEG": _DEG})
BLOCK = 256
MAX_GRID_Y = 65535


def _launch(kernel, n, h, w, args):
    """One thread per output pixel of a sample (grid x), samples grid-stride (grid y)."""
    hw = h * w
    block = min(BLOCK, max(32, -(-hw // 32) * 32))
    total = cuda.grid_for(n * hw, block, kernel)
    gx = min(-(-hw // block), total)
    gy = min(n, max(1, total // gx), MAX_GRID_Y)
    kernel((gx, gy), (block,), args)


def _cuda_warp_run(x, theta, y):
    n, c, h, w = x.shape
    if x.size == 0:
        return
    kernel = KERNELS.function(f"gpunn::affine_warp<{cuda.ctype(x.dtype)}>")
    _launch(kernel, n, h, w, (x, y, theta, np.int64(n), np.int64(c), np.int64(h), np.int64(w)))


def _cuda_augment_run(x, y, seed, offset, params):
    n, c, h, w = x.shape
    if x.size == 0:
        return
    kernel = KERNELS.function(f"gpunn::augment<{cuda.ctype(x.dtype)}>")
    _launch(kernel, n, h, w, (x, y, np.int64(n), np.int64(c), np.int64(h), np.int64(w),
                              np.uint64(seed), np.uint64(offset),
                              *(np.float64(p) for p in params)))


IMPLS = {
    "numpy": (_numpy_warp, _numpy_augment),
    "cpu": (_cpu_warp_run, _cpu_augment_run),
    "cuda": (_cuda_warp_run, _cuda_augment_run),
}


# --- Shared checks ----------------------------------------------------------------------------


def _check_images(op, xn):
    if xn.ndim not in (3, 4):
        raise ValueError(f"{op}: x must have shape (N, C, H, W) or (N, H, W), got shape "
                         f"{tuple(xn.shape)}")


def _as4(a):
    return a.reshape(a.shape[0], 1, *a.shape[1:]) if a.ndim == 3 else a


def _output(op, call, out, xn, **inputs):
    """The checked output: no partial overlap with the inputs, and not x itself either (a
    warp reads other pixels than it writes; it cannot run in place)."""
    yn = call.output(out, xn, inputs={"x": xn, **inputs})
    check_no_overlap(op, "out", yn, {"x": xn}, " (a warp reads other pixels than it writes; "
                     "it cannot run in place)")
    return yn


# --- Public API -------------------------------------------------------------------------------


def affine_warp(x, theta, *, out=None, backend=None):
    """y = grid_sample(x, affine_grid(theta, x.shape, align_corners=False), mode="bilinear",
    padding_mode="zeros", align_corners=False), as PyTorch.

    x: (N, C, H, W) or (N, H, W) images (float32/float64; also float16/bfloat16 on cuda).
    theta: (N, 2, 3), float32 or float64, of x's array type and device; theta[n] maps output
    normalized coordinates (x_o, y_o, 1) in [-1, 1] to input ones (pixel centres at
    (2j + 1) / W - 1). It is used in the compute type (float64 for float64 x, else float32).
    ``out`` may not overlap x."""
    call = resolve("affine_warp", backend, x=x, theta=theta, out=out)
    with call.context():
        xn = call.native(x, "x")
        _check_images("affine_warp", xn)
        th = call.native(theta, "theta")
        if dtype_name(th) not in ("float32", "float64"):
            raise TypeError(f"affine_warp: theta has dtype {dtype_name(th)}, expected float32 "
                            "or float64")
        if tuple(th.shape) != (xn.shape[0], 2, 3):
            raise ValueError(f"affine_warp: theta must have shape (N, 2, 3) = "
                             f"({xn.shape[0]}, 2, 3), got {tuple(th.shape)}")
        yn = _output("affine_warp", call, out, xn, theta=th)
        th = call.xp.ascontiguousarray(th, dtype=compute_dtype_name(dtype_name(xn)))
        IMPLS[call.backend][0](_as4(xn), th, _as4(yn))
    return call.wrap(yn, out)


def random_affine(n, seed, offset=0, *, degrees=0.0, translate=(0.0, 0.0), scale=(1.0, 1.0),
                  stretch=0.0, shear=0.0, flip_p=0.0, aspect=1.0, xp=np):
    """The (n, 2, 3) float32 output -> input matrices ``augment`` draws for samples
    offset .. offset + n - 1 under ``seed`` (module docstring), as an ``xp`` array
    (numpy or cupy).

    degrees >= 0: rotation in [-degrees, degrees]; translate (tx, ty) in [0, 1]: shift in
    [-tx, tx] of the width, [-ty, ty] of the height; scale (min, max), 0 < min <= max (> 1
    zooms in); stretch >= 0: x scaled by exp(e), y by exp(-e), e in [-stretch, stretch];
    shear in [0, 90): x-shear angle in [-shear, shear] degrees; flip_p in [0, 1]: probability
    of a horizontal flip. aspect = W / H of the images the matrices are for (``augment``
    passes its images' aspect), so rotations stay rotations on non-square images."""
    params = _params("random_affine", degrees, translate, scale, stretch, shear, flip_p, aspect)
    n = integer("random_affine", "n", n, 0)
    seed, offset = check_stream("random_affine", seed, offset, n, allow_none=True)
    if seed is None:
        seed = fresh_seed()
    return _ref_thetas(xp, n, seed, offset, params)


def augment(x, seed, offset=0, *, degrees=0.0, translate=(0.0, 0.0), scale=(1.0, 1.0),
            stretch=0.0, shear=0.0, flip_p=0.0, out=None, backend=None):
    """Each sample n of x warped by its own random affine matrix and flipped with probability
    flip_p: ``affine_warp(x, random_affine(N, seed, offset, ..., aspect=W/H))``, fused (one
    kernel launch on cuda, one parallel Numba call on cpu).

    x: (N, C, H, W) or (N, H, W). seed: integer in [0, 2^64) (None: a fresh one from NumPy's
    global generator); sample n uses stream position offset + n, so the same (seed, offset)
    gives the same result, bit for bit, on one backend. The options are random_affine's.
    ``out`` may not overlap x."""
    params = _params("augment", degrees, translate, scale, stretch, shear, flip_p)
    call = resolve("augment", backend, x=x, out=out)
    with call.context():
        xn = call.native(x, "x")
        _check_images("augment", xn)
        seed, offset = check_stream("augment", seed, offset, xn.shape[0], allow_none=True)
        yn = _output("augment", call, out, xn)
        if xn.size:
            if seed is None:
                seed = fresh_seed()
            h, w = xn.shape[-2:]
            params = params[:-1] + (w / h,)
            IMPLS[call.backend][1](_as4(xn), _as4(yn), seed, offset, params)
    return call.wrap(yn, out)
