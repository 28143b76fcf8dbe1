"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns next-token logits.

The only engine piece that touches tensors: it owns the model and the KV cache, builds the flat
batch (decode tokens first, then prefill chunks), the slot mapping and block tables, and executes
block copies requested by the block manager (forked candidates' partial blocks) and the key
re-rotation of context shifts.
"""
from __future__ import annotations

import torch

from prefloop.server.engine.block_manager import ShiftPlan
from prefloop.server.engine.kv_cache import allocate_kv_cache
from prefloop.server.engine.kv_shift import apply_shift_plan
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.engine.scheduler import ScheduledSeq
from prefloop.server.engine.sequence import Sequence
from prefloop.server.model.attention import AttentionMetadata, PrefillChunk
from prefloop.server.model.llama import LlamaModel
from prefloop.server.model.lora import StepAdapters


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, block_size, self.dtype, self.device)

    def release_kv_cache(self) -> None:
        """Free the cache tensors (the engine is stopped; nothing may step it again)."""
        self.kv_caches = []

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def apply_shift(self, plan: ShiftPlan) -> None:
        """Re-rotate (and move) cached keys for a context shift; see server/engine/context.py."""
        apply_shift_plan(self.kv_caches, plan, self.model.config)

    def warm_up(self) -> None:
        """Run the step shapes a compiled model specializes on (one token; a prompt chunk sampling
        once; several tokens sampling several times) so compilation happens here, at engine
        start, and not on a user's first request. Writes scratch K/V into block 0, which is free
        (the engine has admitted nothing yet)."""
        def seq(computed: int) -> Sequence:
            s = Sequence(-1, "warm-up", 0, [0, 0, 0], 3, SamplingParams(max_tokens=1), -1)
            s.block_table, s.num_computed = [0, 0, 0], computed
            return s

        for batch in ([ScheduledSeq(seq(1), 1)], [ScheduledSeq(seq(0), 2)],
                      [ScheduledSeq(seq(1), 1), ScheduledSeq(seq(0), 2)]):
            self.execute(batch)

    def _slots(self, block_table: list[int], start: int, n: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, start + n)]

    def build(self, batch: list[ScheduledSeq]):
        """Flat inputs for a batch already ordered decode-first; returns tensors + logits indices."""
        dev, bs = self.device, self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        decodes = [s for s in batch if s.num_tokens == 1]
        prefills = [s for s in batch if s.num_tokens > 1]
        for s in decodes:
            seq, pos = s.seq, s.seq.num_computed
            ids.append(seq.context_token(pos))
            positions.append(pos)
            slots.extend(self._slots(seq.block_table, pos, 1))
            logits_indices.append(len(ids) - 1)
        chunks: list[PrefillChunk] = []
        for s in prefills:
            seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
            ctx = start + n
            q_start = len(ids)
            ids.extend(seq.context_ids[start:ctx])
            positions.extend(range(start, ctx))
            slots.extend(self._slots(seq.block_table, start, n))
            logits_indices.append(len(ids) - 1)
            q_pos = torch.arange(start, ctx, device=dev).unsqueeze(1)
            mask = torch.arange(ctx, device=dev).unsqueeze(0) <= q_pos  # [n, ctx] causal
            block_ids = torch.tensor(seq.block_table[:-(-ctx // bs)], device=dev)
            chunks.append(PrefillChunk(q_start, n, block_ids, ctx, mask))
        decode_tables = decode_mask = ctx_lens = None
        kernel = self.model.decode_kernel
        if decodes:
            width = max(-(-(s.seq.num_computed + 1) // bs) for s in decodes)
            tables = [s.seq.block_table[:width] + [0] * (width - len(s.seq.block_table[:width]))
                      for s in decodes]
            decode_tables = torch.tensor(tables, device=dev)  # [num_decode, width]
            ctx_lens = torch.tensor([s.seq.num_computed + 1 for s in decodes], device=dev)
            if kernel is None:  # the SDPA path attends over whole blocks: mask the padding
                decode_mask = (torch.arange(width * bs, device=dev).unsqueeze(0) < ctx_lens.unsqueeze(1))
                decode_mask = decode_mask[:, None, None, :]  # [num_decode, 1, 1, width * bs]
        step_adapters = None  # per-request adapters: which adapter each token row uses
        if any(s.seq.adapter for s in decodes + prefills):
            row_adapters: list[int] = []
            for s in decodes + prefills:
                row_adapters += [s.seq.adapter] * s.num_tokens
            step_adapters = StepAdapters.of(row_adapters)
        meta = AttentionMetadata(
            adapter_rows=step_adapters,
            slot_mapping=torch.tensor(slots, device=dev),
            num_decode=len(decodes),
            decode_block_tables=decode_tables,
            decode_ctx_lens=ctx_lens,
            decode_mask=decode_mask,
            prefills=chunks,
            decode_kernel=kernel,
        )
        return (torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta,
                torch.tensor(logits_indices, device=dev), decodes + prefills)

    def execute(self, batch: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Run one step; returns the batch in execution order and logits [len(batch), vocab] (CPU)."""
        ids, positions, meta, logits_indices, ordered = self.build(batch)
        logits = self.model(ids, positions, self.kv_caches, meta, logits_indices)
        return ordered, logits.cpu()
