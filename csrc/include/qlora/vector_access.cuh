// Elementwise kernels' vector accesses (csrc/cuda/rotary.cu, silu_mul.cu): N elements of a 2- or
// 4-byte type as one load (a Vec, aligned to its size) and one store.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace qlora::cuda {

template <typename T, int N>
struct alignas(N * sizeof(T)) Vec {
  T v[N];
};

// Two 16-bit values (c10::Half, c10::BFloat16: their bits in .x) as one word.
template <typename T>
__device__ __forceinline__ uint32_t bits2(T lo, T hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// A Vec as one store built from its bits. A plain store of a Vec (or of a uint2 / float4 made of it)
// reached the PTX as one store an element (nvcc 13, the rotary kernel); the __stcg intrinsic is a
// vector store whatever the optimizer does, cached in L2 as a plain store is.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  if constexpr (N == 1) {
    *p = v.v[0];
  } else if constexpr (sizeof(T) == 2 && N == 4) {
    __stcg(reinterpret_cast<uint2*>(p), make_uint2(bits2(v.v[0], v.v[1]), bits2(v.v[2], v.v[3])));
  } else if constexpr (sizeof(T) == 2 && N == 8) {
    __stcg(reinterpret_cast<uint4*>(p),
           make_uint4(bits2(v.v[0], v.v[1]), bits2(v.v[2], v.v[3]), bits2(v.v[4], v.v[5]), bits2(v.v[6], v.v[7])));
  } else {
    static_assert(std::is_same_v<T, float> && N == 4, "8 or 16 bytes of a 16-bit type, or 16 bytes of float32");
    __stcg(reinterpret_cast<float4*>(p), make_float4(v.v[0], v.v[1], v.v[2], v.v[3]));
  }
}

}  // namespace qlora::cuda
