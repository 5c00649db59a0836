// qlora::silu_mul's argument checks and operand layout (qlora/silu_mul.h), and its autograd.
//
// With s = sigmoid(gate) = 1 / (1 + exp(-gate)), the forward is out = gate * s * up (torch's silu is
// gate / (1 + exp(-gate))), and for the output's gradient g
//   grad_gate = g * up * s * (1 + gate * (1 - s)),   grad_up = g * gate * s,
// silu_mul_backward, each computed in float (double for float64) and rounded once. The autograd keeps
// gate and up, not silu(gate): the activation transformers' MLP keeps beside them is not made.
#include "qlora/silu_mul.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "qlora/format.h"

namespace qlora {

SiluMulOperands silu_mul_operands(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& grad) {
  const char* op = grad.has_value() ? "silu_mul_backward" : "silu_mul";
  const at::ScalarType dtype = gate.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
                   ": gate must be float16, bfloat16, float32 or float64, got ", dtype);
  std::vector<std::pair<const at::Tensor*, const char*>> others{{&up, "up"}};
  if (grad.has_value()) others.emplace_back(&*grad, "grad");
  for (const auto& [t, name] : others) {
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, op, ": ", name, " must have gate's dtype (", dtype, "), got ",
                     t->scalar_type());
    check_same_device(*t, gate, op, name, "gate");
    TORCH_CHECK_VALUE(t->sizes() == gate.sizes(), op, ": ", name, " must have gate's shape ", gate.sizes(), ", got ",
                      t->sizes());
  }
  SiluMulOperands a;
  a.gate = gate.contiguous();
  a.up = up.contiguous();
  a.out = at::empty(gate.sizes(), gate.options());
  if (grad.has_value()) {
    a.grad = grad->contiguous();
    a.grad_up = at::empty(gate.sizes(), gate.options());
  }
  return a;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::silu_mul", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(gate, up);
}

std::tuple<at::Tensor, at::Tensor> call_silu_mul_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                          const at::Tensor& up) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::silu_mul_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, gate, up);
}

class SiluMul : public torch::autograd::Function<SiluMul> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up});
    return call_silu_mul(gate, up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    // Through the dispatcher's autograd kernel (the not-implemented fallback below): under
    // create_graph a second derivative raises where it is taken instead of being silently zero.
    auto [grad_gate, grad_up] = call_silu_mul_backward(grads[0], saved[0], saved[1]);
    return {grad_gate, grad_up};
  }
};

at::Tensor silu_mul_autograd(const at::Tensor& gate, const at::Tensor& up) {
  if (!at::GradMode::is_enabled() || !(gate.requires_grad() || up.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_silu_mul(gate, up);
  }
  return SiluMul::apply(gate, up);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("silu_mul", &silu_mul_autograd);
  // No second derivative of silu_mul: an error where one is asked for.
  m.impl("silu_mul_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace qlora
