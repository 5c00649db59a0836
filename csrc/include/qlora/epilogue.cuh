// The fused products' last step, shared by every kernel family: an output's float32 sum plus the
// bias and the adapter term (qlora::cuda::Epilogue), rounded once; and the two instructions of
// programmatic dependent launch, by which the decode adapter's down-projection
// (csrc/cuda/lora_decode.cu) runs while the product streams the weight.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "qlora/gemm_4bit_cuda.h"
#include "qlora/half_convert.cuh"

namespace qlora::cuda {

// Lets the next kernel of the stream, when it was launched with programmatic stream serialization,
// start before this one ends: its CTAs are scheduled once every CTA of this grid has run this
// or exited. A no-op before sm_90.
__device__ __forceinline__ void start_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Waits until the previous kernel of the stream has completed, its writes visible. A kernel
// launched with programmatic stream serialization runs this before it reads what that kernel wrote
// and before it writes anything (its output may reuse memory the previous kernel still reads).
// Returns at once for a kernel launched without it, and before sm_90.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The two 16-bit values of a 32-bit word as floats (lo: the low half, the lower address).
template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t w) {
  if constexpr (std::is_same_v<T, __half>) {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
  } else {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
  }
}

// acc + the sum of a[i] * b[i] over the 8 values of two 16-byte vectors, in index order.
template <typename T>
__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
  const uint32_t wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = unpack_pair<T>(wa[i]), fb = unpack_pair<T>(wb[i]);
    acc = __fmaf_rn(fa.x, fb.x, acc);
    acc = __fmaf_rn(fa.y, fb.y, acc);
  }
  return acc;
}

// The adapter term of output (tok, row): down[tok] . lora_B[a][row], a the token's adapter; 0 where
// the token has none. (An index outside [-1, adapters) reads nothing here: the kernel that made down
// has stopped on it with a device-side assert, and an assert's function call would serialize the
// wgmma kernels' pipeline.)
template <typename T>
__device__ __forceinline__ float lora_up(const Epilogue<T>& e, int64_t tok, int64_t row, int64_t N) {
  int64_t a = 0;
  if (e.adapter_index != nullptr) {
    a = e.adapter_index[tok];
    if (a < 0 || a >= e.adapters) return 0.f;
  }
  const uint4* d = reinterpret_cast<const uint4*>(e.lora_down + tok * e.r);
  const uint4* b = reinterpret_cast<const uint4*>(e.lora_B + (a * N + row) * e.r);
  float acc = 0.f;
  for (int j = 0; j < e.r / 8; ++j) acc = dot8<T>(d[j], __ldg(b + j), acc);
  return acc;
}

// Brings rows [row0, row0 + rows) of one adapter's lora_B (adapter_index null) into this SM's L1, a
// 128-byte line a lane, for the epilogue that reads them later in the same CTA: its loads then hit L1
// instead of each waiting on memory behind the weight's stream, output after output. (lora_B is a
// parameter, written before this kernel was launched: no line of it can be stale. down is not
// prefetched: the kernel before this one may still be writing it.)
template <typename T>
__device__ __forceinline__ void prefetch_lora_rows(const Epilogue<T>& e, int64_t row0, int64_t rows, int lane) {
  if (e.lora_down == nullptr || e.adapter_index != nullptr || rows <= 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(e.lora_B + row0 * e.r);
  const uintptr_t end = first + static_cast<uintptr_t>(rows * e.r) * sizeof(T);
  for (uintptr_t line = (first & ~uintptr_t{127}) + uintptr_t{128} * lane; line < end; line += 32 * 128) {
    asm volatile("prefetch.global.L1 [%0];\n" ::"l"(line));
  }
}

// Output (tok, row) of the product, v its float32 sum: plus the bias, plus the adapter term, rounded.
// (__fadd_rn: never contracted, the same bits whichever kernel or split path computed v.) LORA false:
// the caller has found that e has no adapter term (with_lora_term), and no code of it is emitted.
template <bool LORA = true, typename T>
__device__ __forceinline__ T finish_output(float v, const Epilogue<T>& e, int64_t tok, int64_t row, int64_t N) {
  if (e.bias != nullptr) v = __fadd_rn(v, to_float(e.bias[row]));
  if (LORA && e.lora_down != nullptr) {
    wait_for_previous_grid();  // down is the previous kernel's
    v = __fadd_rn(v, __fmul_rn(e.scaling, lora_up(e, tok, row, N)));
  }
  return from_float<T>(v);
}

// finish_output where the adapter term's dot product, up = lora_up(e, tok, row, N), was computed
// elsewhere (by another lane): the same additions in the same order.
template <typename T>
__device__ __forceinline__ T finish_output_with_up(float v, const Epilogue<T>& e, int64_t row, float up) {
  if (e.bias != nullptr) v = __fadd_rn(v, to_float(e.bias[row]));
  return from_float<T>(__fadd_rn(v, __fmul_rn(e.scaling, up)));
}

// Runs store(lora) once, lora a std::bool_constant: whether e has an adapter term. For a tile's
// stores unrolled over many outputs: with the adapter's code inlined between every two stores (jumped
// over where there is no adapter), the 256-token wgmma kernel grew from 6.7k to 36.6k instructions and
// the products ran up to 2x slower at M = 64-256 (docs/perf/lora-decode.md).
template <typename T, typename Store>
__device__ __forceinline__ void with_lora_term(const Epilogue<T>& e, Store&& store) {
  if (e.lora_down != nullptr) {
    store(std::true_type{});
  } else {
    store(std::false_type{});
  }
}

}  // namespace qlora::cuda
