"""The Llama-family decoder in PyTorch over flat token batches (no padding).

Inputs per step: token ids [num_tokens], positions [num_tokens], AttentionMetadata (slot mapping,
block tables) and the per-layer KV cache; the layers reach the last two through
`server/model/step_context.py`, so the dense math can be compiled as one graph (`compile_step`).
Q/K/V and gate/up projections are fused into one matmul each; weights are loaded from HF names in
`server/model/loader.py`. With `fused_ops` (bfloat16 with the native kernel library) eager steps
run each layer's norms, residual adds, RoPE and SiLU x up as four fused ops (server/model/csrc/fused_ops.cpp).
A decode-only step whose projections all run prefloop's quantized kernels (server/model/quant_gemv.py)
or oneDNN-packed bfloat16 weights runs each layer as one native call instead (server/model/csrc/decode_layer.cpp: the same ops from
C++, without the Python between them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prefloop.server.model.attention import AttentionMetadata
from prefloop.server.model.config import ModelConfig
from prefloop.server.model.lora import KERNEL_ROWS as LORA_KERNEL_ROWS
from prefloop.server.model.rope import apply_rope, config_cos_sin
from prefloop.server.model.step_context import current_step, layer_attention, step_context


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 like HF LlamaRMSNorm, then cast back.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, fused: bool = False):
        n = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # one rotation pass for queries and keys together: [n, H + kvh, hd]
        qk = qk.view(n, self.n_heads + self.n_kv, self.head_dim)
        if fused:
            torch.ops.prefloop_kernels.rope_(qk, cos, sin)  # in place, in the fresh QKV output
        else:
            qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]  # [n, H, hd], [n, kvh, hd]
        v = v.view(n, self.n_kv, self.head_dim)  # [n, kvh, hd]
        out = layer_attention(q, k, v, self.layer_idx, self.scale)  # writes K/V, attends: [n, H, hd]
        return self.o_proj(out.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, fused: bool = False):
        if fused:
            return self.down_proj(torch.ops.prefloop_kernels.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, fused: bool = False):
        if fused:  # the same math in 4 passes over h (server/model/csrc/fused_ops.cpp); h is updated in place
            ops, n1, n2 = torch.ops.prefloop_kernels, self.input_layernorm, self.post_attention_layernorm
            x = ops.add_rms_norm_(h, self.self_attn(ops.rms_norm(h, n1.weight, n1.eps), cos, sin, True),
                                  n2.weight, n2.eps)  # h += attention; x = norm(h)
            return h.add_(self.mlp(x, True))
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Decoder + LM head. `forward` returns logits only for `logits_indices` (tokens that sample)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = self.rope_tables(cfg)
        self.register_buffer("cos_table", cos, persistent=False)  # [max_pos, head_dim] float32
        self.register_buffer("sin_table", sin, persistent=False)
        self._step = None  # the compiled step_logits once compile_step() ran
        # native paged decode attention (server/model/kernels.py); None = gather + SDPA
        self.decode_kernel = None
        self.packed_weights = False  # linear weights prepacked for oneDNN (server/model/packed_linear.py)
        # eager steps use the fused norm / residual / RoPE / SiLU ops of server/model/csrc/fused_ops.cpp
        # (loaded with the decode kernel: server/model/kernels.py)
        self.fused_ops = False
        # per layer, the native decode_layer_ call's (weight arguments, LoRA arguments) for steps
        # without adapters ([]: some layer it cannot run); built on the first decode step that
        # could use them (decode_layer_args)
        self._decode_layer_args: list | None = None
        self._decode_layer_rows = 0  # the most rows every layer's kernels take
        # (adapter generation, step's adapter ids, each row's adapter, dtype) -> that step's
        # per-layer arguments with LoRA: rows keep their adapters from step to step, and building
        # the list is 120 Python calls (~0.4 ms of a 20 ms step at 8 streams)
        self._decode_lora_args: dict[tuple, list | None] = {}
        self.adapter_generation = 0  # bumped by server/model/lora.py when adapters change

    @staticmethod
    def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return config_cos_sin(cfg)

    def step_logits(self, input_ids, positions, logits_indices):
        """One step's math; caches and attention metadata come from `step_context`. This is the
        function `compile_step` hands to torch.compile (attention stays an opaque op inside it)."""
        h = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        cos = self.cos_table[positions].to(h.dtype)  # [num_tokens, head_dim]
        sin = self.sin_table[positions].to(h.dtype)
        fused = self.fused_ops and not torch.compiler.is_compiling()  # inductor fuses by itself
        layer_args = self.decode_layer_args(h.shape[0], h.dtype) if fused else None
        if layer_args is not None:
            kv_caches, meta = current_step()
            for (k_cache, v_cache), (args, lora_args) in zip(kv_caches, layer_args):
                torch.ops.prefloop_kernels.decode_layer_(
                    h, *args, cos, sin, k_cache, v_cache, meta.slot_mapping, meta.decode_block_tables,
                    meta.decode_ctx_lens, self.config.num_heads, self.config.num_kv_heads,
                    self.config.head_dim, self.layers[0].self_attn.scale, lora_args)
            return self.lm_head(self.norm(h[logits_indices])).float()
        for layer in self.layers:
            h = layer(h, cos, sin, fused)
        return self.lm_head(self.norm(h[logits_indices])).float()  # [num_sampled, vocab]

    def decode_layer_args(self, num_tokens: int, dtype: torch.dtype) -> list | None:
        """The per-layer arguments of the native decode_layer_ op when this step can take it: every
        token a decode (native attention), every projection of every layer on prefloop's quantized
        kernels for this many rows or on oneDNN-packed bfloat16 weights, without a bias, and rows
        on adapters only where every adapted projection's update runs natively
        (server/model/lora.py). Per layer: (weight arguments, LoRA arguments); else None."""
        step = current_step()
        if step is None or not self.layers:
            return None
        meta = step[1]
        if meta.prefills or meta.num_decode != num_tokens or meta.decode_kernel is None:
            return None
        if self._decode_layer_args is None:
            per_layer = [_layer_args(layer) for layer in self.layers]
            runnable = all(p is not None for p in per_layer)
            # (weight arguments, no LoRA arguments) per layer: the common step's list, built once
            self._decode_layer_args = [(p[0], []) for p in per_layer] if runnable else []
            self._decode_layer_rows = min(p[1] for p in per_layer) if runnable else 0
        if not self._decode_layer_args or num_tokens > self._decode_layer_rows:
            return None
        adapters = meta.adapter_rows
        if adapters is None:
            return self._decode_layer_args
        if num_tokens > LORA_KERNEL_ROWS:
            return None
        key = (self.adapter_generation, adapters.ids, adapters.rows, dtype)
        if key in self._decode_lora_args:
            return self._decode_lora_args[key]
        out: list | None = []
        for layer, (args, _) in zip(self.layers, self._decode_layer_args):
            lora_args = _lora_args(layer, adapters, dtype)
            if lora_args is None:
                out = None
                break
            out.append((args, lora_args))
        if len(self._decode_lora_args) >= DECODE_LORA_ARGS_KEPT:
            self._decode_lora_args.clear()
        self._decode_lora_args[key] = out
        return out

    def compile_step(self) -> None:
        """Run `step_logits` through torch.compile (inductor) from now on; see server/model/compile.py."""
        from prefloop.server.model.compile import compiled_step
        for module in self.modules():  # e.g. Int8Linear builds its lazy state before tracing
            prepare = getattr(module, "prepare_for_compile", None)
            if prepare is not None:
                prepare()
        self._step = compiled_step(self.step_logits)

    @property
    def compiled(self) -> bool:
        return self._step is not None

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        step = self._step or self.step_logits
        with step_context(kv_caches, meta):
            return step(input_ids, positions, logits_indices)


DECODE_LORA_ARGS_KEPT = 16  # steps' row layouts whose LoRA arguments a model keeps
DENSE_ROWS = 1 << 30  # a oneDNN-packed projection takes any number of rows


def _native_projection(module: nn.Module) -> tuple | None:
    """(packed, scales or None, max rows) of a projection decode_layer_ can run — on the native
    quantized kernels, or a oneDNN-packed dense weight — without a bias (under a LoRA wrapper too:
    its update is added by the same native call, `_lora_args`); else None."""
    base = getattr(module, "base", module)
    if getattr(base, "bias", None) is not None:
        return None
    if getattr(base, "native", False):
        return base.packed, getattr(base, "native_scales", None), base.max_rows
    packed = getattr(base, "packed", None)
    if isinstance(packed, torch.Tensor) and packed.is_mkldnn and packed.dtype == torch.bfloat16:
        return packed, None, DENSE_ROWS
    return None


def _layer_args(layer: DecoderLayer) -> tuple | None:
    """decode_layer_'s weight arguments for one layer, or None when it cannot run the layer."""
    attn, mlp = layer.self_attn, layer.mlp
    projs = [_native_projection(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(p is None for p in projs):
        return None
    (qkv, qkv_s, _), (o, o_s, _), (gu, gu_s, _), (down, down_s, _) = projs
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    return (n1.weight, n1.eps, qkv, qkv_s, o, o_s, n2.weight, n2.eps, gu, gu_s, down, down_s), \
        min(p[2] for p in projs)


def _lora_args(layer: DecoderLayer, adapters, dtype: torch.dtype) -> list | None:
    """decode_layer_'s `lora` list for one layer and step: (at, bt, ranges, live) per projection,
    Nones where a projection has no adapter of the step; None when an update cannot run natively."""
    attn, mlp = layer.self_attn, layer.mlp
    out: list = []
    for module in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        update = getattr(module, "native_update", None)
        if update is None:  # not wrapped for adapters: nothing to add
            out += [None] * 4
            continue
        args = update(adapters, dtype, module.base.in_features)
        if args is False:
            return None
        out += [None] * 4 if args is None else list(args)
    return out
