// softmax.cu: softmax and log_softmax over the last axis of a C-contiguous (rows, n) array.
//
// forward, m = max_j x_j, s = sum_j exp(x_j - m):
//   softmax      y = exp(x - m) / s
//   log_softmax  y = (x - m) - log(s)
// backward, from the forward's output y:
//   softmax      dx = y * (dy - sum_j dy_j * y_j)
//   log_softmax  dx = dy - exp(y) * sum_j dy_j
//
// PyTorch's edge cases: a row of all -inf is NaN everywhere; -inf entries next to finite ones
// give 0 (log: -inf); a +inf or a NaN anywhere makes the whole row NaN; +-1e30 never overflows.
// They come from the guarded (max, sum) pair of common.cuh (online_add, MaxSumOp).
//
// One block per row (grid-stride over rows); blockDim.x is a power of two from 32 to 1024.
//   *_rows  n <= blockDim.x * ITEMS: the row lives in registers, element k of thread t at
//           index t + k * blockDim.x (coalesced), so it is read once and written once
//           (where the values fit: see MAX_HELD; the rest are read twice, from cache).
//   *_long  any n: a reduction pass, then a write pass that reads the row again.
// __launch_bounds__(1024, 1): any block size up to 1024 launches (at most 64 registers a
// thread), and ptxas does not squeeze a kernel into 32 registers to fit two 1024-thread blocks
// on an SM (it did without the 1, and spilled).
// Reductions are in a fixed order (no atomics): results are the same run to run.
// x may alias y and dy may alias dx: every element is read before the block's first barrier
// or re-read and written by the same thread after it.
#include "common.cuh"

namespace gpunn {

// Row values a thread holds in registers at most, of the 64 it has; the rest go to addresses,
// loop state and the math (double exp needs many). Past this a kernel holds fewer values and
// reads the others again (from cache: the block has just read the row). Set from ptxas -v:
// no instantiation spills on sm_90 (on sm_80 three softmax_backward_rows<., false, 32> spill
// 8 to 24 bytes, cheaper than reading the row twice).
template <typename C> constexpr int MAX_HELD = 32;
template <> constexpr int MAX_HELD<double> = 4;

// y for one element, given the row's max m and s_term = 1 / s (softmax) or log(s) (log_softmax).
// All -inf: exp(-inf - -inf) = NaN and (-inf - -inf) - log(0) = NaN, as PyTorch.
template <bool LOG, typename C> __device__ __forceinline__ C softmax_value(C x, C m, C s_term) {
  return LOG ? (x - m) - s_term : math::exp(x - m) * s_term;
}

template <bool LOG, typename C> __device__ __forceinline__ C softmax_s_term(C s) {
  return LOG ? math::log(s) : C(1) / s;
}

// What the backward sums: dy * y (softmax) or dy (log_softmax).
template <bool LOG, typename C> __device__ __forceinline__ C softmax_grad_term(C dy, C y) {
  return LOG ? dy : dy * y;
}

// dx for one element, given d = sum(dy * y) (softmax) or sum(dy) (log_softmax).
template <bool LOG, typename C> __device__ __forceinline__ C softmax_grad(C dy, C y, C d) {
  return LOG ? dy - math::exp(y) * d : y * (dy - d);
}

// --- rows of up to blockDim.x * ITEMS elements, held in registers ----------------------------
//
// Thread t's elements of a row are p[k * B], k < ITEMS, for k * B < left, with p the row's
// base + t and left = n - t. The per-thread pointers step by gridDim.x rows (computing them
// from r * n each row costs registers, measured: spills at ITEMS = 32).

template <typename T, bool LOG, int ITEMS>
__global__ void __launch_bounds__(1024, 1)
softmax_forward_rows(const T* x, T* y, long long rows, int n) {
  using C = compute_t<T>;
  constexpr bool HOLD = ITEMS <= MAX_HELD<C>;  // else x is read again to write y
  const int t = threadIdx.x, B = blockDim.x, left = n - t;
  const long long first = blockIdx.x * static_cast<long long>(n) + t;
  const long long step = gridDim.x * static_cast<long long>(n);
  const T* xt = x + first;
  T* yt = y + first;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x, xt += step, yt += step) {
    if constexpr (HOLD) {
      // v = x (padding: -inf); m_t = max_k v_k (NaN wins)
      C v[ITEMS];
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) v[k] = k * B < left ? to_compute(xt[k * B]) : -math::inf<C>();
      C m = -math::inf<C>();
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) m = math::nan_max(m, v[k]);
      // s_t = sum_k exp(x_k - m_t), -inf terms 0 (no -inf - -inf when m_t = -inf);
      // softmax keeps e_k = exp(x_k - m_t) in v
      C s = C(0);
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const C e = v[k] == -math::inf<C>() ? C(0) : math::exp(v[k] - m);
        s += e;
        if (!LOG) v[k] = e;
      }
      const MaxSum<C> row = block_max_sum(MaxSum<C>{m, s});

      if (LOG) {
        // y = (x - m) - log(s)
        const C log_s = math::log(row.s);
#pragma unroll
        for (int k = 0; k < ITEMS; ++k)
          if (k * B < left) yt[k * B] = from_compute<T>((v[k] - row.m) - log_s);
      } else {
        // y = e_k * exp(m_t - m) / s; all -inf: 0 * NaN = NaN, as it should
        const C scale = math::exp(m - row.m) / row.s;
#pragma unroll
        for (int k = 0; k < ITEMS; ++k)
          if (k * B < left) yt[k * B] = from_compute<T>(v[k] * scale);
      }
    } else {
      // online (m_t, s_t) over the thread's elements, then a pass that reads x again
      MaxSum<C> p = MaxSumOp::identity<C>();
#pragma unroll 4
      for (int k = 0; k < ITEMS; ++k)
        if (k * B < left) online_add(p.m, p.s, to_compute(xt[k * B]));
      const MaxSum<C> row = block_max_sum(p);
      const C s_term = softmax_s_term<LOG>(row.s);
#pragma unroll 4
      for (int k = 0; k < ITEMS; ++k)
        if (k * B < left)
          yt[k * B] = from_compute<T>(softmax_value<LOG>(to_compute(xt[k * B]), row.m, s_term));
    }
  }
}

template <typename T, bool LOG, int ITEMS>
__global__ void __launch_bounds__(1024, 1)
softmax_backward_rows(const T* dy, const T* y, T* dx, long long rows, int n) {
  using C = compute_t<T>;
  // softmax: the sum needs dy and y; y is held, and dy too when both fit.
  // log_softmax: the sum needs dy only, which is held; y is read in the second pass.
  // What is not held is read again for dx.
  constexpr bool HOLD_Y = !LOG && ITEMS <= MAX_HELD<C>;
  constexpr bool HOLD_DY = LOG ? ITEMS <= MAX_HELD<C> : 2 * ITEMS <= MAX_HELD<C>;
  const int t = threadIdx.x, B = blockDim.x, left = n - t;
  const long long first = blockIdx.x * static_cast<long long>(n) + t;
  const long long step = gridDim.x * static_cast<long long>(n);
  const T* dyt = dy + first;
  const T* yt = y + first;
  T* dxt = dx + first;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x, dyt += step, yt += step, dxt += step) {
    // d = sum(dy * y) or sum(dy), padding 0
    C dy_held[HOLD_DY ? ITEMS : 1], y_held[HOLD_Y ? ITEMS : 1];
    C d = C(0);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const bool in = k * B < left;
      const C dyk = in ? to_compute(dyt[k * B]) : C(0);
      const C yk = !LOG && in ? to_compute(yt[k * B]) : C(0);
      d += softmax_grad_term<LOG>(dyk, yk);
      if constexpr (HOLD_DY) dy_held[k] = dyk;
      if constexpr (HOLD_Y) y_held[k] = yk;
    }
    d = block_sum(d);

    // dx = y * (dy - d) or dy - exp(y) * d
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      if (k * B < left) {
        C dyk, yk;
        if constexpr (HOLD_DY) dyk = dy_held[k]; else dyk = to_compute(dyt[k * B]);
        if constexpr (HOLD_Y) yk = y_held[k]; else yk = to_compute(yt[k * B]);
        dxt[k * B] = from_compute<T>(softmax_grad<LOG>(dyk, yk, d));
      }
    }
  }
}

// --- rows of any length: a reduction pass, then a write pass ----------------------------------

template <typename T, bool LOG>
__global__ void __launch_bounds__(1024, 1)
softmax_forward_long(const T* x, T* y, long long rows, long long n) {
  using C = compute_t<T>;
  constexpr int UNROLL = 4;  // loads in flight per thread in the reduction pass
  const long long t = threadIdx.x, B = blockDim.x;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * n;
    T* yr = y + r * n;

    // this thread's (m, s) over x[t], x[t + B], ...: s = s * exp(m - m_new) + exp(x - m_new)
    MaxSum<C> p = MaxSumOp::identity<C>();
    fold_strided<UNROLL>(xr, t, B, n, [&](C v) { online_add(p.m, p.s, v); });
    const MaxSum<C> row = block_max_sum(p);

    const C s_term = softmax_s_term<LOG>(row.s);
    for (long long i = t; i < n; i += B)
      yr[i] = from_compute<T>(softmax_value<LOG>(to_compute(xr[i]), row.m, s_term));
  }
}

template <typename T, bool LOG>
__global__ void __launch_bounds__(1024, 1)
softmax_backward_long(const T* dy, const T* y, T* dx, long long rows, long long n) {
  using C = compute_t<T>;
  constexpr int UNROLL = 4;  // loads in flight per thread in the reduction pass
  const long long t = threadIdx.x, B = blockDim.x;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* dyr = dy + r * n;
    const T* yr = y + r * n;
    T* dxr = dx + r * n;

    C d = C(0);  // sum(dy * y) or sum(dy), in a fixed order
    long long i = t;
    for (; i + (UNROLL - 1) * B < n; i += UNROLL * B) {
      C dyk[UNROLL], yk[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        dyk[k] = to_compute(dyr[i + k * B]);
        yk[k] = to_compute(yr[i + k * B]);
      }
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) d += softmax_grad_term<LOG>(dyk[k], yk[k]);
    }
    for (; i < n; i += B) d += softmax_grad_term<LOG>(to_compute(dyr[i]), to_compute(yr[i]));
    d = block_sum(d);

    for (i = t; i < n; i += B)
      dxr[i] = from_compute<T>(softmax_grad<LOG>(to_compute(dyr[i]), to_compute(yr[i]), d));
  }
}

}  // namespace gpunn
