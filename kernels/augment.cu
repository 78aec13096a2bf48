// augment.cu: the affine warp with bilinear sampling and zero padding of gpunn/ops/augment.py
// (PyTorch's affine_grid + grid_sample, align_corners=False), with the matrices given
// (affine_warp) or drawn per sample from Philox4x32-10 (augment). Same names as the Python:
//
//   theta[n]   output -> input map in normalized coordinates, 2 x 3, row major
//   pixel map  i_x = m0 j + m1 i + m2,  i_y = m3 j + m4 i + m5   (input pixel units; float64
//              from theta once per sample, then rounded to the compute type)
//   taps       (x0, y0) = floor(i_x, i_y) and its three neighbours, weights the products of
//              (1 - distance), added in PyTorch's order; taps outside the image add nothing;
//              a non-finite (i_x, i_y) gives NaN (as PyTorch's CPU grid_sample)
//
// Launch: grid y walks the samples (grid-stride), grid x x block the output pixels of one
// sample (grid-stride), one thread per output pixel for all channels. Thread 0 of each block
// computes the sample's pixel map (drawing theta first in augment) into shared memory; the
// sample loop is the same for every thread of a block, so the barriers are uniform.
// 64-bit indices throughout; the math in float for float and the 16-bit types, double for
// double.
#include "common.cuh"
#include "philox.cuh"

namespace gpunn {

// AUGMENT_TAG (counter word 3 of the augmentation's blocks) and DEG (pi / 180) come from
// gpunn/ops/augment.py (Family constants), the same values the host paths use.

__device__ __forceinline__ float floor_c(float v) { return ::floorf(v); }
__device__ __forceinline__ double floor_c(double v) { return ::floor(v); }

// u = (w >> 8) 2^-24: a uniform in [0, 1), exact in double (and float).
__device__ __forceinline__ double uniform(unsigned w) {
  return static_cast<double>(w >> 8) * 5.9604644775390625e-08;
}

// The pixel map of theta t (module docstring of gpunn/ops/augment.py, _pixel_map).
__device__ __forceinline__ void pixel_map(const double t[6], long long h, long long w,
                                          double m[6]) {
  const double fw = static_cast<double>(w), fh = static_cast<double>(h);
  m[0] = t[0];
  m[1] = t[1] * (fw / fh);
  m[2] = 0.5 * (fw * t[2] + t[0] * (1.0 - fw) + t[1] * (fw * (1.0 - fh) / fh) + (fw - 1.0));
  m[3] = t[3] * (fh / fw);
  m[4] = t[4];
  m[5] = 0.5 * (fh * t[5] + t[3] * (fh * (1.0 - fw) / fw) + t[4] * (1.0 - fh) + (fh - 1.0));
}

// The augmentation's options, in the order of augment.py's _params.
struct AugmentOptions {
  double degrees, translate_x, translate_y, scale_lo, scale_hi, stretch, shear, flip_p, aspect;
};

// theta of stream sample d under seed (augment.py's _theta_from_uniforms), each entry rounded
// to float as random_affine returns it.
__device__ void random_theta(unsigned long long d, unsigned long long seed,
                             const AugmentOptions& o, double t[6]) {
  const unsigned k0 = static_cast<unsigned>(seed), k1 = static_cast<unsigned>(seed >> 32);
  const unsigned lo = static_cast<unsigned>(d), hi = static_cast<unsigned>(d >> 32);
  const Philox4 a = philox4x32_10(Philox4{{lo, hi, 0u, AUGMENT_TAG}}, k0, k1);
  const Philox4 b = philox4x32_10(Philox4{{lo, hi, 1u, AUGMENT_TAG}}, k0, k1);
  const double angle = (o.degrees * (2.0 * uniform(a.v[0]) - 1.0)) * DEG;
  const double fx = o.translate_x * (2.0 * uniform(a.v[1]) - 1.0);
  const double fy = o.translate_y * (2.0 * uniform(a.v[2]) - 1.0);
  const double s = o.scale_lo + (o.scale_hi - o.scale_lo) * uniform(a.v[3]);
  const double e = o.stretch * (2.0 * uniform(b.v[0]) - 1.0);
  const double k = ::tan((o.shear * (2.0 * uniform(b.v[1]) - 1.0)) * DEG);
  const double f = uniform(b.v[2]) < o.flip_p ? -1.0 : 1.0;
  double sn, c;
  ::sincos(angle, &sn, &c);
  const double ex = ::exp(-e) / s, ey = ::exp(e) / s;
  const double a00 = (c - k * sn) * ex;
  const double a01 = (-(sn + k * c) * ex) / o.aspect;
  const double a10 = (sn * ey) * o.aspect;
  const double a11 = c * ey;
  const double t0 = 2.0 * fx, t1 = 2.0 * fy;
  const double full[6] = {f * a00, a01, -(a00 * t0 + a01 * t1),
                          f * a10, a11, -(a10 * t0 + a11 * t1)};
#pragma unroll
  for (int q = 0; q < 6; ++q) t[q] = static_cast<double>(static_cast<float>(full[q]));
}

// This block's share of the output pixels of sample s, through the pixel map m (shared).
template <typename T>
__device__ __forceinline__ void warp_sample(const T* __restrict__ x, T* __restrict__ y,
                                            long long s, long long channels, long long h,
                                            long long w, const compute_t<T>* m) {
  using C = compute_t<T>;
  const long long hw = h * w;
  const T* xs = x + s * channels * hw;
  T* ys = y + s * channels * hw;
  const C a00 = m[0], a01 = m[1], a02 = m[2], a10 = m[3], a11 = m[4], a12 = m[5];
  const C fw = static_cast<C>(w), fh = static_cast<C>(h), one = C(1), zero = C(0);
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);
  for (long long p = start; p < hw; p += stride) {
    const long long i = p / w, j = p - i * w;
    const C fi = static_cast<C>(i), fj = static_cast<C>(j);
    const C ix = a00 * fj + (a01 * fi + a02);
    const C iy = a10 * fj + (a11 * fi + a12);
    if (ix > -one && ix < fw && iy > -one && iy < fh) {  // NaN: outside
      const C fx0 = floor_c(ix), fy0 = floor_c(iy);
      const long long x0 = static_cast<long long>(fx0), y0 = static_cast<long long>(fy0);
      const C wx1 = ix - fx0, wy1 = iy - fy0, wx0 = (fx0 + one) - ix, wy0 = (fy0 + one) - iy;
      const C w00 = wx0 * wy0, w01 = wx1 * wy0, w10 = wx0 * wy1, w11 = wx1 * wy1;
      const bool vx0 = x0 >= 0, vx1 = x0 + 1 < w, vy0 = y0 >= 0, vy1 = y0 + 1 < h;
      const long long r0 = y0 * w + x0, r1 = r0 + w;
      for (long long c = 0; c < channels; ++c) {
        const T* xc = xs + c * hw;
        C acc = zero;
        if (vy0 && vx0) acc += to_compute(xc[r0]) * w00;
        if (vy0 && vx1) acc += to_compute(xc[r0 + 1]) * w01;
        if (vy1 && vx0) acc += to_compute(xc[r1]) * w10;
        if (vy1 && vx1) acc += to_compute(xc[r1 + 1]) * w11;
        ys[c * hw + p] = from_compute<T>(acc);
      }
    } else {  // outside: 0; a non-finite coordinate: NaN, as PyTorch's CPU grid_sample
      const C v = (ix - ix == zero && iy - iy == zero) ? zero : (ix - ix) + (iy - iy);
      for (long long c = 0; c < channels; ++c) ys[c * hw + p] = from_compute<T>(v);
    }
  }
}

// y = warp(x, theta): x, y (n, channels, h, w); theta (n, 2, 3) in the compute type.
template <typename T>
__global__ void affine_warp(const T* __restrict__ x, T* __restrict__ y, const compute_t<T>* theta,
                            long long n, long long channels, long long h, long long w) {
  using C = compute_t<T>;
  __shared__ C m[6];
  for (long long s = blockIdx.y; s < n; s += gridDim.y) {
    if (threadIdx.x == 0) {
      double t[6], mm[6];
#pragma unroll
      for (int q = 0; q < 6; ++q) t[q] = static_cast<double>(theta[6 * s + q]);
      pixel_map(t, h, w, mm);
#pragma unroll
      for (int q = 0; q < 6; ++q) m[q] = static_cast<C>(mm[q]);
    }
    __syncthreads();
    warp_sample(x, y, s, channels, h, w, m);
    __syncthreads();  // m is rewritten for the block's next sample
  }
}

// y = warp(x, theta_s), theta_s drawn for stream sample offset + s under seed.
template <typename T>
__global__ void augment(const T* __restrict__ x, T* __restrict__ y, long long n,
                        long long channels, long long h, long long w, unsigned long long seed,
                        unsigned long long offset, double degrees, double translate_x,
                        double translate_y, double scale_lo, double scale_hi, double stretch,
                        double shear, double flip_p, double aspect) {
  using C = compute_t<T>;
  __shared__ C m[6];
  const AugmentOptions o = {degrees, translate_x, translate_y, scale_lo, scale_hi,
                            stretch, shear,   flip_p,      aspect};
  for (long long s = blockIdx.y; s < n; s += gridDim.y) {
    if (threadIdx.x == 0) {
      double t[6], mm[6];
      random_theta(offset + static_cast<unsigned long long>(s), seed, o, t);
      pixel_map(t, h, w, mm);
#pragma unroll
      for (int q = 0; q < 6; ++q) m[q] = static_cast<C>(mm[q]);
    }
    __syncthreads();
    warp_sample(x, y, s, channels, h, w, m);
    __syncthreads();
  }
}

}  // namespace gpunn
