// Paged decode attention on CPU (prefloop's native engine; loaded by server/native_attention.py).
//
// One query token per sequence attends over that sequence's cached keys/values, read in place
// through its block table (no gather copy, no padding mask). Each (sequence, KV head) pair is one
// work item on torch's own thread pool (at::parallel_for), so it shares the cores with the matmuls
// instead of contending with them. The G query heads of a GQA group are computed together, so every
// cached K/V row is read once per group. Softmax is online (running max and sum per block) in
// float32; scores and accumulators stay float32 whatever the cache dtype.
//
// Cache layout: [num_blocks, block_size, n_kv_heads, head_dim]; q/out: [num_seqs, n_heads, head_dim];
// block_tables: [num_seqs, width] (padding entries are never read: ctx_lens bounds the loop).
// An AVX-512 path handles head_dim 64 and 128 with up to 8 query heads per KV head; everything else
// takes the portable path (same math, plain loops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

using prefloop_vec::to_float;

constexpr int kMaxGroup = 8;  // query heads per KV head on the vector path

struct Layout {
  int64_t H, KVH, G, D, BS, width, tok_stride, blk_stride;
};

// Portable path: any head_dim / group size.
template <typename T>
void decode_item_portable(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t ctx, T* out,
                          int64_t h, const Layout& L, float scale) {
  const int64_t G = L.G, D = L.D, BS = L.BS;
  std::vector<float> qf(G * D), acc(G * D, 0.f), row(D), s(G * BS), m(G, -std::numeric_limits<float>::infinity()),
      l(G, 0.f);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * scale;
  for (int64_t blk = 0, start = 0; start < ctx; ++blk, start += BS) {
    const int64_t n = std::min(BS, ctx - start);
    const int64_t base = table[blk] * L.blk_stride + h * D;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = 0; i < D; ++i) row[i] = to_float(kc[base + t * L.tok_stride + i]);
      for (int64_t g = 0; g < G; ++g) {
        float d = 0.f;
        for (int64_t i = 0; i < D; ++i) d += qf[g * D + i] * row[i];
        s[g * BS + t] = d;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float mx = m[g];
      for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[g * BS + t]);
      const float corr = std::exp(m[g] - mx);
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) sum += (s[g * BS + t] = std::exp(s[g * BS + t] - mx));
      l[g] = l[g] * corr + sum;
      m[g] = mx;
      for (int64_t i = 0; i < D; ++i) acc[g * D + i] *= corr;
    }
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = 0; i < D; ++i) row[i] = to_float(vc[base + t * L.tok_stride + i]);
      for (int64_t g = 0; g < G; ++g) {
        const float p = s[g * BS + t];
        for (int64_t i = 0; i < D; ++i) acc[g * D + i] += p * row[i];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = static_cast<T>(acc[g * D + i] * inv);
  }
}

#if defined(PREFLOOP_AVX512)
using prefloop_vec::exp_nonpositive;
using prefloop_vec::lanes;

// NV = head_dim / 16: a row is NV registers of 16 floats.
template <typename T, int NV>
inline void load_row(const T* p, __m512 r[NV]) {
  for (int i = 0; i < NV; ++i) r[i] = prefloop_vec::load16(p + 16 * i);
}
template <typename T, int NV>
inline void store_row(T* p, const __m512 r[NV]) {
  for (int i = 0; i < NV; ++i) prefloop_vec::store16(p + 16 * i, r[i]);
}

// out[j] = the sum of v[j]'s 16 lanes, j < 16: four rounds of pairwise shuffles and adds (45
// instructions) instead of 16 separate horizontal sums.
inline __m512 sum_lanes16(const __m512 v[16]) {
  __m512 w[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per chunk: the chunk's sums of v[4i .. 4i+3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 q0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 q1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(3, 1, 3, 1)));  // chunk j: v[4j .. 4j+3]
}

template <typename T, int NV, int G>
void decode_item_avx512(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t ctx, T* out,
                        int64_t h, const Layout& L, float scale) {
  constexpr int D = 16 * NV;
  constexpr int kMaxBlock = 64;
  __m512 qv[G][NV], acc[G][NV];
  float m[G], l[G];
  alignas(64) float s[G][kMaxBlock];
  const __m512 sc = _mm512_set1_ps(scale);
  for (int g = 0; g < G; ++g) {
    load_row<T, NV>(q + g * D, qv[g]);
    for (int i = 0; i < NV; ++i) {
      qv[g][i] = _mm512_mul_ps(qv[g][i], sc);
      acc[g][i] = _mm512_setzero_ps();
    }
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  for (int64_t blk = 0, start = 0; start < ctx; ++blk, start += L.BS) {
    const int64_t n = std::min(L.BS, ctx - start);
    const T* kb = kc + table[blk] * L.blk_stride + h * D;
    const T* vb = vc + table[blk] * L.blk_stride + h * D;
    for (int64_t c = 0; c < n; c += 16) {  // scores of 16 tokens: per-lane products, then one sum
      const int64_t cn = std::min<int64_t>(16, n - c);
      __m512 dots[G][16];
      for (int64_t t = 0; t < 16; ++t) {
        if (t >= cn) {
          for (int g = 0; g < G; ++g) dots[g][t] = _mm512_setzero_ps();
          continue;
        }
        __m512 k[NV];
        load_row<T, NV>(kb + (c + t) * L.tok_stride, k);
        for (int g = 0; g < G; ++g) {
          __m512 d = _mm512_mul_ps(qv[g][0], k[0]);
          for (int i = 1; i < NV; ++i) d = _mm512_fmadd_ps(qv[g][i], k[i], d);
          dots[g][t] = d;
        }
      }
      for (int g = 0; g < G; ++g) _mm512_storeu_ps(s[g] + c, sum_lanes16(dots[g]));
    }
    for (int g = 0; g < G; ++g) {  // online softmax over the block, 16 scores at a time
      float mx = m[g];
      for (int64_t c = 0; c < n; c += 16)
        mx = std::max(mx, _mm512_mask_reduce_max_ps(lanes(n - c), _mm512_loadu_ps(s[g] + c)));
      const float corr = std::exp(m[g] - mx);
      const __m512 mxv = _mm512_set1_ps(mx);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < n; c += 16) {
        const __mmask16 k = lanes(n - c);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s[g] + c), mxv));
        _mm512_mask_storeu_ps(s[g] + c, k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
      }
      l[g] = l[g] * corr + _mm512_reduce_add_ps(sum);
      m[g] = mx;
      if (corr != 1.f) {
        const __m512 c = _mm512_set1_ps(corr);
        for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_mul_ps(acc[g][i], c);
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      __m512 v[NV];
      load_row<T, NV>(vb + t * L.tok_stride, v);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(s[g][t]);
        for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
    __m512 o[NV];
    for (int i = 0; i < NV; ++i) o[i] = _mm512_mul_ps(acc[g][i], inv);
    store_row<T, NV>(out + g * D, o);
  }
}

template <typename T, int NV>
using ItemFn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, T*, int64_t, const Layout&, float);

template <typename T, int NV>
ItemFn<T, NV> avx512_for_group(int64_t G) {
  switch (G) {
    case 1: return &decode_item_avx512<T, NV, 1>;
    case 2: return &decode_item_avx512<T, NV, 2>;
    case 3: return &decode_item_avx512<T, NV, 3>;
    case 4: return &decode_item_avx512<T, NV, 4>;
    case 5: return &decode_item_avx512<T, NV, 5>;
    case 6: return &decode_item_avx512<T, NV, 6>;
    case 7: return &decode_item_avx512<T, NV, 7>;
    case 8: return &decode_item_avx512<T, NV, 8>;
    default: return nullptr;
  }
}
#endif

template <typename T>
void decode(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx_lens, T* out,
            int64_t B, const Layout& L, float scale) {
  using Fn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, T*, int64_t, const Layout&, float);
  Fn item_fn = &decode_item_portable<T>;
#if defined(PREFLOOP_AVX512)
  if (L.BS <= 64 && L.G <= kMaxGroup) {
    if (L.D == 64) item_fn = avx512_for_group<T, 4>(L.G);
    if (L.D == 128) item_fn = avx512_for_group<T, 8>(L.G);
    if (item_fn == nullptr) item_fn = &decode_item_portable<T>;
  }
#endif
  at::parallel_for(0, B * L.KVH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / L.KVH, h = item % L.KVH;
      const int64_t offset = (b * L.H + h * L.G) * L.D;
      item_fn(q + offset, kc, vc, tables + b * L.width, ctx_lens[b], out + offset, h, L, scale);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q [seqs, heads, head_dim] and caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  Layout L;
  const int64_t B = q.size(0);
  L.H = q.size(1);
  L.D = q.size(2);
  L.BS = k_cache.size(1);
  L.KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == L.D && L.H % L.KVH == 0, "q heads / cache heads or head_dim mismatch");
  L.G = L.H / L.KVH;
  L.tok_stride = L.KVH * L.D;
  L.blk_stride = L.BS * L.KVH * L.D;
  const at::Tensor qc = q.contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = ctx_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lens.numel() == B,
              "block_tables must be [seqs, width] and ctx_lens [seqs]");
  L.width = tables.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L.width * L.BS, "context length ", lp[b], " outside the block table");
  at::Tensor out = at::empty_like(qc);
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) {
    decode<float>(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                  tables.data_ptr<int64_t>(), lp, out.data_ptr<float>(), B, L, sc);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode<c10::BFloat16>(qc.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                          v_cache.data_ptr<c10::BFloat16>(), tables.data_ptr<int64_t>(), lp,
                          out.data_ptr<c10::BFloat16>(), B, L, sc);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(prefloop_kernels, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor ctx_lens, "
        "float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
}
