// qlora::silu_mul and qlora::silu_mul_backward (csrc/ops.cpp): the argument checks and operand layout
// that the CPU and CUDA kernels share (csrc/silu_mul.cpp), so that both raise the same errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace qlora {

// gate, up (and grad) contiguous, of one shape, dtype and device; the outputs contiguous of that shape.
struct SiluMulOperands {
  at::Tensor gate, up, grad;  // grad: the backward's only
  at::Tensor out, grad_up;    // the forward's output, or the backward's grad_gate (out) and grad_up
};

// Checks the arguments (ValueError / TypeError naming the argument) and allocates the outputs: one for
// the forward (grad absent), two for the backward.
SiluMulOperands silu_mul_operands(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& grad);

}  // namespace qlora
