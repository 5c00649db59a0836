// Shared-memory mbarriers (sm_90) and shared-window loads and stores for the warp-specialized
// kernels of the products.
#pragma once

#include <cstdint>

namespace qlora::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Returns once the phase with the given parity has completed (a fresh barrier counts its phase
// "before 0", parity 1, as completed). The suspend-time hint (10 ms, an upper bound: the phase's
// completion wakes the thread) lets a waiting warp sleep between retries; on the H200 it changed
// nothing measurable (ncu, 28672x8192 at M = 1: 56.6 against 56.7 us, the same branch count).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1, %2;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity), "r"(10000000u)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

// Shared-memory loads and stores through 32-bit shared-window addresses (generic loads, what C++
// pointers to shared memory compile to in these kernels, take 64-bit address arithmetic and the
// generic path).
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
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
  return v;
}
__device__ __forceinline__ void sts_u32(uint32_t address, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(v) : "memory");
}
#endif

}  // namespace qlora::cuda
