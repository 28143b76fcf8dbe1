"""Context shift: continuing past the context window by re-rotating cached keys vs recomputing them.

Three measurements with the default model (SmolLM2-135M) and the real engine (`--context-overflow
shift`, server/engine/context.py):

0. Shift cost: the cache left after one shift, rotated in place, vs a fresh prefill of the same
   context, repeated (min and median: robust on a shared machine), at several window sizes.
1. Speed: a chat that already fills the window (system prompt kept, then turns of held-out text)
   continues for N greedy tokens. `rotate` re-rotates the kept cache in place when the window is
   reached; `recompute` drops the same tokens and re-prefills what remains (what an engine without
   RoPE-aware shifting does). Reported: wall time for the N tokens, what the shift itself costs
   (the rotation, or the re-prefill: the stall the user sees), the median decode step.
2. Quality: perplexity of a held-out text (CPython's own docs, `pydoc_data.topics`, shipped with
   every Python) read through a small window with teacher forcing, for the tokens that come after
   the first shift: `rotate` (shifted cache: deeper layers still carry traces of dropped tokens),
   `recompute` (the same visible tokens, cache computed fresh) and `full` (no window: every earlier
   token visible, the lower bound).

    python benchmarks/context_shift.py [--window 2048] [--new-tokens 256] [--ppl-window 512]
        [--ppl-tokens 768] [--keeps 4] [--rounds 3] [--shift-windows 2048,8192] [--reps 5]
        [--skip-shift-cost] [--skip-speed] [--skip-ppl] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

import prefloop.server.engine.llm_engine as engine_module
from prefloop.server.engine.context import ContextConfig
from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.engine.scheduler import SchedulerConfig
from prefloop.server.model.loader import load_model, resolve_model_dir
from prefloop.server.serving.tokenizer import Tokenizer

TOPICS = ("execmodel", "import", "compound", "exceptions", "assignment", "naming")
SYSTEM = "You are a careful assistant who answers questions about the Python language."


def held_out_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in TOPICS if name in topics)


def chat_ids(tok: Tokenizer, text: str, fill: int) -> tuple[list[int], int]:
    """A chat (system + user/assistant turns quoting `text`) of at most `fill` tokens; returns the
    ids and the length of the system part (what the shift keeps)."""
    system = [{"role": "system", "content": SYSTEM}]
    paragraphs = [p for p in text.split("\n\n") if len(p) > 80]
    words = " ".join(paragraphs).split()
    messages, ids, i = list(system), [], 0
    while True:
        turn = [{"role": "user", "content": "Explain this passage: " + paragraphs[i % len(paragraphs)]},
                {"role": "assistant", "content": paragraphs[(i + 1) % len(paragraphs)]}]
        cand = tok.encode_chat(messages + turn + [{"role": "user", "content": "Go on."}])
        if len(cand) > fill:
            break
        messages, ids, i = messages + turn, cand, i + 2
    lo, hi = 0, len(words)  # top up with a last user turn of as many words as fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = tok.encode_chat(messages + [{"role": "user", "content": " ".join(words[:mid])}])
        lo, hi = (mid, hi) if len(cand) <= fill else (lo, mid - 1)
    if lo:
        ids = tok.encode_chat(messages + [{"role": "user", "content": " ".join(words[:lo])}])
    system_ids = tok.encode_chat(system)
    keep = next((j for j, (a, b) in enumerate(zip(system_ids, ids)) if a != b), len(system_ids))
    return ids, keep


def make_engine(model, window: int, keep: int, method: str, discard: int | None = None,
                overflow: str = "shift") -> LLMEngine:
    return LLMEngine(model, KVCacheConfig(block_size=16, capacity_tokens=window + 256),
                     SchedulerConfig(max_num_batched_tokens=512), max_model_len=window,
                     context=ContextConfig(overflow, keep=keep, discard=discard, shift_method=method))


# -- 1. speed ------------------------------------------------------------------------------------

def run_speed(model, prompt: list[int], window: int, keep: int, new_tokens: int, method: str) -> dict:
    engine = make_engine(model, window, keep, method)
    rotate_ms: list[float] = []
    apply, execute = engine.runner.apply_shift, engine.runner.execute
    step_tokens: list[int] = []

    def timed_apply(plan):
        t0 = time.perf_counter()
        apply(plan)
        rotate_ms.append((time.perf_counter() - t0) * 1e3)

    def counted_execute(batch):
        step_tokens.append(sum(item.num_tokens for item in batch))
        return execute(batch)
    engine.runner.apply_shift, engine.runner.execute = timed_apply, counted_execute
    engine.add_request("chat", prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    times, cpu, tokens = [], [], []
    while engine.has_unfinished():
        t0, c0 = time.perf_counter(), time.process_time()
        outs = engine.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        for out in outs:
            tokens.extend(out.new_token_ids)
    first_decode = step_tokens.index(1)  # steps before it: the prompt's prefill (same for both)
    decode = sorted(t for t, n in zip(times[first_decode:], step_tokens[first_decode:]) if n == 1)
    reprefill = [t for t, n in zip(times[first_decode:], step_tokens[first_decode:]) if n > 1]
    reprefill_cpu = [t for t, n in zip(cpu[first_decode:], step_tokens[first_decode:]) if n > 1]
    return {"method": method, "window": window, "prompt_tokens": len(prompt), "keep": keep,
            "discard": engine.shift_discard, "new_tokens": len(tokens), "shifts": engine.num_context_shifts,
            "prefill_s": sum(times[:first_decode]), "continue_s": sum(times[first_decode:]),
            "continue_cpu_s": sum(cpu[first_decode:]), "recompute_cpu_s": sum(reprefill_cpu),
            "median_decode_ms": decode[len(decode) // 2] * 1e3,
            "recompute_s": sum(reprefill), "recomputed_tokens": sum(n for n in step_tokens[first_decode:] if n > 1),
            "rotate_ms": rotate_ms, "tokens": tokens}


def run_shift_cost(model, prompt: list[int], window: int, keep: int, reps: int) -> dict:
    """The shift alone, repeated: rotating the cache that remains after one shift vs re-prefilling the
    same context from scratch (chunks of 512, prefix caching off). Min and median of `reps`."""
    engine = make_engine(model, window, keep, "rotate")
    plans = []
    apply = engine.runner.apply_shift

    def keep_plan(plan):
        plans.append(plan)
        apply(plan)
    engine.runner.apply_shift = keep_plan
    engine.add_request("chat", prompt, SamplingParams(temperature=0, max_tokens=window, ignore_eos=True))
    seq = engine.requests["chat"].seqs[0]
    while not plans:
        engine.step()
    context = seq.context_ids[:seq.num_computed]
    rotate_ms, prefill_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        apply(plans[0])  # the same slots again: same work
        rotate_ms.append((time.perf_counter() - t0) * 1e3)
        fresh = LLMEngine(model, KVCacheConfig(block_size=16, capacity_tokens=window + 256,
                                               enable_prefix_caching=False),
                          SchedulerConfig(max_num_batched_tokens=512), max_model_len=window)
        fresh.add_request("r", context, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        while fresh.has_unfinished():
            fresh.step()
        prefill_s.append(time.perf_counter() - t0)
    engine.abort("chat")
    rotate_ms.sort()
    prefill_s.sort()
    return {"window": window, "kept_tokens": len(context), "moved_slots": len(plans[0].move_src),
            "layers": model.config.num_layers, "rotate_ms_min": rotate_ms[0],
            "rotate_ms_median": rotate_ms[reps // 2], "reprefill_s_min": prefill_s[0],
            "reprefill_s_median": prefill_s[reps // 2]}


def median_of(runs: list[dict], key: str) -> float:
    return sorted(r[key] for r in runs)[len(runs) // 2]


# -- 2. quality ----------------------------------------------------------------------------------

class TeacherForcing:
    """Stands in for the engine's sampler: records -log p(true next token) and feeds the true one."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.nll: dict[int, float] = {}

    def __call__(self, logits: torch.Tensor, rows: list) -> list[int]:
        out = []
        for row, seq in zip(logits, rows):
            i = len(seq.token_ids)  # index of the token being predicted
            target = self.ids[i]
            self.nll[i] = float(-torch.log_softmax(row.float(), -1)[target])
            out.append(target)
        return out


def run_ppl(model, ids: list[int], window: int, keep: int, method: str, start: int = 16) -> dict:
    """Teacher-forced pass over ids: the first `start` tokens as the prompt, then one token a step."""
    if method == "full":
        engine = make_engine(model, len(ids) + 16, keep, "rotate", overflow="error")
    else:
        engine = make_engine(model, window, keep, method)
    forcing = TeacherForcing(ids)
    original = engine_module.sample
    engine_module.sample = forcing
    try:
        t0 = time.perf_counter()
        engine.generate({"ppl": (ids[:start], SamplingParams(temperature=0, max_tokens=len(ids) - start,
                                                              ignore_eos=True))})
        seconds = time.perf_counter() - t0
    finally:
        engine_module.sample = original

    def ppl(lo, hi):
        vals = [forcing.nll[i] for i in range(lo, hi)]
        return math.exp(sum(vals) / len(vals))
    return {"method": method, "keep": keep, "window": window, "discard": engine.shift_discard,
            "shifts": engine.num_context_shifts, "seconds": seconds,
            "ppl_before_window": ppl(start, window), "ppl_after_window": ppl(window, len(ids)),
            "nll": [forcing.nll[i] for i in range(start, len(ids))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=2048, help="context window for the speed run")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--ppl-window", type=int, default=512, help="context window for the perplexity run")
    ap.add_argument("--ppl-tokens", type=int, default=768, help="tokens scored after the window is full")
    ap.add_argument("--keeps", default="4", help="comma-separated n_keep values for the perplexity run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating speed runs per method")
    ap.add_argument("--shift-windows", default="2048,8192", help="windows for the shift-cost run")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the shift-cost run")
    ap.add_argument("--skip-shift-cost", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model_dir(None)
    model = load_model(model_dir)
    tok = Tokenizer(model_dir)
    text = held_out_text()
    result = {"python": platform.python_version(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": model_dir.name}
    if not args.skip_shift_cost:
        rows = []
        for window in [int(w) for w in args.shift_windows.split(",")]:
            prompt, keep = chat_ids(tok, text, window - 16)
            rows.append(run_shift_cost(model, prompt, window, keep, args.reps))
            print(f"  shift cost at {window}: {rows[-1]}", file=sys.stderr, flush=True)
        result["shift_cost"] = rows
        print(f"\n## shift cost: the context left after one shift, rotated in place vs re-prefilled "
              f"(min / median of {args.reps})")
        print("| window | tokens kept after the shift | rotate ms | re-prefill s | ratio |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['window']} | {r['kept_tokens']} | {r['rotate_ms_min']:.1f} / {r['rotate_ms_median']:.1f} | "
                  f"{r['reprefill_s_min']:.2f} / {r['reprefill_s_median']:.2f} | "
                  f"{r['reprefill_s_min'] * 1e3 / r['rotate_ms_min']:.0f}x |")
    if not args.skip_speed:
        prompt, keep = chat_ids(tok, text, args.window - 48)
        runs = {"rotate": [], "recompute": []}
        for _ in range(args.rounds):  # alternate, so load drifts on a shared machine hit both alike
            for method in runs:
                runs[method].append(run_speed(model, prompt, args.window, keep, args.new_tokens, method))
                print(f"  speed {method}: {runs[method][-1]['continue_s']:.1f} s", file=sys.stderr, flush=True)
        same = sum(a == b for a, b in zip(runs["rotate"][0]["tokens"], runs["recompute"][0]["tokens"]))
        print(f"\n## speed: window {args.window}, chat of {len(prompt)} tokens (system prompt {keep} kept), "
              f"{args.new_tokens} new greedy tokens; discard {runs['rotate'][0]['discard']} per shift; "
              f"median of {args.rounds} alternating runs")
        print("| method | shifts | continue s (wall) | tokens/s | continue CPU s | shift cost (wall) | "
              "shift cost (CPU s) | median decode step ms |")
        print("|---|---:|---:|---:|---:|---|---:|---:|")
        for method, rs in runs.items():
            cont = median_of(rs, "continue_s")
            if method == "rotate":
                cost = f"rotation {sorted(x for r in rs for x in r['rotate_ms'])[len(rs) // 2]:.1f} ms"
                cost_cpu = "-"
            else:
                cost = f"re-prefill of {rs[0]['recomputed_tokens']} tokens {median_of(rs, 'recompute_s'):.2f} s"
                cost_cpu = f"{median_of(rs, 'recompute_cpu_s'):.2f}"
            print(f"| {method} | {rs[0]['shifts']} | {cont:.2f} | {rs[0]['new_tokens'] / cont:.1f} | "
                  f"{median_of(rs, 'continue_cpu_s'):.2f} | {cost} | {cost_cpu} | "
                  f"{median_of(rs, 'median_decode_ms'):.1f} |")
        for method, rs in runs.items():
            print(f"{method} runs, continue s (wall): " + ", ".join(f"{r['continue_s']:.1f}" for r in rs))
        print(f"greedy tokens identical between the two: {same}/{len(runs['rotate'][0]['tokens'])}")
        for rs in runs.values():
            for r in rs:
                del r["tokens"]
        result["speed"] = runs
    if not args.skip_ppl:
        ids = tok.encode(text)[:args.ppl_window + args.ppl_tokens]
        rows = []
        for keep in [int(k) for k in args.keeps.split(",")]:
            for method in ("rotate", "recompute"):
                rows.append(run_ppl(model, ids, args.ppl_window, keep, method))
                print(f"  ppl {method} keep {keep}: {rows[-1]['ppl_after_window']:.3f} "
                      f"({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
        rows.append(run_ppl(model, ids, args.ppl_window, 0, "full"))
        result["perplexity"] = rows
        print(f"\n## perplexity: {len(ids)} tokens of CPython docs, window {args.ppl_window}, "
              f"teacher forcing; 'after' = the {len(ids) - args.ppl_window} tokens after the window filled")
        print("| cache | keep | shifts | ppl before window | ppl after window | seconds |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['keep'] if r['method'] != 'full' else '-'} | {r['shifts']} | "
                  f"{r['ppl_before_window']:.3f} | {r['ppl_after_window']:.3f} | {r['seconds']:.1f} |")
        for r in rows:
            r["nll"] = [round(x, 4) for x in r["nll"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
