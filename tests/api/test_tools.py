"""Tool calling's request checks, prompt format, answer parsing and stream hold-back
(server/api/tools.py, openai_compat) without a model; the real server runs it in test_http_real."""
import json

import pytest

from prefloop.server.api import openai_compat as oa
from prefloop.server.api.http_openai import ToolCallStream
from prefloop.server.api.tools import parse_tools
from prefloop.server.errors import InvalidArgument

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


def test_auto_parses_tool_call_blocks_and_leaves_text_alone():
    spec = parse_tools({"tools": [WEATHER, TIME]})
    assert spec.choice == "auto" and spec.format is None and spec.log_key == "tools:auto:get_weather,get_time"
    calls = spec.parse(' <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
                       '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    assert spec.parse("It is sunny in Oslo.") is None
    assert spec.parse('<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>') is None
    assert spec.parse('<tool_call>{"name": "get_weather", "argu') is None  # cut


def test_required_and_named_choices_compile_a_call_grammar():
    named = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}})
    assert named.choice == "get_time" and named.format.kind == "json_schema"
    schema = json.loads(named.format.schema)
    assert schema["properties"]["name"] == {"const": "get_time"}
    required = parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert len(json.loads(required.format.schema)["anyOf"]) == 2
    calls = required.parse('{"arguments": {"city": "Oslo"}, "name": "get_weather"}')
    assert calls[0]["function"]["name"] == "get_weather"
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert parse_tools({}) is None


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": "auto"}, "tool_choice needs tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools\\[0\\] must be"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "letters, digits"),
    ({"tools": [WEATHER, WEATHER]}, "same name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'nope', which is not in tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
      "tool_choice": "required"}, "Unimplemented keys"),
])
def test_bad_tool_requests_are_refused_naming_the_field(body, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_tools(body)


def test_chat_request_renders_tools_and_earlier_calls_in_the_prompt_format():
    req = oa.parse_chat({"tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"}]})
    assert req.messages[2] == {"role": "assistant", "content":
                               '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'}
    assert req.messages[3] == {"role": "tool", "content": "12 C, rain"}
    rendered = req.tools.render(req.messages)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in rendered[0]["content"] and "<tool_call>" in rendered[0]["content"]
    assert rendered[1:] == req.messages[1:]
    with pytest.raises(InvalidArgument, match="leave response_format unset"):
        oa.parse_chat({"tools": [WEATHER], "tool_choice": "required", "messages": ASK,
                       "response_format": {"type": "json_object"}})


def test_chat_response_carries_tool_calls_with_null_content():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = oa.chat_response("req-1", "prefloop", "v0000", [
        {"index": 0, "text": "<tool_call>...", "finish_reason": "tool_calls", "response_id": "r",
         "model_version": "v0000", "completion_tokens": 5, "tool_calls": calls}], 10)
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": calls}
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_holds_back_a_call_and_lets_text_through():
    held = ToolCallStream(parse_tools({"tools": [WEATHER]}))
    pieces = ['<tool', '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}', '</tool_call>']
    out = [held.push(0, p, None) for p in pieces[:-1]] + [held.push(0, pieces[-1], "stop")]
    assert out[:-1] == [({}, None)] * 3
    body, finish = out[-1]
    assert finish == "tool_calls" and body["tool_calls"][0]["index"] == 0
    assert json.loads(body["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    # a plain answer: held only while it could be a call, then streamed as it comes
    assert held.push(1, "<", None) == ({}, None)
    assert held.push(1, "b>Sunny", None) == ({"content": "<b>Sunny"}, None)
    assert held.push(1, " today", "stop") == ({"content": " today"}, "stop")
    # a call cut by max_tokens comes out as text with its reason
    assert held.push(2, '<tool_call>{"name": "get_w', "length") == (
        {"content": '<tool_call>{"name": "get_w'}, "length")
