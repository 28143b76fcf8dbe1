"""Sequence: one candidate completion being generated — its tokens, cache blocks and progress."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from prefloop.server.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n candidates
    token_ids: list[int]  # prompt followed by generated tokens
    prompt_len: int
    params: SamplingParams
    arrival: int  # engine-wide order of admission, used to pick the newest for preemption
    generator: torch.Generator | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of its full cached blocks
    finish_reason: str | None = None
    num_preemptions: int = 0
    children_pending: int = 0  # candidates still to fork off this one once its prompt is computed
    # Context overflow (server/engine/context.py): the model sees token_ids[:n_keep] followed by
    # token_ids[n_keep + num_dropped:] at positions 0, 1, ... (the "context"); token_ids keeps the
    # whole history, so outputs and penalties are unaffected by dropping.
    n_keep: int = 0
    num_dropped: int = 0
    cache_shifted: bool = False  # cached K/V were moved by a shift: never register them as a prefix
    num_shifts: int = 0
    matcher: object | None = None  # llguidance LLMatcher of a structured-output request
    adapter: int = 0  # per-request LoRA adapter id (server/model/lora.py); 0: the base model

    @property
    def prefix_root(self) -> object:
        """Where its prefix-cache hash chain starts: blocks computed under an adapter are only
        shared with sequences using the same adapter."""
        return None if self.adapter == 0 else ("lora", self.adapter)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def context_len(self) -> int:
        """Tokens the model sees (cached or to compute): the history minus the dropped span."""
        return len(self.token_ids) - self.num_dropped

    @property
    def context_ids(self) -> list[int]:
        if not self.num_dropped:
            return self.token_ids
        return self.token_ids[:self.n_keep] + self.token_ids[self.n_keep + self.num_dropped:]

    def context_token(self, index: int) -> int:
        """The token at context index (= position) `index`."""
        return self.token_ids[index if index < self.n_keep else index + self.num_dropped]

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the last one are still uncomputed."""
        return self.num_computed < self.context_len - 1 or self.num_computed == 0

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
