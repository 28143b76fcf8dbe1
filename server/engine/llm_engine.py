"""LLMEngine: the synchronous core — requests in (token ids), one `step()` at a time, token deltas out.

It owns the scheduler, block manager and model runner; it sees token ids only (no tokenizer, no
gRPC). A request with n > 1 prefills its prompt once; the other candidates are forked off when the
prompt is computed, sharing its full blocks. What happens when a context outgrows the window
(error / truncate / shift) is set by `ContextConfig` (server/engine/context.py). `AsyncEngine`
(server/engine/async_engine.py) drives it from a background thread for asyncio callers.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from prefloop.server.engine.block_manager import BlockManager
from prefloop.server.engine.context import ContextConfig, check_prompt
from prefloop.server.engine.grammar import GrammarCompiler, apply_masks
from prefloop.server.engine.kv_cache import KVCacheConfig, num_blocks_for
from prefloop.server.engine.model_runner import ModelRunner
from prefloop.server.engine.outputs import EngineStats, SeqOutput
from prefloop.server.engine.sampler import request_generator, sample
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.engine.scheduler import Scheduler, SchedulerConfig
from prefloop.server.engine.sequence import Sequence
from prefloop.server.errors import InvalidArgument, ResourceExhausted
from prefloop.server.model.llama import LlamaModel

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: LlamaModel, cache: KVCacheConfig | None = None,
                 scheduler: SchedulerConfig | None = None, eos_token_ids: tuple[int, ...] = (),
                 max_model_len: int | None = None, context: ContextConfig | None = None,
                 grammar: GrammarCompiler | None = None):
        self.model = model
        cfg = model.config
        self.cache_config = cache or KVCacheConfig()
        param = next(model.parameters())
        self.dtype = param.dtype
        num_blocks = num_blocks_for(self.cache_config, cfg, self.dtype)
        self.blocks = BlockManager(num_blocks, self.cache_config.block_size,
                                   self.cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler or SchedulerConfig(), self.blocks)
        self.runner = ModelRunner(model, num_blocks, self.cache_config.block_size)
        if model.compiled:
            self.runner.warm_up()  # compile now, not on the first request
        self.eos_token_ids = frozenset(eos_token_ids or cfg.eos_token_ids)
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.context = context or ContextConfig()
        self.shift_discard = self.context.discard_tokens(self.max_model_len, self.cache_config.block_size)
        self.num_context_shifts = 0
        self.num_truncated_prompts = 0
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.steps = 0
        self.grammar = grammar  # GrammarCompiler for structured outputs (None: refused)
        # Optional observer called with (sequences, logits [len(sequences), vocab]) before sampling;
        # tests use it to compare logits against transformers.
        self.logits_hook = None
        self.adapters: dict[int, int] = {}  # per-request LoRA adapter id -> its bytes
        self._adapter_ids = itertools.count(1)

    # -- per-request adapters (server/model/lora.py) ---------------------------------------------
    def add_adapter(self, factors: dict) -> int:
        """Load LoRA factors ({HF weight name: (A, B * scale)}) beside the base weights; its id
        (never reused). Raises UnsupportedModel when this model cannot (a compiled step)."""
        from prefloop.server.model import lora
        adapter_id = next(self._adapter_ids)
        self.adapters[adapter_id] = lora.add_adapter(self.model, adapter_id, factors)
        return adapter_id

    def remove_adapter(self, adapter_id: int) -> None:
        """Drop an adapter no running request uses any more."""
        from prefloop.server.model import lora
        if self.adapters.pop(adapter_id, None) is not None:
            lora.remove_adapter(self.model, adapter_id)

    # -- requests ------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise a typed error for a request this engine can never serve; else return the prompt
        tokens to drop at admission (pass it on to `add_request` so the check runs once)."""
        dropped = check_prompt(prompt_ids, params.max_tokens, self.model.config.vocab_size,
                               self.max_model_len, self.context, self.shift_discard)
        if params.response_format is not None:  # compiles (cached) now, in the caller's thread
            if self.grammar is None:
                raise InvalidArgument("this model has no tokenizer.json: structured outputs "
                                      "(response_format) cannot be served")
            self.grammar.matcher(params.response_format)
        total = min(len(prompt_ids) - dropped + params.max_tokens, self.max_model_len)
        if self.blocks.blocks_needed(total) > self.blocks.num_blocks:
            raise ResourceExhausted(
                f"request needs {total} tokens of KV cache but the cache holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}; raise --kv-cache-gib")
        return dropped

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    num_dropped: int | None = None, adapter: int = 0) -> None:
        """Queue a request. `num_dropped` is `validate`'s answer when the caller already ran it
        (AsyncEngine does, in the caller's thread); None validates here. `adapter`: the id of a
        per-request LoRA adapter (`add_adapter`), 0 for the base model."""
        if request_id in self.requests:
            raise InvalidArgument(f"request id {request_id!r} is already running")
        if adapter and adapter not in self.adapters:
            raise InvalidArgument(f"adapter {adapter} is not loaded in this engine")
        if num_dropped is None:
            num_dropped = self.validate(prompt_ids, params)
        seq = self._new_seq(request_id, 0, list(prompt_ids), len(prompt_ids), params)
        seq.adapter = adapter
        if self.context.overflow != "error":
            seq.n_keep = self.context.keep
            seq.num_dropped = num_dropped
            self.num_truncated_prompts += seq.num_dropped > 0
        seq.children_pending = params.n - 1
        self.requests[request_id] = _Request(request_id, [seq])
        self.scheduler.add(seq)

    def _new_seq(self, request_id: str, index: int, token_ids: list[int], prompt_len: int,
                 params: SamplingParams) -> Sequence:
        generator = None if params.greedy else request_generator(params.seed, index)
        seq = Sequence(next(self._seq_ids), request_id, index, token_ids, prompt_len, params,
                       next(self._arrivals), generator)
        if params.response_format is not None:
            seq.matcher = self.grammar.matcher(params.response_format)
        return seq

    def abort(self, request_id: str, index: int | None = None) -> list[SeqOutput]:
        """Stop a request (or one candidate) now; its blocks are freed at once."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        outs = []
        for seq in req.seqs:
            if (index is None or seq.index == index) and not seq.finished:
                self.scheduler.finish(seq, "abort")
                outs.append(SeqOutput(request_id, seq.index, [], "abort", seq.num_output))
        if index is None or index == 0:
            req.seqs[0].children_pending = 0  # candidates not yet forked will never start
        self._maybe_retire(req)
        return outs

    def _maybe_retire(self, req: _Request) -> None:
        if all(s.finished for s in req.seqs) and req.seqs[0].children_pending == 0:
            self.requests.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- stepping ------------------------------------------------------------------------------
    def step(self) -> list[SeqOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.runner.copy_blocks(self.blocks.take_pending_copies())
        ordered, logits = self.runner.execute(batch)
        self.steps += 1
        rows, row_logits = [], []
        for i, item in enumerate(ordered):
            seq = item.seq
            seq.num_computed += item.num_tokens
            if not seq.cache_shifted:  # shifted K/V differ from a fresh prefill of the same tokens
                self.blocks.register_full_blocks(seq.block_table, seq.block_hashes, seq.context_ids,
                                                 seq.num_computed, seq.prefix_root)
            if seq.num_computed == seq.context_len:  # the whole context is cached: sample
                rows.append(seq)
                row_logits.append(i)
                for child in self._fork(seq):
                    rows.append(child)
                    row_logits.append(i)
        if not rows:
            return []
        # a pure decode batch samples every row once, in order: no copy of the logits then
        sampled = logits if row_logits == list(range(len(logits))) else logits[row_logits]
        if self.logits_hook is not None:
            self.logits_hook(rows, sampled)
        sampled = apply_masks(sampled, rows)
        tokens = sample(sampled, rows)
        outs = [out for seq, tok in zip(rows, tokens) if (out := self._append(seq, tok))]
        if self.context.overflow == "shift":
            for seq in rows:
                if not seq.finished and seq.context_len > self.max_model_len:
                    self._shift(seq)
        return outs

    def _shift(self, seq: Sequence) -> None:
        """The context outgrew the window: keep the first n_keep tokens, drop the `shift_discard`
        oldest after them, and re-rotate the remaining cached keys by -shift_discard (or, with
        shift_method "recompute" or too few free blocks for copy-on-write, recompute them)."""
        self.num_context_shifts += 1
        seq.num_shifts += 1
        if self.context.shift_method == "rotate":
            self.runner.copy_blocks(self.blocks.take_pending_copies())  # forks read pre-shift blocks
            plan = self.blocks.shift(seq.block_table, seq.num_computed, seq.n_keep, self.shift_discard)
            if plan is not None:
                self.runner.apply_shift(plan)
                seq.num_dropped += self.shift_discard
                seq.num_computed -= self.shift_discard
                del seq.block_hashes[seq.n_keep // self.blocks.block_size:]
                seq.cache_shifted = True
                return
        seq.num_dropped += self.shift_discard
        self.scheduler.requeue_for_recompute(seq)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The request's other candidates, sharing the parent's computed prompt blocks."""
        if parent.children_pending == 0:
            return []
        req = self.requests[parent.request_id]
        children = []
        for index in range(1, parent.children_pending + 1):
            child = self._new_seq(parent.request_id, index, list(parent.token_ids), parent.prompt_len,
                                  parent.params)
            child.block_table = self.blocks.fork(parent.block_table, parent.num_computed)
            child.block_hashes = list(parent.block_hashes)
            child.num_computed = parent.num_computed
            child.n_keep, child.num_dropped = parent.n_keep, parent.num_dropped
            child.cache_shifted = parent.cache_shifted
            child.adapter = parent.adapter
            self.scheduler.add_running(child)
            req.seqs.append(child)
            children.append(child)
        parent.children_pending = 0
        return children

    def _append(self, seq: Sequence, token: int) -> SeqOutput | None:
        if seq.finished:
            return None
        seq.token_ids.append(token)
        p = seq.params
        reason = None
        if seq.matcher is not None and (not seq.matcher.consume_token(token)
                                        or seq.matcher.is_stopped()):
            if seq.matcher.is_error():  # cannot happen under the mask; never loop on it
                log.error("request %s left its grammar: %s", seq.request_id,
                          seq.matcher.get_error())
            reason = "stop"  # the grammar is complete (or broken): nothing more may follow
        elif (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif seq.num_output >= p.max_tokens or (
                seq.context_len >= self.max_model_len and self.context.overflow != "shift"):
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
            self._maybe_retire(self.requests[seq.request_id])
        return SeqOutput(seq.request_id, seq.index, [token], reason, seq.num_output)

    def release_kv_cache(self) -> None:
        """Free the KV cache of a stopped engine (AsyncEngine.stop); it cannot step again."""
        self.runner.release_kv_cache()

    def release_weights(self) -> None:
        """Drop every tensor of the model (parameters, buffers, tables) of a stopped engine that
        owns its model (a retired version loaded for it): its memory comes back even while
        something still holds the engine or the model object. The model is unusable after."""
        if hasattr(self.model, "_decode_layer_args"):
            self.model._decode_layer_args = []  # the one-call layers' references to the weights (llama.py)
        for module in self.model.modules():
            for name in list(module._parameters):
                module._parameters[name] = None
            for name in list(module._buffers):
                module._buffers[name] = None
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor):
                    setattr(module, name, None)

    def stats(self) -> EngineStats:
        s = self.blocks.stats
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            total_blocks=self.blocks.num_blocks, free_blocks=self.blocks.num_free,
            block_size=self.blocks.block_size,
            kv_bytes_per_token=self.model.config.kv_bytes_per_token(self.dtype.itemsize),
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions, steps=self.steps,
            context_shifts=self.num_context_shifts, truncated_prompts=self.num_truncated_prompts)

    def generate(self, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict[int, list[int]]]:
        """Offline helper: run requests to completion; returns {request_id: {index: output ids}}."""
        results: dict[str, dict[int, list[int]]] = {rid: {} for rid in requests}
        for rid, (ids, params) in requests.items():
            self.add_request(rid, ids, params)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].setdefault(out.index, []).extend(out.new_token_ids)
        return results
