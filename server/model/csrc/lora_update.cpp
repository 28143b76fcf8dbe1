// Batched LoRA update of one projection in one call (prefloop's native engine, eager decode steps).
//
//   lora_add_(y [n, out], x [n, in], at, bt, ranges [n, 2] int32, live) -> ()
//     y[i] += (x[i] @ at[:, c0:c1]) @ bt[c0:c1, :]   with (c0, c1) = ranges[i]; c0 == c1: no update
//
// The factors come in one of two forms:
// - float32 at [in, R], bt [R, out] (any x/y dtype);
// - bfloat16 rank pairs for a bfloat16 x/y on a CPU with AVX512_BF16 (`lora_bf16_pairs()`):
//   at [in/2, R, 2] (two consecutive input rows of A.T interleaved) and bt [R/2, out, 2] (two
//   consecutive rank rows of B.T interleaved), every range even, so one vdpbf16ps does 32
//   multiply-adds where an FMA does 16; h is rounded to bfloat16 between the phases.
// `live` (uint8 [R rows (pairs: R/2), blocks of 128 outputs], optional) marks which rank rows of
// bt have a non-zero in each output block; the others are skipped (the fused q/k/v and gate/up
// B are block-diagonal: two thirds and half of them are zeros).
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
// Phase 1 computes each row's rank activations h = x[i] @ at[:, c0:c1]; phase 2 adds h @ bt to y
// in blocks of 128 output columns (block-parallel: every row of a block reuses the block's slice
// of bt from L1). float32 form: phase 1 row-parallel, each phase on one thread below kParallelMacs
// multiply-adds. bfloat16 rank pairs (the form a bfloat16 model takes on AVX512_BF16 CPUs): rows
// grouped by adapter and taken together in both phases (each slice of the factors loaded once for
// up to 8 rows: enough independent accumulators to hide vdpbf16ps's latency), both phases in one
// parallel region, phase 1 split over the two halves of x (one group's A read once across the
// threads). Against one row at a time with two regions, measured in decode steps on two adapters
// (docs/performance.md, 2026-12-05): 32 rows 0.85x -> 0.91x of the plain weights, 8 rows unchanged.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "vec_math.h"

namespace {

using prefloop_vec::to_float;

constexpr int64_t kBlock = 128;           // output columns per phase-2 task (8 vectors of 16)
constexpr int64_t kParallelMacs = 1 << 15;  // below this many multiply-adds a phase runs on one thread

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
                const uint8_t* live, int64_t n, int64_t out, int64_t grain) {
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
          if (live != nullptr && !live[(c0 + r) * blocks + b]) continue;
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
          if (live != nullptr && !live[(c0 + r) * blocks + b]) continue;
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


#if defined(PREFLOOP_AVX512) && defined(__AVX512BF16__)
#define PREFLOOP_LORA_PAIRS 1
inline __mmask32 pair_lanes(int64_t count) {  // 2 bf16 elements per lane, the first `count` lanes
  return count <= 0 ? static_cast<__mmask32>(0)
                     : count >= 16 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1ull << (2 * count)) - 1);
}
inline __m512i broadcast_pair(const c10::BFloat16* p) {  // p[0], p[1] as one 32-bit lane, everywhere
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_set1_epi32(static_cast<int>(bits));
}
inline __m512 dot_pairs(__m512 acc, __m512i pair, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(pair), reinterpret_cast<__m512bh>(b));
}

// The rows of one call grouped by column range (by adapter): order[first : first + count] share
// [c0, c1). Both phases take a group's rows together, so each slice of the factors is read once
// for all of them.
struct RowGroup {
  int32_t c0, c1, first, count;
};

std::vector<RowGroup> group_rows(const int32_t* ranges, int64_t n, std::vector<int32_t>& order) {
  std::vector<RowGroup> groups;
  std::vector<bool> placed(n, false);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c0 = ranges[2 * i], c1 = ranges[2 * i + 1];
    if (placed[i] || c1 <= c0) continue;
    const int32_t first = static_cast<int32_t>(order.size());
    for (int64_t j = i; j < n; ++j)
      if (!placed[j] && ranges[2 * j] == c0 && ranges[2 * j + 1] == c1) {
        placed[j] = true;
        order.push_back(static_cast<int32_t>(j));
      }
    groups.push_back({c0, c1, first, static_cast<int32_t>(order.size()) - first});
  }
  return groups;
}

// Phase 1's unit of work: up to 64 rank columns (4 vectors) of one group, for up to 8 of its rows
// (8 for up to 32 columns, else 4), over one part of the inputs (the call's first or second half of
// x's pairs when two threads share the phase: each reads half of A, the parts are summed after).
struct PairTile {
  int64_t col;   // first stacked column of the tile
  int64_t left;  // columns from there to the end of the group's range (the tile takes up to 64)
  int32_t first, rows;  // the tile's rows: order[first : first + rows]
};

std::vector<PairTile> pair_tiles(const std::vector<RowGroup>& groups) {
  std::vector<PairTile> tiles;
  for (const RowGroup& g : groups)
    for (int64_t cb = 0; cb < g.c1 - g.c0; cb += 64) {
      const int64_t left = g.c1 - g.c0 - cb;
      const int32_t per = left <= 32 ? 8 : 4;
      for (int32_t r = 0; r < g.count; r += per)
        tiles.push_back({g.c0 + cb, left, g.first + r, std::min(per, g.count - r)});
    }
  return tiles;
}

// part[row, 0:16 NV] = x[row, 2 q0 : 2 q1] @ at2 rows q0..q1 of the tile's columns, for the tile's
// rows, at2's pair rows loaded once for all of them: G x NV independent accumulator chains (one
// row at a time had 1-4, and a rank-16 projection was bound by vdpbf16ps's latency). Rows past
// `rows` repeat the last one (computed, not stored).
template <int NV, int G>
void tile_pairs(const c10::BFloat16* const* xr, const c10::BFloat16* col, int64_t R, int64_t q0, int64_t q1,
                int64_t left, float* const* pr, int rows) {
  __mmask32 km[NV];
  for (int v = 0; v < NV; ++v) km[v] = pair_lanes(left - 16 * v);
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t q = q0; q < q1; ++q) {
    const c10::BFloat16* row = col + 2 * q * R;
    __m512i a[NV];
    for (int v = 0; v < NV; ++v) a[v] = _mm512_maskz_loadu_epi16(km[v], row + 32 * v);
    for (int g = 0; g < G; ++g) {
      const __m512i xv = broadcast_pair(xr[g] + 2 * q);
      for (int v = 0; v < NV; ++v) acc[g][v] = dot_pairs(acc[g][v], xv, a[v]);
    }
  }
  for (int g = 0; g < rows; ++g)
    for (int v = 0; v < NV; ++v) prefloop_vec::store16(pr[g] + 16 * v, acc[g][v], lanes_from(left - 16 * v));
}

void run_tile(const PairTile& tile, const std::vector<int32_t>& order, const int32_t* ranges,
              const c10::BFloat16* x, int64_t xs, const c10::BFloat16* at2, int64_t R, int64_t q0,
              int64_t q1, float* part, int64_t hs) {
  const c10::BFloat16* xr[8];
  float* pr[8];
  for (int g = 0; g < 8; ++g) {
    const int64_t i = order[tile.first + std::min<int32_t>(g, tile.rows - 1)];
    xr[g] = x + i * xs;
    pr[g] = part + i * hs + (tile.col - ranges[2 * i]);
  }
  const c10::BFloat16* col = at2 + 2 * tile.col;
  switch (std::min<int64_t>(4, (tile.left + 15) / 16)) {
    case 1: tile_pairs<1, 8>(xr, col, R, q0, q1, tile.left, pr, tile.rows); break;
    case 2: tile_pairs<2, 8>(xr, col, R, q0, q1, tile.left, pr, tile.rows); break;
    case 3: tile_pairs<3, 4>(xr, col, R, q0, q1, tile.left, pr, tile.rows); break;
    default: tile_pairs<4, 4>(xr, col, R, q0, q1, tile.left, pr, tile.rows); break;
  }
}

// y[i, j0:j0+128] += hb[i] @ B.T[c0:c1, j0:j0+128] for ROWS rows of one group (the same pairs of
// bt2 [R/2, out, 2]), each slice of B loaded once for them.
template <int ROWS>
void block_rows(c10::BFloat16* const* yr, const c10::BFloat16* const* hr, const c10::BFloat16* bt2,
                int64_t out, int64_t j0, int64_t p0, int64_t np, const uint8_t* live, int64_t blocks,
                int64_t b, const __mmask16* k, const __mmask32* k2) {
  __m512 acc[ROWS][8];
  for (int g = 0; g < ROWS; ++g)
    for (int v = 0; v < 8; ++v) acc[g][v] = prefloop_vec::load16(yr[g] + 16 * v, k[v]);
  for (int64_t p = 0; p < np; ++p) {
    if (live != nullptr && !live[(p0 + p) * blocks + b]) continue;
    const c10::BFloat16* row = bt2 + 2 * ((p0 + p) * out + j0);
    __m512i hv[ROWS];
    for (int g = 0; g < ROWS; ++g) hv[g] = broadcast_pair(hr[g] + 2 * p);
    for (int v = 0; v < 8; ++v) {
      if (!k[v]) continue;
      const __m512i bv = _mm512_maskz_loadu_epi16(k2[v], row + 32 * v);
      for (int g = 0; g < ROWS; ++g) acc[g][v] = dot_pairs(acc[g][v], hv[g], bv);
    }
  }
  for (int g = 0; g < ROWS; ++g)
    for (int v = 0; v < 8; ++v) prefloop_vec::store16(yr[g] + 16 * v, acc[g][v], k[v]);
}

// Phase 2 over output blocks [b0, b1): every group's rows, two at a time.
void add_update_pairs(c10::BFloat16* y, int64_t ys, const c10::BFloat16* hb, int64_t hs,
                      const c10::BFloat16* bt2, const std::vector<RowGroup>& groups,
                      const std::vector<int32_t>& order, const uint8_t* live, int64_t out, int64_t b0,
                      int64_t b1) {
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j0 = b * kBlock;
    __mmask16 k[8];
    __mmask32 k2[8];
    for (int v = 0; v < 8; ++v) {
      k[v] = lanes_from(out - j0 - 16 * v);
      k2[v] = pair_lanes(out - j0 - 16 * v);
    }
    for (const RowGroup& g : groups) {
      const int64_t p0 = g.c0 / 2, np = (g.c1 - g.c0) / 2;
      for (int32_t r = 0; r < g.count; r += 2) {
        c10::BFloat16* yr[2];
        const c10::BFloat16* hr[2];
        const int rows = std::min<int32_t>(2, g.count - r);
        for (int e = 0; e < rows; ++e) {
          const int64_t i = order[g.first + r + e];
          yr[e] = y + i * ys + j0;
          hr[e] = hb + i * hs;
        }
        if (rows == 2) block_rows<2>(yr, hr, bt2, out, j0, p0, np, live, blocks, b, k, k2);
        else block_rows<1>(yr, hr, bt2, out, j0, p0, np, live, blocks, b, k, k2);
      }
    }
  }
}
#endif

template <typename T>
void lora_add_typed(at::Tensor& y, const at::Tensor& x, const at::Tensor& at, const at::Tensor& bt,
                    const at::Tensor& ranges, const uint8_t* live, int64_t widest, int64_t rank_rows) {
  const int64_t n = x.size(0), in = x.size(1), R = at.size(1), out = y.size(1);
  const int32_t* rg = ranges.data_ptr<int32_t>();
  std::vector<float> h(static_cast<size_t>(n * widest));
  const int64_t macs1 = rank_rows * in, macs2 = rank_rows * out;
  const int64_t grain1 = macs1 < kParallelMacs ? n : std::max<int64_t>(1, n / 2);
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  const int64_t grain2 = macs2 < kParallelMacs ? blocks : std::max<int64_t>(1, blocks / 8);
  rank_activations<T>(x.data_ptr<T>(), x.stride(0), at.data_ptr<float>(), R, rg, n, in, h.data(), widest,
                      grain1);
  add_update<T>(y.data_ptr<T>(), y.stride(0), h.data(), widest, bt.data_ptr<float>(), rg, live, n, out,
                grain2);
}

// The bfloat16 rank-pair form (see the top of this file); ranges already checked even. Both phases
// run in one parallel region (one fork and join per call instead of two): each thread takes its
// share of phase 1's tiles, split over the two halves of x's pairs, so that one group's A is read
// once across the threads; at the barrier the halves are summed and rounded to bfloat16; then each
// thread adds the update to its share of the output blocks.
void lora_add_pairs(at::Tensor& y, const at::Tensor& x, const at::Tensor& at2, const at::Tensor& bt2,
                    const at::Tensor& ranges, const uint8_t* live, int64_t widest, int64_t rank_rows) {
#if defined(PREFLOOP_LORA_PAIRS)
  using B = c10::BFloat16;
  const int64_t n = x.size(0), in = x.size(1), R = at2.size(1), out = y.size(1);
  const int32_t* rg = ranges.data_ptr<int32_t>();
  std::vector<int32_t> order;
  order.reserve(n);
  const std::vector<RowGroup> groups = group_rows(rg, n, order);
  const std::vector<PairTile> tiles = pair_tiles(groups);
  const int threads = rank_rows * (in + out) < 4 * kParallelMacs ? 1 : std::max(1, at::get_num_threads());
  const int splits = threads > 1 ? 2 : 1;
  std::vector<float> part(static_cast<size_t>(splits * n * widest));
  std::vector<B> hb(static_cast<size_t>(n * widest));
  const int64_t ntiles = static_cast<int64_t>(tiles.size()), tasks = ntiles * splits, half_in = in / 2;
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  const B* xp = x.data_ptr<B>();
  const B* ap = at2.data_ptr<B>();
  const B* bp = bt2.data_ptr<B>();
  B* yp = y.data_ptr<B>();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    for (int64_t t = tasks * tid / nt; t < tasks * (tid + 1) / nt; ++t) {  // split-major: a thread
      const int64_t s = t / ntiles;  // takes one half of x's pairs for every tile, so A is read once
      run_tile(tiles[t % ntiles], order, rg, xp, x.stride(0), ap, R, half_in * s / splits,
               half_in * (s + 1) / splits, part.data() + s * n * widest, widest);
    }
#pragma omp barrier
    for (int64_t o = static_cast<int64_t>(order.size()) * tid / nt;
         o < static_cast<int64_t>(order.size()) * (tid + 1) / nt; ++o) {
      const int64_t i = order[o], nr = rg[2 * i + 1] - rg[2 * i];
      for (int64_t c = 0; c < nr; ++c) {
        float sum = 0.f;
        for (int s = 0; s < splits; ++s) sum += part[(s * n + i) * widest + c];
        hb[i * widest + c] = static_cast<B>(sum);
      }
    }
#pragma omp barrier
    add_update_pairs(yp, y.stride(0), hb.data(), widest, bp, groups, order, live, out, blocks * tid / nt,
                     blocks * (tid + 1) / nt);
  }
#else
  TORCH_CHECK(false, "lora_add_: bfloat16 rank pairs need a CPU with AVX512_BF16 (see lora_bf16_pairs())");
#endif
}

void lora_add_(at::Tensor y, const at::Tensor& x, const at::Tensor& at, const at::Tensor& bt,
               const at::Tensor& ranges, const c10::optional<at::Tensor>& live) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && at.device().is_cpu() && bt.device().is_cpu(),
              "lora_add_ is a CPU kernel");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0), "y and x must be [rows, features] "
              "with the same rows");
  TORCH_CHECK(y.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x and y must both be float32 or both bfloat16");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "x and y must have a contiguous last dimension");
  TORCH_CHECK(at.scalar_type() == bt.scalar_type() && at.is_contiguous() && bt.is_contiguous(),
              "the factors must be contiguous and of one dtype");
  const bool pairs = at.scalar_type() == at::kBFloat16;
  TORCH_CHECK(pairs ? (at.dim() == 3 && bt.dim() == 3 && at.size(2) == 2 && bt.size(2) == 2 &&
                       x.scalar_type() == at::kBFloat16)
                    : (at.scalar_type() == at::kFloat && at.dim() == 2 && bt.dim() == 2),
              "the factors must be float32 [in, R] and [R, out], or bfloat16 rank pairs [in/2, R, 2] "
              "and [R/2, out, 2] for a bfloat16 x");
  const int64_t R = at.size(1), in = pairs ? 2 * at.size(0) : at.size(0);
  const int64_t bt_rows = pairs ? 2 * bt.size(0) : bt.size(0);
  TORCH_CHECK(in == x.size(1) && bt_rows == R && bt.size(1) == y.size(1), "factor shapes ", at.sizes(), " and ",
              bt.sizes(), " do not map ", x.size(1), " -> ", y.size(1));
  TORCH_CHECK(ranges.scalar_type() == at::kInt && ranges.is_contiguous() && ranges.dim() == 2 &&
                  ranges.size(0) == x.size(0) && ranges.size(1) == 2,
              "ranges must be a contiguous int32 [rows, 2] tensor");
  const uint8_t* live_rows = nullptr;
  if (live.has_value() && live->defined()) {
    const int64_t blocks = (y.size(1) + kBlock - 1) / kBlock;
    TORCH_CHECK(live->scalar_type() == at::kByte && live->is_contiguous() && live->dim() == 2 &&
                    live->size(0) == bt.size(0) && live->size(1) == blocks,
                "live must be a contiguous uint8 [", bt.size(0), ", ", blocks, "] tensor");
    live_rows = live->data_ptr<uint8_t>();
  }
  const int32_t* rg = ranges.data_ptr<int32_t>();
  int64_t widest = 0, rank_rows = 0;
  for (int64_t i = 0; i < x.size(0); ++i) {
    const int64_t c0 = rg[2 * i], c1 = rg[2 * i + 1];
    TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= R, "ranges[", i, "] = (", c0, ", ", c1,
                ") is not a range of the ", R, " stacked rank columns");
    TORCH_CHECK(!pairs || (c0 % 2 == 0 && c1 % 2 == 0), "ranges[", i, "] = (", c0, ", ", c1,
                ") must be even for rank pairs");
    widest = std::max(widest, c1 - c0);
    rank_rows += c1 - c0;
  }
  if (widest == 0) return;
  if (pairs) {
    lora_add_pairs(y, x, at, bt, ranges, live_rows, widest, rank_rows);
  } else if (x.scalar_type() == at::kFloat) {
    lora_add_typed<float>(y, x, at, bt, ranges, live_rows, widest, rank_rows);
  } else {
    lora_add_typed<c10::BFloat16>(y, x, at, bt, ranges, live_rows, widest, rank_rows);
  }
}

bool lora_bf16_pairs() {
#if defined(PREFLOOP_LORA_PAIRS)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefloop_kernels, m) {
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor at, Tensor bt, Tensor ranges, Tensor? live=None) -> ()");
  m.def("lora_bf16_pairs() -> bool");
  m.impl("lora_add_", c10::DispatchKey::CPU, &lora_add_);
  m.impl("lora_bf16_pairs", c10::DispatchKey::CatchAll, &lora_bf16_pairs);
}
