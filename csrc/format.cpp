// Host-side argument checks of the qlora ops (declared in qlora/format.h).
#include "qlora/format.h"

#include <c10/core/SymInt.h>
#include <c10/util/safe_numerics.h>

namespace qlora {

QuantType parse_quant_type(std::string_view quant_type) {
  if (quant_type == "nf4") return QuantType::NF4;
  if (quant_type == "fp4") return QuantType::FP4;
  TORCH_CHECK_VALUE(false, "quant_type must be 'nf4' or 'fp4', got '", quant_type, "'");
  return QuantType::NF4;  // not reached
}

void check_blocksize(int64_t blocksize) {
  const bool ok = blocksize == 32 || blocksize == 64 || blocksize == 128 || blocksize == 256 || blocksize == 512 ||
                  blocksize == 1024 || blocksize == 2048 || blocksize == 4096;
  TORCH_CHECK_VALUE(ok, "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ", blocksize);
}

// quantize_4bit(A, blocksize, quant_type): A is any float tensor (fp32, fp16, bf16), any shape.
QuantType check_quantize_4bit_args(const at::Tensor& A, int64_t blocksize, std::string_view quant_type) {
  TORCH_CHECK_TYPE(is_float_input(A.scalar_type()), "quantize_4bit: A must be float32, float16 or bfloat16, got ",
                   A.scalar_type());
  check_blocksize(blocksize);
  return parse_quant_type(quant_type);
}

// quantize_absmax(absmax, blocksize): the float32 block scales of quantize_4bit.
void check_quantize_absmax_args(const at::Tensor& absmax, int64_t blocksize) {
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "quantize_absmax: absmax must be float32, got ",
                   absmax.scalar_type());
  TORCH_CHECK_VALUE(absmax.dim() == 1, "quantize_absmax: absmax must be 1-D, got shape ", absmax.sizes());
  TORCH_CHECK_VALUE(blocksize == kNestedBlocksize, "quantize_absmax: blocksize must be ", kNestedBlocksize,
                    " (bitsandbytes' nested blocksize), got ", blocksize);
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; move them to one device");
}

void check_absmax_state(const char* op, const at::Tensor& ref, const char* ref_name, int64_t nblocks,
                        const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                        int64_t nested_blocksize) {
  check_same_device(absmax, ref, op, "absmax", ref_name);
  const bool nested = nested_absmax.has_value() || nested_code.has_value() || offset.has_value();
  if (!nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op,
                     ": absmax must be float32 without double quantization (nested_absmax, nested_code and "
                     "offset are None), got ",
                     absmax.scalar_type());
    TORCH_CHECK_VALUE(absmax.numel() == nblocks, op, ": absmax has ", absmax.numel(), " elements but the shape needs ",
                      nblocks, " blocks");
    return;
  }
  TORCH_CHECK_VALUE(nested_absmax.has_value() && nested_code.has_value() && offset.has_value(), op,
                    ": double quantization needs nested_absmax, nested_code and offset together");
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op, ": absmax must be uint8 with double quantization, got ",
                   absmax.scalar_type());
  TORCH_CHECK_VALUE(absmax.numel() == nblocks, op, ": absmax has ", absmax.numel(), " elements but the shape needs ",
                    nblocks, " blocks");
  TORCH_CHECK_VALUE(nested_blocksize == kNestedBlocksize, op, ": nested_blocksize must be ", kNestedBlocksize, ", got ",
                    nested_blocksize);
  const at::Tensor& na = *nested_absmax;
  const at::Tensor& nc = *nested_code;
  const at::Tensor& off = *offset;
  check_same_device(na, ref, op, "nested_absmax", ref_name);
  check_same_device(nc, ref, op, "nested_code", ref_name);
  check_same_device(off, ref, op, "offset", ref_name);
  TORCH_CHECK_TYPE(na.scalar_type() == at::kFloat, op, ": nested_absmax must be float32, got ", na.scalar_type());
  TORCH_CHECK_VALUE(na.numel() == ceil_div(nblocks, nested_blocksize), op, ": nested_absmax has ", na.numel(),
                    " elements but ", nblocks, " blocks need ", ceil_div(nblocks, nested_blocksize));
  TORCH_CHECK_TYPE(nc.scalar_type() == at::kFloat, op, ": nested_code must be float32, got ", nc.scalar_type());
  TORCH_CHECK_VALUE(nc.numel() == 256, op, ": nested_code must hold the 256 values of the 8-bit map, got ", nc.numel());
  TORCH_CHECK_TYPE(off.scalar_type() == at::kFloat, op, ": offset must be float32, got ", off.scalar_type());
  TORCH_CHECK_VALUE(off.numel() == 1, op, ": offset must hold one value, got ", off.numel());
}

// dequantize_absmax(qabsmax, nested_absmax, nested_code, offset, blocksize): quantize_absmax's result.
// Its own names first (qabsmax, blocksize), then the state's sizes and devices as the products check them.
int64_t check_dequantize_absmax_args(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                     const at::Tensor& nested_code, const at::Tensor& offset, int64_t blocksize) {
  const char* op = "dequantize_absmax";
  TORCH_CHECK_VALUE(qabsmax.dim() == 1, op, ": qabsmax must be 1-D, got shape ", qabsmax.sizes());
  TORCH_CHECK_TYPE(qabsmax.scalar_type() == at::kByte, op, ": qabsmax must be uint8 (quantize_absmax's codes), got ",
                   qabsmax.scalar_type());
  TORCH_CHECK_VALUE(blocksize == kNestedBlocksize, op, ": blocksize must be ", kNestedBlocksize,
                    " (bitsandbytes' nested blocksize), got ", blocksize);
  const int64_t n = qabsmax.numel();
  check_absmax_state(op, qabsmax, "qabsmax", n, qabsmax, nested_absmax, nested_code, offset, blocksize);
  return n;
}

int64_t shape_numel(c10::SymIntArrayRef shape, const char* op) {
  int64_t n = 1;
  for (const auto& s : shape) {
    const int64_t d = s.guard_int(__FILE__, __LINE__);
    TORCH_CHECK_VALUE(d >= 0, op, ": shape must not have negative sizes, got ", shape);
    TORCH_CHECK_VALUE(!c10::mul_overflows(n, d, &n), op, ": shape ", shape, " has more elements than int64 counts");
  }
  return n;
}

// dequantize_4bit: the packed codes of `shape` and their scales.
QuantType check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t nested_blocksize, std::string_view quant_type, int64_t n,
                                     at::ScalarType dtype) {
  const char* op = "dequantize_4bit";
  const QuantType qt = parse_quant_type(quant_type);
  check_blocksize(blocksize);
  TORCH_CHECK_TYPE(is_float_input(dtype), op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type(),
                   " (view other storage dtypes as uint8 first)");
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": packed has ", packed.numel(), " bytes but a shape of ", n,
                    " elements needs ", (n + 1) / 2);
  check_absmax_state(op, packed, "packed", ceil_div(n, blocksize), absmax, nested_absmax, nested_code, offset,
                     nested_blocksize);
  return qt;
}

GemmProblem check_gemm_4bit_args(const char* op, bool transposed, const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                 int64_t blocksize, int64_t nested_blocksize, std::string_view quant_type,
                                 c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias) {
  const QuantType qt = parse_quant_type(quant_type);
  check_blocksize(blocksize);
  TORCH_CHECK_VALUE(shape.size() == 2, op, ": the weight's shape must be [out_features, in_features], got ", shape);
  const int64_t N = shape[0].guard_int(__FILE__, __LINE__);
  const int64_t K = shape[1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(N >= 0 && K >= 0, op, ": the weight's shape must not have negative sizes, got ", shape);
  // float64 on the CPU: for gradcheck of the layers built on these products.
  TORCH_CHECK_TYPE(is_float_input(x.scalar_type()) || (x.scalar_type() == at::kDouble && x.device().is_cpu()), op, ": ",
                   transposed ? "grad" : "x", " must be float32, float16 or bfloat16 (or float64 on the CPU), got ",
                   x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", transposed ? "grad" : "x", " must have at least one dimension");
  const int64_t inner = transposed ? N : K;
  TORCH_CHECK_VALUE(x.size(-1) == inner, op, ": ", transposed ? "grad" : "x", " has ", x.size(-1),
                    " elements in its last dimension but the weight of shape [", N, ", ", K, "] needs ", inner,
                    transposed ? " (out_features)" : " (in_features)");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type(),
                   " (view other storage dtypes as uint8 first)");
  // A product past int64 would wrap to a size that empty tensors pass, and the kernels would then read
  // far outside them.
  int64_t n = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(N, K, &n), op, ": the weight's shape [", N, ", ", K,
                    "] has more elements than int64 counts");
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": packed has ", packed.numel(),
                    " bytes but a weight of shape [", N, ", ", K, "] needs ", (n + 1) / 2);
  check_same_device(packed, x, op, "packed", transposed ? "grad" : "x");
  check_absmax_state(op, x, transposed ? "grad" : "x", ceil_div(n, blocksize), absmax, nested_absmax, nested_code,
                     offset, nested_blocksize);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(!transposed, op, ": takes no bias");
    check_same_device(*bias, x, op, "bias", "x");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype (", x.scalar_type(),
                     "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N,
                      "] (out_features), got ", bias->sizes());
  }
  return {qt, N, K};
}

void check_seed(const char* op, const at::Tensor& seed, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": seed must be int64, got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, op, ": seed must have one element, got shape ", seed.sizes());
  check_same_device(seed, x, op, "seed", x_name);
}

void check_lora_dropout_args(const char* op, const at::Tensor& x, const at::Tensor& seed, double p,
                             const at::Tensor& base) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be a float tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", p);
  check_seed(op, seed, x, "x");
  if (base.defined()) {
    check_same_device(base, x, op, "base", "x");
    TORCH_CHECK_TYPE(base.scalar_type() == x.scalar_type(), op, ": base must have x's dtype (", x.scalar_type(),
                     "), got ", base.scalar_type());
    TORCH_CHECK_VALUE(base.sizes() == x.sizes(), op, ": base must have x's shape ", x.sizes(), ", got ", base.sizes());
  }
}

}  // namespace qlora
