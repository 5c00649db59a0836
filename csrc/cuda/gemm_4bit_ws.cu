// The warp-specialized mma.sync product (sm_90): out = x @ W^T (+ bias) at small M, the math of
// gemm_4bit_mma.cu's kernels (the pair table, sub-blocks of 64 k, fp32 block scaling, partial sums
// added in warp order) with the work split by role, so that the math warps do little but decode and
// multiply:
//   - one copy warp moves each ring slot (16 rows x 1 KB) with 16 bulk copies (cp.async.bulk, a row
//     each, lanes 0-15) that complete on the slot's mbarrier, running ahead across tile boundaries;
//   - two scale warps decode the next tiles' block scales, each warp into its own of two buffers
//     (every other tile), while the current tile is multiplied (the first tile's: all warps but the
//     copy warp);
//   - the math warps (MW) wait only on mbarriers; with one token octet the last one to finish a
//     tile adds up the partial sums while the others go on, above they meet once a tile for the
//     reduction;
//   - the pair table has 256-byte entries (the 32 lanes' copies, then 128 unused bytes) at shared
//     address kWsLutAddress, so that one PRMT forms a lookup's whole address: bits 0-7 the lane's
//     4 * lane, bits 8-15 the code byte, bits 16-31 the table's base.
// (The stream kernel spends over half its instructions elsewhere: every thread forms and predicates
// its own cp.async addresses, each lookup takes a shift and a LOP3, all warps meet at a barrier
// every stage, and the ring drains at every tile.)
// Tiles of MT row groups (16 * MT rows): each math warp decodes the MT groups' A fragments of a
// sub-block against one load of its x, so that x is read from L1 once a 16 * MT rows instead of
// once a 16 (at M = 8 a 16-row tile reads 128 KB of x against 64 KB of codes at K = 8192). A ring
// slot stays 16 rows x 1 KB, the MT groups' slots of one k range consecutive (the same bytes in
// shorter bulk copies were slower). The registers a thread: a quarter of the SM's warps on each
// scheduler's 16K registers (168 a thread with 11 or 12 warps, 96 with 18 to 20).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "qlora/epilogue.cuh"
#include "qlora/gemm_4bit_cuda.h"
#include "qlora/gemm_4bit_device.cuh"
#include "qlora/gemm_4bit_layout.h"
#include "qlora/half_convert.cuh"
#include "qlora/mbarrier.cuh"
#include "qlora/mma.cuh"
#include "qlora/nested_scale.cuh"

namespace qlora::cuda {
namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               :
               : "r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
template <int MW>
__device__ __forceinline__ void math_barrier() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(MW * 32) : "memory");
}
// Sub-block j as mma_sub_block, with the wide table; `lane_base` is kWsLutAddress | 4 * lane, and
// the byte at position k of word v is looked up at __byte_perm(v, lane_base, 0x7604 | k << 4).
// xv[nt]: the lane's 16 k of the sub-block for token octet nt (load_sub_block_x).
template <typename T, int NT>
__device__ __forceinline__ void load_sub_block_x(const T* const (&xs)[NT], uint4 (&xv)[NT][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint4* xp = reinterpret_cast<const uint4*>(xs[nt]);
    xv[nt][0] = __ldg(xp);
    xv[nt][1] = __ldg(xp + 1);
  }
}
template <typename T, int NT, int PITCH>
__device__ __forceinline__ void mma_sub_block_wide(uint32_t w, float s0, float s1, uint32_t lane_base,
                                                   const uint4 (&xvs)[NT][2], float (&acc)[NT][4]) {
  const uint2 w0 = lds_ring_u64(w);
  const uint2 w1 = lds_ring_u64(w + 8 * PITCH);
  uint32_t a[4][4];
  a_fragments(w0, w1, a, [&](uint32_t v, int k) { return lds_u32(__byte_perm(v, lane_base, 0x7604 | (k << 4))); });
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint4(&xv)[2] = xvs[nt];
    // One chain of four mma: two chains of two (the stream kernel's) measured no faster here.
    float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4& v = xv[q >> 1];
      mma_16816<T>(d, a[q], word_of(v, (q & 1) * 2), word_of(v, (q & 1) * 2 + 1));
    }
    acc[nt][0] = __fmaf_rn(s0, d[0], acc[nt][0]);
    acc[nt][1] = __fmaf_rn(s0, d[1], acc[nt][1]);
    acc[nt][2] = __fmaf_rn(s1, d[2], acc[nt][2]);
    acc[nt][3] = __fmaf_rn(s1, d[3], acc[nt][3]);
  }
}
#endif

// Thread t of P decodes the block scales of `rows` rows, the contiguous run of rows * nb from scale
// `first`, into dst (row r's at dst[r * (nb + 1)]). They are read 4 at a time (nb % 4 == 0 and
// aligned arrays: the launch checks), in batches of 16 vectors a thread whose loads are all issued
// before the first store (stores through a generic pointer would otherwise keep the next loads
// behind them: one memory latency a vector). Rows past N are left as they are (their sums are
// dropped). (i + 0.5) / nb in fp32 is within 2e-6 of its value, less than half the 1 / nb
// (>= 1 / 1536) to the nearest integer: the row, with no division.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
template <bool NESTED>
__device__ __forceinline__ void ws_decode_scales(float* dst, int64_t first, int64_t total, int nb, int rows,
                                                 const Scales& sc, const float* ncode, float offset, int t, int P) {
  const float inv_nb = 1.f / static_cast<float>(nb);
  constexpr int kBatch = 16;
  for (int i0 = 4 * t; i0 < rows * nb; i0 += 4 * P * kBatch) {
    uint32_t q[kBatch];
    float4 v[kBatch];
    float nested[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t at = first + i0 + 4 * P * u;
      if (i0 + 4 * P * u < rows * nb && at < total) {
        if constexpr (NESTED) {
          q[u] = __ldg(reinterpret_cast<const uint32_t*>(sc.qabsmax + at));
          nested[u] = __ldg(sc.nested_absmax + (at >> 8));  // 4 codes, one nested block
        } else {
          v[u] = __ldg(reinterpret_cast<const float4*>(sc.absmax + at));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + 4 * P * u;
      if (i < rows * nb && first + i < total) {
        float s[4];
        if constexpr (NESTED) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[e] = nested_scale(ncode[(q[u] >> (8 * e)) & 0xff], nested[u], offset);
        } else {
          s[0] = v[u].x, s[1] = v[u].y, s[2] = v[u].z, s[3] = v[u].w;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = static_cast<int>((static_cast<float>(i + e) + 0.5f) * inv_nb);
          dst[i + e + r] = s[e];
        }
      }
    }
  }
}
#endif

// `lo`: the shared-window address where dynamic shared memory starts (the block's reserved bytes),
// as the host laid it out; `nb`: quantization blocks a row, a multiple of 4; `stages`: the ring's
// stages (kWsMinStages..kWsMaxStages, at least 2 * MT); MT: row groups of 16 a tile.
template <typename T, bool NESTED, int NT, int MW, int MT>
__global__ void __launch_bounds__(ws_threads(MW), 1)
    gemm_4bit_ws_kernel(const T* __restrict__ x, int64_t M, const uint8_t* __restrict__ packed, int64_t N, int64_t K,
                        int bs_log2, Scales sc, int fp4, const Epilogue<T> epi, T* __restrict__ out, uint32_t lo,
                        int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint4 smem[];
  if (smem_u32(smem) != lo) __trap();  // the layout assumed another start: never launch it wrong
  const int nb = static_cast<int>(K >> bs_log2);
  constexpr int kRows = 16 * MT;  // a tile's rows
  static_assert(kStageSubs % MW == 0, "every math warp takes the same sub-blocks of a stage");
  const WsLayout L = ws_layout(lo, nb, K, NT, MW, stages, MT);
  char* base = reinterpret_cast<char*>(smem);
  uint8_t* ring = reinterpret_cast<uint8_t*>(base + L.ring);
  float* scales = reinterpret_cast<float*>(base + L.scales);  // [2][kRows][nb + 1]
  float* red = reinterpret_cast<float*>(base + L.red);
  float* ncode = reinterpret_cast<float*>(base + L.ncode);
  uint64_t* bars = reinterpret_cast<uint64_t*>(base + L.bars);
  uint64_t* full = bars;                                          // a stage's bytes arrived (the copy warp's expect_tx)
  uint64_t* empty = bars + kWsMaxStages;                          // every math thread is done with a stage
  uint64_t* sfull = bars + 2 * kWsMaxStages;                      // a scale buffer is decoded (the 32 scale-warp lanes)
  uint64_t* sempty = sfull + 2;                                   // every math thread is done with a scale buffer
  uint32_t* red_count = reinterpret_cast<uint32_t*>(sempty + 2);  // math warps done with a reduction buffer
  const int red_bufs = ws_red_bufs(K, stages, MT);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row_bytes = K >> 1;
  const int nsub = static_cast<int>(K / kSubK);
  const int nstage = static_cast<int>((row_bytes + kStageRowBytes - 1) / kStageRowBytes);  // k ranges a tile
  const int64_t tok_tiles = (M + 8 * NT - 1) / (8 * NT);
  const int64_t tiles = ((N + kRows - 1) / kRows) * tok_tiles;

  {  // the pair table: entry e of lane l at e * 256 + 4 * l
    uint4* lut = reinterpret_cast<uint4*>(base + L.lut);
    const float* code = fp4 ? kFP4Values<> : kNF4Values<>;
    for (int i = tid; i < 256 * 8; i += ws_threads(MW)) {
      const int e = i >> 3;
      const uint32_t v = pack_pair<T>(code[e >> 4], code[e & 15]);
      lut[e * 16 + (i & 7)] = make_uint4(v, v, v, v);
    }
  }
  if constexpr (NESTED) {
    for (int i = tid; i < 256; i += ws_threads(MW)) ncode[i] = sc.nested_code[i];
  }
  if (tid == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, MW * 32);
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(sfull + b, 32);
      mbar_init(sempty + b, MW * 32);
    }
    for (int b = 0; b < kWsMaxRedBufs; ++b) red_count[b] = 0;
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the table and barriers, for the copy engine
  __syncthreads();

  if (warp == MW) {  // the copy warp
    int slot = 0;
    uint32_t phase = 0;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t row0 = (tile / tok_tiles) * kRows;
      for (int sm = 0; sm < nstage * MT; ++sm) {
        const int st = sm / MT, m = sm % MT;  // k range st of row group m
        const int rows = static_cast<int>(max(int64_t{0}, min(int64_t{16}, N - row0 - 16 * m)));
        const uint32_t bytes =
            static_cast<uint32_t>(min(int64_t{kStageRowBytes}, row_bytes - int64_t{st} * kStageRowBytes));
        mbar_wait(empty + slot, phase ^ 1);
        if (lane == 0) mbar_arrive_expect_tx(full + slot, bytes * rows);
        __syncwarp();
        if (lane < rows)
          bulk_copy(ring + slot * kStageBytes + lane * kStagePitch,
                    packed + (row0 + 16 * m + lane) * row_bytes + int64_t{st} * kStageRowBytes, bytes, full + slot);
        if (++slot == stages) {
          slot = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }
  // The first tile's scales: decoded by every warp but the copy warp (which is already issuing the
  // first stages' copies), not by one scale warp while the math warps wait for that first buffer.
  constexpr int S = kWsScaleWarps;
  float offset = 0.f;
  if constexpr (NESTED) offset = *sc.offset;
  const int64_t total = N * nb;
  ws_decode_scales<NESTED>(scales, (blockIdx.x / tok_tiles) * kRows * nb, total, nb, kRows, sc, ncode, offset,
                           warp < MW ? tid : tid - 32, (MW + S) * 32);
  asm volatile("bar.sync 2, %0;\n" ::"n"((MW + S) * 32) : "memory");  // the copy warp has gone its way
  if (warp > MW) {  // the scale warps: warp MW + 1 + w serves the CTA's tiles w, w + S, ... from the second on
    int64_t local = warp - (MW + 1);
    if (local == 0) {
      mbar_arrive(sfull);  // the first tile's buffer, decoded above
      local = S;
    }
    for (int64_t tile = blockIdx.x + local * gridDim.x; tile < tiles; tile += S * gridDim.x, local += S) {
      const int buf = static_cast<int>(local & 1);
      mbar_wait(sempty + buf, static_cast<uint32_t>((local >> 1) & 1) ^ 1);
      ws_decode_scales<NESTED>(scales + buf * kRows * (nb + 1), (tile / tok_tiles) * kRows * nb, total, nb, kRows, sc,
                               ncode, offset, lane, 32);
      mbar_arrive(sfull + buf);
    }
    return;
  }

  // The math warps. (Opaque copies of the ring's address and the warp index, as below.)
  uint32_t ring_s = smem_u32(ring);
  asm volatile("" : "+r"(ring_s), "+l"(full), "+l"(empty));
  int my_warp = warp;
  asm volatile("" : "+r"(my_warp));
  const int g = lane >> 2, c = lane & 3;
  uint32_t lane_base = kWsLutAddress | (4u * static_cast<uint32_t>(lane));
  int lane_off = g * kStagePitch + 8 * c;  // the lane's bytes of row g in a stage
  asm volatile("" : "+r"(lane_base), "+r"(lane_off));
  const int sub_shift = bs_log2 - 6;
  int slot = 0;
  uint32_t phase = 0;
  int64_t local = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++local) {
    const int64_t row0 = (tile / tok_tiles) * kRows;
    const int64_t tok0 = (tile % tok_tiles) * (8 * NT);
    // The empty asm statements keep these in registers: without them the compiler recomputes the
    // clamped x row from the thread index at every stage (about 40 instructions a stage).
    const T* xrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      xrow[nt] = x + min(tok0 + 8 * nt + g, M - 1) * K + 16 * c;
      asm volatile("" : "+l"(xrow[nt]));
    }
    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[m][nt][q] = 0.f;
    const int buf = static_cast<int>(local & 1);
    mbar_wait(sfull + buf, static_cast<uint32_t>((local >> 1) & 1));
    uint32_t srow = smem_u32(scales + buf * kRows * (nb + 1) + g * (nb + 1));
    asm volatile("" : "+r"(srow));
    const uint32_t s1_off = 8 * (nb + 1) * 4;
    // x of sub-block `sub` of a stage whose x starts at xs.
    auto load_x = [&](const T* const(&xs)[NT], int sub, uint4(&xv)[NT][2]) {
      const T* xsub[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xsub[nt] = xs[nt] + sub * kSubK;
      load_sub_block_x<T, NT>(xsub, xv);
    };
    // Sub-block `sub` of the k range whose first sub-block is j0 (row group m's slot at stage[m]),
    // with its x in xv, for each row group.
    auto sub_block = [&](const uint32_t (&stage)[MT], int j0, int sub, const uint4(&xv)[NT][2]) {
      const uint32_t b = srow + 4 * static_cast<uint32_t>((j0 + sub) >> sub_shift);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const uint32_t bm = b + static_cast<uint32_t>(m) * 2 * s1_off;  // row group m: 16 rows on
        mma_sub_block_wide<T, NT, kStagePitch>(stage[m] + lane_off + sub * 32, lds_ring_f32(bm),
                                               lds_ring_f32(bm + s1_off), lane_base, xv, acc[m]);
      }
    };
    for (int st = 0; st < nstage; ++st) {
      // One token octet: the last warp to finish a tile adds every output's adapter term alone (below),
      // so its rows of B are prefetched, halfway through the tile's k ranges: early enough to hide the
      // loads, late enough that x's lines, which also pass through L1, do not evict them first. (Above
      // one octet every math warp takes a share of the epilogue, and the 16-warp kernels would spill.)
      if constexpr (NT == 1) {
        if (st == nstage / 2 && my_warp == 0) prefetch_lora_rows(epi, row0, min(int64_t{kRows}, N - row0), lane);
      }
      const int j0 = st * kStageSubs;
      const T* xs[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xs[nt] = xrow[nt] + int64_t{j0} * kSubK;
      uint32_t stage[MT], stage_slot[MT], stage_phase[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        stage[m] = ring_s + slot * kStageBytes;
        stage_slot[m] = slot;
        stage_phase[m] = phase;
        if (++slot == stages) {
          slot = 0;
          phase ^= 1;
        }
      }
      const auto wait_stages = [&] {
#pragma unroll
        for (int m = 0; m < MT; ++m) mbar_wait(full + stage_slot[m], stage_phase[m]);
      };
      // x is read before the wait for the stage's codes, so that its latency (L2 where L1 does not
      // hold x) passes while the codes arrive; not with 4 token octets, whose x of a stage would
      // take 64 registers a thread and more.
      if (NT <= 2 && j0 + kStageSubs <= nsub) {
        uint4 xv[kStageSubs / MW][NT][2];
#pragma unroll
        for (int u = 0; u < kStageSubs / MW; ++u) load_x(xs, u * MW + my_warp, xv[u]);
        wait_stages();
#pragma unroll
        for (int u = 0; u < kStageSubs / MW; ++u) sub_block(stage, j0, u * MW + my_warp, xv[u]);
      } else {
        wait_stages();
#pragma unroll
        for (int u = 0; u < kStageSubs / MW; ++u) {
          const int sub = u * MW + my_warp;
          if (j0 + sub < nsub) {
            uint4 xv[NT][2];
            load_x(xs, sub, xv);
            sub_block(stage, j0, sub, xv);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) mbar_arrive(empty + stage_slot[m]);
    }
    mbar_arrive(sempty + buf);

    // The warps' partial sums, added in warp order (the same bits run to run).
    if constexpr (NT == 1) {
      // One octet: buffer (local % red_bufs), added up by the last warp to get here (ws_red_bufs).
      const int rbuf = static_cast<int>(local % red_bufs);
      float* rb = red + rbuf * (MW * MT * 4 * 32);
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int q = 0; q < 4; ++q) rb[((warp * MT + m) * 4 + q) * 32 + lane] = acc[m][0][q];
      __syncwarp();  // the lanes' stores, ordered before lane 0's fence and count
      uint32_t last = 0;
      if (lane == 0) {
        __threadfence_block();  // with the count: a release of the warp's partial sums
        last = atomicAdd(red_count + rbuf, 1u) == MW - 1;
        if (last) __threadfence_block();  // with the count read: the acquire of the others'
      }
      last = __shfl_sync(0xffffffffu, last, 0);
      if (last) {
        __syncwarp();  // lane 0's acquire, for the loads of every lane (a shuffle orders no memory)
        // At one token only 8 lanes own an output, each adding 4 (MT = 2) adapter terms one after the
        // other; instead every lane takes one row's term, all at once, and hands it to the row's owner.
        // The same lora_up and the same roundings: the same bits.
        static_assert(16 * MT <= 32, "a lane a row of the tile: the shuffle reaches 32 lanes");
        const bool one_token = M == 1 && epi.lora_down != nullptr;
        float row_up = 0.f;
        if (one_token) {
          wait_for_previous_grid();  // down is the previous kernel's
          if (lane < 16 * MT && row0 + lane < N) row_up = lora_up(epi, 0, row0 + lane, N);
        }
#pragma unroll
        for (int mq = 0; mq < MT * 4; ++mq) {
          const int m = mq >> 2, q = mq & 3;
          const int in_tile = 16 * m + (lane >> 2) + 8 * (q >> 1);
          const int64_t row = row0 + in_tile;
          const int64_t tok = tok0 + 2 * (lane & 3) + (q & 1);
          const float up = one_token ? __shfl_sync(0xffffffffu, row_up, in_tile) : 0.f;
          if (row < N && tok < M) {
            float v = 0.f;
#pragma unroll
            for (int wi = 0; wi < MW; ++wi) v += rb[((wi * MT + m) * 4 + q) * 32 + lane];
            out[tok * N + row] =
                one_token ? finish_output_with_up(v, epi, row, up) : finish_output(v, epi, tok, row, N);
          }
        }
        // Reset for tile local + red_bufs: its first count comes after that warp's wait on a stage
        // (acquire) whose fill the copy warp announced (arrive.expect_tx, a release) after its own
        // wait for this warp's arrival on the next tile's stages (a release after this store).
        if (lane == 0) red_count[rbuf] = 0;
      }
    } else {
      // In rounds of up to 4 fragments (row group m, token octet nt; f = m * NT + nt), all math
      // warps meeting at a barrier twice a round.
      constexpr int kFrags = MT * NT;
      constexpr int kChunk = kFrags < 4 ? kFrags : 4;
#pragma unroll
      for (int f0 = 0; f0 < kFrags; f0 += kChunk) {
        float* mine = red + warp * (kChunk * 4 * 32);
#pragma unroll
        for (int fi = 0; fi < kChunk; ++fi)
#pragma unroll
          for (int q = 0; q < 4; ++q) mine[(fi * 4 + q) * 32 + lane] = acc[(f0 + fi) / NT][(f0 + fi) % NT][q];
        math_barrier<MW>();
        for (int idx = tid; idx < kChunk * 4 * 32; idx += MW * 32) {
          const int r = idx >> 5, ln = idx & 31, q = r & 3, f = f0 + (r >> 2);
          const int64_t row = row0 + 16 * (f / NT) + (ln >> 2) + 8 * (q >> 1);
          const int64_t tok = tok0 + 8 * (f % NT) + 2 * (ln & 3) + (q & 1);
          if (row < N && tok < M) {
            float v = 0.f;
#pragma unroll
            for (int wi = 0; wi < MW; ++wi) v += red[wi * (kChunk * 4 * 32) + idx];
            out[tok * N + row] = finish_output(v, epi, tok, row, N);
          }
        }
        math_barrier<MW>();
      }
    }
  }
#else
  __trap();  // built without sm_90 code (the host launches it only where it has that code)
#endif
}

// The deepest ring that fits, up to c.max_stages; the dispatch has checked (gemm_config_unfit) the
// GPU, the alignment, the blocks a row and that the layout fits.
template <typename T, bool NESTED, int NT, int MW, int MT>
void launch_ws(const FusedGemm& g, int max_stages) {
  static_assert(2 * MT <= kWsMinStages, "the math warps hold MT slots at once: the ring must hold two k ranges");
  const GemmProblem& p = g.p;
  const int64_t nb = p.K >> g.bs_log2;
  const int device = g.x2.get_device();
  const DeviceLimits lim = device_limits(device);
  const int stages = ws_ring_stages(lim.reserved, lim.smem_optin, nb, p.K, NT, MW, MT, max_stages);
  const size_t smem = ws_layout(lim.reserved, nb, p.K, NT, MW, stages, MT).total;
  auto kernel = gemm_4bit_ws_kernel<T, NESTED, NT, MW, MT>;
  const int64_t tiles = ((p.N + 16 * MT - 1) / (16 * MT)) * ((g.M + 8 * NT - 1) / (8 * NT));
  const int64_t grid = std::min<int64_t>(tiles, resident_ctas(kernel, ws_threads(MW), smem, device));
  launch_kernel(kernel, static_cast<unsigned>(grid), ws_threads(MW), smem, g.stream, g.after_previous,
                reinterpret_cast<const T*>(g.x2.const_data_ptr()), g.M, g.packed.const_data_ptr<uint8_t>(), p.N, p.K,
                g.bs_log2, g.sc, p.quant_type == QuantType::FP4 ? 1 : 0, epilogue_of<T>(g),
                reinterpret_cast<T*>(g.out.data_ptr()), lim.reserved, stages);
}

}  // namespace

void launch_gemm_ws(const WsConfig& c, const FusedGemm& g) {
  with_types(g, [&](auto t, auto nested) {
    using T = typename decltype(t)::type;
    constexpr bool NESTED = decltype(nested)::value;
    const int mt = c.row_groups, nt = c.token_octets, mw = c.math_warps;
    if (mt == 1 && nt == 1 && mw == 8) return launch_ws<T, NESTED, 1, 8, 1>(g, c.max_stages);
    if (mt == 1 && nt == 2 && mw == 16) return launch_ws<T, NESTED, 2, 16, 1>(g, c.max_stages);
    if (mt == 2 && nt == 1 && mw == 8) return launch_ws<T, NESTED, 1, 8, 2>(g, c.max_stages);
    if (mt == 2 && nt == 2 && mw == 8) return launch_ws<T, NESTED, 2, 8, 2>(g, c.max_stages);
    if (mt == 2 && nt == 4 && mw == 8) return launch_ws<T, NESTED, 4, 8, 2>(g, c.max_stages);
    TORCH_CHECK(false, "gemm_4bit: no warp-specialized kernel of ", mt, " row groups, ", nt, " token octets, ", mw,
                " math warps");
  });
}

// The kernels' body exists only in sm_90 code: a build whose list lacks 9.0 has the 8.0 PTX's,
// a trap, for the driver to compile. (Every instantiation has the same targets: one tells.)
bool ws_kernels_have_sm90_code(int device) {
  return runs_sm90_code(reinterpret_cast<const void*>(gemm_4bit_ws_kernel<__nv_bfloat16, true, 1, 8, 2>), device);
}

}  // namespace qlora::cuda
