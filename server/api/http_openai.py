"""The OpenAI-compatible HTTP routes: POST /v1/chat/completions and /v1/completions (unary or SSE
streamed; a client that disconnects aborts its request in the engine), GET /v1/models (the served
version and the registry's others) and GET /v1/whoami (the role of the caller's token).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from prefloop.server.api import openai_compat as oa
from prefloop.server.api.auth import Role
from prefloop.server.api.completions import Call, RequestMeta
from prefloop.server.api.http_deps import Ctx, HttpContext, json_body
from prefloop.server.api.status_mapping import details_of, http_status_of
from prefloop.server.api.tools import ToolSpec
from prefloop.server.errors import NotFound, PrefloopError

MODEL_ALIASES = ("prefloop", "default")

router = APIRouter()


def check_model(ctx: HttpContext, model: str | None) -> str:
    served = ctx.generator.info.model_version
    if model is None or model in MODEL_ALIASES or model == served:
        return model or served
    raise NotFound(f"model {model!r} is not being served (this server serves {served!r}; "
                   "GET /v1/models lists it; promote a version to serve it)")


async def run_request(ctx: HttpContext, request: Request, req: oa.ParsedRequest, route: str,
                      chat: bool):
    model = check_model(ctx, req.model)
    meta = RequestMeta(api="http", method=route, session_id=req.session_id, user_id=req.user_id)
    if req.stream:
        return StreamingResponse(stream_events(ctx, req, meta, model, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async with ctx.runner.call(meta) as call:
        request.state.request_id = call.request_id
        work = asyncio.ensure_future(collect(ctx, call, req))
        watcher = asyncio.ensure_future(cancel_on_disconnect(request, work))
        try:
            await work
        finally:
            watcher.cancel()
        build = oa.chat_response if chat else oa.completion_response
        return build(call.request_id, model, call.model_version, choices_of(call, req.tools),
                     call.prompt_tokens)


def prepare(ctx: HttpContext, call: Call, req: oa.ParsedRequest):
    runner = ctx.runner
    runner.route(call, compare=req.compare)
    if req.compare and len(call.generators) == 1:  # no A/B test: two samples of one version
        req.sampling["n"] = 2
    messages, response_format = req.messages, req.response_format
    if req.tools is not None:  # the tools in the system message; a required call's grammar
        messages = req.tools.render(messages)
        response_format = req.tools.format or response_format
        call.constraint = req.tools.log_key
    prompt_ids = (runner.chat_ids(call, messages) if messages is not None
                  else runner.prompt_ids(call, req.prompt))
    params = runner.params(call, prompt_ids, max_tokens=req.max_tokens, stop=req.stop,
                           response_format=response_format, **req.sampling)
    return runner.run(call, prompt_ids, params, prompt=req.prompt, messages=messages)


async def collect(ctx: HttpContext, call: Call, req: oa.ParsedRequest) -> None:
    async for _ in prepare(ctx, call, req):
        pass


async def cancel_on_disconnect(request: Request, work: asyncio.Future) -> None:
    """The body is read: the next ASGI message is the client's disconnect."""
    while not work.done():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            work.cancel()
            return


def choices_of(call: Call, tools: ToolSpec | None = None) -> list[dict]:
    choices = []
    for c in call.completions:
        choice = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                  "response_id": c.response_id,
                  "model_version": c.model_version or call.model_version,
                  "completion_tokens": c.completion_tokens}
        calls = tools.parse(c.text) if tools is not None and c.finish_reason == "stop" else None
        if calls:
            choice.update(tool_calls=calls, finish_reason="tool_calls")
        choices.append(choice)
    return choices


class ToolCallStream:
    """Holds a streamed choice's text back while it may still be a tool call; at its end, the
    call as OpenAI's tool_calls delta, or the held text after all."""

    def __init__(self, tools: ToolSpec):
        self.tools = tools
        self.held: dict[int, str] = {}
        self.text_only: set[int] = set()

    def push(self, index: int, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(delta body, finish reason) to send for this piece of choice `index`."""
        if index in self.text_only:
            return ({"content": text} if text else {}), finish_reason
        held = self.held[index] = self.held.get(index, "") + text
        if finish_reason is None:
            if self.tools.may_be_call(held):
                return {}, None
            self.text_only.add(index)
            del self.held[index]
            return {"content": held}, None
        del self.held[index]
        calls = self.tools.parse(held) if finish_reason == "stop" else None
        if calls:
            return {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}, "tool_calls"
        return ({"content": held} if held else {}), finish_reason


async def stream_events(ctx: HttpContext, req: oa.ParsedRequest, meta: RequestMeta, model: str,
                        chat: bool) -> AsyncIterator[str]:
    created = int(time.time())
    try:
        async with ctx.runner.call(meta) as call:
            generation = prepare(ctx, call, req)
            started: set[int] = set()
            held = ToolCallStream(req.tools) if chat and req.tools is not None else None
            try:
                async for state, delta in generation:
                    if chat:
                        finish = delta.finish_reason
                        if held is not None:
                            body, finish = held.push(state.index, delta.text_delta, finish)
                        else:
                            body = {"content": delta.text_delta} if delta.text_delta else {}
                        if state.index not in started:
                            body = {"role": "assistant", **body}
                            started.add(state.index)
                        elif not body and finish is None:
                            continue  # held back: nothing to send yet
                        chunk = oa.chat_chunk(call.request_id, model, state.model_version,
                                              state.index, state.response_id, body,
                                              finish, created)
                    else:
                        chunk = oa.completion_chunk(call.request_id, model, state.model_version,
                                                    state.index, state.response_id,
                                                    delta.text_delta, delta.finish_reason, created)
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            finally:
                await generation.aclose()  # a disconnect aborts the request in the engine
            if req.include_usage:
                tokens = sum(c.completion_tokens for c in call.completions)
                yield "data: " + json.dumps({
                    "id": call.request_id, "object": "chat.completion.chunk" if chat
                    else "text_completion", "created": created, "model": model,
                    "model_version": call.model_version, "choices": [],
                    "usage": oa.usage(call.prompt_tokens, tokens)}) + "\n\n"
    except PrefloopError as exc:  # headers are sent: the error travels as an SSE event
        status = http_status_of(exc)
        yield f"data: {json.dumps(oa.error_body(status, details_of(exc), exc.code.lower()))}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, ctx: Ctx):
    ctx.require(request, Role.USER)
    req = oa.parse_chat(await json_body(request), ctx.runner.limits.max_grammar_size)
    return await run_request(ctx, request, req, "POST /v1/chat/completions", chat=True)


@router.post("/v1/completions")
async def completions(request: Request, ctx: Ctx):
    ctx.require(request, Role.USER)
    req = oa.parse_completion(await json_body(request), ctx.runner.limits.max_grammar_size)
    return await run_request(ctx, request, req, "POST /v1/completions", chat=False)


@router.get("/v1/models")
async def models(request: Request, ctx: Ctx):
    ctx.require(request, Role.USER)
    info = ctx.generator.info
    serving = info.model_version
    versions = [serving]
    current = serving
    if ctx.switcher is not None:
        current = ctx.switcher.registry.current() or serving
        versions += [v for v in await asyncio.to_thread(ctx.switcher.registry.list_versions)
                     if v != serving]
    return {"object": "list", "data": [
        {"id": v, "object": "model", "created": 0, "owned_by": "prefloop",
         "serving": v == serving, "current": v == current,
         **({"context_length": info.context_length, "backend": info.backend,
             "dtype": info.dtype, "sampling_defaults": ctx.runner.defaults.as_dict()}
            if v == serving else {})} for v in versions]}


@router.get("/v1/whoami")
async def whoami(request: Request, ctx: Ctx):
    if not ctx.auth.enabled:
        return {"role": "anonymous", "auth": False}
    if not request.headers.get("authorization"):  # a page asking before it has a token
        return {"role": "none", "auth": True}
    role = ctx.role_of(request)
    return {"role": "admin" if role == Role.ADMIN else "user", "auth": True}
