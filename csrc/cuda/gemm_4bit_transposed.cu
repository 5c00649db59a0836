// The backward product at small M: out[M, K] = grad[M, N] @ W, W [N, K] given by its 4-bit codes,
// for M <= 16 (a layer's backward at decode-sized batches). Larger M takes dequantize + cuBLAS
// (csrc/cuda/gemm_4bit.cu), where the product is compute bound.
//
// The sum runs over W's rows, not along its contiguous k: the mma's reduction dimension is n. One
// mma.sync m16n8k16 takes the 16 tokens (A: grad, zero past M) against 16 rows x 8 columns of W (B).
// B's fragment pairs two rows of one column in a register (b0: rows 2c and 2c + 1 of column g, lane
// 4 g + c), so a lane decodes rows, not bytes: for the 8 mmas of a 64-column slab, lane (g, c) reads
// one 32-bit word (8 codes: columns 8 g .. 8 g + 7) of each of its rows 2c, 2c + 1, 2c + 8, 2c + 9,
// and mma t takes column 8 g + t of them. A warp's four loads then cover 16 rows x 32 bytes, whole
// sectors. The output's column j of mma t is column 8 j + t of the slab, so each lane ends holding
// 16 consecutive columns of two tokens.
//
// Each value is rounded exactly as dequantize_4bit rounds it (the code's float times the block
// scale, FMUL.FTZ, then to bf16 / fp16): the mmas multiply the very weight the cuBLAS path would.
// Sums are float32 and in a fixed order (warps in order within a CTA, then the splits of N in
// order): the same bits run to run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "qlora/codebooks.h"
#include "qlora/format.h"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/half_convert.cuh"
#include "qlora/mma.cuh"
#include "qlora/nested_scale.cuh"
#include "qlora/occupancy.h"

namespace qlora::cuda {
namespace {

constexpr int kWarps = 8;  // a CTA: 8 warps on one slab, each its own 16-row steps
constexpr int kThreads = kWarps * 32;
constexpr int kSlab = 64;       // columns of W a CTA
constexpr int kStepRows = 16;   // rows of W a warp step: the mma's reduction
constexpr int kMaxTokens = 16;  // the mma's 16 rows of A

__constant__ float kNF4[16] = {QLORA_NF4_CODE};
__constant__ float kFP4[16] = {QLORA_FP4_CODE_SIGNED};  // code 8 is -0.0, as dequantize_4bit has it

// One warp step's operands, loaded a step ahead of their use.
struct Step {
  uint32_t codes[4];  // rows 2c, 2c + 1, 2c + 8, 2c + 9: the 8 codes of columns 8 g ..
  float scale[4];     // their rows' block scales (0 past the split's rows)
  uint32_t a[4];      // grad's A fragment: tokens g, g + 8 of reduction indices 2c.., 2c + 8..
};

// partial[blockIdx.y][m][k] (or out, with one split) = the sum over the split's rows n of
// grad[m][n] W[n][k], for the slab's 64 columns k (blockIdx.x).
template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads)
    gemm_4bit_transposed_kernel(const T* __restrict__ grad, int M, const uint8_t* __restrict__ packed, int64_t N,
                                int64_t K, int bs_log2, Scales sc, int fp4, int64_t rows_per_split,
                                float* __restrict__ partial, T* __restrict__ out) {
  __shared__ float lut[16];
  __shared__ float ncode[NESTED ? 256 : 1];
  // Rows of kSlab + 1 floats: a warp's stores of acc (lane 4 g + c at column 16 c + t) then fall
  // two to a bank at most, where a pitch of kSlab would put 16 on one.
  __shared__ float red[kWarps][kMaxTokens][kSlab + 1];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  if (tid < 16) lut[tid] = fp4 ? kFP4[tid] : kNF4[tid];
  if constexpr (NESTED) {
    for (int i = tid; i < 256; i += kThreads) ncode[i] = sc.nested_code[i];
  }
  __syncthreads();
  const float off = NESTED ? *sc.offset : 0.f;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kSlab;
  const int64_t nbeg = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t nend = min(N, nbeg + rows_per_split);

  // N is even and steps start at even rows: a pair of rows (2c, 2c + 1) is inside the split or not.
  const auto grad_pair = [&](int tok, int64_t row) -> uint32_t {
    return tok < M && row < nend ? __ldg(reinterpret_cast<const uint32_t*>(grad + tok * N + row)) : 0u;
  };
  const auto load = [&](int64_t n0, Step& s) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = n0 + 2 * c + (i & 1) + 8 * (i >> 1);
      if (row < nend) {
        const int64_t e = row * K + k0;  // a multiple of 64: the slab's row is in one block
        s.codes[i] = __ldcs(reinterpret_cast<const uint32_t*>(packed + e / 2) + g);
        const int64_t b = e >> bs_log2;
        s.scale[i] = NESTED ? nested_scale(ncode[sc.qabsmax[b]], __ldg(sc.nested_absmax + b / kNestedBlocksize), off)
                            : __ldg(sc.absmax + b);
      } else {
        s.codes[i] = 0;
        s.scale[i] = 0.f;
      }
    }
    s.a[0] = grad_pair(g, n0 + 2 * c);
    s.a[1] = grad_pair(g + 8, n0 + 2 * c);
    s.a[2] = grad_pair(g, n0 + 2 * c + 8);
    s.a[3] = grad_pair(g + 8, n0 + 2 * c + 8);
  };

  float acc[8][4] = {};
  const int64_t stride = int64_t{kWarps} * kStepRows;
  int64_t n0 = nbeg + int64_t{warp} * kStepRows;
  Step next{};
  if (n0 < nend) load(n0, next);
  for (; n0 < nend; n0 += stride) {
    const Step cur = next;
    if (n0 + stride < nend) load(n0 + stride, next);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      // Column 8 g + t: byte t / 2 of each word, its high nibble for even t (codes are packed two a
      // byte, the first in the high nibble).
      const int shift = 8 * (t >> 1) + ((t & 1) ? 0 : 4);
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = mul_ftz(lut[(cur.codes[i] >> shift) & 0xFu], cur.scale[i]);
      mma_16816<T>(acc[t], cur.a, pack_pair<T>(v[0], v[1]), pack_pair<T>(v[2], v[3]));
    }
  }

  // acc[t]: tokens g (0, 1) and g + 8 (2, 3) at slab columns 16 c + t (0, 2) and 16 c + 8 + t (1, 3).
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    red[warp][g][16 * c + t] = acc[t][0];
    red[warp][g][16 * c + 8 + t] = acc[t][1];
    red[warp][g + 8][16 * c + t] = acc[t][2];
    red[warp][g + 8][16 * c + 8 + t] = acc[t][3];
  }
  __syncthreads();
  for (int idx = tid; idx < M * kSlab; idx += kThreads) {
    const int tok = idx / kSlab, col = idx % kSlab;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][tok][col];
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

template <typename T, bool NESTED>
void launch(const at::Tensor& grad2, const uint8_t* packed, const GemmProblem& p, int bs_log2, const Scales& sc,
            at::Tensor& out2, cudaStream_t stream) {
  const int64_t M = grad2.size(0);
  const int sms = device_limits(grad2.get_device()).sms;
  const int64_t slabs = p.K / kSlab;
  const int64_t steps = ceil_div(p.N, kStepRows);
  // One wave of CTAs, N split into whole CTA rounds (8 warps x 16 rows) to make it, but each split
  // writes and reads back M x K float32 partial sums (8 M K bytes): at most N / (64 M) splits keep
  // those under an eighth of the codes' N K / 2 bytes (on a short K the wave goes unfilled instead).
  const int64_t wave = resident_ctas(gemm_4bit_transposed_kernel<T, NESTED>, kThreads, 0, grad2.get_device());
  const int64_t want = std::max<int64_t>(1, std::min(wave / slabs, p.N / (64 * M)));
  const int64_t rounds = ceil_div(steps, kWarps);
  const int64_t rows_per_split = ceil_div(rounds, std::min(want, rounds)) * kWarps * kStepRows;
  const int64_t splits = ceil_div(p.N, rows_per_split);
  TORCH_CHECK(slabs <= INT32_MAX && splits <= 65535, "gemm_4bit_transposed: the weight is too large (", p.N, "x", p.K,
              ")");
  T* out = reinterpret_cast<T*>(out2.data_ptr());
  at::Tensor partial;
  if (splits > 1) partial = call_buffer(splits * M * p.K, at::kFloat, grad2.device());
  const dim3 grid(static_cast<unsigned>(slabs), static_cast<unsigned>(splits));
  gemm_4bit_transposed_kernel<T, NESTED><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(grad2.const_data_ptr()), static_cast<int>(M), packed, p.N, p.K, bs_log2, sc,
      p.quant_type == QuantType::FP4 ? 1 : 0, rows_per_split, splits > 1 ? partial.data_ptr<float>() : nullptr, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t n = M * p.K;
    const int grid_sum = static_cast<int>(std::min<int64_t>(ceil_div(n, 256), int64_t{sms} * 8));
    sum_splits_kernel<T>
        <<<grid_sum, 256, 0, stream>>>(partial.const_data_ptr<float>(), n, static_cast<int>(splits), out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

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
  const bool even_rows = p.N % 2 == 0;  // grad read in pairs of rows as 32-bit words
  const bool tensor_cores = device_limits(grad2_in.get_device()).major >= 8;  // mma.sync with bf16
  if (!(few_tokens && half_types && whole_slabs && even_rows && tensor_cores)) return false;
  const at::Tensor grad2 = grad2_in.contiguous(), packed = packed_in.contiguous(), absmax = absmax_in.contiguous();
  if (!aligned4(grad2.const_data_ptr()) || !aligned4(packed.const_data_ptr())) return false;  // 32-bit loads
  at::Tensor nested_absmax, nested_code;
  Scales sc{};
  if (nested_absmax_in.has_value()) {
    nested_absmax = nested_absmax_in->contiguous();
    nested_code = nested_code_in->contiguous();
    sc = {nullptr, absmax.const_data_ptr<uint8_t>(), nested_absmax.const_data_ptr<float>(),
          nested_code.const_data_ptr<float>(), offset->const_data_ptr<float>()};
  } else {
    sc = {absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr};
  }
  const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  const auto* codes = reinterpret_cast<const uint8_t*>(packed.const_data_ptr());
  const bool nested = sc.qabsmax != nullptr;
  if (grad2.scalar_type() == at::kHalf) {
    if (nested) launch<__half, true>(grad2, codes, p, bs_log2, sc, out2, stream);
    else launch<__half, false>(grad2, codes, p, bs_log2, sc, out2, stream);
  } else {
    if (nested) launch<__nv_bfloat16, true>(grad2, codes, p, bs_log2, sc, out2, stream);
    else launch<__nv_bfloat16, false>(grad2, codes, p, bs_log2, sc, out2, stream);
  }
  return true;
}

}  // namespace qlora::cuda
