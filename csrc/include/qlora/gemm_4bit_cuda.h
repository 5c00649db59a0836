// What the CUDA products' translation units share: the dispatch (csrc/cuda/gemm_4bit.cu) and one
// file a kernel family (gemm_4bit_mma.cu, gemm_4bit_ws.cu, gemm_4bit_wgmma.cu, and the backward's
// gemm_4bit_transposed.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

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

// What a fused product adds to each output (token m, weight row n) of x W^T before it rounds the
// output, once: the bias, and LoRA's up-projection of the token's adapter a,
//   scaling * down[m] . lora_B[a][n]   (r products, float32),
// where down [M, r] is the down-projection csrc/cuda/lora_decode.cu computes just before the product.
// The kernels read it through `finish_output` (qlora/epilogue.cuh).
template <typename T>
struct Epilogue {
  const T* bias;                 // [N], or null
  const T* lora_down;            // [M, r], or null: no adapter term
  const T* lora_B;               // [adapters, N, r]
  const int64_t* adapter_index;  // [M], the token's adapter (-1: none), or null: adapter 0 for every token
  int64_t adapters;
  float scaling;
  int r;  // a multiple of 8, the rows of down and lora_B 16-byte aligned
};

// The adapter term of a fused product, host side: down [M, r] and lora_B [adapters, N, r] (or
// [N, r]) contiguous in x's dtype, adapter_index [M] int64 or undefined.
struct LoraTerm {
  at::Tensor down, lora_B, adapter_index;
  double scaling = 1.0;
};

// A fused product's operands: out[M, N] = x2[M, K] @ W^T (+ bias, + lora), W [N, K] given by its
// packed codes (contiguous) and scales, on `stream`. x2 is contiguous bf16 or fp16; bias is null or
// contiguous in x2's dtype; rows hold whole blocks of 2^bs_log2 >= 64 codes. after_previous: the
// kernel is launched with programmatic stream serialization, to overlap the kernel before it (which
// must not have written x2, the codes or the scales: the kernels read those before they wait).
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
  const LoraTerm* lora = nullptr;
  bool after_previous = false;
};

// The kernels' epilogue of g.
template <typename T>
Epilogue<T> epilogue_of(const FusedGemm& g) {
  Epilogue<T> e{
      g.bias ? reinterpret_cast<const T*>(g.bias->const_data_ptr()) : nullptr, nullptr, nullptr, nullptr, 1, 1.f, 0};
  if (g.lora != nullptr) {
    e.lora_down = reinterpret_cast<const T*>(g.lora->down.const_data_ptr());
    e.lora_B = reinterpret_cast<const T*>(g.lora->lora_B.const_data_ptr());
    e.adapter_index = g.lora->adapter_index.defined() ? g.lora->adapter_index.const_data_ptr<int64_t>() : nullptr;
    e.adapters = g.lora->lora_B.dim() == 3 ? g.lora->lora_B.size(0) : 1;
    e.scaling = static_cast<float>(g.lora->scaling);
    e.r = static_cast<int>(g.lora->down.size(1));
  }
  return e;
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization where
// after_previous (sm_90: the kernel may start before the previous one ends; it waits in
// finish_output). Checks the launch.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   bool after_previous, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = after_previous ? attribute : nullptr;
  config.numAttrs = after_previous ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

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
// The backward product g.out [M, W's K] = g.x2 [M, W's N] @ W on the tensor-copy wgmma kernel
// (choose_transposed_config's); false as launch_gemm_wgmma.
bool launch_gemm_wgmma_transposed(const WgmmaConfig& c, const FusedGemm& g);  // csrc/cuda/gemm_4bit_wgmma.cu
// Whether the build's warp-specialized kernels run sm_90 code on `device` (not the trap of a
// build whose list lacks 9.0, which the driver would compile from the 8.0 PTX).
bool ws_kernels_have_sm90_code(int device);
// Whether the build has the wgmma kernels' sm_90a code for a GPU of compute capability `major`.
bool wgmma_kernels_have_sm90a_code(int major);

// A forward product checked and ready to launch (csrc/cuda/gemm_4bit.cu): its operands contiguous,
// its output allocated, the configuration picked. done: the output is final already (empty, or K = 0).
struct PreparedGemm {
  const char* op = nullptr;
  GemmProblem p{};
  int64_t M = 0, blocksize = 0;
  bool done = false, named = false;
  at::Tensor x2, packed, absmax, bias, out, out2;  // out: x's shape with N last; out2: its [M, N] view
  std::optional<at::Tensor> nested_absmax, nested_code, offset;
  GemmQuery query{};
  GpuInfo gpu{};
  const GemmConfig* config = nullptr;
  cudaStream_t stream = nullptr;
  bool fused() const { return config != nullptr && config->kernel != GemmKernel::kDequantizeCublas; }
};

// Checks gemm_4bit's arguments, then sets `guard` to x's device and prepares the product, launching
// nothing but what makes the operands contiguous (a caller may launch a kernel between this and
// run_gemm_4bit, for the product to overlap). named, fused_max_m: as _gemm_4bit_with (null, -1: the
// dispatch's choice).
PreparedGemm prepare_gemm_4bit(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias,
                               const GemmConfig* named, int64_t fused_max_m, c10::cuda::OptionalCUDAGuard& guard);

// Launches the prepared product into g.out, with `lora`'s term in a fused kernel's epilogue and,
// where after_previous, overlapping the kernel launched just before (FusedGemm). Returns whether
// the term was applied: false where cuBLAS computed the product (a wgmma kernel declined), for the
// caller to add it.
bool run_gemm_4bit(PreparedGemm& g, const LoraTerm* lora, bool after_previous);

// gemm_4bit_transposed at M <= 16 (csrc/cuda/gemm_4bit_transposed.cu): out2 [M, K] (contiguous) =
// grad2 [M, N] @ W, launched on `stream`, where its kernel takes the product; returns false,
// launching nothing, where it does not (the caller's dequantize + cuBLAS path then does).
bool gemm_4bit_transposed_small_m(const at::Tensor& grad2, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                  int64_t blocksize, const GemmProblem& p, at::Tensor& out2, cudaStream_t stream);

// A buffer of `numel` elements of `dtype` for one call (the dequantized weight, the split partial
// sums), from the caching allocator on the current stream (csrc/cuda/gemm_4bit.cu says why).
at::Tensor call_buffer(int64_t numel, at::ScalarType dtype, const at::Device& device);

}  // namespace qlora::cuda
