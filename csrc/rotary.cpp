// qlora::rotary_embedding's argument checks and operand layout (qlora/rotary.h), and its autograd.
//
// Per pair (i, i + h) of x's last dimension, h = D / 2, the forward is the 2x2 map
//   [y_i; y_i+h] = [[cos_i, -sin_i], [sin_i+h, cos_i+h]] [x_i; x_i+h]
// (transformers' q * cos + rotate_half(q) * sin), so the gradient of x is its transpose applied to g:
//   [dx_i; dx_i+h] = [[cos_i, sin_i+h], [-sin_i, cos_i+h]] [g_i; g_i+h],
// the op with backward=True; the halves of sin need not be equal. That map is linear in g and its own
// transpose is the forward, so the backward goes through the same Function with the flag flipped and
// every higher derivative follows.
#include "qlora/rotary.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <utility>

#include "qlora/format.h"

namespace qlora {

RotaryOperands rotary_operands(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "rotary_embedding";
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
                   ": x must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [batch, heads, seq, head_dim], got shape ", x.sizes());
  const int64_t D = x.size(3);
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0, op, ": x's last dimension (head_dim) must be even and positive, got ", D);
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, {&sin, "sin"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, op, ": ", name, " must have x's dtype (", dtype, "), got ",
                     t->scalar_type());
    check_same_device(*t, x, op, name, "x");
    TORCH_CHECK_VALUE(at::is_expandable_to(t->sizes(), x.sizes()), op, ": ", name, " of shape ", t->sizes(),
                      " does not broadcast to x's shape ", x.sizes(), " (typically [batch or 1, 1, seq, ", D, "])");
  }
  // The kernels step through the last dimension with stride 1 and index the other three by strides.
  const auto expanded = [&](const at::Tensor& t) {
    at::Tensor e = t.expand(x.sizes());
    return e.stride(3) == 1 ? e : e.contiguous();
  };
  at::Tensor out = at::empty_like(x);
  // empty_like keeps a dense x's layout, which may not have the last dimension innermost (the fake
  // kernel in python/qlora_ext/_ops.py makes the same choice).
  if (out.stride(3) != 1) out = at::empty(x.sizes(), x.options());
  return {x.stride(3) == 1 ? x : x.contiguous(), expanded(cos), expanded(sin), out};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::rotary_embedding", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(x, cos, sin, backward);
}

class RotaryEmbedding : public torch::autograd::Function<RotaryEmbedding> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool backward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["backward"] = backward;
    return call_rotary_embedding(x, cos, sin, backward);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    // Through the dispatcher's autograd kernel: under create_graph this records the next derivative.
    out[0] = call_rotary_embedding(grads[0], saved[0], saved[1], !ctx->saved_data["backward"].toBool());
    return out;
  }
};

at::Tensor rotary_embedding_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const bool grad_mode = at::GradMode::is_enabled();
  TORCH_CHECK_VALUE(!grad_mode || !(cos.requires_grad() || sin.requires_grad()),
                    "rotary_embedding: cos and sin are not differentiable; detach them (they are functions of the "
                    "positions only) or compute the rotation with torch ops where their gradient is needed");
  if (!grad_mode || !x.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_rotary_embedding(x, cos, sin, backward);
  }
  return RotaryEmbedding::apply(x, cos, sin, backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) { m.impl("rotary_embedding", &rotary_embedding_autograd); }

}  // namespace qlora
