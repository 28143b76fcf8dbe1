"""The HTTP feedback routes: POST /v1/feedback/preference and /v1/feedback/rating, validated here
(known fields, types) and written through the shared `FeedbackStore` (a 2xx means fsync'd;
an idempotency key makes a retry a duplicate, not a second vote).
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from prefloop.server.api.auth import Role, bearer_token
from prefloop.server.api.http_deps import Ctx, json_body
from prefloop.server.errors import InvalidArgument
from prefloop.server.feedback.vote_rate import caller_of_token

router = APIRouter()


def fields(body: Any, allowed: tuple[str, ...]) -> dict:
    """The body's fields, all known and strings (but score and prompt_messages), None dropped."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidArgument(f"unknown field(s): {', '.join(unknown)}; expected "
                              f"{', '.join(allowed)}")
    for name, value in body.items():
        if name not in ("score", "prompt_messages") and value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string")
    return {k: v for k, v in body.items() if v is not None}


def caller(request: Request) -> str:
    """Who sent the vote, for the rate limits: a fingerprint of its bearer token."""
    return caller_of_token(bearer_token(request.headers.items()))


@router.post("/v1/feedback/preference")
async def preference(request: Request, ctx: Ctx):
    ctx.require(request, Role.USER)
    body = fields(await json_body(request), (
        "chosen_response_id", "rejected_response_id", "prompt_messages", "chosen_text",
        "rejected_text", "comment", "idempotency_key", "user_id", "session_id"))
    messages = body.pop("prompt_messages", None)
    if messages is not None:
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise InvalidArgument("prompt_messages must be a list of {role, content} strings")
        body["prompt_messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    started = time.perf_counter()
    ack = await ctx.feedback_store().asubmit_preference(caller=caller(request), **body)
    ctx.metrics.observe_feedback("preference", "http", ack.duplicate, started)
    return {"feedback_id": ack.feedback_id, "duplicate": ack.duplicate}


@router.post("/v1/feedback/rating")
async def rating(request: Request, ctx: Ctx):
    ctx.require(request, Role.USER)
    body = fields(await json_body(request), (
        "response_id", "score", "scale", "comment", "idempotency_key", "user_id", "session_id"))
    score = body.get("score")
    if isinstance(score, bool) or not isinstance(score, int):
        raise InvalidArgument(f"score must be an integer (-1/+1 thumbs, 1..5 stars), got {score!r}")
    scale = body.pop("scale", None) or None
    if scale not in (None, "thumbs", "stars"):
        raise InvalidArgument(f"scale must be 'thumbs' or 'stars', got {scale!r}")
    started = time.perf_counter()
    ack = await ctx.feedback_store().asubmit_rating(scale=scale, caller=caller(request),
                                                **body)
    ctx.metrics.observe_feedback("rating", "http", ack.duplicate, started)
    return {"feedback_id": ack.feedback_id, "duplicate": ack.duplicate}
