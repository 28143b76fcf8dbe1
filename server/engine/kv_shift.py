"""Context shift's tensor half: re-rotating cached keys by -delta instead of recomputing them.

`apply_shift_plan` executes the `ShiftPlan` that `BlockManager.shift` computed (which slots move
where, which shared blocks are copied first) on every layer's paged cache; R(-d) R(p) = R(p - d),
so a moved key is exactly the key it would have had at its new position. The policy and the
admission arithmetic are `context.py`.
"""
from __future__ import annotations

import torch

from prefloop.server.engine.block_manager import ShiftPlan
from prefloop.server.model.config import ModelConfig
from prefloop.server.model.rope import apply_rope, rope_inv_freq


def shift_cos_sin(config: ModelConfig, delta: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, head_dim] of the rotation R(-delta), computed in float64 (rotate-half layout).

    Scaled RoPE (linear, llama3) only rescales the frequencies, so angles stay linear in the
    position and R(a) R(b) = R(a + b) still holds.
    """
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    angles = -float(delta) * inv_freq  # [head_dim // 2]
    angles = torch.cat([angles, angles]).unsqueeze(0)  # [1, head_dim]
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate cached keys k [n, n_kv_heads, head_dim] by one angle set cos/sin [1, head_dim].

    Computed in at least float32 (bfloat16 caches are rounded once, on the way back).
    """
    compute = torch.promote_types(k.dtype, torch.float32)
    return apply_rope(k.to(compute), cos.to(compute), sin.to(compute)).to(k.dtype)


@torch.inference_mode()
def apply_shift_plan(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], plan: ShiftPlan,
                     config: ModelConfig) -> None:
    """Execute a ShiftPlan on every layer's paged cache [num_blocks, block_size, n_kv, head_dim]."""
    if not plan.move_src and not plan.copy_src:
        return
    device = kv_caches[0][0].device
    cos, sin = shift_cos_sin(config, plan.delta, device=device)
    copy_src = torch.tensor(plan.copy_src, dtype=torch.long, device=device)
    copy_dst = torch.tensor(plan.copy_dst, dtype=torch.long, device=device)
    move_src = torch.tensor(plan.move_src, dtype=torch.long, device=device)
    move_dst = torch.tensor(plan.move_dst, dtype=torch.long, device=device)
    moves_value = plan.move_src != plan.move_dst
    for k_cache, v_cache in kv_caches:
        flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, n_kv, head_dim]
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        if plan.copy_src:
            flat_k.index_copy_(0, copy_dst, flat_k.index_select(0, copy_src))
            flat_v.index_copy_(0, copy_dst, flat_v.index_select(0, copy_src))
        if plan.move_src:
            keys = flat_k.index_select(0, move_src)  # [n_moved, n_kv, head_dim]
            flat_k.index_copy_(0, move_dst, rotate_keys(keys, cos, sin))
            if moves_value:
                flat_v.index_copy_(0, move_dst, flat_v.index_select(0, move_src))
