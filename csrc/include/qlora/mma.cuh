// The tensor-core instruction the mma.sync kernels share (gemm_4bit.cu, lora.cu). Fragment layout
// of m16n8k16 (lane = 4 g + c): A a0:(g, 2c..2c+1) a1:(g+8, 2c..) a2:(g, 2c+8..) a3:(g+8, 2c+8..);
// B b0:(k 2c..2c+1, n g) b1:(k 2c+8.., n g); C c0,c1:(g, 2c..2c+1) c2,c3:(g+8, 2c..2c+1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace qlora::cuda {

// d += A (16x16, row major) * B (16x8, column major), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The four 8x8 matrices of 16-bit values whose rows lanes 8 j .. 8 j + 7 address (16 bytes each,
// in shared memory): r[j] is matrix j's fragment, lane 4 g + c holding row g, columns 2c, 2c + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_address));
}

}  // namespace qlora::cuda
