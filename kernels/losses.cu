// losses.cu: softmax cross-entropy, NLL and MSE losses, forward and backward.
//
// Cross-entropy of a row x of n logits with label y, label smoothing eps; m = max_j x_j,
// s = sum_j exp(x_j - m), t = sum_j (x_j - m):
//   loss = (1 - eps) * (log(s) - (x_y - m)) + eps / n * (n * log(s) - t)
//   dx_j = w * (exp(x_j - m) / s - eps / n - (1 - eps) * [j == y])
// with w the row's weight: the upstream gradient (per row for "none"), divided by the count of
// non-ignored rows for "mean". The terms of each sum share one sign, so logits of +-1e4 lose
// nothing to cancellation. A row whose label is ignore_index has loss 0 and gradient 0; a label
// outside [0, n) gives a NaN loss and a NaN gradient row (never an out-of-bounds read); the
// host checks labels before launching (label_stats) unless asked not to.
// lse = m + log(s) (double) may be saved by the forward; the backward then needs no reduction:
// exp(x - lse) = exp((x - hi) - lo) with lse = hi + lo split into two compute_t values, so the
// rounding of lse to float does not enter the gradient.
//
// NLL:  loss = -v_y;  dx_j = -w * [j == y]  (dx is zeroed by a memset first; one store per row).
// MSE:  loss = (x - t)^2;  dx = 2 * w * (x - t)  (w: upstream gradient, divided by numel for mean).
//
// Labels are a template parameter L; gpunn instantiates int64 (long long) only and widens int32
// labels on the host side of the launch.
//
// Launch shapes: the cross-entropy row kernels are softmax.cu's (one block per row, grid-stride
// over rows; *_rows hold up to blockDim.x * ITEMS elements per row in registers, *_long any n).
// Reductions over rows or elements are deterministic and independent of the grid: fixed chunks
// summed by one block each into double partial sums (sum_chunks, mse_chunks), then one block
// adds the partials in a fixed order (loss_finish). Counting uses integer atomics only.
#include "common.cuh"

namespace gpunn {

// Row values a thread holds in registers at most (softmax.cu's MAX_HELD).
template <typename C> constexpr int CE_MAX_HELD = 32;
template <> constexpr int CE_MAX_HELD<double> = 4;

// label: 0 ignored, 1 in [0, n), 2 out of range (and not ignore_index)
__device__ __forceinline__ int label_kind(long long y, long long ignore, long long n) {
  return y == ignore ? 0 : (y >= 0 && y < n ? 1 : 2);
}

// The row's weight: dloss[r * stride] (or dloss_value when dloss is null), / count for "mean".
template <typename T>
__device__ __forceinline__ compute_t<T> row_weight(const T* dloss, long long stride,
                                                   double dloss_value,
                                                   const unsigned long long* count, long long r) {
  using C = compute_t<T>;
  C w = dloss != nullptr ? to_compute(dloss[r * stride]) : static_cast<C>(dloss_value);
  if (count != nullptr) w = w / static_cast<C>(*count);
  return w;
}

// --- labels: count of non-ignored rows, first bad row ------------------------------------------
//
// stats[0] += rows whose label is not ignore_index; stats[1] = max(stats[1], rows - r) over rows r
// with a label out of [0, n), so the first bad row is rows - stats[1] (stats[1] = 0: none).
// stats must be zeroed before. Integer atomics: the result does not depend on the order.
template <typename L>
__global__ void __launch_bounds__(256)
label_stats(const L* labels, long long rows, long long n, long long ignore,
            unsigned long long* stats) {
  unsigned long long count = 0, worst = 0;
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < rows;
       r += gridDim.x * static_cast<long long>(blockDim.x)) {
    const int kind = label_kind(static_cast<long long>(labels[r]), ignore, n);
    count += kind != 0;
    if (kind == 2 && worst == 0) worst = static_cast<unsigned long long>(rows - r);  // first bad
  }
  count = block_sum(count);
  if (worst != 0) atomicMax(stats + 1, worst);
  if (threadIdx.x == 0 && count != 0) atomicAdd(stats, count);
}

// Store a row's loss: into loss_out (storage type, reduction "none") or row_loss (compute type).
template <typename T>
__device__ __forceinline__ void store_loss(T* loss_out, compute_t<T>* row_loss, long long r,
                                           compute_t<T> v) {
  if (loss_out != nullptr)
    loss_out[r] = from_compute<T>(v);
  else
    row_loss[r] = v;
}

// The loss of a row from its statistics; thread 0 calls it (x_y is read from memory).
template <typename T>
__device__ __forceinline__ compute_t<T> ce_row_loss(const T* xr, long long y, int kind, long long n,
                                                    compute_t<T> m, compute_t<T> s,
                                                    compute_t<T> tsum, compute_t<T> eps) {
  using C = compute_t<T>;
  if (kind == 0) return C(0);
  if (kind == 2) return math::nan<C>();
  const C log_s = math::log(s);
  const C nll = log_s - (to_compute(xr[y]) - m);  // both terms >= 0
  if (!(eps > C(0))) return nll;
  const C nc = static_cast<C>(n);
  return (C(1) - eps) * nll + eps / nc * (nc * log_s - tsum);  // n log(s) >= 0, -t >= 0
}

// Fold x into (m, s) as online_add does, and into tt = sum (x_i - m) over the elements seen
// (shifted by c * (m_old - m) when m grows; -inf elements make it -inf), c their count.
template <typename C>
__device__ __forceinline__ void online_add_shift(C& m, C& s, C& tt, C& c, C x) {
  const C m_old = m;
  online_add(m, s, x);
  if (m != m_old && c > C(0)) tt += c * (m_old - m);
  tt += x == -math::inf<C>() ? -math::inf<C>() : x - m;
  c += C(1);
}

// sum over the block of tt + c * (m - row_m): each thread's sum of (x - row_m).
template <typename C>
__device__ __forceinline__ C block_shift_sum(C tt, C c, C m, C row_m) {
  return block_sum(c > C(0) ? tt + c * (m - row_m) : C(0));
}

// A thread's values of a row held in registers: v[k] = x_t[k * B] (-inf past the row's end, left =
// n - t); returns their max (NaN wins).
template <typename T, typename C, int ITEMS>
__device__ __forceinline__ C load_held(const T* xt, int B, int left, C (&v)[ITEMS]) {
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) v[k] = k * B < left ? to_compute(xt[k * B]) : -math::inf<C>();
  C m = -math::inf<C>();
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) m = math::nan_max(m, v[k]);
  return m;
}

// The row's (max, sum of exp(x - max)) from the thread's values x_t[k * B], k * B < left, read
// once (online); every thread of the block must call it.
template <int ITEMS, typename T>
__device__ __forceinline__ MaxSum<compute_t<T>> block_max_sum_online(const T* xt, int B,
                                                                      int left) {
  using C = compute_t<T>;
  MaxSum<C> p = MaxSumOp::identity<C>();
#pragma unroll 4
  for (int k = 0; k < ITEMS; ++k)
    if (k * B < left) online_add(p.m, p.s, to_compute(xt[k * B]));
  return block_max_sum(p);
}

// --- cross-entropy forward: rows of up to blockDim.x * ITEMS, held in registers ----------------
//
// x (rows, n); labels (rows,); row_loss (compute type) or loss_out (storage type, "none") gets
// the loss of each row; lse (double, may be null) gets m + log(s) of every row. Without lse,
// ignored rows are not read.
template <typename T, int ITEMS, typename L>
__global__ void __launch_bounds__(1024, 1)
ce_forward_rows(const T* x, const L* labels, long long rows, int n, long long ignore, double eps_d,
                compute_t<T>* row_loss, T* loss_out, double* lse) {
  using C = compute_t<T>;
  constexpr bool HOLD = ITEMS <= CE_MAX_HELD<C>;  // else x is read again for t
  const C eps = static_cast<C>(eps_d);
  const bool smooth = eps > C(0);
  const int t = threadIdx.x, B = blockDim.x, left = n - t;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const long long y = static_cast<long long>(labels[r]);
    const int kind = label_kind(y, ignore, n);
    if (kind == 0 && lse == nullptr) {  // the same branch for the whole block
      if (t == 0) store_loss(loss_out, row_loss, r, C(0));
      continue;
    }
    const T* xr = x + r * static_cast<long long>(n);
    const T* xt = xr + t;
    MaxSum<C> row;
    C tsum = C(0);
    if constexpr (HOLD) {
      C v[ITEMS];
      const C m = load_held(xt, B, left, v);
      C s = C(0);
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) s += v[k] == -math::inf<C>() ? C(0) : math::exp(v[k] - m);
      row = block_max_sum(MaxSum<C>{m, s});
      if (smooth) {
#pragma unroll
        for (int k = 0; k < ITEMS; ++k)
          if (k * B < left) tsum += v[k] - row.m;
        tsum = block_sum(tsum);
      }
    } else {
      row = block_max_sum_online<ITEMS>(xt, B, left);
      if (smooth) {
#pragma unroll 4
        for (int k = 0; k < ITEMS; ++k)
          if (k * B < left) tsum += to_compute(xt[k * B]) - row.m;
        tsum = block_sum(tsum);
      }
    }
    if (t == 0) {
      if (lse != nullptr) lse[r] = static_cast<double>(row.m) + ::log(static_cast<double>(row.s));
      store_loss(loss_out, row_loss, r, ce_row_loss(xr, y, kind, n, row.m, row.s, tsum, eps));
    }
  }
}

// --- cross-entropy forward: rows of any length, one pass --------------------------------------

// Fold this thread's elements of row xr (see fold_strided) into (m, s) by online_add, or with
// `smooth` into (m, s, tt, c) by online_add_shift.
template <int UNROLL, typename T, typename C>
__device__ __forceinline__ void fold_row_online(const T* xr, long long t, long long B, long long n,
                                                bool smooth, C& m, C& s, C& tt, C& c) {
  fold_strided<UNROLL>(xr, t, B, n, [&](C v) {
    if (smooth)
      online_add_shift(m, s, tt, c, v);
    else
      online_add(m, s, v);
  });
}

template <typename T, typename L>
__global__ void __launch_bounds__(1024, 1)
ce_forward_long(const T* x, const L* labels, long long rows, long long n, long long ignore,
                double eps_d, compute_t<T>* row_loss, T* loss_out, double* lse) {
  using C = compute_t<T>;
  constexpr int UNROLL = 4;  // loads in flight per thread
  const C eps = static_cast<C>(eps_d);
  const bool smooth = eps > C(0);
  const long long t = threadIdx.x, B = blockDim.x;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const long long y = static_cast<long long>(labels[r]);
    const int kind = label_kind(y, ignore, n);
    if (kind == 0 && lse == nullptr) {
      if (t == 0) store_loss(loss_out, row_loss, r, C(0));
      continue;
    }
    const T* xr = x + r * n;
    C m = -math::inf<C>(), s = C(0), tt = C(0), c = C(0);
    fold_row_online<UNROLL>(xr, t, B, n, smooth, m, s, tt, c);
    const MaxSum<C> row = block_max_sum(MaxSum<C>{m, s});
    const C tsum = smooth ? block_shift_sum(tt, c, m, row.m) : C(0);
    if (t == 0) {
      if (lse != nullptr) lse[r] = static_cast<double>(row.m) + ::log(static_cast<double>(row.s));
      store_loss(loss_out, row_loss, r, ce_row_loss(xr, y, kind, n, row.m, row.s, tsum, eps));
    }
  }
}

// --- cross-entropy backward ----------------------------------------------------------------
//
// dx (rows, n) from x, labels, the weights (dloss, stride, value, count: see row_weight) and,
// if not null, the forward's lse. x may alias dx: each element is read before it is written,
// by the thread that writes it.

// Fill a row with one value (0 for ignored rows, NaN for bad labels).
template <typename T>
__device__ __forceinline__ void fill_row(T* dxr, long long n, compute_t<T> value) {
  const T v = from_compute<T>(value);
  for (long long i = threadIdx.x; i < n; i += blockDim.x) dxr[i] = v;
}

// Split lse into hi + lo, each of the compute type (lo = 0 for double).
template <typename C>
__device__ __forceinline__ void split_lse(double lse, C& hi, C& lo) {
  hi = static_cast<C>(lse);
  lo = static_cast<C>(lse - static_cast<double>(hi));
}

template <typename T, int ITEMS, typename L>
__global__ void __launch_bounds__(1024, 1)
ce_backward_rows(const T* x, const L* labels, long long rows, int n, long long ignore,
                 double eps_d, const T* dloss, long long dloss_stride, double dloss_value,
                 const unsigned long long* count, const double* lse, T* dx) {
  using C = compute_t<T>;
  constexpr bool HOLD = ITEMS <= CE_MAX_HELD<C>;
  const C eps = static_cast<C>(eps_d);
  const int t = threadIdx.x, B = blockDim.x, left = n - t;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const long long y = static_cast<long long>(labels[r]);
    const int kind = label_kind(y, ignore, n);
    const long long base = r * static_cast<long long>(n);
    if (kind != 1) {  // the same branch for the whole block
      fill_row(dx + base, n, kind == 0 ? C(0) : math::nan<C>());
      continue;
    }
    const C w = row_weight(dloss, dloss_stride, dloss_value, count, r);
    const C b = w * eps / static_cast<C>(n), wy = w * (C(1) - eps);
    const int ky = static_cast<int>(y) - t;  // the label is this thread's element k * B == ky
    const T* xt = x + base + t;
    T* dxt = dx + base + t;

    if (lse != nullptr) {
      // dx = w * exp((x - hi) - lo) - b, - wy at the label: one pass, no reduction
      C hi, lo;
      split_lse(lse[r], hi, lo);
#pragma unroll 4
      for (int k = 0; k < ITEMS; ++k) {
        if (k * B < left) {
          const C d = w * math::exp((to_compute(xt[k * B]) - hi) - lo) - b;
          dxt[k * B] = from_compute<T>(k * B == ky ? d - wy : d);
        }
      }
    } else if constexpr (HOLD) {
      // e_k = exp(x_k - m_t) held; p = e_k * exp(m_t - m) / s
      C v[ITEMS];
      const C m = load_held(xt, B, left, v);
      C s = C(0);
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        v[k] = v[k] == -math::inf<C>() ? C(0) : math::exp(v[k] - m);
        s += v[k];
      }
      const MaxSum<C> row = block_max_sum(MaxSum<C>{m, s});
      const C a = w * (math::exp(m - row.m) / row.s);  // all -inf: exp(NaN) -> NaN, as torch
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        if (k * B < left) {
          const C d = a * v[k] - b;
          dxt[k * B] = from_compute<T>(k * B == ky ? d - wy : d);
        }
      }
    } else {
      const MaxSum<C> row = block_max_sum_online<ITEMS>(xt, B, left);
      const C a = w / row.s;
#pragma unroll 4
      for (int k = 0; k < ITEMS; ++k) {
        if (k * B < left) {
          const C d = a * math::exp(to_compute(xt[k * B]) - row.m) - b;
          dxt[k * B] = from_compute<T>(k * B == ky ? d - wy : d);
        }
      }
    }
  }
}

template <typename T, typename L>
__global__ void __launch_bounds__(1024, 1)
ce_backward_long(const T* x, const L* labels, long long rows, long long n, long long ignore,
                 double eps_d, const T* dloss, long long dloss_stride, double dloss_value,
                 const unsigned long long* count, const double* lse, T* dx) {
  using C = compute_t<T>;
  constexpr int UNROLL = 4;
  const C eps = static_cast<C>(eps_d);
  const long long t = threadIdx.x, B = blockDim.x;

  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const long long y = static_cast<long long>(labels[r]);
    const int kind = label_kind(y, ignore, n);
    const T* xr = x + r * n;
    T* dxr = dx + r * n;
    if (kind != 1) {
      fill_row(dxr, n, kind == 0 ? C(0) : math::nan<C>());
      continue;
    }
    const C w = row_weight(dloss, dloss_stride, dloss_value, count, r);
    const C b = w * eps / static_cast<C>(n), wy = w * (C(1) - eps);
    C shift, lo, a;  // dx = a * exp((x - shift) - lo) - b
    if (lse != nullptr) {
      split_lse(lse[r], shift, lo);
      a = w;
    } else {
      C m = -math::inf<C>(), s = C(0), tt = C(0), c = C(0);  // tt, c unused (not smooth)
      fold_row_online<UNROLL>(xr, t, B, n, false, m, s, tt, c);
      const MaxSum<C> row = block_max_sum(MaxSum<C>{m, s});
      shift = row.m;
      lo = C(0);
      a = w / row.s;
    }
    for (long long i = t; i < n; i += B) {
      const C d = a * math::exp((to_compute(xr[i]) - shift) - lo) - b;
      dxr[i] = from_compute<T>(i == y ? d - wy : d);
    }
  }
}

// --- NLL ------------------------------------------------------------------------------------

// loss_r = -v[r, y_r] (0 ignored, NaN bad), one thread per row.
template <typename T, typename L>
__global__ void __launch_bounds__(256)
nll_forward(const T* v, const L* labels, long long rows, long long n, long long ignore,
            compute_t<T>* row_loss, T* loss_out) {
  using C = compute_t<T>;
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < rows;
       r += gridDim.x * static_cast<long long>(blockDim.x)) {
    const long long y = static_cast<long long>(labels[r]);
    const int kind = label_kind(y, ignore, n);
    const C loss = kind == 0 ? C(0) : (kind == 2 ? math::nan<C>() : -to_compute(v[r * n + y]));
    store_loss(loss_out, row_loss, r, loss);
  }
}

// dx[r, y_r] = -w_r, one thread per row; dx is zero already. A bad label: the row is NaN.
template <typename T, typename L>
__global__ void __launch_bounds__(256)
nll_backward(const L* labels, long long rows, long long n, long long ignore, const T* dloss,
             long long dloss_stride, double dloss_value, const unsigned long long* count, T* dx) {
  using C = compute_t<T>;
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < rows;
       r += gridDim.x * static_cast<long long>(blockDim.x)) {
    const long long y = static_cast<long long>(labels[r]);
    const int kind = label_kind(y, ignore, n);
    if (kind == 1) {
      dx[r * n + y] = from_compute<T>(-row_weight(dloss, dloss_stride, dloss_value, count, r));
    } else if (kind == 2) {
      const T nan = from_compute<T>(math::nan<C>());
      for (long long j = 0; j < n; ++j) dx[r * n + j] = nan;
    }
  }
}

// --- reductions: fixed chunks, double partial sums, one block to finish ----------------------

// parts[c] = sum of v[c * chunk, min(n, (c + 1) * chunk)), in double, one block per chunk.
template <typename C>
__global__ void __launch_bounds__(256)
sum_chunks(const C* v, long long n, long long chunk, double* parts) {
  const long long parts_n = (n + chunk - 1) / chunk;
  for (long long c = blockIdx.x; c < parts_n; c += gridDim.x) {
    const long long lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
    double acc = 0.0;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) acc += static_cast<double>(v[i]);
    acc = block_sum(acc);
    if (threadIdx.x == 0) parts[c] = acc;
  }
}

// parts[c] = sum of (x - t)^2 over chunk c (chunk a multiple of the vector width).
template <typename T>
__global__ void __launch_bounds__(256)
mse_chunks(const T* x, const T* t, long long n, long long chunk, double* parts) {
  using C = compute_t<T>;
  constexpr int V = Vec<T>::N;
  const long long parts_n = (n + chunk - 1) / chunk;
  const bool vector = aligned16(x) && aligned16(t);
  for (long long c = blockIdx.x; c < parts_n; c += gridDim.x) {
    const long long lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
    double acc = 0.0;
    long long scalar_from = lo;
    if (vector) {  // lo is a multiple of V
      const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
      const Vec<T>* tv = reinterpret_cast<const Vec<T>*>(t);
      for (long long j = lo / V + threadIdx.x; j < hi / V; j += blockDim.x) {
        const Vec<T> a = xv[j], b = tv[j];
        C part = C(0);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const C d = to_compute(a.v[k]) - to_compute(b.v[k]);
          part += d * d;
        }
        acc += static_cast<double>(part);
      }
      scalar_from = hi / V * V;
    }
    for (long long i = scalar_from + threadIdx.x; i < hi; i += blockDim.x) {
      const C d = to_compute(x[i]) - to_compute(t[i]);
      acc += static_cast<double>(d * d);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) parts[c] = acc;
  }
}

// out[0] = scale * sum(parts) (/ count when count is not null: 0 / 0 = NaN for "mean" of
// nothing); one block, a fixed order.
template <typename T>
__global__ void __launch_bounds__(1024)
loss_finish(const double* parts, long long parts_n, const unsigned long long* count, double scale,
            T* out) {
  double acc = 0.0;
  for (long long i = threadIdx.x; i < parts_n; i += blockDim.x) acc += parts[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    double value = acc * scale;
    if (count != nullptr) value = value / static_cast<double>(*count);
    out[0] = from_compute<T>(static_cast<compute_t<T>>(value));
  }
}

// --- MSE elementwise ----------------------------------------------------------------------

// out = (x - t)^2 (reduction "none").
template <typename T>
__global__ void mse_none(const T* x, const T* t, T* out, long long n) {
  using C = compute_t<T>;
  constexpr int V = Vec<T>::N;
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);
  const bool vector = aligned16(x) && aligned16(t) && aligned16(out);
  const long long done = vector ? n / V * V : 0;
  if (vector) {
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
    const Vec<T>* tv = reinterpret_cast<const Vec<T>*>(t);
    Vec<T>* ov = reinterpret_cast<Vec<T>*>(out);
    for (long long j = start; j < n / V; j += stride) {
      const Vec<T> a = xv[j], b = tv[j];
      Vec<T> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const C d = to_compute(a.v[k]) - to_compute(b.v[k]);
        o.v[k] = from_compute<T>(d * d);
      }
      ov[j] = o;
    }
  }
  for (long long i = done + start; i < n; i += stride) {
    const C d = to_compute(x[i]) - to_compute(t[i]);
    out[i] = from_compute<T>(d * d);
  }
}

// dx = (norm * (x - t)) * w, norm = 2 (sum, none) or 2 / numel (mean); w = dloss[i * stride]
// (stride 1: "none", 0: a device scalar) or dloss_value when dloss is null.
template <typename T>
__global__ void mse_backward(const T* dloss, long long dloss_stride, double dloss_value,
                             const T* x, const T* t, T* dx, long long n, double norm_d) {
  using C = compute_t<T>;
  constexpr int V = Vec<T>::N;
  const C norm = static_cast<C>(norm_d);
  const bool per_element = dloss != nullptr && dloss_stride != 0;
  const C w0 = dloss == nullptr ? static_cast<C>(dloss_value)
                                : (per_element ? C(0) : to_compute(dloss[0]));
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);
  const bool vector = aligned16(x) && aligned16(t) && aligned16(dx) &&
                      (!per_element || aligned16(dloss));
  const long long done = vector ? n / V * V : 0;
  if (vector) {
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
    const Vec<T>* tv = reinterpret_cast<const Vec<T>*>(t);
    const Vec<T>* gv = reinterpret_cast<const Vec<T>*>(dloss);
    Vec<T>* dv = reinterpret_cast<Vec<T>*>(dx);
    for (long long j = start; j < n / V; j += stride) {
      const Vec<T> a = xv[j], b = tv[j];
      Vec<T> g;
      if (per_element) g = gv[j];
      Vec<T> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const C w = per_element ? to_compute(g.v[k]) : w0;
        o.v[k] = from_compute<T>(norm * (to_compute(a.v[k]) - to_compute(b.v[k])) * w);
      }
      dv[j] = o;
    }
  }
  for (long long i = done + start; i < n; i += stride) {
    const C w = per_element ? to_compute(dloss[i]) : w0;
    dx[i] = from_compute<T>(norm * (to_compute(x[i]) - to_compute(t[i])) * w);
  }
}

}  // namespace gpunn
