// The LoRA dropout mask, shared by the CPU and CUDA kernels so that both draw the same mask and any
// kernel can regenerate it: element i of a tensor (its row-major index) is kept when the Philox4x32-10
// draw for (seed, i) is at least p * 2^32. A counter-based generator makes the mask a function of the
// element's index alone, independent of how a kernel tiles the tensor: the backward regenerates it
// from the 8-byte seed instead of keeping a mask or a dropped copy of x.
// Philox: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QLORA_HOST_DEVICE inline
#endif

namespace qlora {

struct Philox4 {
  uint32_t v[4];
};

QLORA_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Four 32-bit draws for counter `group` (elements 4 * group .. 4 * group + 3) under `seed`.
QLORA_HOST_DEVICE Philox4 philox4x32_10(uint64_t seed, uint64_t group) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// The draw threshold of drop probability p: an element is dropped when its draw is below it. A
// 64-bit threshold so that p = 1 (2^32) drops every element.
inline uint64_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0;
  if (p >= 1.0) return uint64_t{1} << 32;
  return static_cast<uint64_t>(std::llround(p * 4294967296.0));
}

// What kept elements are multiplied by, as torch.nn.functional.dropout does (float32 for every
// dtype but float64); p = 1 keeps nothing and scales by 0, as torch does.
inline double dropout_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

}  // namespace qlora
