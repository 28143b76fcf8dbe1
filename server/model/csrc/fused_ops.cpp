// Fused elementwise ops of a Llama layer on CPU (prefloop's native engine, eager mode).
//
// Eager PyTorch runs a layer's norms, residual adds, RoPE and SiLU x up as ≈ 20 small kernels of
// 5-40 µs each, most of it dispatch; these do each group in one pass over the rows, computing in
// float32 and rounding once to the tensor's dtype (float32 or bfloat16). `--compile` does the same
// fusion with inductor; these ops are for the eager engine and stay out of compiled graphs.
//
//   rms_norm(x [n, d], w [d], eps)            -> x / sqrt(mean(x²) + eps) * w
//   add_rms_norm_(h [n, d], delta [n, d], w, eps) -> h += delta (in place), then rms_norm(h)
//   rope_(x [n, heads, hd], cos [n, hd], sin [n, hd]) -> x rotated in place (HF rotate-half pairs)
//   silu_mul(gate_up [n, 2 i])                -> silu(gate) * up [n, i]
//
// Rows go to torch's thread pool (at::parallel_for) once a call has enough work to split.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace {

constexpr int64_t kGrainElements = 32768;  // below this many elements a call runs on one thread

using prefloop_vec::to_float;

inline int64_t grain_rows(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, name, " must have a contiguous last dimension");
}

// One row: h += delta (rounded to T, when delta is given), then out = h / rms(h) * w.
template <typename T>
void norm_row(T* h, const T* delta, int64_t d, const T* w, float eps, T* o) {
#if defined(PREFLOOP_AVX512)
  using namespace prefloop_vec;
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 k = lanes(d - i);
    __m512 v = load16(h + i, k);
    if (delta != nullptr) {
      store16(h + i, _mm512_add_ps(v, load16(delta + i, k)), k);
      v = load16(h + i, k);  // the residual as stored (rounded to T)
    }
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(d) + eps));
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 k = lanes(d - i);
    store16(o + i, _mm512_mul_ps(_mm512_mul_ps(load16(h + i, k), inv), load16(w + i, k)), k);
  }
#else
  float ss = 0.f;
  for (int64_t i = 0; i < d; ++i) {
    if (delta != nullptr) h[i] = static_cast<T>(to_float(h[i]) + to_float(delta[i]));
    ss += to_float(h[i]) * to_float(h[i]);
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(to_float(h[i]) * inv * to_float(w[i]));
#endif
}

template <typename T>
void norm_rows(T* h, const T* delta, int64_t n, int64_t d, int64_t h_stride, int64_t delta_stride,
               const T* w, float eps, T* out) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      norm_row(h + r * h_stride, delta ? delta + r * delta_stride : nullptr, d, w, eps, out + r * d);
  });
}

at::Tensor norm_impl(const at::Tensor& h, const at::Tensor* delta, const at::Tensor& weight, double eps) {
  check_rows(h, "x");
  TORCH_CHECK(h.dim() == 2, "x must be [rows, hidden]");
  const int64_t n = h.size(0), d = h.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d && weight.scalar_type() == h.scalar_type(),
              "weight must be [hidden] in x's dtype");
  if (delta != nullptr) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type(),
                "delta must match x's shape and dtype");
  }
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({n, d}, h.options());
  const float e = static_cast<float>(eps);
  if (h.scalar_type() == at::kFloat) {
    norm_rows<float>(h.data_ptr<float>(), delta ? delta->data_ptr<float>() : nullptr, n, d, h.stride(0),
                     delta ? delta->stride(0) : 0, w.data_ptr<float>(), e, out.data_ptr<float>());
  } else {
    using B = c10::BFloat16;
    norm_rows<B>(h.data_ptr<B>(), delta ? delta->data_ptr<B>() : nullptr, n, d, h.stride(0),
                 delta ? delta->stride(0) : 0, w.data_ptr<B>(), e, out.data_ptr<B>());
  }
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm_impl(x, nullptr, weight, eps);
}

at::Tensor add_rms_norm_(at::Tensor& h, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  return norm_impl(h, &delta, weight, eps);
}

template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t hd, int64_t s0,
               int64_t s1, int64_t cs) {
  const int64_t half = hd / 2;
  at::parallel_for(0, n, grain_rows(heads * hd), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * cs;
      const T* s = sin + t * cs;
      for (int64_t hh = 0; hh < heads; ++hh) {
        T* v = x + t * s0 + hh * s1;
#if defined(PREFLOOP_AVX512)
        using namespace prefloop_vec;
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 k = lanes(half - i);
          const __m512 a = load16(v + i, k), b = load16(v + i + half, k);
          store16(v + i, _mm512_fmsub_ps(a, load16(c + i, k), _mm512_mul_ps(b, load16(s + i, k))), k);
          store16(v + i + half, _mm512_fmadd_ps(b, load16(c + i + half, k), _mm512_mul_ps(a, load16(s + i + half, k))), k);
        }
#else
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(v[i]), b = to_float(v[i + half]);
          v[i] = static_cast<T>(a * to_float(c[i]) - b * to_float(s[i]));
          v[i + half] = static_cast<T>(b * to_float(c[i + half]) + a * to_float(s[i + half]));
        }
#endif
      }
    }
  });
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x must be [tokens, heads, head_dim] with an even head_dim");
  const int64_t n = x.size(0), heads = x.size(1), hd = x.size(2);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == n && cos.size(1) == hd &&
                  cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos and sin must be [tokens, head_dim] in x's dtype");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  if (x.scalar_type() == at::kFloat) {
    rope_rows<float>(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), n, heads, hd, x.stride(0),
                     x.stride(1), hd);
  } else {
    using B = c10::BFloat16;
    rope_rows<B>(x.data_ptr<B>(), c.data_ptr<B>(), s.data_ptr<B>(), n, heads, hd, x.stride(0), x.stride(1), hd);
  }
}

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t n, int64_t inter, int64_t stride) {
  at::parallel_for(0, n, grain_rows(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * stride;
      const T* u = g + inter;
      T* o = out + r * inter;
#if defined(PREFLOOP_AVX512)
      using namespace prefloop_vec;
      const __m512 one = _mm512_set1_ps(1.f);
      for (int64_t i = 0; i < inter; i += 16) {
        const __mmask16 k = lanes(inter - i);
        const __m512 gv = load16(g + i, k);
        // sigmoid from e = exp(-|g|) <= 1 (never overflows): 1 / (1 + e) for g >= 0, e / (1 + e) else
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
        const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), _mm512_add_ps(one, e));
        store16(o + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), load16(u + i, k)), k);
      }
#else
      for (int64_t i = 0; i < inter; ++i) {
        const float gf = to_float(g[i]);
        o[i] = static_cast<T>(gf / (1.f + std::exp(-gf)) * to_float(u[i]));
      }
#endif
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [rows, 2 * intermediate]");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({n, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), n, inter, gate_up.stride(0));
  } else {
    using B = c10::BFloat16;
    silu_mul_rows<B>(gate_up.data_ptr<B>(), out.data_ptr<B>(), n, inter, gate_up.stride(0));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefloop_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) h, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("add_rms_norm_", c10::DispatchKey::CPU, &add_rms_norm_);
  m.impl("rope_", c10::DispatchKey::CPU, &rope_);
  m.impl("silu_mul", c10::DispatchKey::CPU, &silu_mul);
}
