// CUDA kernels of LoRA's dropout and of the adapter products around it.
//
// lora_dropout, lora_dropout_add: the mask of qlora/dropout.h, the CPU kernels' draws to the bit. One
// thread draws four values of Philox4x32-10 and masks the four elements they belong to, with one
// vector load per input; the seed is read on the device, so that a CUDA graph replays with the seed
// tensor's new value rather than the one of its capture.
//
// lora_down, lora_grad_A (qlora/lora.h): with dropout, the composite form makes a dropped copy of x
// (a pass that writes M x K and one that reads it back). The fused kernels apply the mask where x is
// loaded into shared memory and multiply on the tensor cores (mma.sync m16n8k16, fp32 accumulation):
// each reads x once and writes nothing of its size but the result. Tiles: 64 rows x 64 k a CTA of 4
// warps, each warp 16 rows; the rank (a multiple of 8) is the narrow side. Partial sums over K
// (lora_down) or M (lora_grad_A) go to a float32 buffer, one slice a split, and one more kernel adds
// them in a fixed order: the result is the same bits run to run. Where each runs is fused_applies'.
//
// lora_dropout_add_mm has no fused kernel: cuBLAS makes the product and the dropout kernel adds it to
// base in the product's own buffer (two [M, K] buffers live, not three).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "qlora/dropout.h"
#include "qlora/format.h"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/half_convert.cuh"
#include "qlora/lora.h"
#include "qlora/mma.cuh"

namespace qlora::cuda {
namespace {

constexpr int kDropoutThreads = 256;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// The product rounded on its own, never contracted with the add into an FMA whatever --fmad says:
// the CPU kernel rounds twice, and the two must agree to the bit for float32 / float64 too.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// out[i] = x[i] * keep(i) * scale (+ base[i], rounded after the product as base + dropout(x) is).
// out may be x (each element is read before it is written, by the same thread): no __restrict__ there.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kDropoutThreads)
    dropout_kernel(const T* x, const T* __restrict__ base, T* out, int64_t n, const int64_t* __restrict__ seed_ptr,
                   uint64_t threshold, at::opmath_type<T> scale) {
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
        const T dropped = static_cast<T>(mul_rn(static_cast<Acc>(xv.v[j]), draw.v[j] >= threshold ? scale : Acc(0)));
        ov.v[j] = base == nullptr ? dropped : static_cast<T>(static_cast<Acc>(bv.v[j]) + static_cast<Acc>(dropped));
      }
      *reinterpret_cast<Vec4<T>*>(out + i0) = ov;
    } else {
      for (int j = 0; j < 4 && i0 + j < n; ++j) {
        const T dropped = static_cast<T>(mul_rn(static_cast<Acc>(x[i0 + j]), draw.v[j] >= threshold ? scale : Acc(0)));
        out[i0 + j] =
            base == nullptr ? dropped : static_cast<T>(static_cast<Acc>(base[i0 + j]) + static_cast<Acc>(dropped));
      }
    }
  }
}

bool aligned_for_vec4(const void* p, int64_t element_size) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * element_size) == 0;
}

// out = drop(x) (+ base), all contiguous, of one shape and dtype, on the guarded device; out may be x.
void dropout_into(const at::Tensor& base, const at::Tensor& x, const at::Tensor& out, const at::Tensor& seed,
                  double p) {
  const int64_t n = x.numel();
  if (n == 0) return;
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
    const bool vector =
        aligned_for_vec4(x_ptr, size) && aligned_for_vec4(base_ptr, size) && aligned_for_vec4(out_ptr, size);
    const auto kernel = vector ? dropout_kernel<scalar_t, true> : dropout_kernel<scalar_t, false>;
    kernel<<<grid, kDropoutThreads, 0, stream>>>(x_ptr, base_ptr, out_ptr, n, seed.const_data_ptr<int64_t>(),
                                                 dropout_threshold(p), static_cast<Acc>(dropout_scale(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dropout_cuda(const char* op, const at::Tensor& base_in, const at::Tensor& x_in, const at::Tensor& seed,
                        double p) {
  check_lora_dropout_args(op, x_in, seed, p, base_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor base = base_in.defined() ? base_in.contiguous() : base_in;
  at::Tensor out = at::empty(x.sizes(), x.options());
  dropout_into(base, x, out, seed, p);
  return out;
}

at::Tensor lora_dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  return dropout_cuda("lora_dropout", at::Tensor(), x, seed, p);
}

at::Tensor lora_dropout_add_cuda(const at::Tensor& base, const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK_VALUE(base.defined(), "lora_dropout_add: base must be a tensor");
  return dropout_cuda("lora_dropout_add", base, x, seed, p);
}

// ---------------------------------------------------------------------------------------------
// Fused adapter products

constexpr int kFusedThreads = 128;  // 4 warps, 16 rows each
constexpr int kTile = 64;           // rows of a tile, and k (or m) of a chunk
// Shared rows of 72 elements (144 bytes): 16-byte aligned for the vector stores, and a 32-bit
// fragment load of lane 4g + c lands in bank 4g + c (row pitch 36 words), so none conflict.
constexpr int kPitch = kTile + 8;
constexpr int kMaxFusedRank = 128;  // the ranks the GPU tests cover
// lora_grad_A's fused kernel beat dropout + cuBLAS at r = 16 (1.05-1.21x on the six Llama shapes, M =
// 4096) and lost at r = 64 (0.73-0.89x): bench/results/lora-h100-2026-12-05-83a2cc8.json, mode products.
constexpr int kMaxFusedGradARank = 16;

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ uint32_t load32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Two 16-bit elements of one column, rows i and i + 1, as one fragment register (row i low).
template <typename T>
__device__ __forceinline__ uint32_t column_pair(const T* lo, const T* hi) {
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(lo)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(hi)) << 16);
}

// The dropout of the 8 elements of v, whose first has row-major index i0 (a multiple of 8): the
// lora_dropout kernel's arithmetic, so that the fused and composite forms multiply the same values.
template <typename T>
__device__ __forceinline__ uint4 dropout8(uint4 v, uint64_t seed, int64_t i0, uint64_t threshold, float scale) {
  const Philox4 d0 = philox4x32_10(seed, static_cast<uint64_t>(i0 / 4));
  const Philox4 d1 = philox4x32_10(seed, static_cast<uint64_t>(i0 / 4 + 1));
  T* e = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t draw = j < 4 ? d0.v[j] : d1.v[j - 4];
    e[j] = from_float<T>(to_float(e[j]) * (draw >= threshold ? scale : 0.0f));
  }
  return v;
}

// partial[z][m][j] = sum over this split's k of drop(x)[m][k] * A[j][k]: rows m of the tile
// (blockIdx.x), j of the rank tile (blockIdx.y), k of split z (blockIdx.z).
template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
    lora_down_kernel(const T* __restrict__ x, const T* __restrict__ A, float* __restrict__ partial, int64_t M,
                     int64_t K, int r, int64_t k_per_split, const int64_t* __restrict__ seed_ptr, uint64_t threshold,
                     float scale) {
  __shared__ __align__(16) T xs[kTile][kPitch];
  __shared__ __align__(16) T as[kTile][kPitch];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int j0 = blockIdx.y * kTile;
  const int64_t kbeg = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t kend = min(K, kbeg + k_per_split);
  const uint64_t seed = threshold != 0 ? static_cast<uint64_t>(*seed_ptr) : 0;
  float acc[8][4] = {};
  uint4 xr[4], ar[4];
  // Chunk q = tid + 128 i of a tile: row q / 8, elements 8 (q % 8) .. + 8.
  const auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = tid + kFusedThreads * i, row = q >> 3;
      const int64_t gk = k0 + (q & 7) * 8;
      const bool in_k = gk < kend;
      xr[i] = in_k && m0 + row < M ? load16(x + (m0 + row) * K + gk) : make_uint4(0, 0, 0, 0);
      ar[i] = in_k && j0 + row < r ? load16(A + static_cast<int64_t>(j0 + row) * K + gk) : make_uint4(0, 0, 0, 0);
    }
  };
  const auto store = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = tid + kFusedThreads * i, row = q >> 3, col = (q & 7) * 8;
      uint4 v = xr[i];
      if (threshold != 0 && m0 + row < M && k0 + col < kend)
        v = dropout8<T>(v, seed, (m0 + row) * K + k0 + col, threshold, scale);
      *reinterpret_cast<uint4*>(&xs[row][col]) = v;
      *reinterpret_cast<uint4*>(&as[row][col]) = ar[i];
    }
  };
  const int wr = warp * 16;
  if (kbeg < kend) load(kbeg);
  for (int64_t k0 = kbeg; k0 < kend; k0 += kTile) {
    store(k0);
    __syncthreads();
    if (k0 + kTile < kend) load(k0 + kTile);  // the next chunk's loads fly during the products
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
      const int kk = ks * 16 + 2 * c;
      const uint32_t a[4] = {load32(&xs[wr + g][kk]), load32(&xs[wr + g + 8][kk]), load32(&xs[wr + g][kk + 8]),
                             load32(&xs[wr + g + 8][kk + 8])};
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (j0 + nt * 8 < r) mma_16816<T>(acc[nt], a, load32(&as[nt * 8 + g][kk]), load32(&as[nt * 8 + g][kk + 8]));
      }
    }
    __syncthreads();
  }
  float* out = partial + static_cast<int64_t>(blockIdx.z) * M * r;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wr + g + 8 * h;
      const int j = j0 + nt * 8 + 2 * c;  // r is a multiple of 8: j < r covers j + 1
      if (m < M && j < r) {
        out[m * r + j] = acc[nt][2 * h];
        out[m * r + j + 1] = acc[nt][2 * h + 1];
      }
    }
  }
}

// partial[z][k][j] = sum over this split's m of drop(x)[m][k] * grad_down[m][j] (dA transposed):
// k of the tile (blockIdx.x) are the mma's rows, j of the rank tile (blockIdx.y) its columns, and m
// of split z (blockIdx.z) the reduction; both operands are read down their columns from shared memory.
template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
    lora_grad_A_kernel(const T* __restrict__ grad_down, const T* __restrict__ x, float* __restrict__ partial, int64_t M,
                       int64_t K, int r, int64_t m_per_split, const int64_t* __restrict__ seed_ptr, uint64_t threshold,
                       float scale) {
  __shared__ __align__(16) T xs[kTile][kPitch];  // [m][k]
  __shared__ __align__(16) T gs[kTile][kPitch];  // [m][j]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int j0 = blockIdx.y * kTile;
  const int64_t mbeg = static_cast<int64_t>(blockIdx.z) * m_per_split;
  const int64_t mend = min(M, mbeg + m_per_split);
  const uint64_t seed = threshold != 0 ? static_cast<uint64_t>(*seed_ptr) : 0;
  float acc[8][4] = {};
  uint4 xr[4], gr[4];
  const auto load = [&](int64_t m0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = tid + kFusedThreads * i, row = q >> 3, col = (q & 7) * 8;
      const bool in_m = m0 + row < mend;
      xr[i] = in_m && k0 + col < K ? load16(x + (m0 + row) * K + k0 + col) : make_uint4(0, 0, 0, 0);
      gr[i] = in_m && j0 + col < r ? load16(grad_down + (m0 + row) * r + j0 + col) : make_uint4(0, 0, 0, 0);
    }
  };
  const auto store = [&](int64_t m0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = tid + kFusedThreads * i, row = q >> 3, col = (q & 7) * 8;
      uint4 v = xr[i];
      if (threshold != 0 && m0 + row < mend && k0 + col < K)
        v = dropout8<T>(v, seed, (m0 + row) * K + k0 + col, threshold, scale);
      *reinterpret_cast<uint4*>(&xs[row][col]) = v;
      *reinterpret_cast<uint4*>(&gs[row][col]) = gr[i];
    }
  };
  const int wk = warp * 16;
  if (mbeg < mend) load(mbeg);
  for (int64_t m0 = mbeg; m0 < mend; m0 += kTile) {
    store(m0);
    __syncthreads();
    if (m0 + kTile < mend) load(m0 + kTile);
#pragma unroll
    for (int ms = 0; ms < kTile / 16; ++ms) {
      const int mm = ms * 16 + 2 * c;
      const uint32_t a[4] = {column_pair(&xs[mm][wk + g], &xs[mm + 1][wk + g]),
                             column_pair(&xs[mm][wk + g + 8], &xs[mm + 1][wk + g + 8]),
                             column_pair(&xs[mm + 8][wk + g], &xs[mm + 9][wk + g]),
                             column_pair(&xs[mm + 8][wk + g + 8], &xs[mm + 9][wk + g + 8])};
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (j0 + nt * 8 < r) {
          mma_16816<T>(acc[nt], a, column_pair(&gs[mm][nt * 8 + g], &gs[mm + 1][nt * 8 + g]),
                       column_pair(&gs[mm + 8][nt * 8 + g], &gs[mm + 9][nt * 8 + g]));
        }
      }
    }
    __syncthreads();
  }
  float* out = partial + static_cast<int64_t>(blockIdx.z) * K * r;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t k = k0 + wk + g + 8 * h;
      const int j = j0 + nt * 8 + 2 * c;
      if (k < K && j < r) {
        out[k * r + j] = acc[nt][2 * h];
        out[k * r + j + 1] = acc[nt][2 * h + 1];
      }
    }
  }
}

// out = T(sum over z of partial[z]) in a fixed order; with transpose, partial is [rows][cols] and
// out [cols][rows].
template <typename T>
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                                           int64_t rows, int64_t cols, int splits, bool transpose) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += partial[z * n + i];
    out[transpose ? (i % cols) * rows + i / cols : i] = from_float<T>(s);
  }
}

// Whether the fused kernels take these tensors (all contiguous already): dropout on (without it the
// composite form is one cuBLAS product, nothing to fuse), CUDA's 16-bit floats on an sm_80+ GPU, K
// and r multiples of 8 (16-byte rows, Philox groups that a chunk does not straddle), r up to
// kMaxFusedRank, 16-byte aligned data. lora_down's fused kernel beat dropout + cuBLAS on every shape
// measured (1.05-1.27x, r = 16 and 64: bench/results/lora-h100-2026-12-05-83a2cc8.json).
bool fused_applies(std::initializer_list<const at::Tensor*> tensors, int64_t K, int64_t r, double p) {
  if (p <= 0.0) return false;
  const at::Tensor& first = **tensors.begin();
  if (first.scalar_type() != at::kBFloat16 && first.scalar_type() != at::kHalf) return false;
  if (K % 8 != 0 || r % 8 != 0 || r < 8 || r > kMaxFusedRank) return false;
  if (device_limits(first.get_device()).major < 8) return false;
  for (const at::Tensor* t : tensors) {
    if (!t->is_contiguous() || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
  }
  return true;
}

template <typename F>
void dispatch_half_types(at::ScalarType t, F&& f) {
  if (t == at::kHalf) f(__half{});
  else f(__nv_bfloat16{});
}

// Splits of the reduction so that about four CTAs an SM run: a split is at least one chunk.
int64_t splits_for(int64_t ctas, int64_t chunks, int sms) {
  return std::max<int64_t>(1, std::min<int64_t>(chunks, ceil_div(int64_t{4} * sms, std::max<int64_t>(ctas, 1))));
}

void sum_partials(const at::Tensor& partial, at::Tensor& out, int64_t rows, int64_t cols, int64_t splits,
                  bool transpose, int sms, cudaStream_t stream) {
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(rows * cols, 256), int64_t{sms} * 8));
  dispatch_half_types(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    sum_partials_kernel<T><<<std::max(grid, 1), 256, 0, stream>>>(partial.const_data_ptr<float>(),
                                                                  reinterpret_cast<T*>(out.data_ptr()), rows, cols,
                                                                  static_cast<int>(splits), transpose);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor lora_down_cuda(const at::Tensor& x_in, const at::Tensor& A_in, const std::optional<at::Tensor>& seed,
                          double p) {
  const int64_t r = check_lora_product_args("lora_down", x_in, "x", A_in, at::Tensor(), seed, p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0 || K == 0 || !fused_applies({&x, &A}, K, r, p)) return lora_down_composite(x_in, A_in, seed, p);
  check_lora_dropout_args("lora_down", x, *seed, p, at::Tensor());
  const int sms = device_limits(x.get_device()).sms;
  const int64_t m_tiles = ceil_div(M, kTile), r_tiles = ceil_div(r, kTile), k_chunks = ceil_div(K, kTile);
  const int64_t splits = splits_for(m_tiles * r_tiles, k_chunks, sms);
  const int64_t k_per_split = ceil_div(k_chunks, splits) * kTile;
  const int64_t used_splits = ceil_div(K, k_per_split);
  TORCH_CHECK(m_tiles <= INT32_MAX && used_splits <= 65535, "lora_down: x has too many rows (", M, ") or columns");
  at::Tensor partial = at::empty({used_splits, M, r}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({M, r}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(r_tiles), static_cast<unsigned>(used_splits));
  dispatch_half_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    lora_down_kernel<T><<<grid, kFusedThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()), reinterpret_cast<const T*>(A.const_data_ptr()),
        partial.data_ptr<float>(), M, K, static_cast<int>(r), k_per_split, seed->const_data_ptr<int64_t>(),
        dropout_threshold(p), static_cast<float>(dropout_scale(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sum_partials(partial, out, M, r, used_splits, false, sms, stream);
  return out;
}

at::Tensor lora_grad_A_cuda(const at::Tensor& grad_down_in, const at::Tensor& x_in,
                            const std::optional<at::Tensor>& seed, double p) {
  const int64_t r = check_lora_product_args("lora_grad_A", x_in, "x", at::Tensor(), grad_down_in, seed, p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad_down = grad_down_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0 || K == 0 || r > kMaxFusedGradARank || !fused_applies({&x, &grad_down}, K, r, p)) {
    return lora_grad_A_composite(grad_down_in, x_in, seed, p);
  }
  check_lora_dropout_args("lora_grad_A", x, *seed, p, at::Tensor());
  const int sms = device_limits(x.get_device()).sms;
  const int64_t k_tiles = ceil_div(K, kTile), r_tiles = ceil_div(r, kTile), m_chunks = ceil_div(M, kTile);
  const int64_t splits = splits_for(k_tiles * r_tiles, m_chunks, sms);
  const int64_t m_per_split = ceil_div(m_chunks, splits) * kTile;
  const int64_t used_splits = ceil_div(M, m_per_split);
  TORCH_CHECK(k_tiles <= INT32_MAX && used_splits <= 65535, "lora_grad_A: x has too many rows (", M, ") or columns");
  at::Tensor partial = at::empty({used_splits, K, r}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({r, K}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const dim3 grid(static_cast<unsigned>(k_tiles), static_cast<unsigned>(r_tiles), static_cast<unsigned>(used_splits));
  dispatch_half_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    lora_grad_A_kernel<T><<<grid, kFusedThreads, 0, stream>>>(
        reinterpret_cast<const T*>(grad_down.const_data_ptr()), reinterpret_cast<const T*>(x.const_data_ptr()),
        partial.data_ptr<float>(), M, K, static_cast<int>(r), m_per_split, seed->const_data_ptr<int64_t>(),
        dropout_threshold(p), static_cast<float>(dropout_scale(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sum_partials(partial, out, K, r, used_splits, true, sms, stream);
  return out;
}

at::Tensor lora_dropout_add_mm_cuda(const at::Tensor& base_in, const at::Tensor& grad_down_in, const at::Tensor& A_in,
                                    const std::optional<at::Tensor>& seed, double p) {
  check_lora_product_args("lora_dropout_add_mm", base_in, "base", A_in, grad_down_in, seed, p);
  if (p == 0.0 || base_in.numel() == 0) return lora_dropout_add_mm_composite(base_in, grad_down_in, A_in, seed, p);
  check_lora_dropout_args("lora_dropout_add_mm", base_in, *seed, p, at::Tensor());
  const c10::cuda::CUDAGuard guard(base_in.device());
  const at::Tensor base = base_in.contiguous();
  // The composite form's arithmetic (cuBLAS, then the dropout kernel), with the sum written over the
  // product: the same bits, one [M, K] buffer fewer at the peak of a layer's backward.
  at::Tensor out = at::mm(grad_down_in, A_in).contiguous();
  dropout_into(base, out, out, *seed, p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("lora_dropout", &lora_dropout_cuda);
  m.impl("lora_dropout_add", &lora_dropout_add_cuda);
  m.impl("lora_down", &lora_down_cuda);
  m.impl("lora_grad_A", &lora_grad_A_cuda);
  m.impl("lora_dropout_add_mm", &lora_dropout_add_mm_cuda);
}

}  // namespace qlora::cuda
