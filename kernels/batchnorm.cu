// batchnorm.cu: batch normalization and BN + ReLU, forward and backward, over x seen as a
// C-contiguous (A, C, B) array (NCHW: A = N, B = H*W; channels last: A = N*H*W, B = 1).
// The math, the layouts and the dtypes are described in gpunn/ops/batchnorm/ (the package's
// docstring); the names here are the same. BN_THREADS (every kernel's block size), BN_UNROLL
// and BN_COEF_FORWARD / BN_COEF_BACKWARD (values per channel in coef) are defined once, in
// the launcher gpunn/ops/batchnorm/cuda.py, which puts them ahead of this text as constexpr.
//
// Launch order
//   training forward  bn_reduce_{rows|cols}<T, V, false>  partial (n, mean, M2) of each piece
//                     bn_finalize_forward<T>               per channel: merge the partials,
//                         mean, invstd, running statistics, coef = (mean, scale, beta, 0)
//                     bn_normalize_{flat|cols}<T, V>       y = (x - mean) * scale + beta [ReLU]
//   eval forward      bn_finalize_forward (running statistics) and bn_normalize_*
//   backward          bn_reduce_{rows|cols}<T, V, true>   partial (sum g, sum g * (x - mean)),
//                         g = dy, or for BN + ReLU dy masked by the recomputed output
//                     bn_finalize_backward<T>              dweight, dbias,
//                         coef = (mean, scale, beta, k1, k2, k3, 0, 0)
//                     bn_dx_{flat|cols}<T, V>             dx = k1 (g + k2 (x - mean) + k3)
//
// Reductions
//   rows  (B >= GPU_ROWS_MIN): block = (channel c, slice s of its A*B values); slice s covers
//         rows [a0, a1) and columns [b0, b1) of the channel's (A, B) plane. tpr threads share a
//         row (a power of two covering the slice's columns in vectors of V), rpp = blockDim/tpr
//         rows are read at once. Partial index c * S + s.
//   cols  (B small): x as (A, K = C * B). Block = (tile of TX * V columns, slice s of the rows);
//         thread (tx, ty) holds V columns and reads every TY-th row, then the TY threads of a
//         column are merged through shared memory. Partial index s * K + k; the finalize folds
//         the B columns of a channel (k = c * B + j) as well as the S slices.
//   Each thread folds its values BN_UNROLL vectors at a time (all loads first, so that they are
//   in flight together): forward as one group, its mean and centered sum of squares by two
//   passes over registers and then Chan's update of (n, mean, M2), one division per group;
//   backward as plain sums. Threads, warps, blocks and partials are combined in a fixed order
//   (shuffle-down trees, shared memory, a warp per channel in the finalize): no atomics, the
//   same result every run.
//   Overflow: the sums are float for the 16-bit types and float; for float data of magnitude
//   ~1e18 and beyond the squares (or g * (x - mean)) overflow. A channel whose merged result is
//   inf or NaN is summed again by its finalize warp, in double, from x (and dy): a test per
//   channel, nothing per value. So finite data gets finite statistics and gradients, and data
//   holding inf or NaN still gets NaN (after that slower second pass).
//   The dx coefficients are k1 = weight * invstd, k2 = -invstd^2 sum(g (x - mean)) / n ~ 1/std,
//   k3 = -sum(g) / n: k2 is formed as invstd * (invstd * sum / n), so it never underflows.
// Elementwise passes
//   flat  (B > 1): vectors of V along rows (B % V == 0, else V = 1); each thread walks the
//         vectors i, i + G, ... (grid stride G), two at a time, tracking each vector's channel
//         incrementally (no division per vector).
//   cols  (B == 1): each thread keeps V channels and walks rows; V channels in one 16-byte
//         vector when C % V == 0.
//   x may alias y, and dy may alias dx: each element is read before the same thread writes it.
//
// The ReLU mask: the backward recomputes z = fma(x - mean, scale, beta) exactly as the forward
// did (explicit fma, scale = invstd * weight by one rounded product in both) and rounds it to T
// before the test, so "z > 0" is torch's test on the stored y. NaN z passes dy (torch's
// threshold_backward tests y <= 0).
#include "common.cuh"

namespace gpunn {

namespace bn {

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float sqrt_rn(float v) { return __fsqrt_rn(v); }
__device__ __forceinline__ double sqrt_rn(double v) { return __dsqrt_rn(v); }

// The value z would have once stored as T (the identity for float and double).
template <typename T> __device__ __forceinline__ compute_t<T> as_stored(compute_t<T> z) {
  return to_compute(from_compute<T>(z));
}

// A per-channel parameter: stored as float32 when params_f32 (beside 16-bit x), else as T;
// a null pointer (absent parameter) reads as dflt.
template <typename T>
__device__ __forceinline__ compute_t<T> load_param(const void* p, int params_f32, long long c,
                                                   compute_t<T> dflt) {
  if (p == nullptr) return dflt;
  if (params_f32) return static_cast<compute_t<T>>(static_cast<const float*>(p)[c]);
  return to_compute(static_cast<const T*>(p)[c]);
}

template <typename T>
__device__ __forceinline__ void store_param(void* p, int params_f32, long long c,
                                            compute_t<T> v) {
  if (params_f32)
    static_cast<float*>(p)[c] = static_cast<float>(v);
  else
    static_cast<T*>(p)[c] = from_compute<T>(v);
}

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, compute_t<T> (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_compute(p[0]);
  } else {
    static_assert(V == Vec<T>::N, "V is 1 or a whole 16-byte vector");
    const Vec<T> v = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_compute(v.v[j]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const compute_t<T> (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = from_compute<T>(in[0]);
  } else {
    Vec<T> v;
#pragma unroll
    for (int j = 0; j < V; ++j) v.v[j] = from_compute<T>(in[j]);
    *reinterpret_cast<Vec<T>*>(p) = v;
  }
}

// --- partial results and how they combine ------------------------------------------------------

template <typename C> struct Triple {
  C a, b, c;
};

// Forward: (n, mean, M2), M2 the sum of squared deviations from the mean; Chan's update.
struct Moments {
  template <typename C>
  static __device__ __forceinline__ Triple<C> combine(Triple<C> p, Triple<C> q) {
    if (q.a == C(0)) return p;
    if (p.a == C(0)) return q;
    const C n = p.a + q.a, wq = q.a / n, delta = q.b - p.b;
    return {n, fma_rn(delta, wq, p.b), p.c + q.c + delta * delta * p.a * wq};
  }
};

// Backward: (sum g, sum g * (x - mean), unused).
struct Sums {
  template <typename C>
  static __device__ __forceinline__ Triple<C> combine(Triple<C> p, Triple<C> q) {
    return {p.a + q.a, p.b + q.b, C(0)};
  }
};

template <bool BWD> struct OpOf { using type = Moments; };
template <> struct OpOf<true> { using type = Sums; };

// Shuffle-down tree: lane 0 ends with the warp's combination, in a fixed order.
template <typename Op, typename C> __device__ __forceinline__ Triple<C> warp_combine(Triple<C> v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Triple<C> o = {__shfl_down_sync(0xffffffffu, v.a, offset),
                         __shfl_down_sync(0xffffffffu, v.b, offset),
                         __shfl_down_sync(0xffffffffu, v.c, offset)};
    v = Op::combine(v, o);
  }
  return v;
}

// The block's combination, in thread 0. Every thread of the block must call it.
template <typename Op, typename C> __device__ __forceinline__ Triple<C> block_combine(Triple<C> v) {
  __shared__ C sa[32], sb[32], sc[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_combine<Op>(v);
  if (lane == 0) {
    sa[warp] = v.a;
    sb[warp] = v.b;
    sc[warp] = v.c;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? Triple<C>{sa[lane], sb[lane], sc[lane]} : Triple<C>{C(0), C(0), C(0)};
    v = warp_combine<Op>(v);
  }
  return v;
}

// Fold K values (ok[k]: present) into (n, mean, M2) as one group: the group's mean, its
// centered sum of squares (second pass over registers), then Chan's update.
template <typename C, int K>
__device__ __forceinline__ void fold_moments(Triple<C>& acc, const C (&v)[K], const bool (&ok)[K]) {
  C g = C(0), s = C(0);
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (ok[k]) {
      g += C(1);
      s += v[k];
    }
  if (g == C(0)) return;
  const C m = s / g;
  C q = C(0);
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (ok[k]) {
      const C d = v[k] - m;
      q = fma_rn(d, d, q);
    }
  acc = Moments::combine(acc, Triple<C>{g, m, q});
}

// One channel's (mean, scale = invstd * weight, beta = bias), as the forward computed them.
template <typename C> struct Coef {
  C mean, scale, beta;
};

template <typename T>
__device__ __forceinline__ Coef<compute_t<T>> load_coef(long long c, const compute_t<T>* mean,
                                                       const compute_t<T>* invstd,
                                                       const void* weight, const void* bias,
                                                       int params_f32) {
  using C = compute_t<T>;
  return {mean[c], math::mul_rn(invstd[c], load_param<T>(weight, params_f32, c, C(1))),
          load_param<T>(bias, params_f32, c, C(0))};
}

// g masked by the ReLU of the recomputed output z: 0 where the stored z is <= 0.
template <typename T>
__device__ __forceinline__ compute_t<T> relu_grad(compute_t<T> g, compute_t<T> xm,
                                                  compute_t<T> scale, compute_t<T> beta) {
  return as_stored<T>(fma_rn(xm, scale, beta)) <= compute_t<T>(0) ? compute_t<T>(0) : g;
}

template <typename T>
__device__ __forceinline__ void fold_grad(Triple<compute_t<T>>& acc, compute_t<T> g,
                                          compute_t<T> x, const Coef<compute_t<T>>& p, int relu) {
  const compute_t<T> xm = x - p.mean;
  if (relu) g = relu_grad<T>(g, xm, p.scale, p.beta);
  acc.a += g;
  acc.b = fma_rn(g, xm, acc.b);
}

// y for one element: (x - mean) * scale + beta, then max(., 0) for BN + ReLU (NaN stays).
template <typename C> __device__ __forceinline__ C bn_value(C x, C mean, C scale, C beta, int relu) {
  const C z = fma_rn(x - mean, scale, beta);
  return relu && z < C(0) ? C(0) : z;
}

// dx for one element from the backward coefficients k = (mean, scale, beta, k1, k2, k3):
// k1 (g + k2 (x - mean) + k3).
template <typename T>
__device__ __forceinline__ compute_t<T> dx_value(compute_t<T> g, compute_t<T> x,
                                                 const compute_t<T> (&k)[6], int relu) {
  const compute_t<T> xm = x - k[0];
  if (relu) g = relu_grad<T>(g, xm, k[1], k[2]);
  return k[3] * (fma_rn(k[4], xm, g) + k[5]);
}

// Position of vector i in the flat array of A*C rows of bv vectors: its place b in its row and
// its channel c. advance() moves it by the grid stride G (Gb = G % bv, Gc = (G / bv) % Cn):
// at most one carry from b into the row, and c stays below Cn after one subtraction
// (c + Gc + 1 <= 2 Cn - 1).
struct Cursor {
  long long i, b, c;
  __device__ __forceinline__ void start(long long i0, long long bv, long long Cn) {
    i = i0;
    const long long r = i0 / bv;
    b = i0 - r * bv;
    c = r % Cn;
  }
  __device__ __forceinline__ void advance(long long G, long long Gb, long long Gc, long long bv,
                                          long long Cn) {
    i += G;
    b += Gb;
    c += Gc;
    if (b >= bv) {
      b -= bv;
      ++c;
    }
    if (c >= Cn) c -= Cn;
  }
};

// The flat passes' walk: this thread's vectors p.i, p.i + G, ... below nvec (G the grid's
// threads), two per step: body(p, q, two), q the vector after p, two = q.i < nvec.
template <typename F>
__device__ __forceinline__ void walk_flat_pairs(long long nvec, long long bv, long long Cn,
                                                F&& body) {
  const long long G = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long Gb = G % bv, Gc = (G / bv) % Cn;
  Cursor p;
  p.start(static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x, bv, Cn);
  while (p.i < nvec) {
    Cursor q = p;
    q.advance(G, Gb, Gc, bv, Cn);
    body(p, q, q.i < nvec);
    p = q;
    p.advance(G, Gb, Gc, bv, Cn);
  }
}

// The value of element (a, c, b) of the channel's flat index i = a * B + b, as double.
template <typename T>
__device__ __forceinline__ double channel_value(const T* p, long long i, long long Cn,
                                                long long B, long long c) {
  const long long a = i / B;
  return static_cast<double>(to_compute(p[(a * Cn + c) * B + (i - a * B)]));
}

// (mean, M2) of channel c's L = A * B values by two passes in double over x, by one warp (every
// lane gets them): the finalize's second pass for a channel whose float sums overflowed.
template <typename T>
__device__ void channel_moments64(const T* x, long long A, long long Cn, long long B,
                                  long long c, int lane, double& mean, double& m2) {
  const long long L = A * B;
  double s = 0.0;
  for (long long i = lane; i < L; i += 32) s += channel_value(x, i, Cn, B, c);
  mean = warp_sum(s) / static_cast<double>(L);
  double q = 0.0;
  for (long long i = lane; i < L; i += 32) {
    const double d = channel_value(x, i, Cn, B, c) - mean;
    q += d * d;
  }
  m2 = warp_sum(q);
}

// (sum g, sum g (x - mean)) of channel c in double, g and x - mean as fold_grad forms them, by
// one warp (every lane gets them): the second pass for a channel whose float sums overflowed.
template <typename T>
__device__ void channel_grad_sums64(const T* dy, const T* x, long long A, long long Cn,
                                    long long B, long long c, const Coef<compute_t<T>>& p,
                                    int relu, int lane, double& sum_g, double& sum_gx) {
  using C = compute_t<T>;
  double sa = 0.0, sb = 0.0;
  for (long long i = lane; i < A * B; i += 32) {
    const long long a = i / B, at = (a * Cn + c) * B + (i - a * B);
    const C xm = to_compute(x[at]) - p.mean;
    C g = to_compute(dy[at]);
    if (relu) g = relu_grad<T>(g, xm, p.scale, p.beta);
    sa += static_cast<double>(g);
    sb += static_cast<double>(g) * static_cast<double>(xm);
  }
  sum_g = warp_sum(sa);
  sum_gx = warp_sum(sb);
}

}  // namespace bn

// --- reductions ------------------------------------------------------------------------------

// Partials of block (c, s), s = (sa, sb) of s_a * s_b slices: rows [a0, a1) by sa, columns
// [b0, b1) by sb (b_chunk a multiple of V). BWD: sums of g and g (x - mean); else moments.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(BN_THREADS)
bn_reduce_rows(const T* x, const T* dy, const void* weight, const void* bias,
               const compute_t<T>* mean, const compute_t<T>* invstd, int params_f32, int relu,
               compute_t<T>* part, long long part_stride, long long A, long long Cn, long long B,
               int s_a, int s_b, long long b_chunk, int tpr) {
  using C = compute_t<T>;
  using Op = typename bn::OpOf<BWD>::type;
  constexpr int U = BN_UNROLL;
  const long long S = static_cast<long long>(s_a) * s_b;
  const long long c = blockIdx.x / S, s = blockIdx.x - c * S;
  const long long sa = s / s_b, sb = s - sa * s_b;
  const long long a0 = sa * A / s_a, a1 = (sa + 1) * A / s_a;
  const long long b0 = sb * b_chunk, b1 = min(B, b0 + b_chunk);
  const int rpp = blockDim.x / tpr, r_off = threadIdx.x / tpr, lane = threadIdx.x % tpr;
  const long long span = static_cast<long long>(tpr) * V, row_stride = Cn * B;
  const T* xc = x + c * B;
  // forward: values shifted by the channel's first one (x[c * B]), so that the partial means
  // are of the spread's size, not of the mean's (float32 at mean 1e4 lost the variance's
  // low bits: invstd 1.7e-5 off); the finalize adds the pivot back
  const C pivot = !BWD && A > 0 ? to_compute(xc[0]) : C(0);
  const T* dyc = BWD ? dy + c * B : nullptr;
  bn::Coef<C> p{C(0), C(0), C(0)};
  if constexpr (BWD) p = bn::load_coef<T>(c, mean, invstd, weight, bias, params_f32);
  bn::Triple<C> acc{C(0), C(0), C(0)};

  // load U vectors at element offsets off[u] (where ok[u]) and fold them into acc
  auto fold = [&](const long long (&off)[U], const bool (&ok)[U]) {
    C xv[U][V], gv[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ok[u]) {
        bn::load_vec<T, V>(xc + off[u], xv[u]);
        if constexpr (BWD) bn::load_vec<T, V>(dyc + off[u], gv[u]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) xv[u][j] = gv[u][j] = C(0);
      }
    }
    if constexpr (BWD) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ok[u]) {
#pragma unroll
          for (int j = 0; j < V; ++j) bn::fold_grad<T>(acc, gv[u][j], xv[u][j], p, relu);
        }
    } else {
      C flat[U * V];
      bool okf[U * V];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          flat[u * V + j] = xv[u][j] - pivot;
          okf[u * V + j] = ok[u];
        }
      bn::fold_moments(acc, flat, okf);
    }
  };

  if (b1 - b0 <= span) {
    // the slice's columns fit one pass of a row's threads: group U rows
    const long long b = b0 + static_cast<long long>(lane) * V;
    const bool in_b = b < b1;
    for (long long a = a0 + r_off; a < a1; a += static_cast<long long>(U) * rpp) {
      long long off[U];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const long long au = a + static_cast<long long>(u) * rpp;
        ok[u] = in_b && au < a1;
        off[u] = au * row_stride + b;
      }
      fold(off, ok);
    }
  } else {
    // long slices: group U vectors along a row
    for (long long a = a0 + r_off; a < a1; a += rpp) {
      const long long row = a * row_stride;
      for (long long b = b0 + static_cast<long long>(lane) * V; b < b1; b += U * span) {
        long long off[U];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const long long bu = b + u * span;
          ok[u] = bu < b1;
          off[u] = row + bu;
        }
        fold(off, ok);
      }
    }
  }

  acc = bn::block_combine<Op>(acc);
  if (threadIdx.x == 0) {
    part[blockIdx.x] = acc.a;
    part[part_stride + blockIdx.x] = acc.b;
    if constexpr (!BWD) part[2 * part_stride + blockIdx.x] = acc.c;
  }
}

// Partials of columns [k, k + V) of thread tx in tile blockIdx.x, over rows slice
// s = blockIdx.y of gridDim.y (K % V == 0 when V > 1). Column k belongs to channel k / Bc.
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(BN_THREADS)
bn_reduce_cols(const T* x, const T* dy, const void* weight, const void* bias,
               const compute_t<T>* mean, const compute_t<T>* invstd, int params_f32, int relu,
               compute_t<T>* part, long long part_stride, long long A, long long K, long long Bc,
               int tx_count) {
  using C = compute_t<T>;
  using Op = typename bn::OpOf<BWD>::type;
  constexpr int U = BN_UNROLL;
  __shared__ C shared[3][BN_THREADS * V];
  const int TX = tx_count, TY = blockDim.x / TX, tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const long long k = (static_cast<long long>(blockIdx.x) * TX + tx) * V;
  const bool col_ok = k < K;
  const long long S = gridDim.y, s = blockIdx.y;
  const long long a0 = s * A / S, a1 = (s + 1) * A / S;

  bn::Coef<C> p[V];
  C pivot[V];  // forward: each column's channel's first value x[c * Bc] (see bn_reduce_rows)
#pragma unroll
  for (int j = 0; j < V; ++j)
    pivot[j] = !BWD && col_ok && A > 0 ? to_compute(x[(k + j) / Bc * Bc]) : C(0);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    p[j] = bn::Coef<C>{C(0), C(0), C(0)};
    if constexpr (BWD)
      if (col_ok) p[j] = bn::load_coef<T>((k + j) / Bc, mean, invstd, weight, bias, params_f32);
  }
  bn::Triple<C> acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = bn::Triple<C>{C(0), C(0), C(0)};

  for (long long a = a0 + ty; a < a1; a += static_cast<long long>(U) * TY) {
    C xv[U][V], gv[U][V];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long au = a + static_cast<long long>(u) * TY;
      ok[u] = col_ok && au < a1;
      if (ok[u]) {
        bn::load_vec<T, V>(x + au * K + k, xv[u]);
        if constexpr (BWD) bn::load_vec<T, V>(dy + au * K + k, gv[u]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) xv[u][j] = gv[u][j] = C(0);
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if constexpr (BWD) {
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (ok[u]) bn::fold_grad<T>(acc[j], gv[u][j], xv[u][j], p[j], relu);
      } else {
        C column[U];
#pragma unroll
        for (int u = 0; u < U; ++u) column[u] = xv[u][j] - pivot[j];
        bn::fold_moments(acc[j], column, ok);
      }
    }
  }

  // merge the TY threads of each column: a tree over ty through shared memory
  const int me = threadIdx.x;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    shared[0][me * V + j] = acc[j].a;
    shared[1][me * V + j] = acc[j].b;
    shared[2][me * V + j] = acc[j].c;
  }
  __syncthreads();
  for (int h = TY >> 1; h > 0; h >>= 1) {
    if (ty < h) {
      const int other = (ty + h) * TX + tx;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc[j] = Op::combine(acc[j], bn::Triple<C>{shared[0][other * V + j],
                                                   shared[1][other * V + j],
                                                   shared[2][other * V + j]});
        shared[0][me * V + j] = acc[j].a;
        shared[1][me * V + j] = acc[j].b;
        shared[2][me * V + j] = acc[j].c;
      }
    }
    __syncthreads();
  }
  if (ty == 0 && col_ok) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const long long i = s * K + k + j;
      part[i] = acc[j].a;
      part[part_stride + i] = acc[j].b;
      if constexpr (!BWD) part[2 * part_stride + i] = acc[j].c;
    }
  }
}

// --- per-channel finalize: one warp per channel ------------------------------------------------

// use_batch: merge the channel's S * Bc partials (index c * stride_c + s * stride_s + j) into
// mean and biased variance (again from x, A * Cn * B, in double where that overflowed); update
// the running statistics when `update`. Else read the running statistics. Writes mean, invstd
// and coef = (mean, invstd * weight, bias, 0).
template <typename T>
__global__ void __launch_bounds__(BN_THREADS)
bn_finalize_forward(const compute_t<T>* part, long long part_stride, long long stride_c,
                    long long stride_s, int S, long long Bc, long long Cn, double count,
                    int use_batch, compute_t<T>* mean, compute_t<T>* invstd, compute_t<T>* coef,
                    void* running_mean, void* running_var, int update, const void* weight,
                    const void* bias, int params_f32, double factor, double eps, const T* x,
                    long long A, long long B) {
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const long long c = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= Cn) return;  // the whole warp: c is the same for its 32 lanes
  C m, istd;
  if (use_batch) {
    bn::Triple<C> acc{C(0), C(0), C(0)};
    const long long items = static_cast<long long>(S) * Bc;
    for (long long i = lane; i < items; i += 32) {
      const long long s = i / Bc, j = i - s * Bc;
      const long long at = c * stride_c + s * stride_s + j;
      acc = bn::Moments::combine(
          acc, bn::Triple<C>{part[at], part[part_stride + at], part[2 * part_stride + at]});
    }
    acc = bn::warp_combine<bn::Moments>(acc);
    const C n = static_cast<C>(count);
    m = __shfl_sync(0xffffffffu, acc.b, 0);  // lane 0's result, so the test below is the warp's
    if (A > 0 && B > 0) m += to_compute(x[c * B]);  // the reductions' pivot (bn_reduce_rows)
    const C m2 = __shfl_sync(0xffffffffu, acc.c, 0);
    istd = C(1) / bn::sqrt_rn(m2 / n + static_cast<C>(eps));
    C unbiased = m2 / (n - C(1));
    if (!(isfinite(m) && isfinite(m2))) {  // a float sum overflowed, or x holds inf or NaN
      double mean64, m2_64;
      bn::channel_moments64(x, A, Cn, B, c, lane, mean64, m2_64);
      m = static_cast<C>(mean64);
      istd = static_cast<C>(1.0 / sqrt(m2_64 / count + eps));
      unbiased = static_cast<C>(m2_64 / (count - 1.0));
    }
    if (update && lane == 0) {
      const C f = static_cast<C>(factor);
      const C rm = bn::load_param<T>(running_mean, params_f32, c, C(0));
      const C rv = bn::load_param<T>(running_var, params_f32, c, C(0));
      bn::store_param<T>(running_mean, params_f32, c, (C(1) - f) * rm + f * m);
      bn::store_param<T>(running_var, params_f32, c, (C(1) - f) * rv + f * unbiased);
    }
  } else {
    m = bn::load_param<T>(running_mean, params_f32, c, C(0));
    istd = C(1) / bn::sqrt_rn(bn::load_param<T>(running_var, params_f32, c, C(0)) +
                              static_cast<C>(eps));
  }
  if (lane == 0) {
    mean[c] = m;
    invstd[c] = istd;
    C* k = coef + BN_COEF_FORWARD * c;
    k[0] = m;
    k[1] = math::mul_rn(istd, bn::load_param<T>(weight, params_f32, c, C(1)));
    k[2] = bn::load_param<T>(bias, params_f32, c, C(0));
    k[3] = C(0);
  }
}

// Sums the channel's partials (again from dy and x, in double, where that overflowed); writes
// dbias = sum g, dweight = invstd * sum g (x - mean) (in the parameters' storage type) and
// coef = (mean, scale, beta, k1, k2, k3, 0, 0) with k1 = weight * invstd, and in training
// k2 = -invstd^2 sum g (x - mean) / n, k3 = -dbias / n (dx = k1 (g + k2 (x - mean) + k3)).
template <typename T>
__global__ void __launch_bounds__(BN_THREADS)
bn_finalize_backward(const compute_t<T>* part, long long part_stride, long long stride_c,
                     long long stride_s, int S, long long Bc, long long Cn, double count,
                     int training, const compute_t<T>* mean, const compute_t<T>* invstd,
                     const void* weight, const void* bias, int params_f32, void* dweight,
                     void* dbias, compute_t<T>* coef, const T* dy, const T* x, long long A,
                     long long B, int relu) {
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const long long c = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= Cn) return;
  bn::Triple<C> acc{C(0), C(0), C(0)};
  const long long items = static_cast<long long>(S) * Bc;
  for (long long i = lane; i < items; i += 32) {
    const long long s = i / Bc, j = i - s * Bc;
    const long long at = c * stride_c + s * stride_s + j;
    acc = bn::Sums::combine(acc, bn::Triple<C>{part[at], part[part_stride + at], C(0)});
  }
  acc = bn::warp_combine<bn::Sums>(acc);
  const C n = static_cast<C>(count), istd = invstd[c];
  C sum_g = __shfl_sync(0xffffffffu, acc.a, 0);  // lane 0's result: the test is the warp's
  C sum_gx = __shfl_sync(0xffffffffu, acc.b, 0);
  C dw = sum_gx * istd, k2 = -istd * (istd * (sum_gx / n)), k3 = -(sum_g / n);
  if (!(isfinite(sum_g) && isfinite(sum_gx))) {  // a float sum overflowed, or inf/NaN data
    double sa, sb;
    bn::channel_grad_sums64<T>(dy, x, A, Cn, B, c,
                               bn::load_coef<T>(c, mean, invstd, weight, bias, params_f32), relu,
                               lane, sa, sb);
    const double i64 = static_cast<double>(istd);
    sum_g = static_cast<C>(sa);
    dw = static_cast<C>(sb * i64);
    k2 = static_cast<C>(-i64 * (i64 * (sb / count)));
    k3 = static_cast<C>(-(sa / count));
  }
  if (lane == 0) {
    const C k1 = math::mul_rn(istd, bn::load_param<T>(weight, params_f32, c, C(1)));
    bn::store_param<T>(dbias, params_f32, c, sum_g);
    bn::store_param<T>(dweight, params_f32, c, dw);
    C* k = coef + BN_COEF_BACKWARD * c;
    k[0] = mean[c];
    k[1] = k1;  // scale, as the forward computed it
    k[2] = bn::load_param<T>(bias, params_f32, c, C(0));
    k[3] = k1;
    k[4] = training ? k2 : C(0);
    k[5] = training ? k3 : C(0);
    k[6] = C(0);
    k[7] = C(0);
  }
}

// --- elementwise passes ------------------------------------------------------------------------

// y = bn_value(x) over nvec vectors of V (rows of bv vectors, channel per row), two per step.
template <typename T, int V>
__global__ void __launch_bounds__(BN_THREADS)
bn_normalize_flat(const T* x, T* y, const compute_t<T>* coef, long long nvec, long long bv,
                  long long Cn, int relu) {
  using C = compute_t<T>;
  // y of vector i (channel c) from its loaded x
  auto normalize = [&](long long i, long long c, C (&v)[V]) {
    const C* k = coef + BN_COEF_FORWARD * c;
    const C m = k[0], sc = k[1], be = k[2];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = bn::bn_value(v[j], m, sc, be, relu);
    bn::store_vec<T, V>(y + i * V, v);
  };
  bn::walk_flat_pairs(nvec, bv, Cn, [&](const bn::Cursor& p, const bn::Cursor& q, bool two) {
    C v0[V], v1[V];
    bn::load_vec<T, V>(x + p.i * V, v0);
    if (two) bn::load_vec<T, V>(x + q.i * V, v1);
    normalize(p.i, p.c, v0);
    if (two) normalize(q.i, q.c, v1);
  });
}

// Channels last (B == 1): thread (tx, ty) of tile blockIdx.x keeps channels [k, k + V) and
// walks rows blockIdx.y * TY + ty, stepping gridDim.y * TY, two rows per step.
template <typename T, int V>
__global__ void __launch_bounds__(BN_THREADS)
bn_normalize_cols(const T* x, T* y, const compute_t<T>* coef, long long A, long long K,
                  int tx_count, int relu) {
  using C = compute_t<T>;
  const int TX = tx_count, TY = blockDim.x / TX, tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const long long k = (static_cast<long long>(blockIdx.x) * TX + tx) * V;
  if (k >= K) return;
  C m[V], sc[V], be[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const C* kj = coef + BN_COEF_FORWARD * (k + j);
    m[j] = kj[0];
    sc[j] = kj[1];
    be[j] = kj[2];
  }
  const long long step = static_cast<long long>(gridDim.y) * TY;
  for (long long a = static_cast<long long>(blockIdx.y) * TY + ty; a < A; a += 2 * step) {
    const long long a2 = a + step;
    const bool two = a2 < A;
    C v0[V], v1[V];
    bn::load_vec<T, V>(x + a * K + k, v0);
    if (two) bn::load_vec<T, V>(x + a2 * K + k, v1);
#pragma unroll
    for (int j = 0; j < V; ++j) v0[j] = bn::bn_value(v0[j], m[j], sc[j], be[j], relu);
    bn::store_vec<T, V>(y + a * K + k, v0);
    if (two) {
#pragma unroll
      for (int j = 0; j < V; ++j) v1[j] = bn::bn_value(v1[j], m[j], sc[j], be[j], relu);
      bn::store_vec<T, V>(y + a2 * K + k, v1);
    }
  }
}

// dx = dx_value(dy, x) over nvec vectors (as bn_normalize_flat), coef of 8 per channel.
template <typename T, int V>
__global__ void __launch_bounds__(BN_THREADS)
bn_dx_flat(const T* dy, const T* x, T* dx, const compute_t<T>* coef, long long nvec,
           long long bv, long long Cn, int relu) {
  using C = compute_t<T>;
  // dx of vector i (channel c) from its loaded dy (in g, overwritten) and x
  auto grad = [&](long long i, long long c, C (&g)[V], const C (&xv)[V]) {
    C k[6];
#pragma unroll
    for (int f = 0; f < 6; ++f) k[f] = coef[BN_COEF_BACKWARD * c + f];
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = bn::dx_value<T>(g[j], xv[j], k, relu);
    bn::store_vec<T, V>(dx + i * V, g);
  };
  bn::walk_flat_pairs(nvec, bv, Cn, [&](const bn::Cursor& p, const bn::Cursor& q, bool two) {
    C g0[V], x0[V], g1[V], x1[V];
    bn::load_vec<T, V>(dy + p.i * V, g0);
    bn::load_vec<T, V>(x + p.i * V, x0);
    if (two) {
      bn::load_vec<T, V>(dy + q.i * V, g1);
      bn::load_vec<T, V>(x + q.i * V, x1);
    }
    grad(p.i, p.c, g0, x0);
    if (two) grad(q.i, q.c, g1, x1);
  });
}

// Channels last (B == 1): as bn_normalize_cols, for dx.
template <typename T, int V>
__global__ void __launch_bounds__(BN_THREADS)
bn_dx_cols(const T* dy, const T* x, T* dx, const compute_t<T>* coef, long long A, long long K,
           int tx_count, int relu) {
  using C = compute_t<T>;
  const int TX = tx_count, TY = blockDim.x / TX, tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const long long k0 = (static_cast<long long>(blockIdx.x) * TX + tx) * V;
  if (k0 >= K) return;
  C k[V][6];
#pragma unroll
  for (int j = 0; j < V; ++j)
#pragma unroll
    for (int f = 0; f < 6; ++f) k[j][f] = coef[BN_COEF_BACKWARD * (k0 + j) + f];
  const long long step = static_cast<long long>(gridDim.y) * TY;
  for (long long a = static_cast<long long>(blockIdx.y) * TY + ty; a < A; a += 2 * step) {
    const long long a2 = a + step;
    const bool two = a2 < A;
    C g0[V], x0[V], g1[V], x1[V];
    bn::load_vec<T, V>(dy + a * K + k0, g0);
    bn::load_vec<T, V>(x + a * K + k0, x0);
    if (two) {
      bn::load_vec<T, V>(dy + a2 * K + k0, g1);
      bn::load_vec<T, V>(x + a2 * K + k0, x1);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) g0[j] = bn::dx_value<T>(g0[j], x0[j], k[j], relu);
    bn::store_vec<T, V>(dx + a * K + k0, g0);
    if (two) {
#pragma unroll
      for (int j = 0; j < V; ++j) g1[j] = bn::dx_value<T>(g1[j], x1[j], k[j], relu);
      bn::store_vec<T, V>(dx + a2 * K + k0, g1);
    }
  }
}

}  // namespace gpunn
