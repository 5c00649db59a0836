// CUDA kernels of the products with a 4-bit weight W [N, K]: gemm_4bit (x @ W^T + bias) and
// gemm_4bit_transposed (grad @ W).
//
// Small and medium M (decode, short prompts): one fused kernel reads the packed codes once,
// decodes them in registers and multiplies on the tensor cores (mma.sync m16n8k16, fp32
// accumulation). The weight is the mma's A operand (16 output features a tile) and x its B operand
// (8 tokens a tile), so that a single token still fills the instruction's wide side.
//   - Decoding: a byte holds two codes, and one bf16x2 / half2 register of the A fragment holds two
//     neighbouring k of one row, so one shared-memory lookup in a 256-entry table of code pairs
//     gives one fragment register. The table is kept in 32 copies, copy i in bank i, and lane i reads
//     copy i: random bytes never conflict.
//   - Scales: each mma step covers 16 k of one quantization block (lane c reads bytes [8c, 8c+8) of
//     a row's 32-byte sub-block of 64 k; the k order inside a sub-block is permuted identically for
//     W and x, which a dot product does not see). The products of a sub-block are accumulated
//     unscaled and then multiplied by the row's block scale in fp32, so the weight used is
//     bf16(code) * absmax: no second rounding, and 4 FMAs a sub-block instead of a multiply per
//     weight. With double quantization the scale is decoded from its 8-bit code in place.
//   - Work: a CTA owns a tile of 16 (or 16*MT) rows x 8*NT tokens and its 8 warps split K. Partial
//     sums are added in shared memory in a fixed order: the result is the same bits run to run. The
//     grid is one wave of CTAs that stride over the tiles.
//   - Kernels: on sm_90 at M <= 8 with long rows or many weights, at M <= 16 on all, and at M <= 32
//     on small weights, the warp-specialized kernel (a copy warp moving the codes with bulk copies
//     on mbarriers, scale warps, 8 or 16 math warps; tiles of two row groups, each warp's x of a
//     sub-block used for 32 rows, where its shared memory fits); else up to M = 64 the stream
//     kernel (codes through shared memory with cp.async, all warps alike); the
//     register-fed kernel (codes loaded into registers a few sub-blocks ahead) serves unaligned
//     codes and rows of more than 16384 k where it measured faster; benchmark variants
//     (_set_gemm_variant) pick any of them. On Hopper at 16 < M <= 256 (32 < M for fp16) the
//     wgmma kernels (csrc/cuda/gemm_4bit_wgmma.cu) take over where they measured faster
//     (dispatch_mma).
// Large M: the product is compute bound; W is dequantized into a reusable workspace (one per
// device and stream, grown when needed, never allocated per call in steady state) and cuBLAS
// multiplies. The crossovers (kDefaultFusedMaxM, dispatch_mma) are H200 measurements in bench/results.
// Medium M on Hopper: the wgmma kernel of csrc/cuda/gemm_4bit_wgmma.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>

#include "qlora/codebooks.h"
#include "qlora/format.h"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/half_convert.cuh"
#include "qlora/mbarrier.cuh"
#include "qlora/mma.cuh"
#include "qlora/kernels.h"
#include "qlora/nested_scale.cuh"

namespace qlora::cuda {
namespace {

// M up to which a fused kernel can beat dequantize + cuBLAS on the H200 (bench/gemm.py --sweep, op
// gemm_path in bench/results): the mma.sync kernels up to M = 64, the wgmma kernel up to 256.
constexpr int64_t kDefaultFusedMaxM = 256;
constexpr int64_t kMmaMaxM = 64;

constexpr int kSubK = 64;       // k of a sub-block: 32 packed bytes of a row, 4 mma steps
constexpr int kLutCopies = 32;  // one copy of the pair table per shared-memory bank
constexpr int kWarps = 8;

__constant__ float kGemmNF4[16] = {QLORA_NF4_CODE};
__constant__ float kGemmFP4[16] = {QLORA_FP4_CODE_SIGNED};


// The pair table: entry e of copy l at word e * 32 + l holds code[e >> 4] (the even k, a byte's
// high nibble) in its low half and code[e & 15] in its high half; lane l reads copy l (bank l).
template <typename T>
__device__ __forceinline__ void build_pair_table(uint32_t* lut, int fp4, int tid) {
  for (int i = tid; i < 256 * kLutCopies / 4; i += kWarps * 32) {
    const int e = i / (kLutCopies / 4);
    const float* code = fp4 ? kGemmFP4 : kGemmNF4;
    const uint32_t v = pack_pair<T>(code[e >> 4], code[e & 15]);
    reinterpret_cast<uint4*>(lut)[i] = make_uint4(v, v, v, v);
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int MT, int NT>
constexpr int reduce_floats() {
  return kWarps * MT * NT * 4 * 32;
}

template <int MT, int NT>
constexpr size_t mma_smem_bytes() {
  return 256 * kLutCopies * sizeof(uint32_t) + reduce_floats<MT, NT>() * sizeof(float) + 256 * sizeof(float);
}

// A warp's loads for U sub-blocks: packed bytes of its rows, x of its tokens, the rows' scales.
template <int MT, int NT, int U>
struct Batch {
  uint2 w[U][MT][2];
  uint4 x[U][NT][2];
  float s[U][MT][2];
};

// One CTA: tiles of 16*MT weight rows x 8*NT tokens; U sub-blocks a warp a batch. PIPE issues the
// next batch's loads before the current batch's math (and the first batch's before the table is
// built), so that each warp always has one batch of loads in flight.
template <typename T, bool NESTED, int MT, int NT, int U, bool PIPE>
__global__ void __launch_bounds__(kWarps * 32) gemm_4bit_mma_kernel(const T* __restrict__ x, int64_t M,
                                                                    const uint8_t* __restrict__ packed, int64_t N,
                                                                    int64_t K, int bs_log2, Scales sc, int fp4,
                                                                    const T* __restrict__ bias, T* __restrict__ out) {
  extern __shared__ uint4 smem[];
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem);
  float* red = reinterpret_cast<float*>(lut + 256 * kLutCopies);
  float* ncode = red + reduce_floats<MT, NT>();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;
  const uint32_t* lut_lane = lut + lane;
  const int64_t row_bytes = K >> 1;
  const int64_t nsub = K / kSubK;
  const int64_t blocks_per_row = K >> bs_log2;
  const int sub_shift = bs_log2 - 6;  // a quantization block is 2^sub_shift sub-blocks
  const int64_t row_tiles = (N + 16 * MT - 1) / (16 * MT);
  const int64_t tok_tiles = (M + 8 * NT - 1) / (8 * NT);
  constexpr int64_t kStride = int64_t{kWarps} * U;
  float offset = 0.f;
  bool table_ready = false;

  // Builds the pair table (and the nested code) in shared memory; every thread takes part.
  auto build_table = [&]() {
    build_pair_table<T>(lut, fp4, tid);
    if constexpr (NESTED) {
      for (int i = tid; i < 256; i += kWarps * 32) ncode[i] = sc.nested_code[i];
    }
    __syncthreads();
    if constexpr (NESTED) offset = *sc.offset;
  };

  for (int64_t tile = blockIdx.x; tile < row_tiles * tok_tiles; tile += gridDim.x) {
    const int64_t row0 = (tile / tok_tiles) * (16 * MT);
    const int64_t tok0 = (tile % tok_tiles) * (8 * NT);
    // Rows and tokens past the end are clamped to the last one: their sums are computed and dropped.
    const uint8_t* wrow[MT][2];
    int64_t qrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = min(row0 + 16 * mt + 8 * h + g, N - 1);
        wrow[mt][h] = packed + r * row_bytes + 8 * c;
        qrow[mt][h] = r * blocks_per_row;
      }
    const T* xrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xrow[nt] = x + min(tok0 + 8 * nt + g, M - 1) * K + 16 * c;

    // Codes and x first; the scales' loads need the nested table, so they wait for it.
    auto load_data = [&](Batch<MT, NT, U>& b, int64_t j0) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u * kWarps;
        if (j < nsub) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) b.w[u][mt][h] = __ldcs(reinterpret_cast<const uint2*>(wrow[mt][h] + j * 32));
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4* p = reinterpret_cast<const uint4*>(xrow[nt] + j * kSubK);
            b.x[u][nt][0] = __ldg(p);
            b.x[u][nt][1] = __ldg(p + 1);
          }
        }
      }
    };
    auto load_scales = [&](Batch<MT, NT, U>& b, int64_t j0) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u * kWarps;
        if (j < nsub) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int64_t bi = qrow[mt][h] + (j >> sub_shift);
              if constexpr (NESTED) {
                b.s[u][mt][h] = nested_scale(ncode[__ldg(sc.qabsmax + bi)], __ldg(sc.nested_absmax + (bi >> 8)),
                                          offset);
              } else {
                b.s[u][mt][h] = __ldg(sc.absmax + bi);
              }
            }
        }
      }
    };
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.f;
    auto compute = [&](const Batch<MT, NT, U>& b, int64_t j0) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (j0 + u * kWarps >= nsub) break;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          // a[s]: the A fragment of mma step s: bytes 2s and 2s+1 of rows g and g+8.
          uint32_t a[4][4];
#pragma unroll
          for (int st = 0; st < 4; ++st) {
            const uint32_t w0 = st < 2 ? b.w[u][mt][0].x : b.w[u][mt][0].y;
            const uint32_t w1 = st < 2 ? b.w[u][mt][1].x : b.w[u][mt][1].y;
            const int sh = (st & 1) * 16;
            a[st][0] = lut_lane[((w0 >> sh) & 0xff) * kLutCopies];
            a[st][1] = lut_lane[((w1 >> sh) & 0xff) * kLutCopies];
            a[st][2] = lut_lane[((w0 >> (sh + 8)) & 0xff) * kLutCopies];
            a[st][3] = lut_lane[((w1 >> (sh + 8)) & 0xff) * kLutCopies];
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int st = 0; st < 4; ++st) {
              const uint4& v = b.x[u][nt][st >> 1];
              mma_16816<T>(d, a[st], word_of(v, (st & 1) * 2), word_of(v, (st & 1) * 2 + 1));
            }
            acc[mt][nt][0] = __fmaf_rn(b.s[u][mt][0], d[0], acc[mt][nt][0]);
            acc[mt][nt][1] = __fmaf_rn(b.s[u][mt][0], d[1], acc[mt][nt][1]);
            acc[mt][nt][2] = __fmaf_rn(b.s[u][mt][1], d[2], acc[mt][nt][2]);
            acc[mt][nt][3] = __fmaf_rn(b.s[u][mt][1], d[3], acc[mt][nt][3]);
          }
        }
      }
    };

    if constexpr (PIPE) {
      Batch<MT, NT, U> cur;
      int64_t j0 = warp;
      load_data(cur, j0);
      if (!table_ready) {
        build_table();
        table_ready = true;
      }
      load_scales(cur, j0);
      while (j0 < nsub) {
        Batch<MT, NT, U> nxt;
        const int64_t j1 = j0 + kStride;
        if (j1 < nsub) {
          load_data(nxt, j1);
          load_scales(nxt, j1);
        }
        compute(cur, j0);
        cur = nxt;
        j0 = j1;
      }
    } else {
      if (!table_ready) {
        build_table();
        table_ready = true;
      }
      for (int64_t j0 = warp; j0 < nsub; j0 += kStride) {
        Batch<MT, NT, U> b;
        load_data(b, j0);
        load_scales(b, j0);
        compute(b, j0);
      }
    }

    // The warps' partial sums, added in warp order.
    float* mine = red + warp * (MT * NT * 4 * 32);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) mine[((mt * NT + nt) * 4 + q) * 32 + lane] = acc[mt][nt][q];
    __syncthreads();
    for (int idx = tid; idx < MT * NT * 4 * 32; idx += kWarps * 32) {
      float v = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) v += red[wi * (MT * NT * 4 * 32) + idx];
      const int r = idx >> 5, ln = idx & 31, q = r & 3;
      const int mt = r / (NT * 4), nt = (r >> 2) % NT;
      const int64_t row = row0 + 16 * mt + (ln >> 2) + 8 * (q >> 1);
      const int64_t tok = tok0 + 8 * nt + 2 * (ln & 3) + (q & 1);
      if (row < N && tok < M) {
        if (bias != nullptr) v += to_float(bias[row]);
        out[tok * N + row] = from_float<T>(v);
      }
    }
    __syncthreads();
  }
}

// M up to 64: the same math, but the packed codes stream through shared memory with cp.async in a
// ring of kStages stages of 16 rows x 1 KB, so that the bytes in flight are bounded by shared
// memory, not by registers, and each row is read in 1 KB runs. (The register-fed kernel above,
// 16 rows x 512 bytes a step, and a first version of this one with 256-byte stages both stalled at
// about 1.3 TB/s on 28672x8192 at M=1.) The tile's block scales are decoded into shared
// memory while the first stages are in flight; x is read through L1, where every warp of the SM
// finds it.
// 3 stages. In the sweep of 01039ad (2026-11-29, variants since removed) a 2-stage ring (three CTAs
// an SM at K <= 8192) was faster at M = 1 on the large shapes (67 against 79 us on 28672x8192; the
// warp-specialized kernel serves those now, at 56-60) and slower at M = 8-64 on 8192x28672 (101
// against 83 at M = 8); the flow kernel, one cp.async stream across a CTA's tiles, was slower
// everywhere (M = 1: 28.2 / 85.5 / 129 against 24.8 / 79.3 / 86.0 us on 8192x8192 / 28672x8192 /
// 8192x28672).
constexpr int kStages = 3;
constexpr int kStageRowBytes = 1024;              // 32 sub-blocks of a row: four a warp
constexpr int kStageSubs = kStageRowBytes / 32;
constexpr int kStagePitch = kStageRowBytes + 32;  // +32 bytes: rows g and g+4 fall in other banks
constexpr int kStageBytes = 16 * kStagePitch;
constexpr int kCopiesPerThread = 16 * kStageRowBytes / 16 / (kWarps * 32);

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
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

// The warps' partial sums reuse the ring once the tile's last stage is consumed.
// Sub-block j (64 k) of a 16-row tile into acc: the lane's 8 bytes of rows g and g + 8 at `w` in a
// stage (rows kStagePitch apart), the rows' scales at `srow` (rows `pitch` floats apart, block sb),
// x of the lane's token octets through L1.
template <typename T, int NT>
__device__ __forceinline__ void mma_sub_block(const uint8_t* w, const float* srow, int pitch, int sb,
                                              const char* lut_bytes, uint32_t lane4, const T* const (&xrow)[NT],
                                              int64_t j, int g, float (&acc)[NT][4]) {
  const uint2 w0 = *reinterpret_cast<const uint2*>(w + g * kStagePitch);
  const uint2 w1 = *reinterpret_cast<const uint2*>(w + (g + 8) * kStagePitch);
  const float s0 = srow[sb];
  const float s1 = srow[8 * pitch + sb];
  // Byte k of a word (bits p = 8k up): table byte offset ((w >> (p - 7)) & 0x7f80) | 4 * lane (the
  // two parts have no bit in common), one shift and one LOP3 from the uniform table base.
  uint32_t a[4][4];
  a_fragments(w0, w1, a, [&](uint32_t v, int k) {
    const int p = 8 * k;
    const uint32_t off = ((p >= 7 ? (v >> (p - 7)) : (v << (7 - p))) & 0x7f80u) | lane4;
    return *reinterpret_cast<const uint32_t*>(lut_bytes + off);
  });
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint4* xp = reinterpret_cast<const uint4*>(xrow[nt] + j * kSubK);
    const uint4 xv[2] = {__ldg(xp), __ldg(xp + 1)};
    // two accumulator chains of two mma each, for twice the instruction-level parallelism
    float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4& v = xv[q >> 1];
      mma_16816<T>(d[q & 1], a[q], word_of(v, (q & 1) * 2), word_of(v, (q & 1) * 2 + 1));
    }
    acc[nt][0] = __fmaf_rn(s0, __fadd_rn(d[0][0], d[1][0]), acc[nt][0]);
    acc[nt][1] = __fmaf_rn(s0, __fadd_rn(d[0][1], d[1][1]), acc[nt][1]);
    acc[nt][2] = __fmaf_rn(s1, __fadd_rn(d[0][2], d[1][2]), acc[nt][2]);
    acc[nt][3] = __fmaf_rn(s1, __fadd_rn(d[0][3], d[1][3]), acc[nt][3]);
  }
}

// A 16-row tile's result: each warp's partial sums into `red`, then added in warp order (the same
// bits run to run), plus the bias, rounded and stored. Ends with every thread past one barrier.
template <typename T, int NT>
__device__ __forceinline__ void reduce_tile(float* red, const float (&acc)[NT][4], int tid, int64_t row0,
                                            int64_t tok0, int64_t N, int64_t M, const T* __restrict__ bias,
                                            T* __restrict__ out) {
  const int lane = tid & 31, warp = tid >> 5;
  float* mine = red + warp * (NT * 4 * 32);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q) mine[(nt * 4 + q) * 32 + lane] = acc[nt][q];
  __syncthreads();
  for (int idx = tid; idx < NT * 4 * 32; idx += kWarps * 32) {
    float v = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) v += red[wi * (NT * 4 * 32) + idx];
    const int r = idx >> 5, ln = idx & 31, q = r & 3, nt = r >> 2;
    const int64_t row = row0 + (ln >> 2) + 8 * (q >> 1);
    const int64_t tok = tok0 + 8 * nt + 2 * (ln & 3) + (q & 1);
    if (row < N && tok < M) {
      if (bias != nullptr) v += to_float(bias[row]);
      out[tok * N + row] = from_float<T>(v);
    }
  }
}

template <int NT, int STAGES>
constexpr size_t stream_fixed_smem_bytes() {
  static_assert(reduce_floats<1, NT>() * sizeof(float) <= size_t{STAGES} * kStageBytes, "red aliases the ring");
  return 256 * kLutCopies * sizeof(uint32_t) + size_t{STAGES} * kStageBytes + 256 * sizeof(float);
}

template <typename T, bool NESTED, int NT, int STAGES>
__global__ void __launch_bounds__(kWarps * 32) gemm_4bit_stream_kernel(const T* __restrict__ x, int64_t M,
                                                                       const uint8_t* __restrict__ packed, int64_t N,
                                                                       int64_t K, int bs_log2, Scales sc, int fp4,
                                                                       const T* __restrict__ bias,
                                                                       T* __restrict__ out) {
  extern __shared__ uint4 smem[];
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem);
  uint8_t* ring = reinterpret_cast<uint8_t*>(lut + 256 * kLutCopies);
  float* red = reinterpret_cast<float*>(ring);
  float* ncode = reinterpret_cast<float*>(ring + STAGES * kStageBytes);
  float* scales = ncode + 256;  // [16 rows][K >> bs_log2], rows nb + 1 apart (no bank conflicts)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;
  const char* lut_bytes = reinterpret_cast<const char*>(lut);
  const uint32_t lane4 = 4u * static_cast<uint32_t>(lane);
  const int64_t row_bytes = K >> 1;
  const int64_t nsub = K / kSubK;
  const int64_t nstage = (row_bytes + kStageRowBytes - 1) / kStageRowBytes;
  const int nb = static_cast<int>(K >> bs_log2);  // quantization blocks a row
  const int sub_shift = bs_log2 - 6;
  const int64_t row_tiles = (N + 15) / 16;
  const int64_t tok_tiles = (M + 8 * NT - 1) / (8 * NT);
  bool table_ready = false;

  for (int64_t tile = blockIdx.x; tile < row_tiles * tok_tiles; tile += gridDim.x) {
    const int64_t row0 = (tile / tok_tiles) * 16;
    const int64_t tok0 = (tile % tok_tiles) * (8 * NT);
    // Thread t copies 16-byte chunks t, t + 256, ... of the stage: 64 threads a row's 1 KB.
    auto issue = [&](int64_t st) {
      if (st < nstage) {
#pragma unroll
        for (int i = 0; i < kCopiesPerThread; ++i) {
          const int chunk = i * kWarps * 32 + tid;
          const int r = chunk / (kStageRowBytes / 16), col = (chunk % (kStageRowBytes / 16)) * 16;
          if (st * kStageRowBytes + col < row_bytes)
            cp_async16(ring + (st % STAGES) * kStageBytes + r * kStagePitch + col,
                       packed + min(row0 + r, N - 1) * row_bytes + st * kStageRowBytes + col);
        }
      }
      cp_async_commit();  // an empty group where there is nothing to copy keeps the count uniform
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) issue(st);

    if (!table_ready) {
      build_pair_table<T>(lut, fp4, tid);
      if constexpr (NESTED) {
        for (int i = tid; i < 256; i += kWarps * 32) ncode[i] = sc.nested_code[i];
        __syncthreads();
      }
      table_ready = true;
    }
    // The tile's scales, row by row (rows past the end clamped).
    {
      float offset = 0.f;
      if constexpr (NESTED) offset = *sc.offset;
      for (int i = tid; i < 16 * nb; i += kWarps * 32) {
        const int r = i / nb, b = i - r * nb;
        const int64_t bi = min(row0 + r, N - 1) * nb + b;
        if constexpr (NESTED) {
          scales[r * (nb + 1) + b] =
              nested_scale(ncode[__ldg(sc.qabsmax + bi)], __ldg(sc.nested_absmax + (bi >> 8)), offset);
        } else {
          scales[r * (nb + 1) + b] = __ldg(sc.absmax + bi);
        }
      }
    }

    const T* xrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xrow[nt] = x + min(tok0 + 8 * nt + g, M - 1) * K + 16 * c;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[nt][q] = 0.f;

    auto sub_block = [&](const uint8_t* stage, int64_t j, int sub) {
      mma_sub_block<T, NT>(stage + sub * 32 + 8 * c, scales + g * (nb + 1), nb + 1, static_cast<int>(j >> sub_shift),
                           lut_bytes, lane4, xrow, j, g, acc);
    };

    for (int64_t st = 0; st < nstage; ++st) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // stage st is in for everyone; the slot of stage st - 1 is free again
      issue(st + STAGES - 1);
      // A full stage runs its four sub-blocks without a branch between them, so that the compiler
      // interleaves their lookups and mma chains; the last, partial stage checks each. (With 2 or more
      // token octets that takes 146 registers and more, one CTA an SM: those check each too.)
      const uint8_t* stage = ring + (st % STAGES) * kStageBytes;
      if (NT == 1 && (st + 1) * kStageSubs <= nsub) {
#pragma unroll
        for (int u = 0; u < kStageSubs / kWarps; ++u) sub_block(stage, st * kStageSubs + u * kWarps + warp, u * kWarps + warp);
      } else {
#pragma unroll
        for (int u = 0; u < kStageSubs / kWarps; ++u) {
          const int64_t j = st * kStageSubs + u * kWarps + warp;
          if (j < nsub) sub_block(stage, j, u * kWarps + warp);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the ring, which now holds the partial sums

    reduce_tile<T, NT>(red, acc, tid, row0, tok0, N, M, bias, out);
    __syncthreads();  // red, scales and the ring are free for the next tile
  }
}


// CTAs of `kernel` resident on the device at once with `smem` bytes of dynamic shared memory,
// cached in `cache` (the caller's, one per kernel) by device and size: the 16-row-tile kernels'
// shared memory grows with K (the tile's scales). The kernel's shared-memory limit is raised to the
// device's opt-in maximum, not to this launch's size, which a later, larger K would exceed.
template <typename Kernel>
int resident_ctas(Kernel kernel, size_t smem, int device, std::map<std::pair<int, size_t>, int>& cache,
                  int threads = kWarps * 32) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({device, smem});
  if (it == cache.end()) {
    const DeviceLimits lim = device_limits(device);
    TORCH_CHECK(smem <= lim.smem_optin, "gemm_4bit: needs ", smem, " bytes of shared memory, the GPU has ",
                lim.smem_optin);
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(lim.smem_optin)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    it = cache.emplace(std::make_pair(device, smem), std::max(1, per_sm) * lim.sms).first;
  }
  return it->second;
}

// Launches one of the fused kernels (they share their signature) for tiles of `tile_rows` weight
// rows x `tile_tokens` tokens, as one wave of CTAs that stride over the tiles.
template <typename T, typename Kernel>
void launch_tiles(Kernel kernel, size_t smem, std::map<std::pair<int, size_t>, int>& cache, int tile_rows,
                  int tile_tokens, const at::Tensor& x2, int64_t M, const at::Tensor& packed, const GemmProblem& p,
                  int bs_log2, const Scales& sc, const at::Tensor* bias, at::Tensor& out, cudaStream_t stream) {
  const int64_t tiles = ((p.N + tile_rows - 1) / tile_rows) * ((M + tile_tokens - 1) / tile_tokens);
  const int64_t grid = std::min<int64_t>(tiles, resident_ctas(kernel, smem, x2.get_device(), cache));
  kernel<<<static_cast<unsigned>(grid), kWarps * 32, smem, stream>>>(
      reinterpret_cast<const T*>(x2.const_data_ptr()), M, packed.const_data_ptr<uint8_t>(), p.N, p.K, bs_log2, sc,
      p.quant_type == QuantType::FP4 ? 1 : 0, bias ? reinterpret_cast<const T*>(bias->const_data_ptr()) : nullptr,
      reinterpret_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool NESTED, int MT, int NT, int U, bool PIPE>
void launch_mma(const at::Tensor& x2, int64_t M, const at::Tensor& packed, const GemmProblem& p, int bs_log2,
                const Scales& sc, const at::Tensor* bias, at::Tensor& out, cudaStream_t stream) {
  static std::map<std::pair<int, size_t>, int> cache;
  launch_tiles<T>(gemm_4bit_mma_kernel<T, NESTED, MT, NT, U, PIPE>, mma_smem_bytes<MT, NT>(), cache, 16 * MT, 8 * NT,
                  x2, M, packed, p, bs_log2, sc, bias, out, stream);
}

// ---- The warp-specialized kernel (sm_90; the default at small M where it fits) -------------------
// The stream kernel spends over half its instructions on other things than decoding and mma (ncu
// on 28672x8192, M = 1: 45% of cycles with no eligible warp, 36% of DRAM bandwidth): every thread
// forms and predicates its own cp.async addresses (112 of its 423 instructions a stage and warp),
// each table lookup takes a shift and a LOP3 to form its address, all 8 warps meet at a barrier
// every stage, and the ring drains at every tile. Here:
//   - one copy warp moves each stage with 16 bulk copies (cp.async.bulk, a row each, lanes 0-15)
//     that complete on the stage's mbarrier, running ahead across tile boundaries;
//   - two scale warps decode the next tiles' block scales, each warp into its own of two
//     buffers, while the current tile is multiplied (the first tile's: all warps but the copy warp);
//   - the math warps (MW) wait only on mbarriers; at M <= 8 the last one to finish a tile adds up
//     the partial sums while the others go on, above they meet once a tile for the reduction;
//   - the pair table has 256-byte entries (the 32 lanes' copies, then 128 unused bytes) at shared
//     address 0x10000, so that one PRMT forms a lookup's whole address: bits 0-7 the lane's
//     4 * lane, bits 8-15 the code byte, bits 16-31 the table's base.
// Math warps (MW) a CTA: 8 at M <= 8 (each with twice the sub-blocks a stage and up to 168
// registers), 16 above. (Moving the scale warp's work into the math warps, its next tile's codes
// loaded at a tile's start and decoded at its end, measured slower at K = 8192: 62 against 52 us
// on 28672x8192 at M = 1 with plain loads, 65 with cp.async; b68712c and 5bba0c2, reverted.)
// Scale warps: 2, each decoding every other tile's scales into its own buffer (ncu on 28672x8192
// at M = 1, 732e8ba: one scale warp was busy all the kernel long, 1469 instructions a tile, and
// the math warps waited for it at 5% of their samples). The registers a thread stay as they were
// (a quarter of the SM's warps on each scheduler's 16K registers: 168 a thread with 11 or 12
// warps, 96 with 18 to 20).
constexpr int kWsScaleWarps = 2;
constexpr int ws_threads(int mw) { return (mw + 1 + kWsScaleWarps) * 32; }
// Ring stages: kWsMinStages; variant 17 takes as many as fit, up to kWsMaxStages (6 fit beside the
// table at K <= 8192 on the H200: 99 KB), for comparison.
constexpr int kWsMaxStages = 8;
constexpr int kWsMinStages = 4;
constexpr int kWsMaxRedBufs = kWsMaxStages + 1;  // ws_red_bufs at one stage a tile
constexpr uint32_t kWsLutAddress = 0x10000;  // the table's shared-window address, 64 KB long

// A tile of MT row groups (16 * MT rows): each math warp decodes the MT groups' A fragments of a
// sub-block against one load of its x, so that x is read from L1 once a 16 * MT rows instead of
// once a 16 (at M = 8 a 16-row tile read 128 KB of x against 64 KB of codes at K = 8192). A ring
// slot stays 16 rows x 1 KB, the MT groups' slots of one k range consecutive: slots of 32 rows x
// 512 bytes measured slower at M = 1 (71.3 against 50.2 us on 28672x8192; 64 x 256: 85.1) in the
// sweep of 3d66edb (H200, 2026-11-30), the shorter bulk copies being the one thing that changed.

// Byte offsets from the start of dynamic shared memory (at shared address `lo`, after the block's
// reserved bytes): region A below the table holds what fits of the barriers, the nested code, the
// two scale buffers and the reduction buffer; the ring and the rest follow the table.
struct WsLayout {
  uint32_t bars, ncode, scales, red, lut, ring, total;
};

// Reduction buffers with one token octet (NT = 1): each tile's partial sums go to buffer
// (tile % R), and the last math warp to finish the tile adds them up while the others go on (no
// barrier: ncu on 28672x8192 at M = 1, 27e0b8c, had the math warps waiting at the tile's barrier
// for 5% of all samples; measured at cfc2cc0 against 27e0b8c, H200, M = 1: 8192x28672 47.3 against
// 49.3 us, 4096x11008 15.2 against 14.4, the others within 2%: within the noise of a run on the
// whole, kept for the long rows). A warp can run ahead of the slowest one, which is still adding up tile
// t, by the ring's stages only (the copy warp refills a slot once every math warp is done with
// it): at most stages / nstage tiles past t. R = that + 1 buffers are never written while read.
__host__ __device__ inline int ws_red_bufs(int64_t K, int stages, int mt) {
  const int64_t nstage = mt * (((K >> 1) + kStageRowBytes - 1) / kStageRowBytes);  // ring slots a tile
  return static_cast<int>(stages / nstage) + 1;
}
__host__ __device__ inline uint32_t ws_red_bytes(int nt, int mw, int red_bufs, int mt) {
  const int chunk = nt == 1 ? mt : (mt * nt < 4 ? mt * nt : 4);  // fragments (row group, octet) a round
  return static_cast<uint32_t>(nt == 1 ? red_bufs : 1) * static_cast<uint32_t>(mw) * static_cast<uint32_t>(chunk) *
         4 * 32 * 4;
}

__host__ __device__ inline WsLayout ws_layout(uint32_t lo, int64_t nb, int64_t K, int nt, int mw, int stages, int mt) {
  WsLayout L{};
  L.lut = kWsLutAddress - lo;
  uint32_t a = 0, b = L.lut + 0x10000;
  auto place = [&](uint32_t bytes) {
    bytes = (bytes + 127) & ~127u;
    if (a + bytes <= L.lut) {
      a += bytes;
      return a - bytes;
    }
    b += bytes;
    return b - bytes;
  };
  L.bars = place((2 * kWsMaxStages + 4) * 8 + kWsMaxRedBufs * 4);  // the mbarriers, then the reduction counters
  L.ncode = place(256 * 4);
  L.scales = place(static_cast<uint32_t>(2 * 16 * mt * (nb + 1) * 4));
  L.red = place(ws_red_bytes(nt, mw, ws_red_bufs(K, stages, mt), mt));
  L.ring = place(static_cast<uint32_t>(stages) * kStageBytes);
  L.total = b;
  return L;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
template <int MW>
__device__ __forceinline__ void math_barrier() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(MW * 32) : "memory");
}
// Sub-block j as mma_sub_block, with the wide table; `lane_base` is kWsLutAddress | 4 * lane, and
// the byte at position k of word v is looked up at __byte_perm(v, lane_base, 0x7604 | k << 4).
// xv[nt]: the lane's 16 k of the sub-block for token octet nt (load_sub_block_x).
template <typename T, int NT>
__device__ __forceinline__ void load_sub_block_x(const T* const (&xs)[NT], uint4 (&xv)[NT][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint4* xp = reinterpret_cast<const uint4*>(xs[nt]);
    xv[nt][0] = __ldg(xp);
    xv[nt][1] = __ldg(xp + 1);
  }
}
template <typename T, int NT, int PITCH>
__device__ __forceinline__ void mma_sub_block_wide(uint32_t w, float s0, float s1, uint32_t lane_base,
                                                   const uint4 (&xvs)[NT][2], float (&acc)[NT][4]) {
  const uint2 w0 = lds_ring_u64(w);
  const uint2 w1 = lds_ring_u64(w + 8 * PITCH);
  uint32_t a[4][4];
  a_fragments(w0, w1, a, [&](uint32_t v, int k) { return lds_u32(__byte_perm(v, lane_base, 0x7604 | (k << 4))); });
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint4 (&xv)[2] = xvs[nt];
    // One chain of four mma: two chains of two (the stream kernel's) measured no faster here
    // (57.8 against 55.7 us on 28672x8192 at M = 1, 89.0 against 92.7 at M = 16).
    float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4& v = xv[q >> 1];
      mma_16816<T>(d, a[q], word_of(v, (q & 1) * 2), word_of(v, (q & 1) * 2 + 1));
    }
    acc[nt][0] = __fmaf_rn(s0, d[0], acc[nt][0]);
    acc[nt][1] = __fmaf_rn(s0, d[1], acc[nt][1]);
    acc[nt][2] = __fmaf_rn(s1, d[2], acc[nt][2]);
    acc[nt][3] = __fmaf_rn(s1, d[3], acc[nt][3]);
  }
}
#endif

// Thread t of P decodes the block scales of `rows` rows, the contiguous run of rows * nb from scale
// `first`, into dst (row r's at dst[r * (nb + 1)]). They are read 4 at a time (nb % 4 == 0 and
// aligned arrays: the launch checks), in batches of 16 vectors a thread whose loads are all issued
// before the first store (stores through a generic pointer would otherwise keep the next loads
// behind them: one memory latency a vector). Rows past N are left as they are (their sums are
// dropped). (i + 0.5) / nb in fp32 is within 2e-6 of its value, less than half the 1 / nb
// (>= 1 / 1536) to the nearest integer: the row, with no division.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
template <bool NESTED>
__device__ __forceinline__ void ws_decode_scales(float* dst, int64_t first, int64_t total, int nb, int rows,
                                                 const Scales& sc, const float* ncode, float offset, int t, int P) {
  const float inv_nb = 1.f / static_cast<float>(nb);
  constexpr int kBatch = 16;
  for (int i0 = 4 * t; i0 < rows * nb; i0 += 4 * P * kBatch) {
    uint32_t q[kBatch];
    float4 v[kBatch];
    float nested[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t at = first + i0 + 4 * P * u;
      if (i0 + 4 * P * u < rows * nb && at < total) {
        if constexpr (NESTED) {
          q[u] = __ldg(reinterpret_cast<const uint32_t*>(sc.qabsmax + at));
          nested[u] = __ldg(sc.nested_absmax + (at >> 8));  // 4 codes, one nested block
        } else {
          v[u] = __ldg(reinterpret_cast<const float4*>(sc.absmax + at));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + 4 * P * u;
      if (i < rows * nb && first + i < total) {
        float s[4];
        if constexpr (NESTED) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[e] = nested_scale(ncode[(q[u] >> (8 * e)) & 0xff], nested[u], offset);
        } else {
          s[0] = v[u].x, s[1] = v[u].y, s[2] = v[u].z, s[3] = v[u].w;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = static_cast<int>((static_cast<float>(i + e) + 0.5f) * inv_nb);
          dst[i + e + r] = s[e];
        }
      }
    }
  }
}
#endif

// `lo`: the shared-window address where dynamic shared memory starts (the block's reserved bytes),
// as the host laid it out; `nb`: quantization blocks a row, a multiple of 4; `stages`: the ring's
// stages (kWsMinStages..kWsMaxStages, at least 2 * MT); MT: row groups of 16 a tile.
template <typename T, bool NESTED, int NT, int MW, int MT>
__global__ void __launch_bounds__(ws_threads(MW), 1)
    gemm_4bit_ws_kernel(const T* __restrict__ x, int64_t M, const uint8_t* __restrict__ packed, int64_t N, int64_t K,
                        int bs_log2, Scales sc, int fp4, const T* __restrict__ bias, T* __restrict__ out, uint32_t lo,
                        int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint4 smem[];
  if (smem_u32(smem) != lo) __trap();  // the layout assumed another start: never launch it wrong
  const int nb = static_cast<int>(K >> bs_log2);
  constexpr int kRows = 16 * MT;  // a tile's rows
  static_assert(kStageSubs % MW == 0, "every math warp takes the same sub-blocks of a stage");
  const WsLayout L = ws_layout(lo, nb, K, NT, MW, stages, MT);
  char* base = reinterpret_cast<char*>(smem);
  uint8_t* ring = reinterpret_cast<uint8_t*>(base + L.ring);
  float* scales = reinterpret_cast<float*>(base + L.scales);  // [2][kRows][nb + 1]
  float* red = reinterpret_cast<float*>(base + L.red);
  float* ncode = reinterpret_cast<float*>(base + L.ncode);
  uint64_t* bars = reinterpret_cast<uint64_t*>(base + L.bars);
  uint64_t* full = bars;                   // a stage's bytes arrived (the copy warp's expect_tx)
  uint64_t* empty = bars + kWsMaxStages;      // every math thread is done with a stage
  uint64_t* sfull = bars + 2 * kWsMaxStages;  // a scale buffer is decoded (the 32 scale-warp lanes)
  uint64_t* sempty = sfull + 2;            // every math thread is done with a scale buffer
  uint32_t* red_count = reinterpret_cast<uint32_t*>(sempty + 2);  // math warps done with a reduction buffer
  const int red_bufs = ws_red_bufs(K, stages, MT);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row_bytes = K >> 1;
  const int nsub = static_cast<int>(K / kSubK);
  const int nstage = static_cast<int>((row_bytes + kStageRowBytes - 1) / kStageRowBytes);  // k ranges a tile
  const int64_t tok_tiles = (M + 8 * NT - 1) / (8 * NT);
  const int64_t tiles = ((N + kRows - 1) / kRows) * tok_tiles;

  {  // the pair table: entry e of lane l at e * 256 + 4 * l
    uint4* lut = reinterpret_cast<uint4*>(base + L.lut);
    const float* code = fp4 ? kGemmFP4 : kGemmNF4;
    for (int i = tid; i < 256 * 8; i += ws_threads(MW)) {
      const int e = i >> 3;
      const uint32_t v = pack_pair<T>(code[e >> 4], code[e & 15]);
      lut[e * 16 + (i & 7)] = make_uint4(v, v, v, v);
    }
  }
  if constexpr (NESTED) {
    for (int i = tid; i < 256; i += ws_threads(MW)) ncode[i] = sc.nested_code[i];
  }
  if (tid == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, MW * 32);
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(sfull + b, 32);
      mbar_init(sempty + b, MW * 32);
    }
    for (int b = 0; b < kWsMaxRedBufs; ++b) red_count[b] = 0;
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the table and barriers, for the copy engine
  __syncthreads();

  if (warp == MW) {  // the copy warp
    int slot = 0;
    uint32_t phase = 0;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t row0 = (tile / tok_tiles) * kRows;
      for (int sm = 0; sm < nstage * MT; ++sm) {
        const int st = sm / MT, m = sm % MT;  // k range st of row group m
        const int rows = static_cast<int>(max(int64_t{0}, min(int64_t{16}, N - row0 - 16 * m)));
        const uint32_t bytes = static_cast<uint32_t>(min(int64_t{kStageRowBytes}, row_bytes - int64_t{st} * kStageRowBytes));
        mbar_wait(empty + slot, phase ^ 1);
        if (lane == 0) mbar_arrive_expect_tx(full + slot, bytes * rows);
        __syncwarp();
        if (lane < rows)
          bulk_copy(ring + slot * kStageBytes + lane * kStagePitch,
                    packed + (row0 + 16 * m + lane) * row_bytes + int64_t{st} * kStageRowBytes, bytes, full + slot);
        if (++slot == stages) {
          slot = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }
  // The first tile's scales: decoded by every warp but the copy warp (which is already issuing the
  // first stages' copies), not by one scale warp while the math warps wait: ncu on 8192x8192 at
  // M = 1 (086c6c0) had the math warps waiting for that first buffer for about 3.9 of 19.7 us.
  constexpr int S = kWsScaleWarps;
  float offset = 0.f;
  if constexpr (NESTED) offset = *sc.offset;
  const int64_t total = N * nb;
  ws_decode_scales<NESTED>(scales, (blockIdx.x / tok_tiles) * kRows * nb, total, nb, kRows, sc, ncode, offset,
                           warp < MW ? tid : tid - 32, (MW + S) * 32);
  asm volatile("bar.sync 2, %0;\n" ::"n"((MW + S) * 32) : "memory");  // the copy warp has gone its way
  if (warp > MW) {  // the scale warps: warp MW + 1 + w serves the CTA's tiles w, w + S, ... from the second on
    int64_t local = warp - (MW + 1);
    if (local == 0) {
      mbar_arrive(sfull);  // the first tile's buffer, decoded above
      local = S;
    }
    for (int64_t tile = blockIdx.x + local * gridDim.x; tile < tiles; tile += S * gridDim.x, local += S) {
      const int buf = static_cast<int>(local & 1);
      mbar_wait(sempty + buf, static_cast<uint32_t>((local >> 1) & 1) ^ 1);
      ws_decode_scales<NESTED>(scales + buf * kRows * (nb + 1), (tile / tok_tiles) * kRows * nb, total, nb, kRows, sc,
                               ncode, offset, lane, 32);
      mbar_arrive(sfull + buf);
    }
    return;
  }

  // The math warps. (Opaque copies of the ring's address and the warp index, as below.)
  uint32_t ring_s = smem_u32(ring);
  asm volatile("" : "+r"(ring_s), "+l"(full), "+l"(empty));
  int my_warp = warp;
  asm volatile("" : "+r"(my_warp));
  const int g = lane >> 2, c = lane & 3;
  uint32_t lane_base = kWsLutAddress | (4u * static_cast<uint32_t>(lane));
  int lane_off = g * kStagePitch + 8 * c;  // the lane's bytes of row g in a stage
  asm volatile("" : "+r"(lane_base), "+r"(lane_off));
  const int sub_shift = bs_log2 - 6;
  int slot = 0;
  uint32_t phase = 0;
  int64_t local = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++local) {
    const int64_t row0 = (tile / tok_tiles) * kRows;
    const int64_t tok0 = (tile % tok_tiles) * (8 * NT);
    // The empty asm statements keep these in registers: without them the compiler recomputes the
    // clamped x row from the thread index at every stage (about 40 instructions a stage).
    const T* xrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      xrow[nt] = x + min(tok0 + 8 * nt + g, M - 1) * K + 16 * c;
      asm volatile("" : "+l"(xrow[nt]));
    }
    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[m][nt][q] = 0.f;
    const int buf = static_cast<int>(local & 1);
    mbar_wait(sfull + buf, static_cast<uint32_t>((local >> 1) & 1));
    uint32_t srow = smem_u32(scales + buf * kRows * (nb + 1) + g * (nb + 1));
    asm volatile("" : "+r"(srow));
    const uint32_t s1_off = 8 * (nb + 1) * 4;
    // x of sub-block `sub` of a stage whose x starts at xs.
    auto load_x = [&](const T* const (&xs)[NT], int sub, uint4 (&xv)[NT][2]) {
      const T* xsub[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xsub[nt] = xs[nt] + sub * kSubK;
      load_sub_block_x<T, NT>(xsub, xv);
    };
    // Sub-block `sub` of the k range whose first sub-block is j0 (row group m's slot at stage[m]),
    // with its x in xv, for each row group.
    auto sub_block = [&](const uint32_t (&stage)[MT], int j0, int sub, const uint4 (&xv)[NT][2]) {
      const uint32_t b = srow + 4 * static_cast<uint32_t>((j0 + sub) >> sub_shift);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const uint32_t bm = b + static_cast<uint32_t>(m) * 2 * s1_off;  // row group m: 16 rows on
        mma_sub_block_wide<T, NT, kStagePitch>(stage[m] + lane_off + sub * 32, lds_ring_f32(bm),
                                               lds_ring_f32(bm + s1_off), lane_base, xv, acc[m]);
      }
    };
    for (int st = 0; st < nstage; ++st) {
      const int j0 = st * kStageSubs;
      const T* xs[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xs[nt] = xrow[nt] + int64_t{j0} * kSubK;
      uint32_t stage[MT], stage_slot[MT], stage_phase[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        stage[m] = ring_s + slot * kStageBytes;
        stage_slot[m] = slot;
        stage_phase[m] = phase;
        if (++slot == stages) {
          slot = 0;
          phase ^= 1;
        }
      }
      const auto wait_stages = [&] {
#pragma unroll
        for (int m = 0; m < MT; ++m) mbar_wait(full + stage_slot[m], stage_phase[m]);
      };
      // x is read before the wait for the stage's codes, so that its latency (L2 where L1 does not
      // hold x) passes while the codes arrive; not with 4 or 8 token octets (variant 9 above
      // M = 16), whose x of a stage would take 64-128 registers a thread.
      if (NT <= 2 && j0 + kStageSubs <= nsub) {
        uint4 xv[kStageSubs / MW][NT][2];
#pragma unroll
        for (int u = 0; u < kStageSubs / MW; ++u) load_x(xs, u * MW + my_warp, xv[u]);
        wait_stages();
#pragma unroll
        for (int u = 0; u < kStageSubs / MW; ++u) sub_block(stage, j0, u * MW + my_warp, xv[u]);
      } else {
        wait_stages();
#pragma unroll
        for (int u = 0; u < kStageSubs / MW; ++u) {
          const int sub = u * MW + my_warp;
          if (j0 + sub < nsub) {
            uint4 xv[NT][2];
            load_x(xs, sub, xv);
            sub_block(stage, j0, sub, xv);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) mbar_arrive(empty + stage_slot[m]);
    }
    mbar_arrive(sempty + buf);

    // The warps' partial sums, added in warp order (the same bits run to run).
    if constexpr (NT == 1) {
      // One octet: buffer (local % red_bufs), added up by the last warp to get here (ws_red_bufs).
      const int rbuf = static_cast<int>(local % red_bufs);
      float* rb = red + rbuf * (MW * MT * 4 * 32);
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int q = 0; q < 4; ++q) rb[((warp * MT + m) * 4 + q) * 32 + lane] = acc[m][0][q];
      __syncwarp();  // the lanes' stores, ordered before lane 0's fence and count
      uint32_t last = 0;
      if (lane == 0) {
        __threadfence_block();  // with the count: a release of the warp's partial sums
        last = atomicAdd(red_count + rbuf, 1u) == MW - 1;
        if (last) __threadfence_block();  // with the count read: the acquire of the others'
      }
      last = __shfl_sync(0xffffffffu, last, 0);
      if (last) {
        __syncwarp();  // lane 0's acquire, for the loads of every lane (a shuffle orders no memory)
#pragma unroll
        for (int mq = 0; mq < MT * 4; ++mq) {
          const int m = mq >> 2, q = mq & 3;
          const int64_t row = row0 + 16 * m + (lane >> 2) + 8 * (q >> 1);
          const int64_t tok = tok0 + 2 * (lane & 3) + (q & 1);
          if (row < N && tok < M) {
            float v = 0.f;
#pragma unroll
            for (int wi = 0; wi < MW; ++wi) v += rb[((wi * MT + m) * 4 + q) * 32 + lane];
            if (bias != nullptr) v += to_float(bias[row]);
            out[tok * N + row] = from_float<T>(v);
          }
        }
        // Reset for tile local + red_bufs: its first count comes after that warp's wait on a stage
        // (acquire) whose fill the copy warp announced (arrive.expect_tx, a release) after its own
        // wait for this warp's arrival on the next tile's stages (a release after this store).
        if (lane == 0) red_count[rbuf] = 0;
      }
    } else {
      // In rounds of up to 4 fragments (row group m, token octet nt; f = m * NT + nt), all math
      // warps meeting at a barrier twice a round.
      constexpr int kFrags = MT * NT;
      constexpr int kChunk = kFrags < 4 ? kFrags : 4;
#pragma unroll
      for (int f0 = 0; f0 < kFrags; f0 += kChunk) {
        float* mine = red + warp * (kChunk * 4 * 32);
#pragma unroll
        for (int fi = 0; fi < kChunk; ++fi)
#pragma unroll
          for (int q = 0; q < 4; ++q) mine[(fi * 4 + q) * 32 + lane] = acc[(f0 + fi) / NT][(f0 + fi) % NT][q];
        math_barrier<MW>();
        for (int idx = tid; idx < kChunk * 4 * 32; idx += MW * 32) {
          const int r = idx >> 5, ln = idx & 31, q = r & 3, f = f0 + (r >> 2);
          const int64_t row = row0 + 16 * (f / NT) + (ln >> 2) + 8 * (q >> 1);
          const int64_t tok = tok0 + 8 * (f % NT) + 2 * (ln & 3) + (q & 1);
          if (row < N && tok < M) {
            float v = 0.f;
#pragma unroll
            for (int wi = 0; wi < MW; ++wi) v += red[wi * (kChunk * 4 * 32) + idx];
            if (bias != nullptr) v += to_float(bias[row]);
            out[tok * N + row] = from_float<T>(v);
          }
        }
        math_barrier<MW>();
      }
    }
  }
#else
  __trap();  // built without sm_90 code (the host launches it only where it has that code)
#endif
}

template <typename T, bool NESTED, int NT, int STAGES = kStages>
void launch_stream(const at::Tensor& x2, int64_t M, const at::Tensor& packed, const GemmProblem& p, int bs_log2,
                   const Scales& sc, const at::Tensor* bias, at::Tensor& out, cudaStream_t stream) {
  static std::map<std::pair<int, size_t>, int> cache;
  const size_t smem =
      stream_fixed_smem_bytes<NT, STAGES>() + 16 * static_cast<size_t>((p.K >> bs_log2) + 1) * sizeof(float);
  launch_tiles<T>(gemm_4bit_stream_kernel<T, NESTED, NT, STAGES>, smem, cache, 16, 8 * NT, x2, M, packed, p, bs_log2,
                  sc, bias, out, stream);
}

// The warp-specialized kernel where it can run: Hopper or later (bulk copies, mbarriers), codes
// 16-byte aligned, scales read 4 at a time (blocks a row a multiple of 4, aligned scale arrays) and
// its shared memory (which grows with the blocks a row) within the device's limit. Returns whether
// it launched.
template <typename T, bool NESTED, int NT, int MW = 16, int MT = 1>
bool launch_ws(const at::Tensor& x2, int64_t M, const at::Tensor& packed, const GemmProblem& p, int bs_log2,
               const Scales& sc, const at::Tensor* bias, at::Tensor& out, cudaStream_t stream,
               int max_stages = kWsMinStages) {
  const int64_t nb = p.K >> bs_log2;
  const int device = x2.get_device();
  const DeviceLimits lim = device_limits(device);
  const bool scales_aligned = NESTED ? reinterpret_cast<uintptr_t>(sc.qabsmax) % 4 == 0
                                     : reinterpret_cast<uintptr_t>(sc.absmax) % 16 == 0;
  // nb <= 1536 also keeps ws_layout's 32-bit offsets far from overflow (the scales alone would
  // pass the shared memory of any GPU well before).
  if (lim.major != 9 || lim.reserved >= kWsLutAddress || reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 16 != 0 ||
      nb % 4 != 0 || nb > 1536 || !scales_aligned)
    return false;
  // The deepest ring that fits, up to max_stages. (4 stages measured a little faster than 6, variant
  // 17, on all six shapes at M = 1 and 8 in the sweep of 59f3e26 (H200, 2026-11-30): 48.8 against
  // 49.7 us on 28672x8192 at M = 1, 17.6 against 17.9 on 8192x8192; the kernel is bound by its
  // math warps, not by the bytes in flight.)
  int stages = max_stages;
  while (stages > kWsMinStages && ws_layout(lim.reserved, nb, p.K, NT, MW, stages, MT).total > lim.smem_optin) --stages;
  const size_t smem = ws_layout(lim.reserved, nb, p.K, NT, MW, stages, MT).total;
  if (smem > lim.smem_optin) return false;
  static_assert(2 * MT <= kWsMinStages, "the math warps hold MT slots at once: the ring must hold two k ranges");
  auto kernel = gemm_4bit_ws_kernel<T, NESTED, NT, MW, MT>;
  {
    // The kernel's body exists only in sm_90 code: a build whose list lacks 9.0 (the driver would
    // compile the 8.0 PTX, whose body is a trap) falls back to the other kernels.
    static std::mutex mutex;
    static std::map<int, bool> has_sm90_code;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = has_sm90_code.find(device);
    if (it == has_sm90_code.end()) {
      cudaFuncAttributes attr{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
      it = has_sm90_code.emplace(device, attr.ptxVersion >= 90).first;
    }
    if (!it->second) return false;
  }
  static std::map<std::pair<int, size_t>, int> cache;
  const int64_t tiles = ((p.N + 16 * MT - 1) / (16 * MT)) * ((M + 8 * NT - 1) / (8 * NT));
  const int64_t grid = std::min<int64_t>(tiles, resident_ctas(kernel, smem, device, cache, ws_threads(MW)));
  kernel<<<static_cast<unsigned>(grid), ws_threads(MW), smem, stream>>>(
      reinterpret_cast<const T*>(x2.const_data_ptr()), M, packed.const_data_ptr<uint8_t>(), p.N, p.K, bs_log2, sc,
      p.quant_type == QuantType::FP4 ? 1 : 0, bias ? reinterpret_cast<const T*>(bias->const_data_ptr()) : nullptr,
      reinterpret_cast<T*>(out.data_ptr()), lim.reserved, stages);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The stream kernel keeps a tile's scales in shared memory: up to 1536 blocks a row (96 KB).
constexpr int64_t kStreamMaxBlocksPerRow = 1536;

at::Tensor workspace(int64_t numel, at::ScalarType dtype, const at::Device& device, cudaStream_t stream);

// Launches a fused kernel and returns true, or returns false where dequantize + cuBLAS is faster
// (the default above M = 64 when the wgmma kernel cannot run or does not win; `forced`: a fused
// kernel at any M, for tests and benchmarks).
template <typename T, bool NESTED>
bool dispatch_mma(const at::Tensor& x2, int64_t M, const at::Tensor& packed, const GemmProblem& p, int bs_log2,
                  const Scales& sc, const at::Tensor* bias, at::Tensor& out, cudaStream_t stream, bool forced) {
#define QLORA_LAUNCH(MT, NT, U, PIPE) launch_mma<T, NESTED, MT, NT, U, PIPE>(x2, M, packed, p, bs_log2, sc, bias, out, stream)
  // Benchmarks compare tile shapes through _set_gemm_variant (bf16 with double quantization only).
  const int variant = g_gemm_variant.load(std::memory_order_relaxed);
  const bool streamable = (p.K >> bs_log2) <= kStreamMaxBlocksPerRow &&
                          reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 16 == 0;
  // On 8192x28672 the register-fed kernel beat the stream kernel at M <= 16 (75 against 83 us at
  // M = 1), on 28672x8192 and 4096x4096 the stream kernel won (71 against 85 us): the long rows'
  // scale prologue and short tiles favour it there. Rows of more than 16384 k take the registers.
  const bool long_rows = p.K > 16384 && M <= 16;
  // The wgmma kernel (csrc/cuda/gemm_4bit_wgmma.cu): variants 11 and 12 at any M, K split as it
  // chooses (11) or not at all (12); by default at 32 < M <= 128, and at M <= 256 with rows of 8192
  // k or more. In the sweep of 1785878 (H200, 2026-11-29) it beat the stream kernel at M = 64 on
  // all six shapes (8192x8192: 49.2 against 62.2 us; 8192x28672: 143 against 263) and cuBLAS on
  // the dequantized weight at M = 128 (64.0 against 87.2; 193 against 290), at M = 256 only with
  // K >= 8192 (86.4 against 95.9 on 8192x8192; 78.5 against 66.6 on 11008x4096); at M = 32 the
  // stream kernel was as fast or faster (41.0 against 47.1 on 8192x8192).
  // Variant 13: its warp-specialized form (a copying warpgroup, mbarriers) at M <= 128; variant 14:
  // its bf16 pair-table decode; variant 15: that decode fed by tensor copies (bf16),
  // 16 the same with one CTA an SM.
  // Before 570e735 (sweeps of f809e0c and 7685229, H200, 2026-11-30) the tensor-copy form already
  // beat the float decode (8192x8192 at M = 128 45.0 us against 65.5; 28672x8192 147 against 216),
  // but not the pair table at M <= 32 on weights under 2^26 nor the mma.sync kernels at M = 16.
  // Since 570e735 (the copy warp decodes the scales; sweep of 570e735, H200, 2026-11-30) the
  // tensor-copy form with two CTAs an SM is the bf16 default from M = 9 on weights of 2^25 or more
  // (16-token tiles at M <= 16: 28672x8192 86.5 against 92.4 us for the warp-specialized kernel,
  // 11008x4096 20.2 against 24.9; on 4096x4096 the mma.sync kernels stay faster, 10.4 against
  // 12.7) and from M = 17 on all (11008x4096 at M = 32 21.6 against 25.2 for the pair table; at
  // M = 64 28672x8192 101.8 against 124.4 for one CTA an SM, 4096x4096 16.1 against 15.4).
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  // The warp-specialized kernel with tiles of two row groups (x read once a 32 rows) is the default
  // since f2eef46 where it measured fastest (sweep of f2eef46, H200, 2026-11-30, against the default
  // before it): at M <= 8 on the weights the warp-specialized kernel took (8192x8192 at M = 8 20.0
  // against 21.4 us with the deepest ring, 28672x8192 55.6 against 62.0, 11008x4096 at M = 1 15.5
  // against 17.1 with 4 stages), at 8 < M <= 16 on all (28672x8192 65.1 against 87.1 for the
  // tensor-copy wgmma kernel, 8192x8192 21.5 against 29.2, 4096x4096 9.3 against 10.4 for the
  // stream kernel), at 16 < M <= 32 on weights under 2^25 (4096x4096 12.1 against 13.5; on the
  // others it lost: 8192x8192 31.7 against 30.2). The deepest ring won at M <= 8 with K >= 8192
  // (28672x8192 at M = 8: 55.6 against 59.7 with 4 stages), 4 stages above (65.1 against 66.5 at
  // M = 16). Where its shared memory does not fit (rows of 28672 k: the scales of 32 rows), the
  // kernels below run as before.
  const bool large_weight = p.K >= 8192 || p.N * p.K >= (int64_t{1} << 25);
  const bool ws_two_groups = variant == 0 && (M <= 8 ? large_weight : M <= 16 || (M <= 32 && p.N * p.K < (int64_t{1} << 25)));
  if (ws_two_groups) {
    const int stages = M <= 8 && p.K >= 8192 ? kWsMaxStages : kWsMinStages;
    bool launched = false;
    if (M <= 8) launched = launch_ws<T, NESTED, 1, 8, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
    else if (M <= 16) launched = launch_ws<T, NESTED, 2, 8, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
    else launched = launch_ws<T, NESTED, 4, 8, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
    if (launched) return true;
  }
  const int64_t wgmma_min_m = kBf16 ? (p.N * p.K >= (int64_t{1} << 25) ? 8 : 16) : 32;
  // At 128 < M <= 256 the bf16 tensor-copy form takes 256-token tiles (each code decoded once) since
  // 732e8ba, and wins on 11008x4096 too (sweep of 732e8ba, H200, 2026-11-30: 54.0 against 66.2 us for
  // dequantize + cuBLAS at M = 256), not on 4096x4096 (32.7 against 26.8).
  const bool mid_m_fused = p.K >= 8192 || (kBf16 && p.N * p.K >= (int64_t{1} << 25));
  const bool wgmma_default = variant == 0 && M > wgmma_min_m && (M <= 128 || (M <= 256 && mid_m_fused));
  if ((variant >= 11 && variant <= 16) || wgmma_default) {
    const auto partials = [&](int64_t numel) { return workspace(numel, at::kFloat, x2.device(), stream); };
    const WgmmaForm form = variant == 13                                     ? WgmmaForm::kWarpSpecialized
                           : variant == 14                                   ? WgmmaForm::kPairTable
                           : variant == 15 || (variant == 0 && kBf16)       ? WgmmaForm::kTensorCopy
                           : variant == 16                                   ? WgmmaForm::kTensorCopyOneCta
                                                                             : WgmmaForm::kDefault;
    if (gemm_4bit_wgmma(x2, M, packed, p, bs_log2, sc, bias, out, stream, partials, variant == 12 ? 1 : 0, form))
      return true;
  }
  if (variant == 0 && M > kMmaMaxM && !forced) return false;
  // At 16 < M <= 64 on 8192x28672 the register-fed kernel (variant 5) beat the stream kernel in both
  // sweeps of 2026-11-29 (140 against 151 us at M = 32, 260 against 290 at M = 64).
  if (variant == 0 && M > 16 && p.K > 16384) {
    QLORA_LAUNCH(2, 4, 1, true);
    return true;
  }
  // Variant 9: the warp-specialized kernel at every M. (Prefetching whole rows of the tile 1, 2 or 4
  // tiles ahead into L2 made it slower: 62-65 against 56 us on 28672x8192 at M = 1.)
  // By default where it measured faster than the stream kernel (bench/results, 2026-11-29): M <= 16
  // with rows of 8192 k or more, or 2^26 weights or more (4096x11008: 16.2 against 17.7 us at
  // M = 1, 28672x8192: 55.7 against 68.3); on 4096x4096 the stream kernel won (8.5 against 9.1).
  // Since 59f3e26 (the first tile's scales decoded by all warps; sweep of 59f3e26) it wins on
  // 11008x4096 too: 16.5 against 18.6 us at M = 1, 18.4 against 20.3 at M = 8; on 4096x4096 the
  // stream kernel still does (8.4 against 9.4 at M = 1).
  const bool ws_default = M <= 16 && large_weight;
  // Math warps: 8 at M <= 8, 16 above (sweep of d09d751, H200, 2026-11-30: 8 won at M = 1 and 8 on
  // every shape, e.g. 28672x8192 51.8 against 56.9 us at M = 1; 16 at M = 16 on the large shapes,
  // 86.6 against 91.1 on 8192x28672). Variant 10: the other count, M <= 16.
  if constexpr (std::is_same_v<T, __nv_bfloat16> && NESTED) {
    if (variant == 10 && M <= 8 && launch_ws<T, NESTED, 1, 16>(x2, M, packed, p, bs_log2, sc, bias, out, stream)) return true;
    if (variant == 10 && M > 8 && M <= 16 && launch_ws<T, NESTED, 2, 8>(x2, M, packed, p, bs_log2, sc, bias, out, stream))
      return true;
  }
  // Variants 19 / 20: the warp-specialized kernel with tiles of 2 row groups (32 rows, 8 math
  // warps) up to M = 64, with the 4-stage / the deepest ring.
  if constexpr (std::is_same_v<T, __nv_bfloat16> && NESTED) {
    if (variant == 19 || variant == 20) {
      const int stages = variant == 20 ? kWsMaxStages : kWsMinStages;
      bool launched = false;
      if (M <= 8) launched = launch_ws<T, NESTED, 1, 8, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
      else if (M <= 16) launched = launch_ws<T, NESTED, 2, 8, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
      else if (M <= 32) launched = launch_ws<T, NESTED, 4, 8, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
      else launched = launch_ws<T, NESTED, 8, 8, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
      if (launched) return true;
    }
  }
  // Variant 17: variant 9 with the deepest ring that fits.
  if ((variant == 0 && ws_default) || variant == 9 || variant == 17) {
    const int stages = variant == 17 ? kWsMaxStages : kWsMinStages;
    bool launched = false;
    if (M <= 8) launched = launch_ws<T, NESTED, 1, 8>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
    else if (M <= 16) launched = launch_ws<T, NESTED, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
    else if (M <= 32) launched = launch_ws<T, NESTED, 4>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
    else launched = launch_ws<T, NESTED, 8>(x2, M, packed, p, bs_log2, sc, bias, out, stream, stages);
    if (launched) return true;
  }
  // Variant 8: the stream kernel where the warp-specialized one would run.
  if (streamable && (variant == 8 || (variant == 0 && !long_rows))) {
    // Token tiles of 8 * NT: one tile up to M = 64; beyond, each tile streams the weight again
    // (from L2 when the tiles of one row block run together, as the tile order makes them).
    if (M <= 8) launch_stream<T, NESTED, 1>(x2, M, packed, p, bs_log2, sc, bias, out, stream);
    else if (M <= 16) launch_stream<T, NESTED, 2>(x2, M, packed, p, bs_log2, sc, bias, out, stream);
    else if (M <= 32) launch_stream<T, NESTED, 4>(x2, M, packed, p, bs_log2, sc, bias, out, stream);
    else launch_stream<T, NESTED, 8>(x2, M, packed, p, bs_log2, sc, bias, out, stream);
    return true;
  }
  if constexpr (std::is_same_v<T, __nv_bfloat16> && NESTED) {
    switch (variant) {
      case 1: if (M <= 8) { QLORA_LAUNCH(1, 1, 2, true); return true; } break;
      case 2: if (M <= 16) { QLORA_LAUNCH(1, 2, 1, true); return true; } break;
      case 5: if (M > 16) { QLORA_LAUNCH(2, 4, 1, true); return true; } break;
      default: break;
    }
  }
  // Tile shapes by M: one token octet for decode; wider token tiles (and two row tiles, which halve
  // the reads of x) as M grows.
  if (M <= 8) QLORA_LAUNCH(1, 1, 2, true);
  else if (M <= 16) QLORA_LAUNCH(1, 2, 1, true);
  else QLORA_LAUNCH(2, 4, 1, true);
  return true;
#undef QLORA_LAUNCH
}

// The dequantized weight's home for the cuBLAS path (and the wgmma kernel's split partial sums):
// one buffer per device and stream, kept and grown. A call under CUDA graph capture never uses it:
// the graph would keep its address, and a later call that grows the buffer would free that memory
// while the graph still writes there on replay. It takes a buffer of its own from the capture's
// private pool instead, which the graph keeps.
std::mutex g_workspace_mutex;
auto* g_workspaces = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();  // never destroyed: see release

at::Tensor workspace(int64_t numel, at::ScalarType dtype, const at::Device& device, cudaStream_t stream) {
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const auto options = at::TensorOptions().dtype(at::kByte).device(device);
  if (capture != cudaStreamCaptureStatusNone) return at::empty({nbytes}, options).view(dtype);
  std::lock_guard<std::mutex> lock(g_workspace_mutex);
  at::Tensor& buf = (*g_workspaces)[{device.index(), stream}];
  if (!buf.defined() || buf.numel() < nbytes) {
    buf = at::Tensor();  // the old buffer goes back to the allocator before the new one is taken
    buf = at::empty({nbytes}, options);
  }
  return buf.narrow(0, 0, nbytes).view(dtype);
}

void release_workspaces() {
  std::lock_guard<std::mutex> lock(g_workspace_mutex);
  g_workspaces->clear();
}

struct RegisterRelease {
  RegisterRelease() { g_release_gemm_workspaces = &release_workspaces; }
} register_release;

struct DequantState {
  at::Tensor packed, absmax;
  std::optional<at::Tensor> nested_absmax, nested_code;
};

DequantState contiguous_state(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code) {
  DequantState s{packed.contiguous(), absmax.contiguous(), std::nullopt, std::nullopt};
  if (nested_absmax.has_value()) {
    s.nested_absmax = nested_absmax->contiguous();
    s.nested_code = nested_code->contiguous();
  }
  return s;
}

at::Tensor dequantized_weight(const GemmProblem& p, const DequantState& s, const std::optional<at::Tensor>& offset,
                              int64_t blocksize, at::ScalarType dtype, const at::Device& device, cudaStream_t stream) {
  at::Tensor W = workspace(p.N * p.K, dtype, device, stream);
  dequantize_4bit_into(s.packed, s.absmax, s.nested_absmax, s.nested_code, offset, blocksize, p.quant_type, p.N * p.K,
                       W);
  return W.view({p.N, p.K});
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

at::Tensor gemm_4bit_cuda(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                          c10::string_view quant_type, c10::SymIntArrayRef shape,
                          const std::optional<at::Tensor>& bias) {
  const GemmProblem p = check_gemm_4bit_args("gemm_4bit", false, x, packed_in, absmax, nested_absmax, nested_code,
                                             offset, blocksize, nested_blocksize, quant_type, shape, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(with_last(x.sizes(), p.N), x.options());
  const int64_t M = p.K == 0 ? 0 : x.numel() / p.K;
  if (out.numel() == 0) return out;
  if (p.K == 0) {  // an empty sum: zeros, plus the bias
    if (bias.has_value()) return out.copy_(bias->expand_as(out));
    return out.zero_();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const DequantState s = contiguous_state(packed_in, absmax, nested_absmax, nested_code);
  const at::Tensor x2 = x.reshape({M, p.K}).contiguous();
  at::Tensor out2 = out.view({M, p.N});
  const int64_t max_m = g_gemm_fused_max_m.load(std::memory_order_relaxed);
  // Rows must hold whole quantization blocks (K % blocksize == 0, so no block straddles two rows).
  const bool fused = x.scalar_type() != at::kFloat && blocksize >= kSubK && p.K % blocksize == 0 &&
                     M <= (max_m < 0 ? kDefaultFusedMaxM : max_m) &&
                     reinterpret_cast<uintptr_t>(s.packed.const_data_ptr()) % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 == 0;
  if (fused) {
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const at::Tensor* bp = bias.has_value() ? &b : nullptr;
    const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
    Scales sc{};
    const bool forced = max_m >= 0;
    bool launched = false;
    if (s.nested_absmax.has_value()) {
      sc = {nullptr, s.absmax.const_data_ptr<uint8_t>(), s.nested_absmax->const_data_ptr<float>(),
            s.nested_code->const_data_ptr<float>(), offset->const_data_ptr<float>()};
      launched = x.scalar_type() == at::kHalf
                     ? dispatch_mma<__half, true>(x2, M, s.packed, p, bs_log2, sc, bp, out2, stream, forced)
                     : dispatch_mma<__nv_bfloat16, true>(x2, M, s.packed, p, bs_log2, sc, bp, out2, stream, forced);
    } else {
      sc = {s.absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr};
      launched = x.scalar_type() == at::kHalf
                     ? dispatch_mma<__half, false>(x2, M, s.packed, p, bs_log2, sc, bp, out2, stream, forced)
                     : dispatch_mma<__nv_bfloat16, false>(x2, M, s.packed, p, bs_log2, sc, bp, out2, stream, forced);
    }
    if (launched) return out;
  }
  const at::Tensor W = dequantized_weight(p, s, offset, blocksize, x.scalar_type(), x.device(), stream);
  if (bias.has_value()) at::addmm_out(out2, *bias, x2, W.t());
  else at::mm_out(out2, x2, W.t());
  return out;
}

at::Tensor gemm_4bit_transposed_cuda(const at::Tensor& grad, const at::Tensor& packed_in, const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t nested_blocksize, c10::string_view quant_type,
                                     c10::SymIntArrayRef shape) {
  const GemmProblem p = check_gemm_4bit_args("gemm_4bit_transposed", true, grad, packed_in, absmax, nested_absmax,
                                             nested_code, offset, blocksize, nested_blocksize, quant_type, shape,
                                             std::nullopt);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty(with_last(grad.sizes(), p.K), grad.options());
  if (out.numel() == 0) return out;
  if (p.N == 0) return out.zero_();
  const int64_t M = grad.numel() / p.N;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device()).stream();
  const DequantState s = contiguous_state(packed_in, absmax, nested_absmax, nested_code);
  const at::Tensor W = dequantized_weight(p, s, offset, blocksize, grad.scalar_type(), grad.device(), stream);
  at::Tensor out2 = out.view({M, p.K});
  at::mm_out(out2, grad.reshape({M, p.N}), W);
  return out;
}

}  // namespace

// The compute capability's major, the opt-in shared memory of a block, the reserved shared memory
// and the multiprocessors, read once a device.
DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    int major = 0, optin = 0, reserved = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = cache.emplace(device, DeviceLimits{major, static_cast<size_t>(optin), static_cast<uint32_t>(reserved), sms})
             .first;
  }
  return it->second;
}

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  m.impl("gemm_4bit_transposed", &gemm_4bit_transposed_cuda);
}

}  // namespace qlora::cuda
