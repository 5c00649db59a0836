// CPU kernels of LoRA's dropout (lora_dropout, lora_dropout_add): the mask of qlora/dropout.h, the
// same draws as the CUDA kernels, so that a mask made on one device is the mask on the other.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "qlora/dropout.h"
#include "qlora/format.h"

namespace qlora::cpu {
namespace {

// out[i] = x[i] * keep(i) * scale (+ base[i], rounded after the product as base + dropout(x) is).
template <typename T>
void dropout_kernel(const T* x, const T* base, T* out, int64_t n, uint64_t seed, uint64_t threshold, double p) {
  using Acc = at::opmath_type<T>;  // float for float16 / bfloat16, as torch's dropout computes
  const Acc scale = static_cast<Acc>(dropout_scale(p));
  const int64_t groups = ceil_div(n, 4);
  at::parallel_for(0, groups, 4096, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const Philox4 draw = philox4x32_10(seed, static_cast<uint64_t>(g));
      for (int j = 0; j < 4; ++j) {
        const int64_t i = 4 * g + j;
        if (i >= n) break;
        const Acc keep = draw.v[j] >= threshold ? scale : Acc(0);
        const T dropped = static_cast<T>(static_cast<Acc>(x[i]) * keep);
        out[i] = base == nullptr ? dropped : static_cast<T>(static_cast<Acc>(base[i]) + static_cast<Acc>(dropped));
      }
    }
  });
}

at::Tensor dropout_cpu(const char* op, const at::Tensor& base_in, const at::Tensor& x_in, const at::Tensor& seed,
                       double p) {
  check_lora_dropout_args(op, x_in, seed, p, base_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor base = base_in.defined() ? base_in.contiguous() : base_in;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cpu", [&] {
    dropout_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), base.defined() ? base.const_data_ptr<scalar_t>() : nullptr,
                             out.data_ptr<scalar_t>(), x.numel(), seed_value, dropout_threshold(p), p);
  });
  return out;
}

at::Tensor lora_dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p) {
  return dropout_cpu("lora_dropout", at::Tensor(), x, seed, p);
}

at::Tensor lora_dropout_add_cpu(const at::Tensor& base, const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK_VALUE(base.defined(), "lora_dropout_add: base must be a tensor");
  return dropout_cpu("lora_dropout_add", base, x, seed, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("lora_dropout", &lora_dropout_cpu);
  m.impl("lora_dropout_add", &lora_dropout_add_cpu);
}

}  // namespace qlora::cpu
