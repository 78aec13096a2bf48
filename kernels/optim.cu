// optim.cu: the fused optimizer step over a table of tensors (gpunn/optim/fused.py).
//
// The table has one row of COLUMNS 64-bit words per tensor: addresses of the parameter p, its
// gradient g, up to three states s0..s2 (see ALGORITHMS in gpunn/optim/functional.py), a float32
// master copy (0 if none), the float32 step count, and the element count n. The chunk list
// holds (row, first element) pairs of CHUNK elements each; blocks walk the chunks grid-stride,
// so one launch covers any number of tensors of any sizes.
//
// A step is two launches per table:
//   1. prologue: grad_norm (the L2 norm of all gradients and an inf/NaN check; per-block
//      partials in double, reduced in a fixed order by the last block to finish) or, when
//      neither clipping nor the check is asked for, prologue (one block). Either ends in
//      finish(): control = {gmul, skip} with gmul = clip / grad_scale, and every row's step
//      count advanced unless the step is skipped.
//   2. step<T, S, ALGO>: the whole update, reading control; a skipped step writes nothing.
// A step over several tables (parameter groups, dtypes) with clipping or the check first
// adds every table's sums into one totals pair (grad_norm with totals), and each table's
// prologue then reads them: one norm and one skip decision for the whole step.
// The math is that of gpunn/optim/functional.py (reference_update), in float for float, half
// and bfloat16 parameters (float32 states S) and double for double.
#include "common.cuh"

namespace gpunn {
namespace optim {

// COLUMN_* (the row layout), COLUMNS, CHUNK, UNROLL and the flag bits come from the launcher
// (gpunn/optim/fused.py), defined ahead of this text.
enum Algorithm { SGD = 0, ADAGRAD = 1, RMSPROP = 2, ADAM = 3 };

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

// What every element of one row needs besides its own values.
template <typename C> struct Scalars {
  C gmul, sign, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, l1;
  C decay;      // AdamW: 1 - lr * weight_decay
  C step_size;  // Adam: lr sqrt(1 - beta2^t) / (1 - beta1^t); Adagrad: lr / (1 + (t - 1) lr_decay)
  C eps_hat;    // Adam: eps sqrt(1 - beta2^t)
  bool first;   // SGD: t == 1
  int flags;
};

template <typename C, int ALGO>
__device__ __forceinline__ Scalars<C> scalars(double t, double gmul, double lr, double beta1,
                                              double beta2, double eps, double weight_decay,
                                              double l1, int flags) {
  Scalars<C> k;
  k.gmul = C(gmul);
  k.sign = (flags & MAXIMIZE) ? C(-1) : C(1);
  k.lr = C(lr);
  k.beta1 = C(beta1);
  k.beta2 = C(beta2);
  k.one_minus_beta1 = C(1.0 - beta1);
  k.one_minus_beta2 = C(1.0 - beta2);
  k.eps = C(eps);
  k.weight_decay = (flags & DECOUPLED) ? C(0) : C(weight_decay);
  k.l1 = C(l1);
  k.decay = (flags & DECOUPLED) ? C(1.0 - lr * weight_decay) : C(1);
  // Adam: lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) = step_size * m / (sqrt(v) + eps_hat)
  // with step_size = lr sqrt(bc2)/bc1 and eps_hat = eps sqrt(bc2): one division per element.
  const double bc2_sqrt = ALGO == ADAM ? sqrt(1.0 - pow(beta2, t)) : 1.0;
  k.step_size = ALGO == ADAM      ? C(lr / (1.0 - pow(beta1, t)) * bc2_sqrt)
                : ALGO == ADAGRAD ? C(lr / (1.0 + (t - 1.0) * beta1))
                                  : C(lr);
  k.eps_hat = C(eps * bc2_sqrt);
  k.first = t == 1.0;
  k.flags = flags;
  return k;
}

// One element: p and the states are updated in place (values in C).
template <typename C, int ALGO>
__device__ __forceinline__ void update(C& p, C g, C& s0, C& s1, C& s2, const Scalars<C>& k) {
  g = g * k.gmul * k.sign;
  if (k.weight_decay != C(0)) g = g + k.weight_decay * p;
  if (k.l1 != C(0)) g = g + k.l1 * C((p > C(0)) - (p < C(0)));
  if constexpr (ALGO == SGD) {
    if (k.flags & MOMENTUM) {
      s0 = k.first ? g : s0 * k.beta1 + k.one_minus_beta2 * g;  // beta2 = dampening
      g = (k.flags & NESTEROV) ? g + k.beta1 * s0 : s0;
    }
    p = p - k.lr * g;
  } else if constexpr (ALGO == ADAGRAD) {
    s0 = s0 + g * g;
    p = p - k.step_size * (g / (sqrt(s0) + k.eps));
  } else if constexpr (ALGO == RMSPROP) {  // s0 square_avg, s1 momentum_buffer, s2 grad_avg
    s0 = s0 * k.beta2 + k.one_minus_beta2 * g * g;
    C d;
    if (k.flags & CENTERED) {
      s2 = s2 + k.one_minus_beta2 * (g - s2);
      d = sqrt(s0 - s2 * s2) + k.eps;
    } else {
      d = sqrt(s0) + k.eps;
    }
    if (k.flags & MOMENTUM) {
      s1 = s1 * k.beta1 + g / d;
      p = p - k.lr * s1;
    } else {
      p = p - k.lr * (g / d);
    }
  } else {  // ADAM: s0 exp_avg, s1 exp_avg_sq, s2 max_exp_avg_sq
    p = p * k.decay;
    s0 = s0 + k.one_minus_beta1 * (g - s0);
    s1 = s1 * k.beta2 + k.one_minus_beta2 * g * g;
    C v = s1;
    if (k.flags & AMSGRAD) {
      s2 = math::nan_max(s2, s1);
      v = s2;
    }
    p = p - k.step_size * (s0 / (sqrt(v) + k.eps_hat));
  }
}

// The step: T parameter/gradient storage, S state storage (float, or double for double).
template <typename T, typename S, int ALGO>
__global__ void step(const long long* table, const long long* chunks, long long n_chunks,
                     const double* control, double lr, double beta1, double beta2, double eps,
                     double weight_decay, double l1, int flags) {
  using C = compute_t<T>;
  if (control[1] != 0.0) return;  // skipped: nothing changes
  const bool uses_s1 = ALGO == ADAM || (ALGO == RMSPROP && (flags & MOMENTUM));
  const bool uses_s2 = (ALGO == ADAM && (flags & AMSGRAD)) || (ALGO == RMSPROP && (flags & CENTERED));
  const bool uses_s0 = ALGO != SGD || (flags & MOMENTUM);
  for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const long long* row = table + chunks[2 * c] * COLUMNS;
    T* p = column<T>(row, COLUMN_P);
    const T* g = column<const T>(row, COLUMN_G);
    S* s0 = column<S>(row, COLUMN_S0);
    S* s1 = column<S>(row, COLUMN_S1);
    S* s2 = column<S>(row, COLUMN_S2);
    float* master = column<float>(row, COLUMN_MASTER);
    const Scalars<C> k = scalars<C, ALGO>(double(*column<const float>(row, COLUMN_STEP)),
                                          control[0], lr, beta1, beta2, eps, weight_decay, l1,
                                          flags);
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
          a[u] = uses_s0 ? C(s0[i]) : C(0);
          b[u] = uses_s1 ? C(s1[i]) : C(0);
          d[u] = uses_s2 ? C(s2[i]) : C(0);
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long i = base + u * blockDim.x;
        if (i < stop) {
          update<C, ALGO>(pv[u], gv[u], a[u], b[u], d[u], k);
          if (master) master[i] = float(pv[u]);
          p[i] = from_compute<T>(pv[u]);
          if (uses_s0) s0[i] = S(a[u]);
          if (uses_s1) s1[i] = S(b[u]);
          if (uses_s2) s2[i] = S(d[u]);
        }
      }
    }
  }
}

}  // namespace optim
}  // namespace gpunn
