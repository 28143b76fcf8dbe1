// Batched LoRA update of one projection in one call (prefloop's native engine, eager decode steps).
//
//   lora_add_(y [n, out], x [n, in], at [in, R], bt [R, out], ranges [n, 2] int32) -> ()
//     y[i] += (x[i] @ at[:, c0:c1]) @ bt[c0:c1, :]   with (c0, c1) = ranges[i]; c0 == c1: no update
//
// `at` / `bt` are the step's adapters' factors stacked (A transposed side by side, B transposed
// on top of each other, float32, server/model/lora.py); each row's adapter owns one contiguous
// range of their columns / rows, so a batch that mixes adapters (an A/B test) and rows on the
// plain weights is one call. In eager PyTorch the same update is 3-4 small ops per projection
// (two matmuls, a mask, an add, casts), 40 µs each at a few rows on a 2-core CPU whatever the
// work (oneDNN's fixed cost, docs/performance.md), which left a decode step with adapters at
// 0.6-0.8x of the plain one. Here the work itself (rows x rank x (in + out) multiply-adds) is all
// there is: float32 accumulation, x read as stored (float32 or bfloat16), y rounded once.
//
// Phase 1 computes each row's rank activations h = x[i] @ at[:, c0:c1] (row-parallel); phase 2
// adds h @ bt to y in blocks of 128 output columns (block-parallel: every row of a block reuses
// the block's slice of bt from L1). A call runs on one thread below kParallelMacs multiply-adds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace {

using prefloop_vec::to_float;

constexpr int64_t kBlock = 128;           // output columns per phase-2 task (8 vectors of 16)
constexpr int64_t kParallelMacs = 1 << 19;  // below this many multiply-adds a phase runs on one thread

#if defined(PREFLOOP_AVX512)
inline __mmask16 lanes_from(int64_t count) {  // lanes(count), 0 for count <= 0
  return count <= 0 ? static_cast<__mmask16>(0) : prefloop_vec::lanes(count);
}
#endif

// h[i, 0:nr] = x[i] @ at[:, c0:c0+nr] for every row with an adapter.
template <typename T>
void rank_activations(const T* x, int64_t xs, const float* at, int64_t R, const int32_t* ranges,
                      int64_t n, int64_t in, float* h, int64_t hs, int64_t grain) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = ranges[2 * i], nr = ranges[2 * i + 1] - c0;
      const T* xi = x + i * xs;
      float* hi = h + i * hs;
      for (int64_t cb = 0; cb < nr; cb += 64) {  // 64 rank columns (4 vectors) at a time
#if defined(PREFLOOP_AVX512)
        using namespace prefloop_vec;
        const __mmask16 k0 = lanes_from(nr - cb), k1 = lanes_from(nr - cb - 16),
                        k2 = lanes_from(nr - cb - 32), k3 = lanes_from(nr - cb - 48);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float* col = at + c0 + cb;
        for (int64_t k = 0; k < in; ++k) {
          const __m512 xv = _mm512_set1_ps(to_float(xi[k]));
          const float* row = col + k * R;
          a0 = _mm512_fmadd_ps(xv, load16(row, k0), a0);
          if (k1) a1 = _mm512_fmadd_ps(xv, load16(row + 16, k1), a1);
          if (k2) a2 = _mm512_fmadd_ps(xv, load16(row + 32, k2), a2);
          if (k3) a3 = _mm512_fmadd_ps(xv, load16(row + 48, k3), a3);
        }
        store16(hi + cb, a0, k0);
        store16(hi + cb + 16, a1, k1);
        store16(hi + cb + 32, a2, k2);
        store16(hi + cb + 48, a3, k3);
#else
        const int64_t width = std::min<int64_t>(64, nr - cb);
        float acc[64] = {0.f};
        for (int64_t k = 0; k < in; ++k) {
          const float xv = to_float(xi[k]);
          const float* row = at + k * R + c0 + cb;
          for (int64_t r = 0; r < width; ++r) acc[r] += xv * row[r];
        }
        for (int64_t r = 0; r < width; ++r) hi[cb + r] = acc[r];
#endif
      }
    }
  });
}

// y[i, j] += sum_r h[i, r] * bt[c0 + r, j], in blocks of kBlock columns.
template <typename T>
void add_update(T* y, int64_t ys, const float* h, int64_t hs, const float* bt, const int32_t* ranges,
                int64_t n, int64_t out, int64_t grain) {
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = b * kBlock;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c0 = ranges[2 * i], nr = ranges[2 * i + 1] - c0;
        if (nr <= 0) continue;
        T* yi = y + i * ys + j0;
        const float* hi = h + i * hs;
        const float* b0 = bt + c0 * out + j0;
#if defined(PREFLOOP_AVX512)
        using namespace prefloop_vec;
        __mmask16 k[8];
        __m512 acc[8];
        for (int v = 0; v < 8; ++v) {
          k[v] = lanes_from(out - j0 - 16 * v);
          acc[v] = load16(yi + 16 * v, k[v]);
        }
        for (int64_t r = 0; r < nr; ++r) {
          const __m512 hv = _mm512_set1_ps(hi[r]);
          const float* row = b0 + r * out;
          for (int v = 0; v < 8; ++v) acc[v] = _mm512_fmadd_ps(hv, load16(row + 16 * v, k[v]), acc[v]);
        }
        for (int v = 0; v < 8; ++v) store16(yi + 16 * v, acc[v], k[v]);
#else
        const int64_t width = std::min<int64_t>(kBlock, out - j0);
        float acc[kBlock];
        for (int64_t j = 0; j < width; ++j) acc[j] = to_float(yi[j]);
        for (int64_t r = 0; r < nr; ++r) {
          const float hv = hi[r];
          const float* row = b0 + r * out;
          for (int64_t j = 0; j < width; ++j) acc[j] += hv * row[j];
        }
        for (int64_t j = 0; j < width; ++j) yi[j] = static_cast<T>(acc[j]);
#endif
      }
    }
  });
}

template <typename T>
void lora_add_typed(at::Tensor& y, const at::Tensor& x, const at::Tensor& at, const at::Tensor& bt,
                    const at::Tensor& ranges) {
  const int64_t n = x.size(0), in = x.size(1), R = at.size(1), out = y.size(1);
  const int32_t* rg = ranges.data_ptr<int32_t>();
  int64_t widest = 0, rank_rows = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c0 = rg[2 * i], c1 = rg[2 * i + 1];
    TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= R, "ranges[", i, "] = (", c0, ", ", c1,
                ") is not a range of the ", R, " stacked rank columns");
    widest = std::max(widest, c1 - c0);
    rank_rows += c1 - c0;
  }
  if (widest == 0) return;
  std::vector<float> h(static_cast<size_t>(n * widest));
  const int64_t macs1 = rank_rows * in, macs2 = rank_rows * out;
  const int64_t grain1 = macs1 < kParallelMacs ? n : std::max<int64_t>(1, n / 2);
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  const int64_t grain2 = macs2 < kParallelMacs ? blocks : std::max<int64_t>(1, blocks / 8);
  rank_activations<T>(x.data_ptr<T>(), x.stride(0), at.data_ptr<float>(), R, rg, n, in, h.data(), widest,
                      grain1);
  add_update<T>(y.data_ptr<T>(), y.stride(0), h.data(), widest, bt.data_ptr<float>(), rg, n, out, grain2);
}

void lora_add_(at::Tensor y, const at::Tensor& x, const at::Tensor& at, const at::Tensor& bt,
               const at::Tensor& ranges) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && at.device().is_cpu() && bt.device().is_cpu(),
              "lora_add_ is a CPU kernel");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0), "y and x must be [rows, features] "
              "with the same rows");
  TORCH_CHECK(y.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x and y must both be float32 or both bfloat16");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "x and y must have a contiguous last dimension");
  TORCH_CHECK(at.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat && at.is_contiguous() &&
                  bt.is_contiguous() && at.dim() == 2 && bt.dim() == 2,
              "the factors must be contiguous float32 matrices");
  TORCH_CHECK(at.size(0) == x.size(1) && bt.size(0) == at.size(1) && bt.size(1) == y.size(1),
              "factor shapes ", at.sizes(), " and ", bt.sizes(), " do not map ", x.size(1), " -> ", y.size(1));
  TORCH_CHECK(ranges.scalar_type() == at::kInt && ranges.is_contiguous() && ranges.dim() == 2 &&
                  ranges.size(0) == x.size(0) && ranges.size(1) == 2,
              "ranges must be a contiguous int32 [rows, 2] tensor");
  if (x.scalar_type() == at::kFloat) {
    lora_add_typed<float>(y, x, at, bt, ranges);
  } else {
    lora_add_typed<c10::BFloat16>(y, x, at, bt, ranges);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefloop_kernels, m) {
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor at, Tensor bt, Tensor ranges) -> ()");
  m.impl("lora_add_", c10::DispatchKey::CPU, &lora_add_);
}
