// common.cuh: what every gpunn kernel family shares.
//
//   storage types   gpunn::half, gpunn::bfloat16 (16-bit, defined here: no CUDA headers needed),
//                   float, double
//   compute_t<T>    the type the math is done in: float for the 16-bit types and float,
//                   double for double
//   to_compute / from_compute   typed load and store conversions
//   Vec<T>          16 bytes of T, for 128-bit loads and stores
//   math::          exp, expm1, log, tanh, erfc overloaded on float / double
//   reductions      warp (shuffle) and block (shuffle + shared memory) sum and max, and the
//                   (max, sum) pair of the online softmax; all in a fixed order, so results are
//                   the same run to run
//
// The text is compiled by NVRTC with no include paths and no CUDA headers: only NVRTC's
// built-in device functions (expf, __shfl_xor_sync, __float_as_uint, ...) are used.
// Element counts and indices are 64-bit (long long); only offsets inside a row shorter than
// 2^31 (softmax's *_rows kernels, whose n is an int) are int.
#pragma once

namespace gpunn {

// --- 16-bit storage types ----------------------------------------------------------------------

// IEEE binary16 and bfloat16, as raw bits (layout and alignment of __half / __nv_bfloat16).
struct alignas(2) half {
  unsigned short bits;
};
struct alignas(2) bfloat16 {
  unsigned short bits;
};

// compute_t<T>: float for half, bfloat16 and float; double for double.
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };
template <typename T> using compute_t = typename Compute<T>::type;

// --- load: storage -> compute --------------------------------------------------------------------

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }

__device__ __forceinline__ float to_compute(half v) {
#ifdef GPUNN_CUDA_SIM  // the host version of the CUDA simulator (gpunn/cuda_sim): exact
  const unsigned sign = (static_cast<unsigned>(v.bits) & 0x8000u) << 16;
  const unsigned exponent = (v.bits >> 10) & 0x1fu, mantissa = v.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return __uint_as_float(__float_as_uint(magnitude) | sign);
  }
  if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));  // exact
  return f;
#endif
}

__device__ __forceinline__ float to_compute(bfloat16 v) {
  return __uint_as_float(static_cast<unsigned>(v.bits) << 16);  // bf16 is the top half of f32
}

// --- store: compute -> storage (round to nearest even) ---------------------------------------

template <typename T> __device__ __forceinline__ T from_compute(compute_t<T> c);

template <> __device__ __forceinline__ float from_compute<float>(float c) { return c; }
template <> __device__ __forceinline__ double from_compute<double>(double c) { return c; }

template <> __device__ __forceinline__ half from_compute<half>(float c) {
  half h;
#ifdef GPUNN_CUDA_SIM  // the host version of the CUDA simulator: ties to even, NaN stays NaN
  const unsigned u = __float_as_uint(c), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {
    h.bits = static_cast<unsigned short>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // quiet NaN
  } else if (a >= 0x477ff000u) {  // 65520 and above round to inf
    h.bits = static_cast<unsigned short>(sign | 0x7c00u);
  } else if (a >= 0x38800000u) {  // a normal half: drop 13 bits, ties to even (carries are fine)
    unsigned bits = ((a >> 23) - 112u) << 10 | ((a & 0x7fffffu) >> 13);
    const unsigned rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (bits & 1u))) bits += 1u;
    h.bits = static_cast<unsigned short>(sign | bits);
  } else {  // subnormal or zero: units of 2^-24, rounded to nearest even by nearbyintf
    const float units = __uint_as_float(a) * 16777216.0f;
    h.bits = static_cast<unsigned short>(sign | static_cast<unsigned>(nearbyintf(units)));
  }
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(c));
#endif
  return h;
}

template <> __device__ __forceinline__ bfloat16 from_compute<bfloat16>(float c) {
  bfloat16 b;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(c));
#else
  unsigned u = __float_as_uint(c);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = static_cast<unsigned short>((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (overflow -> inf)
    b.bits = static_cast<unsigned short>(u >> 16);
  }
#endif
  return b;
}

// --- 16-byte vectors -----------------------------------------------------------------------------

// Vec<T>: N = 16 / sizeof(T) elements moved by one 128-bit load or store.
template <typename T> struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// True when p is 16-byte aligned (then p can be read and written as Vec<T>).
__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// --- float / double math overloads (IEEE-accurate library versions, not the __fast ones) -------

namespace math {
__device__ __forceinline__ float exp(float x) { return ::expf(x); }
__device__ __forceinline__ double exp(double x) { return ::exp(x); }
__device__ __forceinline__ float expm1(float x) { return ::expm1f(x); }
__device__ __forceinline__ double expm1(double x) { return ::expm1(x); }
__device__ __forceinline__ float log(float x) { return ::logf(x); }
__device__ __forceinline__ double log(double x) { return ::log(x); }
__device__ __forceinline__ float tanh(float x) { return ::tanhf(x); }
__device__ __forceinline__ double tanh(double x) { return ::tanh(x); }
__device__ __forceinline__ float erfc(float x) { return ::erfcf(x); }
__device__ __forceinline__ double erfc(double x) { return ::erfc(x); }

// Products rounded on their own: a * b + c * d contracted to fma(a, b, c * d) would round
// differently from fma(c, d, a * b), and the butterfly needs combine(a, b) == combine(b, a).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename C> __device__ __forceinline__ C inf();
template <> __device__ __forceinline__ float inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf<double>() {
  return __longlong_as_double(0x7ff0000000000000ll);
}

template <typename C> __device__ __forceinline__ C nan();
template <> __device__ __forceinline__ float nan<float>() { return __int_as_float(0x7fffffff); }
template <> __device__ __forceinline__ double nan<double>() {
  return __longlong_as_double(0x7fffffffffffffffll);
}

// max that propagates NaN (fmax would drop it): max(a, NaN) = max(NaN, a) = NaN.
template <typename C> __device__ __forceinline__ C nan_max(C a, C b) {
  return (a > b || a != a) ? a : b;
}
}  // namespace math

// --- reductions --------------------------------------------------------------------------------
//
// Warp reductions use the xor butterfly, so every lane ends with the same value (a + b and b + a
// round alike). Block reductions need blockDim.x to be a multiple of 32 (at most 1024), must be
// called by every thread of the block, and return the result to every thread.

struct SumOp {
  template <typename C> __device__ __forceinline__ C operator()(C a, C b) const { return a + b; }
  template <typename C> __device__ __forceinline__ static C identity() { return C(0); }
};

struct MaxOp {
  template <typename C> __device__ __forceinline__ C operator()(C a, C b) const {
    return math::nan_max(a, b);
  }
  template <typename C> __device__ __forceinline__ static C identity() { return -math::inf<C>(); }
};

template <typename C, typename Op> __device__ __forceinline__ C warp_reduce(C v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename C> __device__ __forceinline__ C warp_sum(C v) { return warp_reduce(v, SumOp()); }
template <typename C> __device__ __forceinline__ C warp_max(C v) { return warp_reduce(v, MaxOp()); }

// Block reduction: each warp reduces, warp w's result goes to partial[w], then every warp
// reduces the partials (so all threads get the result without another barrier).
template <typename C, typename Op> __device__ __forceinline__ C block_reduce(C v, Op op) {
  __shared__ C partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // the previous call's readers are done with partial[]
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : Op::template identity<C>();
  return warp_reduce(v, op);
}

template <typename C> __device__ __forceinline__ C block_sum(C v) {
  return block_reduce(v, SumOp());
}
template <typename C> __device__ __forceinline__ C block_max(C v) {
  return block_reduce(v, MaxOp());
}

// --- the (max, sum) pair of the online softmax ---------------------------------------------------
//
// A pair (m, s) stands for s = sum_i exp(x_i - m) over the elements seen, m their max;
// the empty pair is (-inf, 0). Non-finite inputs give PyTorch's results downstream:
//   only -inf so far: (-inf, 0), never exp(-inf - -inf) = NaN;
//   a +inf or a NaN:  s = NaN, which makes the whole row NaN.

template <typename C> struct MaxSum {
  C m, s;
};

// Fold one element x into (m, s): s = s * exp(m - m_new) + exp(x - m_new), one exp per element.
template <typename C> __device__ __forceinline__ void online_add(C& m, C& s, C x) {
  if (x > m) {  // a new max (finite or +inf; never NaN)
    const C one = x == math::inf<C>() ? math::nan<C>() : C(1);  // exp(x - x): NaN for +inf
    s = s * math::exp(m - x) + one;  // m = -inf: 0 * exp(-inf) + 1 = 1
    m = x;
  } else if (x != -math::inf<C>()) {  // x <= m, or x NaN: NaN poisons s, as it should
    s += math::exp(x - m);             // x = m = +inf: exp(NaN) = NaN
  }
}

// Apply fold(v) to this thread's elements v = xr[i], i = t, t + B, ... below n (in the compute
// type), UNROLL loads in flight before the folds.
template <int UNROLL, typename T, typename Fold>
__device__ __forceinline__ void fold_strided(const T* xr, long long t, long long B, long long n,
                                             Fold fold) {
  long long i = t;
  for (; i + (UNROLL - 1) * B < n; i += UNROLL * B) {
    compute_t<T> v[UNROLL];
#pragma unroll
    for (int k = 0; k < UNROLL; ++k) v[k] = to_compute(xr[i + k * B]);
#pragma unroll
    for (int k = 0; k < UNROLL; ++k) fold(v[k]);
  }
  for (; i < n; i += B) fold(to_compute(xr[i]));
}

// Combine two pairs: m = max(a.m, b.m), s = a.s * exp(a.m - m) + b.s * exp(b.m - m).
struct MaxSumOp {
  template <typename C>
  __device__ __forceinline__ MaxSum<C> operator()(MaxSum<C> a, MaxSum<C> b) const {
    const C m = math::nan_max(a.m, b.m);
    if (m == -math::inf<C>()) return {m, a.s + b.s};  // both empty (s = 0): no -inf - -inf
    return {m, math::mul_rn(a.s, math::exp(a.m - m)) + math::mul_rn(b.s, math::exp(b.m - m))};
  }
  template <typename C> __device__ __forceinline__ static MaxSum<C> identity() {
    return {-math::inf<C>(), C(0)};
  }
};

template <typename C> __device__ __forceinline__ MaxSum<C> warp_max_sum(MaxSum<C> p) {
  const MaxSumOp op;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum<C> q = {__shfl_xor_sync(0xffffffffu, p.m, offset),
                         __shfl_xor_sync(0xffffffffu, p.s, offset)};
    p = op(p, q);
  }
  return p;
}

// Block (max, sum): as block_reduce, on the pair.
template <typename C> __device__ __forceinline__ MaxSum<C> block_max_sum(MaxSum<C> p) {
  __shared__ C partial_m[32], partial_s[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  p = warp_max_sum(p);
  __syncthreads();
  if (lane == 0) {
    partial_m[warp] = p.m;
    partial_s[warp] = p.s;
  }
  __syncthreads();
  p = lane < warps ? MaxSum<C>{partial_m[lane], partial_s[lane]} : MaxSumOp::identity<C>();
  return warp_max_sum(p);
}

}  // namespace gpunn
