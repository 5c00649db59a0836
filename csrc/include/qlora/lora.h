// The adapter products of the QLoRA layer (csrc/lora.cpp); csrc/cuda/lora.cu has fused kernels for the
// first two, where they measured faster than the composite form:
//   lora_down(x, A, seed, p)                    = drop(x) @ A^T            [M, r]
//   lora_grad_A(grad_down, x, seed, p)          = grad_down^T @ drop(x)    [r, K]
//   lora_dropout_add_mm(base, grad_down, A, ..) = base + drop'(grad_down @ A)   [M, K]
// with x [M, K], A [r, K], grad_down [M, r], all of one float dtype on one device, and drop the
// mask of qlora/dropout.h (drop' the same mask and scale applied to the product, rounded to the
// dtype first). The composite versions (dropout kernel + ATen matmul) serve every backend and are
// the CUDA kernels' fallback.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qlora {

// Checks the arguments of the three ops (op names the op in messages); returns r.
int64_t check_lora_product_args(const char* op, const at::Tensor& x, const char* x_name, const at::Tensor& A,
                                const at::Tensor& grad_down, const std::optional<at::Tensor>& seed, double p);

at::Tensor lora_down_composite(const at::Tensor& x, const at::Tensor& lora_A, const std::optional<at::Tensor>& seed,
                               double p);
at::Tensor lora_grad_A_composite(const at::Tensor& grad_down, const at::Tensor& x,
                                 const std::optional<at::Tensor>& seed, double p);
at::Tensor lora_dropout_add_mm_composite(const at::Tensor& base, const at::Tensor& grad_down, const at::Tensor& lora_A,
                                         const std::optional<at::Tensor>& seed, double p);

// The QLoRA layer's forward (the op lora_linear_forward) and the op lora_linear_indexed (csrc/ops.cpp):
// their argument checks and their composite forms (gemm_4bit, then the adapters' products through
// ATen), every backend's kernel and the CUDA kernels' fallback (csrc/cuda/lora_decode.cu).
using c10::SymIntArrayRef;
void check_lora_linear_args(const char* op, const at::Tensor& x, SymIntArrayRef shape, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, double dropout_p,
                            const std::optional<at::Tensor>& seed);
std::tuple<at::Tensor, at::Tensor> lora_linear_forward_composite(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
    SymIntArrayRef shape, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed);
// Returns the number of adapters.
int64_t check_lora_linear_indexed_args(const at::Tensor& x, SymIntArrayRef shape, const at::Tensor& lora_A,
                                       const at::Tensor& lora_B, c10::ArrayRef<double> scaling,
                                       const at::Tensor& adapter_index);
at::Tensor lora_linear_indexed_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& nested_code,
                                         const std::optional<at::Tensor>& offset, int64_t blocksize,
                                         int64_t nested_blocksize, c10::string_view quant_type, SymIntArrayRef shape,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                         const at::Tensor& lora_B, c10::ArrayRef<double> scaling,
                                         const at::Tensor& adapter_index);

}  // namespace qlora
