// CPU kernels of qlora::silu_mul and qlora::silu_mul_backward (the arithmetic: csrc/silu_mul.cpp),
// element by element over contiguous operands.
#include "qlora/silu_mul.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace qlora::cpu {
namespace {

constexpr int64_t kGrain = 32768;

template <typename T>
void silu_mul_kernel(const SiluMulOperands& a) {
  using Acc = at::opmath_type<T>;
  const T* gate = a.gate.const_data_ptr<T>();
  const T* up = a.up.const_data_ptr<T>();
  T* out = a.out.data_ptr<T>();
  at::parallel_for(0, a.gate.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Acc g = static_cast<Acc>(gate[i]);
      out[i] = static_cast<T>(g / (Acc(1) + std::exp(-g)) * static_cast<Acc>(up[i]));
    }
  });
}

template <typename T>
void silu_mul_backward_kernel(const SiluMulOperands& a) {
  using Acc = at::opmath_type<T>;
  const T* grad = a.grad.const_data_ptr<T>();
  const T* gate = a.gate.const_data_ptr<T>();
  const T* up = a.up.const_data_ptr<T>();
  T* grad_gate = a.out.data_ptr<T>();
  T* grad_up = a.grad_up.data_ptr<T>();
  at::parallel_for(0, a.gate.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Acc g = static_cast<Acc>(gate[i]), dy = static_cast<Acc>(grad[i]);
      const Acc s = Acc(1) / (Acc(1) + std::exp(-g));
      grad_gate[i] = static_cast<T>(dy * static_cast<Acc>(up[i]) * (s * (Acc(1) + g * (Acc(1) - s))));
      grad_up[i] = static_cast<T>(dy * (g * s));
    }
  });
}

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  const SiluMulOperands a = silu_mul_operands(gate, up, std::nullopt);
  if (a.out.numel() == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "silu_mul_cpu",
                                  [&] { silu_mul_kernel<scalar_t>(a); });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                         const at::Tensor& up) {
  const SiluMulOperands a = silu_mul_operands(gate, up, grad);
  if (a.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "silu_mul_backward_cpu",
                                    [&] { silu_mul_backward_kernel<scalar_t>(a); });
  }
  return {a.out, a.grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("silu_mul_backward", &silu_mul_backward_cpu);
}

}  // namespace qlora::cpu
