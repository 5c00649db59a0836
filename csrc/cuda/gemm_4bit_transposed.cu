// The backward product at small M: out[M, K] = grad[M, N] @ W, W [N, K] given by its 4-bit codes,
// for M <= 16 (a layer's backward at decode-sized batches). Larger M takes dequantize + cuBLAS
// (csrc/cuda/gemm_4bit.cu), where the product is compute bound.
//
// The sum runs over W's rows, not along its contiguous k: the mma's reduction dimension is n. One
// mma.sync m16n8k16 takes the 16 tokens (A: grad, zero past M) against 16 rows x 8 columns of W (B).
// B's fragment pairs two rows of one column in a register (b0: rows 2c and 2c + 1 of column g, lane
// 4 g + c), so a lane decodes rows, not bytes: for the 8 mmas of a 64-column slab, lane (g, c) reads
// one 32-bit word (8 codes: columns 8 g .. 8 g + 7) of each of its rows 2c, 2c + 1, 2c + 8, 2c + 9,
// and mma t takes column 8 g + t of them, from a copy of the step's 16 rows x 32 bytes (whole
// sectors) that the warp made in shared memory. The output's column j of mma t is column 8 j + t of
// the slab, so each lane ends holding 16 consecutive columns of two tokens.
//
// Decoding: a register of B is two rows' codes of one column, so the lane joins the two rows' nibbles
// into a byte (two logic operations for four columns) and one lookup in the 256-entry pair table of
// the forward's mma kernels (32 copies, lane l in bank l: no conflict) gives the register: a lane's 32
// values a step take 16 shared-memory lookups, where decoding each value alone took 32. The block
// scale is a row's, constant along the slab, and a row of W is a k of the mma, so the scale can
// multiply grad's value of that k instead of the weight: bf16, 4 HMUL2 a step on the A fragment. Not
// fp16, whose grad * scale can fall out of range (subnormal, or past 65504) where grad * weight's
// float32 product does not: there it multiplies the B register (16 HMUL2), the weight rounded as
// fp16(fp16(code) * fp16(scale)), as the forward's tensor-copy wgmma kernel rounds its bf16 weight.
// Either way the terms carry three roundings (code, scale, product) where dequantize_4bit's weight
// has one: a one-hot grad gives T(T(code) * T(scale)), not T(code * scale). Sums are float32 and in a
// fixed order (warps in order within a CTA, then the splits of N in order): the same bits run to run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "qlora/cp_async.cuh"
#include "qlora/format.h"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/gemm_4bit_device.cuh"
#include "qlora/half_convert.cuh"
#include "qlora/mma.cuh"
#include "qlora/nested_scale.cuh"
#include "qlora/occupancy.h"
#include "qlora/shared_memory.cuh"

namespace qlora::cuda {
namespace {

// x, as a value the compiler cannot recompute: it stays in a register across the main loop rather
// than being derived again each step from threadIdx or 64-bit indices (which nvcc otherwise does
// even with registers to spare).
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("mov.b32 %0, %1;" : "=r"(x) : "r"(x));
  return x;
}

// v of lane 4 Q + (this lane & 3): a shuffle whose segment mask keeps the lane's low two bits, so
// that the source needs no index arithmetic (PTX shfl.sync.idx: source = (lane & segmask) | (b &
// ~segmask), here segmask 3, b 4 Q; clamp 31).
template <int Q>
__device__ __forceinline__ float shuffle_in_quad(float v) {
  float r;
  asm volatile("shfl.sync.idx.b32 %0, %1, %2, %3, 0xffffffff;" : "=f"(r) : "f"(v), "n"(4 * Q), "n"(0x31f));
  return r;
}

constexpr int kWarps = 8;  // a CTA: 8 warps on one slab, each its own 16-row steps
constexpr int kThreads = kWarps * 32;
constexpr int kSlab = 64;       // columns of W a CTA
constexpr int kStepRows = 16;   // rows of W a warp step: the mma's reduction
constexpr int kMaxTokens = 16;  // the mma's 16 rows of A

// A warp's operands move through a ring of kStages steps in shared memory, filled by cp.async: a
// step's 16 rows x 32 bytes of codes were one step ahead in registers, 512 bytes in flight a warp,
// where an SM's share of HBM's bandwidth times its latency is ~12-18 KB; two steps ahead, at 3 CTAs
// an SM, keep ~24 KB of codes (and their scales and grad) in flight. Three stages rather than four
// leave room beside the rings for the pair table (32 KB) at 3 CTAs an SM (H100; an A100's 164 KB
// holds 2). The warp copies a step whole, one 16-byte copy a lane of codes and one of grad, and each
// lane reads its fragments back (after __syncwarp: they were copied by other lanes). A step's slot:
constexpr int kStages = 3;
constexpr int kPitch = 48;                    // bytes a row of codes or grad: 32 used; 48 puts the
                                              // 4 rows a fragment load reads on distinct banks
constexpr int kCodesOff = 0;                  // 16 rows of W x 64 columns (32 bytes)
constexpr int kGradOff = kStepRows * kPitch;  // 16 tokens x the step's 16 rows of grad (32 bytes)
constexpr int kScaleOff = 2 * kGradOff;       // 16 words: the rows' float scales, or (nested) the
                                              // aligned words of their 8-bit codes; 16 words: nested
constexpr int kSlotBytes = kScaleOff + 2 * kStepRows * 4;
constexpr int kRingBytes = kStages * kSlotBytes;  // a warp's, 4.9 KB
constexpr size_t kTableBytes = 256 * kLutCopies * sizeof(uint32_t);
constexpr size_t kSmemBytes = kTableBytes + size_t{kWarps} * kRingBytes;  // the table, then the rings
// After its steps a warp's ring holds its partial sums for the CTA's reduction.
static_assert(kMaxTokens * (kSlab + 1) * 4 <= kRingBytes, "a warp's sums must fit its ring");
static_assert(kSlotBytes % 16 == 0, "16-byte copies");

// partial[blockIdx.y][m][k] (or out, with one split) = the sum over the split's rows n of
// grad[m][n] W[n][k], for the slab's 64 columns k (blockIdx.x).
template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads, 3)
    gemm_4bit_transposed_kernel(const T* __restrict__ grad, int M, const uint8_t* __restrict__ packed, int64_t N,
                                int64_t K, int bs_log2, Scales sc, int64_t qabsmax_bytes, int fp4,
                                int64_t rows_per_split, float* __restrict__ partial, T* __restrict__ out) {
  __shared__ float ncode[NESTED ? 256 : 1];
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem);
  uint8_t* rings = smem + kTableBytes;
  const int tid = static_cast<int>(opaque(threadIdx.x)), warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  build_pair_table<T>(lut, fp4, tid, kThreads);
  if constexpr (NESTED) {
    for (int i = tid; i < 256; i += kThreads) ncode[i] = sc.nested_code[i];
  }
  __syncthreads();
  const float off = NESTED ? *sc.offset : 0.f;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kSlab;
  const int64_t nbeg = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t nend = min(N, nbeg + rows_per_split);
  uint8_t* ring = rings + warp * kRingBytes;
  const uint32_t ring_addr = opaque(smem_u32(ring));

  // Step s of this warp starts at row first + s * stride. Rows past N are zero-filled; rows past the
  // split but before N are copied (valid memory). grad past the split is zero-filled, so that those
  // rows add nothing (their scales are zeroed too, where used: a second guard). A step inside the
  // split (all but a warp's last, at most) needs none of that: its copies' sources advance by a
  // step's rows (stride K elements, a whole number of blocks: K is a multiple of 64, stride of 128)
  // and nothing else.
  const int64_t stride = int64_t{kWarps} * kStepRows;
  const int64_t first = nbeg + int64_t{warp} * kStepRows;
  const int steps = first < nend ? static_cast<int>((nend - first + stride - 1) / stride) : 0;
  const int half = lane & 1, pair = lane >> 1;  // a lane's 16 bytes: row (token) `pair`, half `half`
  const int r = lane & 15;                      // the row whose scale word a lane copies
  // Blocks a round of steps: NESTED, a multiple of 4 (checked), so that each row's 8-bit scale code
  // keeps its byte in its word from step to step. Cut to 32 bits: where a warp takes a second step,
  // it is less than the weight's block count, which fits (checked).
  const uint32_t block_step = opaque(static_cast<uint32_t>((stride * K) >> bs_log2));
  const uint8_t* code_src = packed + ((first + pair) * K + k0) / 2 + 16 * half;
  const int64_t code_step = stride * K / 2;
  uint32_t scale_block = static_cast<uint32_t>(((first + r) * K + k0) >> bs_log2);
  // grad's rows past M are zeroed once, in every slot, before the first copy, and never copied: the
  // lanes that would copy them (pair >= M) skip their grad copy, and their source stays at grad.
  // Those tokens' sums are never stored; the zeros keep their accumulators finite.
  const bool grad_lane = pair < M;
  const T* grad_src = grad_lane ? grad + int64_t{pair} * N + first + 8 * half : grad;
  const int64_t grad_step = grad_lane ? stride : 0;
  // Lanes 0..15 copy row r's scale word (NESTED: the aligned word of its 8-bit code), lanes 16..
  // row r's nested absmax (NESTED) or nothing: one copy a lane, no divergence.
  const bool nested_lane = NESTED && lane >= 16;
  const uint8_t* scale_base = NESTED ? (nested_lane ? reinterpret_cast<const uint8_t*>(sc.nested_absmax) : sc.qabsmax)
                                     : reinterpret_cast<const uint8_t*>(sc.absmax);
  const uint32_t scale_whole_len = NESTED || lane < 16 ? 4u : 0u;
  // The byte offset of a lane's scale word from scale_base, for block b.
  const auto scale_offset = [&](uint32_t b) -> uint64_t {
    if constexpr (NESTED) return nested_lane ? (b / kNestedBlocksize) * 4u : b & ~3u;
    return uint64_t{b} * 4u;
  };
  const uint32_t dst_codes = ring_addr + kCodesOff + pair * kPitch + 16 * half;
  const uint32_t dst_grad = ring_addr + kGradOff + pair * kPitch + 16 * half;
  const uint32_t dst_scale = ring_addr + kScaleOff + 4 * lane;  // lanes 16..: the nested words
  const auto advance = [&]() {
    code_src += code_step;
    grad_src += grad_step;
    scale_block += block_step;
  };
  // A step inside the split, into `slot`.
  const auto copy_whole = [&](int slot) {
    const uint32_t at = static_cast<uint32_t>(slot * kSlotBytes);
    cp_async_16(dst_codes + at, code_src);
    if (grad_lane) cp_async_16(dst_grad + at, grad_src);
    cp_async_4_partial(dst_scale + at, scale_base + scale_offset(scale_block), scale_whole_len);
    advance();
  };
  // A warp's last step, at row n0, which may run past the split or past N, into `slot`.
  const auto copy_edge = [&](int slot, int64_t n0) {
    const uint32_t at = static_cast<uint32_t>(slot * kSlotBytes);
    const bool code_in = n0 + pair < N;
    cp_async_16_partial(dst_codes + at, code_in ? code_src : packed, code_in ? 16u : 0u);
    const int64_t grad_left = nend - (n0 + 8 * half);  // of this lane's 8 rows
    const uint32_t bytes = grad_left > 0 ? static_cast<uint32_t>(min(int64_t{16}, 2 * grad_left)) : 0u;
    if (grad_lane) cp_async_16_partial(dst_grad + at, bytes > 0 ? grad_src : grad, bytes);
    const uint64_t offset = scale_offset(scale_block);
    uint32_t scale_len = scale_whole_len;
    // The 8-bit codes' last word may be partial (cp.async copies no single byte).
    if (NESTED && !nested_lane) {
      scale_len = static_cast<uint32_t>(min(int64_t{4}, qabsmax_bytes - static_cast<int64_t>(offset)));
    }
    if (n0 + r >= N) scale_len = 0;
    cp_async_4_partial(dst_scale + at, scale_len > 0 ? scale_base + offset : packed, scale_len);
    advance();
  };

  // Lane 4 q + c (q = 0..3, and again for lanes 16..31) decodes the scale of row 2c + (0, 1, 8, 9)[q],
  // the rows of lane c's fragments: 2c and 2c + 1 (b0, and a0 / a1's k), 2c + 8 and 2c + 9 (b1, a2 /
  // a3's); every lane (g, c) then takes them from lanes 4 q + c, q = 0..3 (shuffle_in_quad).
  const int decoded_row = 2 * c + ((lane >> 2) & 1) + 8 * ((lane >> 3) & 1);
  // Its scale code sits at byte (block index & 3) of the copied word, the same byte every step: a
  // byte_perm selector.
  const uint32_t scale_byte =
      NESTED ? opaque(0x4440u | (static_cast<uint32_t>(((first + decoded_row) * K + k0) >> bs_log2) & 3u)) : 0u;
  const uint32_t lut_lane = opaque(smem_u32(lut) + 4 * lane);  // copy `lane` of the pair table
  const uint32_t ncode_at = NESTED ? opaque(smem_u32(ncode)) : 0u;
  // The lane's reads of a slot, from the slot's start: its rows' code words (rows 2c, 2c + 1, 2c + 8,
  // 2c + 9 at kPitch apart), its decoded row's scale word, its A fragment's ldmatrix row.
  const uint32_t codes_at = opaque(ring_addr + kCodesOff + 2 * c * kPitch + 4 * g);
  const uint32_t scale_at = opaque(ring_addr + kScaleOff + 4 * decoded_row);
  const uint32_t grad_at = opaque(ring_addr + kGradOff + (lane & 15) * kPitch + 16 * (lane >> 4));
  float acc[8][4] = {};
  // One step from `slot`; a step inside the split (WHOLE) needs no bounds on its rows' scales.
  const auto compute = [&](int slot, auto whole, int64_t n0) {
    const uint32_t slot_at = static_cast<uint32_t>(slot * kSlotBytes);
    uint32_t a[4];
    ldmatrix_x4(a, grad_at + slot_at);
    const uint32_t word = lds_ring_u32(scale_at + slot_at);
    float scale;
    if constexpr (NESTED) {
      scale = nested_scale(__uint_as_float(lds_u32(ncode_at + 4 * __byte_perm(word, 0u, scale_byte))),
                           lds_ring_f32(scale_at + slot_at + 64), off);
    } else {
      scale = __uint_as_float(word);
    }
    if constexpr (!decltype(whole)::value) {
      if (n0 + decoded_row >= nend) scale = 0.f;  // a row past the split or past N
    }
    const uint32_t scale_lo = pack_pair<T>(shuffle_in_quad<0>(scale), shuffle_in_quad<1>(scale));
    const uint32_t scale_hi = pack_pair<T>(shuffle_in_quad<2>(scale), shuffle_in_quad<3>(scale));
    constexpr bool kScaleGrad = !std::is_same_v<T, __half>;
    if constexpr (kScaleGrad) {
      a[0] = mul_pair<T>(a[0], scale_lo);
      a[1] = mul_pair<T>(a[1], scale_lo);
      a[2] = mul_pair<T>(a[2], scale_hi);
      a[3] = mul_pair<T>(a[3], scale_hi);
    }
    // Rows 2c + 8h (high nibble of each pair byte, the register's low half) and 2c + 8h + 1: the
    // bytes of even columns (codes packed two a byte, the first in the high nibble) in even[h], of
    // odd columns in odd[h]; column 8 g + t is byte t / 2 of one of them.
    uint32_t even[2], odd[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t first_row = lds_ring_u32(codes_at + slot_at + 8 * h * kPitch);
      const uint32_t second_row = lds_ring_u32(codes_at + slot_at + (8 * h + 1) * kPitch);
      even[h] = (first_row & 0xF0F0F0F0u) | ((second_row >> 4) & 0x0F0F0F0Fu);
      odd[h] = ((first_row << 4) & 0xF0F0F0F0u) | (second_row & 0x0F0F0F0Fu);
    }
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      uint32_t b[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t entry = __byte_perm((t & 1) ? odd[h] : even[h], 0u, 0x4440u | (t >> 1));
        b[h] = lds_u32(lut_lane + entry * (kLutCopies * 4));
      }
      if constexpr (!kScaleGrad) {
        b[0] = mul_pair<T>(b[0], scale_lo);
        b[1] = mul_pair<T>(b[1], scale_hi);
      }
      mma_16816<T>(acc[t], a, b[0], b[1]);
    }
  };

  // Steps before `whole_steps` lie inside the split, and (NESTED) their scale words inside the codes'
  // array: only the last rows' word can run past it, and it is copied as the edge's.
  int whole_steps = first + kStepRows <= nend ? static_cast<int>((nend - first - kStepRows) / stride) + 1 : 0;
  if (NESTED && whole_steps > 0) {
    const int64_t last_row = first + (whole_steps - 1) * stride + kStepRows - 1;
    if ((((last_row * K + k0) >> bs_log2) & ~int64_t{3}) + 4 > qabsmax_bytes) --whole_steps;
  }
  if (!grad_lane) {
#pragma unroll
    for (int slot = 0; slot < kStages; ++slot)
      *reinterpret_cast<uint4*>(ring + slot * kSlotBytes + kGradOff + pair * kPitch + 16 * half) =
          make_uint4(0, 0, 0, 0);
  }
  const auto copy_step = [&](int slot, int s) {
    if (s < whole_steps) {
      copy_whole(slot);
    } else if (s < steps) {
      copy_edge(slot, first + int64_t{s} * stride);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    copy_step(s, s);
    cp_async_commit();  // an empty group past the warp's steps keeps the count uniform
  }
  // Unrolled by the ring's length, so that each step's slot is a constant.
  for (int s0 = 0; s0 < steps; s0 += kStages) {
#pragma unroll
    for (int j = 0; j < kStages; ++j) {
      const int s = s0 + j;
      if (s < steps) {
        cp_async_wait<kStages - 2>();  // this lane's copies of step s have landed
        __syncwarp();                  // and every lane's; all have read the previous step's slot
        copy_step((j + kStages - 1) % kStages, s + kStages - 1);  // into that slot
        cp_async_commit();
        if (s < whole_steps) {
          compute(j, std::true_type{}, 0);
        } else {
          compute(j, std::false_type{}, first + int64_t{s} * stride);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncwarp();  // every lane has read its last step before the ring takes the sums

  // acc[t]: tokens g (0, 1) and g + 8 (2, 3) at slab columns 16 c + t (0, 2) and 16 c + 8 + t (1, 3).
  // Rows of kSlab + 1 floats: a warp's stores (lane 4 g + c at column 16 c + t) then fall two to a
  // bank at most, where a pitch of kSlab would put 16 on one.
  float* red = reinterpret_cast<float*>(ring);
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    red[g * (kSlab + 1) + 16 * c + t] = acc[t][0];
    red[g * (kSlab + 1) + 16 * c + 8 + t] = acc[t][1];
    red[(g + 8) * (kSlab + 1) + 16 * c + t] = acc[t][2];
    red[(g + 8) * (kSlab + 1) + 16 * c + 8 + t] = acc[t][3];
  }
  __syncthreads();
  for (int idx = tid; idx < M * kSlab; idx += kThreads) {
    const int tok = idx / kSlab, col = idx % kSlab;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      v += reinterpret_cast<const float*>(rings + w * kRingBytes)[tok * (kSlab + 1) + col];
    const int64_t k = k0 + col;
    if (partial != nullptr) {
      partial[(static_cast<int64_t>(blockIdx.y) * M + tok) * K + k] = v;
    } else {
      out[tok * K + k] = from_float<T>(v);
    }
  }
}

// out[i] = T(the sum over z of partial[z][i]), z in order.
template <typename T>
__global__ void __launch_bounds__(256)
    sum_splits_kernel(const float* __restrict__ partial, int64_t n, int splits, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int z = 0; z < splits; ++z) v += partial[z * n + i];
    out[i] = from_float<T>(v);
  }
}

// Rounds (8 warps x 16 rows) a split of N, for `slabs` CTAs a split on a GPU that holds `wave` CTAs
// at once, at most max_splits splits: the fewest that minimize the waves times a CTA's work, counted
// in rounds plus one for its fixed part (the loads before the first step, the reduction, the stores).
// 8192x28672 at M = 1, 448 slabs on 396 resident CTAs: 1 split is 2 waves of 65, 4 are 5 of 17.
int64_t rounds_per_split(int64_t rounds, int64_t slabs, int64_t wave, int64_t max_splits) {
  int64_t best = rounds, best_cost = INT64_MAX;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t per_split = ceil_div(rounds, s);
    const int64_t cost = ceil_div(slabs * ceil_div(rounds, per_split), wave) * (per_split + 1);
    if (cost < best_cost) best = per_split, best_cost = cost;
  }
  return best;
}

template <typename T, bool NESTED>
void launch(const at::Tensor& grad2, const uint8_t* packed, const GemmProblem& p, int bs_log2, const Scales& sc,
            int64_t qabsmax_bytes, at::Tensor& out2, cudaStream_t stream) {
  const int64_t M = grad2.size(0);
  const int sms = device_limits(grad2.get_device()).sms;
  const int64_t slabs = p.K / kSlab;
  const int64_t steps = ceil_div(p.N, kStepRows);
  // N split into whole CTA rounds (8 warps x 16 rows) so that the CTAs use their waves; each split
  // writes and reads back M x K float32 partial sums (8 M K bytes): at most N / (64 M) splits keep
  // those under an eighth of the codes' N K / 2 bytes (on a short K the waves go unfilled instead).
  const int64_t wave = resident_ctas(gemm_4bit_transposed_kernel<T, NESTED>, kThreads, kSmemBytes, grad2.get_device());
  const int64_t rounds = ceil_div(steps, kWarps);
  const int64_t max_splits = std::max<int64_t>(1, std::min(p.N / (64 * M), rounds));
  const int64_t rows_per_split = rounds_per_split(rounds, slabs, wave, max_splits) * kWarps * kStepRows;
  const int64_t splits = ceil_div(p.N, rows_per_split);
  TORCH_CHECK(slabs <= INT32_MAX && splits <= 65535, "gemm_4bit_transposed: the weight is too large (", p.N, "x", p.K,
              ")");
  T* out = reinterpret_cast<T*>(out2.data_ptr());
  at::Tensor partial;
  if (splits > 1) partial = call_buffer(splits * M * p.K, at::kFloat, grad2.device());
  const dim3 grid(static_cast<unsigned>(slabs), static_cast<unsigned>(splits));
  gemm_4bit_transposed_kernel<T, NESTED><<<grid, kThreads, kSmemBytes, stream>>>(
      reinterpret_cast<const T*>(grad2.const_data_ptr()), static_cast<int>(M), packed, p.N, p.K, bs_log2, sc,
      qabsmax_bytes, p.quant_type == QuantType::FP4 ? 1 : 0, rows_per_split,
      splits > 1 ? partial.data_ptr<float>() : nullptr, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t n = M * p.K;
    const int grid_sum = static_cast<int>(std::min<int64_t>(ceil_div(n, 256), int64_t{sms} * 8));
    sum_splits_kernel<T>
        <<<grid_sum, 256, 0, stream>>>(partial.const_data_ptr<float>(), n, static_cast<int>(splits), out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

bool gemm_4bit_transposed_small_m(const at::Tensor& grad2_in, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                                  const std::optional<at::Tensor>& nested_absmax_in,
                                  const std::optional<at::Tensor>& nested_code_in,
                                  const std::optional<at::Tensor>& offset, int64_t blocksize, const GemmProblem& p,
                                  at::Tensor& out2, cudaStream_t stream) {
  const int64_t M = grad2_in.size(0);
  // Named conditions, each a reason the kernel cannot take the product (the cuBLAS path can):
  const bool few_tokens = M >= 1 && M <= kMaxTokens;  // one m16 tile of tokens
  const bool half_types = grad2_in.scalar_type() == at::kBFloat16 || grad2_in.scalar_type() == at::kHalf;  // mma's
  // A lane's 8 codes of a row are one 32-bit word of a 64-column slab, inside one block of scales.
  const bool whole_slabs = p.K % kSlab == 0 && blocksize >= kSlab;
  // A warp's steps advance the scales' block index by a whole number of blocks (stride K / blocksize)
  // and, with 8-bit scale codes, by a multiple of 4, so that a row's code keeps its byte in the word
  // copied around it; every block index fits 32 bits (the kernel counts blocks in 32-bit registers).
  const int64_t round_elements = int64_t{kWarps} * kStepRows * p.K;
  const bool nested_in = nested_absmax_in.has_value();
  const bool scale_words_in_place = round_elements % ((nested_in ? 4 : 1) * blocksize) == 0;
  const bool blocks_fit_32_bits = p.N * p.K / blocksize <= UINT32_MAX;
  // grad copied 8 rows (16 bytes) at a time; with splits of whole 128-row rounds, every split ends
  // on a multiple of 8 too, which the kernel's edge step relies on
  const bool rows_of_8 = p.N % 8 == 0;
  const bool tensor_cores = device_limits(grad2_in.get_device()).major >= 8;  // mma.sync with bf16
  if (!(few_tokens && half_types && whole_slabs && scale_words_in_place && blocks_fit_32_bits && rows_of_8 &&
        tensor_cores))
    return false;
  const at::Tensor grad2 = grad2_in.contiguous(), packed = packed_in.contiguous(), absmax = absmax_in.contiguous();
  if (!aligned(grad2.const_data_ptr(), 16) || !aligned(packed.const_data_ptr(), 16)) return false;  // 16-byte copies
  at::Tensor nested_absmax, nested_code;
  Scales sc{};
  if (nested_in) {
    nested_absmax = nested_absmax_in->contiguous();
    nested_code = nested_code_in->contiguous();
    sc = {nullptr, absmax.const_data_ptr<uint8_t>(), nested_absmax.const_data_ptr<float>(),
          nested_code.const_data_ptr<float>(), offset->const_data_ptr<float>()};
    // The kernel copies the 32-bit word around each 8-bit scale code (cp.async has no 1-byte copy).
    if (!aligned(absmax.const_data_ptr(), 4)) return false;
  } else {
    sc = {absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr};
  }
  const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const auto* codes = reinterpret_cast<const uint8_t*>(packed.const_data_ptr());
  const bool nested = sc.qabsmax != nullptr;
  if (grad2.scalar_type() == at::kHalf) {
    if (nested) launch<__half, true>(grad2, codes, p, bs_log2, sc, absmax.numel(), out2, stream);
    else launch<__half, false>(grad2, codes, p, bs_log2, sc, absmax.numel(), out2, stream);
  } else {
    if (nested) launch<__nv_bfloat16, true>(grad2, codes, p, bs_log2, sc, absmax.numel(), out2, stream);
    else launch<__nv_bfloat16, false>(grad2, codes, p, bs_log2, sc, absmax.numel(), out2, stream);
  }
  return true;
}

}  // namespace qlora::cuda
