// sim.cuh: what CUDA C++ kernels expect from the device compiler, for a host C++17 compiler.
//
// Force-included (g++ -include) before a kernels/<family>.cu text that the CUDA simulator
// (gpunn/cuda_sim) compiles for the host. Each CUDA thread runs as a fiber of runtime.cpp;
// threadIdx, blockIdx, blockDim and gridDim read the running fiber's state. Barriers and warp
// collectives suspend the fiber until the threads they name have arrived (or report a
// deadlock). __shared__ variables are static storage that the link script shared.ld gathers,
// filled with 0xFF before each block. Atomics are plain read-modify-writes: fibers switch only
// at barriers and warp collectives, and blocks run one after another.
#pragma once

#define GPUNN_CUDA_SIM 1

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __constant__ static const
#define __shared__ static  // gathered by shared.ld (the module's link script)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};

namespace gpunn_sim {

#define GPUNN_SIM_API __attribute__((visibility("default")))

// The running thread's index and its block's (set by the scheduler in the runtime library).
GPUNN_SIM_API extern const uint3* thread_idx;
GPUNN_SIM_API extern uint3 block_idx;
GPUNN_SIM_API extern dim3 block_dim, grid_dim;

// Warp collectives: what each lane hands in and what it asks for.
enum Collective { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL, SYNCWARP };

GPUNN_SIM_API void barrier(const char* file, int line);
GPUNN_SIM_API unsigned long long collective(Collective kind, unsigned mask, unsigned long long value,
                                            int b, int width, const char* file, int line);

template <typename T> inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8, "a warp shuffle moves at most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T> inline T from_bits(unsigned long long bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename To, typename From> inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

// Element type codes of kernel parameters, checked against the arguments at launch:
// f/i/u/b + size in bytes, h2/B2 for the 16-bit float types (specialized after the kernel
// source), v for void, S<size> for any other struct; a leading '*' for a pointer.
template <typename T, typename = void> struct TypeCode {
  static void put(char* out) { std::snprintf(out, 16, "S%zu", sizeof(T)); }
};
template <> struct TypeCode<void> {
  static void put(char* out) { std::snprintf(out, 16, "v"); }
};
template <> struct TypeCode<bool> {
  static void put(char* out) { std::snprintf(out, 16, "b1"); }
};
template <typename T>
struct TypeCode<T, std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, bool>>> {
  static void put(char* out) {
    const char kind = std::is_floating_point_v<T> ? 'f' : std::is_signed_v<T> ? 'i' : 'u';
    std::snprintf(out, 16, "%c%zu", kind, sizeof(T));
  }
};
template <typename T> struct TypeCode<T*> {
  static void put(char* out) {
    out[0] = '*';
    TypeCode<std::remove_cv_t<T>>::put(out + 1);
  }
};

// "code,code,..." of a kernel's parameters, written to out (no static buffer: every static
// local of a kernel module is taken for __shared__ memory).
template <typename... P> inline void signature(void (*)(P...), char* out, std::size_t size) {
  char text[32 * 24];
  char* p = text;
  *p = 0;
  ((TypeCode<std::remove_cv_t<P>>::put(p), p += std::strlen(p), *p++ = ',', *p = 0), ...);
  if (p > text) p[-1] = 0;
  std::snprintf(out, size, "%s", text);
}

// Call a kernel with its arguments given as pointers to their values (cuLaunchKernel's
// kernelParams layout).
template <typename... P, std::size_t... I>
inline void invoke(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}
template <typename... P> inline void invoke(void (*kernel)(P...), void** args) {
  invoke(kernel, args, std::index_sequence_for<P...>{});
}

}  // namespace gpunn_sim

#define threadIdx (*::gpunn_sim::thread_idx)
#define blockIdx (static_cast<const uint3&>(::gpunn_sim::block_idx))
#define blockDim (static_cast<const dim3&>(::gpunn_sim::block_dim))
#define gridDim (static_cast<const dim3&>(::gpunn_sim::grid_dim))
#define warpSize 32

// --- synchronization ---------------------------------------------------------------------------

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::gpunn_sim::barrier(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::gpunn_sim::collective(::gpunn_sim::SYNCWARP, mask, 0, 0, 32, file, line);
}
inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }

// --- warp shuffles and votes -------------------------------------------------------------------

#define GPUNN_SIM_SHUFFLE(name, kind)                                                          \
  template <typename T>                                                                        \
  inline T name(unsigned mask, T var, int b, int width = 32,                                   \
                const char* file = __builtin_FILE(), int line = __builtin_LINE()) {            \
    return ::gpunn_sim::from_bits<T>(::gpunn_sim::collective(                                  \
        ::gpunn_sim::kind, mask, ::gpunn_sim::to_bits(var), b, width, file, line));            \
  }
GPUNN_SIM_SHUFFLE(__shfl_sync, SHFL_IDX)
GPUNN_SIM_SHUFFLE(__shfl_up_sync, SHFL_UP)
GPUNN_SIM_SHUFFLE(__shfl_down_sync, SHFL_DOWN)
GPUNN_SIM_SHUFFLE(__shfl_xor_sync, SHFL_XOR)
#undef GPUNN_SIM_SHUFFLE

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      ::gpunn_sim::collective(::gpunn_sim::BALLOT, mask, pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(
      ::gpunn_sim::collective(::gpunn_sim::ANY, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(
      ::gpunn_sim::collective(::gpunn_sim::ALL, mask, pred != 0, 0, 32, file, line));
}

// --- atomics (no fiber switch can fall inside one) ----------------------------------------------

template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <typename T> inline T atomicAnd(T* p, T v) { T old = *p; *p = old & v; return old; }
template <typename T> inline T atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
template <typename T> inline T atomicXor(T* p, T v) { T old = *p; *p = old ^ v; return old; }
template <typename T> inline T atomicCAS(T* p, T compare, T v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  unsigned old = *p;
  *p = old >= limit ? 0u : old + 1u;
  return old;
}

// --- bit casts and integer intrinsics ------------------------------------------------------------

inline unsigned __float_as_uint(float v) { return gpunn_sim::bit_cast<unsigned>(v); }
inline int __float_as_int(float v) { return gpunn_sim::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return gpunn_sim::bit_cast<float>(v); }
inline float __int_as_float(int v) { return gpunn_sim::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return gpunn_sim::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return gpunn_sim::bit_cast<double>(v); }
inline int __double2hiint(double v) { return static_cast<int>(__double_as_longlong(v) >> 32); }
inline int __double2loint(double v) { return static_cast<int>(__double_as_longlong(v)); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double(static_cast<long long>(
      (static_cast<unsigned long long>(static_cast<unsigned>(hi)) << 32) | static_cast<unsigned>(lo)));
}

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) {
  return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v));
}
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}

// --- rounded arithmetic: never contracted into an FMA -------------------------------------------
// The empty asm makes the compiler materialize the rounded result, so -ffp-contract=fast (which
// mirrors NVRTC's default contraction elsewhere) cannot fuse it with a following add.

template <typename T> inline T gpunn_sim_rounded(T v) {
  __asm__("" : "+x"(v));
  return v;
}
inline float __fmul_rn(float a, float b) { return gpunn_sim_rounded(a * b); }
inline double __dmul_rn(double a, double b) { return gpunn_sim_rounded(a * b); }
inline float __fadd_rn(float a, float b) { return gpunn_sim_rounded(a + b); }
inline double __dadd_rn(double a, double b) { return gpunn_sim_rounded(a + b); }
inline float __fsub_rn(float a, float b) { return gpunn_sim_rounded(a - b); }
inline double __dsub_rn(double a, double b) { return gpunn_sim_rounded(a - b); }
inline float __fdiv_rn(float a, float b) { return gpunn_sim_rounded(a / b); }
inline double __ddiv_rn(double a, double b) { return gpunn_sim_rounded(a / b); }
inline float __frcp_rn(float a) { return gpunn_sim_rounded(1.0f / a); }
inline double __drcp_rn(double a) { return gpunn_sim_rounded(1.0 / a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }

// --- math: the host's libm (CUDA's own libm differs by an ulp or two) ----------------------------

inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a != a ? 0.0f : a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
template <typename T> inline T __ldg(const T* p) { return *p; }

// CUDA's min/max: fmin/fmax for floating-point arguments (NaN loses), else the smaller/larger
// value in the common type.
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) {
  using R = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<R>) return std::fmin(R(a), R(b));
  else return R(b) < R(a) ? R(b) : R(a);
}
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) {
  using R = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<R>) return std::fmax(R(a), R(b));
  else return R(a) < R(b) ? R(b) : R(a);
}
