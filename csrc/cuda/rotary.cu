// CUDA kernel of qlora::rotary_embedding (the map and its transpose: csrc/rotary.cpp). One thread a
// group of pairs (i, i + h) of one row of x's first three dimensions: four pairs, read as two vector
// loads per operand (8 bytes each for 16-bit types), where h % 4 == 0 and every pointer and row
// stride keeps those loads aligned; one pair otherwise. Memory bound: x, cos, sin read once and out
// written once, in float (double for float64) rounded once, the CPU kernel's arithmetic to the bit.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "qlora/format.h"
#include "qlora/occupancy.h"
#include "qlora/rotary.h"
#include "qlora/vector_access.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;

// The strides of x's first three dimensions in each operand (elements; 0 where cos / sin broadcast).
struct RowStrides {
  int64_t x[3], cos[3], sin[3], out[3];
};

// Each product rounded on its own, never contracted with the sum into an FMA whatever --fmad says:
// the CPU kernel rounds twice, and the two agree to the bit for float32 / float64 too.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ int64_t row_offset(const int64_t* st, int64_t b, int64_t head, int64_t s) {
  return b * st[0] + head * st[1] + s * st[2];
}

template <typename T, int kPairs, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin, T* __restrict__ out,
                  RowStrides st, int64_t heads, int64_t seq, int64_t rows, int64_t h) {
  using Acc = at::opmath_type<T>;
  using V = Vec<T, kPairs>;
  const int64_t groups = h / kPairs;  // a row's
  const int64_t total = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride) {
    const int64_t row = g / groups, i = (g - row * groups) * kPairs;
    const int64_t bh = row / seq, s = row - bh * seq, b = bh / heads, head = bh - b * heads;
    const T* xr = x + row_offset(st.x, b, head, s) + i;
    const T* cr = cos + row_offset(st.cos, b, head, s) + i;
    const T* sr = sin + row_offset(st.sin, b, head, s) + i;
    T* o = out + row_offset(st.out, b, head, s) + i;
    const V x1 = *reinterpret_cast<const V*>(xr), x2 = *reinterpret_cast<const V*>(xr + h);
    const V c1 = *reinterpret_cast<const V*>(cr), c2 = *reinterpret_cast<const V*>(cr + h);
    const V s1 = *reinterpret_cast<const V*>(sr), s2 = *reinterpret_cast<const V*>(sr + h);
    V o1, o2;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const Acc u = static_cast<Acc>(x1.v[j]), w = static_cast<Acc>(x2.v[j]);
      const Acc p = mul_rn(u, static_cast<Acc>(c1.v[j])), q = mul_rn(w, static_cast<Acc>(c2.v[j]));
      if constexpr (kBackward) {
        o1.v[j] = static_cast<T>(p + mul_rn(w, static_cast<Acc>(s2.v[j])));
        o2.v[j] = static_cast<T>(q - mul_rn(u, static_cast<Acc>(s1.v[j])));
      } else {
        o1.v[j] = static_cast<T>(p - mul_rn(w, static_cast<Acc>(s1.v[j])));
        o2.v[j] = static_cast<T>(q + mul_rn(u, static_cast<Acc>(s2.v[j])));
      }
    }
    store_vec(o, o1);
    store_vec(o + h, o2);
  }
}

// Whether every four-element access lands on a 4 * sizeof(T) boundary: element offsets row_offset + i
// and + h are multiples of 4 when h and every stepped row stride are, and the data pointers are aligned.
// float64 (the CPU's dtype) takes the scalar path: no 32-byte word.
bool vector_aligned(const RotaryOperands& a) {
  if (a.x.size(3) / 2 % 4 != 0 || a.x.element_size() > 4) return false;
  for (const at::Tensor* t : {&a.x, &a.cos, &a.sin, &a.out}) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % (4 * t->element_size()) != 0) return false;
    for (int d = 0; d < 3; ++d) {
      if (t->size(d) > 1 && t->stride(d) % 4 != 0) return false;  // a dimension of one is never stepped
    }
  }
  return true;
}

template <typename T, int kPairs>
void launch(const RotaryOperands& a, bool backward, cudaStream_t stream) {
  RowStrides st;
  for (int d = 0; d < 3; ++d) {
    st.x[d] = a.x.stride(d);
    st.cos[d] = a.cos.stride(d);
    st.sin[d] = a.sin.stride(d);
    st.out[d] = a.out.stride(d);
  }
  const int64_t rows = a.x.size(0) * a.x.size(1) * a.x.size(2), h = a.x.size(3) / 2;
  const int64_t threads = rows * (h / kPairs);
  // Eight CTAs of 256 threads an SM fill it; the grid-stride loop covers the rest.
  const int sms = device_limits(a.x.get_device()).sms;
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(threads, kThreads), int64_t{sms} * 8));
  const auto kernel = backward ? rotary_kernel<T, kPairs, true> : rotary_kernel<T, kPairs, false>;
  kernel<<<grid, kThreads, 0, stream>>>(a.x.const_data_ptr<T>(), a.cos.const_data_ptr<T>(), a.sin.const_data_ptr<T>(),
                                        a.out.data_ptr<T>(), st, a.x.size(1), a.x.size(2), rows, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rotary_embedding_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const RotaryOperands a = rotary_operands(x, cos, sin);  // checks the devices before the guard needs x's
  if (a.out.numel() == 0) return a.out;
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.x.get_device()).stream();
  const bool vector = vector_aligned(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_embedding_cuda", [&] {
    if constexpr (sizeof(scalar_t) <= 4) {
      if (vector) return launch<scalar_t, 4>(a, backward, stream);
    }
    launch<scalar_t, 1>(a, backward, stream);
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) { m.impl("rotary_embedding", &rotary_embedding_cuda); }

}  // namespace qlora::cuda
