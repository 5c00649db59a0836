// Shared-memory access through 32-bit shared-window addresses, for the products' kernels: generic
// loads, what C++ pointers to shared memory compile to in these kernels, take 64-bit address
// arithmetic and the generic path.
#pragma once

#include <cstdint>

namespace qlora::cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A table word (written before the kernel's first barrier, constant after): not volatile, so the
// compiler may schedule it freely.
__device__ __forceinline__ uint32_t lds_u32(uint32_t address) {
  uint32_t v;
  asm("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(address));
  return v;
}
// Ring bytes and scales, rewritten as the kernel runs: volatile keeps them after the mbarrier
// wait that publishes them.
__device__ __forceinline__ uint32_t lds_ring_u32(uint32_t address) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(address));
  return v;
}
__device__ __forceinline__ float lds_ring_f32(uint32_t address) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(address));
  return v;
}
__device__ __forceinline__ uint2 lds_ring_u64(uint32_t address) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(address));
  return v;
}
__device__ __forceinline__ uint4 lds_ring_u128(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(address));
  return v;
}
__device__ __forceinline__ void sts_u32(uint32_t address, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(v) : "memory");
}

}  // namespace qlora::cuda
