// CUDA kernels of qlora::silu_mul and qlora::silu_mul_backward (the arithmetic: csrc/silu_mul.cpp).
// Memory bound: each operand read once and each output written once, 16 bytes a thread and step
// where every pointer is 16-byte aligned (8 elements of a 16-bit type, 4 of float32), one element
// otherwise and for the tail; float arithmetic (double for float64) rounded once, with expf (not the
// fast __expf), within a unit of the last place of the CPU kernel's, not to the bit (their exp differ).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "qlora/format.h"
#include "qlora/occupancy.h"
#include "qlora/silu_mul.h"
#include "qlora/vector_access.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

template <typename Acc>
__device__ __forceinline__ Acc silu_times(Acc g, Acc u) {
  return g / (Acc(1) + exp_of(-g)) * u;
}

template <typename Acc>
__device__ __forceinline__ void silu_mul_grads(Acc dy, Acc g, Acc u, Acc& grad_gate, Acc& grad_up) {
  const Acc s = Acc(1) / (Acc(1) + exp_of(-g));
  grad_gate = dy * u * (s * (Acc(1) + g * (Acc(1) - s)));
  grad_up = dy * (g * s);
}

// Elements [0, vectors * N) N at a time (N = 16 bytes, or 0: none), then the rest one at a time,
// over a grid-stride loop.
template <typename T, int N, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    silu_mul_kernel(const T* __restrict__ grad, const T* __restrict__ gate, const T* __restrict__ up,
                    T* __restrict__ out, T* __restrict__ grad_up, int64_t n) {
  using Acc = at::opmath_type<T>;
  using V = Vec<T, (N > 0 ? N : 1)>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = n / (N > 0 ? N : n + 1);  // (0 without a vector path)
  if constexpr (N > 0) {
    for (int64_t v = first; v < vectors; v += stride) {
      const V g = reinterpret_cast<const V*>(gate)[v], u = reinterpret_cast<const V*>(up)[v];
      V o;
      if constexpr (kBackward) {
        const V dy = reinterpret_cast<const V*>(grad)[v];
        V ou;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          Acc gg, gu;
          silu_mul_grads(static_cast<Acc>(dy.v[j]), static_cast<Acc>(g.v[j]), static_cast<Acc>(u.v[j]), gg, gu);
          o.v[j] = static_cast<T>(gg);
          ou.v[j] = static_cast<T>(gu);
        }
        store_vec(grad_up + v * N, ou);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j)
          o.v[j] = static_cast<T>(silu_times(static_cast<Acc>(g.v[j]), static_cast<Acc>(u.v[j])));
      }
      store_vec(out + v * N, o);
    }
  }
  for (int64_t i = vectors * N + first; i < n; i += stride) {
    const Acc g = static_cast<Acc>(gate[i]), u = static_cast<Acc>(up[i]);
    if constexpr (kBackward) {
      Acc gg, gu;
      silu_mul_grads(static_cast<Acc>(grad[i]), g, u, gg, gu);
      out[i] = static_cast<T>(gg);
      grad_up[i] = static_cast<T>(gu);
    } else {
      out[i] = static_cast<T>(silu_times(g, u));
    }
  }
}

bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <typename T, bool kBackward>
void launch(const SiluMulOperands& a, cudaStream_t stream) {
  const int64_t n = a.gate.numel();
  const bool vector = sizeof(T) <= 4 && aligned16(a.gate) && aligned16(a.up) && aligned16(a.grad) && aligned16(a.out) &&
                      aligned16(a.grad_up);
  constexpr int kVec = sizeof(T) <= 4 ? static_cast<int>(16 / sizeof(T)) : 0;
  const int64_t items = vector ? ceil_div(n, int64_t{kVec}) : n;
  // Eight CTAs of 256 threads an SM fill it; the grid-stride loop covers the rest.
  const int sms = device_limits(a.gate.get_device()).sms;
  const int grid =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, kThreads), int64_t{sms} * 8)));
  const T* grad = kBackward ? a.grad.const_data_ptr<T>() : nullptr;
  T* grad_up = kBackward ? a.grad_up.data_ptr<T>() : nullptr;
  const auto kernel = vector ? silu_mul_kernel<T, kVec, kBackward> : silu_mul_kernel<T, 0, kBackward>;
  kernel<<<grid, kThreads, 0, stream>>>(grad, a.gate.const_data_ptr<T>(), a.up.const_data_ptr<T>(), a.out.data_ptr<T>(),
                                        grad_up, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor silu_mul_cuda(const at::Tensor& gate, const at::Tensor& up) {
  const SiluMulOperands a = silu_mul_operands(gate, up, std::nullopt);  // checks the devices before the guard
  if (a.out.numel() == 0) return a.out;
  const c10::cuda::CUDAGuard guard(a.gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.gate.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "silu_mul_cuda",
                                  [&] { launch<scalar_t, false>(a, stream); });
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                          const at::Tensor& up) {
  const SiluMulOperands a = silu_mul_operands(gate, up, grad);
  if (a.out.numel() == 0) return {a.out, a.grad_up};
  const c10::cuda::CUDAGuard guard(a.gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.gate.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "silu_mul_backward_cuda",
                                  [&] { launch<scalar_t, true>(a, stream); });
  return {a.out, a.grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("silu_mul", &silu_mul_cuda);
  m.impl("silu_mul_backward", &silu_mul_backward_cuda);
}

}  // namespace qlora::cuda
