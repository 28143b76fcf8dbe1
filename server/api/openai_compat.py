"""OpenAI's chat / completions request and response shapes, checked and built without a model.

`parse_chat` / `parse_completion` turn a JSON body into a `ParsedRequest` (messages or prompt,
sampling fields, stream options, prefloop's extensions) or raise InvalidArgument naming the field.
Fields prefloop does not implement are refused by name, except the harmless ones in `IGNORED`
(accepted and ignored) and `IGNORED_AT_DEFAULT` (accepted only at their no-op value).
`chat_response` / `chat_chunk` / `completion_response` / `completion_chunk` build the replies;
every choice carries its `response_id` and `model_version` (the handles for feedback).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from prefloop.server.api.tools import ToolSpec, parse_tools, tool_call_text
from prefloop.server.engine.response_format import (
    DEFAULT_MAX_GRAMMAR_SIZE,
    ResponseFormat,
    parse_response_format,
)
from prefloop.server.errors import InvalidArgument

COMMON = {"model", "temperature", "top_p", "max_tokens", "n", "stop", "seed", "user", "stream",
          "stream_options", "frequency_penalty", "presence_penalty",
          # prefloop's extensions
          "session_id", "top_k", "repetition_penalty", "response_format"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "compare", "tools", "tool_choice"}
COMPLETION_FIELDS = COMMON | {"prompt"}
IGNORED = {"store", "metadata", "service_tier", "parallel_tool_calls"}
IGNORED_AT_DEFAULT: dict[str, tuple] = {  # field -> values that change nothing
    "logprobs": (False, None), "top_logprobs": (0, None), "logit_bias": ({}, None),
    "echo": (False, None),
    "suffix": (None, ""), "best_of": (1, None),
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass(slots=True)
class ParsedRequest:
    model: str | None
    stream: bool
    include_usage: bool
    sampling: dict  # SAMPLING_FIELDS that the request set (None = unset)
    max_tokens: int | None
    stop: tuple[str, ...]
    user_id: str = ""
    session_id: str = ""
    messages: list[dict] | None = None
    prompt: str | None = None
    compare: bool = False
    response_format: ResponseFormat | None = None  # JSON constraint (None: free text)
    tools: ToolSpec | None = None  # functions the model may call (chat only)


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = []
    for name, value in body.items():
        if name in allowed or name in IGNORED:
            continue
        if name in IGNORED_AT_DEFAULT and value in IGNORED_AT_DEFAULT[name]:
            continue
        unknown.append(name)
    if unknown:
        names = ", ".join(sorted(unknown))
        raise InvalidArgument(f"unsupported field(s): {names}; prefloop implements "
                              f"{', '.join(sorted(allowed - {'stream_options'}))} (docs/http.md)")


def _number(body: dict, name: str, *, integer: bool = False, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not float(value).is_integer()):
        raise InvalidArgument(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be finite, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        raise InvalidArgument(f"{name} must be in [{low}, {high}], got {value!r}")
    return int(value) if integer else float(value)


def _string(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidArgument("stop must be a string or a list of strings")


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content: only text parts "
                                      "({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidArgument(f"messages[{i}].content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        if role == "assistant" and m.get("tool_calls"):  # written back in the prompt format
            content = _content(m, i) if m.get("content") is not None else ""
            out.append({"role": role, "content": content + tool_call_text(m["tool_calls"])})
            continue
        out.append({"role": role, "content": _content(m, i)})
    return out


def _response_format(body: dict, max_grammar_size: int) -> ResponseFormat | None:
    """OpenAI's `response_format`: {"type": "text" | "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidArgument('response_format must be an object with a "type": text, json_object '
                              "or json_schema")
    spec = value.get("json_schema")
    if value["type"] == "json_schema" and not isinstance(spec, dict):
        raise InvalidArgument('response_format json_schema needs "json_schema": {"name", "schema"}')
    spec = spec or {}
    return parse_response_format(value["type"], spec.get("schema"), spec.get("name") or "",
                                 max_grammar_size)


def _common(body: Any, allowed: set[str], max_grammar_size: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    _check_fields(body, allowed)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidArgument("stream_options must be an object")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidArgument("stream must be true or false")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidArgument("model must be a string")
    sampling = {
        "temperature": _number(body, "temperature", low=0, high=2),
        "top_p": _number(body, "top_p", low=0, high=1),
        "top_k": _number(body, "top_k", integer=True, low=0),
        "seed": _number(body, "seed", integer=True),
        "n": _number(body, "n", integer=True, low=1),
        "repetition_penalty": _number(body, "repetition_penalty", low=0),
        "frequency_penalty": _number(body, "frequency_penalty", low=-2, high=2),
        "presence_penalty": _number(body, "presence_penalty", low=-2, high=2),
    }
    return ParsedRequest(model=model or None, stream=stream,
                         include_usage=bool(options.get("include_usage")), sampling=sampling,
                         max_tokens=_number(body, "max_tokens", integer=True, low=1),
                         stop=_stop(body), user_id=_string(body, "user"),
                         session_id=_string(body, "session_id"),
                         response_format=_response_format(body, max_grammar_size))


def parse_chat(body: Any, max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> ParsedRequest:
    req = _common(body, CHAT_FIELDS, max_grammar_size)
    mct = _number(body, "max_completion_tokens", integer=True, low=1)
    if mct is not None:
        if req.max_tokens is not None and req.max_tokens != mct:
            raise InvalidArgument("max_tokens and max_completion_tokens differ; send one")
        req.max_tokens = mct
    req.messages = _messages(body)
    req.tools = parse_tools(body, max_grammar_size)
    if req.tools is not None and req.tools.constrained and req.response_format is not None:
        raise InvalidArgument("tool_choice required / a named function already fixes the answer's "
                              "format; leave response_format unset")
    compare = body.get("compare") or False
    if not isinstance(compare, bool):
        raise InvalidArgument("compare must be true or false")
    if compare and req.sampling["n"] not in (None, 1):
        raise InvalidArgument("compare gives two answers itself; leave n unset")
    req.compare = compare
    return req


def parse_completion(body: Any, max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> ParsedRequest:
    req = _common(body, COMPLETION_FIELDS, max_grammar_size)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument("prompt must be a non-empty string (one prompt per request)")
    req.prompt = prompt
    return req


# ---- responses ----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, model_version: str, choices: list[dict],
                  prompt_tokens: int) -> dict:
    """choices: [{index, text, finish_reason, response_id, model_version, completion_tokens}]"""
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()),
        "model": model, "model_version": model_version,
        "choices": [{"index": c["index"], "message": _message(c),
                     "finish_reason": c["finish_reason"], "logprobs": None,
                     "response_id": c["response_id"], "model_version": c["model_version"]}
                    for c in choices],
        "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
    }


def _message(choice: dict) -> dict:
    if choice.get("tool_calls"):
        return {"role": "assistant", "content": None, "tool_calls": choice["tool_calls"]}
    return {"role": "assistant", "content": choice["text"]}


def chat_chunk(request_id: str, model: str, model_version: str, index: int, response_id: str,
               delta: dict, finish_reason: str | None, created: int) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "model_version": model_version,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None, "response_id": response_id,
                         "model_version": model_version}]}


def completion_response(request_id: str, model: str, model_version: str, choices: list[dict],
                        prompt_tokens: int) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()),
        "model": model, "model_version": model_version,
        "choices": [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"],
                     "logprobs": None, "response_id": c["response_id"],
                     "model_version": c["model_version"]} for c in choices],
        "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
    }


def completion_chunk(request_id: str, model: str, model_version: str, index: int,
                     response_id: str, text: str, finish_reason: str | None, created: int) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "model_version": model_version,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                         "logprobs": None, "response_id": response_id,
                         "model_version": model_version}]}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable_error"}
    return {"error": {"message": message, "type": kinds.get(status, "internal_error"),
                      "param": param, "code": code}}
