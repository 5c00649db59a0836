// Calls of qlora ops through the dispatcher, and the 4-bit weight's state as a custom autograd
// Function keeps it: what the autograd code of csrc/autograd.cpp and csrc/lora.cpp shares.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <torch/autograd.h>

#include <optional>
#include <string>
#include <vector>

namespace qlora {

using OptTensor = std::optional<at::Tensor>;

// torch.ops.qlora.gemm_4bit / gemm_4bit_transposed (csrc/autograd.cpp).
at::Tensor call_gemm_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                          int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                          c10::SymIntArrayRef shape, const OptTensor& bias);
at::Tensor call_gemm_4bit_transposed(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                                     const OptTensor& nested_absmax, const OptTensor& nested_code,
                                     const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                                     c10::string_view quant_type, c10::SymIntArrayRef shape);

// The arguments that describe a 4-bit weight in every op that reads one.
struct WeightState {
  at::Tensor packed, absmax;
  OptTensor nested_absmax, nested_code, offset;
  int64_t blocksize, nested_blocksize;
  std::string quant_type;
  std::vector<c10::SymInt> shape;
};

// Saves the weight's tensors for the backward, then `extra` (ctx->save_for_backward is called once).
void save_weight_state(torch::autograd::AutogradContext* ctx, const at::Tensor& packed, const at::Tensor& absmax,
                       const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                       int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                       c10::SymIntArrayRef shape, const torch::autograd::variable_list& extra = {});
// The weight's state back; the tensors saved after it go to *extra when given.
WeightState load_weight_state(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list* extra = nullptr);

}  // namespace qlora
