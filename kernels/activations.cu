// activations.cu: fused elementwise activations, forward y = f(x) and backward dx = dy * f'(.).
//
// Each op is a struct with
//   forward(x, param)       -> y
//   backward(dy, v, param)  -> dx
// templated on the compute type C (float or double). v is the forward's output y for Sigmoid
// and Tanh and its input x for the others (PyTorch's convention); param is negative_slope for
// LeakyRelu, alpha for Elu, unused otherwise. The formulas, and their edge cases (NaN in ->
// NaN out, x <= 0 branches), are those of gpunn/ops/activations.py.
//
// Kernels: one grid-stride pass, 16-byte vector loads and stores when every pointer is 16-byte
// aligned, else scalar; a scalar tail. Pointers may alias (y == x, dx == dy): each element is
// read and then written by the same thread, so no __restrict__.
#include "common.cuh"

namespace gpunn {

// sigmoid(x) = 1 / (1 + exp(-x)): exp overflows to inf for x << 0, giving exactly 0; never NaN
// for finite or infinite x.
template <typename C> __device__ __forceinline__ C sigmoid(C x) {
  return C(1) / (C(1) + math::exp(-x));
}

// y = sigmoid(x);  dx = dy * y * (1 - y)  (v = y)
struct Sigmoid {
  template <typename C> static __device__ C forward(C x, C) { return sigmoid(x); }
  template <typename C> static __device__ C backward(C dy, C y, C) { return dy * y * (C(1) - y); }
};

// y = tanh(x);  dx = dy * (1 - y^2)  (v = y)
struct Tanh {
  template <typename C> static __device__ C forward(C x, C) { return math::tanh(x); }
  template <typename C> static __device__ C backward(C dy, C y, C) { return dy * (C(1) - y * y); }
};

// y = max(x, 0), NaN stays NaN;  dx = 0 where x <= 0, else dy
struct Relu {
  template <typename C> static __device__ C forward(C x, C) { return x < C(0) ? C(0) : x; }
  template <typename C> static __device__ C backward(C dy, C x, C) {
    return x <= C(0) ? C(0) : dy;
  }
};

// y = x where x > 0, else slope * x;  dx = dy where x > 0, else slope * dy  (param = slope)
struct LeakyRelu {
  template <typename C> static __device__ C forward(C x, C slope) {
    return x > C(0) ? x : slope * x;
  }
  template <typename C> static __device__ C backward(C dy, C x, C slope) {
    return x > C(0) ? dy : slope * dy;
  }
};

// y = x where x > 0, else alpha * (exp(x) - 1);  dx = dy where x > 0, else alpha * exp(x) * dy
struct Elu {
  template <typename C> static __device__ C forward(C x, C alpha) {
    return x <= C(0) ? alpha * math::expm1(x) : x;
  }
  template <typename C> static __device__ C backward(C dy, C x, C alpha) {
    return x <= C(0) ? alpha * math::exp(x) * dy : dy;
  }
};

// y = x * Phi(x), Phi(x) = erfc(-x / sqrt(2)) / 2 (the normal CDF, accurate in both tails);
// dx = dy * (Phi(x) + x * phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
struct GeluErf {
  template <typename C> static __device__ C cdf(C x) {
    return C(0.5) * math::erfc(-x * C(0.70710678118654752440));  // 1 / sqrt(2)
  }
  template <typename C> static __device__ C forward(C x, C) { return x * cdf(x); }
  template <typename C> static __device__ C backward(C dy, C x, C) {
    const C pdf = C(0.39894228040143267794) * math::exp(C(-0.5) * x * x);  // 1 / sqrt(2 pi)
    return dy * (cdf(x) + x * pdf);
  }
};

// u = k (x + c x^3), k = sqrt(2 / pi), c = 0.044715, s = (1 + tanh(u)) / 2 = sigmoid(2u);
// y = x * s;  dx = dy * (s + 2 x s (1 - s) k (1 + 3 c x^2)). The sigmoid form keeps its relative
// accuracy where tanh(u) is near -1; 1 + 3c x^2 is capped at 1e30 so that an x^2 overflowing
// float meets s (1 - s) = 0 as 0, not as 0 * inf = NaN.
struct GeluTanh {
  template <typename C> static __device__ C s(C x) {
    const C k2 = C(1.59576912160573071176), c = C(0.044715);  // 2 sqrt(2 / pi)
    return sigmoid(k2 * (x + c * x * x * x));
  }
  template <typename C> static __device__ C forward(C x, C) { return x * s(x); }
  template <typename C> static __device__ C backward(C dy, C x, C) {
    const C k2 = C(1.59576912160573071176), c3 = C(3 * 0.044715);
    const C sx = s(x), slope = C(1) + c3 * x * x;
    return dy * (sx + x * sx * (C(1) - sx) * k2 * (slope < C(1e30) ? slope : C(1e30)));
  }
};

// y = x * s, s = sigmoid(x);  dx = dy * s * (1 + x * (1 - s))
struct Silu {
  template <typename C> static __device__ C forward(C x, C) { return x * sigmoid(x); }
  template <typename C> static __device__ C backward(C dy, C x, C) {
    const C s = sigmoid(x);
    return dy * s * (C(1) + x * (C(1) - s));
  }
};

// y[i] = Op::forward(x[i], param) for i < n.
template <typename T, typename Op>
__global__ void unary_forward(const T* x, T* y, long long n, double param) {
  using C = compute_t<T>;
  constexpr int V = Vec<T>::N;
  const C p = static_cast<C>(param);
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);

  const bool vector = aligned16(x) && aligned16(y);
  const long long done = vector ? n / V * V : 0;  // elements the vector loop covers
  if (vector) {
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
    Vec<T>* yv = reinterpret_cast<Vec<T>*>(y);
    for (long long j = start; j < n / V; j += stride) {
      const Vec<T> a = xv[j];
      Vec<T> b;
#pragma unroll
      for (int k = 0; k < V; ++k) b.v[k] = from_compute<T>(Op::forward(to_compute(a.v[k]), p));
      yv[j] = b;
    }
  }
  for (long long i = done + start; i < n; i += stride)  // the tail, or everything if unaligned
    y[i] = from_compute<T>(Op::forward(to_compute(x[i]), p));
}

// dx[i] = Op::backward(dy[i], v[i], param) for i < n.
template <typename T, typename Op>
__global__ void unary_backward(const T* dy, const T* v, T* dx, long long n, double param) {
  using C = compute_t<T>;
  constexpr int V = Vec<T>::N;
  const C p = static_cast<C>(param);
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);

  const bool vector = aligned16(dy) && aligned16(v) && aligned16(dx);
  const long long done = vector ? n / V * V : 0;
  if (vector) {
    const Vec<T>* dyv = reinterpret_cast<const Vec<T>*>(dy);
    const Vec<T>* vv = reinterpret_cast<const Vec<T>*>(v);
    Vec<T>* dxv = reinterpret_cast<Vec<T>*>(dx);
    for (long long j = start; j < n / V; j += stride) {
      const Vec<T> a = dyv[j], b = vv[j];
      Vec<T> c;
#pragma unroll
      for (int k = 0; k < V; ++k)
        c.v[k] = from_compute<T>(Op::backward(to_compute(a.v[k]), to_compute(b.v[k]), p));
      dxv[j] = c;
    }
  }
  for (long long i = done + start; i < n; i += stride)
    dx[i] = from_compute<T>(Op::backward(to_compute(dy[i]), to_compute(v[i]), p));
}

}  // namespace gpunn
