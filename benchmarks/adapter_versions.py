"""A version as a LoRA adapter vs as full weights: disk, load (swap) time, and the same answers.

One registry in a temporary folder: v0000 the default model (or `--model`); a LoRA adapter with
the align job's settings (rank `--rank` 16, alpha 32, every linear layer of every block, random
non-zero weights the size a trained one has) published twice through the align job's own
`publish`: v0001 as the adapter (today's default), v0002 as merged full weights (`--publish full`,
what every LoRA job published before). Then, side by side in one run:

- bytes on disk of each version;
- seconds to load each version into the native engine (`load_backend`, the step of a hot-swap or
  an A/B start before the first answer), `--runs` times each, alternating; median and the ratio;
- greedy continuations of the benchmark prompts from both: equal token for token (the adapter is
  merged into the base at load, so the served weights are the same up to float rounding);
- an A/B test's memory: the process's RSS serving v0000 alone, then with v0001 loaded beside it
  as an A/B candidate (a per-request adapter on the same engine), then with v0002 (full weights:
  a second engine with its own KV cache, as every candidate was before);
- a hot-swap from v0000 to each, `--runs` times alternating, from the `swap` call to the first
  token of a request on the new version: the adapter needs no load (the serving engine runs it
  as a per-request adapter), the full version loads a second engine;
- decode throughput at `--streams` (1, 8, 32) of the plain base engine vs the same engine with
  every sequence on one adapter (an adapter version is CURRENT), with two adapters alternating
  (mixed adapters in one batch: an A/B test between adapter versions) and with one adapter
  alternating with the plain weights (an A/B test whose control is a full version): one model,
  an engine per configuration over it, stepped one step each in turn; `--decode-repeats` runs,
  median shown (`--decode-only`: just this table);
  `--lora-update both` measures the native kernel's update and torch ops' side by side.

    python benchmarks/adapter_versions.py [--runs 5] [--rank 16] [--prompts 4] [--max-tokens 32]
                                          [--streams 1,8,32] [--decode-tokens 64]
                                          [--decode-repeats 3] [--decode-only]
                                          [--lora-update native|torch|both]
    python benchmarks/adapter_versions.py --profile-streams 8   # where a step's time goes
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def publish_both(registry, base_dir: Path, rank: int, seed: int = 0) -> tuple[str, str]:
    from peft import LoraConfig, get_peft_model

    from prefloop.align.jobs.runner import publish
    from prefloop.align.train.common import LORA_TARGETS, load_causal_lm, lora_adapter, plain_weights

    torch.manual_seed(seed)
    peft_model = get_peft_model(load_causal_lm(base_dir), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
        init_lora_weights=False))
    with torch.no_grad():  # a trained adapter's size, a small step's effect
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.05)
    adapter = lora_adapter(peft_model)
    merged = plain_weights(peft_model, lora=True)
    common = dict(kind="policy", method="dpo", parent="v0000", hyperparameters={"lora_r": rank},
                  data={}, metrics={}, gate=None, job_id="bench")
    v_adapter = publish(registry, merged, base_dir, adapter=adapter, **common)
    v_full = publish(registry, merged, base_dir, adapter=None, **common)
    return v_adapter, v_full


def load_seconds(model_dir: Path, version: str) -> tuple[float, object]:
    from prefloop.server.engine.context import ContextConfig
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.scheduler import SchedulerConfig
    from prefloop.server.serving.build import load_backend

    started = time.perf_counter()
    backend = load_backend(model_dir, version, dtype="bfloat16", device="cpu",
                           cache=KVCacheConfig(capacity_tokens=2048), scheduler=SchedulerConfig(),
                           context=ContextConfig())
    return time.perf_counter() - started, backend


def greedy(backend, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from prefloop.server.engine.sampling_params import SamplingParams

    engine = backend.engine.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = engine.generate({str(i): (p, params) for i, p in enumerate(prompts)})
    return [out[str(i)][0] for i in range(len(prompts))]


def ab_memory(registry, v_adapter: str, v_full: str) -> dict[str, float]:
    """RSS (MB) serving v0000 alone, with the adapter candidate beside it, with the full one."""
    import asyncio
    import gc

    from prefloop.server.serving.build import build_generator
    from prefloop.server.serving.memory import release_freed_memory, rss_bytes

    async def run() -> dict[str, float]:
        control = build_generator(model=str(registry.version_dir("v0000")),
                                  model_version="v0000", dtype="bfloat16")
        await control.start()
        release_freed_memory("warm-up")
        out = {"alone": rss_bytes() / 2**20}
        for label, version in (("adapter candidate", v_adapter), ("full candidate", v_full)):
            candidate = await control.load_beside(registry.version_dir(version), version)
            out[label] = rss_bytes() / 2**20
            out[label + " kind"] = type(candidate).__name__
            await candidate.close()
            del candidate
            gc.collect()
            release_freed_memory(label)
        await control.close()
        return out

    return asyncio.run(run())


def swap_seconds(registry, versions: list[str], runs: int, prompt: list[int]) -> dict:
    """Seconds from `Generator.swap(v0000 -> version)` to the first token of a request on it."""
    import asyncio

    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.serving.build import build_generator

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def run() -> dict[str, list[float]]:
        generator = build_generator(model=str(registry.version_dir("v0000")),
                                    model_version="v0000", dtype="bfloat16")
        await generator.start()
        out: dict[str, list[float]] = {v: [] for v in versions}
        for i in range(runs):
            for v in versions if i % 2 == 0 else versions[::-1]:
                started = time.perf_counter()
                await generator.swap(registry.version_dir(v), v)
                stream = generator.stream(f"{v}-{i}", prompt, params)
                first = await anext(stream)
                out[v].append(time.perf_counter() - started)
                assert first.model_version == v
                async for _ in stream:
                    pass
                await generator.swap(registry.version_dir("v0000"), "v0000")
                for thread in generator._retiring:
                    await asyncio.to_thread(thread.join)
        await generator.close()
        return out

    return asyncio.run(run())


def decode_tok_s(model_dir: Path, mixes: dict[str, list[dict | None]], streams: int, tokens: int,
                 native: bool = True) -> dict[str, float]:
    """Decode tokens/s of `streams` sequences (after their prefill) for each mix of `mixes`, each
    sequence on an adapter of its mix's factors in turn (an empty list or None entries: the plain
    base). One model in memory; one engine per mix over it (its own KV cache), the engines
    stepped one step each in turn, so that every mix meets the same moments of this noisy VM;
    tokens/s = tokens produced / seconds spent in the mix's own steps. `native=False` runs the
    LoRA update in torch ops instead of the native kernel."""
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.llm_engine import LLMEngine
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.model import lora
    from prefloop.server.model.loader import load_model

    model = load_model(model_dir, dtype="bfloat16")
    if not native:
        lora.enable(model, use_kernel=False)  # wrappers without the kernel, kept after
    cache = KVCacheConfig(capacity_tokens=streams * (tokens + 64) + 1024)
    engines, ids, added = {}, {}, {}
    first = None
    for name, factors in mixes.items():
        engine = LLMEngine(model, cache)
        if first is None:
            first = engine
        engine.adapters = first.adapters  # the adapters live in the shared model
        for f in factors:
            if f is not None and id(f) not in added:
                added[id(f)] = first.add_adapter(f)
        ids[name] = [added[id(f)] if f is not None else 0 for f in factors]
        engines[name] = engine
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for name, engine in engines.items():
        for i in range(streams):
            engine.add_request(str(i), [1 + (i * 7 + j) % 1000 for j in range(32)], params,
                               adapter=ids[name][i % len(ids[name])] if ids[name] else 0)
        while any(s.num_computed < s.prompt_len for s in engine.scheduler.running) \
                or engine.scheduler.waiting:
            engine.step()  # prefill (and the first tokens) before the clock starts
    produced = dict.fromkeys(engines, 0)
    spent = dict.fromkeys(engines, 0.0)
    turn = 0
    while any(e.has_unfinished() for e in engines.values()):
        names = list(engines) if turn % 2 == 0 else list(engines)[::-1]
        turn += 1
        for name in names:
            if engines[name].has_unfinished():
                started = time.perf_counter()
                produced[name] += sum(len(o.new_token_ids) for o in engines[name].step())
                spent[name] += time.perf_counter() - started
    return {name: produced[name] / spent[name] for name in engines}


def backend_tokenizer(model_dir: Path):
    from prefloop.server.serving.tokenizer import Tokenizer
    return Tokenizer(model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the embedded model)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (the align default)")
    ap.add_argument("--runs", type=int, default=5, help="loads of each version")
    ap.add_argument("--prompts", type=int, default=4, help="benchmark prompts compared")
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--streams", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per stream")
    ap.add_argument("--decode-repeats", type=int, default=1,
                    help="decode runs of each configuration, interleaved; the median is shown")
    ap.add_argument("--lora-update", choices=("native", "torch", "both"), default="native",
                    help="how the decode table's adapters are applied: the native kernel, torch "
                         "ops, or both side by side")
    ap.add_argument("--profile-streams", type=int, default=0,
                    help="instead of the tables: torch.profiler's split of 30 decode steps at this "
                         "many streams (base, one adapter, two adapters; twice each)")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode table (skip disk, load, swap and memory)")
    args = ap.parse_args()

    from engine_throughput import prompt_ids

    from prefloop.server.model.loader import resolve_model_dir
    from prefloop.server.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "data")
        registry.ensure_base(resolve_model_dir(args.model))
        base_dir = registry.version_dir("v0000")
        print(f"adapter versions: publishing a rank-{args.rank} adapter both ways", flush=True)
        v_adapter, v_full = publish_both(registry, base_dir, args.rank)
        size = {v: registry.version_bytes(v) for v in (v_adapter, v_full)}
        times: dict[str, list[float]] = {v_adapter: [], v_full: []}
        answers = {}
        for run in range(args.runs):
            for v in (v_adapter, v_full) if run % 2 == 0 else (v_full, v_adapter):
                seconds, backend = load_seconds(registry.version_dir(v), v)
                times[v].append(seconds)
                if v not in answers:
                    prompts = prompt_ids(backend.tokenizer, args.prompts)
                    answers[v] = greedy(backend, prompts, args.max_tokens)
                del backend
            print(f"  load run {run + 1}/{args.runs}", flush=True)
        med = {v: statistics.median(t) for v, t in times.items()}
        same = sum(a == b for a, b in zip(answers[v_adapter], answers[v_full]))
        if args.profile_streams:
            return profile_split(registry, base_dir, v_adapter, args.profile_streams)
        if args.decode_only:
            return decode_table(registry, base_dir, v_adapter, args)
        print(f"\n{'version':24} {'bytes on disk':>14} {'load s (median)':>16} {'min':>6} {'max':>6}")
        for v, label in ((v_full, "full weights (before)"), (v_adapter, "LoRA adapter (now)")):
            print(f"{v} {label:18} {size[v] / 1e6:11.1f} MB {med[v]:16.2f} "
                  f"{min(times[v]):6.2f} {max(times[v]):6.2f}")
        print(f"\ndisk: adapter / full = 1/{size[v_full] / size[v_adapter]:.1f}")
        print(f"load: adapter / full = {med[v_adapter] / med[v_full]:.2f}x "
              f"({args.runs} loads each, alternating)")
        print(f"greedy answers equal: {same}/{len(answers[v_full])} prompts x {args.max_tokens} "
              "tokens")

        memory = ab_memory(registry, v_adapter, v_full)
        alone = memory["alone"]
        print(f"\nA/B memory (RSS, MB): alone {alone:.0f}")
        for label in ("adapter candidate", "full candidate"):
            print(f"  with {label:18} {memory[label]:6.0f}  {memory[label] / alone:.2f}x "
                  f"({memory[label + ' kind']})")

        prompt = prompt_ids(backend_tokenizer(base_dir), 1)[0]
        swaps = swap_seconds(registry, [v_adapter, v_full], args.runs, prompt)
        med_swap = {v: statistics.median(t) for v, t in swaps.items()}
        print(f"\nhot-swap from v0000, swap call to first token (s, median of {args.runs}):")
        for v, label in ((v_full, "full weights (a second engine)"),
                         (v_adapter, "LoRA adapter (same engine)")):
            print(f"  {v} {label:32} {med_swap[v]:7.3f}  (min {min(swaps[v]):.3f}, "
                  f"max {max(swaps[v]):.3f})")
        print(f"swap: adapter / full = 1/{med_swap[v_full] / med_swap[v_adapter]:.0f}")
        decode_table(registry, base_dir, v_adapter, args)


def decode_table(registry, base_dir: Path, v_adapter: str, args) -> None:
    """Decode tok/s of the plain base vs every sequence on one adapter, on two adapters
    alternating, and on one adapter alternating with the plain weights (an A/B test whose
    control is a full version): the configurations' engines stepped in turn over one model
    (`decode_tok_s`), `--decode-repeats` times; the torch path's configurations (--lora-update
    both) are a second such run beside the native one, against the native run's base."""
    from prefloop.server.model import adapters

    v_second, _ = publish_both(registry, base_dir, args.rank, seed=1)
    a1, a2 = (adapters.adapter_factors(registry.version_dir(v)) for v in (v_adapter, v_second))
    mixes = {"1 adapter": [a1], "2 adapters": [a1, a2], "adapter+base": [a1, None]}
    paths = {"native": [True], "torch": [False], "both": [True, False]}[args.lora_update]
    configs = {"base": ([], True)}
    for native in paths:
        suffix = "" if len(paths) == 1 else (" (native)" if native else " (torch)")
        configs.update({name + suffix: (f, native) for name, f in mixes.items()})
    print(f"\ndecode tok/s, {args.decode_tokens} tokens per stream (bfloat16), steps interleaved, "
          f"median of {args.decode_repeats} runs, LoRA update: {args.lora_update}; ratio to base:")
    print(f"{'streams':>8}" + "".join(f" {name:>22}" for name in configs))
    for n in (int(x) for x in args.streams.split(",")):
        runs: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.decode_repeats):
            for native in paths:
                group = {name: f for name, (f, nat) in configs.items() if nat == native}
                for name, tok_s in decode_tok_s(base_dir, group, n, args.decode_tokens,
                                                native).items():
                    runs[name].append(tok_s)
        med = {name: statistics.median(r) for name, r in runs.items()}
        cells = [f"{med['base']:22.1f}"] + [f"{med[k]:13.1f} ({med[k] / med['base']:.2f}x)"
                                            for k in list(configs)[1:]]
        print(f"{n:>8} " + " ".join(cells), flush=True)


def profile_split(registry, base_dir: Path, v_adapter: str, streams: int, steps: int = 30) -> None:
    """Per decode step: wall time, and torch.profiler's self time of the base matmuls, of the LoRA
    kernel, of every other op, and what is outside ops (Python), for the plain base, every
    sequence on one adapter, and two adapters alternating; each twice, interleaved."""
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.llm_engine import LLMEngine
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.model import adapters
    from prefloop.server.model.loader import load_model

    v_second, _ = publish_both(registry, base_dir, 16, seed=1)
    engine = LLMEngine(load_model(base_dir, dtype="bfloat16"),
                       KVCacheConfig(capacity_tokens=streams * 128 + 1024))
    a1, a2 = (engine.add_adapter(adapters.adapter_factors(registry.version_dir(v)))
              for v in (v_adapter, v_second))
    print(f"\nprofile of {steps} decode steps at {streams} streams (bfloat16), ms per step:")
    print(f"{'':13} {'step':>7} {'matmuls':>8} {'lora_add_':>10} {'other ops':>10} {'outside':>8}")
    for k, (name, ids) in enumerate([("base", [0]), ("one adapter", [a1]),
                                     ("two adapters", [a1, a2])] * 2):
        params = SamplingParams(temperature=0, max_tokens=steps + 10, ignore_eos=True)
        for i in range(streams):
            engine.add_request(f"{k}-{i}", [1 + (i * 7 + j) % 1000 for j in range(32)], params,
                               adapter=ids[i % len(ids)])
        for _ in range(5):
            engine.step()
        with torch.profiler.profile() as prof:
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = (time.perf_counter() - started) / steps * 1e3
        self_ms = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
        ops = sum(self_ms.values())
        matmul = self_ms.get("mkldnn::_linear_pointwise", 0.0) + self_ms.get("aten::addmm", 0.0) \
            + self_ms.get("aten::mm", 0.0)
        lora = self_ms.get("prefloop_kernels::lora_add_", 0.0)
        print(f"{name:13} {wall:7.2f} {matmul:8.2f} {lora:10.2f} {ops - matmul - lora:10.2f} "
              f"{wall - ops:8.2f}", flush=True)
        while engine.has_unfinished():
            engine.step()


if __name__ == "__main__":
    main()
