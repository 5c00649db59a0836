// What the CUDA products' translation units share: the dispatch (csrc/cuda/gemm_4bit.cu) and one
// file a kernel family (gemm_4bit_mma.cu, gemm_4bit_ws.cu, gemm_4bit_wgmma.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "qlora/format.h"
#include "qlora/gemm_4bit_config.h"
#include "qlora/occupancy.h"

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

// A fused product's operands: out[M, N] = x2[M, K] @ W^T (+ bias), W [N, K] given by its packed
// codes (contiguous) and scales, on `stream`. x2 is contiguous bf16 or fp16; bias is null or
// contiguous in x2's dtype; rows hold whole blocks of 2^bs_log2 >= 64 codes.
struct FusedGemm {
  const at::Tensor& x2;
  int64_t M;
  const at::Tensor& packed;
  const GemmProblem& p;
  int bs_log2;
  Scales sc;
  const at::Tensor* bias;
  at::Tensor& out;
  cudaStream_t stream;
};

// Calls f(std::type_identity<T>{}, std::bool_constant<NESTED>{}) for the product's element type
// and scales, so that each family instantiates its kernels for the four combinations.
template <typename F>
void with_types(const FusedGemm& g, F&& f) {
  const bool nested = g.sc.qabsmax != nullptr;
  if (g.x2.scalar_type() == at::kHalf) {
    if (nested) f(std::type_identity<__half>{}, std::true_type{});
    else f(std::type_identity<__half>{}, std::false_type{});
  } else {
    if (nested) f(std::type_identity<__nv_bfloat16>{}, std::true_type{});
    else f(std::type_identity<__nv_bfloat16>{}, std::false_type{});
  }
}

// The families' launches; the dispatch has checked with gemm_config_unfit that the configuration
// can run. A wgmma launch returns false without launching where the driver has no tensor-map
// encoder or no CTA fits an SM.
void launch_gemm_mma(const MmaConfig& c, const FusedGemm& g);        // csrc/cuda/gemm_4bit_mma.cu
void launch_gemm_stream(const StreamConfig& c, const FusedGemm& g);  // csrc/cuda/gemm_4bit_mma.cu
void launch_gemm_ws(const WsConfig& c, const FusedGemm& g);          // csrc/cuda/gemm_4bit_ws.cu
bool launch_gemm_wgmma(const WgmmaConfig& c, const FusedGemm& g);    // csrc/cuda/gemm_4bit_wgmma.cu
// Whether the build's warp-specialized kernels run sm_90 code on `device` (not the trap of a
// build whose list lacks 9.0, which the driver would compile from the 8.0 PTX).
bool ws_kernels_have_sm90_code(int device);
// Whether the build has the wgmma kernels' sm_90a code for a GPU of compute capability `major`.
bool wgmma_kernels_have_sm90a_code(int major);

// A buffer of `numel` elements of `dtype` on the device, kept per device and stream and grown
// when needed (the dequantized weight, the wgmma kernels' split partial sums); under CUDA graph
// capture a new one from the capture's pool (csrc/cuda/gemm_4bit.cu).
at::Tensor workspace(int64_t numel, at::ScalarType dtype, const at::Device& device, cudaStream_t stream);

}  // namespace qlora::cuda
