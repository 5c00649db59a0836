// Sizes of the mma.sync products' shared-memory layouts that the host must know too: the code ring
// of the stream and warp-specialized kernels (csrc/cuda/gemm_4bit_mma.cu, gemm_4bit_ws.cu) and the
// warp-specialized kernel's whole layout, which the dispatch (csrc/gemm_4bit_config.cpp) checks
// against the GPU's shared memory before it picks that kernel. Plain C++: host and device code.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_LAYOUT_FN __host__ __device__ inline
#else
#define QLORA_LAYOUT_FN inline
#endif

namespace qlora {

constexpr int kSubK = 64;  // k of a sub-block: 32 packed bytes of a row, 4 mma steps

// A ring slot: 16 rows x 1 KB of codes, each row read in one 1 KB run.
constexpr int kStageRowBytes = 1024;  // 32 sub-blocks of a row
constexpr int kStageSubs = kStageRowBytes / 32;
constexpr int kStagePitch = kStageRowBytes + 32;  // +32 bytes: rows g and g+4 fall in other banks
constexpr int kStageBytes = 16 * kStagePitch;

// The stream kernel: its pair table (one copy a shared-memory bank), a ring of kStreamStages slots,
// the nested code, then the tile's block scales, 16 rows of blocks + 1 floats: the part that grows
// with K, which the dispatch checks against the GPU's shared memory.
constexpr int kLutCopies = 32;
constexpr int kStreamStages = 3;
constexpr size_t kStreamFixedSmemBytes =
    256 * kLutCopies * sizeof(uint32_t) + size_t{kStreamStages} * kStageBytes + 256 * sizeof(float);
QLORA_LAYOUT_FN constexpr size_t stream_smem_bytes(int64_t blocks_per_row) {
  return kStreamFixedSmemBytes + 16 * static_cast<size_t>(blocks_per_row + 1) * sizeof(float);
}

// The wgmma tensor-copy kernel's pair table sits at this shared-window address (32 KB long), its
// barriers and first ring slots below it: the GPU's reserved bytes plus 2 KB must stay under it.
constexpr uint32_t kTmaTableAddress = 0x8000;

// The warp-specialized kernel: 2 scale warps (one alone was busy all the kernel long and kept the
// math warps waiting), a ring of kWsMinStages to kWsMaxStages slots, and its pair table at shared
// address kWsLutAddress (64 KB long), so that one PRMT forms a lookup's whole address.
constexpr int kWsScaleWarps = 2;
constexpr int kWsMaxStages = 8;
constexpr int kWsMinStages = 4;
constexpr int kWsMaxRedBufs = kWsMaxStages + 1;  // ws_red_bufs at one stage a tile
constexpr uint32_t kWsLutAddress = 0x10000;
constexpr int ws_threads(int mw) { return (mw + 1 + kWsScaleWarps) * 32; }

// Byte offsets from the start of dynamic shared memory (at shared address `lo`, after the block's
// reserved bytes): region A below the table holds what fits of the barriers, the nested code, the
// two scale buffers and the reduction buffer; the ring and the rest follow the table.
struct WsLayout {
  uint32_t bars, ncode, scales, red, lut, ring, total;
};

// Reduction buffers with one token octet (NT = 1): each tile's partial sums go to buffer
// (tile % R), and the last math warp to finish the tile adds them up while the others go on (no
// barrier at a tile's end). A warp can run ahead of the slowest one, which is still adding up tile
// t, by the ring's stages only (the copy warp refills a slot once every math warp is done with
// it): at most stages / nstage tiles past t. R = that + 1 buffers are never written while read.
QLORA_LAYOUT_FN int ws_red_bufs(int64_t K, int stages, int mt) {
  const int64_t nstage = mt * (((K >> 1) + kStageRowBytes - 1) / kStageRowBytes);  // ring slots a tile
  return static_cast<int>(stages / nstage) + 1;
}
QLORA_LAYOUT_FN uint32_t ws_red_bytes(int nt, int mw, int red_bufs, int mt) {
  const int chunk = nt == 1 ? mt : (mt * nt < 4 ? mt * nt : 4);  // fragments (row group, octet) a round
  return static_cast<uint32_t>(nt == 1 ? red_bufs : 1) * static_cast<uint32_t>(mw) * static_cast<uint32_t>(chunk) * 4 *
         32 * 4;
}

QLORA_LAYOUT_FN WsLayout ws_layout(uint32_t lo, int64_t nb, int64_t K, int nt, int mw, int stages, int mt) {
  WsLayout L{};
  L.lut = kWsLutAddress - lo;
  uint32_t a = 0, b = L.lut + 0x10000;
  auto place = [&](uint32_t bytes) {
    bytes = (bytes + 127) & ~127u;
    if (a + bytes <= L.lut) {
      a += bytes;
      return a - bytes;
    }
    b += bytes;
    return b - bytes;
  };
  L.bars = place((2 * kWsMaxStages + 4) * 8 + kWsMaxRedBufs * 4);  // the mbarriers, then the reduction counters
  L.ncode = place(256 * 4);
  L.scales = place(static_cast<uint32_t>(2 * 16 * mt * (nb + 1) * 4));
  L.red = place(ws_red_bytes(nt, mw, ws_red_bufs(K, stages, mt), mt));
  L.ring = place(static_cast<uint32_t>(stages) * kStageBytes);
  L.total = b;
  return L;
}

// The deepest ring of kWsMinStages to max_stages slots whose layout fits `smem_optin` bytes (more
// stages only keep more bytes in flight: the shallowest, where none fits), on a GPU that reserves
// `reserved` bytes at the start of each block's shared window.
inline int ws_ring_stages(uint32_t reserved, size_t smem_optin, int64_t nb, int64_t K, int nt, int mw, int mt,
                          int max_stages) {
  int stages = max_stages;
  while (stages > kWsMinStages && ws_layout(reserved, nb, K, nt, mw, stages, mt).total > smem_optin) --stages;
  return stages;
}

}  // namespace qlora

#undef QLORA_LAYOUT_FN
