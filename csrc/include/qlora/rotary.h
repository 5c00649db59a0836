// qlora::rotary_embedding (csrc/ops.cpp): the argument checks and operand layout that the CPU and
// CUDA kernels share (csrc/rotary.cpp), so that both see the same strides and raise the same errors.
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora {

// x and out with stride 1 on the last dimension and any strides on the first three; cos and sin
// expanded to x's shape (stride 0 on broadcast dimensions), stride 1 on the last.
struct RotaryOperands {
  at::Tensor x, cos, sin, out;
};

// Checks the arguments (ValueError / TypeError naming the argument), then lays them out as above and
// allocates out: empty_like(x), so that the transposed view transformers passes keeps its strides.
RotaryOperands rotary_operands(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace qlora
