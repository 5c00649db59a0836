// The CUDA forward product's kernel configurations (one named struct a kernel family) and the one
// function that picks a configuration for a problem on a GPU: csrc/gemm_4bit_config.cpp. Host code
// only and built everywhere, so that tests without a GPU read the same table that the CUDA dispatch
// (csrc/cuda/gemm_4bit.cu) launches from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace qlora {

// The register-fed mma.sync kernel (csrc/cuda/gemm_4bit_mma.cu): tiles of 16 * row_groups weight
// rows x 8 * token_octets tokens; each warp loads `unroll` sub-blocks of codes into registers a batch.
struct MmaConfig {
  int row_groups, token_octets, unroll;
};
// The stream kernel (csrc/cuda/gemm_4bit_mma.cu): tiles of 16 rows x 8 * token_octets tokens, the
// codes through a cp.async ring in shared memory.
struct StreamConfig {
  int token_octets;
};
// The warp-specialized kernel (csrc/cuda/gemm_4bit_ws.cu, sm_90): tiles of 16 * row_groups rows x
// 8 * token_octets tokens, `math_warps` math warps, a ring of up to max_stages slots (the deepest
// that fits the GPU's shared memory, at least kWsMinStages).
struct WsConfig {
  int row_groups, token_octets, math_warps, max_stages;
};
// The wgmma kernels (csrc/cuda/gemm_4bit_wgmma.cu, sm_90a): 128 weight rows x `tokens` a CTA and a
// ring of `stages` slots. tensor_copy: the bf16 form fed by a copy warp's tensor copies, compiled
// for `ctas_per_sm` CTAs an SM; else the fp16 form (all threads copy, the codes decoded in float).
struct WgmmaConfig {
  int tokens, stages;
  bool tensor_copy;
  int ctas_per_sm;
};

enum class GemmKernel : uint8_t { kDequantizeCublas, kMma, kStream, kWarpSpecialized, kWgmma };

// Every configuration the dispatch can pick (and that tests and benchmarks can name), in the order
// of the table in csrc/gemm_4bit_config.cpp.
enum class GemmConfigId : uint8_t {
  kDequantizeCublas,
  kMma16x8,
  kMma16x16,
  kMma32x32,
  kStream16x8,
  kStream16x16,
  kStream16x32,
  kStream16x64,
  kWs16x8,
  kWs16x16,
  kWs32x8,
  kWs32x8Deep,
  kWs32x16,
  kWs32x32,
  kWgmma128x64,
  kWgmma128x128,
  kWgmma128x256,
  kWgmmaTma128x16,
  kWgmmaTma128x32,
  kWgmmaTma128x64,
  kWgmmaTma128x128,
  kWgmmaTma128x256,
  kWgmmaTma128x32OneCta,
  kWgmmaTma128x64OneCta,
  kCount
};

// A configuration: its name, its kernel family and that family's fields (the others zero).
struct GemmConfig {
  GemmConfigId id;
  const char* name;
  GemmKernel kernel;
  MmaConfig mma;
  StreamConfig stream;
  WsConfig ws;
  WgmmaConfig wgmma;
};

enum class GemmDtype : uint8_t { kFloat32, kFloat16, kBFloat16 };

// What the choice depends on: the product out[M, N] = x[M, K] @ W^T with W's 4-bit codes in
// blocks of `blocksize` (nested: double-quantized scales), and the alignment in bytes (1, 2, 4, 8 or
// 16) of x (contiguous), the packed codes and the scales (float32, or the 8-bit codes when nested).
// (NF4 or FP4 does not matter: the kernels read the code table at run time.)
struct GemmQuery {
  int64_t M, N, K;
  GemmDtype dtype;
  bool nested;
  int64_t blocksize;
  int x_alignment, packed_alignment, scales_alignment;
  int64_t fused_max_m;  // -1: the measured reach; >= 0: a fused kernel at every M up to it (tests, benchmarks)
};

// What the choice needs to know of the GPU and of the build.
struct GpuInfo {
  int major, minor, sms;
  size_t smem_optin;       // shared memory a block may opt in to
  uint32_t smem_reserved;  // shared memory the system keeps at the start of each block's window
  bool sm90_code;          // the build has code this GPU runs for sm_90 (bulk copies, mbarriers)
  bool sm90a_code;         // ... and for sm_90a (wgmma, tensor copies)
};

// The configuration of gemm_4bit for `q` on `gpu`; GemmKernel::kDequantizeCublas where the weight is
// dequantized into a buffer of the call's own and cuBLAS multiplies.
const GemmConfig& choose_gemm_config(const GemmQuery& q, const GpuInfo& gpu);
// The configuration of gemm_4bit_transposed (out [M, K] = grad [M, N] @ W, `q` the forward's query
// of the same weight with grad's M and alignment as x's) above the M its own small-M kernel takes:
// the tensor-copy wgmma kernel (the transposed form of the named configuration) or
// kDequantizeCublas.
const GemmConfig& choose_transposed_config(const GemmQuery& q, const GpuInfo& gpu);

// Why configuration `c` cannot compute `q` on `gpu` (its kernel would not launch or not be right),
// or nullptr where it can. (A wgmma kernel may still decline at launch: no tensor-map encoder in the
// driver, or no CTA that fits an SM.)
const char* gemm_config_unfit(const GemmConfig& c, const GemmQuery& q, const GpuInfo& gpu);

const GemmConfig& gemm_config(GemmConfigId id);
// The configuration of that name, or nullptr.
const GemmConfig* find_gemm_config(std::string_view name);
// The name _gemm_4bit_with takes for "the fused kernel the table picks at this M, at any M".
inline constexpr std::string_view kAnyFusedConfig = "fused";

}  // namespace qlora
