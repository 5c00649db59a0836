// CUDA kernels of the blockwise 4-bit format: quantize_4bit, quantize_absmax, dequantize_absmax,
// dequantize_4bit.
//
// They reproduce bitsandbytes 0.50.2's CUDA path bit for bit. Its kernels are built with fast math,
// which its sm_90 SASS shows: block maxima with FMNMX.FTZ (NaN skipped, denormals read as zero), the
// reciprocal of the block absmax with a bare MUFU.RCP (rcp.approx.ftz), scaled values and
// dequantized products with FMUL.FTZ, and comparisons against its pivot literals as compiled to
// float. The helpers below issue exactly those instructions; nothing else in this file depends on
// compiler flags. Where its CPU path differs (see csrc/cpu/quantize_4bit.cpp) the results differ too.
//
// Throughput: quantize and dequantize are pure bandwidth. Each thread moves 16 bytes a load or store
// (8 elements of a 16-bit input, 16 packed bytes), the code tables sit in shared memory, and the
// double-quantized scale is decoded inside the dequantize kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <map>
#include <mutex>

#include "qlora/codebooks.h"
#include "qlora/format.h"
#include "qlora/kernels.h"
#include "qlora/nested_scale.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float rcp_approx_ftz(float a) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}

// fmaxf(m, |x|) with x flushed to zero when denormal; a NaN x leaves m.
__device__ __forceinline__ float max_abs_ftz(float m, float x) {
  float a, r;
  asm("abs.ftz.f32 %0, %1;" : "=f"(a) : "f"(x));
  asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(a));
  return r;
}

// bitsandbytes' CUDA pivots, as its compiler rounded the decimal literals (read off its SASS).
// NF4, sorted: the code is the number of pivots strictly below the scaled value.
#define QLORA_NF4_P0 -0.84809643030166625977f
#define QLORA_NF4_P1 -0.61063289642333984375f
#define QLORA_NF4_P2 -0.459995269775390625f
#define QLORA_NF4_P3 -0.33967941999435424805f
#define QLORA_NF4_P4 -0.23460739850997924805f
#define QLORA_NF4_P5 -0.13791173696517944336f
#define QLORA_NF4_P6 -0.045525018125772476196f
#define QLORA_NF4_P7 0.039790149778127670288f
#define QLORA_NF4_P8 0.12025525420904159546f
#define QLORA_NF4_P9 0.20352125167846679688f
#define QLORA_NF4_P10 0.29201376438140869141f
#define QLORA_NF4_P11 0.38931253552436828613f
#define QLORA_NF4_P12 0.50166338682174682617f
#define QLORA_NF4_P13 0.64278692007064819336f
#define QLORA_NF4_P14 0.86147838830947875977f
// FP4, sorted magnitudes: the rank of |v| among them picks the magnitude code, v < 0 the sign.
#define QLORA_FP4_T0 0.0026041700039058923721f
#define QLORA_FP4_T1 0.0859375f
#define QLORA_FP4_T2 0.20833332836627960205f
#define QLORA_FP4_T3 0.2916666567325592041f
#define QLORA_FP4_T4 0.4166666865348815918f
#define QLORA_FP4_T5 0.58333301544189453125f
#define QLORA_FP4_T6 0.8333333134651184082f

__constant__ float kNF4Pivots[15] = {QLORA_NF4_P0,  QLORA_NF4_P1,  QLORA_NF4_P2,  QLORA_NF4_P3,  QLORA_NF4_P4,
                                     QLORA_NF4_P5,  QLORA_NF4_P6,  QLORA_NF4_P7,  QLORA_NF4_P8,  QLORA_NF4_P9,
                                     QLORA_NF4_P10, QLORA_NF4_P11, QLORA_NF4_P12, QLORA_NF4_P13, QLORA_NF4_P14};
__constant__ float kFP4Pivots[7] = {QLORA_FP4_T0, QLORA_FP4_T1, QLORA_FP4_T2, QLORA_FP4_T3,
                                    QLORA_FP4_T4, QLORA_FP4_T5, QLORA_FP4_T6};

// Encoding by a bin table instead of a 4-step search (7 instructions an element instead of 13).
// One FFMA puts round(16 v + 16) (NF4, v in [-1, 1]) or round(16 |v|) (FP4) in the low mantissa bits
// of a float offset by 2^23. Bins are 1/16 wide, narrower than the closest two pivots (0.080 apart),
// so a bin holds at most one pivot, and every pivot lies at least 0.0044 from a bin edge, far
// beyond the 2^-20 rounding of that FFMA. The bin's entry gives the code below its pivot and the
// code above it; one comparison with the exact pivot decides, so the codes are the search's.
// Canonical NaN (0x7fffffff) lands on bin 63, whose entry gives code 0 (bitsandbytes' code for NaN).
struct QuantBin {
  float pivot;     // +inf where the bin holds no pivot
  uint32_t codes;  // code below the pivot | code above it << 8
};
struct QuantTables {
  QuantBin bins[64];
};
constexpr float kBinScale = 16.0f;
constexpr float kRoundMagic = 8388608.0f;  // 2^23: adding it leaves round(x) in the mantissa

template <QuantType QT>
__device__ __forceinline__ void load_quant_tables(QuantTables& t) {
  if (threadIdx.x < 64) {
    const int k = threadIdx.x;
    const float inf = __int_as_float(0x7f800000);
    QuantBin bin{inf, 0u};
    const int npiv = QT == QuantType::NF4 ? 15 : 7;
    const float* piv = QT == QuantType::NF4 ? kNF4Pivots : kFP4Pivots;
    const float center = QT == QuantType::NF4 ? 16.0f : 0.0f;
    if (k <= (QT == QuantType::NF4 ? 32 : 16)) {
      const float lo = (k - 0.5f - center) / kBinScale, hi = (k + 0.5f - center) / kBinScale;
      uint32_t below = 0;
      for (int i = 0; i < npiv; ++i) below += piv[i] < lo ? 1u : 0u;
      uint32_t above = below;
      for (int i = 0; i < npiv; ++i) {
        if (piv[i] >= lo && piv[i] < hi) {
          bin.pivot = piv[i];
          above = below + 1;
        }
      }
      if constexpr (QT == QuantType::FP4) {  // magnitude rank 0..7 -> code 0, 1, 6, 7, 4, 5, 2, 3
        below ^= (below & 2u) << 1;
        above ^= (above & 2u) << 1;
      }
      bin.codes = below | above << 8;
    }
    t.bins[k] = bin;
  }
}

template <QuantType QT>
__device__ __forceinline__ uint32_t encode(const QuantTables& t, float v) {
  const float a = QT == QuantType::NF4 ? v : fabsf(v);
  const float biased = fmaf(a, kBinScale, kRoundMagic + (QT == QuantType::NF4 ? 16.0f : 0.0f));
  const QuantBin bin = t.bins[__float_as_uint(biased) & 63u];
  const uint32_t code = (a > bin.pivot ? bin.codes >> 8 : bin.codes) & 0xffu;
  if constexpr (QT == QuantType::NF4) return code;
  else return code | (v < 0.0f ? 8u : 0u);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Loads EPT consecutive elements (zeros past n, as bitsandbytes' block loads fill them).
// Loads EPT consecutive elements one by one (zeros past n, as bitsandbytes' block loads fill them).
template <typename T, int EPT>
__device__ __forceinline__ void load_elements_checked(const T* __restrict__ A, int64_t e0, int64_t n, float (&x)[EPT]) {
#pragma unroll
  for (int k = 0; k < EPT; ++k) x[k] = e0 + k < n ? to_float(A[e0 + k]) : 0.0f;
}

template <typename T, int EPT>
struct Raw {
  uint4 v[EPT * sizeof(T) / 16];
};

// Streaming 16-byte loads: the weight is read once.
template <typename T, int EPT>
__device__ __forceinline__ void load_raw(const T* __restrict__ A, int64_t e0, Raw<T, EPT>& r) {
#pragma unroll
  for (int i = 0; i < EPT * int(sizeof(T)) / 16; ++i) r.v[i] = __ldcs(reinterpret_cast<const uint4*>(A + e0) + i);
}

template <typename T, int EPT>
__device__ __forceinline__ void unpack_raw(const Raw<T, EPT>& r, float (&x)[EPT]) {
  constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < EPT / kPerVec; ++i) {
    const uint32_t w[4] = {r.v[i].x, r.v[i].y, r.v[i].z, r.v[i].w};
#pragma unroll
    for (int k = 0; k < kPerVec; ++k) {
      if constexpr (std::is_same_v<T, float>) {
        x[i * kPerVec + k] = __uint_as_float(w[k]);
      } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const uint32_t word = w[k / 2];
        x[i * kPerVec + k] = __uint_as_float(k % 2 == 0 ? word << 16 : word & 0xffff0000u);
      } else {
        const uint32_t word = w[k / 2];
        x[i * kPerVec + k] =
            __half2float(__ushort_as_half(static_cast<unsigned short>(k % 2 == 0 ? word : word >> 16)));
      }
    }
  }
}

// One CTA of kThreads threads quantizes kThreads / GROUP blocks a tile; GROUP threads share a block,
// each holding EPT of its elements (blocksize = GROUP * EPT). Full tiles of an aligned input take the
// fast path, which loads the next tile while it encodes this one; the last partial tile, and all of
// a misaligned input, load element by element.
template <typename T, QuantType QT, int EPT, int GROUP>
__global__ void __launch_bounds__(kThreads)
    quantize_4bit_kernel(const T* __restrict__ A, int64_t n, bool vec, uint8_t* __restrict__ packed,
                         float* __restrict__ absmax) {
  static_assert(EPT % 8 == 0 && GROUP >= 2 && GROUP <= kThreads && kThreads % GROUP == 0, "bad tiling");
  constexpr int64_t kBlocksize = int64_t{GROUP} * EPT;
  constexpr int kBlocksPerTile = kThreads / GROUP;
  constexpr int64_t kTileElems = int64_t{kThreads} * EPT;
  __shared__ QuantTables tables;
  __shared__ float warp_max[2][kThreads / 32];
  load_quant_tables<QT>(tables);
  __syncthreads();

  const int group = threadIdx.x / GROUP;
  const int lane_in_group = threadIdx.x % GROUP;
  const int64_t nblocks = (n + kBlocksize - 1) / kBlocksize;
  int parity = 0;

  // Reduces, encodes and stores the EPT elements x of this thread in tile `tile`.
  auto quantize_tile = [&](int64_t tile, const float (&x)[EPT]) {
    const int64_t b = tile * kBlocksPerTile + group;
    const int64_t e0 = b * kBlocksize + int64_t{lane_in_group} * EPT;
    float m = -FLT_MAX;
#pragma unroll
    for (int k = 0; k < EPT; ++k) m = max_abs_ftz(m, x[k]);
    // NaN never reaches the reduction (max_abs_ftz skips it), so plain fmaxf is exact here.
#pragma unroll
    for (int off = (GROUP < 32 ? GROUP : 32) / 2; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if constexpr (GROUP > 32) {
      if ((threadIdx.x & 31) == 0) warp_max[parity][threadIdx.x / 32] = m;
      __syncthreads();  // the other buffer, used by the next tile, is free after this barrier
      const int first = group * (GROUP / 32);
#pragma unroll
      for (int w = 0; w < GROUP / 32; ++w) m = fmaxf(m, warp_max[parity][first + w]);
    }
    parity ^= 1;
    if (b >= nblocks) return;  // uniform across the group
    if (lane_in_group == 0) absmax[b] = m;
    const float inv = rcp_approx_ftz(m);
    // Eight codes a word, element 2j in the high nibble of byte j (little-endian words).
    uint32_t words[EPT / 8];
#pragma unroll
    for (int w = 0; w < EPT / 8; ++w) {
      words[w] = 0;
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const uint32_t hi = encode<QT>(tables, mul_ftz(x[8 * w + 2 * p], inv));
        const uint32_t lo = encode<QT>(tables, mul_ftz(x[8 * w + 2 * p + 1], inv));
        words[w] |= (hi << 4 | lo) << (8 * p);
      }
    }
    uint8_t* dst = packed + e0 / 2;
    if (e0 + EPT <= n) {
      if constexpr (EPT == 16) {
        __stcs(reinterpret_cast<uint2*>(dst), make_uint2(words[0], words[1]));
      } else {
#pragma unroll
        for (int w = 0; w < EPT / 8; ++w) reinterpret_cast<uint32_t*>(dst)[w] = words[w];
      }
    } else if (e0 < n) {
      const int64_t valid_bytes = (n - e0 + 1) / 2;
      for (int64_t j = 0; j < valid_bytes; ++j) dst[j] = static_cast<uint8_t>(words[j / 4] >> (8 * (j % 4)));
    }
  };

  const int64_t ntiles = (nblocks + kBlocksPerTile - 1) / kBlocksPerTile;
  const int64_t full_tiles = vec ? n / kTileElems : 0;
  const int64_t thread_offset = int64_t{threadIdx.x} * EPT;  // blocks of a tile are contiguous
  int64_t tile = blockIdx.x;
  if (tile < full_tiles) {
    Raw<T, EPT> cur;
    load_raw<T, EPT>(A, tile * kTileElems + thread_offset, cur);
    for (; tile < full_tiles; tile += gridDim.x) {
      Raw<T, EPT> next;
      if (tile + gridDim.x < full_tiles) load_raw<T, EPT>(A, (tile + gridDim.x) * kTileElems + thread_offset, next);
      float x[EPT];
      unpack_raw<T, EPT>(cur, x);
      quantize_tile(tile, x);
      cur = next;
    }
  }
  for (; tile < ntiles; tile += gridDim.x) {
    float x[EPT];
    load_elements_checked<T, EPT>(A, tile * kTileElems + thread_offset, n, x);
    quantize_tile(tile, x);
  }
}

// bitsandbytes' 8-bit search (dQuantize<0>): a 7-step bisection of the sorted map, then the nearer
// of the last bracket by its float32 midpoint.
__device__ __forceinline__ uint8_t encode_dynamic(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = mul_ftz(upper + val, 0.5f);
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = mul_ftz(lower + val, 0.5f);
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

__constant__ float kDynamicMap[256] = {QLORA_DYNAMIC_MAP_SIGNED};

// One CTA a 256-block of absmax at a time, one element a thread.
__global__ void __launch_bounds__(kThreads)
    quantize_absmax_kernel(const float* __restrict__ absmax, const float* __restrict__ offset, int64_t n,
                           uint8_t* __restrict__ q, float* __restrict__ nested_absmax) {
  static_assert(kThreads == kNestedBlocksize, "one thread an element");
  __shared__ float code[256];
  __shared__ float warp_max[2][kThreads / 32];
  code[threadIdx.x] = kDynamicMap[threadIdx.x];
  __syncthreads();
  const float off = *offset;
  const int64_t nblocks = (n + kNestedBlocksize - 1) / kNestedBlocksize;
  int parity = 0;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x, parity ^= 1) {
    const int64_t i = b * kNestedBlocksize + threadIdx.x;
    // torch's subtraction (IEEE, no flush); the quantizer flushes when it reads it.
    const float v = i < n ? __fsub_rn(absmax[i], off) : 0.0f;
    float m = max_abs_ftz(-FLT_MAX, v);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) warp_max[parity][threadIdx.x / 32] = m;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) m = fmaxf(m, warp_max[parity][w]);
    if (threadIdx.x == 0) nested_absmax[b] = m;
    if (i < n) q[i] = encode_dynamic(code, mul_ftz(v, rcp_approx_ftz(m)));
  }
}

__device__ __forceinline__ float decode_scale(const float* code, const uint8_t* __restrict__ qabsmax,
                                              const float* __restrict__ nested_absmax, float offset, int64_t b) {
  return nested_scale(code[qabsmax[b]], __ldg(nested_absmax + b / kNestedBlocksize), offset);
}

__global__ void dequantize_absmax_kernel(const uint8_t* __restrict__ qabsmax, const float* __restrict__ nested_absmax,
                                         const float* __restrict__ nested_code, const float* __restrict__ offset,
                                         int64_t n, float* __restrict__ out) {
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = nested_code[i];
  __syncthreads();
  const float off = *offset;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = decode_scale(code, qabsmax, nested_absmax, off, i);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

// 16 bytes of output from VEC floats, rounded to nearest even.
template <typename T, int VEC>
__device__ __forceinline__ void store16(T* dst, const float (&v)[VEC]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (std::is_same_v<T, __half>) {
        const __half2 h = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
        w[k] = *reinterpret_cast<const uint32_t*>(&h);
      } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        w[k] = *reinterpret_cast<const uint32_t*>(&h);
      }
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__constant__ float kNF4Lut[16] = {QLORA_NF4_CODE};
// bitsandbytes' CUDA FP4 decoder multiplies the magnitude by a sign, so code 8 is -0.0.
__constant__ float kFP4Lut[16] = {QLORA_FP4_CODE_SIGNED};

// The output is written in warp tiles of 32 lanes x K vectors of 16 bytes: lane c's k-th vector
// holds elements [k * 32 * VEC + c * VEC, +VEC) of the tile, so each store instruction of a warp
// fills 512 contiguous bytes (the output is 4x the input; full-line stores are what keeps the
// write stream at copy speed). Each lane first issues its K small loads of packed codes, then
// decodes. NESTED decodes each block's scale from the double quantization in place. Elements past
// the last full tile (and everything when the pointers are not aligned) go one per thread.
template <typename T, QuantType QT, bool NESTED>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, int64_t n, int blocksize_log2, bool vec,
                           const float* __restrict__ absmax, const uint8_t* __restrict__ qabsmax,
                           const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
                           const float* __restrict__ offset, T* __restrict__ out) {
  constexpr int VEC = 16 / sizeof(T);  // elements a 16-byte store: 8, or 4 for float32
  constexpr int K = 32 / VEC;          // 32 elements a lane and tile
  constexpr int64_t kTile = 32 * VEC * K;
  using Codes = std::conditional_t<VEC == 8, uint32_t, uint16_t>;  // VEC nibbles
  __shared__ float lut[16];
  __shared__ float code[NESTED ? 256 : 1];
  if (threadIdx.x < 16) lut[threadIdx.x] = QT == QuantType::NF4 ? kNF4Lut[threadIdx.x] : kFP4Lut[threadIdx.x];
  if constexpr (NESTED) code[threadIdx.x] = nested_code[threadIdx.x];
  __syncthreads();
  const float off = NESTED ? *offset : 0.0f;
  auto scale_of = [&](int64_t e) {
    const int64_t b = e >> blocksize_log2;
    return NESTED ? decode_scale(code, qabsmax, nested_absmax, off, b) : __ldg(absmax + b);
  };

  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t{blockIdx.x} * kThreads + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t{gridDim.x} * kThreads) >> 5;
  const int64_t full_tiles = vec ? n / kTile : 0;
  // The codes and block scales of the next tile are in flight while this one is decoded and stored
  // (without double quantization the float32 scale itself, with it its uint8 code and the nested
  // absmax; the short decode happens at use).
  struct Fetch {
    Codes codes[K];
    float scale[K];  // the scale, or the nested absmax
    uint32_t q[K];   // the scale's 8-bit code (double quantization)
  };
  auto fetch = [&](int64_t tile, Fetch& f) {
    const int64_t e0 = tile * kTile + lane * VEC;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = e0 + k * 32 * VEC;
      const int64_t b = e >> blocksize_log2;
      f.codes[k] = __ldcs(reinterpret_cast<const Codes*>(packed + e / 2));
      if constexpr (NESTED) {
        f.q[k] = __ldg(qabsmax + b);
        f.scale[k] = __ldg(nested_absmax + b / kNestedBlocksize);
      } else {
        f.scale[k] = __ldg(absmax + b);
      }
    }
  };
  Fetch next;
  if (warp < full_tiles) fetch(warp, next);
  for (int64_t tile = warp; tile < full_tiles; tile += nwarps) {
    const int64_t e0 = tile * kTile + lane * VEC;
    const Fetch cur = next;
    if (tile + nwarps < full_tiles) fetch(tile + nwarps, next);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = e0 + k * 32 * VEC;
      const float scale = NESTED ? nested_scale(code[cur.q[k]], cur.scale[k], off) : cur.scale[k];
      float v[VEC];
#pragma unroll
      for (int j = 0; j < VEC / 2; ++j) {
        const uint32_t byte = (uint32_t{cur.codes[k]} >> (8 * j)) & 0xffu;
        v[2 * j] = mul_ftz(lut[byte >> 4], scale);
        v[2 * j + 1] = mul_ftz(lut[byte & 0x0fu], scale);
      }
      store16<T, VEC>(out + e, v);
    }
  }
  for (int64_t e = full_tiles * kTile + int64_t{blockIdx.x} * kThreads + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * kThreads) {
    const uint8_t byte = packed[e >> 1];
    out[e] = from_float<T>(mul_ftz(lut[(e & 1) ? (byte & 0x0f) : (byte >> 4)], scale_of(e)));
  }
}

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> counts{};
  TORCH_CHECK(device >= 0 && device < 64, "qlora: CUDA device index ", device, " is out of range");
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Exactly one wave: as many CTAs as fit on the GPU at once (fewer for small work). The kernels
// stride over the rest, so every CTA gets the same share; a grid past one wave leaves a partial
// second wave running alone at the end (8 CTAs an SM where 5 fit: quantize of 28672 x 8192 bf16
// took 0.177 ms against 0.159 ms with one wave, H200, 2026-11-29).
template <typename Kernel>
int grid_for(Kernel kernel, int64_t work_items, int64_t items_per_cta, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> resident;  // (kernel, device) -> CTAs an SM
  int per_sm = 0;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    int& cached = resident[{reinterpret_cast<const void*>(kernel), device}];
    if (cached == 0) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cached, kernel, kThreads, 0));
      cached = std::max(cached, 1);
    }
    per_sm = cached;
  }
  const int64_t needed = (work_items + items_per_cta - 1) / items_per_cta;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t{sm_count(device)} * per_sm)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, QuantType QT, int EPT, int GROUP>
void launch_quantize(const at::Tensor& A, at::Tensor& packed, at::Tensor& absmax, cudaStream_t stream) {
  const int64_t n = A.numel();
  constexpr int64_t kBlocksize = int64_t{GROUP} * EPT;
  const int64_t tiles = ((n + kBlocksize - 1) / kBlocksize + kThreads / GROUP - 1) / (kThreads / GROUP);
  const T* src = reinterpret_cast<const T*>(A.const_data_ptr());
  auto* kernel = quantize_4bit_kernel<T, QT, EPT, GROUP>;
  kernel<<<grid_for(kernel, tiles, 1, A.get_device()), kThreads, 0, stream>>>(
      src, n, aligned16(src), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, QuantType QT>
void quantize_dispatch_blocksize(const at::Tensor& A, int64_t blocksize, at::Tensor& packed, at::Tensor& absmax,
                                 cudaStream_t stream) {
  // 16 elements a thread: two independent 16-byte loads in flight for 16-bit input.
  switch (blocksize) {
    case 32: return launch_quantize<T, QT, 16, 2>(A, packed, absmax, stream);
    case 64: return launch_quantize<T, QT, 16, 4>(A, packed, absmax, stream);
    case 128: return launch_quantize<T, QT, 16, 8>(A, packed, absmax, stream);
    case 256: return launch_quantize<T, QT, 16, 16>(A, packed, absmax, stream);
    case 512: return launch_quantize<T, QT, 16, 32>(A, packed, absmax, stream);
    case 1024: return launch_quantize<T, QT, 16, 64>(A, packed, absmax, stream);
    case 2048: return launch_quantize<T, QT, 16, 128>(A, packed, absmax, stream);
    default: return launch_quantize<T, QT, 16, 256>(A, packed, absmax, stream);
  }
}

template <typename T>
void quantize_dispatch_type(const at::Tensor& A, int64_t blocksize, QuantType qt, at::Tensor& packed,
                            at::Tensor& absmax, cudaStream_t stream) {
  if (qt == QuantType::NF4) quantize_dispatch_blocksize<T, QuantType::NF4>(A, blocksize, packed, absmax, stream);
  else quantize_dispatch_blocksize<T, QuantType::FP4>(A, blocksize, packed, absmax, stream);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A_in, int64_t blocksize,
                                                      c10::string_view quant_type) {
  const QuantType qt = check_quantize_4bit_args(A_in, blocksize, quant_type);
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous();
  const int64_t n = A.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.get_device()).stream();
  switch (A.scalar_type()) {
    case at::kFloat: quantize_dispatch_type<float>(A, blocksize, qt, packed, absmax, stream); break;
    case at::kHalf: quantize_dispatch_type<__half>(A, blocksize, qt, packed, absmax, stream); break;
    default: quantize_dispatch_type<__nv_bfloat16>(A, blocksize, qt, packed, absmax, stream);
  }
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_absmax_cuda(const at::Tensor& absmax_in, int64_t blocksize) {
  check_quantize_absmax_args(absmax_in, blocksize);
  const c10::cuda::CUDAGuard guard(absmax_in.device());
  const at::Tensor absmax = absmax_in.contiguous();
  const int64_t n = absmax.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty({n}, absmax.options().dtype(at::kByte));
  at::Tensor nested = at::empty({nblocks}, absmax.options());
  // torch's own mean, so that the offset is bitsandbytes' to the bit; an empty tensor gets 0.
  at::Tensor offset = n == 0 ? at::zeros({}, absmax.options()) : at::mean(absmax);
  if (n == 0) return {q, nested, offset};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(absmax.get_device()).stream();
  quantize_absmax_kernel<<<grid_for(quantize_absmax_kernel, nblocks, 1, absmax.get_device()), kThreads, 0, stream>>>(
      absmax.const_data_ptr<float>(), offset.const_data_ptr<float>(), n, q.data_ptr<uint8_t>(),
      nested.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, nested, offset};
}

at::Tensor dequantize_absmax_cuda(const at::Tensor& qabsmax_in, const at::Tensor& nested_absmax_in,
                                  const at::Tensor& nested_code_in, const at::Tensor& offset, int64_t blocksize) {
  const int64_t n = check_dequantize_absmax_args(qabsmax_in, nested_absmax_in, nested_code_in, offset, blocksize);
  const c10::cuda::CUDAGuard guard(qabsmax_in.device());
  at::Tensor out = at::empty({n}, qabsmax_in.options().dtype(at::kFloat));
  if (n == 0) return out;
  const at::Tensor qabsmax = qabsmax_in.contiguous();
  const at::Tensor nested_absmax = nested_absmax_in.contiguous();
  const at::Tensor nested_code = nested_code_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qabsmax.get_device()).stream();
  dequantize_absmax_kernel<<<grid_for(dequantize_absmax_kernel, n, kThreads, qabsmax.get_device()), kThreads, 0,
                             stream>>>(qabsmax.const_data_ptr<uint8_t>(), nested_absmax.const_data_ptr<float>(),
                                       nested_code.const_data_ptr<float>(), offset.const_data_ptr<float>(), n,
                                       out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T, QuantType QT>
void launch_dequantize(const at::Tensor& packed, int64_t n, int64_t blocksize, const at::Tensor& absmax,
                       const at::Tensor* nested_absmax, const at::Tensor* nested_code, const at::Tensor* offset,
                       at::Tensor& out, cudaStream_t stream) {
  // A full occupancy wave of CTAs; lanes stride over the warp tiles.
  const int log2 = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  T* dst = reinterpret_cast<T*>(out.data_ptr());
  const bool vec = reinterpret_cast<uintptr_t>(src) % 4 == 0 && aligned16(dst);
  const int64_t per_cta = kThreads * 32;  // 32 elements a thread and tile
  if (nested_absmax != nullptr) {
    auto* kernel = dequantize_4bit_kernel<T, QT, true>;
    kernel<<<grid_for(kernel, n, per_cta, packed.get_device()), kThreads, 0, stream>>>(
        src, n, log2, vec, nullptr, absmax.const_data_ptr<uint8_t>(), nested_absmax->const_data_ptr<float>(),
        nested_code->const_data_ptr<float>(), offset->const_data_ptr<float>(), dst);
  } else {
    auto* kernel = dequantize_4bit_kernel<T, QT, false>;
    kernel<<<grid_for(kernel, n, per_cta, packed.get_device()), kThreads, 0, stream>>>(
        src, n, log2, vec, absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, dst);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void dequantize_4bit_into(const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, QuantType qt, int64_t n,
                          at::Tensor& out) {
  if (n == 0) return;
  const at::Tensor* nap = nested_absmax.has_value() ? &*nested_absmax : nullptr;
  const at::Tensor* ncp = nested_absmax.has_value() ? &*nested_code : nullptr;
  const at::Tensor* offp = nested_absmax.has_value() ? &*offset : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(packed.get_device()).stream();
  auto launch = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (qt == QuantType::NF4) {
      launch_dequantize<T, QuantType::NF4>(packed, n, blocksize, absmax, nap, ncp, offp, out, stream);
    } else {
      launch_dequantize<T, QuantType::FP4>(packed, n, blocksize, absmax, nap, ncp, offp, out, stream);
    }
  };
  switch (out.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(__half{}); break;
    default: launch(__nv_bfloat16{});
  }
}

namespace {

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed_in, const at::Tensor& absmax_in,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                                c10::SymIntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = shape_numel(shape, "dequantize_4bit");
  const QuantType qt = check_dequantize_4bit_args(packed_in, absmax_in, nested_absmax, nested_code, offset, blocksize,
                                                  nested_blocksize, quant_type, n, dtype);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  at::Tensor out = at::empty_symint(shape, packed_in.options().dtype(dtype));
  if (n == 0) return out;
  std::optional<at::Tensor> na, nc;
  if (nested_absmax.has_value()) {
    na = nested_absmax->contiguous();
    nc = nested_code->contiguous();
  }
  dequantize_4bit_into(packed_in.contiguous(), absmax_in.contiguous(), na, nc, offset, blocksize, qt, n, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("quantize_absmax", &quantize_absmax_cuda);
  m.impl("dequantize_absmax", &dequantize_absmax_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
}

}  // namespace qlora::cuda
