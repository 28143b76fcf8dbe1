"""Generator: the text-level front of a backend — tokenize, stream token deltas as text, stop strings.

Both `prefloop generate` and the gRPC servicers use it. It owns the tokenizer and chat template,
incremental detokenization and stop strings; the engine below it sees token ids only.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator

import torch

from .async_engine import AsyncEngine
from .engine import LLMEngine
from .errors import InvalidArgument
from .kv_cache import KVCacheConfig
from .model_loader import load_model, read_generation_eos, resolve_model_dir
from .sampling_params import SamplingParams
from .scheduler import SchedulerConfig
from .tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelInfo:
    model_version: str
    architecture: str
    context_length: int
    dtype: str
    backend: str
    model_path: str


@dataclass(slots=True)
class CompletionDelta:
    index: int  # which of the request's n candidates
    text_delta: str
    token_ids: list[int]  # token ids produced in this delta
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" on the last one
    completion_tokens: int  # tokens generated so far for this candidate


class Generator:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, info: ModelInfo):
        self.engine = engine
        self.tokenizer = tokenizer
        self.info = info

    async def start(self) -> None:
        self.engine.start()

    async def close(self) -> None:
        self.engine.stop()

    def prompt_ids(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidArgument("prompt is empty")
        return self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    async def stream(self, request_id: str, prompt_ids: list[int],
                     params: SamplingParams) -> AsyncIterator[CompletionDelta]:
        decoders = [IncrementalDecoder(self.tokenizer, params.stop) for _ in range(params.n)]
        done = [False] * params.n
        async for out in self.engine.generate(request_id, prompt_ids, params):
            if done[out.index]:
                continue
            dec = decoders[out.index]
            reason = out.finish_reason
            text = dec.push(out.new_token_ids, final=reason is not None)
            if dec.stopped and reason is None:
                reason = "stop"
                self.engine.abort(request_id, out.index)
            if reason is not None:
                done[out.index] = True
            yield CompletionDelta(out.index, text, out.new_token_ids, reason, out.num_output_tokens)
            if all(done):
                return

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> dict:
        return asdict(self.engine.stats())


def build_generator(model: str | None = None, dtype: str = "float32", device: str = "cpu",
                    cache_dir: str | None = None, kv_cache_tokens: int | None = None,
                    kv_cache_gib: float = 1.0, block_size: int = 16, max_num_seqs: int = 64,
                    max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                    model_version: str | None = None) -> Generator:
    """Load a model (None = the embedded default) and wrap it in an engine and a Generator."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was asked for but no CUDA device is available")
    model_dir = resolve_model_dir(model, cache_dir)
    tokenizer = Tokenizer(model_dir)
    llama = load_model(model_dir, dtype=dtype, device=device)
    eos = set(llama.config.eos_token_ids) | set(read_generation_eos(model_dir))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = LLMEngine(
        llama,
        KVCacheConfig(block_size=block_size, capacity_tokens=kv_cache_tokens, capacity_gib=kv_cache_gib,
                      enable_prefix_caching=enable_prefix_caching),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        eos_token_ids=tuple(sorted(eos)))
    info = ModelInfo(
        model_version=model_version or Path(model_dir).name,
        architecture=llama.config.architecture,
        context_length=engine.max_model_len,
        dtype=dtype, backend="native", model_path=str(model_dir))
    log.info("loaded %s (%s, %s) with %d KV blocks of %d tokens", info.model_version,
             info.architecture, dtype, engine.blocks.num_blocks, block_size)
    return Generator(AsyncEngine(engine), tokenizer, info)
