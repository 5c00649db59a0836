// CPU kernels of the products with a 4-bit weight: the weight is dequantized to x's dtype (one
// rounding of code * scale, as bitsandbytes' dequantize_4bit) and multiplied by ATen's matmul.
// On the CPU the product, not the dequantization, dominates at every size that matters, and
// ATen's GEMM is already close to the machine's rate; what is fused is on the GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "qlora/format.h"
#include "qlora/kernels.h"

namespace qlora::cpu {
namespace {

at::Tensor dequantized_weight(const GemmProblem& p, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                              at::ScalarType dtype) {
  const std::array<c10::SymInt, 2> shape{c10::SymInt(p.N), c10::SymInt(p.K)};
  // float64 (gradcheck) through float32: code * scale is a float32 value, exact in float64.
  const at::ScalarType stored = dtype == at::kDouble ? at::kFloat : dtype;
  const at::Tensor W = dequantize_4bit_cpu(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                           nested_blocksize, quant_type, shape, stored);
  return stored == dtype ? W : W.to(dtype);
}

at::Tensor gemm_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                         c10::string_view quant_type, c10::SymIntArrayRef shape,
                         const std::optional<at::Tensor>& bias) {
  const GemmProblem p = check_gemm_4bit_args("gemm_4bit", false, x, packed, absmax, nested_absmax, nested_code, offset,
                                             blocksize, nested_blocksize, quant_type, shape, bias);
  const at::Tensor W = dequantized_weight(p, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                          nested_blocksize, quant_type, x.scalar_type());
  return at::linear(x, W, bias);
}

at::Tensor gemm_4bit_transposed_cpu(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& nested_code,
                                    const std::optional<at::Tensor>& offset, int64_t blocksize,
                                    int64_t nested_blocksize, c10::string_view quant_type, c10::SymIntArrayRef shape) {
  const GemmProblem p =
      check_gemm_4bit_args("gemm_4bit_transposed", true, grad, packed, absmax, nested_absmax, nested_code, offset,
                           blocksize, nested_blocksize, quant_type, shape, std::nullopt);
  const at::Tensor W = dequantized_weight(p, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                          nested_blocksize, quant_type, grad.scalar_type());
  return at::matmul(grad, W);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("gemm_4bit", &gemm_4bit_cpu);
  m.impl("gemm_4bit_transposed", &gemm_4bit_transposed_cpu);
}

}  // namespace qlora::cpu
