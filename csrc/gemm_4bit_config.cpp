// The CUDA forward product's dispatch table: every kernel configuration by name, and the heuristics
// that pick one by M, N, K, dtype, double quantization, alignment and GPU. Each threshold below is an
// H200 measurement: bench/gemm.py --sweep, op "gemm_path" rows of the file named beside it (the
// history of what was tried is docs/perf/gemm_4bit.md). Host code only, built without CUDA too.
#include "qlora/gemm_4bit_config.h"

#include "qlora/gemm_4bit_layout.h"

namespace qlora {
namespace {

using enum GemmConfigId;

constexpr GemmConfig cublas(GemmConfigId id, const char* name) {
  return {id, name, GemmKernel::kDequantizeCublas, {}, {}, {}, {}};
}
constexpr GemmConfig mma(GemmConfigId id, const char* name, int row_groups, int token_octets, int unroll) {
  return {id, name, GemmKernel::kMma, {row_groups, token_octets, unroll}, {}, {}, {}};
}
constexpr GemmConfig stream(GemmConfigId id, const char* name, int token_octets) {
  return {id, name, GemmKernel::kStream, {}, {token_octets}, {}, {}};
}
constexpr GemmConfig ws(GemmConfigId id, const char* name, int row_groups, int token_octets, int math_warps,
                        int max_stages) {
  return {id, name, GemmKernel::kWarpSpecialized, {}, {}, {row_groups, token_octets, math_warps, max_stages}, {}};
}
constexpr GemmConfig wgmma(GemmConfigId id, const char* name, int tokens, int stages, bool tensor_copy,
                           int ctas_per_sm) {
  return {id, name, GemmKernel::kWgmma, {}, {}, {}, {tokens, stages, tensor_copy, ctas_per_sm}};
}

// Token tiles grow with M: one token octet for decode, wider tiles (and two row groups, which halve
// the reads of x) as M grows. Stages: enough bytes in flight to cover DRAM latency within the
// shared memory of the CTAs an SM that each form is compiled for.
constexpr GemmConfig kConfigs[] = {
    cublas(kDequantizeCublas, "dequantize_cublas"),
    mma(kMma16x8, "mma_16x8", 1, 1, 2),
    mma(kMma16x16, "mma_16x16", 1, 2, 1),
    mma(kMma32x32, "mma_32x32", 2, 4, 1),
    stream(kStream16x8, "stream_16x8", 1),
    stream(kStream16x16, "stream_16x16", 2),
    stream(kStream16x32, "stream_16x32", 4),
    stream(kStream16x64, "stream_16x64", 8),
    ws(kWs16x8, "ws_16x8", 1, 1, 8, kWsMinStages),
    ws(kWs16x16, "ws_16x16", 1, 2, 16, kWsMinStages),
    ws(kWs32x8, "ws_32x8", 2, 1, 8, kWsMinStages),
    ws(kWs32x8Deep, "ws_32x8_deep", 2, 1, 8, kWsMaxStages),
    ws(kWs32x16, "ws_32x16", 2, 2, 8, kWsMinStages),
    ws(kWs32x32, "ws_32x32", 2, 4, 8, kWsMinStages),
    wgmma(kWgmma128x64, "wgmma_128x64", 64, 6, false, 0),
    wgmma(kWgmma128x128, "wgmma_128x128", 128, 5, false, 0),
    wgmma(kWgmma128x256, "wgmma_128x256", 256, 5, false, 0),
    wgmma(kWgmmaTma128x16, "wgmma_tma_128x16", 16, 10, true, 2),
    wgmma(kWgmmaTma128x32, "wgmma_tma_128x32", 32, 8, true, 2),
    wgmma(kWgmmaTma128x64, "wgmma_tma_128x64", 64, 5, true, 2),
    wgmma(kWgmmaTma128x128, "wgmma_tma_128x128", 128, 8, true, 1),
    wgmma(kWgmmaTma128x256, "wgmma_tma_128x256", 256, 4, true, 1),
    // Not picked by the heuristics; kept for the sweep: one CTA an SM with a deeper ring, within 5%
    // of the default on the small weights at M = 32 and 64 (gemm-sweep-h200-2026-11-30-3d66edb.json:
    // 4096x4096 at M = 64 15.4 against 16.2 us, 4096x11008 27.1 against 27.2; 4-27% slower elsewhere).
    wgmma(kWgmmaTma128x32OneCta, "wgmma_tma_128x32_1cta", 32, 16, true, 1),
    wgmma(kWgmmaTma128x64OneCta, "wgmma_tma_128x64_1cta", 64, 12, true, 1),
};
static_assert(sizeof(kConfigs) / sizeof(kConfigs[0]) == static_cast<size_t>(kCount));
constexpr bool ids_in_order() {
  for (size_t i = 0; i < sizeof(kConfigs) / sizeof(kConfigs[0]); ++i)
    if (static_cast<size_t>(kConfigs[i].id) != i) return false;
  return true;
}
static_assert(ids_in_order(), "kConfigs[i] must be the configuration of id i");

// The fused kernels' reach: up to M = 64 the mma.sync kernels beat dequantize + cuBLAS (28672x8192
// at M = 64: 218 against 284 us; at M = 128 441 against 290; gemm-h200-2026-11-29.json), up to 256
// the wgmma kernels (see wgmma_reach).
constexpr int64_t kDefaultFusedMaxM = 256;
// The backward product: its own mma.sync kernel up to M = 16 (csrc/cuda/gemm_4bit_transposed.cu
// decides there), the transposed tensor-copy wgmma kernel above, up to M = 128 on every weight and
// up to 256 on weights of 2^25 elements or more, cuBLAS beyond. Against dequantize + cuBLAS on an
// H100 (gemm-t-wgmma-h100-2026-12-07-40ecf98.json): 0.26-0.87 the time at M = 17-128 on the six
// Llama shapes, 0.51-0.74 at M = 256 on the five of 2^25 or more, 1.28 on 4096x4096 (16.8 M) at
// M = 256 (the forward's wgmma kernels stop at the same size, wgmma_reach).
constexpr int64_t kTransposedSmallMaxM = 16;
constexpr int64_t kTransposedWgmmaAllMaxM = 128;
constexpr int64_t kTransposedWgmmaMaxM = 256;
constexpr int64_t kMmaMaxM = 64;
constexpr int64_t k2Pow25 = int64_t{1} << 25;
// The stream kernel keeps a tile's scales in shared memory: up to 1536 blocks a row (96 KB).
constexpr int64_t kStreamMaxBlocksPerRow = 1536;

int64_t blocks_per_row(const GemmQuery& q) { return q.K / q.blocksize; }

// What every fused kernel needs: a 16-bit x, rows of whole quantization blocks of at least one
// sub-block (no block straddles two rows), 8-byte code loads and 16-byte loads of x.
const char* fused_unfit(const GemmQuery& q) {
  if (q.dtype == GemmDtype::kFloat32) return "x is float32 (the fused kernels multiply 16-bit operands)";
  if (q.blocksize < kSubK || q.K % q.blocksize != 0) return "the rows are not whole blocks of at least 64";
  if (q.packed_alignment < 8) return "the packed codes are not 8-byte aligned";
  if (q.x_alignment < 16) return "x is not 16-byte aligned";
  return nullptr;
}

const char* ws_unfit(const WsConfig& c, const GemmQuery& q, const GpuInfo& gpu) {
  const int64_t nb = blocks_per_row(q);
  if (gpu.major != 9) return "the warp-specialized kernel runs on sm_90 only";
  if (!gpu.sm90_code) return "the build has no sm_90 code";
  if (gpu.smem_reserved >= kWsLutAddress) return "the GPU reserves too much shared memory for the table's address";
  if (q.packed_alignment < 16) return "the packed codes are not 16-byte aligned (bulk copies)";
  // The scales are read 4 at a time; nb <= 1536 also keeps ws_layout's 32-bit offsets far from overflow.
  if (nb % 4 != 0 || nb > 1536) return "the blocks a row are not a multiple of 4 up to 1536";
  if (q.scales_alignment < (q.nested ? 4 : 16)) return "the scales are not aligned for 4-scale loads";
  const int stages = ws_ring_stages(gpu.smem_reserved, gpu.smem_optin, nb, q.K, c.token_octets, c.math_warps,
                                    c.row_groups, c.max_stages);
  if (ws_layout(gpu.smem_reserved, nb, q.K, c.token_octets, c.math_warps, stages, c.row_groups).total > gpu.smem_optin)
    return "its shared memory (the tile's scales grow with K) exceeds the GPU's";
  return nullptr;
}

const char* wgmma_unfit(const WgmmaConfig& c, const GemmQuery& q, const GpuInfo& gpu) {
  if (gpu.major != 9 || !gpu.sm90a_code) return "the wgmma kernels run only on sm_90 with the build's sm_90a code";
  if (c.tensor_copy != (q.dtype == GemmDtype::kBFloat16))
    return c.tensor_copy ? "the tensor-copy form is bf16 only" : "this wgmma form is fp16 only";
  // Whole stages of 64 k, 16-byte copies of x and the codes; the 8-bit scale codes are copied as
  // aligned 4-byte words, a whole number of them (the last word inside the array).
  if (q.K % 64 != 0 || q.x_alignment < 16 || q.packed_alignment < 16)
    return "K, x or the codes do not allow 16-byte copies";
  if (q.nested && (q.scales_alignment < 4 || (q.N * blocks_per_row(q)) % 4 != 0))
    return "the 8-bit scale codes are not whole aligned words";
  if (c.tensor_copy && (q.M >= (int64_t{1} << 31) || q.N >= (int64_t{1} << 31) || q.K >= (int64_t{1} << 31)))
    return "the tensor copies' coordinates are 32-bit";
  if (c.tensor_copy && gpu.smem_reserved + 2048 > kTmaTableAddress)
    return "the GPU reserves too much shared memory for the table's address";
  return nullptr;
}

}  // namespace

const GemmConfig& gemm_config(GemmConfigId id) { return kConfigs[static_cast<size_t>(id)]; }

const GemmConfig* find_gemm_config(std::string_view name) {
  for (const GemmConfig& c : kConfigs)
    if (name == c.name) return &c;
  return nullptr;
}

const char* gemm_config_unfit(const GemmConfig& c, const GemmQuery& q, const GpuInfo& gpu) {
  if (c.kernel == GemmKernel::kDequantizeCublas) return nullptr;
  if (const char* why = fused_unfit(q)) return why;
  switch (c.kernel) {
    case GemmKernel::kStream:
      if (blocks_per_row(q) > kStreamMaxBlocksPerRow) return "more than 1536 blocks a row";
      if (q.packed_alignment < 16) return "the packed codes are not 16-byte aligned (cp.async)";
      if (stream_smem_bytes(blocks_per_row(q)) > gpu.smem_optin) return "the tile's scales outgrow shared memory";
      return nullptr;
    case GemmKernel::kWarpSpecialized: return ws_unfit(c.ws, q, gpu);
    case GemmKernel::kWgmma: return wgmma_unfit(c.wgmma, q, gpu);
    default: return nullptr;
  }
}

const GemmConfig& choose_gemm_config(const GemmQuery& q, const GpuInfo& gpu) {
  const auto fits = [&](GemmConfigId id) { return gemm_config_unfit(gemm_config(id), q, gpu) == nullptr; };
  const int64_t M = q.M, K = q.K, weight = q.N * q.K;
  // A benchmark's fused_max_m moves the reach and forces a fused kernel at any M up to it.
  const bool forced = q.fused_max_m >= 0;
  if (fused_unfit(q) != nullptr || M > (forced ? q.fused_max_m : kDefaultFusedMaxM))
    return gemm_config(kDequantizeCublas);
  const bool bf16 = q.dtype == GemmDtype::kBFloat16;

  // Rows of 8192 k or 2^25 codes: where the warp-specialized kernel beats the stream kernel at
  // M <= 16 (11008x4096 at M = 1 16.6 against 18.6 us; on 4096x4096 the stream kernel wins, 8.4
  // against 9.5; gemm-sweep-h200-2026-11-30-59f3e26.json).
  const bool large_weight = K >= 8192 || weight >= k2Pow25;
  // Tiles of two row groups read x once a 32 rows: fastest at M <= 8 on large weights, up to M = 16
  // on all, up to 32 under 2^25 codes (4096x4096 at M = 32 12.1 against 13.5 us; 8192x8192 lost,
  // 31.7 against 30.2; gemm-sweep-h200-2026-11-30-f2eef46.json).
  const bool ws_two_groups = M <= 8 ? large_weight : M <= 16 || (M <= 32 && weight < k2Pow25);
  // The deepest ring at M <= 8 with K >= 8192 (28672x8192 at M = 8 55.6 against 59.7 us), 4 stages
  // above (65.0 against 66.5 at M = 16; same file).
  const bool ws_deep_ring = M <= 8 && K >= 8192;
  if (ws_two_groups) {
    const GemmConfigId id = M <= 8 ? (ws_deep_ring ? kWs32x8Deep : kWs32x8) : M <= 16 ? kWs32x16 : kWs32x32;
    if (fits(id)) return gemm_config(id);  // not where the scales of 32 rows outgrow shared memory (K = 28672)
  }

  // The wgmma kernels from the M where they beat the mma.sync kernels: bf16 from M = 9 on 2^25
  // codes or more (28672x8192 at M = 16 86.5 against 92.4 us), from 17 below (4096x4096 at M = 16
  // the mma.sync kernels: 10.4 against 12.7; gemm-sweep-h200-2026-11-30-570e735.json); fp16 (the
  // float decode) from M = 33 (at M = 32 the stream kernel is faster: 40.8 against 46.9 us on
  // 8192x8192 in bf16, gemm-h200-2026-11-29-0d342f4.json; no fp16 sweep).
  const int64_t wgmma_min_m = bf16 ? (weight >= k2Pow25 ? 8 : 16) : 32;
  // Up to M = 128 they beat dequantize + cuBLAS on every weight; up to 256 with K >= 8192 or, bf16,
  // 2^25 codes (11008x4096 at M = 256 54.0 against 66.2 us; 4096x4096 lost, 32.7 against 26.8;
  // gemm-sweep-h200-2026-11-30-732e8ba.json).
  const bool wgmma_reach = M <= 128 || (M <= 256 && (K >= 8192 || (bf16 && weight >= k2Pow25)));
  if (M > wgmma_min_m && wgmma_reach) {  // (a wgmma kernel that cannot run leaves M to what follows)
    // bf16: the tensor-copy form, two CTAs an SM up to M = 64, one 256-token tile above M = 128
    // (each code decoded once); fp16: the float decode.
    const GemmConfigId id = bf16 ? (M <= 16    ? kWgmmaTma128x16
                                    : M <= 32  ? kWgmmaTma128x32
                                    : M <= 64  ? kWgmmaTma128x64
                                    : M <= 128 ? kWgmmaTma128x128
                                               : kWgmmaTma128x256)
                                 : (M <= 64    ? kWgmma128x64
                                    : M <= 128 ? kWgmma128x128
                                               : kWgmma128x256);
    if (fits(id)) return gemm_config(id);
  }
  if (M > kMmaMaxM && !forced) return gemm_config(kDequantizeCublas);

  // Rows of more than 16384 k above M = 16: the register-fed kernel (8192x28672 at M = 32 140.9
  // against 151.0 us for the stream kernel, at M = 64 263.5 against 294.5; gemm-h200-2026-11-29.json).
  const bool long_rows_above_16 = M > 16 && K > 16384;
  if (long_rows_above_16) return gemm_config(kMma32x32);
  // The one-group warp-specialized kernel where the two-group tile does not fit: 8 math warps at
  // M <= 8, 16 above (28672x8192 at M = 1 51.8 against 56.9 us; 8192x28672 at M = 16 86.6 against
  // 91.1; gemm-sweep-h200-2026-11-30-d09d751.json).
  const bool ws_one_group = M <= 16 && large_weight;
  if (ws_one_group) {
    const GemmConfigId id = M <= 8 ? kWs16x8 : kWs16x16;
    if (fits(id)) return gemm_config(id);
  }
  // Rows of more than 16384 k at M <= 16: the register-fed kernel (8192x28672 at M = 1 77.6 against
  // 85.6 us; on 28672x8192 the stream kernel, 82.2 against 89.0; gemm-h200-2026-11-29.json).
  const bool long_rows = K > 16384 && M <= 16;
  if (!long_rows && fits(kStream16x8)) {
    return gemm_config(M <= 8 ? kStream16x8 : M <= 16 ? kStream16x16 : M <= 32 ? kStream16x32 : kStream16x64);
  }
  return gemm_config(M <= 8 ? kMma16x8 : M <= 16 ? kMma16x16 : kMma32x32);
}

const GemmConfig& choose_transposed_config(const GemmQuery& q, const GpuInfo& gpu) {
  const GemmConfig& cublas_path = gemm_config(kDequantizeCublas);
  // The sum runs over W's rows: the wgmma kernel's stages are 64 of them and its tiles 128 of W's
  // columns, so the query it must fit is W's transposed (N and K swapped: whole stages of 64 rows,
  // 16-byte copies); the rows' whole blocks are W's own.
  GemmQuery t = q;
  t.N = q.K;
  t.K = q.N;
  const bool fused_reach = q.M > kTransposedSmallMaxM &&
                           (q.M <= kTransposedWgmmaAllMaxM || (q.M <= kTransposedWgmmaMaxM && q.N * q.K >= k2Pow25));
  if (!fused_reach || q.dtype != GemmDtype::kBFloat16 || fused_unfit(q) != nullptr) return cublas_path;
  const GemmConfigId id = q.M <= 32    ? kWgmmaTma128x32
                          : q.M <= 64  ? kWgmmaTma128x64
                          : q.M <= 128 ? kWgmmaTma128x128
                                       : kWgmmaTma128x256;
  const GemmConfig& c = gemm_config(id);
  return wgmma_unfit(c.wgmma, t, gpu) == nullptr ? c : cublas_path;
}

}  // namespace qlora
