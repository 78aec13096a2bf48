// dropout.cu: dropout forward and backward, y = x * (keep ? scale : 0), with the keep mask drawn
// from Philox4x32-10 (philox.cuh) instead of read from memory. The mapping is that of
// gpunn/ops/dropout.py: element i of the flattened array is stream element d = offset + i, the
// word d % 4 of block d / 4 under the seed, and it is kept iff that word < threshold
// (threshold = round((1 - p) * 2^32), at most 2^32, hence 64-bit). The backward is the same
// kernel applied to dy, with the forward's (seed, offset, p).
//
// One thread computes one Philox block, the four elements 4g - r .. 4g - r + 3 (r = offset % 4,
// g = block - offset / 4): one 4-element vector load and store when the pointers allow it
// (16 bytes for float, 8 for the 16-bit types, two 16-byte accesses for double) and the four
// are inside the array, else scalar accesses with bounds checks (the first and last blocks,
// and every block when x - r or y - r is not vector aligned). Grid-stride over blocks, 64-bit
// indices. Pointers may alias (y == x): each element is read, then written, by one thread.
#include "common.cuh"
#include "philox.cuh"

namespace gpunn {

// The four elements one Philox block covers, as one vector access.
template <typename T> struct alignas(4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16) Quad {
  T v[4];
};

// True when p - r elements is Quad-aligned (then the block's four elements at p + 4g - r are).
template <typename T> __device__ __forceinline__ bool quad_aligned(const void* p, int r) {
  return (reinterpret_cast<unsigned long long>(p) - r * sizeof(T)) % alignof(Quad<T>) == 0;
}

// y[i] = x[i] * (keep_i ? scale : 0) for i < n, and mask[i] = keep_i when WithMask.
template <typename T, bool WithMask>
__global__ void dropout(const T* x, T* y, unsigned char* mask, long long n,
                        unsigned long long offset, unsigned long long seed,
                        unsigned long long threshold, double scale) {
  using C = compute_t<T>;
  const C s = static_cast<C>(scale), zero = C(0);
  const int r = static_cast<int>(offset & 3ull);
  const unsigned long long first = offset >> 2;  // the block of element 0
  const long long blocks = (n + r + 3) / 4;
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);
  const bool vector = quad_aligned<T>(x, r) && quad_aligned<T>(y, r) &&
                      (!WithMask || quad_aligned<unsigned char>(mask, r));

  for (long long g = start; g < blocks; g += stride) {
    const Philox4 u = philox_block(first + static_cast<unsigned long long>(g), seed);
    const long long i0 = 4 * g - r;  // the element of word 0
    if (vector && i0 >= 0 && i0 + 4 <= n) {
      const Quad<T> a = *reinterpret_cast<const Quad<T>*>(x + i0);
      Quad<T> b;
      unsigned keep_bytes = 0;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const bool keep = u.v[w] < threshold;
        b.v[w] = from_compute<T>(to_compute(a.v[w]) * (keep ? s : zero));
        keep_bytes |= static_cast<unsigned>(keep) << (8 * w);  // little-endian: byte w
      }
      *reinterpret_cast<Quad<T>*>(y + i0) = b;
      if (WithMask) *reinterpret_cast<unsigned*>(mask + i0) = keep_bytes;
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const long long i = i0 + w;
        if (i < 0 || i >= n) continue;
        const bool keep = u.v[w] < threshold;
        y[i] = from_compute<T>(to_compute(x[i]) * (keep ? s : zero));
        if (WithMask) mask[i] = keep;
      }
    }
  }
}

// mask[i] = keep_i for i < n (the mask alone, 0 or 1 per byte).
__global__ void dropout_mask(unsigned char* mask, long long n, unsigned long long offset,
                             unsigned long long seed, unsigned long long threshold) {
  const int r = static_cast<int>(offset & 3ull);
  const unsigned long long first = offset >> 2;
  const long long blocks = (n + r + 3) / 4;
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);
  const bool vector = quad_aligned<unsigned char>(mask, r);

  for (long long g = start; g < blocks; g += stride) {
    const Philox4 u = philox_block(first + static_cast<unsigned long long>(g), seed);
    const long long i0 = 4 * g - r;
    if (vector && i0 >= 0 && i0 + 4 <= n) {
      unsigned keep_bytes = 0;
#pragma unroll
      for (int w = 0; w < 4; ++w)
        keep_bytes |= static_cast<unsigned>(u.v[w] < threshold) << (8 * w);
      *reinterpret_cast<unsigned*>(mask + i0) = keep_bytes;
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const long long i = i0 + w;
        if (i >= 0 && i < n) mask[i] = u.v[w] < threshold;
      }
    }
  }
}

// out[4j .. 4j+3] = philox4x32_10(counter[4j .. 4j+3], key[2j], key[2j+1]) for j < n: the raw
// generator, for the known-answer tests.
__global__ void philox4x32_10_blocks(const unsigned* counter, const unsigned* key, unsigned* out,
                                     long long n) {
  const long long start = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = gridDim.x * static_cast<long long>(blockDim.x);
  for (long long j = start; j < n; j += stride) {
    const unsigned* cj = counter + 4 * j;
    const Philox4 c = {{cj[0], cj[1], cj[2], cj[3]}};
    const Philox4 u = philox4x32_10(c, key[2 * j], key[2 * j + 1]);
#pragma unroll
    for (int w = 0; w < 4; ++w) out[4 * j + w] = u.v[w];
  }
}

}  // namespace gpunn
