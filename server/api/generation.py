"""The Generation servicer: proto requests in, `CompletionRunner` calls, proto responses/chunks out.

Thin by design: it converts messages to `RequestMeta`, message dicts and sampling fields, lets the
shared `CompletionRunner` (server/api/completions.py) validate, generate, log and record, and
converts the completion states back to proto. Typed errors become statuses in `status_mapping`.
When a client cancels, disconnects or passes its deadline, the handler task is cancelled and the
request is aborted in the engine (its KV blocks are freed).
"""
from __future__ import annotations

import json

from prefloop.proto.prefloop.v1 import generation_pb2, generation_pb2_grpc
from prefloop.server.api.completions import SAMPLING_FIELDS, Call, CompletionRunner, RequestMeta
from prefloop.server.api.status_mapping import map_errors
from prefloop.server.engine.response_format import (
    DEFAULT_MAX_GRAMMAR_SIZE,
    parse_response_format,
)
from prefloop.server.errors import InvalidArgument


def messages_from_proto(messages) -> list[dict]:
    """Proto ChatMessages -> [{"role", "content"}] (roles are checked by the tokenizer)."""
    return [{"role": m.role, "content": m.content} for m in messages]


def sampling_fields(sampling: generation_pb2.SamplingParams,
                    max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> dict:
    """The sampling fields a proto request set (unset ones are None: the server's defaults)."""
    fields = {name: getattr(sampling, name) if sampling.HasField(name) else None
              for name in SAMPLING_FIELDS}
    fields["max_tokens"] = sampling.max_tokens if sampling.HasField("max_tokens") else None
    fields["stop"] = tuple(sampling.stop)
    fields["response_format"] = None
    if sampling.HasField("response_format"):
        rf = sampling.response_format
        schema = None
        if rf.json_schema:
            try:
                schema = json.loads(rf.json_schema)
            except ValueError as exc:
                raise InvalidArgument(f"response_format.json_schema is not valid JSON: {exc}") from exc
        fields["response_format"] = parse_response_format(rf.type, schema, rf.name,
                                                          max_grammar_size)
    return fields


class GenerationService(generation_pb2_grpc.GenerationServicer):
    """Implements prefloop.v1.Generation on a `CompletionRunner`."""

    def __init__(self, runner: CompletionRunner) -> None:
        self.runner = runner

    # ---- RPCs --------------------------------------------------------------------------------

    @map_errors
    async def Generate(self, request, context):
        async with self._call("Generate", request, context) as call:
            async for _ in self._run(call, request, prompt=request.prompt):
                pass
            return self._response(call)

    @map_errors
    async def GenerateStream(self, request, context):
        async with self._call("GenerateStream", request, context) as call:
            async for state, delta in self._run(call, request, prompt=request.prompt):
                yield self._chunk(call, state, delta)

    @map_errors
    async def Chat(self, request, context):
        async with self._call("Chat", request, context) as call:
            async for _ in self._run(call, request, messages=messages_from_proto(request.messages)):
                pass
            return self._response(call)

    @map_errors
    async def ChatStream(self, request, context):
        async with self._call("ChatStream", request, context) as call:
            async for state, delta in self._run(call, request,
                                                messages=messages_from_proto(request.messages)):
                yield self._chunk(call, state, delta)

    # ---- helpers -----------------------------------------------------------------------------

    def _call(self, method: str, request, context):
        meta = RequestMeta(api="grpc", method=method)  # ids are checked once the call is logged
        def deadline_passed() -> bool:
            remaining = context.time_remaining() if context is not None else None
            return remaining is not None and remaining <= 0
        return self.runner.call(meta, deadline_passed)

    def _run(self, call: Call, request, *, prompt: str | None = None,
             messages: list[dict] | None = None):
        call.meta = RequestMeta(api="grpc", method=call.meta.method, session_id=request.session_id,
                                user_id=request.user_id)
        self.runner.route(call, compare=request.compare)
        prompt_ids = (self.runner.prompt_ids(call, prompt) if messages is None
                      else self.runner.chat_ids(call, messages))
        params = self.runner.params(call, prompt_ids, **sampling_fields(
            request.sampling, self.runner.limits.max_grammar_size))
        return self.runner.run(call, prompt_ids, params, prompt=prompt, messages=messages)

    @staticmethod
    def _chunk(call: Call, state, delta) -> generation_pb2.GenerateChunk:
        return generation_pb2.GenerateChunk(
            index=state.index, response_id=state.response_id, text_delta=delta.text_delta,
            finish_reason=delta.finish_reason or "",
            model_version=state.model_version or call.model_version,
            completion_tokens=delta.completion_tokens, prompt_tokens=call.prompt_tokens,
            request_id=call.request_id)

    @staticmethod
    def _response(call: Call) -> generation_pb2.GenerateResponse:
        return generation_pb2.GenerateResponse(
            completions=[generation_pb2.Completion(
                response_id=c.response_id, text=c.text, finish_reason=c.finish_reason or "",
                completion_tokens=c.completion_tokens, index=c.index,
                model_version=c.model_version or call.model_version) for c in call.completions],
            prompt_tokens=call.prompt_tokens, model_version=call.model_version,
            request_id=call.request_id)
