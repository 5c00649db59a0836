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

}  // namespace qlora
