"""Rotary position embedding (RoPE) as two pure functions.

Convention: Hugging Face "rotate-half" — the head dimension is split into two halves (x1, x2) and
pair i is (x[i], x[i + d/2]), rotated by angle pos * inv_freq[i]:
    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1).
Because R(a) R(b) = R(a + b), a key rotated once at its absolute position when it is written to the
cache never needs rewriting; `q_m . k_n` depends only on m - n.
"""
from __future__ import annotations

import math

import torch

from prefloop.server.model.config import ModelConfig


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float64, with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def precompute_cos_sin(head_dim: int, max_positions: int, theta: float, scaling: dict | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables cos, sin of shape [max_positions, head_dim] (halves duplicated, rotate-half layout)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    pos = torch.arange(max_positions, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)  # [max_positions, head_dim // 2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_positions, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def config_cos_sin(config: ModelConfig, dtype: torch.dtype = torch.float32):
    return precompute_cos_sin(config.head_dim, config.max_position_embeddings, config.rope_theta,
                              config.rope_scaling, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [num_tokens, n_heads, head_dim] by per-token cos/sin [num_tokens, head_dim]."""
    cos = cos.unsqueeze(1)  # [num_tokens, 1, head_dim]
    sin = sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
