"""Scheduler: continuous batching with chunked prefill and preemption by recompute (plain Python).

Every step it picks, under a token budget: one token for each running sequence that is decoding,
then prefill chunks (running ones first, then waiting ones in arrival order). When a decode cannot
get a block, the newest running sequence is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later (its generated tokens are kept), never failed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from prefloop.server.engine.block_manager import BlockManager
from prefloop.server.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens per step (the chunked-prefill budget)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for it this step, starting at seq.num_computed


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and return its blocks at once (finish, stop or abort)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        self.blocks.free(seq.block_table)
        seq.block_hashes.clear()

    def add_running(self, seq: Sequence) -> None:
        """A forked candidate joins the running batch directly (its prompt is already cached)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ----------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.requeue_for_recompute(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def requeue_for_recompute(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it goes first in the queue to recompute its context
        (preemption, and a context shift by recompute)."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed = 0
        seq.cache_shifted = False
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _newest_running(self) -> Sequence:
        return max(self.running, key=lambda s: s.arrival)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        scheduled: set[int] = set()

        # 1. decodes, oldest first; preempt the newest when blocks run out
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING or seq.in_prefill:
                continue
            while not self.blocks.grow(seq.block_table, seq.num_computed + 1):
                victim = self._newest_running()
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            out.append(ScheduledSeq(seq, 1))
            scheduled.add(seq.seq_id)
            budget -= 1

        # 2. chunks of running prefills, then admit waiting sequences
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.seq_id in scheduled or not seq.in_prefill:
                continue
            n = self._prefill_chunk(seq, budget)
            if n:
                out.append(ScheduledSeq(seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached, hashes = self.blocks.match_prefix(seq.context_ids, seq.prefix_root)
            self.blocks.acquire_prefix(cached)
            seq.block_table, seq.block_hashes = list(cached), list(hashes)
            seq.num_computed = len(cached) * self.blocks.block_size
            n = self._prefill_chunk(seq, budget)
            if n == 0:  # no blocks for it now: give the prefix back, keep its place in the queue
                self.blocks.free(seq.block_table)
                seq.block_hashes.clear()
                seq.num_computed = 0
                break
            self.blocks.record_prefix_lookup(seq.context_len, seq.num_computed)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n

        if not out and self.running:
            # Everything running is stuck on blocks: recompute the newest later.
            self._preempt(self._newest_running())
            return self.schedule()
        return out

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq's remaining prefill that fit the budget and the free blocks (0 if none)."""
        remaining = seq.context_len - seq.num_computed
        n = min(remaining, budget)
        while n > 0 and not self.blocks.grow(seq.block_table, seq.num_computed + n):
            n = min(n - 1, (self.blocks.num_free + len(seq.block_table)) * self.blocks.block_size
                    - seq.num_computed)
        return max(n, 0)
