// The QLoRA layer at decode sizes on CUDA: the kernels of lora_linear_forward (one adapter) and of
// lora_linear_indexed (rows of one batch on different adapters of one base, PEFT's adapter_names:
// the Punica / S-LoRA "BGMV" idea, here on a 4-bit base).
//
// Up to kDecodeMaxRows rows, two kernels and no pass over the output beside the product's own:
//   1. the shrink kernel: down[m] = s_a * x[m] A_a^T for the row's adapter a, a CTA an output (x's row
//      and A's rows read in 16-byte vectors);
//   2. the product's fused kernel (the dispatch's choice, csrc/cuda/gemm_4bit.cu), whose epilogue adds
//      down[m] . B_a[n] to each output before rounding it (qlora/epilogue.cuh).
// The product is launched with programmatic stream serialization (sm_90) and the shrink kernel lets
// it start at once: the product streams the weight while the shrink kernel runs, and waits for it
// only in its epilogue. The composite forms of csrc/lora.cpp take everything else: more rows (the
// adapter products are then matrix products, cuBLAS's), dropout, the cuBLAS product, ranks or rows
// that are not whole 16-byte vectors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "qlora/epilogue.cuh"
#include "qlora/format.h"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/half_convert.cuh"
#include "qlora/lora.h"
#include "qlora/occupancy.h"

namespace qlora::cuda {
namespace {

// Up to 16 rows the fused kernels read the weight once for all rows, and the adapter's products are
// a matrix-vector product each (A, then r values of B an output); above, they are matrix products,
// cuBLAS's. (Where within these rows the epilogue's loads cost more than the composite form's two
// launches, r = 64 on large N on b2b4217's H100 run, is docs/perf/lora-decode.md's open question.)
constexpr int64_t kDecodeMaxRows = 16;
// The shrink kernel's CTA: one output down[m, j], K split over its threads. (A warp an output left
// too few loads in flight: on K = 28672 the kernel outlasted the product it overlaps, 67 against 48 us
// at M = 1, r = 16 on the H200, lora-decode-h200-2026-12-06-bf679d3.json.)
constexpr int kShrinkThreads = 256;
// lora_linear_indexed's scalings travel in the shrink kernel's parameters.
constexpr int kMaxFusedAdapters = 64;

struct AdapterScalings {
  float v[kMaxFusedAdapters];
};

// down[m, j] = scale * sum_k x[m, k] A[a, j, k] (float32, rounded once), a = index[m] (or 0),
// scale = scalings.v[a] where scaled (else 1); a row of adapter -1 gets zeros. Grid (r, M).
template <typename T>
__global__ void __launch_bounds__(kShrinkThreads)
    lora_shrink_kernel(const T* __restrict__ x, const T* __restrict__ A, const int64_t* __restrict__ index,
                       int64_t adapters, const AdapterScalings scalings, bool scaled, int64_t K, int r,
                       T* __restrict__ down) {
  start_next_grid();  // the product streams its weight meanwhile
  __shared__ float warp_sums[kShrinkThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m = blockIdx.y;
  const int j = blockIdx.x;
  int64_t a = 0;
  if (index != nullptr) {
    a = index[m];
    CUDA_KERNEL_ASSERT(a >= -1 && a < adapters && "adapter_index out of range");
    if (a < 0 || a >= adapters) {  // (the second only where device asserts are compiled out)
      if (tid == 0) down[m * r + j] = from_float<T>(0.f);
      return;  // (the whole CTA: one row)
    }
  }
  const uint4* xr = reinterpret_cast<const uint4*>(x + m * K);
  const uint4* ar = reinterpret_cast<const uint4*>(A + (a * r + j) * K);
  float acc = 0.f;
#pragma unroll 4
  for (int64_t i = tid; i < K / 8; i += kShrinkThreads) acc = dot8<T>(__ldg(xr + i), __ldg(ar + i), acc);
  // Added in a fixed order (the same bits run to run): within each warp, then the warps in turn.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (tid == 0) {
    float sum = warp_sums[0];
#pragma unroll
    for (int w = 1; w < kShrinkThreads / 32; ++w) sum += warp_sums[w];
    down[m * r + j] = from_float<T>(scaled ? scalings.v[a] * sum : sum);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Whether the decode kernels take this layer: few rows, 16-bit x, the rank and K whole 16-byte
// vectors of x's dtype.
bool decode_applies(const at::Tensor& x, int64_t K, int64_t r) {
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  return M >= 1 && M <= kDecodeMaxRows && K > 0 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
         K % 8 == 0 && r % 8 == 0;
}

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// Launches the shrink kernel of `g`'s rows into down [M, r].
void launch_shrink(const PreparedGemm& g, const at::Tensor& A, const at::Tensor& index, const AdapterScalings& s,
                   bool scaled, at::Tensor& down) {
  const int64_t r = down.size(1);
  const dim3 grid(static_cast<unsigned>(r), static_cast<unsigned>(g.M));
  const int64_t adapters = A.dim() == 3 ? A.size(0) : 1;
  const int64_t* index_ptr = index.defined() ? index.const_data_ptr<int64_t>() : nullptr;
  if (g.x2.scalar_type() == at::kHalf) {
    lora_shrink_kernel<__half><<<grid, kShrinkThreads, 0, g.stream>>>(
        reinterpret_cast<const __half*>(g.x2.const_data_ptr()), reinterpret_cast<const __half*>(A.const_data_ptr()),
        index_ptr, adapters, s, scaled, g.p.K, static_cast<int>(r), reinterpret_cast<__half*>(down.data_ptr()));
  } else {
    lora_shrink_kernel<__nv_bfloat16><<<grid, kShrinkThreads, 0, g.stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(g.x2.const_data_ptr()),
        reinterpret_cast<const __nv_bfloat16*>(A.const_data_ptr()), index_ptr, adapters, s, scaled, g.p.K,
        static_cast<int>(r), reinterpret_cast<__nv_bfloat16*>(down.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Programmatic dependent launch's instructions exist only in sm_90 code: without it (a build whose
// targets lack 9.x, on an H100) the product would read down without waiting for it. Every kernel of
// the build has the same targets, and the warp-specialized and wgmma kernels are only picked where
// their sm_90 / sm_90a code exists: the shrink kernel tells.
bool overlap_allowed(const PreparedGemm& g) {
  return g.gpu.major >= 9 &&
         runs_sm90_code(reinterpret_cast<const void*>(lora_shrink_kernel<__nv_bfloat16>), g.x2.get_device());
}

// The product of `g` with `term` in its epilogue, overlapping the shrink kernel just launched.
bool run_with_term(PreparedGemm& g, const LoraTerm& term) { return run_gemm_4bit(g, &term, overlap_allowed(g)); }

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
    c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto composite = [&] {
    return lora_linear_forward_composite(x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                         nested_blocksize, quant_type, shape, bias, lora_A, lora_B, scaling, dropout_p,
                                         seed);
  };
  check_lora_linear_args("lora_linear", x, shape, lora_A, lora_B, scaling, dropout_p, seed);
  const int64_t K = shape[1].guard_int(__FILE__, __LINE__);
  if (dropout_p > 0.0 || !decode_applies(x, K, lora_A.size(0))) return composite();
  // Everything the two kernels read is made before the first of them is launched (FusedGemm's
  // after_previous).
  c10::cuda::OptionalCUDAGuard guard;
  PreparedGemm g = prepare_gemm_4bit("lora_linear", x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                     nested_blocksize, quant_type, shape, bias, nullptr, -1, guard);
  if (!g.fused()) return composite();
  const at::Tensor A = in_dtype(lora_A, x.scalar_type()), B = in_dtype(lora_B, x.scalar_type());
  if (!aligned16(g.x2) || !aligned16(A) || !aligned16(B)) return composite();
  at::Tensor down = at::empty({g.M, A.size(0)}, x.options());
  launch_shrink(g, A, at::Tensor(), AdapterScalings{}, false, down);
  LoraTerm term{down, B, at::Tensor(), scaling};
  if (!run_with_term(g, term)) g.out2.addmm_(down, B.t(), /*beta=*/1, /*alpha=*/scaling);
  return {g.out, down};
}

at::Tensor lora_linear_indexed_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& nested_code,
                                    const std::optional<at::Tensor>& offset, int64_t blocksize,
                                    int64_t nested_blocksize, c10::string_view quant_type, c10::SymIntArrayRef shape,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, c10::ArrayRef<double> scaling,
                                    const at::Tensor& adapter_index) {
  const auto composite = [&] {
    return lora_linear_indexed_composite(x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                         nested_blocksize, quant_type, shape, bias, lora_A, lora_B, scaling,
                                         adapter_index);
  };
  const int64_t adapters = check_lora_linear_indexed_args(x, shape, lora_A, lora_B, scaling, adapter_index);
  const int64_t K = shape[1].guard_int(__FILE__, __LINE__);
  if (adapters > kMaxFusedAdapters || !decode_applies(x, K, lora_A.size(1))) return composite();
  c10::cuda::OptionalCUDAGuard guard;
  PreparedGemm g = prepare_gemm_4bit("lora_linear_indexed", x, packed, absmax, nested_absmax, nested_code, offset,
                                     blocksize, nested_blocksize, quant_type, shape, bias, nullptr, -1, guard);
  if (!g.fused()) return composite();
  const at::Tensor A = in_dtype(lora_A, x.scalar_type()), B = in_dtype(lora_B, x.scalar_type());
  const at::Tensor index = adapter_index.reshape({g.M}).contiguous();
  if (!aligned16(g.x2) || !aligned16(A) || !aligned16(B)) return composite();
  AdapterScalings s{};
  for (int64_t a = 0; a < adapters; ++a) s.v[a] = static_cast<float>(scaling[a]);
  at::Tensor down = at::empty({g.M, A.size(1)}, x.options());
  launch_shrink(g, A, index, s, true, down);
  LoraTerm term{down, B, index, 1.0};
  if (!run_with_term(g, term)) return composite();  // (rare: a wgmma kernel declined)
  return g.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_cuda);
  m.impl("lora_linear_indexed", &lora_linear_indexed_cuda);
}

}  // namespace qlora::cuda
