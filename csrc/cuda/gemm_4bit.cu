// The CUDA products with a 4-bit weight W [N, K]: gemm_4bit (x @ W^T + bias) and
// gemm_4bit_transposed (grad @ W), and the dispatch of the forward product.
//
// Small and medium M (decode, short prompts, up to M = 256): one fused kernel reads the packed codes
// once, decodes them in registers and multiplies on the tensor cores; which kernel, with which
// tiles, is the configuration choose_gemm_config picks (csrc/gemm_4bit_config.cpp, the dispatch
// table with the measurements behind it). The kernel families:
//   - gemm_4bit_mma.cu: mma.sync, the codes fed through registers or a cp.async ring (any GPU);
//   - gemm_4bit_ws.cu: mma.sync with a copy warp, scale warps and mbarriers (sm_90);
//   - gemm_4bit_wgmma.cu: wgmma, 128 rows x up to 256 tokens a CTA (sm_90a).
// Large M: the product is compute bound; W is dequantized into a buffer of the call's own (from the
// caching allocator) and cuBLAS multiplies. The backward product takes that path too, but at M <= 16
// where its own kernel (gemm_4bit_transposed.cu) reads the codes once, and in bf16 on Hopper up to
// M = 256 where the wgmma kernel transposed does (choose_transposed_config).
// The private op _gemm_4bit_with runs a named configuration, for tests and benchmarks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "qlora/format.h"
#include "qlora/gemm_4bit_config.h"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/kernels.h"
#include "qlora/occupancy.h"

namespace qlora::cuda {

// The dequantized weight of the cuBLAS path (and the wgmma kernels' split partial sums) is a tensor
// of the call's own, from PyTorch's caching allocator on the current stream: it lives from the
// dequantization to the product's launch and goes back to the allocator then, which reuses it on the
// same stream in order (no allocation from the driver in steady state). Every call has its own, so
// host threads sharing a stream never write into another call's buffer, and a call under CUDA graph
// capture takes it from the graph's private pool. Its bytes are in the peak memory only while a
// product runs, as bitsandbytes' dequantized weight is.
at::Tensor call_buffer(int64_t numel, at::ScalarType dtype, const at::Device& device) {
  return at::empty({numel}, at::TensorOptions().dtype(dtype).device(device));
}

// The compute capability, the opt-in shared memory of a block, the reserved shared memory and the
// multiprocessors, read once a device.
DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    int major = 0, minor = 0, optin = 0, reserved = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = cache
             .emplace(device,
                      DeviceLimits{major, minor, static_cast<size_t>(optin), static_cast<uint32_t>(reserved), sms})
             .first;
  }
  return it->second;
}

namespace {

// The cuBLAS path dequantizes W a band of rows at a time, each band's buffer at most this many
// bytes: a weight's whole dequantized copy would sit in the peak memory of a training step, whose
// highest point is inside a large layer's backward product (Llama-65B at 1 x 2048: an MLP weight,
// 22016 x 8192, is 344 MiB in bf16, 115 MiB a band in three; the step's peak by block in
// bench/results/e2e-profile-65b-h100-2026-12-07-b9d9340.md). 128 MiB keeps every weight of a 7B or
// 13B model, and 8192 x 8192, in one band.
constexpr int64_t kMaxDequantizedBandBytes = int64_t{128} << 20;

// The operand dtype the dispatch table weighs.
GemmDtype gemm_dtype_of(at::ScalarType t) {
  return t == at::kHalf ? GemmDtype::kFloat16 : t == at::kBFloat16 ? GemmDtype::kBFloat16 : GemmDtype::kFloat32;
}

// The fused kernels' view of the block scales: float32 absmax, or 8-bit codes with their nested
// scales, code and offset (double quantization).
Scales scales_of(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                 const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset) {
  if (!nested_absmax.has_value()) return {absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr};
  return {nullptr, absmax.const_data_ptr<uint8_t>(), nested_absmax->const_data_ptr<float>(),
          nested_code->const_data_ptr<float>(), offset->const_data_ptr<float>()};
}

// W's packed codes and scales, sliced by rows.
struct QuantizedRows {
  at::Tensor packed, absmax;
  std::optional<at::Tensor> nested_absmax, nested_code, offset;
  int64_t blocksize;
  QuantType quant_type;
  int64_t N, K;
};

// Rows per band, a multiple of the rows after which a band starts on a boundary of the blocks and,
// with double quantization, of the nested scales' groups of kNestedBlocksize blocks, so that a band
// is a slice of the packed codes, the scales and the nested scales; and of 64, so that the bands of
// the output (forward) and of grad (backward) start 128-byte aligned: cuBLAS takes its slow kernels
// for a band 8 bytes off (the 65B step took 1.34x as long with bands of 7340 rows). N: one band.
int64_t rows_per_band(const QuantizedRows& w, size_t elem_bytes) {
  const int64_t bytes = w.N * w.K * static_cast<int64_t>(elem_bytes);
  if (bytes <= kMaxDequantizedBandBytes) return w.N;
  const int64_t group = w.nested_absmax.has_value() ? w.blocksize * kNestedBlocksize : w.blocksize;
  const int64_t unit = std::lcm(group / std::gcd(w.K, group), int64_t{64});  // whole groups, aligned bands
  const int64_t rows = ceil_div(ceil_div(w.N, ceil_div(bytes, kMaxDequantizedBandBytes)), unit) * unit;
  return std::min(rows, w.N);
}

// Rows [n0, n0 + rows) of W, dequantized into a buffer of the call's own.
at::Tensor dequantized_rows(const QuantizedRows& w, int64_t n0, int64_t rows, at::ScalarType dtype,
                            const at::Device& device) {
  // elements, block- and group-aligned (rows_per_band); the scales flat, whatever shape they came in
  const int64_t first = n0 * w.K, n = rows * w.K;
  const int64_t b0 = first / w.blocksize, blocks = ceil_div(n, w.blocksize);
  std::optional<at::Tensor> nested_absmax;
  if (w.nested_absmax.has_value()) {
    nested_absmax = w.nested_absmax->reshape(-1).narrow(0, b0 / kNestedBlocksize, ceil_div(blocks, kNestedBlocksize));
  }
  at::Tensor W = call_buffer(n, dtype, device);
  dequantize_4bit_into(w.packed.reshape(-1).narrow(0, first / 2, (n + 1) / 2),
                       w.absmax.reshape(-1).narrow(0, b0, blocks), nested_absmax, w.nested_code, w.offset, w.blocksize,
                       w.quant_type, n, W);
  return W.view({rows, w.K});
}

QuantizedRows quantized_rows(const PreparedGemm& g) {
  return {g.packed, g.absmax, g.nested_absmax, g.nested_code, g.offset, g.blocksize, g.p.quant_type, g.p.N, g.p.K};
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

// The largest of 16, 8, 4, 2, 1 that divides the address.
int alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (int b = 16; b > 1; b /= 2)
    if (a % b == 0) return b;
  return 1;
}

GpuInfo gpu_info(int device) {
  const DeviceLimits lim = device_limits(device);
  return {lim.major,
          lim.minor,
          lim.sms,
          lim.smem_optin,
          lim.reserved,
          ws_kernels_have_sm90_code(device),
          wgmma_kernels_have_sm90a_code(lim.major)};
}

// Launches configuration c's kernel; false where a wgmma kernel declined.
bool launch_fused(const GemmConfig& c, const FusedGemm& g) {
  switch (c.kernel) {
    case GemmKernel::kMma: launch_gemm_mma(c.mma, g); return true;
    case GemmKernel::kStream: launch_gemm_stream(c.stream, g); return true;
    case GemmKernel::kWarpSpecialized: launch_gemm_ws(c.ws, g); return true;
    case GemmKernel::kWgmma: return launch_gemm_wgmma(c.wgmma, g);
    default: TORCH_CHECK(false, "gemm_4bit: ", c.name, " is not a fused kernel");
  }
  return false;
}

}  // namespace

PreparedGemm prepare_gemm_4bit(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias,
                               const GemmConfig* named, int64_t fused_max_m, c10::cuda::OptionalCUDAGuard& guard) {
  PreparedGemm g;
  g.op = op;
  g.p = check_gemm_4bit_args(op, false, x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                             nested_blocksize, quant_type, shape, bias);
  guard.set_device(x.device());  // (after the checks: x may be a CPU tensor beside CUDA ones)
  g.out = at::empty(with_last(x.sizes(), g.p.N), x.options());
  g.M = g.p.K == 0 ? 0 : x.numel() / g.p.K;
  g.done = g.out.numel() == 0 || g.p.K == 0;
  if (g.out.numel() > 0 && g.p.K == 0) {  // an empty sum: zeros, plus the bias
    if (bias.has_value()) g.out.copy_(bias->expand_as(g.out));
    else g.out.zero_();
  }
  if (g.done) return g;
  g.stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  g.packed = packed.contiguous();
  g.absmax = absmax.contiguous();
  if (nested_absmax.has_value()) {
    g.nested_absmax = nested_absmax->contiguous();
    g.nested_code = nested_code->contiguous();
  }
  g.offset = offset;
  g.blocksize = blocksize;
  if (bias.has_value()) g.bias = bias->contiguous();
  g.x2 = x.reshape({g.M, g.p.K}).contiguous();
  g.out2 = g.out.view({g.M, g.p.N});
  g.query = GemmQuery{g.M,
                      g.p.N,
                      g.p.K,
                      gemm_dtype_of(x.scalar_type()),
                      g.nested_absmax.has_value(),
                      blocksize,
                      alignment_of(g.x2.const_data_ptr()),
                      alignment_of(g.packed.const_data_ptr()),
                      alignment_of(g.absmax.const_data_ptr()),
                      fused_max_m};
  g.gpu = gpu_info(x.get_device());
  g.named = named != nullptr;
  if (named != nullptr) {
    const char* why = gemm_config_unfit(*named, g.query, g.gpu);
    TORCH_CHECK_NOT_IMPLEMENTED(why == nullptr, op, ": ", named->name, " cannot run here: ", why);
    g.config = named;
  } else {
    g.config = &choose_gemm_config(g.query, g.gpu);
  }
  return g;
}

bool run_gemm_4bit(PreparedGemm& g, const LoraTerm* lora, bool after_previous) {
  if (g.done) return true;  // (K = 0: the adapter term is 0 too)
  if (g.config->kernel != GemmKernel::kDequantizeCublas) {
    const Scales sc = scales_of(g.absmax, g.nested_absmax, g.nested_code, g.offset);
    const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(g.blocksize));
    const FusedGemm f{g.x2,   g.M,      g.packed, g.p,           bs_log2, sc, g.bias.defined() ? &g.bias : nullptr,
                      g.out2, g.stream, lora,     after_previous};
    if (launch_fused(*g.config, f)) return true;
    TORCH_CHECK_NOT_IMPLEMENTED(!g.named, g.op, ": ", g.config->name,
                                " cannot run here: the wgmma kernel declined (no tensor-map encoder or no CTA fits)");
    // The wgmma kernel declined: what the table picks without it.
    g.gpu.sm90a_code = false;
    g.config = &choose_gemm_config(g.query, g.gpu);
    if (g.config->kernel != GemmKernel::kDequantizeCublas) {
      TORCH_CHECK(launch_fused(*g.config, f), g.op, ": ", g.config->name, " did not launch");
      return true;
    }
  }
  // A band of W's rows is a band of the output's columns: each output element is one product, as
  // with the whole weight.
  const QuantizedRows w = quantized_rows(g);
  const int64_t band = rows_per_band(w, g.x2.element_size());
  for (int64_t n0 = 0; n0 < w.N; n0 += band) {
    const int64_t rows = std::min(band, w.N - n0);
    const at::Tensor W = dequantized_rows(w, n0, rows, g.x2.scalar_type(), g.x2.device());
    at::Tensor out = g.out2.narrow(1, n0, rows);
    if (g.bias.defined()) at::addmm_out(out, g.bias.narrow(0, n0, rows), g.x2, W.t());
    else at::mm_out(out, g.x2, W.t());
  }
  return lora == nullptr;
}

namespace {

// gemm_4bit, with the configuration choose_gemm_config picks (with fused_max_m: GemmQuery's), or
// `named` (which must be able to run: else NotImplementedError).
at::Tensor gemm_4bit_forward(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                             int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                             c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias, const GemmConfig* named,
                             int64_t fused_max_m) {
  c10::cuda::OptionalCUDAGuard guard;
  PreparedGemm g = prepare_gemm_4bit(op, x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                     nested_blocksize, quant_type, shape, bias, named, fused_max_m, guard);
  run_gemm_4bit(g, nullptr, false);
  return g.out;
}

at::Tensor gemm_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                          c10::string_view quant_type, c10::SymIntArrayRef shape,
                          const std::optional<at::Tensor>& bias) {
  return gemm_4bit_forward("gemm_4bit", x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                           nested_blocksize, quant_type, shape, bias, nullptr, -1);
}

at::Tensor gemm_4bit_with_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias,
                               c10::string_view config) {
  const std::string_view name(config.data(), config.size());
  // "fused": the table's choice with the fused kernels' reach unbounded, what the dispatch would run
  // at this M if it took a fused kernel there.
  const bool any_fused = name == kAnyFusedConfig;
  const GemmConfig* named = any_fused ? nullptr : find_gemm_config(name);
  TORCH_CHECK_VALUE(any_fused || named != nullptr, "_gemm_4bit_with: no configuration named '", std::string(name),
                    "' (the names of _C._gemm_4bit_configs(), or '", kAnyFusedConfig, "')");
  return gemm_4bit_forward("_gemm_4bit_with", x, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                           nested_blocksize, quant_type, shape, bias, named,
                           any_fused ? std::numeric_limits<int64_t>::max() : -1);
}

// gemm_4bit_transposed on the tensor-copy wgmma kernel, where choose_transposed_config takes it
// there; false, launching nothing, where not (or where the kernel declined).
bool transposed_wgmma(const QuantizedRows& w, const at::Tensor& grad2_in, int64_t M, const GemmProblem& p,
                      at::Tensor& out2, cudaStream_t stream) {
  // grad is made contiguous only where the kernel takes it (a fresh copy is 16-byte aligned).
  const int grad_alignment = grad2_in.is_contiguous() ? alignment_of(grad2_in.const_data_ptr()) : 16;
  const GemmQuery q{M,
                    p.N,
                    p.K,
                    gemm_dtype_of(grad2_in.scalar_type()),
                    w.nested_absmax.has_value(),
                    w.blocksize,
                    grad_alignment,
                    alignment_of(w.packed.const_data_ptr()),
                    alignment_of(w.absmax.const_data_ptr()),
                    -1};
  const GemmConfig& c = choose_transposed_config(q, gpu_info(grad2_in.get_device()));
  if (c.kernel != GemmKernel::kWgmma) return false;
  const at::Tensor grad2 = grad2_in.contiguous();
  const Scales sc = scales_of(w.absmax, w.nested_absmax, w.nested_code, w.offset);
  const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const FusedGemm f{grad2, M, w.packed, p, bs_log2, sc, nullptr, out2, stream};
  return launch_gemm_wgmma_transposed(c.wgmma, f);
}

at::Tensor gemm_4bit_transposed_cuda(const at::Tensor& grad, const at::Tensor& packed_in, const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t nested_blocksize, c10::string_view quant_type, c10::SymIntArrayRef shape) {
  const GemmProblem p =
      check_gemm_4bit_args("gemm_4bit_transposed", true, grad, packed_in, absmax, nested_absmax, nested_code, offset,
                           blocksize, nested_blocksize, quant_type, shape, std::nullopt);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty(with_last(grad.sizes(), p.K), grad.options());
  if (out.numel() == 0) return out;
  if (p.N == 0) return out.zero_();
  const int64_t M = grad.numel() / p.N;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device()).stream();
  at::Tensor out2 = out.view({M, p.K});
  const at::Tensor grad2 = grad.reshape({M, p.N});
  if (gemm_4bit_transposed_small_m(grad2, packed_in, absmax, nested_absmax, nested_code, offset, blocksize, p, out2,
                                   stream)) {
    return out;
  }
  const QuantizedRows w{packed_in.contiguous(),
                        absmax.contiguous(),
                        nested_absmax.has_value() ? std::optional(nested_absmax->contiguous()) : std::nullopt,
                        nested_code.has_value() ? std::optional(nested_code->contiguous()) : std::nullopt,
                        offset,
                        blocksize,
                        p.quant_type,
                        p.N,
                        p.K};
  if (transposed_wgmma(w, grad2, M, p, out2, stream)) return out;
  // A band of W's rows is a share of the sum over N: the first band writes the output and the others
  // add to it (cuBLAS with beta = 1), one more rounding of a partial sum to the output's dtype a band.
  const int64_t band = rows_per_band(w, grad.element_size());
  for (int64_t n0 = 0; n0 < p.N; n0 += band) {
    const int64_t rows = std::min(band, p.N - n0);
    const at::Tensor W = dequantized_rows(w, n0, rows, grad.scalar_type(), grad.device());
    if (n0 == 0) at::mm_out(out2, grad2.narrow(1, 0, rows), W);
    else at::addmm_out(out2, out2, grad2.narrow(1, n0, rows), W);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  m.impl("_gemm_4bit_with", &gemm_4bit_with_cuda);
  m.impl("gemm_4bit_transposed", &gemm_4bit_transposed_cuda);
}

}  // namespace qlora::cuda
