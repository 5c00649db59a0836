// CUDA kernels of LoRA's dropout and of the adapter products around it.
//
// lora_dropout, lora_dropout_add: the mask of qlora/dropout.h, the CPU kernels' draws to the bit. One
// thread draws four values of Philox4x32-10 and masks the four elements they belong to, with one
// vector load per input; the seed is read on the device, so that a CUDA graph replays with the seed
// tensor's new value rather than the one of its capture.
//
// lora_down, lora_grad_A, lora_dropout_add_mm (qlora/lora.h): with dropout, the composite form makes
// a dropped copy of x (a pass that writes M x K and one that reads it back) or of the product. The
// fused kernels apply the mask where x is loaded into shared memory, or where the product leaves the
// accumulators, and multiply on the tensor cores (mma.sync m16n8k16, fp32 accumulation): each reads
// x (or base) once and writes nothing of its size but the result. Tiles: 64 rows x 64 k a CTA of 4
// warps, each warp 16 rows; the rank (r <= 128, a multiple of 8) is the narrow side. Partial sums
// over K (lora_down) or M (lora_grad_A) go to a float32 buffer, one slice a split, and one more
// kernel adds them in a fixed order: the result is the same bits run to run.
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
    const bool vector =
        aligned_for_vec4(x_ptr, size) && aligned_for_vec4(base_ptr, size) && aligned_for_vec4(out_ptr, size);
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

// ---------------------------------------------------------------------------------------------
// Fused adapter products

constexpr int kFusedThreads = 128;  // 4 warps, 16 rows each
constexpr int kTile = 64;           // rows of a tile, and k (or m) of a chunk
// Shared rows of 72 elements (144 bytes): 16-byte aligned for the vector stores, and a 32-bit
// fragment load of lane 4g + c lands in bank 4g + c (row pitch 36 words), so none conflict.
constexpr int kPitch = kTile + 8;
constexpr int kMaxFusedRank = 128;  // lora_dropout_add_mm keeps all of r in shared memory
constexpr int kRankPitch = kMaxFusedRank + 8;

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

// out[m][k] = base[m][k] + drop(T(sum_j grad_down[m][j] * A[j][k])): a 64 x 64 tile a CTA (m tile
// blockIdx.x, k tile blockIdx.y), all of r at once.
template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
    lora_dropout_add_mm_kernel(const T* __restrict__ base, const T* __restrict__ grad_down, const T* __restrict__ A,
                               T* __restrict__ out, int64_t M, int64_t K, int r, const int64_t* __restrict__ seed_ptr,
                               uint64_t threshold, float scale) {
  __shared__ __align__(16) T gs[kTile][kRankPitch];      // [m][j]
  __shared__ __align__(16) T as[kMaxFusedRank][kPitch];  // [j][k]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int r16 = (r + 15) / 16 * 16;  // the mma's reduction steps; rows r .. r16 are zeros
  const int chunks_per_row = r16 / 8;
  for (int q = tid; q < kTile * chunks_per_row; q += kFusedThreads) {
    const int row = q / chunks_per_row, col = (q % chunks_per_row) * 8;
    const bool in = m0 + row < M && col < r;
    *reinterpret_cast<uint4*>(&gs[row][col]) = in ? load16(grad_down + (m0 + row) * r + col) : make_uint4(0, 0, 0, 0);
  }
  for (int q = tid; q < r16 * 8; q += kFusedThreads) {
    const int row = q >> 3, col = (q & 7) * 8;
    const bool in = row < r && k0 + col < K;
    *reinterpret_cast<uint4*>(&as[row][col]) =
        in ? load16(A + static_cast<int64_t>(row) * K + k0 + col) : make_uint4(0, 0, 0, 0);
  }
  __syncthreads();
  const int wr = warp * 16;
  float acc[8][4] = {};
  for (int js = 0; js < r16 / 16; ++js) {
    const int jj = js * 16 + 2 * c;
    const uint32_t a[4] = {load32(&gs[wr + g][jj]), load32(&gs[wr + g + 8][jj]), load32(&gs[wr + g][jj + 8]),
                           load32(&gs[wr + g + 8][jj + 8])};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      mma_16816<T>(acc[nt], a, column_pair(&as[jj][nt * 8 + g], &as[jj + 1][nt * 8 + g]),
                   column_pair(&as[jj + 8][nt * 8 + g], &as[jj + 9][nt * 8 + g]));
    }
  }
  const uint64_t seed = threshold != 0 ? static_cast<uint64_t>(*seed_ptr) : 0;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wr + g + 8 * h;
      const int64_t k = k0 + nt * 8 + 2 * c;  // even, and K is a multiple of 8: k < K covers k + 1
      if (m >= M || k >= K) continue;
      const int64_t i = m * K + k;
      float keep0 = 1.0f, keep1 = 1.0f;
      if (threshold != 0) {
        const Philox4 d = philox4x32_10(seed, static_cast<uint64_t>(i / 4));
        const int e = static_cast<int>(i & 3);  // 0 or 2
        keep0 = d.v[e] >= threshold ? scale : 0.0f;
        keep1 = d.v[e + 1] >= threshold ? scale : 0.0f;
      }
      const T d0 = from_float<T>(to_float(from_float<T>(acc[nt][2 * h])) * keep0);
      const T d1 = from_float<T>(to_float(from_float<T>(acc[nt][2 * h + 1])) * keep1);
      const uint32_t b = load32(base + i);
      const T b0 = reinterpret_cast<const T*>(&b)[0], b1 = reinterpret_cast<const T*>(&b)[1];
      *reinterpret_cast<uint32_t*>(out + i) = pack_pair<T>(to_float(from_float<T>(to_float(b0) + to_float(d0))),
                                                           to_float(from_float<T>(to_float(b1) + to_float(d1))));
    }
  }
}

// Whether the fused kernels take these tensors (all contiguous already): CUDA's 16-bit floats on an
// sm_80+ GPU, K and r multiples of 8 (16-byte rows, Philox groups that a chunk does not straddle),
// r up to kMaxFusedRank, 16-byte aligned data.
bool fused_applies(std::initializer_list<const at::Tensor*> tensors, int64_t K, int64_t r, double p) {
  if (!g_lora_fused.load(std::memory_order_relaxed) || p <= 0.0) return false;
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
  if (M == 0 || K == 0 || !fused_applies({&x, &grad_down}, K, r, p)) {
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
  const int64_t r = check_lora_product_args("lora_dropout_add_mm", base_in, "base", A_in, grad_down_in, seed, p);
  const c10::cuda::CUDAGuard guard(base_in.device());
  const at::Tensor base = base_in.contiguous(), grad_down = grad_down_in.contiguous(), A = A_in.contiguous();
  const int64_t M = base.size(0), K = base.size(1);
  const int64_t m_tiles = ceil_div(M, kTile), k_tiles = ceil_div(K, kTile);
  // k tiles ride on gridDim.y (at most 65535): a wider base takes the composite path instead of failing.
  if (M == 0 || K == 0 || m_tiles > INT32_MAX || k_tiles > 65535 || !fused_applies({&base, &grad_down, &A}, K, r, p)) {
    return lora_dropout_add_mm_composite(base_in, grad_down_in, A_in, seed, p);
  }
  check_lora_dropout_args("lora_dropout_add_mm", base, *seed, p, at::Tensor());
  at::Tensor out = at::empty({M, K}, base.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(base.get_device()).stream();
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(k_tiles));
  dispatch_half_types(base.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    lora_dropout_add_mm_kernel<T><<<grid, kFusedThreads, 0, stream>>>(
        reinterpret_cast<const T*>(base.const_data_ptr()), reinterpret_cast<const T*>(grad_down.const_data_ptr()),
        reinterpret_cast<const T*>(A.const_data_ptr()), reinterpret_cast<T*>(out.data_ptr()), M, K, static_cast<int>(r),
        seed->const_data_ptr<int64_t>(), dropout_threshold(p), static_cast<float>(dropout_scale(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
