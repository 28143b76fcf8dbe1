"""What a request asks its output to be: any JSON object, or JSON valid under a JSON Schema.

`ResponseFormat` is the constraint as the engines see it (from OpenAI's `response_format` or the
gRPC `SamplingParams.response_format`); `check_response_format` compiles its grammar without a
tokenizer (milliseconds, before the request reaches an engine) and turns an unsupported or broken
schema into InvalidArgument naming the problem. The native engine applies it with llguidance
(server/engine/grammar.py); vLLM gets the schema as its structured-output parameter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prefloop.server.errors import InvalidArgument

MAX_SCHEMA_BYTES = 64 * 1024  # a schema larger than this is refused before compiling
DEFAULT_MAX_GRAMMAR_SIZE = 200_000  # llguidance symbols; its own default is 500_000
# llguidance's JSON compiler: no whitespace between tokens (short outputs; a small model left
# free to emit whitespace may loop on newlines), separators as `json.dumps` writes them.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A request's output constraint; `schema` is canonical JSON (sorted keys) or None."""

    kind: str
    schema: str | None = None
    name: str = ""

    @classmethod
    def json_object(cls) -> "ResponseFormat":
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict, name: str = "") -> "ResponseFormat":
        if not isinstance(schema, dict):
            raise InvalidArgument("json_schema.schema must be a JSON Schema object")
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise InvalidArgument(f"json_schema.schema is {len(text.encode())} bytes; the limit is "
                                  f"{MAX_SCHEMA_BYTES}")
        return cls("json_schema", text, name)


    @property
    def key(self) -> str:
        """What the generation log records: the kind, and for a schema its sha256 (16 hex)."""
        if self.schema is None:
            return self.kind
        return f"{self.kind}:{hashlib.sha256(self.schema.encode()).hexdigest()[:16]}"

    def grammar(self) -> str:
        from llguidance import LLMatcher

        schema = json.loads(self.schema) if self.schema is not None else {"type": "object"}
        try:
            return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidArgument(f"json_schema.schema: {exc}") from exc


def limits(max_grammar_size: int):
    from llguidance import LLParserLimits

    return LLParserLimits(max_grammar_size=max_grammar_size, verbose_errors=False)


def check_grammar(grammar: str, tokenizer, max_grammar_size: int) -> None:
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(
        grammar, tokenizer, limits=limits(max_grammar_size))
    if is_error:
        message = short_error(messages[0])
        if message.startswith("grammar size"):
            raise InvalidArgument(f"json_schema.schema is too large: {message}; the server's "
                                  f"--max-grammar-size is {max_grammar_size}")
        raise InvalidArgument(f"json_schema.schema is not supported: {message}")


def short_error(message: str) -> str:
    """llguidance's first line, without its internal context."""
    return message.strip().splitlines()[0][:300]


def check_response_format(fmt: ResponseFormat, max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE
                          ) -> None:
    """Raise InvalidArgument naming what is wrong with `fmt`'s schema (no tokenizer needed)."""
    check_grammar(fmt.grammar(), None, max_grammar_size)


def parse_response_format(kind: object, schema: object = None, name: object = "",
                          max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> ResponseFormat | None:
    """A request's constraint from its wire fields (None for "text"), checked: an unknown type, a
    schema that is not an object, or one llguidance cannot compile is InvalidArgument naming it."""
    if kind in (None, "", "text"):
        return None
    if kind == "json_object":
        return ResponseFormat.json_object()
    if kind != "json_schema":
        raise InvalidArgument(f"response_format.type must be text, json_object or json_schema, "
                              f"got {kind!r}")
    if schema is None:
        raise InvalidArgument("response_format json_schema needs json_schema.schema (a JSON Schema "
                              "object)")
    if not isinstance(name, str):
        raise InvalidArgument("json_schema.name must be a string")
    fmt = ResponseFormat.json_schema(schema, name)
    check_response_format(fmt, max_grammar_size)
    return fmt
