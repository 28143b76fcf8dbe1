"""Structured outputs in the native engine (server/engine/grammar.py, response_format.py): the
logits mask against llguidance's own per-token answer, a suite of 32 schemas on the default model
(greedy and sampled: every output parses and validates with jsonschema), json_object, a schema
compiled once, free-text rows in the same batch untouched, and bad schemas refused by name."""
import json

import jsonschema
import pytest
import torch
from schema_suite import SCHEMAS, validate

from prefloop.server.engine.grammar import GrammarCompiler, apply_masks
from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.response_format import (
    MAX_SCHEMA_BYTES,
    ResponseFormat,
    parse_response_format,
)
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.engine.scheduler import SchedulerConfig
from prefloop.server.errors import InvalidArgument
from prefloop.server.model.loader import load_model, resolve_model_dir
from prefloop.server.serving.build import _eos_ids
from prefloop.server.serving.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def served():
    """The default model's engine with its grammar compiler, and its tokenizer."""
    model_dir = resolve_model_dir(None)
    tok = Tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32")
    eos = _eos_ids(model_dir, model.config.eos_token_ids, tok)
    grammar = GrammarCompiler.for_model(model_dir, model.config.vocab_size, eos)
    engine = LLMEngine(model, KVCacheConfig(capacity_tokens=64 * 720), SchedulerConfig(max_num_seqs=64),
                       eos_token_ids=eos, grammar=grammar)
    return engine, tok


def chat(tok, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": f"{text} Answer in JSON."}])


def test_mask_allows_exactly_the_tokens_llguidance_allows(served):
    engine, tok = served
    fmt = parse_response_format("json_schema", {"type": "object", "properties": {
        "color": {"enum": ["red", "green"]}}, "required": ["color"]})
    matcher = engine.grammar.matcher(fmt)
    for token in tok.encode('{"color": "'):  # a few steps into the grammar
        assert matcher.consume_token(token)
    vocab = engine.model.config.vocab_size
    logits = torch.randn(2, vocab)
    before = logits.clone()

    class Row:
        def __init__(self, m):
            self.matcher = m
    logits = apply_masks(logits, [Row(None), Row(matcher)])
    assert torch.equal(logits[0], before[0])  # the free row is untouched
    bias = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[:vocab]
    allowed = torch.isfinite(logits[1])
    assert torch.equal(allowed, bias > 0)  # one bit per token, the same set as llguidance's bytes
    assert 0 < int(allowed.sum()) < 10  # "r"/"g" continuations only
    assert torch.equal(logits[1][allowed], before[1][allowed])


def test_every_suite_schema_parses_and_validates_greedy_and_every_other_sampled(served):
    """Every schema of the suite greedy (each grammar constrains a whole answer), every other
    one sampled too (the masking under sampling is the same code for every schema; sampling all
    of them took ~50 s more of the suite)."""
    engine, tok = served
    assert len(SCHEMAS) >= 30
    requests = {}
    for i, (name, prompt, schema) in enumerate(SCHEMAS):
        fmt = parse_response_format("json_schema", schema, name)
        requests[f"{name}/greedy"] = (chat(tok, prompt), SamplingParams(
            temperature=0, max_tokens=640, response_format=fmt))
        if i % 2 == 0:
            requests[f"{name}/sampled"] = (chat(tok, prompt), SamplingParams(
                temperature=1.0, top_p=0.95, seed=5, max_tokens=640, response_format=fmt))
    results = engine.generate(requests)
    schemas = {name: schema for name, _, schema in SCHEMAS}
    failures = []
    for rid, outs in results.items():
        text = tok.decode(outs[0], skip_special_tokens=True)
        try:
            validate(schemas[rid.split("/")[0]], json.loads(text))
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{rid}: {text!r}: {exc}")
    assert not failures, "\n".join(failures)
    assert engine.grammar.compiled >= len(SCHEMAS)


def test_json_object_gives_an_object_and_a_schema_compiles_once(served):
    engine, tok = served
    compiled = engine.grammar.compiled
    fmt = parse_response_format("json_object")
    schema_fmt = parse_response_format("json_schema", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False})
    out = engine.generate({
        "obj": (chat(tok, "Describe Paris in a few keys."),
                SamplingParams(temperature=0, max_tokens=200, response_format=fmt)),
        **{f"s{i}": (chat(tok, f"Name city number {i}."),
                     SamplingParams(temperature=0, max_tokens=64, response_format=schema_fmt))
           for i in range(3)}})
    assert isinstance(json.loads(tok.decode(out["obj"][0], skip_special_tokens=True)), dict)
    for i in range(3):
        assert set(json.loads(tok.decode(out[f"s{i}"][0], skip_special_tokens=True))) == {"city"}
    assert engine.grammar.compiled == compiled + 2  # json_object and the schema, once each


def test_free_text_requests_beside_a_constrained_one_get_the_same_tokens(served):
    engine, tok = served
    free = {f"f{i}": (chat(tok, q), SamplingParams(temperature=0, max_tokens=24))
            for i, q in enumerate(["Tell me about owls.", "What is rain?"])}
    alone = engine.generate(dict(free))
    fmt = parse_response_format("json_object")
    mixed = engine.generate({**free, "json": (chat(tok, "Describe owls."), SamplingParams(
        temperature=0, max_tokens=24, response_format=fmt))})
    assert {k: mixed[k] for k in free} == alone
    assert tok.decode(mixed["json"][0]).startswith("{")


@pytest.mark.parametrize("kind, schema, message", [
    ("xml", None, "type must be text, json_object or json_schema, got 'xml'"),
    ("json_schema", None, "needs json_schema.schema"),
    ("json_schema", ["not", "an", "object"], "must be a JSON Schema object"),
    ("json_schema", {"not": {"type": "string"}}, 'not supported: Unimplemented keys: \\["not"\\]'),
    ("json_schema", {"type": "strin"}, "not supported: Invalid type: strin"),
    ("json_schema", {"$ref": "#/$defs/missing"}, "not supported: .*missing"),
    ("json_schema", {"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)}, "bytes; the limit is"),
])
def test_bad_response_formats_are_refused_naming_the_problem(kind, schema, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_response_format(kind, schema)


def test_a_grammar_over_the_size_limit_is_refused_naming_the_flag():
    schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(20)}}
    assert parse_response_format("json_schema", schema).kind == "json_schema"
    with pytest.raises(InvalidArgument, match="too large.*--max-grammar-size is 10"):
        parse_response_format("json_schema", schema, max_grammar_size=10)


def test_text_is_no_constraint_and_keys_name_the_schema():
    assert parse_response_format("text") is None and parse_response_format(None) is None
    a = ResponseFormat.json_schema({"b": 1, "a": 2})
    b = ResponseFormat.json_schema({"a": 2, "b": 1})
    assert a.key == b.key and a.key.startswith("json_schema:") and len(a.key) == len("json_schema:") + 16
    assert ResponseFormat.json_object().key == "json_object"


def test_an_engine_without_a_tokenizer_refuses_structured_outputs(served):
    engine, tok = served
    bare = LLMEngine(engine.model, KVCacheConfig(capacity_tokens=512))
    with pytest.raises(InvalidArgument, match="no tokenizer.json"):
        bare.validate(chat(tok, "hi"), SamplingParams(response_format=ResponseFormat.json_object()))
