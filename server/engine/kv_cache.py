"""KVCacheConfig and the pre-allocated paged cache tensors (one K and one V tensor per layer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefloop.server.model.config import ModelConfig


@dataclass(slots=True)
class KVCacheConfig:
    block_size: int = 16
    capacity_tokens: int | None = None  # exact size in tokens (rounded up to whole blocks) ...
    capacity_gib: float = 1.0  # ... or in GiB when capacity_tokens is None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.capacity_tokens is not None and self.capacity_tokens < self.block_size:
            raise ValueError(f"KV cache capacity must hold at least one block ({self.block_size} tokens)")
        if self.capacity_tokens is None and self.capacity_gib <= 0:
            raise ValueError("KV cache capacity in GiB must be > 0")


def num_blocks_for(cache: KVCacheConfig, cfg: ModelConfig, dtype: torch.dtype) -> int:
    if cache.capacity_tokens is not None:
        return -(-cache.capacity_tokens // cache.block_size)
    per_block = cfg.kv_bytes_per_token(dtype.itemsize) * cache.block_size
    return max(1, int(cache.capacity_gib * 2**30) // per_block)


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)  # [blocks, block_size, kvh, hd]
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)]
