// The 4-bit format's facts shared by the CPU and CUDA kernels: quant types, blocksizes, and the
// host-side checks every op runs before it touches memory (../shared/spec/nf4-format.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace qlora {

enum class QuantType : int { NF4 = 0, FP4 = 1 };

// The double quantization always uses bitsandbytes' nested blocksize.
inline constexpr int64_t kNestedBlocksize = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_float_input(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// Host-side argument checks, defined once in csrc/format.cpp (compiled by the host compiler only, so
// the CPU and CUDA translation units share one definition). Each raises a ValueError / TypeError
// whose message names the op and the argument.
QuantType parse_quant_type(std::string_view quant_type);
void check_blocksize(int64_t blocksize);
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name);
QuantType check_quantize_4bit_args(const at::Tensor& A, int64_t blocksize, std::string_view quant_type);
void check_quantize_absmax_args(const at::Tensor& absmax, int64_t blocksize);
// Returns qabsmax's element count.
int64_t check_dequantize_absmax_args(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                     const at::Tensor& nested_code, const at::Tensor& offset, int64_t blocksize);
// The scales of a dequantization: float32 absmax, or uint8 absmax with its nested state.
void check_absmax_state(const char* op, const at::Tensor& ref, const char* ref_name, int64_t nblocks,
                        const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                        int64_t nested_blocksize);
int64_t shape_numel(c10::SymIntArrayRef shape, const char* op);
QuantType check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t nested_blocksize, std::string_view quant_type, int64_t n,
                                     at::ScalarType dtype);

// lora_dropout(x, seed, p) and lora_dropout_add(base, x, seed, p) (base undefined for the former):
// x float, seed an int64 tensor of one element on x's device, 0 <= p <= 1.
// The dropout seed: an int64 tensor of one element on x's device.
void check_seed(const char* op, const at::Tensor& seed, const at::Tensor& x, const char* x_name);
void check_lora_dropout_args(const char* op, const at::Tensor& x, const at::Tensor& seed, double p,
                             const at::Tensor& base);

// The facts of a product with a 4-bit weight W of shape [N, K] (gemm_4bit: x [..., K] -> [..., N];
// gemm_4bit_transposed: x [..., N] -> [..., K]).
struct GemmProblem {
  QuantType quant_type;
  int64_t N;
  int64_t K;
};
GemmProblem check_gemm_4bit_args(const char* op, bool transposed, const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                 int64_t blocksize, int64_t nested_blocksize, std::string_view quant_type,
                                 c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias);

}  // namespace qlora
