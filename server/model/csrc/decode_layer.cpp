// One decoder layer of a decode step in one call (prefloop's native engine, eager decode steps).
//
//   decode_layer_(h [n, d], weights, cos [n, hd], sin [n, hd], k_cache, v_cache, slot_mapping [n],
//                 block_tables [n, blocks], ctx_lens [n], sizes, scale, lora) -> ()  (h in place)
//
// The eager layer (server/model/llama.py, fused path) is 10-12 torch calls from Python per layer:
// with the integer-dot kernels a one-stream int4 step spent about 1.9 of its 6.6 ms in the Python
// around them (docs/performance.md, decode_profile.py). This runs the same calls, in the same
// order on the same kernels, from C++, so its output is the Python path's, bit for bit (tested):
//   x = rms_norm(h); qkv = proj(x); rope_(q, k); K/V written at their slots; attention by
//   paged_decode; h += proj_o(attention), x = rms_norm(h); h += proj_down(silu_mul(proj_gate_up(x)))
// A projection is the native quantized layout, int4 (`packed` uint8 [N/16, K/32, 320], no scales)
// or int8 (`packed` [N/16, K/32, 512] with float32 `scales`) as server/model/quant_gemv.py packs
// them, or a dense weight prepacked by oneDNN (bfloat16 `--weight-layout packed`). Rows on LoRA
// adapters get each projection's update by the same native call LoraLinear makes (`lora`: per
// projection at, bt, ranges, live; server/model/lora.py). Decode rows only (no prefill chunk), no
// biases: LlamaModel takes this path only for such steps.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <string>

namespace {

at::Tensor call_int4(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::int4_gemv", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, packed);
}

at::Tensor call_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::int8_gemv", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, packed, scales);
}

// oneDNN-prepacked dense weights (server/model/packed_linear.py), as torch.ops.mkldnn._linear_pointwise
// (x, packed, None, "none", [], "") is called there: boxed, its schema's optional lists are not worth
// spelling out for one call per projection.
at::Tensor call_packed_dense(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.emplace_back(x);
  stack.emplace_back(packed);
  stack.emplace_back(c10::IValue());  // no bias
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<c10::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

at::Tensor proj(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& scales) {
  if (packed.is_mkldnn()) return call_packed_dense(x, packed);
  return scales.has_value() ? call_int8(x, packed, *scales) : call_int4(x, packed);
}

// y += the LoRA update of its rows (lora_update.cpp), when `lora` holds this projection's arguments
// (at, bt, ranges, live) from index 4 * which; an empty list or an undefined `at`: no update.
void maybe_lora(at::Tensor& y, const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& lora,
                int64_t which) {
  if (lora.size() < static_cast<size_t>(4 * which + 4)) return;
  const c10::optional<at::Tensor> at_ = lora.get(4 * which);
  if (!at_.has_value()) return;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::lora_add_", "")
                       .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const c10::optional<at::Tensor>&)>();
  op.call(y, x, *at_, *lora.get(4 * which + 1), *lora.get(4 * which + 2), lora.get(4 * which + 3));
}

at::Tensor call_rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::rms_norm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, w, eps);
}

at::Tensor call_add_rms_norm_(at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::add_rms_norm_", "")
                       .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(h, delta, w, eps);
}

void call_rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::rope_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(x, cos, sin);
}

at::Tensor call_silu_mul(const at::Tensor& gate_up) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::silu_mul", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(gate_up);
}

at::Tensor call_paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& tables, const at::Tensor& lens, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prefloop_kernels::paged_decode", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double)>();
  return op.call(q, k_cache, v_cache, tables, lens, scale);
}

void decode_layer_(at::Tensor& h, const at::Tensor& norm1, double eps1, const at::Tensor& qkv,
                   const c10::optional<at::Tensor>& qkv_scales, const at::Tensor& o,
                   const c10::optional<at::Tensor>& o_scales, const at::Tensor& norm2, double eps2,
                   const at::Tensor& gate_up, const c10::optional<at::Tensor>& gate_up_scales,
                   const at::Tensor& down, const c10::optional<at::Tensor>& down_scales,
                   const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                   const at::Tensor& ctx_lens, int64_t n_heads, int64_t n_kv, int64_t head_dim,
                   double scale, const c10::List<c10::optional<at::Tensor>>& lora) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [rows, hidden] tensor");
  const int64_t n = h.size(0), q_size = n_heads * head_dim, kv_size = n_kv * head_dim;
  at::Tensor x = call_rms_norm(h, norm1, eps1);
  at::Tensor qkv_out = proj(x, qkv, qkv_scales);  // [n, q + 2 kv]
  maybe_lora(qkv_out, x, lora, 0);
  TORCH_CHECK(qkv_out.size(1) == q_size + 2 * kv_size, "the q/k/v projection has ", qkv_out.size(1),
              " outputs; the sizes say ", q_size + 2 * kv_size);
  at::Tensor qk = qkv_out.narrow(1, 0, q_size + kv_size).view({n, n_heads + n_kv, head_dim});
  call_rope_(qk, cos, sin);
  at::Tensor q = qk.narrow(1, 0, n_heads);
  at::Tensor k = qk.narrow(1, n_heads, n_kv);
  at::Tensor v = qkv_out.narrow(1, q_size + kv_size, kv_size).view({n, n_kv, head_dim});
  // the cache write of attention.write_kv: new keys / values at their slots
  at::Tensor flat_k = k_cache.view({-1, k_cache.size(2), k_cache.size(3)});
  at::Tensor flat_v = v_cache.view({-1, v_cache.size(2), v_cache.size(3)});
  flat_k.index_copy_(0, slot_mapping, k.to(flat_k.scalar_type()));
  flat_v.index_copy_(0, slot_mapping, v.to(flat_v.scalar_type()));
  at::Tensor attn = call_paged_decode(q, k_cache, v_cache, block_tables, ctx_lens, scale);
  const at::Tensor attn_rows = attn.reshape({n, q_size});
  at::Tensor o_out = proj(attn_rows, o, o_scales);
  maybe_lora(o_out, attn_rows, lora, 1);
  x = call_add_rms_norm_(h, o_out, norm2, eps2);  // h += attention; x = norm(h)
  at::Tensor gu = proj(x, gate_up, gate_up_scales);
  maybe_lora(gu, x, lora, 2);
  const at::Tensor act = call_silu_mul(gu);
  at::Tensor mlp = proj(act, down, down_scales);
  maybe_lora(mlp, act, lora, 3);
  h.add_(mlp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefloop_kernels, m) {
  m.def("decode_layer_(Tensor(a!) h, Tensor norm1, float eps1, Tensor qkv, Tensor? qkv_scales, Tensor o, "
        "Tensor? o_scales, Tensor norm2, float eps2, Tensor gate_up, Tensor? gate_up_scales, Tensor down, "
        "Tensor? down_scales, Tensor cos, Tensor sin, Tensor k_cache, Tensor v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor ctx_lens, int n_heads, int n_kv, int head_dim, float scale, "
        "Tensor?[] lora) -> ()");
  m.impl("decode_layer_", c10::DispatchKey::CPU, &decode_layer_);
  m.impl("decode_layer_", c10::DispatchKey::MkldnnCPU, &decode_layer_);  // oneDNN-packed weights
}
