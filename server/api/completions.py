"""Serving one completion request, whichever API it came through (gRPC or HTTP).

`CompletionRunner` owns what both APIs share: request ids, the shutdown check, the server
`Limits` and sampling defaults, the `Admission` slot held while the engine generates, the
access-log line (logger `prefloop.server.access`), the metrics, and the `GenerationRecord` of
every finished completion handed to the recorder (the generation log). The gRPC servicer and the
HTTP routes only convert their wire format to `RequestMeta` + sampling fields and back.

While an A/B test runs, `route` picks the Generator of the version that serves the request
(`ABRouter`: sticky by user or session), and a compare request runs once on each version, in
random order, blind to the user; every completion names the version that produced it.

When the consumer stops iterating (client gone, cancelled, deadline), the request is aborted in
the engine (its KV blocks return) and its partial completions are recorded as "abort".
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Protocol

from prefloop.server.api.limits import Admission, Limits
from prefloop.server.api.metrics import Metrics
from prefloop.server.api.status_mapping import current_request_id, status_of
from prefloop.server.engine.response_format import ResponseFormat
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import InvalidArgument, Unavailable
from prefloop.server.feedback.schema import GenerationRecord
from prefloop.server.serving.generator import CompletionDelta, Generator

log = logging.getLogger(__name__)
access_log = logging.getLogger("prefloop.server.access")

MAX_ID_CHARS = 256  # session_id / user_id, as on the feedback path
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "n", "repetition_penalty",
                   "frequency_penalty", "presence_penalty")


class Recorder(Protocol):
    """Receives one `GenerationRecord` per finished completion; returns quickly, never blocks."""

    def record_generation(self, row: GenerationRecord) -> bool: ...


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def new_response_id() -> str:
    return f"resp-{uuid.uuid4().hex}"


@dataclass(slots=True)
class SamplingDefaults:
    """What a request that leaves a sampling field unset gets (same on every API).

    Order of precedence: `serve --default-*` flags, then the model's generation_config.json,
    then these fallbacks (coherent answers from the default model; docs/http.md).
    """

    temperature: float = 0.3
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"default temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"default top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"default top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"default repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty}")

    @classmethod
    def resolve(cls, model_defaults: dict | None, *, temperature: float | None = None,
                top_p: float | None = None, repetition_penalty: float | None = None,
                ) -> "SamplingDefaults":
        """Flags over the model's generation_config.json over the fallbacks."""
        base = cls()
        model_defaults = model_defaults or {}

        def pick(name: str, flag: float | None) -> float:
            return float(flag if flag is not None else model_defaults.get(name, getattr(base, name)))
        return cls(temperature=pick("temperature", temperature), top_p=pick("top_p", top_p),
                   top_k=int(model_defaults.get("top_k", base.top_k) or 0),
                   repetition_penalty=pick("repetition_penalty", repetition_penalty))

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty}


@dataclass(slots=True)
class RequestMeta:
    """Who asked, through which API: recorded with every completion."""

    api: str  # "grpc" | "http"
    method: str  # "Chat", "ChatStream", "POST /v1/chat/completions", ...
    session_id: str = ""
    user_id: str = ""

    def __post_init__(self) -> None:
        for name in ("session_id", "user_id"):
            value = getattr(self, name)
            if len(value) > MAX_ID_CHARS:
                raise InvalidArgument(f"{name} has {len(value)} characters; at most {MAX_ID_CHARS}")


@dataclass(slots=True)
class CompletionState:
    response_id: str
    index: int
    model_version: str = ""
    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | None = None  # the stop string that ended it
    first_text_at: float | None = None
    last_text_at: float | None = None
    finished_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(slots=True)
class Call:
    """Everything known about one request while it runs; logged once at the end."""

    meta: RequestMeta
    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    status: str = "OK"
    prompt_tokens: int = 0
    model_version: str = ""
    backend: str = ""
    completions: list[CompletionState] = field(default_factory=list)
    generators: list = field(default_factory=list)  # what serves it: one, or two for compare
    constraint: str | None = None  # the log's response_format when the API sets it (tools)

    def ms_since_start(self, at: float | None) -> float | None:
        return None if at is None else round((at - self.started) * 1000.0, 2)

    def log_line(self) -> str:
        ttfts = [c.first_text_at for c in self.completions if c.first_text_at is not None]
        return json.dumps({
            "event": "request", "request_id": self.request_id, "api": self.meta.api,
            "method": self.meta.method, "status": self.status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": sum(c.completion_tokens for c in self.completions),
            "n": len(self.completions),
            "latency_ms": self.ms_since_start(time.perf_counter()),
            "ttft_ms": self.ms_since_start(min(ttfts)) if ttfts else None,
            "model_version": self.model_version,
        })


def sampling_as_dict(params: SamplingParams) -> dict:
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_tokens, "stop": list(params.stop), "seed": params.seed,
            "n": params.n, "repetition_penalty": params.repetition_penalty,
            "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty}


class CompletionRunner:
    """Runs completion requests on a `Generator` for any API (see the module docstring)."""

    def __init__(self, generator: Generator, limits: Limits, admission: Admission,
                 recorder: Recorder | None = None, defaults: SamplingDefaults | None = None,
                 metrics: Metrics | None = None, router=None) -> None:
        self.generator = generator
        self.router = router  # ABRouter while the server can run A/B tests
        self.limits = limits
        self.admission = admission
        self.recorder = recorder
        self.defaults = defaults or SamplingDefaults()
        self.metrics = metrics
        self.accepting = True  # False once shutdown starts: new requests get UNAVAILABLE

    @contextlib.asynccontextmanager
    async def call(self, meta: RequestMeta,
                   deadline_passed: Callable[[], bool] = lambda: False) -> AsyncIterator[Call]:
        """One request's bookkeeping: request id, shutdown check, status, the access-log line."""
        call = Call(meta=meta)
        current_request_id.set(call.request_id)
        try:
            if not self.accepting:
                raise Unavailable("the server is shutting down; retry on another replica or later")
            info = self.generator.info
            call.model_version, call.backend = info.model_version, info.backend
            yield call
        except asyncio.CancelledError:
            call.status = "DEADLINE_EXCEEDED" if deadline_passed() else "CANCELLED"
            raise
        except GeneratorExit:
            call.status = "CANCELLED"
            raise
        except Exception as exc:
            call.status = status_of(exc).name
            raise
        finally:
            access_log.info(call.log_line())
            if self.metrics is not None:
                self.metrics.observe_call(call)

    def route(self, call: Call, *, compare: bool = False) -> None:
        """Choose the Generator(s) serving this request (once its user / session are known)."""
        pair = self.router.pair() if compare and self.router is not None else None
        if pair is not None:
            call.generators = pair
        elif self.router is not None:
            call.generators = [self.router.pick(call.meta.user_id, call.meta.session_id)]
        else:
            call.generators = [self.generator]
        call.model_version = call.generators[0].info.model_version

    def _front(self, call: Call) -> Generator:
        if not call.generators:
            self.route(call)
        return call.generators[0]

    def prompt_ids(self, call: Call, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgument("prompt must be a non-empty string")
        return self._front(call).prompt_ids(prompt)

    def chat_ids(self, call: Call, messages: list[dict]) -> list[int]:
        return self._front(call).chat_ids(messages)

    def params(self, call: Call, prompt_ids: list[int], *, max_tokens: int | None,
               stop: tuple[str, ...] = (), response_format: ResponseFormat | None = None,
               **sampling: Any) -> SamplingParams:
        """The validated SamplingParams: server limits, then the defaults for unset fields.

        `sampling` holds the fields the request set (None = unset) among SAMPLING_FIELDS.
        """
        call.prompt_tokens = len(prompt_ids)
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        assert not unknown, f"not sampling fields: {unknown}"
        max_tokens = self.limits.check_request(
            prompt_tokens=len(prompt_ids), max_tokens=max_tokens, n=sampling.get("n"),
            context_length=self._front(call).info.context_length)
        kwargs = {k: v for k, v in sampling.items() if v is not None}
        for name, value in self.defaults.as_dict().items():
            kwargs.setdefault(name, value)
        return SamplingParams(max_tokens=max_tokens, stop=tuple(stop),
                              response_format=response_format, **kwargs)

    async def run(self, call: Call, prompt_ids: list[int], params: SamplingParams, *,
                  prompt: str | None = None, messages: list[dict] | None = None,
                  ) -> AsyncIterator[tuple[CompletionState, CompletionDelta]]:
        """Run the request in the engine; yields (completion state, delta) for each delta with
        new text or an end. Completion states accumulate the text for unary responses."""
        generators = call.generators or [self._front(call)]
        compare = len(generators) > 1
        if compare and params.n != 1:
            raise InvalidArgument("a compare request gets one answer per version; leave n unset")
        call.completions = [CompletionState(new_response_id(), i, g.info.model_version)
                            for i, g in enumerate(generators if compare else generators * params.n)]
        async with self.admission.slot():
            source = (self._merged(call, generators, prompt_ids, params) if compare
                      else self._single(call, generators[0], prompt_ids, params))
            done = False
            try:
                async for slot, delta in source:
                    state = call.completions[slot]
                    if delta.model_version:  # the weights that really serve it (hot-swap safe)
                        state.model_version = delta.model_version
                        if not compare:
                            call.model_version = delta.model_version
                    now = time.perf_counter()
                    if delta.text_delta:
                        state.parts.append(delta.text_delta)
                        if state.first_text_at is None:
                            state.first_text_at = now
                        elif self.metrics is not None:
                            self.metrics.observe_token_gap(now - state.last_text_at)
                        state.last_text_at = now
                    state.completion_tokens = delta.completion_tokens
                    if delta.finish_reason is not None:
                        state.finish_reason, state.finished_at = delta.finish_reason, now
                        state.stop_reason = delta.stop_reason
                        self._record(call, state, params, prompt, messages)
                    elif not delta.text_delta:
                        continue  # nothing to tell the client yet (e.g. a partial UTF-8 char)
                    yield state, delta
                done = True
            finally:
                if not done:
                    await self._abort(call, source, generators, params, prompt, messages)

    async def _single(self, call: Call, generator: Generator, prompt_ids, params):
        async for delta in generator.stream(call.request_id, prompt_ids, params):
            yield delta.index, delta

    async def _merged(self, call: Call, generators: list[Generator], prompt_ids, params):
        """One answer from each generator (a compare request), interleaved as they decode."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(slot: int, generator: Generator) -> None:
            try:
                async for delta in generator.stream(f"{call.request_id}-{slot}", prompt_ids, params):
                    await queue.put((slot, delta))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((slot, exc))
            finally:
                await queue.put((slot, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generators)]
        try:
            ended = 0
            while ended < len(tasks):
                slot, item = await queue.get()
                if item is None:
                    ended += 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield slot, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _abort(self, call: Call, source, generators, params, prompt, messages) -> None:
        """Stop an unfinished request in the engine and record its partial completions."""
        try:
            await source.aclose()  # the generators abort the request in the engine
            if len(generators) == 1:
                await generators[0].abort(call.request_id)  # and make sure of it
            else:
                for i, generator in enumerate(generators):
                    await generator.abort(f"{call.request_id}-{i}")
        except Exception:  # noqa: BLE001 - cleanup must not hide the original failure
            log.warning("abort of request %s failed", call.request_id, exc_info=True)
        for state in call.completions:
            if state.finish_reason is None:
                state.finish_reason, state.finished_at = "abort", time.perf_counter()
                if state.completion_tokens:  # nothing generated: nothing to record
                    self._record(call, state, params, prompt, messages)

    def _record(self, call: Call, state: CompletionState, params: SamplingParams,
                prompt: str | None, messages: list[dict] | None) -> None:
        if self.metrics is not None:
            self.metrics.observe_completion(call, state)
        if self.recorder is None:
            return
        record = GenerationRecord(
            response_id=state.response_id, request_id=call.request_id, created_at=call.created_at,
            session_id=call.meta.session_id, user_id=call.meta.user_id,
            model_version=state.model_version or call.model_version, backend=call.backend,
            prompt=prompt,
            messages=messages, completion=state.text, finish_reason=state.finish_reason or "",
            stop_reason=state.stop_reason,
            response_format=call.constraint or (params.response_format.key
                                                if params.response_format else None),
            prompt_tokens=call.prompt_tokens, completion_tokens=state.completion_tokens,
            sampling=sampling_as_dict(params), latency_ms=call.ms_since_start(state.finished_at),
            ttft_ms=call.ms_since_start(state.first_text_at), source=call.meta.api)
        try:
            self.recorder.record_generation(record)
        except Exception:  # noqa: BLE001 - a logging failure must not fail the user's request
            log.exception("recorder failed for response %s", state.response_id)
