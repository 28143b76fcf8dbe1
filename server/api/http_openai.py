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
        return build(call.request_id, model, call.model_version, choices_of(call),
                     call.prompt_tokens)


def prepare(ctx: HttpContext, call: Call, req: oa.ParsedRequest):
    runner = ctx.runner
    runner.route(call, compare=req.compare)
    if req.compare and len(call.generators) == 1:  # no A/B test: two samples of one version
        req.sampling["n"] = 2
    prompt_ids = (runner.chat_ids(call, req.messages) if req.messages is not None
                  else runner.prompt_ids(call, req.prompt))
    params = runner.params(call, prompt_ids, max_tokens=req.max_tokens, stop=req.stop,
                           response_format=req.response_format, **req.sampling)
    return runner.run(call, prompt_ids, params, prompt=req.prompt, messages=req.messages)


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


def choices_of(call: Call) -> list[dict]:
    return [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
             "response_id": c.response_id, "model_version": c.model_version or call.model_version,
             "completion_tokens": c.completion_tokens} for c in call.completions]


async def stream_events(ctx: HttpContext, req: oa.ParsedRequest, meta: RequestMeta, model: str,
                        chat: bool) -> AsyncIterator[str]:
    created = int(time.time())
    try:
        async with ctx.runner.call(meta) as call:
            generation = prepare(ctx, call, req)
            started: set[int] = set()
            try:
                async for state, delta in generation:
                    if chat:
                        body = {"content": delta.text_delta} if delta.text_delta else {}
                        if state.index not in started:
                            body = {"role": "assistant", **body}
                            started.add(state.index)
                        chunk = oa.chat_chunk(call.request_id, model, state.model_version,
                                              state.index, state.response_id, body,
                                              delta.finish_reason, created)
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
    req = oa.parse_chat(await json_body(request))
    return await run_request(ctx, request, req, "POST /v1/chat/completions", chat=True)


@router.post("/v1/completions")
async def completions(request: Request, ctx: Ctx):
    ctx.require(request, Role.USER)
    req = oa.parse_completion(await json_body(request))
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
