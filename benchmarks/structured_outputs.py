"""Structured outputs on the native engine: what a JSON Schema costs, side by side in one run.

1. Grammar libraries on the default model's tokenizer, for the 32 schemas of tests/schema_suite.py:
   compile time per schema and time per token mask, llguidance (what the engine uses) vs xgrammar
   (vLLM's default; only where it is installed), walking each schema's greedy answer.
2. The engine at 1 / 8 / 32 streams, greedy, every stream exactly N tokens: free text vs every
   stream constrained (a JSON array too long to finish in N tokens, so batches keep their size).
3. A free-text stream in a batch of constrained ones vs in a batch of free ones (its own tokens/s,
   same batch size and lengths): the cost the mask puts on requests that did not ask for it.

    python benchmarks/structured_outputs.py [--streams 1,8,32] [--max-tokens 64] [--dtype float32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from schema_suite import SCHEMAS  # noqa: E402


def library_costs(model_dir: Path, vocab: int, eos: tuple[int, ...], answers: dict[str, list[int]]):
    from prefloop.server.engine.grammar import GrammarCompiler
    from prefloop.server.engine.response_format import parse_response_format

    rows = {}
    compiler = GrammarCompiler.for_model(model_dir, vocab, eos)
    compiler.tokenizer  # built once, not timed per schema
    compile_s, mask_s = [], []
    import torch
    words = (vocab + 31) // 32
    buf = torch.empty(words, dtype=torch.int32)
    for name, _, schema in SCHEMAS:
        fmt = parse_response_format("json_schema", schema, name)
        t = time.perf_counter()
        matcher = compiler.matcher(fmt)
        compile_s.append(time.perf_counter() - t)
        for token in answers[name]:
            t = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(buf.data_ptr(), words * 4)
            mask_s.append(time.perf_counter() - t)
            if not matcher.consume_token(token):
                break
    rows["llguidance"] = (compile_s, mask_s)
    try:
        import xgrammar as xgr
        from transformers import AutoTokenizer
    except ImportError:
        return rows
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(model_dir), vocab_size=vocab)
    xc = xgr.GrammarCompiler(info, cache_enabled=False)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    compile_s, mask_s = [], []
    import json
    for name, _, schema in SCHEMAS:
        t = time.perf_counter()
        compiled = xc.compile_json_schema(json.dumps(schema), any_whitespace=False)
        matcher = xgr.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - t)
        for token in answers[name]:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            mask_s.append(time.perf_counter() - t)
            if not matcher.accept_token(token):
                break
    rows["xgrammar"] = (compile_s, mask_s)
    return rows


def run(engine, requests: dict) -> tuple[float, dict[str, float]]:
    """Aggregate tokens/s, and each request's tokens / wall time."""
    t = time.perf_counter()
    out = engine.generate(requests)
    wall = time.perf_counter() - t
    return sum(len(v[0]) for v in out.values()) / wall, {k: len(v[0]) / wall for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,8,32", help="batch sizes (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer at most (default %(default)s)")
    ap.add_argument("--dtype", default="float32", help="model dtype (default %(default)s)")
    args = ap.parse_args()
    from prefloop.server.engine.grammar import GrammarCompiler
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.llm_engine import LLMEngine
    from prefloop.server.engine.response_format import parse_response_format
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.engine.scheduler import SchedulerConfig
    from prefloop.server.model.loader import load_model, resolve_model_dir
    from prefloop.server.serving.build import _eos_ids
    from prefloop.server.serving.tokenizer import Tokenizer

    levels = [int(x) for x in args.streams.split(",")]
    print(f"structured_outputs: {len(SCHEMAS)} schemas, streams {args.streams}, {args.max_tokens} "
          f"tokens, {args.dtype}", flush=True)
    model_dir = resolve_model_dir(None)
    tok = Tokenizer(model_dir)
    model = load_model(model_dir, dtype=args.dtype)
    eos = _eos_ids(model_dir, model.config.eos_token_ids, tok)
    engine = LLMEngine(model, KVCacheConfig(capacity_tokens=max(levels) * (args.max_tokens + 96) + 512),
                       SchedulerConfig(max_num_seqs=max(levels)), eos_token_ids=eos,
                       grammar=GrammarCompiler.for_model(model_dir, model.config.vocab_size, eos))
    fmts = {name: parse_response_format("json_schema", schema, name) for name, _, schema in SCHEMAS}

    def prompt(i: int) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": f"{SCHEMAS[i % len(SCHEMAS)][1]} Answer in JSON."}])

    warm = {f"w{i}": (prompt(i), SamplingParams(temperature=0, max_tokens=256,
                                                 response_format=fmts[SCHEMAS[i][0]]))
            for i in range(len(SCHEMAS))}  # each suite schema's greedy answer, for part 1
    answers = {SCHEMAS[int(k[1:])][0]: v[0] for k, v in engine.generate(warm).items()}

    print("\n1. grammar libraries (per schema compile, per token mask; median / p90, ms):")
    for lib, (compile_s, mask_s) in library_costs(model_dir, model.config.vocab_size, eos, answers).items():
        q = statistics.quantiles
        print(f"  {lib:<11} compile {statistics.median(compile_s) * 1e3:7.2f} / {q(compile_s, n=10)[-1] * 1e3:7.2f}"
              f"   mask {statistics.median(mask_s) * 1e3:6.3f} / {q(mask_s, n=10)[-1] * 1e3:6.3f}"
              f"   ({len(mask_s)} masks)")

    # every stream decodes exactly --max-tokens: free ones ignore EOS, constrained ones follow a
    # JSON array too long to complete, so both batches keep their size and only the mask differs
    endless = parse_response_format("json_schema", {"type": "array", "minItems": 400, "items": {
        "type": "integer", "minimum": 0, "maximum": 999}}, "endless")
    free_p = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    json_p = SamplingParams(temperature=0, max_tokens=args.max_tokens, response_format=endless)
    run(engine, {"w": (prompt(0), json_p)})

    print(f"\n2. engine tokens/s, {args.max_tokens} tokens per stream, free text vs every stream "
          "constrained (greedy):")
    print(f"  {'streams':>7} {'free':>8} {'schema':>8} {'ratio':>6}")
    for n in levels:
        free, _ = run(engine, {f"f{i}": (prompt(i), free_p) for i in range(n)})
        constrained, _ = run(engine, {f"c{i}": (prompt(i), json_p) for i in range(n)})
        print(f"  {n:7d} {free:8.1f} {constrained:8.1f} {constrained / free:6.2f}")

    print("\n3. one free-text stream beside free streams vs beside constrained ones (its tokens/s):")
    print(f"  {'streams':>7} {'beside free':>12} {'beside JSON':>12} {'ratio':>6}")
    for n in [x for x in levels if x > 1]:
        _, a = run(engine, {"probe": (prompt(0), free_p),
                            **{f"f{i}": (prompt(i), free_p) for i in range(1, n)}})
        _, b = run(engine, {"probe": (prompt(0), free_p),
                            **{f"c{i}": (prompt(i), json_p) for i in range(1, n)}})
        print(f"  {n:7d} {a['probe']:12.1f} {b['probe']:12.1f} {b['probe'] / a['probe']:6.2f}")
    print("structured_outputs: done (ratios are the result; one run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
