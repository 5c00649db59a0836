// What the CUDA products' translation units share (csrc/cuda/gemm_4bit*.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>

#include "qlora/format.h"

namespace qlora::cuda {

// A 4-bit weight's block scales as the fused kernels read them: float32, or 8-bit codes with the
// nested scales, the nested code and the offset (double quantization).
struct Scales {
  const float* absmax;         // float32 scales (no double quantization)
  const uint8_t* qabsmax;      // or their 8-bit codes,
  const float* nested_absmax;  // the scale of each 256 codes,
  const float* nested_code;    // the 8-bit map
  const float* offset;         // and the mean added back
};

// The wgmma kernel (csrc/cuda/gemm_4bit_wgmma.cu): out[M, N] = x2[M, K] @ W^T (+ bias) with the
// codes decoded into the tensor cores' register operand, on Hopper built for sm_90a. Returns false
// without launching where it cannot run (another GPU, no sm_90a code, misaligned inputs). Splitting
// K over CTAs writes float32 partial sums into `partials(numel)` (a workspace the caller owns),
// then adds them in a fixed order. forced_splits > 0 forces the number of K splits; `form` picks
// a benchmark variant where it applies (kWarpSpecialized: a copying warpgroup, M <= 128;
// kPairTable: the bf16 pair-table decode; kTensorCopy: bf16, the pair table fed by a copy warp's
// tensor copies, two CTAs an SM at M <= 64, or one with kTensorCopyOneCta), else the default kernel.
enum class WgmmaForm { kDefault, kWarpSpecialized, kPairTable, kTensorCopy, kTensorCopyOneCta };
bool gemm_4bit_wgmma(const at::Tensor& x2, int64_t M, const at::Tensor& packed, const GemmProblem& p, int bs_log2,
                     const Scales& sc, const at::Tensor* bias, at::Tensor& out, cudaStream_t stream,
                     const std::function<at::Tensor(int64_t)>& partials, int forced_splits = 0,
                     WgmmaForm form = WgmmaForm::kDefault);

// What the products' launches need to know of a device, read once a device (csrc/cuda/gemm_4bit.cu).
struct DeviceLimits {
  int major;
  size_t smem_optin;
  uint32_t reserved;  // shared memory the system keeps at the start of each block's window
  int sms;
};
DeviceLimits device_limits(int device);

}  // namespace qlora::cuda
