"""OpenAI tool calling (`tools`, `tool_choice`) over any model: the checked tool list, the prompt
format, the output constraint, and the model's answer turned into `tool_calls`.

The prompt format (documented in docs/http.md; the default model's chat template has none): the
tools go into the system message as JSON lines inside `<tools></tools>`, with the instruction to
answer a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Earlier assistant tool
calls are written back in that form and `tool` messages keep their role, so the conversation the
model sees (and the generation log keeps) is plain text in the same format.

`tool_choice`: "none" sends no tools (free text); "auto" (the default with tools) lets the model
answer in text or with `<tool_call>` blocks, parsed afterwards; "required" and a named function
constrain the answer to `{"name": one of the tools, "arguments": <its parameters schema>}` with
the structured-output grammar, so the call always parses and its arguments validate.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from prefloop.server.engine.response_format import (
    DEFAULT_MAX_GRAMMAR_SIZE,
    ResponseFormat,
    parse_response_format,
)
from prefloop.server.errors import InvalidArgument

MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CLOSE), re.S)
INSTRUCTIONS = (
    "You can call functions. The available functions, one JSON object per line:\n<tools>\n{tools}\n"
    "</tools>\nTo call a function, answer with only {open}{{\"name\": <function name>, \"arguments\": "
    "<JSON object of arguments>}}{close} (one block per call). Otherwise answer normally.")


@dataclass(frozen=True)
class ToolSpec:
    """A request's tools (each {"name", "description", "parameters"}) and its tool_choice:
    "auto", "required" or a function's name."""

    tools: tuple[dict, ...]
    choice: str
    format: ResponseFormat | None = None  # the grammar of a required / named call (None: auto)

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tools]

    @property
    def constrained(self) -> bool:
        return self.choice != "auto"

    @property
    def log_key(self) -> str:
        """The generation log's `response_format` value: tools:<choice>:<names>."""
        return f"tools:{self.choice}:{','.join(self.names)}"

    def call_format(self, max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> ResponseFormat | None:
        """The grammar of a required / named call (None for auto), checked."""
        if not self.constrained:
            return None
        picked = [t for t in self.tools if self.choice == "required" or t["name"] == self.choice]
        shapes = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                     "arguments": t["parameters"]},
                   "required": ["name", "arguments"], "additionalProperties": False}
                  for t in picked]
        schema = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
        return parse_response_format("json_schema", schema, "tool_call", max_grammar_size)

    def system_text(self) -> str:
        lines = "\n".join(json.dumps({"name": t["name"], "description": t["description"],
                                      "parameters": t["parameters"]}, ensure_ascii=False)
                          for t in self.tools)
        return INSTRUCTIONS.format(tools=lines, open=OPEN, close=CLOSE)

    def render(self, messages: list[dict]) -> list[dict]:
        """The conversation with the tools in its system message."""
        text = self.system_text()
        if messages and messages[0]["role"] == "system":
            first = messages[0]["content"]
            return [{"role": "system", "content": f"{first}\n\n{text}" if first else text},
                    *messages[1:]]
        return [{"role": "system", "content": text}, *messages]

    def parse(self, text: str) -> list[dict] | None:
        """OpenAI tool_calls from an answer, or None when it is not a call of a known tool."""
        if self.constrained:
            found = [text]
        else:
            stripped = text.strip()
            if not stripped.startswith(OPEN):
                return None
            found = _CALL.findall(stripped)
        calls = []
        for blob in found:
            try:
                call = json.loads(blob)
            except ValueError:
                return None
            if (not isinstance(call, dict) or call.get("name") not in self.names
                    or not isinstance(call.get("arguments", {}), dict)):
                return None
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"],
                                       "arguments": json.dumps(call.get("arguments", {}),
                                                               ensure_ascii=False)}})
        return calls or None

    def may_be_call(self, text: str) -> bool:
        """Could this (partial) answer still turn out to be a tool call? (streams hold it back)"""
        if self.constrained:
            return True
        stripped = text.lstrip()
        return stripped.startswith(OPEN) or OPEN.startswith(stripped)


def _tool(i: int, tool) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(
            tool.get("function"), dict):
        raise InvalidArgument(f'{where} must be {{"type": "function", "function": {{"name", ...}}}}')
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidArgument(f"{where}.function.name must be 1-64 letters, digits, _ or -; got {name!r}")
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{where}.function.parameters must be a JSON Schema object")
    description = fn.get("description", "")
    if not isinstance(description, str):
        raise InvalidArgument(f"{where}.function.description must be a string")
    return {"name": name, "description": description, "parameters": parameters}


def parse_tools(body: dict, max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> ToolSpec | None:
    """`tools` + `tool_choice` of a chat request; None when no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise InvalidArgument("tool_choice needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"tools must be a list of at most {MAX_TOOLS} functions")
    specs = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t["name"] for t in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument("tools: two functions have the same name")
    if choice is None or choice == "auto":
        choice = "auto"
    elif choice == "none":
        return None
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise InvalidArgument(f"tool_choice names function {name!r}, which is not in tools "
                                  f"({', '.join(names)})")
        choice = name
    elif choice != "required":
        raise InvalidArgument('tool_choice must be "none", "auto", "required" or {"type": '
                              '"function", "function": {"name": ...}}')
    spec = ToolSpec(specs, choice)
    # compiled now: a parameters schema the grammar cannot serve is refused before generation
    return ToolSpec(specs, choice, spec.call_format(max_grammar_size))


def tool_call_text(calls) -> str:
    """An assistant message's tool_calls as the prompt format writes them."""
    if not isinstance(calls, list):
        raise InvalidArgument("tool_calls must be a list")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidArgument(f"tool_calls[{i}] must be {{\"function\": {{\"name\", \"arguments\"}}}}")
        args = fn.get("arguments") or "{}"
        try:
            arguments = json.loads(args) if isinstance(args, str) else args
        except ValueError as exc:
            raise InvalidArgument(f"tool_calls[{i}].function.arguments is not JSON: {exc}") from exc
        out.append(OPEN + json.dumps({"name": fn["name"], "arguments": arguments},
                                     ensure_ascii=False) + CLOSE)
    return "".join(out)
