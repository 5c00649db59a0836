// CPU kernels of the blockwise 4-bit format: quantize_4bit, quantize_absmax, dequantize_absmax,
// dequantize_4bit. They reproduce bitsandbytes 0.50.2's CPU path bit for bit:
// - 4-bit quantize: bitsandbytes runs torch ops there (backends/default/ops.py): absmax over the block
//   (NaN propagates), scale by the float32 reciprocal of max(absmax, 1e-38) (the last partial block
//   divides instead), bucketize against the float32 midpoints of the sorted code values.
// - double quantization: offset is torch's mean of the absmax; the 8-bit codes come from its C++
//   kernel's 65536-entry table over [-1, 1] (cquantize_blockwise_cpu_fp32).
// - dequantize: code value times the float32 scale, rounded to the output dtype to nearest even.
// Multi-threaded over blocks with at::parallel_for; the hot loops are compiled twice (AVX2 and
// baseline x86-64) and chosen at load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>

#if defined(__x86_64__)
#include <immintrin.h>
#define QLORA_X86 1
#else
#define QLORA_X86 0
#endif

#include "qlora/codebooks.h"
#include "qlora/format.h"
#include "qlora/kernels.h"

namespace qlora::cpu {
namespace {

#if QLORA_X86 && defined(__GNUC__)
#define QLORA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define QLORA_CLONES
#endif

// Rank of a scaled value among the sorted code values, the way torch.bucketize(right=False) finds
// it: the number of midpoints strictly below the value, and the top rank for NaN.
struct CodeSearch {
  float bounds[15];
  uint8_t code_of_rank[16];
};

CodeSearch make_code_search(const float* code) {
  std::array<int, 16> order;
  std::iota(order.begin(), order.end(), 0);
  // torch.argsort orders FP4's two zeros (codes 0 and 8) by index; a stable sort does the same.
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return code[a] < code[b]; });
  CodeSearch cs{};
  for (int i = 0; i < 15; ++i) cs.bounds[i] = (code[order[i]] + code[order[i + 1]]) / 2.0f;
  for (int i = 0; i < 16; ++i) cs.code_of_rank[i] = static_cast<uint8_t>(order[i]);
  return cs;
}

const CodeSearch& code_search(QuantType qt) {
  static const CodeSearch nf4 = make_code_search(kNF4Code);
  static const CodeSearch fp4 = make_code_search(kFP4Code);
  return qt == QuantType::NF4 ? nf4 : fp4;
}

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Quantizes blocks [b0, b1) of n elements. `buf` and `rank` hold one block. Each pass is a plain
// loop over the block that the compiler vectorizes (the bounds are copied to a local array: stores
// through the uint8_t rank pointer could otherwise alias them and force a reload per element).
template <typename T>
inline __attribute__((always_inline)) void quantize_4bit_blocks(const T* A, int64_t n, int64_t blocksize,
                                                                const CodeSearch& cs, uint8_t* packed, float* absmax,
                                                                int64_t b0, int64_t b1, float* buf, uint8_t* rank) {
  float bounds[15];
  for (int k = 0; k < 15; ++k) bounds[k] = cs.bounds[k];
  uint8_t code_of_rank[16];
  for (int k = 0; k < 16; ++k) code_of_rank[k] = cs.code_of_rank[k];
  // NF4: each code is its rank
  const bool identity = std::is_sorted(std::begin(code_of_rank), std::end(code_of_rank));
  int zero_rank = 0;  // the rank of a padding 0.0
  for (int k = 0; k < 15; ++k) zero_rank += 0.0f > bounds[k];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const T* src = A + start;
    // |x| as bits: for non-NaN floats their unsigned order is the float order, and every NaN sorts
    // above infinity, so an integer max finds torch's NaN-propagating max and vectorizes.
    uint32_t max_bits = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float x = to_float(src[i]);
      buf[i] = x;
      max_bits = std::max(max_bits, std::bit_cast<uint32_t>(x) & 0x7fffffffu);
    }
    const float am = std::bit_cast<float>(max_bits);
    absmax[b] = am;
    const float clamped = std::isnan(am) ? am : std::max(am, 1e-38f);
    if (len == blocksize) {
      const float recip = 1.0f / clamped;
      for (int64_t i = 0; i < len; ++i) buf[i] = buf[i] * recip;
    } else {
      for (int64_t i = 0; i < len; ++i) buf[i] = buf[i] / clamped;
    }
    // One pass a midpoint: the compiler vectorizes these loops over the block (it leaves a loop
    // over the 15 midpoints inside a loop over the elements scalar).
    for (int64_t i = 0; i < len; ++i) rank[i] = 0;
    for (int k = 0; k < 15; ++k) {
      const float bound = bounds[k];
      for (int64_t i = 0; i < len; ++i) rank[i] += buf[i] > bound ? 1 : 0;
    }
    for (int64_t i = 0; i < len; ++i) rank[i] = buf[i] != buf[i] ? 15 : rank[i];
    uint8_t* dst = packed + start / 2;
    const int64_t pairs = len / 2;
    if (identity) {
      for (int64_t j = 0; j < pairs; ++j) dst[j] = static_cast<uint8_t>(rank[2 * j] << 4 | rank[2 * j + 1]);
    } else {
      for (int64_t j = 0; j < pairs; ++j)
        dst[j] = static_cast<uint8_t>(code_of_rank[rank[2 * j]] << 4 | code_of_rank[rank[2 * j + 1]]);
    }
    if (len & 1) dst[pairs] = static_cast<uint8_t>(code_of_rank[rank[len - 1]] << 4 | code_of_rank[zero_rank]);
  }
}

#define QLORA_DEFINE_QUANTIZE_4BIT(T, NAME)                                                               \
  QLORA_CLONES void NAME(const T* A, int64_t n, int64_t blocksize, const CodeSearch& cs, uint8_t* packed, \
                         float* absmax, int64_t b0, int64_t b1, float* buf, uint8_t* rank) {              \
    quantize_4bit_blocks<T>(A, n, blocksize, cs, packed, absmax, b0, b1, buf, rank);                      \
  }
QLORA_DEFINE_QUANTIZE_4BIT(float, quantize_4bit_blocks_f32)
QLORA_DEFINE_QUANTIZE_4BIT(c10::Half, quantize_4bit_blocks_f16)
QLORA_DEFINE_QUANTIZE_4BIT(c10::BFloat16, quantize_4bit_blocks_bf16)
#undef QLORA_DEFINE_QUANTIZE_4BIT

// Roughly 64 Ki elements a task: enough work to amortize the thread hand-off.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A_in, int64_t blocksize,
                                                     c10::string_view quant_type) {
  const QuantType qt = check_quantize_4bit_args(A_in, blocksize, quant_type);
  const at::Tensor A = A_in.contiguous();
  const int64_t n = A.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, A.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const CodeSearch& cs = code_search(qt);
  uint8_t* packed_ptr = packed.data_ptr<uint8_t>();
  float* absmax_ptr = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(blocksize);
    std::vector<uint8_t> rank(blocksize);
    switch (A.scalar_type()) {
      case at::kFloat:
        quantize_4bit_blocks_f32(A.const_data_ptr<float>(), n, blocksize, cs, packed_ptr, absmax_ptr, b0, b1,
                                 buf.data(), rank.data());
        break;
      case at::kHalf:
        quantize_4bit_blocks_f16(A.const_data_ptr<c10::Half>(), n, blocksize, cs, packed_ptr, absmax_ptr, b0, b1,
                                 buf.data(), rank.data());
        break;
      default:
        quantize_4bit_blocks_bf16(A.const_data_ptr<c10::BFloat16>(), n, blocksize, cs, packed_ptr, absmax_ptr, b0, b1,
                                  buf.data(), rank.data());
    }
  });
  return {packed, absmax};
}

// bitsandbytes' CPU 8-bit quantizer: [-1, 1] cut into 65536 points, each mapped to the code whose
// midpoints bracket it; a value takes the entry of its point, rounded half up.
constexpr int kLutSize = 65536;

const std::array<uint8_t, kLutSize>& dynamic_map_lut() {
  static const std::array<uint8_t, kLutSize> lut = [] {
    std::array<uint8_t, kLutSize> t{};
    float mid[255];
    for (int i = 0; i < 255; ++i) mid[i] = 0.5f * (kDynamicMapSigned[i] + kDynamicMapSigned[i + 1]);
    int code = 0;
    for (int i = 0; i < kLutSize; ++i) {
      const float val = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kLutSize - 1);
      while (code < 255 && mid[code] < val) ++code;
      t[i] = static_cast<uint8_t>(code);
    }
    return t;
  }();
  return lut;
}

QLORA_CLONES void quantize_absmax_blocks(const float* absmax, float offset, int64_t n, int64_t blocksize,
                                         const uint8_t* lut, uint8_t* q, float* nested_absmax, int64_t b0, int64_t b1,
                                         float* buf) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    float am = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
      const float v = absmax[start + i] - offset;
      buf[i] = v;
      // NaN is skipped, as bitsandbytes' kernel does.
      const float a = std::fabs(v);
      am = a > am ? a : am;
    }
    nested_absmax[b] = am;
    uint8_t* dst = q + start;
    if (am == 0.0f) {
      std::memset(dst, 0, len);
      continue;
    }
    const float inv = 1.0f / am;
    for (int64_t i = 0; i < len; ++i) {
      float x = buf[i] * inv;
      x = x > -1.0f ? x : -1.0f;  // max then min as SIMD does them: NaN lands on -1
      x = x < 1.0f ? x : 1.0f;
      const float t = (x + 1.0f) * 0.5f * static_cast<float>(kLutSize - 1) + 0.5f;
      dst[i] = lut[static_cast<uint16_t>(t)];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_absmax_cpu(const at::Tensor& absmax_in, int64_t blocksize) {
  check_quantize_absmax_args(absmax_in, blocksize);
  const at::Tensor absmax = absmax_in.contiguous();
  const int64_t n = absmax.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty({n}, absmax.options().dtype(at::kByte));
  at::Tensor nested = at::empty({nblocks}, absmax.options());
  // torch's own mean, so that the offset is bitsandbytes' to the bit; an empty tensor gets 0.
  at::Tensor offset = n == 0 ? at::zeros({}, absmax.options()) : absmax.mean();
  if (n == 0) return {q, nested, offset};
  const float off = offset.item<float>();
  const uint8_t* lut = dynamic_map_lut().data();
  const float* src = absmax.const_data_ptr<float>();
  uint8_t* q_ptr = q.data_ptr<uint8_t>();
  float* nested_ptr = nested.data_ptr<float>();
  at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(blocksize);
    quantize_absmax_blocks(src, off, n, blocksize, lut, q_ptr, nested_ptr, b0, b1, buf.data());
  });
  return {q, nested, offset};
}

// The float32 scale of 4-bit block b: stored, or decoded from the double quantization as
// bitsandbytes does it, a product and then a sum, each rounded.
struct Scales {
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;

  float operator()(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    // nested_blocksize is 256 (checked): a shift, not a 64-bit division per block
    const float scaled = nested_code[qabsmax[b]] * nested_absmax[b >> 8];
    return scaled + offset;
  }
};

Scales make_scales(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                   const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                   std::vector<at::Tensor>& keep) {
  Scales s;
  if (!nested_absmax.has_value()) {
    keep.push_back(absmax.contiguous());
    s.absmax = keep.back().const_data_ptr<float>();
    return s;
  }
  keep.push_back(absmax.contiguous());
  s.qabsmax = keep.back().const_data_ptr<uint8_t>();
  keep.push_back(nested_absmax->contiguous());
  s.nested_absmax = keep.back().const_data_ptr<float>();
  keep.push_back(nested_code->contiguous());
  s.nested_code = keep.back().const_data_ptr<float>();
  s.offset = offset->item<float>();
  return s;
}

inline void store(float* p, float v) { *p = v; }
inline void store(c10::Half* p, float v) { *p = c10::Half(v); }
inline void store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }

template <typename T>
void dequantize_scalar(const uint8_t* packed, const float* lut, float scale, int64_t start, int64_t len, T* out) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t e = start + i;
    const uint8_t byte = packed[e >> 1];
    const int nib = (e & 1) ? (byte & 0x0f) : (byte >> 4);
    store(out + e, lut[nib] * scale);
  }
}

#if QLORA_X86
// Blocks [b0, b1): 16 elements from 8 packed bytes at a time. The nibbles, in element order, index
// the two 8-float halves of the code table (vpermps); bit 3 picks the half. The table and the
// constants live in registers across blocks: per-block setup would cost as much as a 64-element
// block's work.
template <typename T>
__attribute__((target("avx2,f16c"))) void dequantize_blocks_avx2(const uint8_t* packed, const float* lut,
                                                                 const Scales& scales, int64_t n, int64_t blocksize,
                                                                 int64_t b0, int64_t b1, T* out) {
  const __m256 lut_lo = _mm256_loadu_ps(lut);
  const __m256 lut_hi = _mm256_loadu_ps(lut + 8);
  const __m128i mask4 = _mm_set1_epi8(0x0f);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i round_bias = _mm256_set1_epi32(0x7fff);
  const __m256i bf16_nan = _mm256_set1_epi32(0x7fc0);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const float scale = scales(b);
    const __m256 vscale = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const int64_t e = start + i;
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (e >> 1)));
      const __m128i nibbles =
          _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), mask4), _mm_and_si128(raw, mask4));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i idx = _mm256_cvtepu8_epi32(h == 0 ? nibbles : _mm_srli_si128(nibbles, 8));
        const __m256 code =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx),
                             _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        const __m256 v = _mm256_mul_ps(code, vscale);
        T* dst = out + e + 8 * h;
        if constexpr (std::is_same_v<T, float>) {
          _mm256_storeu_ps(dst, v);
        } else if constexpr (std::is_same_v<T, c10::Half>) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        } else {
          // Round to nearest even, NaN to 0x7fc0: c10::BFloat16's conversion, eight at a time.
          const __m256i bits = _mm256_castps_si256(v);
          const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
          __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, round_bias)), 16);
          r = _mm256_blendv_epi8(r, bf16_nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                           _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
        }
      }
    }
    dequantize_scalar(packed, lut, scale, start + i, len - i, out);
  }
}

// float32 bits plus the round-to-nearest-even bias: the bfloat16 sits in the high half (NaN: 0x7fc0).
__attribute__((target("avx512f"))) inline __m512i bf16_rounded_high(__m512 v, __m512i one, __m512i round_bias,
                                                                    __m512i nan_bits) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
  const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, round_bias));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, nan_bits);
}

// The same with AVX-512: 32 elements (16 packed bytes) an iteration, one vpermps over the whole
// 16-entry table per 16 elements, and bfloat16 rounded in integers with the two vectors' high halves
// gathered by one vpermt2w. About twice the AVX2 path's throughput (2-core Sapphire Rapids VM).
template <typename T>
__attribute__((target("avx512f,avx512bw"))) void dequantize_blocks_avx512(const uint8_t* packed, const float* lut,
                                                                          const Scales& scales, int64_t n,
                                                                          int64_t blocksize, int64_t b0, int64_t b1,
                                                                          T* out) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m128i mask4 = _mm_set1_epi8(0x0f);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i round_bias = _mm512_set1_epi32(0x7fff);
  const __m512i nan_bits = _mm512_set1_epi32(0x7fc00000);
  // 16-bit word j of the result: the high half of 32-bit lane j of (r0, r1).
  alignas(64) int16_t high_halves[32];
  for (int j = 0; j < 32; ++j) high_halves[j] = static_cast<int16_t>(2 * j + 1);
  const __m512i pick_high = _mm512_load_si512(high_halves);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const float scale = scales(b);
    const __m512 vscale = _mm512_set1_ps(scale);
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
      const int64_t e = start + i;
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (e >> 1)));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
      const __m128i lo = _mm_and_si128(raw, mask4);
      const __m512 v0 =
          _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), table), vscale);
      const __m512 v1 =
          _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), table), vscale);
      T* dst = out + e;
      if constexpr (std::is_same_v<T, float>) {
        _mm512_storeu_ps(dst, v0);
        _mm512_storeu_ps(dst + 16, v1);
      } else if constexpr (std::is_same_v<T, c10::Half>) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
      } else {
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(bf16_rounded_high(v0, one, round_bias, nan_bits), pick_high,
                                                           bf16_rounded_high(v1, one, round_bias, nan_bits)));
      }
    }
    dequantize_scalar(packed, lut, scale, start + i, len - i, out);
  }
}

// The widest SIMD path this CPU runs; QLORA_CPU_ISA=avx2 or =scalar caps it (the tests run every
// path that way on a machine that would otherwise only take the widest).
enum class Isa { Scalar, Avx2, Avx512 };

Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Scalar;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) best = Isa::Avx2;
    if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
      best = Isa::Avx512;
    const char* cap = std::getenv("QLORA_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "scalar") == 0) return Isa::Scalar;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::Avx512) return Isa::Avx2;
    return best;
  }();
  return isa;
}
#endif

template <typename T>
void dequantize_4bit_blocks(const uint8_t* packed, const float* lut, const Scales& scales, int64_t n, int64_t blocksize,
                            int64_t b0, int64_t b1, T* out) {
#if QLORA_X86
  const Isa isa = cpu_isa();
  if (isa == Isa::Avx512) {
    dequantize_blocks_avx512(packed, lut, scales, n, blocksize, b0, b1, out);
    return;
  }
  if (isa == Isa::Avx2) {
    dequantize_blocks_avx2(packed, lut, scales, n, blocksize, b0, b1, out);
    return;
  }
#endif
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    dequantize_scalar(packed, lut, scales(b), start, std::min(blocksize, n - start), out);
  }
}

}  // namespace

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed_in, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               c10::SymIntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = shape_numel(shape, "dequantize_4bit");
  const QuantType qt = check_dequantize_4bit_args(packed_in, absmax, nested_absmax, nested_code, offset, blocksize,
                                                  nested_blocksize, quant_type, n, dtype);
  at::Tensor out = at::empty_symint(shape, packed_in.options().dtype(dtype));
  if (n == 0) return out;
  const at::Tensor packed = packed_in.contiguous();
  std::vector<at::Tensor> keep;
  const Scales scales = make_scales(absmax, nested_absmax, nested_code, offset, keep);
  // FP4 code 0b1000 decodes to +0.0 here: the spec's table times the scale, as bitsandbytes' portable
  // CPU path (its AVX-512 path and its CUDA kernels give -0.0; ours on CUDA does too).
  const float* lut = qt == QuantType::NF4 ? kNF4Code : kFP4Code;
  const uint8_t* packed_ptr = packed.const_data_ptr<uint8_t>();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::parallel_for(0, nblocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    switch (dtype) {
      case at::kFloat:
        dequantize_4bit_blocks(packed_ptr, lut, scales, n, blocksize, b0, b1, out.data_ptr<float>());
        break;
      case at::kHalf:
        dequantize_4bit_blocks(packed_ptr, lut, scales, n, blocksize, b0, b1, out.data_ptr<c10::Half>());
        break;
      default: dequantize_4bit_blocks(packed_ptr, lut, scales, n, blocksize, b0, b1, out.data_ptr<c10::BFloat16>());
    }
  });
  return out;
}

namespace {

at::Tensor dequantize_absmax_cpu(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                 const at::Tensor& nested_code, const at::Tensor& offset, int64_t blocksize) {
  const int64_t n = check_dequantize_absmax_args(qabsmax, nested_absmax, nested_code, offset, blocksize);
  static_assert(kNestedBlocksize == 256, "Scales shifts by 8");
  at::Tensor out = at::empty({n}, qabsmax.options().dtype(at::kFloat));
  if (n == 0) return out;
  std::vector<at::Tensor> keep;
  const Scales scales = make_scales(qabsmax, nested_absmax, nested_code, offset, keep);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, 65536, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = scales(i);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("quantize_absmax", &quantize_absmax_cpu);
  m.impl("dequantize_absmax", &dequantize_absmax_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace qlora::cpu
