// Small (mostly AVX-512) helpers shared by prefloop's CPU kernels (paged_decode.cpp, fused_ops.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace prefloop_vec {
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
}  // namespace prefloop_vec

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PREFLOOP_AVX512 1
#include <immintrin.h>

namespace prefloop_vec {

// exp(x) for x <= 0 (softmax scores minus their running max; -|g| in SiLU), 16 lanes: x = n ln2 + r,
// |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial (relative error ≈ 1e-7), times 2^n by
// scalef. Inputs below -87 give ≈ 1e-38 instead of 0: added to the softmax's running sum (>= 1) or
// to 1 in the sigmoid, it changes nothing.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// 16 values as float32 (bfloat16 widened by a shift) and back (bfloat16 rounded to nearest even);
// the masked forms touch only the lanes in k (row tails).
inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const c10::BFloat16* p) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  return widen(_mm256_maskz_loadu_epi16(k, reinterpret_cast<const __m256i*>(p)));
}
inline void store16(float* p, __m512 v, __mmask16 k = 0xFFFF) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 k = 0xFFFF) {
#if defined(__AVX512BF16__)
  _mm256_mask_storeu_epi16(p, k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));  // nearest even
#else
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) p[i] = static_cast<c10::BFloat16>(tmp[i]);  // round to nearest even, like torch
#endif
}

inline __mmask16 lanes(int64_t count) {  // the first min(count, 16) lanes
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

}  // namespace prefloop_vec
#endif
