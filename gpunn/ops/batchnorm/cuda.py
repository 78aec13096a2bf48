"""Batch normalization on CUDA: the launcher of ``kernels/batchnorm.cu`` (its launch order,
reductions and elementwise passes are described at the top of that file; the math in
:mod:`gpunn.ops.batchnorm`).

The constants the kernels and this launcher share are defined here once and reach the kernels
as ``constexpr`` in namespace gpunn (:class:`gpunn.cuda.Family`'s ``constants``)."""

from __future__ import annotations

import numpy as np

from ... import cuda

#: Every kernel's block size (BN_THREADS).
THREADS = 256
#: Vectors a thread loads at once in the reductions (BN_UNROLL).
UNROLL = 4
#: Values per channel of the coefficients the finalize kernels write for the elementwise
#: passes: forward (mean, scale, beta, 0), backward (mean, scale, beta, k1, k2, k3, 0, 0)
#: (BN_COEF_FORWARD, BN_COEF_BACKWARD).
COEF_FORWARD = 4
COEF_BACKWARD = 8
#: NCHW inputs whose spatial extent B is at least this use the rows reduction on the GPU.
GPU_ROWS_MIN = 32
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
        f"gpunn::bn_finalize_backward<{ctype}>")],
    constants={"BN_THREADS": THREADS, "BN_UNROLL": UNROLL, "BN_COEF_FORWARD": COEF_FORWARD,
               "BN_COEF_BACKWARD": COEF_BACKWARD})


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


def cuda_forward(x3, w, b, rm, rv, mean, invstd, y3, use_batch, update, factor, eps, relu):
    import cupy

    A, C, B = x3.shape
    params_f32 = _params_f32(x3, w, b, rm, rv)
    if use_batch:
        part, stride, sc, ss, S, Bc = _cuda_reduce(False, x3, None, None, None, None, None,
                                                   params_f32, False)
    else:
        part, stride, sc, ss, S, Bc = None, 0, 0, 0, 0, 0
    coef = cupy.empty(COEF_FORWARD * C, mean.dtype)
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


def cuda_backward(dy3, x3, mean, invstd, w, b, dx3, dw, db, training, relu):
    import cupy

    A, C, B = x3.shape
    params_f32 = _params_f32(x3, w, b, dw)
    part, stride, sc, ss, S, Bc = _cuda_reduce(True, x3, dy3, mean, invstd, w, b, params_f32,
                                               relu)
    coef = cupy.empty(COEF_BACKWARD * C, mean.dtype)
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

