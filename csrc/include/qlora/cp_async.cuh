// cp.async (sm_80): copies from global to shared memory that complete in commit groups, for the
// products' kernels that stage codes and x in shared memory.
#pragma once

#include <cstdint>

namespace qlora::cuda {

// 16 bytes to the shared-window address dst, cached in L2 only.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// The same, or 16 zero bytes where !valid (src-size 0: src is not read).
__device__ __forceinline__ void cp_async_16_or_zeros(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// 16 bytes of which only the first src_bytes (0 to 16) are read, the rest zero-filled.
__device__ __forceinline__ void cp_async_16_partial(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// 4 bytes (cached in L1 too).
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
// 4 bytes of which only the first src_bytes (0 to 4) are read, the rest zero-filled (src-size):
// a word past the end of an array, or none at all (0: src is not read).
__device__ __forceinline__ void cp_async_4_partial(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Returns once at most N of this thread's commit groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace qlora::cuda
