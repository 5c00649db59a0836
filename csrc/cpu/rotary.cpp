// CPU kernel of qlora::rotary_embedding (the map and its transpose: csrc/rotary.cpp), row by row of
// x's first three dimensions, each row read through its own strides.
#include "qlora/rotary.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace qlora::cpu {
namespace {

// A row's offset in a tensor of strides st (in elements) and sizes [., H, S, .].
struct RowIndex {
  int64_t H, S;
  int64_t offset(int64_t row, const int64_t* st) const {
    const int64_t s = row % S, t = row / S;
    return (t / H) * st[0] + (t % H) * st[1] + s * st[2];
  }
};

template <typename T, bool kBackward>
void rotary_kernel(const RotaryOperands& a) {
  using Acc = at::opmath_type<T>;  // float for 16-bit types, double for float64
  const T* x = a.x.const_data_ptr<T>();
  const T* cos = a.cos.const_data_ptr<T>();
  const T* sin = a.sin.const_data_ptr<T>();
  T* out = a.out.data_ptr<T>();
  const RowIndex index{a.x.size(1), a.x.size(2)};
  const int64_t rows = a.x.size(0) * a.x.size(1) * a.x.size(2), h = a.x.size(3) / 2;
  const int64_t *xs = a.x.strides().data(), *cs = a.cos.strides().data(), *ss = a.sin.strides().data(),
                *os = a.out.strides().data();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / h), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + index.offset(r, xs);
      const T* cr = cos + index.offset(r, cs);
      const T* sr = sin + index.offset(r, ss);
      T* o = out + index.offset(r, os);
      for (int64_t i = 0; i < h; ++i) {
        const Acc x1 = static_cast<Acc>(xr[i]), x2 = static_cast<Acc>(xr[i + h]);
        const Acc c1 = static_cast<Acc>(cr[i]), c2 = static_cast<Acc>(cr[i + h]);
        const Acc s1 = static_cast<Acc>(sr[i]), s2 = static_cast<Acc>(sr[i + h]);
        if constexpr (kBackward) {
          o[i] = static_cast<T>(x1 * c1 + x2 * s2);
          o[i + h] = static_cast<T>(x2 * c2 - x1 * s1);
        } else {
          o[i] = static_cast<T>(x1 * c1 - x2 * s1);
          o[i + h] = static_cast<T>(x2 * c2 + x1 * s2);
        }
      }
    }
  });
}

at::Tensor rotary_embedding_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const RotaryOperands a = rotary_operands(x, cos, sin);
  if (a.out.numel() == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_embedding_cpu", [&] {
    (backward ? rotary_kernel<scalar_t, true> : rotary_kernel<scalar_t, false>)(a);
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("rotary_embedding", &rotary_embedding_cpu); }

}  // namespace qlora::cpu
