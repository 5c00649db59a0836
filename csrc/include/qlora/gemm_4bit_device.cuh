// Device code the fused products' kernel families share (csrc/cuda/gemm_4bit_*.cu): the 4-bit
// codes' values, the mma.sync kernels' pair table and A fragments (fragment layout: qlora/mma.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qlora/codebooks.h"
#include "qlora/gemm_4bit_layout.h"
#include "qlora/half_convert.cuh"

namespace qlora::cuda {

// The codes' values in constant memory (FP4's code 8 is -0.0, as bitsandbytes' CUDA decoder has
// it), read where a kernel builds its shared-memory tables. Each translation unit has its own copy
// (internal linkage: no device linking), and as variable templates (take <>) only where its device
// code reads them: none is left unused in the compilation passes whose kernel bodies are traps.
namespace {
template <int = 0>
__constant__ float kNF4Values[16] = {QLORA_NF4_CODE};
template <int = 0>
__constant__ float kFP4Values[16] = {QLORA_FP4_CODE_SIGNED};
// (Named here first, NF4 before FP4, so that every translation unit lays them out alike.)
static_assert(sizeof(kNF4Values<>) == 64 && sizeof(kFP4Values<>) == 64);
}  // namespace

// The pair table of the mma.sync kernels (gemm_4bit_mma.cu's, and the backward's in
// gemm_4bit_transposed.cu): entry e of copy l at word e * kLutCopies + l holds code[e >> 4] (a
// byte's high nibble) in its low half and code[e & 15] in its high half, as bf16 / fp16; lane l
// reads copy l, always in bank l, so that 32 lanes' lookups of random bytes never conflict.
// Written by `threads` threads, tid among them.
template <typename T>
__device__ __forceinline__ void build_pair_table(uint32_t* lut, int fp4, int tid, int threads) {
  for (int i = tid; i < 256 * kLutCopies / 4; i += threads) {
    const int e = i / (kLutCopies / 4);
    const float* code = fp4 ? kFP4Values<> : kNF4Values<>;
    const uint32_t v = pack_pair<T>(code[e >> 4], code[e & 15]);
    reinterpret_cast<uint4*>(lut)[i] = make_uint4(v, v, v, v);
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The A fragments of the four mma steps of a sub-block from the lane's 8 bytes of rows g (w0)
// and g + 8 (w1): step q takes bytes 2q and 2q + 1, each one register (two k) through
// `pair(word, byte index in the word)`, the table lookup.
template <typename Pair>
__device__ __forceinline__ void a_fragments(uint2 w0, uint2 w1, uint32_t (&a)[4][4], Pair pair) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t v0 = q < 2 ? w0.x : w0.y;
    const uint32_t v1 = q < 2 ? w1.x : w1.y;
    const int k = (q & 1) * 2;
    a[q][0] = pair(v0, k);
    a[q][1] = pair(v1, k);
    a[q][2] = pair(v0, k + 1);
    a[q][3] = pair(v1, k + 1);
  }
}

}  // namespace qlora::cuda
