"""Paged attention over a pre-allocated KV cache, in plain PyTorch (SDPA).

Cache layout, one pair of tensors per layer: k_cache, v_cache [num_blocks, block_size, n_kv_heads,
head_dim]. A token's slot is `block * block_size + offset`; new keys (already rotated by RoPE at
their absolute position) and values are written once at their slots and never rewritten.

`AttentionMetadata` is built once per step by the model runner and shared by every layer. The flat
token batch is ordered: all decode tokens first (one per sequence), then each prefill chunk. Decode
tokens go through the native kernel when the step carries one (server/model/kernels.py: reads
the cache in place), else through a gather of their blocks and SDPA with a padding mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    q_start: int  # index of the chunk's first token in the flat batch
    q_len: int  # tokens computed in this step
    block_ids: torch.Tensor  # [ceil(ctx_len / block_size)] cache blocks holding the context
    ctx_len: int  # cached tokens after this step (context before the chunk + q_len)
    causal_mask: torch.Tensor | None  # [q_len, ctx_len] bool, None when q_len == 1


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    num_decode: int  # the first num_decode tokens are single-token decode steps
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] (padded with block 0)
    decode_ctx_lens: torch.Tensor | None  # [num_decode] cached tokens per decode sequence, this one included
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_blocks * block_size] True = attend (SDPA path)
    prefills: list[PrefillChunk]
    decode_kernel: Callable[..., torch.Tensor] | None = None  # native paged decode, None = SDPA
    # per-request LoRA (server/model/lora.py): which adapter each token row uses
    adapter_rows: Any = None  # StepAdapters; None: no row uses an adapter


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values [num_tokens, n_kv_heads, head_dim] at their slots."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, n_kv_heads, head_dim]
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Context of sequences: cache[block_table] -> [..., n_blocks * block_size, n_kv_heads, head_dim]."""
    blocks = cache.index_select(0, block_table.reshape(-1))  # [B * n_blocks, block_size, kvh, hd]
    return blocks.view(*block_table.shape[:-1], -1, *cache.shape[2:])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of the flat queries q [num_tokens, n_heads, head_dim] over each sequence's cache."""
    num_tokens, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd and meta.decode_kernel is not None:
        out[:nd] = meta.decode_kernel(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens,
                                      scale)
    elif nd:
        # GQA without repeating K/V: the `group` query heads sharing a KV head become its query rows.
        qd = q[:nd].view(nd, n_kv, group, head_dim)  # [B, kvh, group, hd]
        kd = _gather(k_cache, meta.decode_block_tables).transpose(1, 2)  # [B, kvh, L, hd]
        vd = _gather(v_cache, meta.decode_block_tables).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = od.reshape(nd, n_heads, head_dim)
    for chunk in meta.prefills:
        qs = q[chunk.q_start:chunk.q_start + chunk.q_len]  # [q_len, H, hd]
        qs = qs.view(chunk.q_len, n_kv, group, head_dim).permute(1, 2, 0, 3)  # [kvh, group, q_len, hd]
        qs = qs.reshape(n_kv, group * chunk.q_len, head_dim)
        ks = _gather(k_cache, chunk.block_ids)[:chunk.ctx_len].transpose(0, 1)  # [kvh, ctx, hd]
        vs = _gather(v_cache, chunk.block_ids)[:chunk.ctx_len].transpose(0, 1)
        mask = None
        if chunk.causal_mask is not None:
            mask = chunk.causal_mask.repeat(group, 1)  # [group * q_len, ctx]
        os_ = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        os_ = os_.view(n_kv, group, chunk.q_len, head_dim).permute(2, 0, 1, 3)  # [q_len, kvh, g, hd]
        out[chunk.q_start:chunk.q_start + chunk.q_len] = os_.reshape(chunk.q_len, n_heads, head_dim)
    return out
