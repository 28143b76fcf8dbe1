"""The Generation servicer: proto requests in, engine calls, proto responses/chunks out.

Thin by design: it converts messages to domain objects (`SamplingParams`, message dicts, token
ids via the generator's tokenizer), checks the server `Limits`, holds an `Admission` slot while the
engine generates, and converts `CompletionDelta`s back to proto. Typed errors become statuses in
`status_mapping`. When a client cancels, disconnects or passes its deadline, the handler task is
cancelled and the request is aborted in the engine (its KV blocks are freed).

Each completion gets a unique response id (`resp-<uuid4 hex>`), each request a request id
(`req-<uuid4 hex>`). Every request writes one JSON access-log line (logger
`prefloop.server.access`), and every finished completion is handed to the optional `recorder`
(the generation log, issue 4) as a row dict — see `Recorder`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Protocol

import grpc

from prefloop.proto.prefloop.v1 import generation_pb2, generation_pb2_grpc
from prefloop.server.api.limits import Admission, Limits
from prefloop.server.api.status_mapping import current_request_id, map_errors, status_of
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)
access_log = logging.getLogger("prefloop.server.access")

_SAMPLING_SCALARS = ("temperature", "top_p", "top_k", "seed", "n", "repetition_penalty")


class Recorder(Protocol):
    """Receives one row per finished completion; must return quickly and never block the loop.

    Row keys: response_id, request_id, created_at (datetime, UTC), session_id, user_id,
    model_version, backend, prompt (str, or None for chat), messages (list of {role, content},
    or None for raw prompts), completion, finish_reason ("stop" | "length" | "abort"),
    prompt_tokens, completion_tokens, sampling (dict of the SamplingParams used), latency_ms
    (request start to this completion's end), ttft_ms (request start to its first text, or None).
    """

    def record_generation(self, row: dict) -> None: ...


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def new_response_id() -> str:
    return f"resp-{uuid.uuid4().hex}"


def messages_from_proto(messages) -> list[dict]:
    """Proto ChatMessages -> [{"role", "content"}] (roles are checked by the tokenizer)."""
    return [{"role": m.role, "content": m.content} for m in messages]


def sampling_from_proto(sampling: generation_pb2.SamplingParams, max_tokens: int) -> SamplingParams:
    """Proto SamplingParams (unset fields -> defaults) -> validated domain SamplingParams."""
    kwargs: dict[str, Any] = {name: getattr(sampling, name)
                              for name in _SAMPLING_SCALARS if sampling.HasField(name)}
    return SamplingParams(max_tokens=max_tokens, stop=tuple(sampling.stop), **kwargs)


def sampling_as_dict(params: SamplingParams) -> dict:
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_tokens, "stop": list(params.stop), "seed": params.seed,
            "n": params.n, "repetition_penalty": params.repetition_penalty}


@dataclass(slots=True)
class _CompletionState:
    response_id: str
    index: int
    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_text_at: float | None = None
    finished_at: float | None = None


@dataclass(slots=True)
class _Call:
    """Everything known about one request while it runs; logged once at the end."""

    method: str
    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    status: str = "OK"
    prompt_tokens: int = 0
    model_version: str = ""
    backend: str = ""
    completions: list[_CompletionState] = field(default_factory=list)

    def ms_since_start(self, at: float | None) -> float | None:
        return None if at is None else round((at - self.started) * 1000.0, 2)

    def log_line(self) -> str:
        ttfts = [c.first_text_at for c in self.completions if c.first_text_at is not None]
        return json.dumps({
            "event": "request", "request_id": self.request_id, "method": self.method,
            "status": self.status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": sum(c.completion_tokens for c in self.completions),
            "n": len(self.completions),
            "latency_ms": self.ms_since_start(time.perf_counter()),
            "ttft_ms": self.ms_since_start(min(ttfts)) if ttfts else None,
            "model_version": self.model_version,
        })


class GenerationService(generation_pb2_grpc.GenerationServicer):
    """Implements prefloop.v1.Generation on a `Generator` (server/serving/generator.py)."""

    def __init__(self, generator, limits: Limits, admission: Admission,
                 recorder: Recorder | None = None) -> None:
        self.generator = generator
        self.limits = limits
        self.admission = admission
        self.recorder = recorder
        self.accepting = True  # set False at shutdown: new requests get UNAVAILABLE

    # ---- RPCs --------------------------------------------------------------------------------

    @map_errors
    async def Generate(self, request, context):
        async with self._call("Generate", context) as call:
            prompt_ids = self._prompt_ids(request.prompt)
            params = self._params(call, request.sampling, prompt_ids)
            async for _ in self._generate(call, prompt_ids, params, request, prompt=request.prompt):
                pass
            return self._response(call)

    @map_errors
    async def GenerateStream(self, request, context):
        async with self._call("GenerateStream", context) as call:
            prompt_ids = self._prompt_ids(request.prompt)
            params = self._params(call, request.sampling, prompt_ids)
            async for state, delta in self._generate(call, prompt_ids, params, request,
                                                     prompt=request.prompt):
                yield self._chunk(call, state, delta)

    @map_errors
    async def Chat(self, request, context):
        async with self._call("Chat", context) as call:
            messages = messages_from_proto(request.messages)
            prompt_ids = self.generator.chat_ids(messages)
            params = self._params(call, request.sampling, prompt_ids)
            async for _ in self._generate(call, prompt_ids, params, request, messages=messages):
                pass
            return self._response(call)

    @map_errors
    async def ChatStream(self, request, context):
        async with self._call("ChatStream", context) as call:
            messages = messages_from_proto(request.messages)
            prompt_ids = self.generator.chat_ids(messages)
            params = self._params(call, request.sampling, prompt_ids)
            async for state, delta in self._generate(call, prompt_ids, params, request,
                                                     messages=messages):
                yield self._chunk(call, state, delta)

    # ---- helpers -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context) -> AsyncIterator[_Call]:
        """One request's bookkeeping: request id, shutdown check, the access-log line."""
        call = _Call(method=method)
        current_request_id.set(call.request_id)
        try:
            if not self.accepting:
                raise Unavailable("the server is shutting down; retry on another replica or later")
            info = self.generator.info
            call.model_version, call.backend = info.model_version, info.backend
            yield call
        except asyncio.CancelledError:
            remaining = context.time_remaining() if context is not None else None
            call.status = ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0
                           else "CANCELLED")
            raise
        except GeneratorExit:
            call.status = "CANCELLED"
            raise
        except Exception as exc:
            call.status = status_of(exc).name
            raise
        finally:
            access_log.info(call.log_line())

    def _prompt_ids(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidArgument("prompt must be a non-empty string")
        return self.generator.prompt_ids(prompt)

    def _params(self, call: _Call, sampling, prompt_ids: list[int]) -> SamplingParams:
        call.prompt_tokens = len(prompt_ids)
        max_tokens = self.limits.check_request(
            prompt_tokens=len(prompt_ids),
            max_tokens=sampling.max_tokens if sampling.HasField("max_tokens") else None,
            n=sampling.n if sampling.HasField("n") else None,
            context_length=self.generator.info.context_length)
        return sampling_from_proto(sampling, max_tokens)

    async def _generate(self, call: _Call, prompt_ids: list[int], params: SamplingParams,
                        request, *, prompt: str | None = None,
                        messages: list[dict] | None = None,
                        ) -> AsyncIterator[tuple[_CompletionState, Any]]:
        """Run the request in the engine; yields (completion state, delta) for each delta with
        new text or an end. Completion states accumulate the text for unary responses."""
        call.completions = [_CompletionState(new_response_id(), i) for i in range(params.n)]
        async with self.admission.slot():
            stream = self.generator.stream(call.request_id, prompt_ids, params)
            done = False
            try:
                async for delta in stream:
                    if delta.model_version:  # the weights that really serve it (hot-swap safe)
                        call.model_version = delta.model_version
                    state = call.completions[delta.index]
                    now = time.perf_counter()
                    if delta.text_delta:
                        state.parts.append(delta.text_delta)
                        if state.first_text_at is None:
                            state.first_text_at = now
                    state.completion_tokens = delta.completion_tokens
                    if delta.finish_reason is not None:
                        state.finish_reason, state.finished_at = delta.finish_reason, now
                        self._record(call, state, params, request, prompt, messages)
                    elif not delta.text_delta:
                        continue  # nothing to tell the client yet (e.g. a partial UTF-8 char)
                    yield state, delta
                done = True
            finally:
                if not done:
                    await self._abort(call, stream, params, request, prompt, messages)

    async def _abort(self, call: _Call, stream, params, request, prompt, messages) -> None:
        """Stop an unfinished request in the engine and record its partial completions
        (finish_reason "abort")."""
        try:
            await stream.aclose()  # the generator aborts the request in the engine
            await self.generator.abort(call.request_id)  # and make sure of it
        except Exception:  # noqa: BLE001 - cleanup must not hide the original failure
            log.warning("abort of request %s failed", call.request_id, exc_info=True)
        for state in call.completions:
            if state.finish_reason is None:
                state.finish_reason, state.finished_at = "abort", time.perf_counter()
                if state.completion_tokens:  # nothing generated: nothing to record
                    self._record(call, state, params, request, prompt, messages)

    def _record(self, call: _Call, state: _CompletionState, params: SamplingParams, request,
                prompt: str | None, messages: list[dict] | None) -> None:
        if self.recorder is None:
            return
        row = {
            "response_id": state.response_id, "request_id": call.request_id,
            "created_at": call.created_at, "session_id": request.session_id,
            "user_id": request.user_id, "model_version": call.model_version,
            "backend": call.backend, "prompt": prompt, "messages": messages,
            "completion": "".join(state.parts), "finish_reason": state.finish_reason,
            "prompt_tokens": call.prompt_tokens, "completion_tokens": state.completion_tokens,
            "sampling": sampling_as_dict(params),
            "latency_ms": call.ms_since_start(state.finished_at),
            "ttft_ms": call.ms_since_start(state.first_text_at),
        }
        try:
            self.recorder.record_generation(row)
        except Exception:  # noqa: BLE001 - a logging failure must not fail the user's request
            log.exception("recorder failed for response %s", state.response_id)

    @staticmethod
    def _chunk(call: _Call, state: _CompletionState, delta) -> generation_pb2.GenerateChunk:
        return generation_pb2.GenerateChunk(
            index=delta.index, response_id=state.response_id, text_delta=delta.text_delta,
            finish_reason=delta.finish_reason or "", model_version=call.model_version,
            completion_tokens=delta.completion_tokens, prompt_tokens=call.prompt_tokens,
            request_id=call.request_id)

    @staticmethod
    def _response(call: _Call) -> generation_pb2.GenerateResponse:
        return generation_pb2.GenerateResponse(
            completions=[generation_pb2.Completion(
                response_id=c.response_id, text="".join(c.parts),
                finish_reason=c.finish_reason or "", completion_tokens=c.completion_tokens,
                index=c.index) for c in call.completions],
            prompt_tokens=call.prompt_tokens, model_version=call.model_version,
            request_id=call.request_id)
