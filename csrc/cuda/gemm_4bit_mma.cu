// The mma.sync products for small and medium M on any GPU of sm_80 or later: out = x @ W^T (+ bias)
// with the 4-bit weight W decoded in registers. The weight is the mma's A operand (16 output
// features a tile) and x its B operand (8 tokens a tile), so that a single token still fills the
// instruction's wide side.
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
//   - Work: a CTA owns a tile of 16 (or 16 * row groups) rows x 8 * token octets tokens and its 8
//     warps split K. Partial sums are added in shared memory in a fixed order: the result is the
//     same bits run to run. The grid is one wave of CTAs that stride over the tiles.
// Two kernels: the register-fed kernel loads each warp's codes into registers a batch ahead; the
// stream kernel moves them through a cp.async ring in shared memory. The warp-specialized kernel
// (gemm_4bit_ws.cu) is the same math with a copy warp; which one runs is the dispatch's choice
// (csrc/gemm_4bit_config.cpp).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "qlora/cp_async.cuh"
#include "qlora/epilogue.cuh"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/gemm_4bit_device.cuh"
#include "qlora/gemm_4bit_layout.h"
#include "qlora/half_convert.cuh"
#include "qlora/mma.cuh"
#include "qlora/nested_scale.cuh"
#include "qlora/shared_memory.cuh"

namespace qlora::cuda {
namespace {

constexpr int kWarps = 8;

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

// One CTA: tiles of 16*MT weight rows x 8*NT tokens; U sub-blocks a warp a batch. The next batch's
// loads are issued before the current batch's math (and the first batch's before the table is
// built), so that each warp always has one batch of loads in flight.
template <typename T, bool NESTED, int MT, int NT, int U>
__global__ void __launch_bounds__(kWarps * 32)
    gemm_4bit_mma_kernel(const T* __restrict__ x, int64_t M, const uint8_t* __restrict__ packed, int64_t N, int64_t K,
                         int bs_log2, Scales sc, int fp4, const Epilogue<T> epi, T* __restrict__ out) {
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
    build_pair_table<T>(lut, fp4, tid, kWarps * 32);
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
                b.s[u][mt][h] =
                    nested_scale(ncode[__ldg(sc.qabsmax + bi)], __ldg(sc.nested_absmax + (bi >> 8)), offset);
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
      if (row < N && tok < M) out[tok * N + row] = finish_output(v, epi, tok, row, N);
    }
    __syncthreads();
  }
}

// The stream kernel: the same math, but the packed codes stream through shared memory with
// cp.async in a ring of kStreamStages slots of 16 rows x 1 KB, so that the bytes in flight are
// bounded by shared memory, not by registers, and each row is read in 1 KB runs (the register-fed
// kernel, 16 rows x 512 bytes a step, stalled at about 1.3 TB/s on 28672x8192 at M = 1). The tile's
// block scales are decoded into shared memory while the first stages are in flight; x is read
// through L1, where every warp of the SM finds it.
constexpr int kCopiesPerThread = 16 * kStageRowBytes / 16 / (kWarps * 32);

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
// bits run to run), finished (finish_output) and stored. Ends with every thread past one barrier.
template <typename T, int NT>
__device__ __forceinline__ void reduce_tile(float* red, const float (&acc)[NT][4], int tid, int64_t row0, int64_t tok0,
                                            int64_t N, int64_t M, const Epilogue<T>& epi, T* __restrict__ out) {
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
    if (row < N && tok < M) out[tok * N + row] = finish_output(v, epi, tok, row, N);
  }
}

template <typename T, bool NESTED, int NT>
__global__ void __launch_bounds__(kWarps * 32)
    gemm_4bit_stream_kernel(const T* __restrict__ x, int64_t M, const uint8_t* __restrict__ packed, int64_t N,
                            int64_t K, int bs_log2, Scales sc, int fp4, const Epilogue<T> epi, T* __restrict__ out) {
  extern __shared__ uint4 smem[];
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem);
  uint8_t* ring = reinterpret_cast<uint8_t*>(lut + 256 * kLutCopies);
  float* red = reinterpret_cast<float*>(ring);
  float* ncode = reinterpret_cast<float*>(ring + kStreamStages * kStageBytes);
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
            cp_async_16(smem_u32(ring + (st % kStreamStages) * kStageBytes + r * kStagePitch + col),
                        packed + min(row0 + r, N - 1) * row_bytes + st * kStageRowBytes + col);
        }
      }
      cp_async_commit();  // an empty group where there is nothing to copy keeps the count uniform
    };
#pragma unroll
    for (int st = 0; st < kStreamStages - 1; ++st) issue(st);

    if (!table_ready) {
      build_pair_table<T>(lut, fp4, tid, kWarps * 32);
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
      cp_async_wait<kStreamStages - 2>();
      __syncthreads();  // stage st is in for everyone; the slot of stage st - 1 is free again
      issue(st + kStreamStages - 1);
      // A full stage runs its four sub-blocks without a branch between them, so that the compiler
      // interleaves their lookups and mma chains; the last, partial stage checks each. (With 2 or more
      // token octets that takes 146 registers and more, one CTA an SM: those check each too.)
      const uint8_t* stage = ring + (st % kStreamStages) * kStageBytes;
      if (NT == 1 && (st + 1) * kStageSubs <= nsub) {
#pragma unroll
        for (int u = 0; u < kStageSubs / kWarps; ++u)
          sub_block(stage, st * kStageSubs + u * kWarps + warp, u * kWarps + warp);
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

    reduce_tile<T, NT>(red, acc, tid, row0, tok0, N, M, epi, out);
    __syncthreads();  // red, scales and the ring are free for the next tile
  }
}

// Launches one of the two kernels (they share their signature) for tiles of `tile_rows` weight
// rows x `tile_tokens` tokens, as one wave of CTAs that stride over the tiles.
template <typename T, typename Kernel>
void launch_tiles(Kernel kernel, size_t smem, int tile_rows, int tile_tokens, const FusedGemm& g) {
  const GemmProblem& p = g.p;
  const int64_t tiles = ((p.N + tile_rows - 1) / tile_rows) * ((g.M + tile_tokens - 1) / tile_tokens);
  const int64_t grid = std::min<int64_t>(tiles, resident_ctas(kernel, kWarps * 32, smem, g.x2.get_device()));
  launch_kernel(kernel, static_cast<unsigned>(grid), kWarps * 32, smem, g.stream, g.after_previous,
                reinterpret_cast<const T*>(g.x2.const_data_ptr()), g.M, g.packed.const_data_ptr<uint8_t>(), p.N, p.K,
                g.bs_log2, g.sc, p.quant_type == QuantType::FP4 ? 1 : 0, epilogue_of<T>(g),
                reinterpret_cast<T*>(g.out.data_ptr()));
}

template <typename T, bool NESTED, int MT, int NT, int U>
void launch_mma(const FusedGemm& g) {
  launch_tiles<T>(gemm_4bit_mma_kernel<T, NESTED, MT, NT, U>, mma_smem_bytes<MT, NT>(), 16 * MT, 8 * NT, g);
}

// The stream kernel's shared memory (qlora/gemm_4bit_layout.h) grows with K: the tile's scales. The
// warps' partial sums reuse the ring once the tile's last stage is consumed.
template <typename T, bool NESTED, int NT>
void launch_stream(const FusedGemm& g) {
  static_assert(reduce_floats<1, NT>() * sizeof(float) <= size_t{kStreamStages} * kStageBytes, "red aliases the ring");
  const size_t smem = stream_smem_bytes(g.p.K >> g.bs_log2);
  launch_tiles<T>(gemm_4bit_stream_kernel<T, NESTED, NT>, smem, 16, 8 * NT, g);
}

}  // namespace

void launch_gemm_mma(const MmaConfig& c, const FusedGemm& g) {
  with_types(g, [&](auto t, auto nested) {
    using T = typename decltype(t)::type;
    constexpr bool NESTED = decltype(nested)::value;
    if (c.row_groups == 1 && c.token_octets == 1 && c.unroll == 2) return launch_mma<T, NESTED, 1, 1, 2>(g);
    if (c.row_groups == 1 && c.token_octets == 2 && c.unroll == 1) return launch_mma<T, NESTED, 1, 2, 1>(g);
    if (c.row_groups == 2 && c.token_octets == 4 && c.unroll == 1) return launch_mma<T, NESTED, 2, 4, 1>(g);
    TORCH_CHECK(false, "gemm_4bit: no register-fed kernel of ", c.row_groups, " row groups, ", c.token_octets,
                " token octets, unroll ", c.unroll);
  });
}

void launch_gemm_stream(const StreamConfig& c, const FusedGemm& g) {
  with_types(g, [&](auto t, auto nested) {
    using T = typename decltype(t)::type;
    constexpr bool NESTED = decltype(nested)::value;
    switch (c.token_octets) {
      case 1: return launch_stream<T, NESTED, 1>(g);
      case 2: return launch_stream<T, NESTED, 2>(g);
      case 4: return launch_stream<T, NESTED, 4>(g);
      case 8: return launch_stream<T, NESTED, 8>(g);
      default: TORCH_CHECK(false, "gemm_4bit: no stream kernel of ", c.token_octets, " token octets");
    }
  });
}

}  // namespace qlora::cuda
