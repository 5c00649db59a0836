// The QLoRA layer op (qlora::lora_linear) for every backend, built from the other ops, and the
// autograd of it and of LoRA's dropout.
//
// y = x W^T + bias + s (drop(x) A^T) B^T with W frozen in 4 bits. The forward keeps x, the
// down-projection drop(x) A^T ([M, r], r << K) and the 8-byte seed; the backward regenerates the
// mask from the seed and needs no float copy of W:
//   dB = s dY^T down,  d_down = s dY B,  dA = d_down^T drop(x),  dX = dY W + drop'(d_down A),
// where drop' applies the same mask and scale. The up-projection accumulates into the base output
// (addmm with beta = 1: no separate pass over [M, N]); with dropout, dX's adapter term is added by
// lora_dropout_add in one pass. A and B may be float32 while x is bfloat16 or float16: they are cast
// for the products (r x K and N x r, small) and their gradients come back in their own dtypes.
#include "qlora/lora.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "qlora/format.h"
#include "qlora/op_calls.h"

namespace qlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_lora_dropout(const at::Tensor& x, const at::Tensor& seed, double p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::lora_dropout", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, seed, p);
}

at::Tensor call_lora_dropout_add(const at::Tensor& base, const at::Tensor& x, const at::Tensor& seed, double p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::lora_dropout_add", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(base, x, seed, p);
}

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }
OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

at::Tensor call_lora_down(const at::Tensor& x, const at::Tensor& lora_A, const OptTensor& seed, double p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::lora_down", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, double)>();
  return op.call(x, lora_A, seed, p);
}

at::Tensor call_lora_grad_A(const at::Tensor& grad_down, const at::Tensor& x, const OptTensor& seed, double p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::lora_grad_A", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, double)>();
  return op.call(grad_down, x, seed, p);
}

at::Tensor call_lora_dropout_add_mm(const at::Tensor& base, const at::Tensor& grad_down, const at::Tensor& lora_A,
                                    const OptTensor& seed, double p) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::lora_dropout_add_mm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double)>();
  return op.call(base, grad_down, lora_A, seed, p);
}

}  // namespace

// What lora_linear checks beyond gemm_4bit's own checks of x, the weight and the bias.
void check_lora_linear_args(const char* op, const at::Tensor& x, c10::SymIntArrayRef shape, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, double dropout_p, const OptTensor& seed) {
  TORCH_CHECK_VALUE(shape.size() == 2, op, ": the weight's shape must be [out_features, in_features], got ", shape);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t N = shape[0].guard_int(__FILE__, __LINE__);
  const int64_t K = shape[1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK_TYPE(at::isFloatingType(lora_A.scalar_type()), op, ": lora_A must be a float tensor, got ",
                   lora_A.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(lora_B.scalar_type()), op, ": lora_B must be a float tensor, got ",
                   lora_B.scalar_type());
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(0) >= 1 && lora_A.size(1) == K, op,
                    ": lora_A must have shape [r, ", K, "] (r >= 1, in_features ", K, "), got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r, op, ": lora_B must have shape [",
                    N, ", ", r, "] (out_features, lora_A's rank), got ", lora_B.sizes());
  TORCH_CHECK_VALUE(lora_A.device() == x.device(), op, ": lora_A is on ", lora_A.device(), " but x is on ", x.device(),
                    "; move them to one device");
  TORCH_CHECK_VALUE(lora_B.device() == x.device(), op, ": lora_B is on ", lora_B.device(), " but x is on ", x.device(),
                    "; move them to one device");
  TORCH_CHECK_VALUE(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK_VALUE(dropout_p == 0.0 || defined(seed), op, ": dropout_p is ", dropout_p,
                    " but seed is None; pass the dropout seed (an int64 tensor of one element on x's device)");
  if (defined(seed)) check_seed(op, *seed, x, "x");
}

namespace {

// The products' dtype: x's; the adapters are cast to it (a no-op when they have it already).
struct Adapters {
  at::Tensor A, B;
};
// Only where needed: an op below autograd may not return its input, which at::to and
// at::contiguous do when there is nothing to change (opcheck's schema test flags it).
at::Tensor with_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }
at::Tensor contiguous(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

Adapters adapters_in(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  return {with_dtype(lora_A, x.scalar_type()), with_dtype(lora_B, x.scalar_type())};
}

// alpha * a @ b in one product (cuBLAS / ATen scale inside the GEMM: no pass over the result).
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) return at::mm(a, b);
  // beta = 0: the 0-dim self is neither read nor copied (so it needs no fill either).
  return at::addmm(at::empty({}, a.options()), a, b, /*beta=*/0, /*alpha=*/alpha);
}

std::tuple<at::Tensor, at::Tensor> call_lora_linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
    c10::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, const OptTensor& seed) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::lora_linear_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, int64_t, int64_t, c10::string_view, c10::SymIntArrayRef, const OptTensor&,
              const at::Tensor&, const at::Tensor&, double, double, const OptTensor&)>();
  return op.call(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape,
                 bias, lora_A, lora_B, scaling, dropout_p, seed);
}

// The op's kernel below autograd, for every backend (CPU, CUDA, Meta).
at::Tensor lora_linear_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                 const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                                 int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                                 c10::SymIntArrayRef shape, const OptTensor& bias, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, double scaling, double dropout_p, const OptTensor& seed) {
  return std::get<0>(call_lora_linear_forward(x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                              nested_blocksize, quant_type, shape, bias, lora_A, lora_B, scaling,
                                              dropout_p, seed));
}

class LoraLinear : public torch::autograd::Function<LoraLinear> {
 public:
  // Positions of the arguments in forward's list (and of their gradients in backward's result).
  static constexpr size_t kX = 0, kBias = 10, kA = 11, kB = 12, kArgs = 16;

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const OptTensor& nested_absmax, const OptTensor& nested_code,
                            const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                            c10::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                            const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, down] =
        call_lora_linear_forward(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                 quant_type, shape, bias, lora_A, lora_B, scaling, dropout_p, seed);
    // x itself (no copy), the [M, r] down-projection and the seed; A and B are the module's own.
    save_weight_state(ctx, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
                      shape, {x, down, lora_A, lora_B, dropout_p > 0.0 ? *seed : at::Tensor()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    // Autograd's edges count the defined tensors among the arguments before each one.
    const int64_t state_edges = 3 + defined(nested_absmax) + defined(nested_code) + defined(offset);
    ctx->saved_data["has_bias"] = defined(bias);
    ctx->saved_data["bias_edge"] = state_edges;
    ctx->saved_data["a_edge"] = state_edges + defined(bias);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The saved down-projection carries no graph, so the gradients' own gradients would be wrong.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "lora_linear: double backward (create_graph=True) is not supported; the first backward is");
    variable_list saved;
    const WeightState w = load_weight_state(ctx, &saved);
    const at::Tensor &x = saved[0], &down = saved[1], &lora_A = saved[2], &lora_B = saved[3], &seed = saved[4];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const int64_t a_edge = ctx->saved_data["a_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_A = ctx->needs_input_grad(static_cast<size_t>(a_edge));
    const bool need_B = ctx->needs_input_grad(static_cast<size_t>(a_edge + 1));
    const bool need_bias = ctx->saved_data["has_bias"].toBool() &&
                           ctx->needs_input_grad(static_cast<size_t>(ctx->saved_data["bias_edge"].toInt()));
    variable_list out(kArgs);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const int64_t N = w.shape[0].guard_int(__FILE__, __LINE__);
    const int64_t K = w.shape[1].guard_int(__FILE__, __LINE__);
    const at::Tensor grad2 = grad.reshape({-1, N});
    const at::Tensor x2 = contiguous(x.reshape({-1, K}));
    const OptTensor optional_seed = optional_of(seed);
    const Adapters ad = adapters_in(x, lora_A, lora_B);
    if (need_B) out[kB] = with_dtype(scaled_mm(grad2.t(), down, scaling), lora_B.scalar_type());
    if (need_A || need_x) {
      const at::Tensor grad_down = scaled_mm(grad2, ad.B, scaling);  // [M, r]
      if (need_A) out[kA] = with_dtype(call_lora_grad_A(grad_down, x2, optional_seed, dropout_p), lora_A.scalar_type());
      if (need_x) {
        at::Tensor dx =
            contiguous(call_gemm_4bit_transposed(grad, w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset,
                                                 w.blocksize, w.nested_blocksize, w.quant_type, w.shape));
        if (dropout_p > 0.0) {
          dx = call_lora_dropout_add_mm(dx.view({-1, K}), grad_down, ad.A, optional_seed, dropout_p);
        } else {
          dx.view({-1, K}).addmm_(grad_down, ad.A);
        }
        out[kX] = dx.view(x.sizes());
      }
    }
    if (need_bias) out[kBias] = grad2.sum(0);
    return out;
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                                int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                                c10::SymIntArrayRef shape, const OptTensor& bias, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, double scaling, double dropout_p, const OptTensor& seed) {
  const bool wants_grad =
      x.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad() || (defined(bias) && bias->requires_grad());
  if (!at::GradMode::is_enabled() || !wants_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lora_linear_composite(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                 quant_type, shape, bias, lora_A, lora_B, scaling, dropout_p, seed);
  }
  return LoraLinear::apply(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                           quant_type, shape, bias, lora_A, lora_B, scaling, dropout_p, seed);
}

// d lora_dropout(x)/dx applies the same mask and scale to the gradient; lora_dropout_add passes the
// gradient to base unchanged.
class LoraDropout : public torch::autograd::Function<LoraDropout> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const OptTensor& base, const at::Tensor& x, const at::Tensor& seed,
                            double p) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    ctx->saved_data["has_base"] = defined(base);
    return defined(base) ? call_lora_dropout_add(*base, x, seed, p) : call_lora_dropout(x, seed, p);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor seed = ctx->get_saved_variables()[0];
    const bool has_base = ctx->saved_data["has_base"].toBool();
    variable_list out(4);
    if (!grads[0].defined()) return out;
    // Edges: base (when given), x, seed.
    if (has_base && ctx->needs_input_grad(0)) out[0] = grads[0];
    if (ctx->needs_input_grad(has_base ? 1 : 0)) {
      out[1] = call_lora_dropout(grads[0], seed, ctx->saved_data["p"].toDouble());
    }
    return out;
  }
};

at::Tensor lora_dropout_autograd(const at::Tensor& x, const at::Tensor& seed, double p) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_lora_dropout(x, seed, p);
  }
  return LoraDropout::apply(OptTensor(), x, seed, p);
}

at::Tensor lora_dropout_add_autograd(const at::Tensor& base, const at::Tensor& x, const at::Tensor& seed, double p) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || base.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_lora_dropout_add(base, x, seed, p);
  }
  return LoraDropout::apply(OptTensor(base), x, seed, p);
}

}  // namespace

int64_t check_lora_product_args(const char* op, const at::Tensor& x, const char* x_name, const at::Tensor& A,
                                const at::Tensor& grad_down, const OptTensor& seed, double p) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", x_name, " must be a float tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", x_name, " must be 2-D [M, K], got shape ", x.sizes());
  const auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have ", x_name, "'s dtype (",
                     x.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but ", x_name, " is on ",
                      x.device(), "; move them to one device");
  };
  int64_t r = -1;
  if (A.defined()) {
    same(A, "lora_A");
    TORCH_CHECK_VALUE(A.size(1) == x.size(1), op, ": lora_A must have shape [r, ", x.size(1), "], got ", A.sizes());
    r = A.size(0);
  }
  if (grad_down.defined()) {
    same(grad_down, "grad_down");
    TORCH_CHECK_VALUE(grad_down.size(0) == x.size(0) && (r < 0 || grad_down.size(1) == r), op,
                      ": grad_down must have shape [", x.size(0), ", ", r < 0 ? std::string("r") : std::to_string(r),
                      "], got ", grad_down.sizes());
    r = grad_down.size(1);
  }
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", p);
  TORCH_CHECK_VALUE(p == 0.0 || defined(seed), op, ": p is ", p, " but seed is None");
  // Checked first in every backend's kernel, also where p = 0 leaves the seed unused: a CUDA seed
  // beside CPU tensors dispatches to the CUDA kernel, whose device guard would otherwise fail with a
  // message naming no argument.
  if (defined(seed)) check_seed(op, *seed, x, x_name);
  return r;
}

at::Tensor lora_down_composite(const at::Tensor& x, const at::Tensor& lora_A, const OptTensor& seed, double p) {
  check_lora_product_args("lora_down", x, "x", lora_A, at::Tensor(), seed, p);
  return at::mm(p > 0.0 ? call_lora_dropout(x, *seed, p) : x, lora_A.t());
}

at::Tensor lora_grad_A_composite(const at::Tensor& grad_down, const at::Tensor& x, const OptTensor& seed, double p) {
  check_lora_product_args("lora_grad_A", x, "x", at::Tensor(), grad_down, seed, p);
  return at::mm(grad_down.t(), p > 0.0 ? call_lora_dropout(x, *seed, p) : x);
}

at::Tensor lora_dropout_add_mm_composite(const at::Tensor& base, const at::Tensor& grad_down, const at::Tensor& lora_A,
                                         const OptTensor& seed, double p) {
  check_lora_product_args("lora_dropout_add_mm", base, "base", lora_A, grad_down, seed, p);
  if (p == 0.0) return at::addmm(base, grad_down, lora_A);
  return call_lora_dropout_add(base, at::mm(grad_down, lora_A), *seed, p);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_composite(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
    c10::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, const OptTensor& seed) {
  check_lora_linear_args("lora_linear", x, shape, lora_A, lora_B, scaling, dropout_p, seed);
  at::Tensor y = contiguous(call_gemm_4bit(x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                           nested_blocksize, quant_type, shape, bias));
  const int64_t N = shape[0].guard_int(__FILE__, __LINE__);
  const int64_t K = shape[1].guard_int(__FILE__, __LINE__);
  const Adapters ad = adapters_in(x, lora_A, lora_B);
  at::Tensor down = call_lora_down(contiguous(x.reshape({-1, K})), ad.A, seed, dropout_p);
  y.view({-1, N}).addmm_(down, ad.B.t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, down};
}

int64_t check_lora_linear_indexed_args(const at::Tensor& x, c10::SymIntArrayRef shape, const at::Tensor& lora_A,
                                       const at::Tensor& lora_B, c10::ArrayRef<double> scaling,
                                       const at::Tensor& adapter_index) {
  const char* op = "lora_linear_indexed";
  TORCH_CHECK_VALUE(shape.size() == 2, op, ": the weight's shape must be [out_features, in_features], got ", shape);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t N = shape[0].guard_int(__FILE__, __LINE__);
  const int64_t K = shape[1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK_TYPE(at::isFloatingType(lora_A.scalar_type()) && at::isFloatingType(lora_B.scalar_type()), op,
                   ": lora_A and lora_B must be float tensors, got ", lora_A.scalar_type(), " and ",
                   lora_B.scalar_type());
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1 && lora_A.size(2) == K, op,
                    ": lora_A must have shape [adapters, r, ", K, "] (the adapters' A stacked, in_features ", K,
                    "), got ", lora_A.sizes());
  const int64_t adapters = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == adapters && lora_B.size(1) == N && lora_B.size(2) == r, op,
                    ": lora_B must have shape [", adapters, ", ", N, ", ", r,
                    "] (adapters, out_features, lora_A's rank), got ", lora_B.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(scaling.size()) == adapters, op, ": scaling must have one value an adapter (",
                    adapters, "), got ", scaling.size());
  for (double s : scaling) TORCH_CHECK_VALUE(std::isfinite(s), op, ": scaling must be finite, got ", s);
  TORCH_CHECK_TYPE(adapter_index.scalar_type() == at::kLong, op, ": adapter_index must be int64, got ",
                   adapter_index.scalar_type());
  int64_t M = 1;  // x's rows: its leading dimensions
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  TORCH_CHECK_VALUE(adapter_index.numel() == M, op, ": adapter_index must have one entry a row of x (", M, "), got ",
                    adapter_index.numel());
  for (const auto& [t, name] : {std::pair{&lora_A, "lora_A"}, {&lora_B, "lora_B"}, {&adapter_index, "adapter_index"}}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device(),
                      "; move them to one device");
  }
  return adapters;
}

at::Tensor lora_linear_indexed_composite(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                         const OptTensor& nested_absmax, const OptTensor& nested_code,
                                         const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                                         c10::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& bias,
                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                         c10::ArrayRef<double> scaling, const at::Tensor& adapter_index) {
  const int64_t adapters = check_lora_linear_indexed_args(x, shape, lora_A, lora_B, scaling, adapter_index);
  at::Tensor y = contiguous(call_gemm_4bit(x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                           nested_blocksize, quant_type, shape, bias));
  const int64_t N = shape[0].guard_int(__FILE__, __LINE__);
  const int64_t K = shape[1].guard_int(__FILE__, __LINE__);
  const int64_t M = adapter_index.numel();
  if (y.numel() == 0 || K == 0) return y;
  const at::Tensor index = adapter_index.reshape({M});
  // Checked on the device, without a synchronization (a CPU tensor raises here).
  at::_assert_async(at::logical_and(index >= -1, index < adapters).all(),
                    "lora_linear_indexed: adapter_index has an entry outside [-1, adapters)");
  // Adapter by adapter, each over every row with the rows of other adapters zeroed by selection (not
  // by a product with 0: an inf there would be a NaN): no synchronization to gather a sub-batch, and
  // the scalings go in as the products' alpha, so a CUDA graph captures it all.
  const Adapters ad = adapters_in(x, lora_A, lora_B);
  const at::Tensor x2 = contiguous(x.reshape({M, K}));
  at::Tensor y2 = y.view({M, N});
  const at::Tensor zero = at::zeros({}, x2.options());
  for (int64_t a = 0; a < adapters; ++a) {
    const at::Tensor down = at::where((index == a).unsqueeze(1), at::mm(x2, ad.A[a].t()), zero);
    y2.addmm_(down, ad.B[a].t(), /*beta=*/1, /*alpha=*/scaling[a]);
  }
  return y;
}

namespace {

at::Tensor lora_linear_indexed_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                        const OptTensor& nested_absmax, const OptTensor& nested_code,
                                        const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                                        c10::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& bias,
                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                        c10::ArrayRef<double> scaling, const at::Tensor& adapter_index) {
  const bool wants_grad =
      x.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad() || (defined(bias) && bias->requires_grad());
  TORCH_CHECK(!at::GradMode::is_enabled() || !wants_grad,
              "lora_linear_indexed: a batch of several adapters is inference only (as PEFT's adapter_names), and "
              "here a tensor requires grad; call it under torch.no_grad() or torch.inference_mode(), or train one "
              "adapter at a time with lora_linear");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::lora_linear_indexed", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, int64_t, int64_t, c10::string_view, c10::SymIntArrayRef, const OptTensor&,
                            const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape,
                 bias, lora_A, lora_B, scaling, adapter_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear_composite);
  m.impl("lora_down", &lora_down_composite);
  m.impl("lora_grad_A", &lora_grad_A_composite);
  m.impl("lora_dropout_add_mm", &lora_dropout_add_mm_composite);
}

// CPU kernels, not composite ones (CUDA has its own, csrc/cuda/lora_decode.cu): the fake kernels are
// python/qlora_ext/_ops.py's, which torch 2.11's dynamic-shape tracing needs (it fails inside a
// composite kernel of an op that returns two tensors).
TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("lora_linear_forward", &lora_linear_forward_composite);
  m.impl("lora_linear_indexed", &lora_linear_indexed_composite);
}

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("lora_linear_indexed", &lora_linear_indexed_autograd);
  m.impl("lora_dropout", &lora_dropout_autograd);
  m.impl("lora_dropout_add", &lora_dropout_add_autograd);
}

}  // namespace qlora
