// The fused 4-bit product on Hopper's warpgroup MMA (wgmma, sm_90a): out = x @ W^T (+ bias) for
// medium M, where the mma.sync products (csrc/cuda/gemm_4bit_mma.cu, gemm_4bit_ws.cu: each warp
// reading x again from L1 for every 16 or 32 weight rows) spend their time moving x, not multiplying.
//
//   - Tile: a CTA owns 128 weight rows x BN tokens (BN = wgmma's N, 16..256). Each of its two
//     warpgroups multiplies 64 rows by all BN tokens: a token of x in shared memory serves 128 rows,
//     a weight code (decoded once) serves BN tokens.
//   - Operands: x is wgmma's B operand, read by the tensor cores from shared memory (a token's 64 k
//     of a stage are one 128-byte row, stored with the 128-byte swizzle the descriptor names, so the
//     8 rows of a core matrix fall in different banks). The weight is the A operand, built in
//     registers: each thread decodes the codes of its fragment (rows g and g + 8 of its warp's 16,
//     k 2c, 2c + 1, 2c + 8, 2c + 9 of each 16) as bf16(code * scale), computed in float32 from a
//     16-entry float table (one copy a bank): the same weight dequantize_4bit writes. wgmma then
//     accumulates in float32 over the whole K range, with no per-block rescaling.
//   - Pipeline: all 256 threads copy stage j + STAGES - 2 (x, the 128 rows' codes and their block
//     scales' raw words) with cp.async while stage j is multiplied; the four wgmma of a stage are
//     one commit group, in flight while the next stage decodes (wait_group 1); a stage's slot is
//     refilled two stages after it was read, when no wgmma can still be reading it.
//   - Forms: bf16 gemm_4bit_wgmma_tma_kernel, the pair-table decode fed by a copy warp's tensor
//     copies on mbarriers (two or one CTA an SM); fp16 gemm_4bit_wgmma_kernel, the float decode
//     with the CTA-barrier pipeline above (the pair table and the tensor copies are written for
//     bf16 only). The configurations: csrc/gemm_4bit_config.cpp.
//   - Transposed (bf16, the backward product grad @ W above M = 16): the tensor-copy kernel with
//     A = W^T, a row of A a column of W and its k a row of W, decoded from pairs of W's rows
//     (TransposedStageDecoder), and grad the B tile as x is; the sum runs over W's rows.
//   - Grid: one CTA a (row tile, token tile, K split). K is split over CTAs when the tiles alone
//     would leave SMs idle (4096 rows make 32 tiles for 132 SMs); each split writes float32 partial
//     sums, and a second kernel adds them in split order: the result is the same bits run to run.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda.h>  // CUtensorMap (the encoder comes from the driver at run time: no libcuda link)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "qlora/cp_async.cuh"
#include "qlora/epilogue.cuh"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/gemm_4bit_device.cuh"
#include "qlora/gemm_4bit_layout.h"
#include "qlora/half_convert.cuh"
#include "qlora/mbarrier.cuh"
#include "qlora/nested_scale.cuh"
#include "qlora/wgmma.cuh"

namespace qlora::cuda {
namespace {

constexpr int kWgRows = 128;  // weight rows a CTA: two warpgroups of 64
constexpr int kWgThreads = 256;
constexpr int kWgStageK = 64;  // k a stage: 128 bytes of x a token, 32 bytes of codes a row

// A stage: x [BN tokens][128 bytes] (1024-byte aligned: the swizzle atom), the codes [128 rows][32
// bytes], the scales' raw words [128 rows][2] (the 8-bit code's aligned word and the nested scale,
// or the float32 scale).
template <int BN>
constexpr int wg_stage_bytes() {
  return BN * 128 + kWgRows * 32 + kWgRows * 8;
}
template <int BN, int STAGES>
constexpr size_t wg_smem_bytes() {
  return size_t{STAGES} * wg_stage_bytes<BN>() + 1024;  // + 1024: the ring's start is aligned up
}

// The ring's start: dynamic shared memory rounded up to 1024 bytes, the 128-byte swizzle's atom
// (wg_smem_bytes reserves the 1024 bytes this may skip).
__device__ __forceinline__ uint8_t* swizzle_aligned(uint8_t* smem) {
  return smem + ((1024 - (smem_u32(smem) & 1023)) & 1023);
}

// wgmma's shared-memory matrix descriptor for a K-major operand with the 128-byte swizzle: start
// address, leading byte offset (unused by this layout: 16), stride byte offset 1024 (from one
// 8-row core-matrix group to the next), swizzle mode 1 (128 bytes) in bits 62-63.
__device__ __forceinline__ uint64_t swizzle128_descriptor(uint32_t address) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// The registers of a wgmma's A operand must keep their values until the wgmma is known complete
// (the wait after the next group). The allocator does not know that wgmma reads them late: as soon as
// their last use is the wgmma it reuses them, and ptxas then waits for every wgmma to finish
// (WARPGROUP.DEPBAR 0) before the reuse. A store of them on a path never taken (`never`: M < 0)
// after the wait keeps them live until there, for a branch a stage (folding them into a value
// stored on that path took 8 LOP3 a stage).
__device__ __forceinline__ void keep_until_here(const uint32_t (&r)[4][4], bool never, void* sink) {
  if (never) {
#pragma unroll
    for (int q = 0; q < 4; ++q) static_cast<uint4*>(sink)[q] = make_uint4(r[q][0], r[q][1], r[q][2], r[q][3]);
  }
}

// A CTA's work: 128 weight rows from row0, BN tokens from tok0, stages [first_stage,
// first_stage + nst) of K split `split`. Grid order: token tiles fastest (the CTAs that share
// weight rows run together), then row tiles, then splits.
struct WgTile {
  int64_t row0, tok0, split, first_stage;
  int nst;
};
__device__ __forceinline__ WgTile wg_tile(int64_t M, int64_t N, int64_t K, int bn, int64_t stages_per_split) {
  const int64_t row_tiles = (N + kWgRows - 1) / kWgRows;
  const int64_t tok_tiles = (M + bn - 1) / bn;
  int64_t b = blockIdx.x;
  WgTile t;
  t.tok0 = (b % tok_tiles) * bn;
  b /= tok_tiles;
  t.row0 = (b % row_tiles) * kWgRows;
  t.split = b / row_tiles;
  t.first_stage = t.split * stages_per_split;
  t.nst = static_cast<int>(min(K / kWgStageK - t.first_stage, stages_per_split));  // >= 1: see launch
  return t;
}

// The copies of a stage by COPIERS threads (`copier`: this thread's index among them), addresses
// set once and advanced 64 k a stage: x's 16-byte chunk copier % 8 of tokens copier / 8 +
// u * COPIERS / 8 (zeros past M), the codes' 16-byte chunks copier + i * COPIERS (row chunk / 2),
// and scale words copier + i * COPIERS of the 256 (row w % 128; w < 128: the float32 scale or the
// 8-bit code's aligned word, else the nested scale). Rows past N read row N - 1 (their sums are
// dropped).
template <typename T, bool NESTED, int BN, int COPIERS>
struct StageCopies {
  static constexpr int kX = BN * 8 / COPIERS;
  static constexpr int kChunks = kWgRows * 2 / COPIERS;
  const T* x;
  const T* x_src;
  int64_t x_stride;
  uint32_t x_valid = 0, x_dst;
  const uint8_t* code_src[kChunks];
  const void* scale_src[kChunks];  // the row's first block (float32 scale, code or nested scale array)
  int64_t scale_block[kChunks];    // the row's first block index
  int first_stage, stage_shift;

  __device__ __forceinline__ StageCopies(int copier, const T* x_, int64_t M, const uint8_t* packed, int64_t N,
                                         int64_t K, int bs_log2, const Scales& sc, const WgTile& t)
      : x(x_), first_stage(static_cast<int>(t.first_stage)), stage_shift(bs_log2 - 6) {
    const int xt = copier >> 3, xchunk = copier & 7;
    x_src = x + (t.tok0 + xt) * K + t.first_stage * kWgStageK + xchunk * 8;
    x_stride = (COPIERS / 8) * K;
#pragma unroll
    for (int u = 0; u < kX; ++u) x_valid |= (t.tok0 + xt + (COPIERS / 8) * u < M ? 1u : 0u) << u;
    x_dst = xt * 128 + ((xchunk ^ (xt & 7)) << 4);  // the 128-byte swizzle; + COPIERS * 16 a u
    const int64_t nb = K >> bs_log2;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int chunk = copier + i * COPIERS;
      code_src[i] =
          packed + min(t.row0 + (chunk >> 1), N - 1) * (K >> 1) + t.first_stage * (kWgStageK / 2) + (chunk & 1) * 16;
      const int64_t row_block = min(t.row0 + (chunk & 127), N - 1) * nb;
      scale_block[i] = row_block;
      if constexpr (NESTED) scale_src[i] = chunk < 128 ? static_cast<const void*>(sc.qabsmax) : sc.nested_absmax;
      else scale_src[i] = sc.absmax;
    }
  }

  // Stage j of the split into the slot at shared address `base`.
  __device__ __forceinline__ void issue(uint32_t base, int j, int copier) const {
    const int64_t step = int64_t{j} * kWgStageK;
#pragma unroll
    for (int u = 0; u < kX; ++u) {
      const bool valid = (x_valid >> u) & 1;  // tokens past M multiply as zeros
      cp_async_16_or_zeros(base + x_dst + u * (COPIERS * 16), valid ? x_src + u * x_stride + step : x, valid);
    }
    const int64_t stage_block = (first_stage + j) >> stage_shift;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int chunk = copier + i * COPIERS;
      cp_async_16_or_zeros(base + BN * 128 + chunk * 16, code_src[i] + (step >> 1), true);
      const int64_t block = scale_block[i] + stage_block;
      const uint32_t dst = base + BN * 128 + kWgRows * 32 + (chunk & 127) * 8;
      if constexpr (NESTED) {
        // The 8-bit code's aligned 4-byte word (the byte is picked at use; the host checked that the
        // array holds whole words), and the nested scale.
        if (chunk < 128) cp_async_4(dst, static_cast<const uint8_t*>(scale_src[i]) + (block & ~int64_t{3}));
        else cp_async_4(dst + 4, static_cast<const float*>(scale_src[i]) + (block >> 8));
      } else {
        if (chunk < 128) cp_async_4(dst, static_cast<const float*>(scale_src[i]) + block);
      }
    }
  }
};

// The A fragments of a stage for this thread (rows r0 and r0 + 8 of the tile, r0 = 16 * warp + g
// over the CTA's two math warpgroups), decoded from the stage's codes and scales as
// bf16(code * scale), computed in float32: the weight dequantize_4bit writes.
template <typename T, bool NESTED, int BN>
struct StageDecoder {
  const char* table;
  const float* nested_code;
  float offset;
  uint32_t lane4, rot_hi, rot_lo, code_at, scale_at;
  uint32_t scale_byte_base[2];  // the low bits of the rows' first block index
  int first_stage, stage_shift;

  __device__ __forceinline__ StageDecoder(const void* code_table, const float* nested_code_, float offset_, int lane,
                                          int r0, int64_t N, int64_t K, int bs_log2, const WgTile& t)
      : table(reinterpret_cast<const char*>(code_table)),
        nested_code(nested_code_),
        offset(offset_),
        first_stage(static_cast<int>(t.first_stage)),
        stage_shift(bs_log2 - 6) {
    // The codes' table lookup: byte c of a word holds k pair (2c, 2c + 1) of its 8 k, the even k in
    // the high nibble. Rotating the word right by 8c - 3 (- 7) puts the high (low) nibble at bits
    // 7-10, the entry's byte offset in the table; lane * 4 in bits 2-6 picks the lane's copy.
    const int c = lane & 3;
    lane4 = 4u * static_cast<uint32_t>(lane);
    rot_hi = (8 * c - 3) & 31;
    rot_lo = (8 * c - 7) & 31;
    code_at = BN * 128 + r0 * 32;                 // rows r0 and r0 + 8 (+ 256)
    scale_at = BN * 128 + kWgRows * 32 + r0 * 8;  // (+ 64)
    const int64_t nb = K >> bs_log2;
#pragma unroll
    for (int h = 0; h < 2; ++h) scale_byte_base[h] = static_cast<uint32_t>(min(t.row0 + r0 + 8 * h, N - 1) * nb);
  }

  __device__ __forceinline__ uint32_t decode(uint32_t word, float scale) const {
    const float hi = *reinterpret_cast<const float*>(table + ((__funnelshift_r(word, word, rot_hi) & 0x780u) | lane4));
    const float lo = *reinterpret_cast<const float*>(table + ((__funnelshift_r(word, word, rot_lo) & 0x780u) | lane4));
    return pack_pair<T>(__fmul_rn(hi, scale), __fmul_rn(lo, scale));
  }

  __device__ __forceinline__ void stage(const uint8_t* slot, int j, uint32_t (&a)[4][4]) const {
    float s[2];
    if constexpr (NESTED) {
      const uint32_t block = static_cast<uint32_t>((first_stage + j) >> stage_shift);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t word = *reinterpret_cast<const uint32_t*>(slot + scale_at + 64 * h);
        const float nested = *reinterpret_cast<const float*>(slot + scale_at + 64 * h + 4);
        const uint32_t byte = (scale_byte_base[h] + block) & 3;
        s[h] = nested_scale(nested_code[(word >> (8 * byte)) & 0xff], nested, offset);
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) s[h] = *reinterpret_cast<const float*>(slot + scale_at + 64 * h);
    }
    const uint4 w0[2] = {*reinterpret_cast<const uint4*>(slot + code_at),
                         *reinterpret_cast<const uint4*>(slot + code_at + 16)};
    const uint4 w1[2] = {*reinterpret_cast<const uint4*>(slot + code_at + 256),
                         *reinterpret_cast<const uint4*>(slot + code_at + 272)};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // Step q: k 16q .. 16q + 15, words 2q (k 16q .. 16q + 7) and 2q + 1 of rows g and g + 8.
      const uint4& v0 = w0[q >> 1];
      const uint4& v1 = w1[q >> 1];
      a[q][0] = decode((q & 1) ? v0.z : v0.x, s[0]);
      a[q][1] = decode((q & 1) ? v1.z : v1.x, s[1]);
      a[q][2] = decode((q & 1) ? v0.w : v0.y, s[0]);
      a[q][3] = decode((q & 1) ? v1.w : v1.y, s[1]);
    }
  }
};

// A stage's four wgmma (x at shared address xs) as one commit group.
// (Step q's descriptor is step 0's with 2 q added to its low word, the start address in 16-byte
// units: a slot's 96 bytes on never carry out of that 14-bit field, shared addresses being under
// 256 KB; the constant high word then stays out of the per-step arithmetic.)
template <typename T, int BN>
__device__ __forceinline__ void wgmma_stage(float (&acc)[BN / 2], const uint32_t (&a)[4][4], uint32_t xs) {
  const uint64_t descriptor = swizzle128_descriptor(xs);
  const uint32_t low = static_cast<uint32_t>(descriptor);
  const uint64_t high = descriptor & 0xFFFFFFFF00000000ull;
  wgmma_fence();
#pragma unroll
  for (int q = 0; q < 4; ++q) Wgmma<T, BN>::run(acc, a[q], high | (low + 2 * q));
  wgmma_commit();
}

// acc[4i + e]: the tile's row r0 (e < 2) or r0 + r1 (the output rows of the thread's A rows g and
// g + 8: r1 = 8, or 2 in the transposed product), token 8i + 2c + (e & 1); into the output
// (finish_output) or, when K is split, the split's float32 partial sums (finished by add_splits_kernel).
template <typename T, int BN>
__device__ __forceinline__ void store_tile(const float (&acc)[BN / 2], const WgTile& t, int r0, int r1, int c,
                                           int64_t M, int64_t N, const Epilogue<T>& epi, T* __restrict__ out,
                                           float* __restrict__ partial) {
  const auto each_output = [&](auto&& store) {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
      const int64_t row = t.row0 + r0 + ((i & 2) ? r1 : 0);
      const int64_t tok = t.tok0 + 8 * (i >> 2) + 2 * c + (i & 1);
      if (row < N && tok < M) store(i, tok, row);
    }
  };
  if (partial != nullptr) {
    // Launched to overlap the adapter's down-projection: no write before that kernel has ended.
    if (epi.lora_down != nullptr) wait_for_previous_grid();
    each_output([&](int i, int64_t tok, int64_t row) { partial[(t.split * M + tok) * N + row] = acc[i]; });
    return;
  }
  with_lora_term(epi, [&](auto lora) {
    each_output([&](int i, int64_t tok, int64_t row) {
      out[tok * N + row] = finish_output<decltype(lora)::value>(acc[i], epi, tok, row, N);
    });
  });
}

// Runs stage(j, a, previous) for the split's stages, the two A-fragment sets alternating (the
// loop unrolled by two keeps them in registers), waits for the last wgmma group and stores the tile.
template <typename T, int BN, typename Stage>
__device__ __forceinline__ void run_stages(const WgTile& t, uint32_t (&a0)[4][4], uint32_t (&a1)[4][4],
                                           float (&acc)[BN / 2], int r0, int r1, int c, int64_t M, int64_t N,
                                           const Epilogue<T>& epi, T* __restrict__ out, float* __restrict__ partial,
                                           Stage& stage) {
  int j = 0;
  for (; j + 1 < t.nst; j += 2) {
    stage(j, a0, a1);
    stage(j + 1, a1, a0);
  }
  if (j < t.nst) stage(j, a0, a1);
  wgmma_wait<0>();
  keep_until_here(a0, M < 0, out);
  keep_until_here(a1, M < 0, out);
  store_tile<T, BN>(acc, t, r0, r1, c, M, N, epi, out, partial);
}

// The code table (16 floats, or with PAIR 256 bf16 code pairs: the tensor-copy kernel's), 32
// copies, copy l in bank l; and the nested code.
template <bool NESTED, bool PAIR>
__device__ __forceinline__ void fill_tables(uint32_t* code_table, float* nested_code, const Scales& sc, int fp4,
                                            int tid, int threads) {
  const float* code = fp4 ? kFP4Values<> : kNF4Values<>;
  if constexpr (PAIR) {
    for (int i = tid; i < 256 * 32; i += threads)
      code_table[i] = pack_pair<__nv_bfloat16>(code[(i >> 5) >> 4], code[(i >> 5) & 15]);
  } else {
    for (int i = tid; i < 16 * 32; i += threads) code_table[i] = __float_as_uint(code[i >> 5]);
  }
  if constexpr (NESTED) {
    for (int i = tid; i < 256; i += threads) nested_code[i] = sc.nested_code[i];
  }
}

// The two math warpgroups of the tensor-copy kernel (math_tid: 0-255 over them): wait for
// stage j's slot to be full, decode it (decode(slot, j, a) fills the A fragments and returns the
// slot's x tile's shared address) and start its wgmma group, and release stage j - 1's slot once
// that group is complete. Slot and phase advance a stage at a time (no division per stage). r0, r1:
// as store_tile's.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <typename T, int BN, int STAGES, typename Decode>
__device__ __forceinline__ void mbarrier_math(int math_tid, int r0, int r1, const Decode& decode, uint64_t* full,
                                              uint64_t* empty, const WgTile& t, int64_t M, int64_t N,
                                              const Epilogue<T>& epi, T* __restrict__ out,
                                              float* __restrict__ partial) {
  const int lane = math_tid & 31;
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  uint32_t a0[4][4] = {}, a1[4][4] = {};
  uint32_t slot = 0, phase = 0, previous_slot = 0;  // stage j's
  auto stage = [&](int j, uint32_t (&a)[4][4], const uint32_t (&previous)[4][4]) {
    mbar_wait(&full[slot], phase);
    wgmma_stage<T, BN>(acc, a, decode(slot, j, a));
    wgmma_wait<1>();
    keep_until_here(previous, M < 0, out);
    if (j > 0) mbar_arrive(&empty[previous_slot]);  // stage j - 1's group is complete
    previous_slot = slot;
    if (++slot == STAGES) {
      slot = 0;
      phase ^= 1;
    }
  };
  run_stages<T, BN>(t, a0, a1, acc, r0, r1, lane & 3, M, N, epi, out, partial, stage);
}
#endif

// All 256 threads copy (stage j + STAGES - 2 while stage j is multiplied) and all decode and
// multiply; a barrier a stage.
template <typename T, bool NESTED, int BN, int STAGES>
__global__ void __launch_bounds__(kWgThreads, BN <= 128 ? 2 : 1)
    gemm_4bit_wgmma_kernel(const T* __restrict__ x, int64_t M, const uint8_t* __restrict__ packed, int64_t N, int64_t K,
                           int bs_log2, Scales sc, int fp4, const Epilogue<T> epi, T* __restrict__ out,
                           float* __restrict__ partial, int64_t stages_per_split) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ uint32_t code_table[16 * 32];  // entry v of lane l at v * 32 + l: bank l
  __shared__ float nested_code[NESTED ? 256 : 1];
  extern __shared__ uint8_t smem_raw[];
  uint8_t* ring = swizzle_aligned(smem_raw);
  const uint32_t ring_address = smem_u32(ring);
  constexpr uint32_t kStageBytes = wg_stage_bytes<BN>();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const WgTile t = wg_tile(M, N, K, BN, stages_per_split);
  fill_tables<NESTED, false>(code_table, nested_code, sc, fp4, tid, kWgThreads);
  const float offset = NESTED ? *sc.offset : 0.f;
  const StageCopies<T, NESTED, BN, kWgThreads> copies(tid, x, M, packed, N, K, bs_log2, sc, t);
  const int r0 = 16 * warp + (lane >> 2);
  const StageDecoder<T, NESTED, BN> decoder(code_table, nested_code, offset, lane, r0, N, K, bs_log2, t);

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
#pragma unroll
  for (int j = 0; j < STAGES - 2; ++j) {
    if (j < t.nst) copies.issue(ring_address + j * kStageBytes, j, tid);
    cp_async_commit();
  }
  __syncthreads();  // the tables

  // A stage's four A fragments, two sets: the wgmma group of stage j reads one set while stage
  // j + 1 decodes into the other.
  uint32_t a0[4][4] = {}, a1[4][4] = {};
  uint32_t read_slot = 0, write_slot = (STAGES - 2) * kStageBytes;
  auto stage = [&](int j, uint32_t (&a)[4][4], const uint32_t (&previous)[4][4]) {
    cp_async_wait<STAGES - 3>();
    // cp.async writes through the generic proxy; wgmma reads x through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (j + STAGES - 2 < t.nst) copies.issue(ring_address + write_slot, j + STAGES - 2, tid);
    cp_async_commit();
    write_slot = write_slot == (STAGES - 1) * kStageBytes ? 0 : write_slot + kStageBytes;
    decoder.stage(ring + read_slot, j, a);
    wgmma_stage<T, BN>(acc, a, ring_address + read_slot);
    read_slot = read_slot == (STAGES - 1) * kStageBytes ? 0 : read_slot + kStageBytes;
    wgmma_wait<1>();
    keep_until_here(previous, M < 0, out);  // the previous stage's group read these: complete now
  };
  run_stages<T, BN>(t, a0, a1, acc, r0, 8, lane & 3, M, N, epi, out, partial, stage);
#else
  __trap();  // the host launches this kernel only where sm_90a code exists
#endif
}

// The bulk tensor copy form (bf16): one copy warp feeds the two math warpgroups. Per
// stage its lane 0 issues two tensor copies (TMA): x's BN x 64 tile, which the copy engine writes
// in the 128-byte swizzle wgmma's descriptor names (tokens past M read as zeros), and the 128 rows'
// 32 code bytes (rows past N as zeros). Its 32 lanes load the rows' block scales two stages ahead,
// decode them (double quantization included) and store each math thread's two rows' scales as one
// bf16 pair in the slot, then arrive (full: 1 + 32 arrivals and the copies' bytes). The math warps
// wait on mbarriers only, decode the codes with the pair table and release a slot (empty: 256
// arrivals) once the wgmma group that read it is complete.
// Why so: the float-decode kernel is issue-bound at 186 instructions a math warp and stage, of
// which the 16 lookups take 80 (a rotate, a mask, the table's base added, the load, the scale's
// multiply) and each thread's decode of its two scales about 25. With the scales decoded by the
// copy warp and the table at shared address 0x8000 (32 KB-aligned: the mask and the lane's table
// address are one LOP3), a lookup is 4 instructions and a stage's scales one load. The pair table's
// weight is bf16(bf16(code) * bf16(scale)): two roundings more than dequantize_4bit's, within the
// tests' bound.
constexpr int kTmaThreads = 288;  // warps 0-7: two math warpgroups; warp 8: the copies
// BN = 256: a third warpgroup (warp 8 copies, 9-11 exit) so that setmaxnreg can move registers to the
// math warps: 9 warps cap a thread at 168 (three share one scheduler's 16384), too few for 128
// accumulators. setmaxnreg.inc waits until the CTA's own pool (168 x 384 registers, what the
// launch gave it) can serve it: 8 math warps x 224 + 4 copy-warpgroup warps x 48 = 168 x 12 warps
// (more than the pool holds and the math warps wait forever).
template <int BN>
constexpr int tma_threads() {
  return BN == 256 ? 384 : kTmaThreads;
}
constexpr int kTmaMathRegisters = 224;
constexpr int kTmaCopyRegisters = 48;
static_assert(8 * kTmaMathRegisters + 4 * kTmaCopyRegisters <= 12 * 168,
              "the math warps would wait forever for registers");
constexpr int kTmaScaleLead = 2;  // stages the copy warp's scale loads run ahead

// Byte offsets from the start of dynamic shared memory (at shared address `lo`, after the block's
// reserved bytes): the barriers and the nested code, the ring's first `low_slots` slots below the
// table, the others after it (slots 1024-byte aligned: the x tile's swizzle atom).
struct TmaLayout {
  uint32_t bars, ncode, table, low_ring, low_slots, high_ring, total;
};

__host__ __device__ inline TmaLayout tma_layout(uint32_t lo, uint32_t stage_bytes, uint32_t stages) {
  TmaLayout L{};
  L.bars = 0;     // 2 * stages mbarriers, stages <= 32
  L.ncode = 512;  // 256 floats
  const uint32_t low_ring = (lo + 512 + 1024 + 1023) & ~1023u;
  L.low_ring = low_ring - lo;
  L.table = kTmaTableAddress - lo;
  const uint32_t fit = low_ring < kTmaTableAddress ? (kTmaTableAddress - low_ring) / stage_bytes : 0;
  L.low_slots = fit < stages ? fit : stages;
  L.high_ring = 2 * kTmaTableAddress - lo;
  L.total = L.high_ring + (stages - L.low_slots) * stage_bytes;
  return L;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void tensor_copy_2d(uint32_t dst, const CUtensorMap* map, int32_t inner, int32_t outer,
                                               uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n"
      :
      : "r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(smem_u32(bar))
      : "memory");
}
#endif

// The tensor-copy kernel's A fragments of a stage (rows r0 and r0 + 8 of the tile), as
// StageDecoder's pair-table decode: the code pair's entry at (byte << 7) | 4 * lane of the table,
// times the rows' bf16 scales, which the copy warp stored as one pair (r0's low) at word
// 8 * (r0 / 16) + r0 % 16 of the slot's scale area.
template <int BN>
struct TmaStageDecoder {
  uint32_t lane_table, rot, code_at, scale_at;

  __device__ __forceinline__ TmaStageDecoder(int lane, int r0)
      : lane_table(kTmaTableAddress | (4u * static_cast<uint32_t>(lane))),
        rot(static_cast<uint32_t>(8 * (lane & 3) - 7) & 31),
        code_at(BN * 128 + r0 * 32),
        scale_at(BN * 128 + kWgRows * 32 + 4 * (8 * (r0 >> 4) + (r0 & 15))) {}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __device__ __forceinline__ uint32_t decode_pair(uint32_t word, __nv_bfloat162 scale) const {
    uint32_t v = lds_u32((__funnelshift_r(word, word, rot) & 0x7f80u) | lane_table);
    const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&v), scale);
    return *reinterpret_cast<const uint32_t*>(&r);
  }

  // The stage in the slot at shared address `slot`.
  __device__ __forceinline__ void stage(uint32_t slot, uint32_t (&a)[4][4]) const {
    uint32_t pair = lds_ring_u32(slot + scale_at);
    const __nv_bfloat162 both = *reinterpret_cast<const __nv_bfloat162*>(&pair);
    const __nv_bfloat162 s0 = __low2bfloat162(both), s1 = __high2bfloat162(both);
    const uint4 w0[2] = {lds_ring_u128(slot + code_at), lds_ring_u128(slot + code_at + 16)};
    const uint4 w1[2] = {lds_ring_u128(slot + code_at + 256), lds_ring_u128(slot + code_at + 272)};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4& v0 = w0[q >> 1];
      const uint4& v1 = w1[q >> 1];
      a[q][0] = decode_pair((q & 1) ? v0.z : v0.x, s0);
      a[q][1] = decode_pair((q & 1) ? v1.z : v1.x, s1);
      a[q][2] = decode_pair((q & 1) ? v0.w : v0.y, s0);
      a[q][3] = decode_pair((q & 1) ? v1.w : v1.y, s1);
    }
  }
#endif
};

// The transposed product's A fragments (out = grad @ W: A = W^T, whose rows are W's columns and
// whose k is W's row n), for the tile's 128 columns and the stage's 64 rows n. The slot holds the
// codes as the tensor copy leaves them: [64 rows n][64 bytes, the tile's 128 columns] in the 64-byte
// swizzle (a row's 16-byte chunk i at chunk i ^ ((n >> 1) & 3)), so that the rows n = 16 q + 2 c
// (+ 1, + 8, + 9) one load instruction reads across the warp's four c fall in four different
// chunks, not on the same banks. A register of A is one column's rows n and n + 1: the pair table's
// entry of the byte (code(n) << 4) | code(n + 1). Thread (g, c) of math warp w (0-7) reads word
// u = g / 4 of the warp's 8 bytes (columns 16 w + 8 u .. + 7) from each of its 16 rows, joins rows
// n and n + 1 into one word of four such bytes (the high nibbles, the even columns, for
// s = (g / 2) % 2 = 0; the low nibbles for s = 1: a shift each and a LOP3), and looks up its bytes
// 2 b and 2 b + 1 (b = g % 2): its A rows g and g + 8 are columns 16 w + 8 u + 4 b + s and that + 2
// (store_tile's r0 and r1 = 2). The copy warp stores the pair (scale(n), scale(n + 1)) of the
// warpgroup's block, n = 16 q + 2 c + 8 h, at word 32 (w / 4) + 8 c + 2 q + h of the slot's scale
// area: a thread's eight in two 16-byte loads.
template <int BN>
struct TransposedStageDecoder {
  uint32_t lane_table, code_at, scale_at, rot0, rot1, left, right;

  __device__ __forceinline__ TransposedStageDecoder(int lane, int warp) {
    const int g = lane >> 2, c = lane & 3, s = (g >> 1) & 1, b = g & 1;
    const int byte = 8 * warp + 4 * (g >> 2);  // the word's first byte in a row
    lane_table = kTmaTableAddress | (4u * static_cast<uint32_t>(lane));
    code_at = BN * 128 + 2 * c * 64 + ((((byte >> 4) ^ c)) << 4) + (byte & 15);  // row 2 c
    scale_at = BN * 128 + kWgRows * 32 + 4 * (32 * (warp >> 2) + 8 * c);
    rot0 = static_cast<uint32_t>(16 * b - 7) & 31;
    rot1 = static_cast<uint32_t>(16 * b + 1) & 31;
    left = 4 * s;
    right = 4 - 4 * s;
  }

  // The tile's column of the thread's A row g (store_tile's r0).
  __device__ __forceinline__ static int column(int lane, int warp) {
    const int g = lane >> 2;
    return 16 * warp + 8 * (g >> 2) + 4 * (g & 1) + ((g >> 1) & 1);
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __device__ __forceinline__ uint32_t join(uint32_t row, uint32_t next_row) const {
    return ((row << left) & 0xF0F0F0F0u) | ((next_row >> right) & 0x0F0F0F0Fu);
  }

  __device__ __forceinline__ uint32_t decode_pair(uint32_t joined, uint32_t rot, uint32_t scales) const {
    return mul_pair<__nv_bfloat16>(lds_u32((__funnelshift_r(joined, joined, rot) & 0x7f80u) | lane_table), scales);
  }

  // The stage in the slot at shared address `slot`.
  __device__ __forceinline__ void stage(uint32_t slot, uint32_t (&a)[4][4]) const {
    const uint4 s0 = lds_ring_u128(slot + scale_at), s1 = lds_ring_u128(slot + scale_at + 16);
    const uint32_t scales[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};  // word 2 q + h
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t at = slot + code_at + 1024 * q;  // rows 16 q + 2 c, + 1 (64 bytes on), + 8, + 9
      const uint32_t low = join(lds_ring_u32(at), lds_ring_u32(at + 64));
      const uint32_t high = join(lds_ring_u32(at + 512), lds_ring_u32(at + 576));
      a[q][0] = decode_pair(low, rot0, scales[2 * q]);
      a[q][1] = decode_pair(low, rot1, scales[2 * q]);
      a[q][2] = decode_pair(high, rot0, scales[2 * q + 1]);
      a[q][3] = decode_pair(high, rot1, scales[2 * q + 1]);
    }
  }
#endif
};

// CTAS: the CTAs an SM the registers are capped for (9 warps: two CTAs leave 96 registers a
// thread, as 5 of the 18 warps share one scheduler's 16384; one leaves 168). `lo`: the shared
// address where dynamic shared memory starts (the block's reserved bytes), as the host laid it out.
// TRANSPOSED: out [M, N] = x [M, K] @ W with W [K, N] (the backward product grad @ W: its N is W's
// column count, its K W's row count), the code tile W's rows n of the stage by the tile's 128
// columns (code_map's box: 64 bytes x 64 rows, the 64-byte swizzle; TransposedStageDecoder).
template <bool NESTED, int BN, int STAGES, int CTAS, bool TRANSPOSED>
__global__ void __launch_bounds__(tma_threads<BN>(), CTAS)
    gemm_4bit_wgmma_tma_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap code_map,
                               int64_t M, int64_t N, int64_t K, int bs_log2, Scales sc, int fp4,
                               const Epilogue<__nv_bfloat16> epi, __nv_bfloat16* __restrict__ out,
                               float* __restrict__ partial, int64_t stages_per_split, uint32_t lo) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // The copy warp publishes stage j's scales when it issues stage j + kTmaScaleLead, which may wait
  // for stage j + kTmaScaleLead - STAGES's slot, released while stage j + kTmaScaleLead - STAGES + 1
  // is multiplied: that stage must come before j, or both sides wait forever.
  static_assert(STAGES > kTmaScaleLead + 1, "the copy warp would wait on a release that waits on it");
  using T = __nv_bfloat16;
  extern __shared__ uint8_t smem_raw[];
  if (smem_u32(smem_raw) != lo) __trap();  // the layout assumed another start: never launch it wrong
  constexpr uint32_t kStageBytes = wg_stage_bytes<BN>();
  constexpr uint32_t kTensorBytes = BN * 128 + kWgRows * 32;
  const TmaLayout L = tma_layout(lo, kStageBytes, STAGES);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw + L.bars);
  uint64_t* empty = full + STAGES;
  float* nested_code = reinterpret_cast<float*>(smem_raw + L.ncode);
  const auto slot_at = [&](uint32_t slot) {
    return lo +
           (slot < L.low_slots ? L.low_ring + slot * kStageBytes : L.high_ring + (slot - L.low_slots) * kStageBytes);
  };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const WgTile t = wg_tile(M, N, K, BN, stages_per_split);
  fill_tables<NESTED, true>(reinterpret_cast<uint32_t*>(smem_raw + L.table), nested_code, sc, fp4, tid,
                            tma_threads<BN>());
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1 + 32);
      mbar_init(&empty[s], 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Each role's register count is set inside its own branch, which never rejoins another (ptxas
  // ignores setmaxnreg where code after it could run under either count), and by one instruction
  // for the whole warpgroup (.sync.aligned: the four warps of the copy warpgroup must execute the
  // same setmaxnreg, not two copies of it, one a branch).
  constexpr bool kMoveRegisters = tma_threads<BN>() > kTmaThreads;
  if (warp >= 8) {
    if constexpr (kMoveRegisters) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kTmaCopyRegisters));
    if (warp == 8) {  // the copies and the scales
      const int64_t nb = (TRANSPOSED ? N : K) >> bs_log2;
      const int stage_shift = bs_log2 - 6;
      const float offset = NESTED ? *sc.offset : 0.f;
      // Lane l decodes pairs l and l + 32 (u), the rows 16 (p / 8) + p % 8 + 8 h of the tile (row
      // N - 1 past N): their first block's index. TRANSPOSED: the pair of W's rows 2 l + h of the
      // stage in the columns of warpgroup u (column N - 1 past N), the stage's first row's block.
      int64_t row_block[2][2];
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if constexpr (TRANSPOSED) {
            row_block[u][h] = (2 * lane + h) * nb + (min(t.row0 + 64 * u, N - 1) >> bs_log2);
          } else {
            const int p = lane + 32 * u;
            row_block[u][h] = min(t.row0 + 16 * (p >> 3) + (p & 7) + 8 * h, N - 1) * nb;
          }
        }
      struct Raw {
        uint32_t code[2][2];  // the 8-bit code (double quantization)
        float value[2][2];    // its nested scale, or the float32 scale
      };
      const auto load = [&](int j, Raw& r) {
        const int64_t stage_block =
            TRANSPOSED ? (t.first_stage + j) * kWgStageK * nb : (t.first_stage + j) >> stage_shift;
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t block = row_block[u][h] + stage_block;
            if constexpr (NESTED) {
              r.code[u][h] = __ldg(sc.qabsmax + block);
              r.value[u][h] = __ldg(sc.nested_absmax + (block >> 8));
            } else {
              r.value[u][h] = __ldg(sc.absmax + block);
            }
          }
      };
      const auto publish = [&](int j, const Raw& r) {
        const uint32_t slot = static_cast<uint32_t>(j % STAGES);
        const uint32_t at = slot_at(slot) + BN * 128 + kWgRows * 32;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          float s[2];
#pragma unroll
          for (int h = 0; h < 2; ++h)
            s[h] = NESTED ? nested_scale(nested_code[r.code[u][h]], r.value[u][h], offset) : r.value[u][h];
          // (TRANSPOSED: rows 2 l = 16 q + 2 c + 8 h at TransposedStageDecoder's word 32 u + 8 c + 2 q + h)
          const int word = TRANSPOSED ? 32 * u + 8 * (lane & 3) + 2 * (lane >> 3) + ((lane >> 2) & 1) : lane + 32 * u;
          sts_u32(at + 4 * word, pack_pair<T>(s[0], s[1]));
        }
        mbar_arrive(&full[slot]);
      };
      static_assert(kTmaScaleLead == 2, "the loads of two stages ahead are held in ahead0 and ahead1");
      Raw ahead0{}, ahead1{}, due{};  // stages j - 1, j - 2 (entering iteration j)
      for (int j = 0; j < t.nst; ++j) {
        const int slot = j % STAGES;
        // The slot's previous stage (j - STAGES) must be released: its empty phase (j / STAGES - 1).
        if (j >= STAGES) mbar_wait(&empty[slot], ((j / STAGES) - 1) & 1);
        const int stage = static_cast<int>(t.first_stage) + j;
        if (lane == 0) {
          const uint32_t base = slot_at(static_cast<uint32_t>(slot));
          mbar_arrive_expect_tx(&full[slot], kTensorBytes);
          tensor_copy_2d(base, &x_map, stage * kWgStageK, static_cast<int32_t>(t.tok0), &full[slot]);
          if constexpr (TRANSPOSED)
            tensor_copy_2d(base + BN * 128, &code_map, static_cast<int32_t>(t.row0 / 2), stage * kWgStageK,
                           &full[slot]);
          else
            tensor_copy_2d(base + BN * 128, &code_map, stage * (kWgStageK / 2), static_cast<int32_t>(t.row0),
                           &full[slot]);
        }
        due = ahead1;
        ahead1 = ahead0;
        load(j, ahead0);
        if (j >= kTmaScaleLead) publish(j - kTmaScaleLead, due);
      }
      if (t.nst >= 2) publish(t.nst - 2, ahead1);
      if (t.nst >= 1) publish(t.nst - 1, ahead0);
    }
    return;  // warps 9-11 (BN = 256) only give their registers back
  }

  if constexpr (kMoveRegisters) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kTmaMathRegisters));
  using Decoder = std::conditional_t<TRANSPOSED, TransposedStageDecoder<BN>, TmaStageDecoder<BN>>;
  const int r0 = TRANSPOSED ? TransposedStageDecoder<BN>::column(lane, warp) : 16 * warp + (lane >> 2);
  const Decoder decoder = [&] {
    if constexpr (TRANSPOSED) return Decoder(lane, warp);
    else return Decoder(lane, r0);
  }();
  const auto decode = [&](uint32_t slot, int, uint32_t (&a)[4][4]) {
    const uint32_t at = slot_at(slot);
    decoder.stage(at, a);
    return at;
  };
  mbarrier_math<T, BN, STAGES>(tid, r0, TRANSPOSED ? 2 : 8, decode, full, empty, t, M, N, epi, out, partial);
#else
  __trap();
#endif
}

// out = the sum of the splits' partial sums, in split order, finished (finish_output). LORA: whether
// the epilogue has an adapter term, a kernel of its own: its code takes 42 registers against 32
// without, and at 42 only 5 of the 8 blocks an SM is given fit at once: a second wave. The output's
// token and row, two 64-bit divisions an element, are made only where read.
template <typename T, bool LORA>
__global__ void add_splits_kernel(const float* __restrict__ partial, int splits, int64_t MN, int64_t N,
                                  const Epilogue<T> epi, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < MN; i += int64_t{gridDim.x} * blockDim.x) {
    float v = partial[i];
    for (int s = 1; s < splits; ++s) v = __fadd_rn(v, partial[s * MN + i]);
    if constexpr (LORA) {
      out[i] = finish_output<true>(v, epi, i / N, i % N, N);
    } else {
      out[i] = finish_output<false>(v, epi, 0, epi.bias != nullptr ? i % N : 0, N);
    }
  }
}

// The number of K splits: the fewest that keep the CTA slots of the GPU busy (a split count whose
// last wave is fuller by 5 points of the slots wins over a smaller one), with at least 8 stages
// (512 k) a split and the partial sums (4 bytes a split, token and row) no more bytes than the
// codes, so that adding them (mostly in L2) costs little beside the product.
int choose_splits(int64_t tiles, int64_t stages, int64_t M, int64_t K, int64_t slots, int64_t sms) {
  // A tile for every SM: splitting measured slower (28672x8192, 224 tiles for 132 SMs of two slots:
  // 211 us unsplit against 234 split at M = 128; a sweep not kept, docs/perf/gemm_4bit.md).
  if (tiles >= sms) return 1;
  auto fill = [&](int64_t s) {
    const int64_t units = tiles * s;
    return static_cast<double>(units) / static_cast<double>(((units + slots - 1) / slots) * slots);
  };
  int best = 1;
  for (int s = 2; s <= 16; ++s) {
    if (stages / s < 8 || int64_t{s} * M * 8 > K) break;
    if (fill(s) > fill(best) + 0.05) best = s;
  }
  return best;
}

// cuTensorMapEncodeTiled, from the driver the runtime has loaded (null where it has none).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiled tensor_map_encoder() {
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return EncodeTiled{nullptr};
    }
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  return encode;
}

// A row-major 2-D tensor [outer, inner] read in boxes of [box_outer, box_inner]; outside the
// tensor the copies read zeros.
bool tensor_map_2d(CUtensorMap* map, CUtensorMapDataType type, const void* base, uint64_t inner, uint64_t outer,
                   uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  const EncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, type, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Launches the float-decode kernel (TMA false) or the tensor-copy kernel (TMA, bf16, compiled for
// TMA_CTAS CTAs an SM) with BN-token tiles and a ring of STAGES slots, the sum split as
// choose_splits says; false where it declines (no tensor-map encoder, no CTA fits an SM).
// TRANSPOSED (the tensor-copy kernel only): g.out [M, W's K] = g.x2 [M, W's N] @ W.
template <typename T, bool NESTED, int BN, int STAGES, bool TMA = false, int TMA_CTAS = 1, bool TRANSPOSED = false>
bool launch(const FusedGemm& g) {
  static_assert(TMA || !TRANSPOSED, "the transposed product is the tensor-copy kernel's");
  const at::Tensor& x2 = g.x2;
  const GemmProblem& p = g.p;
  const int64_t M = g.M;
  // The output's width and the sums' length: W's N and K, transposed W's K and N.
  const int64_t width = TRANSPOSED ? p.K : p.N, depth = TRANSPOSED ? p.N : p.K;
  // (if constexpr: each launch instantiates only the kernel it launches)
  auto kernel = [] {
    if constexpr (TMA) return gemm_4bit_wgmma_tma_kernel<NESTED, BN, STAGES, TMA_CTAS, TRANSPOSED>;
    else return gemm_4bit_wgmma_kernel<T, NESTED, BN, STAGES>;
  }();
  constexpr int threads = TMA ? tma_threads<BN>() : kWgThreads;
  const int device = x2.get_device();
  // The tensor-copy kernel lays out its shared memory from where it starts (the block's reserved
  // bytes): the pair table at kTmaTableAddress.
  const uint32_t lo = TMA ? device_limits(device).reserved : 0;
  TORCH_CHECK(!TMA || lo + 2048 <= kTmaTableAddress, "gemm_4bit: the tensor-copy kernel's layout does not fit");
  const size_t smem = TMA ? tma_layout(lo, wg_stage_bytes<BN>(), STAGES).total : wg_smem_bytes<BN, STAGES>();
  const int per_sm = ctas_per_sm(kernel, threads, smem, device);
  if (per_sm == 0) return false;
  const int sms = device_limits(device).sms;
  [[maybe_unused]] CUtensorMap x_map{}, code_map{};
  if constexpr (TMA) {
    // The codes' box: a stage's 64 k of 128 rows, or (TRANSPOSED) 128 columns (64 bytes) of the
    // stage's 64 rows, in the 64-byte swizzle TransposedStageDecoder reads.
    const bool codes_mapped =
        TRANSPOSED ? tensor_map_2d(&code_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, g.packed.const_data_ptr(), p.K / 2, p.N,
                                   p.K / 2, kWgRows / 2, kWgStageK, CU_TENSOR_MAP_SWIZZLE_64B)
                   : tensor_map_2d(&code_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, g.packed.const_data_ptr(), p.K / 2, p.N,
                                   p.K / 2, kWgStageK / 2, kWgRows, CU_TENSOR_MAP_SWIZZLE_NONE);
    if (!codes_mapped || !tensor_map_2d(&x_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, x2.const_data_ptr(), depth, M,
                                        depth * 2, kWgStageK, BN, CU_TENSOR_MAP_SWIZZLE_128B))
      return false;
  }
  const int64_t stages = depth / kWgStageK;
  const int64_t tiles = ((width + kWgRows - 1) / kWgRows) * ((M + BN - 1) / BN);
  const int splits = choose_splits(tiles, stages, M, depth, int64_t{per_sm} * sms, sms);
  const int64_t per_split = (stages + splits - 1) / splits;
  const int64_t used_splits = (stages + per_split - 1) / per_split;  // no split left empty
  at::Tensor part;
  if (used_splits > 1) part = call_buffer(used_splits * M * width, at::kFloat, x2.device());
  const Epilogue<T> epi = epilogue_of<T>(g);
  T* out_ptr = reinterpret_cast<T*>(g.out.data_ptr());
  float* part_ptr = used_splits > 1 ? part.data_ptr<float>() : nullptr;
  const int fp4 = p.quant_type == QuantType::FP4 ? 1 : 0;
  const dim3 grid(static_cast<unsigned>(tiles * used_splits));
  if constexpr (TMA) {
    launch_kernel(kernel, grid, threads, smem, g.stream, g.after_previous, x_map, code_map, M, width, depth, g.bs_log2,
                  g.sc, fp4, epi, out_ptr, part_ptr, per_split, lo);
  } else {
    launch_kernel(kernel, grid, threads, smem, g.stream, g.after_previous,
                  reinterpret_cast<const T*>(x2.const_data_ptr()), M, g.packed.const_data_ptr<uint8_t>(), p.N, p.K,
                  g.bs_log2, g.sc, fp4, epi, out_ptr, part_ptr, per_split);
  }
  if (used_splits > 1) {
    const int64_t mn = M * width;
    const int64_t blocks = std::min<int64_t>((mn + 255) / 256, int64_t{sms} * 8);
    const auto add_splits = epi.lora_down != nullptr ? add_splits_kernel<T, true> : add_splits_kernel<T, false>;
    add_splits<<<static_cast<unsigned>(blocks), 256, 0, g.stream>>>(
        part.const_data_ptr<float>(), static_cast<int>(used_splits), mn, width, epi, out_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}

}  // namespace

// The dispatch has checked (gemm_config_unfit) the GPU, the dtype, K and the alignment: whole
// stages of 64 k, 16-byte copies of x and the codes, the 8-bit scale codes as whole aligned words.
bool launch_gemm_wgmma(const WgmmaConfig& c, const FusedGemm& g) {
  bool launched = false;
  with_types(g, [&](auto t, auto nested) {
    using T = typename decltype(t)::type;
    constexpr bool NESTED = decltype(nested)::value;
    const auto is = [&](int tokens, int stages, int ctas) {
      return c.tokens == tokens && c.stages == stages && (!c.tensor_copy || c.ctas_per_sm == ctas);
    };
    bool known = true;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      TORCH_CHECK(c.tensor_copy, "gemm_4bit: the bf16 wgmma kernel is the tensor-copy form");
      if (is(16, 10, 2)) launched = launch<T, NESTED, 16, 10, true, 2>(g);
      else if (is(32, 8, 2)) launched = launch<T, NESTED, 32, 8, true, 2>(g);
      else if (is(64, 5, 2)) launched = launch<T, NESTED, 64, 5, true, 2>(g);
      else if (is(128, 8, 1)) launched = launch<T, NESTED, 128, 8, true, 1>(g);
      else if (is(256, 4, 1)) launched = launch<T, NESTED, 256, 4, true, 1>(g);
      else if (is(32, 16, 1)) launched = launch<T, NESTED, 32, 16, true, 1>(g);
      else if (is(64, 12, 1)) launched = launch<T, NESTED, 64, 12, true, 1>(g);
      else known = false;
    } else {
      TORCH_CHECK(!c.tensor_copy, "gemm_4bit: the tensor-copy wgmma kernel is bf16 only");
      if (is(64, 6, 0)) launched = launch<T, NESTED, 64, 6>(g);
      else if (is(128, 5, 0)) launched = launch<T, NESTED, 128, 5>(g);
      else if (is(256, 5, 0)) launched = launch<T, NESTED, 256, 5>(g);
      else known = false;
    }
    TORCH_CHECK(known, "gemm_4bit: no wgmma kernel of ", c.tokens, " tokens, ", c.stages, " stages");
  });
  return launched;
}

// The dispatch has checked (choose_transposed_config) the GPU, bf16, the shapes and the alignment.
bool launch_gemm_wgmma_transposed(const WgmmaConfig& c, const FusedGemm& g) {
  TORCH_CHECK(c.tensor_copy && g.x2.scalar_type() == at::kBFloat16,
              "gemm_4bit_transposed: the transposed wgmma kernel is the bf16 tensor-copy form");
  using T = __nv_bfloat16;
  const auto run = [&](auto nested) {
    constexpr bool NESTED = decltype(nested)::value;
    if (c.tokens == 32 && c.stages == 8 && c.ctas_per_sm == 2) return launch<T, NESTED, 32, 8, true, 2, true>(g);
    if (c.tokens == 64 && c.stages == 5 && c.ctas_per_sm == 2) return launch<T, NESTED, 64, 5, true, 2, true>(g);
    if (c.tokens == 128 && c.stages == 8 && c.ctas_per_sm == 1) return launch<T, NESTED, 128, 8, true, 1, true>(g);
    if (c.tokens == 256 && c.stages == 4 && c.ctas_per_sm == 1) return launch<T, NESTED, 256, 4, true, 1, true>(g);
    TORCH_CHECK(false, "gemm_4bit_transposed: no transposed wgmma kernel of ", c.tokens, " tokens, ", c.stages,
                " stages");
    return false;
  };
  return g.sc.qabsmax != nullptr ? run(std::true_type{}) : run(std::false_type{});
}

// Only a 9.x device runs the sm_90a code; any other gets the PTX of an older target, whose body is
// a trap.
bool wgmma_kernels_have_sm90a_code(int major) {
#if defined(QLORA_HAS_SM90A)
  return major == 9;
#else
  (void)major;
  return false;
#endif
}

}  // namespace qlora::cuda
