"""Small decoders that differ only in how they encode position, built for `prefloop rope`.

Three families with the same size and the same non-positional weights (same seed):

- ``rope``: queries and keys rotated by their absolute position (server/model/rope.py, rotate-half);
  a cached key carries its position as an angle.
- ``absolute``: a learned table P[pos] added to the token embedding (GPT-2 style). Positions at or
  beyond the table cannot be represented at all. The table is initialised with sinusoids (a smooth
  stand-in for a trained table) plus noise.
- ``t5``: keys and queries carry no position; every attention adds a learned bias
  b[head, bucket(m - n)] (T5's causal log-spaced buckets: distances >= `t5_max_distance` share the
  last bucket).

Weights are random: these models measure mechanics (cache stability, moving a cached prefix, the
per-step cost), not quality. The cache is a plain per-layer list of [tokens, heads, head_dim]
tensors plus the key positions (the T5 bias needs them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prefloop.server.model.rope import apply_rope, precompute_cos_sin, rope_inv_freq

FAMILIES = ("rope", "absolute", "t5")
ROPE_TABLE = 1 << 15  # cos/sin rows precomputed for the rope family


@dataclass(slots=True)
class FamilyConfig:
    kind: str  # rope | absolute | t5
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 1024  # absolute: the learned table (t5: distances precomputed up to here)
    rope_theta: float = 10000.0
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAMILIES:
            raise ValueError(f"kind must be one of {FAMILIES}, got {self.kind!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size / num_heads must be an even integer")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def t5_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal relative-position bucket of distance = query_pos - key_pos >= 0.

    Half the buckets are exact (0 .. num_buckets/2 - 1), the rest log-spaced up to max_distance;
    every distance >= max_distance lands in the last bucket.
    """
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, large)


@dataclass
class FamilyCache:
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [tokens, heads, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [tokens]

    def __len__(self) -> int:
        return int(self.positions.numel())

    def clone(self) -> "FamilyCache":
        return FamilyCache([k.clone() for k in self.keys], [v.clone() for v in self.values],
                           self.positions.clone())


class _Layer(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm1 = nn.RMSNorm(h)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.out = nn.Linear(h, h, bias=False)
        self.norm2 = nn.RMSNorm(h)
        self.up = nn.Linear(h, 4 * h, bias=False)
        self.down = nn.Linear(4 * h, h, bias=False)


class FamilyModel(nn.Module):
    """forward(ids [n], positions [n], cache) -> logits [n, vocab]; appends the new K/V to cache."""

    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # identical non-positional weights in every family
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        if cfg.kind == "absolute":
            cos, sin = precompute_cos_sin(cfg.hidden_size, cfg.max_positions, 10000.0)
            table = torch.cat([sin[:, : cfg.hidden_size // 2], cos[:, : cfg.hidden_size // 2]], -1)
            table = table + 0.1 * torch.randn(table.shape, generator=gen)  # [max_positions, hidden]
            self.pos_embed = nn.Parameter(table)
        elif cfg.kind == "rope":  # a table for speed; positions beyond it are computed (no limit)
            self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
            cos, sin = precompute_cos_sin(cfg.head_dim, ROPE_TABLE, cfg.rope_theta)
            self.register_buffer("cos", cos, persistent=False)  # [ROPE_TABLE, head_dim]
            self.register_buffer("sin", sin, persistent=False)
        else:
            self.rel_bias = nn.Parameter(torch.randn(cfg.t5_num_buckets, cfg.num_heads, generator=gen))
            self.register_buffer("bucket_of_distance", t5_bucket(
                torch.arange(cfg.max_positions), cfg.t5_num_buckets, cfg.t5_max_distance), persistent=False)
        self.eval()

    # -- pieces the study measures separately ---------------------------------------------------
    def embed_at(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # [n, hidden]
        if self.cfg.kind == "absolute":
            if int(positions.max()) >= self.cfg.max_positions:
                raise ValueError(f"position {int(positions.max())} is beyond the learned table of "
                                 f"{self.cfg.max_positions} positions: it cannot be represented")
            h = h + self.pos_embed[positions]
        return h

    def qkv_at(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        """q, k, v [n, heads, head_dim] of one layer for hidden states h [n, hidden]."""
        cfg, n = self.cfg, h.shape[0]
        q, k, v = self.layers[layer].qkv(self.layers[layer].norm1(h)).split(cfg.hidden_size, dim=-1)
        q = q.view(n, cfg.num_heads, cfg.head_dim)
        k = k.view(n, cfg.num_heads, cfg.head_dim)
        v = v.view(n, cfg.num_heads, cfg.head_dim)
        if cfg.kind == "rope":
            cos, sin = self.rope_cos_sin(positions)  # [n, head_dim]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions.max()) < ROPE_TABLE and int(positions.min()) >= 0:
            return self.cos[positions], self.sin[positions]
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]  # [n, head_dim // 2]
        angles = torch.cat([angles, angles], dim=-1)  # [n, head_dim]
        return angles.cos().float(), angles.sin().float()

    def attention_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Additive mask [heads, n_q, n_k]: the T5 bias (t5 only) and -inf on future keys."""
        distance = q_pos[:, None] - k_pos[None, :]  # [n_q, n_k]
        bias = torch.zeros(self.cfg.num_heads, *distance.shape)
        if self.cfg.kind == "t5":
            bucket = self.bucket_of_distance[distance.clamp(0, self.cfg.max_positions - 1)]
            bias = self.rel_bias[bucket].permute(2, 0, 1)  # [heads, n_q, n_k]
        return bias.masked_fill(distance[None] < 0, float("-inf"))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: FamilyCache | None = None
                ) -> torch.Tensor:
        cache = cache if cache is not None else FamilyCache()
        h = self.embed_at(ids, positions)
        k_pos = torch.cat([cache.positions, positions])
        mask = self.attention_bias(positions, k_pos)  # [heads, n, ctx]
        scale = self.cfg.head_dim ** -0.5
        for i, layer in enumerate(self.layers):
            q, k, v = self.qkv_at(i, h, positions)
            if len(cache.keys) <= i:
                cache.keys.append(k)
                cache.values.append(v)
            else:
                cache.keys[i] = torch.cat([cache.keys[i], k])  # [ctx, heads, head_dim]
                cache.values[i] = torch.cat([cache.values[i], v])
            att = F.scaled_dot_product_attention(
                q.transpose(0, 1), cache.keys[i].transpose(0, 1), cache.values[i].transpose(0, 1),
                attn_mask=mask, scale=scale)  # [heads, n, head_dim]
            h = h + layer.out(att.transpose(0, 1).reshape(h.shape[0], -1))
            h = h + layer.down(F.gelu(layer.up(layer.norm2(h))))
        cache.positions = k_pos
        return self.head(self.norm(h))  # [n, vocab]

    def move_cache(self, cache: FamilyCache, delta: int) -> FamilyCache | None:
        """The cache of the same tokens at positions + delta without recomputing, or None.

        rope: rotate every key by delta (R(delta) R(p) = R(p + delta)); t5: keys carry no position,
        only the stored positions change; absolute: impossible (the position is mixed into the
        residual stream before layer 0), so None — the prefix must be recomputed.
        """
        if self.cfg.kind == "absolute":
            return None
        moved = cache.clone()
        moved.positions = cache.positions + delta
        if self.cfg.kind == "rope":
            cos, sin = self.rope_cos_sin(torch.tensor([delta]))  # [1, head_dim]: one angle set
            moved.keys = [apply_rope(k, cos, sin) for k in moved.keys]
        return moved

    def step_bias(self, position: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor | None:
        """What a decode step adds to the scores: the T5 bias over every cached position
        [heads, 1, ctx] (t5), nothing for the other families."""
        if self.cfg.kind != "t5":
            return None
        distance = (position - key_positions).clamp(0, self.cfg.max_positions - 1)  # [ctx]
        return self.rel_bias[self.bucket_of_distance[distance]].t().unsqueeze(1)  # [heads, 1, ctx]

    @torch.inference_mode()
    def decode_attention(self, layer: int, h: torch.Tensor, position: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """One decode step of one layer's attention over a cache keys/values [heads, ctx, head_dim]
        (everything a family does per generated token: projection, rotation, bias, attention).
        h [1, hidden]."""
        q, _, _ = self.qkv_at(layer, h, position)  # rope: rotates q (and the new k)
        return F.scaled_dot_product_attention(q.transpose(0, 1), keys, values,
                                              attn_mask=self.step_bias(position, key_positions),
                                              scale=self.cfg.head_dim ** -0.5)  # [heads, 1, head_dim]
