// CUDA kernels of LoRA's dropout (lora_dropout, lora_dropout_add): the mask of qlora/dropout.h, the
// CPU kernels' draws to the bit. One thread draws four values of Philox4x32-10 and masks the four
// elements they belong to, with one vector load per input; the seed is read on the device, so that a
// CUDA graph replays with the seed tensor's new value rather than the one of its capture.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "qlora/dropout.h"
#include "qlora/format.h"
#include "qlora/gemm_4bit_cuda.h"

namespace qlora::cuda {
namespace {

constexpr int kDropoutThreads = 256;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// out[i] = x[i] * keep(i) * scale (+ base[i], rounded after the product as base + dropout(x) is).
template <typename T, bool kVector>
__global__ void __launch_bounds__(kDropoutThreads)
    dropout_kernel(const T* __restrict__ x, const T* __restrict__ base, T* __restrict__ out, int64_t n,
                   const int64_t* __restrict__ seed_ptr, uint64_t threshold, at::opmath_type<T> scale) {
  using Acc = at::opmath_type<T>;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const Philox4 draw = philox4x32_10(seed, static_cast<uint64_t>(g));
    const int64_t i0 = 4 * g;
    if (kVector && i0 + 4 <= n) {
      const Vec4<T> xv = *reinterpret_cast<const Vec4<T>*>(x + i0);
      Vec4<T> bv;
      if (base != nullptr) bv = *reinterpret_cast<const Vec4<T>*>(base + i0);
      Vec4<T> ov;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const T dropped = static_cast<T>(static_cast<Acc>(xv.v[j]) * (draw.v[j] >= threshold ? scale : Acc(0)));
        ov.v[j] = base == nullptr ? dropped : static_cast<T>(static_cast<Acc>(bv.v[j]) + static_cast<Acc>(dropped));
      }
      *reinterpret_cast<Vec4<T>*>(out + i0) = ov;
    } else {
      for (int j = 0; j < 4 && i0 + j < n; ++j) {
        const T dropped = static_cast<T>(static_cast<Acc>(x[i0 + j]) * (draw.v[j] >= threshold ? scale : Acc(0)));
        out[i0 + j] =
            base == nullptr ? dropped : static_cast<T>(static_cast<Acc>(base[i0 + j]) + static_cast<Acc>(dropped));
      }
    }
  }
}

bool aligned_for_vec4(const void* p, int64_t element_size) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * element_size) == 0;
}

at::Tensor dropout_cuda(const char* op, const at::Tensor& base_in, const at::Tensor& x_in, const at::Tensor& seed,
                        double p) {
  check_lora_dropout_args(op, x_in, seed, p, base_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor base = base_in.defined() ? base_in.contiguous() : base_in;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int64_t groups = ceil_div(n, 4);
  const int sms = device_limits(x.get_device()).sms;
  // Eight CTAs of 256 threads an SM fill it; the grid-stride loop covers the rest.
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(groups, kDropoutThreads), int64_t{sms} * 8));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* base_ptr = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t size = static_cast<int64_t>(sizeof(scalar_t));
    const bool vector = aligned_for_vec4(x_ptr, size) && aligned_for_vec4(base_ptr, size) &&
                        aligned_for_vec4(out_ptr, size);
    const auto kernel = vector ? dropout_kernel<scalar_t, true> : dropout_kernel<scalar_t, false>;
    kernel<<<grid, kDropoutThreads, 0, stream>>>(x_ptr, base_ptr, out_ptr, n, seed.const_data_ptr<int64_t>(),
                                                 dropout_threshold(p), static_cast<Acc>(dropout_scale(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lora_dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  return dropout_cuda("lora_dropout", at::Tensor(), x, seed, p);
}

at::Tensor lora_dropout_add_cuda(const at::Tensor& base, const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK_VALUE(base.defined(), "lora_dropout_add: base must be a tensor");
  return dropout_cuda("lora_dropout_add", base, x, seed, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("lora_dropout", &lora_dropout_cuda);
  m.impl("lora_dropout_add", &lora_dropout_add_cuda);
}

}  // namespace qlora::cuda
