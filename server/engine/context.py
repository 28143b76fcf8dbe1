"""Context overflow: what the engine does when a conversation outgrows the context window.

Three policies (`ContextConfig.overflow`, the server flag `--context-overflow`):

- ``error`` (default): a request whose prompt + max_tokens exceeds the context is rejected with
  InvalidArgument naming the limit.
- ``truncate``: at admission, the oldest prompt tokens after the first `keep` ones are dropped so
  prompt + max_tokens fits. Nothing is cached yet, so this costs nothing and is exact.
- ``shift``: generation runs past the window. When a sequence's context would exceed it, the first
  `keep` tokens (system prompt / attention sinks) stay, the `discard` oldest tokens after them are
  dropped, and the keys of every token after the dropped span are re-rotated by -discard in the
  cache (one elementwise pass, R(-d) R(p) = R(p - d)) instead of being recomputed — llama.cpp's
  "context shift". A prompt longer than the window is first truncated as above. ``shift_method=
  "recompute"`` drops the same tokens and re-prefills the window instead (the baseline the
  benchmark compares against; vLLM-style).

This module is plain Python (no tensors): the config, the admission arithmetic and `check_prompt`,
the one prompt check both backends run once per request. The block bookkeeping of a shift (copy-on-write of shared blocks, leaving the prefix-cache
index) is `BlockManager.shift`; the tensor pass the model runner executes is `kv_shift.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from prefloop.server.errors import InvalidArgument

OVERFLOW_MODES = ("error", "truncate", "shift")
SHIFT_METHODS = ("rotate", "recompute")
DEFAULT_KEEP = 4  # BOS + the first few tokens: the "attention sinks" (Xiao et al., StreamingLLM)


@dataclass(slots=True)
class ContextConfig:
    overflow: str = "error"  # error | truncate | shift
    keep: int = DEFAULT_KEEP  # first tokens never dropped (system prompt / attention sinks)
    discard: int | None = None  # tokens dropped per shift, rounded up to whole blocks;
    #                             None = half of the window after `keep` (as llama.cpp)
    shift_method: str = "rotate"  # rotate cached keys, or drop and recompute the window (baseline)

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"context overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")
        if self.shift_method not in SHIFT_METHODS:
            raise ValueError(f"shift method must be one of {SHIFT_METHODS}, got {self.shift_method!r}")
        if self.keep < 0:
            raise ValueError(f"context keep must be >= 0, got {self.keep}")
        if self.discard is not None and self.discard < 1:
            raise ValueError(f"context discard must be >= 1, got {self.discard}")

    def discard_tokens(self, max_model_len: int, block_size: int) -> int:
        """Tokens dropped per shift: a whole number of blocks with keep + discard < max_model_len
        (InvalidArgument otherwise)."""
        if self.discard is None:  # half of what follows `keep`, whole blocks rounded down
            discard = max(block_size, (max_model_len - self.keep) // 2 // block_size * block_size)
        else:
            discard = -(-self.discard // block_size) * block_size
        if self.overflow != "error" and self.keep + discard >= max_model_len:
            raise InvalidArgument(  # a flag the user can fix, known once the model is loaded
                f"--context-keep ({self.keep}) + --context-discard ({discard} tokens, whole blocks of "
                f"{block_size}) must be below the context length {max_model_len}")
        return discard


def overflow_message(prompt_len: int, max_tokens: int, max_model_len: int) -> str:
    return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
            f"exceeds the context length {max_model_len}; lower max_tokens, shorten the prompt, or "
            f"start the server with --context-overflow truncate|shift")


def admission_drop(prompt_len: int, max_tokens: int, max_model_len: int, cfg: ContextConfig,
                   discard: int) -> int:
    """Prompt tokens to drop (right after the first `cfg.keep`) before the request is admitted.

    error: 0, or InvalidArgument when prompt + max_tokens exceeds the context.
    truncate: just enough that prompt + max_tokens fits (at least one prompt token after `keep`
    must remain, else InvalidArgument).
    shift: 0 while the prompt fits; a longer prompt keeps `max_model_len - discard` tokens, as if it
    had been shifted once (room for `discard` tokens before the first shift).
    """
    if cfg.overflow == "error":
        if prompt_len >= max_model_len:
            raise InvalidArgument(
                f"prompt has {prompt_len} tokens; the context length is {max_model_len} (start the "
                f"server with --context-overflow truncate|shift to drop the oldest tokens)")
        if prompt_len + max_tokens > max_model_len:
            raise InvalidArgument(overflow_message(prompt_len, max_tokens, max_model_len))
        return 0
    if cfg.overflow == "truncate":
        if prompt_len + max_tokens <= max_model_len:
            return 0
        room = max_model_len - max_tokens  # prompt tokens that fit beside max_tokens
        if room < cfg.keep + 1:
            raise InvalidArgument(
                f"max_tokens ({max_tokens}) leaves {max(room, 0)} of the context length "
                f"{max_model_len} for the prompt, but --context-keep {cfg.keep} plus at least one "
                f"recent prompt token must fit; lower max_tokens")
        return prompt_len - room
    if prompt_len < max_model_len:
        return 0
    return prompt_len - (max_model_len - discard)


def check_prompt(prompt_ids: list[int], max_tokens: int, vocab_size: int, max_model_len: int,
                 cfg: ContextConfig, discard: int) -> int:
    """The one check of a request's prompt ids, shared by every backend: non-empty, every id in
    the vocabulary, and prompt + max_tokens within the context under `cfg`'s overflow policy.
    Returns the prompt tokens to drop at admission (`admission_drop`); raises InvalidArgument."""
    if not prompt_ids:
        raise InvalidArgument("prompt is empty: it must contain at least one token")
    if any(not (0 <= t < vocab_size) for t in prompt_ids):
        raise InvalidArgument(f"prompt token ids must be in [0, {vocab_size})")
    return admission_drop(len(prompt_ids), max_tokens, max_model_len, cfg, discard)
