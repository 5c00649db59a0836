// Kernels one translation unit lends another: the products reuse the dequantization.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "qlora/format.h"

namespace qlora::cpu {
// The CPU kernel of qlora::dequantize_4bit (csrc/cpu/quantize_4bit.cpp).
at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               c10::SymIntArrayRef shape, at::ScalarType dtype);
}  // namespace qlora::cpu

namespace qlora::cuda {
// Dequantizes the first n codes of `packed` into `out` (contiguous, n elements of out's dtype) on
// the current stream. The caller has checked the arguments and made the tensors contiguous
// (csrc/cuda/quantize_4bit.cu).
void dequantize_4bit_into(const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, QuantType quant_type, int64_t n,
                          at::Tensor& out);
}  // namespace qlora::cuda
