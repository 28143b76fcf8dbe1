"""EngineBackend: the one small protocol every generation engine implements.

The Generator (server/serving/generator.py), and through it the gRPC servicers, only ever call these
methods, so they do not know whether the native engine (`AsyncEngine` over `LLMEngine`) or vLLM
(`VllmEngine` over `vllm.AsyncLLM`) produces the tokens. Engines see token ids only; tokenizing,
chat templates, detokenizing and stop strings stay in the Generator.
"""
from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Protocol, runtime_checkable

from prefloop.server.engine.outputs import EngineStats, SeqOutput
from prefloop.server.engine.sampling_params import SamplingParams


@runtime_checkable
class EngineBackend(Protocol):
    # True: a new model version is loaded into this engine's own weights (`reload_weights`), so a
    # swap drains requests first (vLLM: one copy of the weights on the GPU). False: the Generator
    # loads the new version beside this one and moves new requests over (native).
    reloads_in_place: bool

    @property
    def healthy(self) -> bool:
        """False once the engine can no longer serve (its thread or worker processes died); the
        server then reports NOT_SERVING on grpc.health.v1 so a supervisor restarts it."""

    def start(self) -> None:
        """Begin serving (idempotent)."""

    def stop(self) -> None:
        """Stop serving; requests still running end with UNAVAILABLE. Blocking; call off-loop."""

    def generate(self, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, adapter: int = 0) -> AsyncIterator[SeqOutput]:
        """Stream the request's token deltas, one `SeqOutput` per candidate step; each candidate's
        last one has a finish_reason. Leaving the iterator early aborts the request. Raises a
        typed `PrefloopError` for a request the engine can never serve. `adapter`: a per-request
        LoRA adapter loaded with `add_adapter` (engines with `supports_adapters`; 0: none)."""

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (index None) or one of its candidates; unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (cheap; never blocks on the engine)."""

    async def reload_weights(self, model_dir: Path) -> None:
        """Load another version's weights into the running engine (only if reloads_in_place)."""
