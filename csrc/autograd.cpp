// Autograd of the products with a 4-bit weight, in C++ for every backend: d(x W^T + b)/dx is
// grad @ W (gemm_4bit_transposed) and d(grad W)/dgrad is g @ W^T (gemm_4bit), so each op's backward
// is the other and double backward works; the weight is frozen (its codes are integers). In C++
// rather than through torch.library.register_autograd: the Python layer cost about 13 us a call,
// as much as the whole product of a 4096x4096 weight at M = 1 on an H200.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "qlora/op_calls.h"

namespace qlora {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_gemm_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                          int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                          c10::SymIntArrayRef shape, const OptTensor& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::gemm_4bit", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t,
                                               c10::string_view, c10::SymIntArrayRef, const OptTensor&)>();
  return op.call(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape,
                 bias);
}

at::Tensor call_gemm_4bit_transposed(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                                     const OptTensor& nested_absmax, const OptTensor& nested_code,
                                     const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                                     c10::string_view quant_type, c10::SymIntArrayRef shape) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::gemm_4bit_transposed", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, int64_t, int64_t, c10::string_view, c10::SymIntArrayRef)>();
  return op.call(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                 shape);
}

// The weight's state, kept for the backward, followed by `extra`.
void save_weight_state(AutogradContext* ctx, const at::Tensor& packed, const at::Tensor& absmax,
                       const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                       int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                       c10::SymIntArrayRef shape, const variable_list& extra) {
  variable_list saved{packed, absmax, nested_absmax.value_or(at::Tensor()), nested_code.value_or(at::Tensor()),
                      offset.value_or(at::Tensor())};
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["blocksize"] = blocksize;
  ctx->saved_data["nested_blocksize"] = nested_blocksize;
  ctx->saved_data["quant_type"] = std::string(quant_type);
  ctx->saved_data["shape"] = c10::IValue(shape);
}

static OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

WeightState load_weight_state(AutogradContext* ctx, variable_list* extra) {
  const variable_list saved = ctx->get_saved_variables();
  if (extra != nullptr) extra->assign(saved.begin() + 5, saved.end());
  return {saved[0],
          saved[1],
          optional_of(saved[2]),
          optional_of(saved[3]),
          optional_of(saved[4]),
          ctx->saved_data["blocksize"].toInt(),
          ctx->saved_data["nested_blocksize"].toInt(),
          ctx->saved_data["quant_type"].toStringRef(),
          ctx->saved_data["shape"].toSymIntVector()};
}

namespace {

class Gemm4bit : public torch::autograd::Function<Gemm4bit> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const OptTensor& nested_absmax, const OptTensor& nested_code,
                            const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                            c10::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_weight_state(ctx, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                      shape);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["has_bias"] = has_bias;
    // The bias's edge: tensors that autograd saw before it (x, packed, absmax, the nested state).
    ctx->saved_data["bias_edge"] =
        int64_t{3} + nested_absmax.has_value() + nested_code.has_value() + offset.has_value();
    return call_gemm_4bit(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                          quant_type, shape, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WeightState s = load_weight_state(ctx);
    const at::Tensor& grad = grads[0];
    variable_list out(11);
    if (ctx->needs_input_grad(0)) {
      out[0] = call_gemm_4bit_transposed(grad, s.packed, s.absmax, s.nested_absmax, s.nested_code, s.offset,
                                         s.blocksize, s.nested_blocksize, s.quant_type, s.shape);
    }
    if (ctx->saved_data["has_bias"].toBool() &&
        ctx->needs_input_grad(static_cast<size_t>(ctx->saved_data["bias_edge"].toInt()))) {
      out[10] = grad.reshape({-1, grad.size(-1)}).sum(0);
    }
    return out;
  }
};

class Gemm4bitTransposed : public torch::autograd::Function<Gemm4bitTransposed> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& packed,
                            const at::Tensor& absmax, const OptTensor& nested_absmax, const OptTensor& nested_code,
                            const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                            c10::string_view quant_type, c10::SymIntArrayRef shape) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_weight_state(ctx, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                      shape);
    return call_gemm_4bit_transposed(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                     nested_blocksize, quant_type, shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WeightState s = load_weight_state(ctx);
    variable_list out(10);
    if (ctx->needs_input_grad(0)) {
      out[0] = call_gemm_4bit(grads[0], s.packed, s.absmax, s.nested_absmax, s.nested_code, s.offset, s.blocksize,
                              s.nested_blocksize, s.quant_type, s.shape, std::nullopt);
    }
    return out;
  }
};

at::Tensor gemm_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                              int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                              c10::SymIntArrayRef shape, const OptTensor& bias) {
  // Inference (nothing asks for a gradient) skips the graph node and what it saves.
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || (bias.has_value() && bias->requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_gemm_4bit(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                          quant_type, shape, bias);
  }
  return Gemm4bit::apply(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                         shape, bias);
}

at::Tensor gemm_4bit_transposed_autograd(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                                         const OptTensor& nested_absmax, const OptTensor& nested_code,
                                         const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                                         c10::string_view quant_type, c10::SymIntArrayRef shape) {
  if (!at::GradMode::is_enabled() || !grad.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_gemm_4bit_transposed(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                     nested_blocksize, quant_type, shape);
  }
  return Gemm4bitTransposed::apply(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                   nested_blocksize, quant_type, shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("gemm_4bit", &gemm_4bit_autograd);
  m.impl("gemm_4bit_transposed", &gemm_4bit_transposed_autograd);
}

}  // namespace qlora
