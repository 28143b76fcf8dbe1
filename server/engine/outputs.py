"""What every engine hands back: `SeqOutput` (one sequence's new tokens per step) and `EngineStats`.

Plain dataclasses with no torch import, shared by the native engine and the vLLM backend (which
must not import the native engine to speak the same interface).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SeqOutput:
    request_id: str
    index: int
    new_token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    num_output_tokens: int


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    total_blocks: int
    free_blocks: int
    block_size: int
    kv_bytes_per_token: int
    prefix_cache_queries: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    steps: int
    context_shifts: int = 0  # shifts past the context window (--context-overflow shift)
    truncated_prompts: int = 0  # prompts whose oldest tokens were dropped at admission
