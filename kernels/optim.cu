// optim.cu: the fused optimizer step over a table of tensors (gpunn/optim/walker.py).
//
// The table has one row of COLUMNS 64-bit words per tensor: addresses of the parameter p, its
// gradient g, up to three states s0..s2 (an algorithm's states, in order; 0 where unused), a
// float32 master copy (0 if none), the float32 step count, and the element count n. The chunk
// list holds (row, first element) pairs of CHUNK elements each; blocks walk the chunks
// grid-stride, so one launch covers any number of tensors of any sizes. COLUMN_* (the row
// layout), COLUMNS, CHUNK, UNROLL and SCALARS come from the launcher, defined ahead of this
// text.
//
// A step is two launches per table:
//   1. prologue: grad_norm (the L2 norm of all gradients and an inf/NaN check; per-block
//      partials in double, reduced in a fixed order by the last block to finish) or, when
//      neither clipping nor the check is asked for, prologue (one block). Either ends in
//      finish(): control = {gmul, skip} with gmul = clip / grad_scale, and every row's step
//      count advanced unless the step is skipped.
//   2. step<T, S, Algorithm>: the whole update, reading control; a skipped step writes nothing.
// A step over several tables (parameter groups, dtypes) with clipping or the check first
// adds every table's sums into one totals pair (grad_norm with totals), and each table's
// prologue then reads them: one norm and one skip decision for the whole step.
//
// Each algorithm is a functor (below, one per module of gpunn/optim/algorithms, with its
// formulas in the same names): Row<C>, its constants for one row from the step's scalars k
// (its own, in the order of its Python scalars()), lr, the step count t and its variant, and
// update(p, g, s0, s1, s2, row) on one element. The math is in float for float, half and
// bfloat16 parameters (float32 states S) and double for double.
#include "common.cuh"

namespace gpunn {
namespace optim {

template <typename X> __device__ __forceinline__ X* column(const long long* row, int c) {
  return reinterpret_cast<X*>(row[c]);
}

// control = {gmul, skip}; steps advance where the step is not skipped. One block.
__device__ void finish(const long long* table, long long rows, double sumsq, bool nonfinite,
                       double max_norm, double grad_scale, const float* grad_scale_ptr,
                       const float* found_inf_ptr, double* control) {
  __shared__ bool skip_shared;
  if (threadIdx.x == 0) {
    const double scale = grad_scale_ptr ? double(*grad_scale_ptr) : grad_scale;
    // a device scale that is inf, NaN or <= 0 skips (host numbers are checked on the host)
    const bool skip = nonfinite || (found_inf_ptr && *found_inf_ptr != 0.0f) ||
                      !(scale > 0.0 && isfinite(scale));
    double gmul = 1.0 / scale;
    if (max_norm > 0.0 && !skip) gmul *= fmin(1.0, max_norm / (sqrt(sumsq) / scale + 1e-6));
    control[0] = gmul;
    control[1] = skip ? 1.0 : 0.0;
    skip_shared = skip;
  }
  __syncthreads();
  if (skip_shared) return;
  for (long long r = threadIdx.x; r < rows; r += blockDim.x) {
    float* step = column<float>(table + r * COLUMNS, COLUMN_STEP);
    *step += 1.0f;
  }
}

// The prologue without a gradient pass of its own: one block. totals (nullable) holds the
// step's [sum of squares, inf/NaN count] over every table, added up by grad_norm launches.
__global__ void prologue(const long long* table, long long rows, const double* totals,
                         double max_norm, double grad_scale, const float* grad_scale_ptr,
                         const float* found_inf_ptr, double* control) {
  const double sumsq = totals ? totals[0] : 0.0;
  const bool bad = totals && (totals[1] != 0.0 || !isfinite(sumsq));
  finish(table, rows, sumsq, bad, totals ? max_norm : -1.0, grad_scale, grad_scale_ptr,
         found_inf_ptr, control);
}

// The gradient pass: sum of squares (double) and inf/NaN over all gradients of a table.
// partials holds 2 doubles per block; counter is 0 before and after the launch. The last
// block to finish reduces the partials in a fixed order, then either finishes the prologue
// (totals == nullptr) or adds the sums to totals (the first phase of a step over several
// tables; launches on one stream run in order, so the sum is deterministic).
template <typename T>
__global__ void grad_norm(const long long* table, long long rows, const long long* chunks,
                          long long n_chunks, double max_norm, double grad_scale,
                          const float* grad_scale_ptr, const float* found_inf_ptr,
                          double* partials, unsigned* counter, double* control,
                          double* totals) {
  double sumsq = 0.0;
  double bad = 0.0;
  for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const long long* row = table + chunks[2 * c] * COLUMNS;
    const T* g = column<const T>(row, COLUMN_G);
    const long long stop = min(chunks[2 * c + 1] + CHUNK, row[COLUMN_N]);
    for (long long i = chunks[2 * c + 1] + threadIdx.x; i < stop; i += blockDim.x) {
      const double v = double(to_compute(g[i]));
      sumsq += v * v;
      if (!isfinite(v)) bad = 1.0;
    }
  }
  sumsq = block_sum(sumsq);
  bad = block_sum(bad);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = sumsq;
    partials[2 * blockIdx.x + 1] = bad;
    __threadfence();  // partials visible to every block before the counter says so
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  sumsq = 0.0;
  bad = 0.0;
  for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) {  // fixed order: deterministic
    sumsq += partials[2 * b];
    bad += partials[2 * b + 1];
  }
  sumsq = block_sum(sumsq);
  bad = block_sum(bad);
  if (totals) {
    if (threadIdx.x == 0) {
      totals[0] += sumsq;
      totals[1] += bad;
    }
  } else {
    finish(table, rows, sumsq, bad != 0.0 || !isfinite(sumsq), max_norm, grad_scale,
           grad_scale_ptr, found_inf_ptr, control);
  }
  if (threadIdx.x == 0) *counter = 0u;
}

// Every algorithm's gradient (gpunn/optim/prologue.py): g * gmul, negated to maximize, plus
// weight_decay * p unless decoupled, plus l1 * sign(p); decoupled: p <- p (1 - lr weight_decay).
template <typename C> struct Gradient {
  C gmul, sign, weight_decay, l1, decay;
  __device__ Gradient(double gmul_, double lr, double weight_decay_, double l1_, bool maximize,
                      bool decoupled)
      : gmul(C(gmul_)), sign(maximize ? C(-1) : C(1)),
        weight_decay(decoupled ? C(0) : C(weight_decay_)), l1(C(l1_)),
        decay(decoupled ? C(1.0 - lr * weight_decay_) : C(1)) {}
  __device__ __forceinline__ C operator()(C p, C g) const {
    g = g * gmul * sign;
    if (weight_decay != C(0)) g = g + weight_decay * p;
    if (l1 != C(0)) g = g + l1 * C((p > C(0)) - (p < C(0)));
    return g;
  }
};

// SGD (gpunn/optim/algorithms/sgd.py): k = {momentum, 1 - dampening, nesterov}; variant 0 no
// momentum, 1 momentum, 2 Nesterov. s0 momentum_buffer b.
struct SGD {
  template <typename C> struct Row {
    C lr, momentum, one_minus_dampening;
    bool uses_momentum, nesterov, first;
    __device__ Row(const double* k, double lr_, double t, int variant)
        : lr(C(lr_)), momentum(C(k[0])), one_minus_dampening(C(k[1])),
          uses_momentum(variant != 0), nesterov(k[2] != 0.0), first(t == 1.0) {}
  };
  template <typename C>
  static __device__ __forceinline__ void update(C& p, C g, C& b, C&, C&, const Row<C>& r) {
    if (r.uses_momentum) {
      b = r.first ? g : b * r.momentum + r.one_minus_dampening * g;  // b = g at t = 1
      g = r.nesterov ? g + r.momentum * b : b;
    }
    p = p - r.lr * g;
  }
};

// Adagrad (gpunn/optim/algorithms/adagrad.py): k = {lr_decay, eps}. s0 sum s.
struct Adagrad {
  template <typename C> struct Row {
    C decayed_lr, eps;  // lr / (1 + (t - 1) lr_decay)
    __device__ Row(const double* k, double lr, double t, int)
        : decayed_lr(C(lr / (1.0 + (t - 1.0) * k[0]))), eps(C(k[1])) {}
  };
  template <typename C>
  static __device__ __forceinline__ void update(C& p, C g, C& s, C&, C&, const Row<C>& r) {
    s = s + g * g;
    p = p - r.decayed_lr * (g / (sqrt(s) + r.eps));
  }
};

// RMSprop (gpunn/optim/algorithms/rmsprop.py): k = {alpha, 1 - alpha, eps, momentum}; variant
// bit 0 centered, bit 1 momentum. s0 square_avg v, s1 momentum_buffer b, s2 grad_avg a.
struct RMSprop {
  template <typename C> struct Row {
    C lr, alpha, one_minus_alpha, eps, momentum;
    bool centered, uses_momentum;
    __device__ Row(const double* k, double lr_, double, int variant)
        : lr(C(lr_)), alpha(C(k[0])), one_minus_alpha(C(k[1])), eps(C(k[2])),
          momentum(C(k[3])), centered(variant & 1), uses_momentum(variant & 2) {}
  };
  template <typename C>
  static __device__ __forceinline__ void update(C& p, C g, C& v, C& b, C& a, const Row<C>& r) {
    v = v * r.alpha + r.one_minus_alpha * g * g;
    C d;
    if (r.centered) {
      a = a + r.one_minus_alpha * (g - a);
      d = sqrt(v - a * a) + r.eps;
    } else {
      d = sqrt(v) + r.eps;
    }
    if (r.uses_momentum) {
      b = b * r.momentum + g / d;
      p = p - r.lr * b;
    } else {
      p = p - r.lr * (g / d);
    }
  }
};

// Adam and AdamW (gpunn/optim/algorithms/adam.py): k = {beta1, beta2, eps}; variant 1 amsgrad.
// s0 exp_avg m, s1 exp_avg_sq v, s2 max_exp_avg_sq v_max.
// lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) = step_size * m / (sqrt(v) + eps_hat) with
// step_size = lr sqrt(bc2)/bc1 and eps_hat = eps sqrt(bc2): one division per element.
struct Adam {
  template <typename C> struct Row {
    C one_minus_beta1, beta2, one_minus_beta2, step_size, eps_hat;
    bool amsgrad;
    __device__ Row(const double* k, double lr, double t, int variant)
        : one_minus_beta1(C(1.0 - k[0])), beta2(C(k[1])), one_minus_beta2(C(1.0 - k[1])),
          step_size(C(lr / (1.0 - pow(k[0], t)) * sqrt(1.0 - pow(k[1], t)))),
          eps_hat(C(k[2] * sqrt(1.0 - pow(k[1], t)))), amsgrad(variant == 1) {}
  };
  template <typename C>
  static __device__ __forceinline__ void update(C& p, C g, C& m, C& v, C& v_max,
                                                const Row<C>& r) {
    m = m + r.one_minus_beta1 * (g - m);
    v = v * r.beta2 + r.one_minus_beta2 * g * g;
    C denominator = v;
    if (r.amsgrad) {
      v_max = math::nan_max(v_max, v);
      denominator = v_max;
    }
    p = p - r.step_size * (m / (sqrt(denominator) + r.eps_hat));
  }
};

// Lion (gpunn/optim/algorithms/lion.py): k = {beta1, beta2}. s0 exp_avg m.
struct Lion {
  template <typename C> struct Row {
    C lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
    __device__ Row(const double* k, double lr_, double, int)
        : lr(C(lr_)), beta1(C(k[0])), one_minus_beta1(C(1.0 - k[0])), beta2(C(k[1])),
          one_minus_beta2(C(1.0 - k[1])) {}
  };
  template <typename C>
  static __device__ __forceinline__ void update(C& p, C g, C& m, C&, C&, const Row<C>& r) {
    const C c = m * r.beta1 + r.one_minus_beta1 * g;
    p = p - (c > C(0) ? r.lr : c < C(0) ? -r.lr : c - c);  // lr sign(c); NaN stays NaN
    m = m * r.beta2 + r.one_minus_beta2 * g;
  }
};

// The step of algorithm A: T parameter/gradient storage, S state storage (float, or double
// for double). k0..k3: the algorithm's SCALARS scalars.
template <typename T, typename S, typename A>
__global__ void step(const long long* table, const long long* chunks, long long n_chunks,
                     const double* control, double lr, double weight_decay, double l1,
                     bool maximize, bool decoupled, double k0, double k1, double k2, double k3,
                     int variant) {
  static_assert(SCALARS == 4, "step takes SCALARS algorithm scalars");
  using C = compute_t<T>;
  if (control[1] != 0.0) return;  // skipped: nothing changes
  const double k[SCALARS] = {k0, k1, k2, k3};
  const Gradient<C> gradient(control[0], lr, weight_decay, l1, maximize, decoupled);
  for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const long long* row = table + chunks[2 * c] * COLUMNS;
    T* p = column<T>(row, COLUMN_P);
    const T* g = column<const T>(row, COLUMN_G);
    S* s0 = column<S>(row, COLUMN_S0);  // nullptr: a state this step does not use
    S* s1 = column<S>(row, COLUMN_S1);
    S* s2 = column<S>(row, COLUMN_S2);
    float* master = column<float>(row, COLUMN_MASTER);
    const typename A::template Row<C> r(k, lr, double(*column<const float>(row, COLUMN_STEP)),
                                        variant);
    const long long stop = min(chunks[2 * c + 1] + CHUNK, row[COLUMN_N]);
    for (long long base = chunks[2 * c + 1] + threadIdx.x; base < stop;
         base += UNROLL * blockDim.x) {
      C pv[UNROLL], gv[UNROLL], a[UNROLL], b[UNROLL], d[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {  // all loads first: UNROLL rows of loads in flight
        const long long i = base + u * blockDim.x;
        if (i < stop) {
          pv[u] = master ? C(master[i]) : to_compute(p[i]);
          gv[u] = to_compute(g[i]);
          a[u] = s0 ? C(s0[i]) : C(0);
          b[u] = s1 ? C(s1[i]) : C(0);
          d[u] = s2 ? C(s2[i]) : C(0);
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long i = base + u * blockDim.x;
        if (i < stop) {
          const C gu = gradient(pv[u], gv[u]);
          pv[u] = pv[u] * gradient.decay;
          A::update(pv[u], gu, a[u], b[u], d[u], r);
          if (master) master[i] = float(pv[u]);
          p[i] = from_compute<T>(pv[u]);
          if (s0) s0[i] = S(a[u]);
          if (s1) s1[i] = S(b[u]);
          if (s2) s2[i] = S(d[u]);
        }
      }
    }
  }
}

}  // namespace optim
}  // namespace gpunn
