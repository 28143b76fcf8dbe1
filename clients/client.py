"""Python clients for a prefloop server: `Client` (blocking) and `AsyncClient` (asyncio).

    from prefloop.clients import Client
    with Client("127.0.0.1:50051") as client:
        reply = client.chat([{"role": "user", "content": "Hi!"}], max_tokens=64, temperature=0)
        print(reply.text, reply.response_id)
        for chunk in client.chat_stream([{"role": "user", "content": "Tell me a story"}]):
            print(chunk.text_delta, end="", flush=True)

Both clients take TLS (`root_certificates`: PEM bytes or a file path, or `tls=True` for the system
roots) and a bearer `token`; every call takes a `timeout` (seconds, the call's deadline; the
client default applies when omitted). Failures raise the typed exceptions of
`prefloop.clients.errors`. Breaking out of a stream cancels the call, which aborts the request on
the server. Imports go to the generated proto modules only, never to the server.

`AsyncClient` has the same methods as `Client`, with the same arguments, awaited (its streams are
async iterators). Each RPC is declared once, in `_Rpcs` (the stub method, the request built from
the Python arguments, the response converter); the public methods of both clients only send what
it returns, through their own `_unary` / `_stream`.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, AsyncIterator, Callable, Generic, Iterable, Iterator, Mapping, Sequence,
                    TypeVar)

import grpc

from prefloop.clients.errors import error_from_rpc
from prefloop.proto.prefloop.v1 import (
    feedback_pb2,
    feedback_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "PREFLOOP_TOKEN"

Message = Mapping[str, str] | tuple[str, str]


@dataclass(frozen=True, slots=True)
class Completion:
    response_id: str  # send this with feedback
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    completion_tokens: int
    index: int
    model_version: str = ""  # the version that wrote it (a compare request's two differ)


@dataclass(frozen=True, slots=True)
class GenerateResult:
    completions: tuple[Completion, ...]
    prompt_tokens: int
    model_version: str
    request_id: str

    @property
    def text(self) -> str:
        """The first completion's text (the only one unless n > 1)."""
        return self.completions[0].text

    @property
    def response_id(self) -> str:
        return self.completions[0].response_id

    @property
    def finish_reason(self) -> str:
        return self.completions[0].finish_reason

    @classmethod
    def from_proto(cls, msg: generation_pb2.GenerateResponse) -> "GenerateResult":
        return cls(tuple(Completion(c.response_id, c.text, c.finish_reason, c.completion_tokens,
                                    c.index, c.model_version or msg.model_version)
                         for c in msg.completions),
                   msg.prompt_tokens, msg.model_version, msg.request_id)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of a completion; `finish_reason` is set (not None) on its last chunk."""

    index: int
    response_id: str
    text_delta: str
    finish_reason: str | None
    model_version: str
    completion_tokens: int  # generated so far for this completion
    prompt_tokens: int
    request_id: str

    @classmethod
    def from_proto(cls, msg: generation_pb2.GenerateChunk) -> "Chunk":
        return cls(msg.index, msg.response_id, msg.text_delta, msg.finish_reason or None,
                   msg.model_version, msg.completion_tokens, msg.prompt_tokens, msg.request_id)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_version: str
    architecture: str
    context_length: int
    dtype: str
    backend: str
    # what a request leaving a sampling field unset gets: temperature, top_p, top_k and
    # repetition_penalty ({} from a server older than the field; no repetition_penalty from one
    # older than that)
    sampling_defaults: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    prefix_cache_hit_tokens: int
    active_requests: int
    queued_requests: int
    extra: dict[str, float]


def _model_info(msg: models_pb2.ModelInfo) -> ModelInfo:
    d = msg.sampling_defaults
    defaults = ({"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k}
                if msg.HasField("sampling_defaults") else {})
    if defaults and d.HasField("repetition_penalty"):
        defaults["repetition_penalty"] = d.repetition_penalty
    return ModelInfo(msg.model_version, msg.architecture, msg.context_length, msg.dtype,
                     msg.backend, defaults)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: str
    parent: str
    created_at: str
    kind: str
    method: str
    current: bool
    metrics: dict
    gate: dict | None


@dataclass(frozen=True, slots=True)
class Versions:
    versions: list[VersionInfo]
    current_version: str  # the registry pointer
    serving_version: str  # what this server serves right now


def _versions(msg: models_pb2.ListVersionsResponse) -> Versions:
    return Versions([VersionInfo(v.version, v.parent, v.created_at, v.kind, v.method, v.current,
                                 json.loads(v.metrics_json or "{}"),
                                 json.loads(v.gate_json) if v.gate_json else None)
                     for v in msg.versions], msg.current_version, msg.serving_version)


def _switch(msg: models_pb2.SwitchResponse) -> tuple[str, str]:
    return msg.previous_version, msg.current_version


def _engine_stats(msg: models_pb2.EngineStats) -> EngineStats:
    return EngineStats(msg.running, msg.waiting, msg.free_blocks, msg.total_blocks,
                       msg.prefix_cache_hit_tokens, msg.active_requests, msg.queued_requests,
                       dict(msg.extra))


def sampling_proto(*, max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None,
                   stop: Sequence[str] | str | None = None, seed: int | None = None,
                   n: int | None = None, repetition_penalty: float | None = None,
                   frequency_penalty: float | None = None, presence_penalty: float | None = None,
                   response_format: Mapping[str, Any] | None = None,
                   ) -> generation_pb2.SamplingParams:
    """A proto SamplingParams; None leaves a field unset (the server's default applies).

    `response_format` is OpenAI's: {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}."""
    fields = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  seed=seed, n=n, repetition_penalty=repetition_penalty,
                  frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    msg = generation_pb2.SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    if stop:
        msg.stop.extend([stop] if isinstance(stop, str) else stop)
    if response_format is not None:
        spec = response_format.get("json_schema") or {}
        msg.response_format.type = response_format.get("type", "")
        if "schema" in spec:
            msg.response_format.json_schema = json.dumps(spec["schema"])
        msg.response_format.name = spec.get("name", "")
    return msg


def chat_messages(messages: Iterable[Message]) -> list[generation_pb2.ChatMessage]:
    """Accepts {"role", "content"} mappings or (role, content) pairs."""
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        out.append(generation_pb2.ChatMessage(role=role, content=content))
    return out


def _split_compare(sampling: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """`compare=True` rides with the sampling keywords of the public methods: during an A/B test
    the server answers once from each version (a blind pair), else once as usual."""
    rest = dict(sampling)
    return rest, bool(rest.pop("compare", False))


def _generate_request(prompt: str, session_id: str, user_id: str,
                      sampling: dict[str, Any]) -> generation_pb2.GenerateRequest:
    sampling, compare = _split_compare(sampling)
    return generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling_proto(**sampling),
                                          session_id=session_id, user_id=user_id, compare=compare)


def _chat_request(messages: Iterable[Message], session_id: str, user_id: str,
                  sampling: dict[str, Any]) -> generation_pb2.ChatRequest:
    sampling, compare = _split_compare(sampling)
    return generation_pb2.ChatRequest(messages=chat_messages(messages),
                                      sampling=sampling_proto(**sampling),
                                      session_id=session_id, user_id=user_id, compare=compare)


@dataclass(frozen=True, slots=True)
class FeedbackAck:
    feedback_id: str
    duplicate: bool  # the idempotency key was seen before: nothing new was recorded


_RATING_SCALES = {None: feedback_pb2.RATING_SCALE_UNSPECIFIED,
                  "thumbs": feedback_pb2.RATING_SCALE_THUMBS,
                  "stars": feedback_pb2.RATING_SCALE_STARS}


def _ab_status(msg: models_pb2.ABStatus) -> dict:
    return json.loads(msg.status_json) if msg.status_json else {"running": msg.running}


def _feedback_ack(msg: feedback_pb2.FeedbackAck) -> FeedbackAck:
    return FeedbackAck(msg.feedback_id, msg.duplicate)


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class _Call(Generic[R]):
    """One RPC ready to send: the stub's method, the request, and the converter of the response
    (of each streamed message, for a server-streaming RPC)."""

    rpc: Callable[..., Any]
    request: Any
    convert: Callable[[Any], R]


class _Rpcs:
    """Every RPC of the API, declared once for both clients: which stub method, the request built
    from the public method's arguments, and the response converter. The stubs work on a blocking
    or a grpc.aio channel alike; `Client` sends the returned `_Call` with `_unary` / `_stream`,
    `AsyncClient` awaits the same, so a public method is a one-line delegation in each."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self._generation = generation_pb2_grpc.GenerationStub(channel)
        self._models = models_pb2_grpc.ModelsStub(channel)
        self._feedback = feedback_pb2_grpc.FeedbackStub(channel)

    # ---- Generation --------------------------------------------------------------------------

    def generate(self, prompt: str, session_id: str, user_id: str,
                 sampling: dict[str, Any]) -> _Call[GenerateResult]:
        return _Call(self._generation.Generate,
                     _generate_request(prompt, session_id, user_id, sampling),
                     GenerateResult.from_proto)

    def chat(self, messages: Iterable[Message], session_id: str, user_id: str,
             sampling: dict[str, Any]) -> _Call[GenerateResult]:
        return _Call(self._generation.Chat, _chat_request(messages, session_id, user_id, sampling),
                     GenerateResult.from_proto)

    def generate_stream(self, prompt: str, session_id: str, user_id: str,
                        sampling: dict[str, Any]) -> _Call[Chunk]:
        return _Call(self._generation.GenerateStream,
                     _generate_request(prompt, session_id, user_id, sampling), Chunk.from_proto)

    def chat_stream(self, messages: Iterable[Message], session_id: str, user_id: str,
                    sampling: dict[str, Any]) -> _Call[Chunk]:
        return _Call(self._generation.ChatStream,
                     _chat_request(messages, session_id, user_id, sampling), Chunk.from_proto)

    # ---- Models ------------------------------------------------------------------------------

    def model_info(self) -> _Call[ModelInfo]:
        return _Call(self._models.GetModelInfo, models_pb2.GetModelInfoRequest(), _model_info)

    def engine_stats(self) -> _Call[EngineStats]:
        return _Call(self._models.GetEngineStats, models_pb2.GetEngineStatsRequest(),
                     _engine_stats)

    def list_versions(self) -> _Call[Versions]:
        return _Call(self._models.ListVersions, models_pb2.ListVersionsRequest(), _versions)

    def promote(self, version: str, reason: str, force: bool) -> _Call[tuple[str, str]]:
        return _Call(self._models.Promote,
                     models_pb2.PromoteRequest(version=version, reason=reason, force=force),
                     _switch)

    def rollback(self, reason: str) -> _Call[tuple[str, str]]:
        return _Call(self._models.Rollback, models_pb2.RollbackRequest(reason=reason), _switch)

    def ab_start(self, candidate: str, traffic: float | None, sticky: str, min_votes: int | None,
                 confidence: float | None, max_duration: str, force: bool,
                 futility_win: float | None = None) -> _Call[dict]:
        optional = dict(traffic=traffic, min_votes=min_votes, confidence=confidence,
                        futility_win=futility_win)
        request = models_pb2.StartABRequest(  # an unset optional field: the server's default
            candidate=candidate, sticky=sticky, max_duration=max_duration, force=force,
            **{k: v for k, v in optional.items() if v is not None})
        return _Call(self._models.StartAB, request, _ab_status)

    def ab_status(self) -> _Call[dict]:
        return _Call(self._models.GetABStatus, models_pb2.GetABStatusRequest(), _ab_status)

    def ab_stop(self, outcome: str, reason: str) -> _Call[dict]:
        return _Call(self._models.StopAB, models_pb2.StopABRequest(outcome=outcome, reason=reason),
                     _ab_status)

    # ---- Feedback ----------------------------------------------------------------------------

    def submit_preference(self, chosen_response_id: str, rejected_response_id: str,
                          prompt_messages: Iterable[Message] | None, chosen_text: str,
                          rejected_text: str, comment: str, idempotency_key: str | None,
                          user_id: str, session_id: str) -> _Call[FeedbackAck]:
        request = feedback_pb2.SubmitPreferenceRequest(
            chosen_response_id=chosen_response_id, rejected_response_id=rejected_response_id,
            prompt_messages=chat_messages(prompt_messages or ()), chosen_text=chosen_text,
            rejected_text=rejected_text, comment=comment,
            idempotency_key=idempotency_key or uuid.uuid4().hex, user_id=user_id,
            session_id=session_id)
        return _Call(self._feedback.SubmitPreference, request, _feedback_ack)

    def submit_rating(self, response_id: str, score: int, scale: str | None, comment: str,
                      idempotency_key: str | None, user_id: str,
                      session_id: str) -> _Call[FeedbackAck]:
        if scale not in _RATING_SCALES:
            raise ValueError(f"scale must be 'thumbs', 'stars' or None, got {scale!r}")
        request = feedback_pb2.SubmitRatingRequest(
            response_id=response_id, score=score, scale=_RATING_SCALES[scale], comment=comment,
            idempotency_key=idempotency_key or uuid.uuid4().hex, user_id=user_id,
            session_id=session_id)
        return _Call(self._feedback.SubmitRating, request, _feedback_ack)


_ChunkStream = TypeVar("_ChunkStream", Iterator[Chunk], AsyncIterator[Chunk])


class _ClientBase(Generic[_ChunkStream]):
    """What both clients share: the connection settings, and the streaming methods (plain methods
    in both; `_stream` gives an iterator in `Client`, an async iterator in `AsyncClient`)."""

    _rpcs: _Rpcs

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 root_certificates: bytes | str | os.PathLike | None = None, tls: bool = False,
                 tls_server_name: str | None = None, timeout: float | None = None,
                 max_message_bytes: int | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        """`token` defaults to $PREFLOOP_TOKEN; `timeout` is the default deadline (seconds)."""
        self.target = target
        self.timeout = timeout
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = list(options)
        if max_message_bytes is not None:
            self._options += [("grpc.max_send_message_length", max_message_bytes),
                              ("grpc.max_receive_message_length", max_message_bytes)]
        if tls_server_name:
            self._options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._credentials = None
        if root_certificates is not None or tls:
            roots = root_certificates
            if roots is not None and not isinstance(roots, bytes):
                roots = Path(roots).read_bytes()
            self._credentials = grpc.ssl_channel_credentials(root_certificates=roots)

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self._metadata}

    def _stream(self, call: _Call[Chunk], timeout: float | None) -> _ChunkStream:
        raise NotImplementedError

    def generate_stream(self, prompt: str, *, session_id: str = "", user_id: str = "",
                        timeout: float | None = None, **sampling: Any) -> _ChunkStream:
        """Complete a raw prompt, chunk by chunk (an async iterator from `AsyncClient`); the
        arguments are `generate`'s. Leaving the loop early cancels the request."""
        return self._stream(self._rpcs.generate_stream(prompt, session_id, user_id, sampling),
                            timeout)

    def chat_stream(self, messages: Iterable[Message], *, session_id: str = "",
                    user_id: str = "", timeout: float | None = None,
                    **sampling: Any) -> _ChunkStream:
        """Answer a conversation, chunk by chunk (an async iterator from `AsyncClient`); the
        arguments are `chat`'s. Leaving the loop early cancels the request."""
        return self._stream(self._rpcs.chat_stream(messages, session_id, user_id, sampling),
                            timeout)


class Client(_ClientBase[Iterator[Chunk]]):
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is not None:
            self._channel = grpc.secure_channel(target, self._credentials, self._options)
        else:
            self._channel = grpc.insecure_channel(target, self._options)
        self._rpcs = _Rpcs(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, call: _Call[R], timeout: float | None) -> R:
        try:
            response = call.rpc(call.request, **self._kwargs(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return call.convert(response)

    def _stream(self, call: _Call[Chunk], timeout: float | None) -> Iterator[Chunk]:
        stream = call.rpc(call.request, **self._kwargs(timeout))
        try:
            for msg in stream:
                yield call.convert(msg)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            stream.cancel()  # no-op when finished; aborts the request if the consumer stopped

    def generate(self, prompt: str, *, session_id: str = "", user_id: str = "",
                 timeout: float | None = None, **sampling: Any) -> GenerateResult:
        """Complete a raw prompt. `sampling`: max_tokens, temperature, top_p, top_k, stop,
        seed, n, repetition_penalty, frequency_penalty, presence_penalty (None/omitted = server
        default); `compare=True`: during an A/B test one answer from each version in random
        order (each `Completion` names its version; leave n unset), else one answer."""
        return self._unary(self._rpcs.generate(prompt, session_id, user_id, sampling), timeout)

    def chat(self, messages: Iterable[Message], *, session_id: str = "", user_id: str = "",
             timeout: float | None = None, **sampling: Any) -> GenerateResult:
        """Answer a conversation (the server applies the chat template); keywords as
        `generate`'s, `compare=True` included."""
        return self._unary(self._rpcs.chat(messages, session_id, user_id, sampling), timeout)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return self._unary(self._rpcs.model_info(), timeout)

    def engine_stats(self, *, timeout: float | None = None) -> EngineStats:
        """Engine internals (admin token when the server requires tokens)."""
        return self._unary(self._rpcs.engine_stats(), timeout)

    def list_versions(self, *, timeout: float | None = None) -> Versions:
        """The server's registry versions (admin token when the server requires tokens)."""
        return self._unary(self._rpcs.list_versions(), timeout)

    def promote(self, version: str, *, reason: str = "", force: bool = False,
                timeout: float | None = None) -> tuple[str, str]:
        """Hot-swap the server to `version`; returns (previous, current). Admin."""
        return self._unary(self._rpcs.promote(version, reason, force), timeout)

    def rollback(self, *, reason: str = "", timeout: float | None = None) -> tuple[str, str]:
        """Hot-swap back to the previously served version; returns (previous, current). Admin."""
        return self._unary(self._rpcs.rollback(reason), timeout)

    def ab_start(self, candidate: str, *, traffic: float | None = None, sticky: str = "",
                 min_votes: int | None = None, confidence: float | None = None,
                 max_duration: str = "", force: bool = False,
                 futility_win: float | None = None, timeout: float | None = None) -> dict:
        """Start an A/B test of `candidate` against the served version; its status. Admin.
        `futility_win`: end it, rejected, once the candidate looks to win fewer than that share
        of head-to-head votes (docs/ab.md; None: never)."""
        return self._unary(self._rpcs.ab_start(candidate, traffic, sticky, min_votes, confidence,
                                               max_duration, force, futility_win), timeout)

    def ab_status(self, *, timeout: float | None = None) -> dict:
        """The running (or last) A/B test: votes, win rate, interval, decision. Admin."""
        return self._unary(self._rpcs.ab_status(), timeout)

    def ab_stop(self, outcome: str = "", *, reason: str = "", timeout: float | None = None) -> dict:
        """End the A/B test: outcome "promote", "reject" or "" (keep the current version). Admin."""
        return self._unary(self._rpcs.ab_stop(outcome, reason), timeout)

    def submit_preference(self, *, chosen_response_id: str = "", rejected_response_id: str = "",
                          prompt_messages: Iterable[Message] | None = None,
                          chosen_text: str = "", rejected_text: str = "", comment: str = "",
                          idempotency_key: str | None = None, user_id: str = "",
                          session_id: str = "", timeout: float | None = None) -> FeedbackAck:
        """Record which of two answers to one prompt is better: either two response ids of this
        server (e.g. the completions of an n=2 request), or prompt_messages + two texts.

        OK means the server has it on disk. `idempotency_key` defaults to a random one; pass
        your own and reuse it when retrying (a repeat answers `duplicate=True`, adds nothing).
        """
        return self._unary(self._rpcs.submit_preference(
            chosen_response_id, rejected_response_id, prompt_messages, chosen_text, rejected_text,
            comment, idempotency_key, user_id, session_id), timeout)

    def submit_rating(self, response_id: str, score: int, *, scale: str | None = None,
                      comment: str = "", idempotency_key: str | None = None, user_id: str = "",
                      session_id: str = "", timeout: float | None = None) -> FeedbackAck:
        """Rate one completion: thumbs (-1/+1) or stars (1..5; `scale="stars"` for 1 star)."""
        return self._unary(self._rpcs.submit_rating(response_id, score, scale, comment,
                                                    idempotency_key, user_id, session_id), timeout)


class AsyncClient(_ClientBase[AsyncIterator[Chunk]]):
    """asyncio client (grpc.aio). Create it inside the running loop; `async with` or aclose().

    The same RPC methods as `Client`, awaited (the streams are async iterators)."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(target, self._credentials, self._options)
        else:
            self._channel = grpc.aio.insecure_channel(target, self._options)
        self._rpcs = _Rpcs(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._channel.close()

    async def _unary(self, call: _Call[R], timeout: float | None) -> R:
        try:
            response = await call.rpc(call.request, **self._kwargs(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return call.convert(response)

    async def _stream(self, call: _Call[Chunk],
                      timeout: float | None) -> AsyncIterator[Chunk]:
        stream = call.rpc(call.request, **self._kwargs(timeout))
        try:
            async for msg in stream:
                yield call.convert(msg)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            stream.cancel()

    async def generate(self, prompt: str, *, session_id: str = "", user_id: str = "",
                       timeout: float | None = None, **sampling: Any) -> GenerateResult:
        """See `Client.generate`."""
        return await self._unary(self._rpcs.generate(prompt, session_id, user_id, sampling),
                                 timeout)

    async def chat(self, messages: Iterable[Message], *, session_id: str = "",
                   user_id: str = "", timeout: float | None = None,
                   **sampling: Any) -> GenerateResult:
        """See `Client.chat`."""
        return await self._unary(self._rpcs.chat(messages, session_id, user_id, sampling),
                                 timeout)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return await self._unary(self._rpcs.model_info(), timeout)

    async def engine_stats(self, *, timeout: float | None = None) -> EngineStats:
        """See `Client.engine_stats`."""
        return await self._unary(self._rpcs.engine_stats(), timeout)

    async def list_versions(self, *, timeout: float | None = None) -> Versions:
        """See `Client.list_versions`."""
        return await self._unary(self._rpcs.list_versions(), timeout)

    async def promote(self, version: str, *, reason: str = "", force: bool = False,
                      timeout: float | None = None) -> tuple[str, str]:
        """See `Client.promote`."""
        return await self._unary(self._rpcs.promote(version, reason, force), timeout)

    async def rollback(self, *, reason: str = "", timeout: float | None = None) -> tuple[str, str]:
        """See `Client.rollback`."""
        return await self._unary(self._rpcs.rollback(reason), timeout)

    async def ab_start(self, candidate: str, *, traffic: float | None = None, sticky: str = "",
                       min_votes: int | None = None, confidence: float | None = None,
                       max_duration: str = "", force: bool = False,
                       futility_win: float | None = None,
                       timeout: float | None = None) -> dict:
        """See `Client.ab_start`."""
        return await self._unary(self._rpcs.ab_start(candidate, traffic, sticky, min_votes,
                                                     confidence, max_duration, force,
                                                     futility_win), timeout)

    async def ab_status(self, *, timeout: float | None = None) -> dict:
        """See `Client.ab_status`."""
        return await self._unary(self._rpcs.ab_status(), timeout)

    async def ab_stop(self, outcome: str = "", *, reason: str = "",
                      timeout: float | None = None) -> dict:
        """See `Client.ab_stop`."""
        return await self._unary(self._rpcs.ab_stop(outcome, reason), timeout)

    async def submit_preference(self, *, chosen_response_id: str = "",
                                rejected_response_id: str = "",
                                prompt_messages: Iterable[Message] | None = None,
                                chosen_text: str = "", rejected_text: str = "",
                                comment: str = "", idempotency_key: str | None = None,
                                user_id: str = "", session_id: str = "",
                                timeout: float | None = None) -> FeedbackAck:
        """See `Client.submit_preference`."""
        return await self._unary(self._rpcs.submit_preference(
            chosen_response_id, rejected_response_id, prompt_messages, chosen_text, rejected_text,
            comment, idempotency_key, user_id, session_id), timeout)

    async def submit_rating(self, response_id: str, score: int, *, scale: str | None = None,
                            comment: str = "", idempotency_key: str | None = None,
                            user_id: str = "", session_id: str = "",
                            timeout: float | None = None) -> FeedbackAck:
        """See `Client.submit_rating`."""
        return await self._unary(self._rpcs.submit_rating(
            response_id, score, scale, comment, idempotency_key, user_id, session_id), timeout)
