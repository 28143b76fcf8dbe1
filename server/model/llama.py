"""The Llama-family decoder in PyTorch over flat token batches (no padding).

Inputs per step: token ids [num_tokens], positions [num_tokens], AttentionMetadata (slot mapping,
block tables) and the per-layer KV cache; the layers reach the last two through
`server/model/step_context.py`, so the dense math can be compiled as one graph (`compile_step`).
Q/K/V and gate/up projections are fused into one matmul each; weights are loaded from HF names in
`server/model/loader.py`. With `fused_ops` (bfloat16 with the native kernel library) eager steps
run each layer's norms, residual adds, RoPE and SiLU x up as four fused ops (server/model/csrc/fused_ops.cpp).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prefloop.server.model.attention import AttentionMetadata
from prefloop.server.model.config import ModelConfig
from prefloop.server.model.rope import apply_rope, config_cos_sin
from prefloop.server.model.step_context import layer_attention, step_context


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
        for layer in self.layers:
            h = layer(h, cos, sin, fused)
        return self.lm_head(self.norm(h[logits_indices])).float()  # [num_sampled, vocab]

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
