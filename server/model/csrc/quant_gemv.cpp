// Quantized weights times a few rows of activations (prefloop's native engine, decode steps).
//
//   int4_gemv(x [n, K], packed uint8 [N/16, K/32, 320])        -> [n, N] in x's dtype
//   int8_gemv(x [n, K], packed uint8 [N/16, K/32, 512], scales float32 [N]) -> [n, N]
//   quant_gemv_isa() -> str     "avx512-vnni", "avx2" (the fast paths below) or "portable" (plain loops)
//
// One decode stream is bound by the bytes of weights read per token; torch's int4 / int8 CPU
// kernels convert each weight to float and multiply in float: a one-stream int4 step's matmuls took
// 5.6 ms with them and 3.3 ms with these (docs/performance.md). As llama.cpp does, these multiply integers:
// each row of x is quantized to int8 in groups of 32 inputs (one float scale per group, absmax /
// 127), and vpdpbusd adds 64 products of unsigned weight bytes and signed activation bytes per
// instruction into 16 int32 lanes, one lane per output (AVX512-VNNI; on AVX2, vpmaddubsw +
// vpmaddwd do the same in two instructions per 32 products).
//
// Weights are stored per block of 16 outputs and group of 32 inputs, in the order the lanes read
// them: a 64-byte vector holds 4 consecutive inputs of each of the 16 outputs (lane j: bytes
// 4j..4j+3).
// - int4 (server/model/int4.py, w = (q - 8) * s + z per output and group, q in 0..15): 256 bytes of
//   nibbles, vector c (0..3) holding inputs 8c..8c+3 in its low nibbles and 8c+4..8c+7 in its high
//   ones, then the group's 16 scales s and 16 zeros z in bfloat16. A group adds
//   d * (s * (Σ q a - 8 Σ a) + z * Σ a), with a the activations' int8 values and d their scale.
// - int8 (server/model/quantize.py, w = q * scale per output row): 512 bytes of q + 128 (unsigned
//   for vpdpbusd), vector c holding inputs 4c..4c+3; a group adds d * (Σ (q + 128) a - 128 Σ a),
//   and the row's scale multiplies the sum at the end.
// Up to 4 rows of x share each load of the weights. Blocks of outputs go to torch's thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "vec_math.h"

#if defined(PREFLOOP_AVX512) && defined(__AVX512VNNI__)
#define PREFLOOP_VNNI 1
#endif

namespace {

using prefloop_vec::to_float;

constexpr int64_t kGroup = 32;       // inputs per activation / weight group
constexpr int64_t kInt4Bytes = 320;  // bytes per (block of 16 outputs, group): 256 nibbles + 16 s + 16 z
constexpr int64_t kInt8Bytes = 512;  // bytes per (block of 16 outputs, group)
constexpr int kMaxRows = 4;          // rows of x that share a pass over the weights

// One row of x as int8 in groups of 32: a[k], scale d[g] (x ≈ d * a) and Σ a over the group.
struct QuantRow {
  std::vector<int8_t> a;
  std::vector<float> d;
  std::vector<int32_t> sum;
};

template <typename T>
void quantize_row(const T* x, int64_t K, QuantRow& q) {
  const int64_t groups = K / kGroup;
  q.a.resize(K);
  q.d.resize(groups);
  q.sum.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const T* xg = x + g * kGroup;
    float amax = 0.f;
    for (int64_t k = 0; k < kGroup; ++k) amax = std::max(amax, std::abs(to_float(xg[k])));
    const float d = amax / 127.f;
    int32_t s = 0;
    for (int64_t k = 0; k < kGroup; ++k) {  // x / d, not x * (1 / d): the same ties as the oracle
      const int32_t v = d > 0.f ? static_cast<int32_t>(std::nearbyint(to_float(xg[k]) / d)) : 0;
      q.a[g * kGroup + k] = static_cast<int8_t>(std::clamp(v, -127, 127));
      s += q.a[g * kGroup + k];
    }
    q.d[g] = d;
    q.sum[g] = s;
  }
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// out[r][0:16] = the 16 outputs of block `w` (groups x bytes_per_group) for rows r < R.
template <int R, bool Int4>
void block_outputs(const uint8_t* w, int64_t groups, const QuantRow* const* rows, const float* row_scale,
                   float (*out)[16]) {
#if defined(PREFLOOP_VNNI)
  constexpr int64_t stride = Int4 ? kInt4Bytes : kInt8Bytes;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 res[R];
  for (int r = 0; r < R; ++r) res[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * stride;
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    if constexpr (Int4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(p + 64 * c);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {
          const int8_t* a = rows[r]->a.data() + g * kGroup + 8 * c;
          int32_t a_lo, a_hi;
          std::memcpy(&a_lo, a, 4);
          std::memcpy(&a_hi, a + 4, 4);
          acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(a_lo));
          acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(a_hi));
        }
      }
      const __m512 s = prefloop_vec::widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 256)));
      const __m512 z = prefloop_vec::widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 288)));
      for (int r = 0; r < R; ++r) {
        const int32_t sum = rows[r]->sum[g];
        const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], _mm512_set1_epi32(8 * sum)));
        const __m512 part = _mm512_fmadd_ps(s, t, _mm512_mul_ps(z, _mm512_set1_ps(static_cast<float>(sum))));
        res[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r]->d[g]), part, res[r]);
      }
    } else {
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_loadu_si512(p + 64 * c);
        for (int r = 0; r < R; ++r) {
          int32_t a4;
          std::memcpy(&a4, rows[r]->a.data() + g * kGroup + 4 * c, 4);
          acc[r] = _mm512_dpbusd_epi32(acc[r], v, _mm512_set1_epi32(a4));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], _mm512_set1_epi32(128 * rows[r]->sum[g])));
        res[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r]->d[g]), t, res[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (!Int4) res[r] = _mm512_mul_ps(res[r], _mm512_loadu_ps(row_scale));
    _mm512_storeu_ps(out[r], res[r]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  // AVX2 (no VNNI): each 64-byte vector as two halves of 8 outputs. vpmaddubsw multiplies unsigned
  // weight bytes by signed activation bytes and adds pairs into int16, vpmaddwd by ones widens to
  // int32. int4: a product is at most 15 * 127, so a group's 8 int16 partial sums (16 products per
  // lane) fit in int16 before one widening. int8: 255 * 127 * 2 would saturate int16, so the
  // weight bytes go back to signed q (xor 0x80) and the activations' signs move onto them
  // (vpsignb), as llama.cpp does: |a| * ±q, at most 2 * 127 * 127 per pair; the sum is then Σ q a.
  constexpr int64_t stride = Int4 ? kInt4Bytes : kInt8Bytes;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 res[R][2];
  for (int r = 0; r < R; ++r) res[r][0] = res[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * stride;
    for (int h = 0; h < 2; ++h) {  // outputs 8h..8h+7: bytes 32h..32h+31 of every 64-byte vector
      __m256i acc[R];
      if constexpr (Int4) {
        __m256i sum16[R];
        for (int r = 0; r < R; ++r) sum16[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h));
          const __m256i lo = _mm256_and_si256(v, nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          for (int r = 0; r < R; ++r) {
            const int8_t* a = rows[r]->a.data() + g * kGroup + 8 * c;
            int32_t a_lo, a_hi;
            std::memcpy(&a_lo, a, 4);
            std::memcpy(&a_hi, a + 4, 4);
            sum16[r] = _mm256_add_epi16(sum16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a_lo)));
            sum16[r] = _mm256_add_epi16(sum16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a_hi)));
          }
        }
        for (int r = 0; r < R; ++r) acc[r] = _mm256_madd_epi16(sum16[r], ones);
      } else {
        const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          const __m256i q = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h)), flip);
          for (int r = 0; r < R; ++r) {
            int32_t a4;
            std::memcpy(&a4, rows[r]->a.data() + g * kGroup + 4 * c, 4);
            const __m256i a = _mm256_set1_epi32(a4);
            const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(q, a));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(prod, ones));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const int32_t sum = rows[r]->sum[g];
        const __m256 d = _mm256_set1_ps(rows[r]->d[g]);
        if constexpr (Int4) {
          const __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 256 + 16 * h))), 16));
          const __m256 zv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 288 + 16 * h))), 16));
          const __m256 t = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r], _mm256_set1_epi32(8 * sum)));
          const __m256 part = _mm256_fmadd_ps(sv, t, _mm256_mul_ps(zv, _mm256_set1_ps(static_cast<float>(sum))));
          res[r][h] = _mm256_fmadd_ps(d, part, res[r][h]);
        } else {
          res[r][h] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(acc[r]), res[r][h]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256 v = res[r][h];
      if constexpr (!Int4) v = _mm256_mul_ps(v, _mm256_loadu_ps(row_scale + 8 * h));
      _mm256_storeu_ps(out[r] + 8 * h, v);
    }
#else
  constexpr int64_t stride = Int4 ? kInt4Bytes : kInt8Bytes;
  for (int r = 0; r < R; ++r) std::fill(out[r], out[r] + 16, 0.f);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * stride;
    for (int r = 0; r < R; ++r) {
      const int8_t* a = rows[r]->a.data() + g * kGroup;
      const int32_t sum = rows[r]->sum[g];
      for (int j = 0; j < 16; ++j) {
        int32_t acc = 0;
        for (int k = 0; k < kGroup; ++k) {
          int32_t q;
          if constexpr (Int4) {
            const int c = k / 8, hi = (k % 8) / 4, b = k % 4;
            q = (p[64 * c + 4 * j + b] >> (4 * hi)) & 0x0F;
          } else {
            q = p[64 * (k / 4) + 4 * j + k % 4];
          }
          acc += q * a[k];
        }
        if constexpr (Int4) {
          uint16_t sb, zb;
          std::memcpy(&sb, p + 256 + 2 * j, 2);
          std::memcpy(&zb, p + 288 + 2 * j, 2);
          out[r][j] += rows[r]->d[g] * (bf16_bits_to_float(sb) * static_cast<float>(acc - 8 * sum) +
                                        bf16_bits_to_float(zb) * static_cast<float>(sum));
        } else {
          out[r][j] += rows[r]->d[g] * static_cast<float>(acc - 128 * sum);
        }
      }
    }
  }
  if constexpr (!Int4)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 16; ++j) out[r][j] *= row_scale[j];
#endif
}

template <bool Int4, typename T>
void gemv(const T* x, int64_t n, int64_t K, const uint8_t* w, int64_t blocks, const float* scales,
          T* y, int64_t N) {
  const int64_t groups = K / kGroup;
  std::vector<QuantRow> quant(n);
  for (int64_t i = 0; i < n; ++i) quantize_row(x + i * K, K, quant[i]);
  const int64_t block_bytes = groups * (Int4 ? kInt4Bytes : kInt8Bytes);
  // a task of at least ~64 KB of weights: below that a fork costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / block_bytes);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float out[kMaxRows][16];
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* wb = w + b * block_bytes;
      const float* rs = Int4 ? nullptr : scales + 16 * b;
      for (int64_t i0 = 0; i0 < n; i0 += kMaxRows) {
        const QuantRow* rows[kMaxRows];
        const int m = static_cast<int>(std::min<int64_t>(kMaxRows, n - i0));
        for (int r = 0; r < m; ++r) rows[r] = &quant[i0 + r];
        switch (m) {
          case 1: block_outputs<1, Int4>(wb, groups, rows, rs, out); break;
          case 2: block_outputs<2, Int4>(wb, groups, rows, rs, out); break;
          case 3: block_outputs<3, Int4>(wb, groups, rows, rs, out); break;
          default: block_outputs<4, Int4>(wb, groups, rows, rs, out); break;
        }
        for (int r = 0; r < m; ++r) {
          T* yr = y + (i0 + r) * N + 16 * b;
          for (int j = 0; j < 16; ++j) yr[j] = static_cast<T>(out[r][j]);
        }
      }
    }
  });
}

at::Tensor run(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor* scales, bool int4) {
  TORCH_CHECK(x_in.device().is_cpu() && packed.device().is_cpu(), "quantized gemv: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2, "x must be [rows, in_features]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.is_contiguous(),
              "packed weights must be a contiguous uint8 [blocks, groups, bytes] tensor");
  const int64_t K = x_in.size(1), blocks = packed.size(0), N = 16 * blocks;
  TORCH_CHECK(packed.size(1) * kGroup == K, "x has ", K, " inputs; the weights have ", packed.size(1),
              " groups of ", kGroup);
  TORCH_CHECK(packed.size(2) == (int4 ? kInt4Bytes : kInt8Bytes), "packed weights: wrong group size");
  if (scales != nullptr)
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == N,
                "scales must be a contiguous float32 tensor of ", N, " output scales");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* s = scales != nullptr ? scales->data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    if (int4) gemv<true>(x.data_ptr<float>(), x.size(0), K, w, blocks, s, y.data_ptr<float>(), N);
    else gemv<false>(x.data_ptr<float>(), x.size(0), K, w, blocks, s, y.data_ptr<float>(), N);
  } else {
    auto* xp = reinterpret_cast<const c10::BFloat16*>(x.data_ptr());
    auto* yp = reinterpret_cast<c10::BFloat16*>(y.data_ptr());
    if (int4) gemv<true>(xp, x.size(0), K, w, blocks, s, yp, N);
    else gemv<false>(xp, x.size(0), K, w, blocks, s, yp, N);
  }
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed) { return run(x, packed, nullptr, true); }

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  return run(x, packed, &scales, false);
}

std::string quant_gemv_isa() {
#if defined(PREFLOOP_VNNI)
  return "avx512-vnni";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefloop_kernels, m) {
  m.def("int4_gemv(Tensor x, Tensor packed) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("quant_gemv_isa() -> str");
  m.impl("int4_gemv", c10::DispatchKey::CPU, &int4_gemv);
  m.impl("int8_gemv", c10::DispatchKey::CPU, &int8_gemv);
  m.impl("quant_gemv_isa", c10::DispatchKey::CatchAll, &quant_gemv_isa);
}
