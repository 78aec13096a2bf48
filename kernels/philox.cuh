// philox.cuh: Philox4x32-10, the counter-based generator of dropout (Salmon et al., SC 2011;
// Random123's philox4x32_10). The same operations as gpunn/philox.py, in 32-bit words:
//
//   round:  hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2   (32 x 32 -> 64-bit products)
//           (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
//   ten rounds; between two rounds k0 += W0, k1 += W1 (mod 2^32).
//
// philox_block(block, seed) is the stream dropout uses: counter (block mod 2^32, block >> 32,
// 0, 0), key (seed mod 2^32, seed >> 32); element d of the stream is word d % 4 of block d / 4.
#pragma once

namespace gpunn {

constexpr unsigned PHILOX_M0 = 0xD2511F53u;
constexpr unsigned PHILOX_M1 = 0xCD9E8D57u;
constexpr unsigned PHILOX_W0 = 0x9E3779B9u;
constexpr unsigned PHILOX_W1 = 0xBB67AE85u;

// Four 32-bit words: a counter block in, or a block of random words out.
struct Philox4 {
  unsigned v[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(Philox4 c, unsigned k0, unsigned k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    const unsigned hi0 = __umulhi(PHILOX_M0, c.v[0]), lo0 = PHILOX_M0 * c.v[0];
    const unsigned hi1 = __umulhi(PHILOX_M1, c.v[2]), lo1 = PHILOX_M1 * c.v[2];
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

// Block `block` of the stream keyed by `seed`: four words for stream elements 4*block .. +3.
__device__ __forceinline__ Philox4 philox_block(unsigned long long block, unsigned long long seed) {
  const Philox4 counter = {
      {static_cast<unsigned>(block), static_cast<unsigned>(block >> 32), 0u, 0u}};
  return philox4x32_10(counter, static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32));
}

}  // namespace gpunn
