// Device helpers shared by the CUDA kernels that decode double-quantized block scales.
#pragma once

namespace qlora::cuda {

// a * b with denormals flushed, as bitsandbytes' kernels compute it (FMUL.FTZ).
__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// The float32 scale of a 4-bit block from its double quantization: bitsandbytes dequantizes the
// 8-bit code with FMUL.FTZ, then torch adds the offset (IEEE).
__device__ __forceinline__ float nested_scale(float code_value, float nested_absmax, float offset) {
  return __fadd_rn(mul_ftz(code_value, nested_absmax), offset);
}

}  // namespace qlora::cuda
