"""Offline engine throughput: prefloop's native engine vs transformers' generate (and llama.cpp).

Aggregate decode tokens/s with 1 / 8 / 32 concurrent requests of N greedy tokens, time to first
token, and peak RSS, for float32 and bfloat16, all in one run on the same weights so the ratios are
comparable on a noisy machine. Each measurement runs in its own subprocess (clean peak memory).

    python benchmarks/engine_throughput.py [--batch-sizes 1,8,32] [--max-tokens 128] [--compile] [--int8]
                                           [--int4] [--torch-kernel] [--sdpa] [--plain] [--packed]
                                           [--no-llama-cpp] [--llama-cpp-q8] [--json out.json]

`--torch-kernel` adds, with `--int8` / `--int4`, the same with `--quant-kernel torch` (torch's
weight-only kernels for small batches instead of prefloop's integer-dot ones).
`--compile` adds prefloop with `--compile` (the model step through torch.compile; compilation
happens at engine start and is not timed), `--int8` / `--int4` prefloop with `--quantize int8` /
`int4`; with --compile and --int8, also the two together; `--sdpa` prefloop with `--attention sdpa` (gather + SDPA decode attention instead
of the native kernel, which `prefloop` uses when it builds); `--plain` / `--packed` prefloop with
`--weight-layout plain` / `packed` (`prefloop` itself runs the default `auto`: packed oneDNN weights
for bfloat16, plain for float32). Every prefloop column gets its ratio to transformers.
llama.cpp (llama-cpp-python, the `bench` extra) runs the embedded Q4_1 GGUF at one stream, and
each prefloop column at one stream also gets its ratio to it; `--llama-cpp-q8` adds llama.cpp on a
Q8_0 copy of that GGUF (benchmarks/gguf_requant.py, converted once into prefloop's cache), with
ratios to it too.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROMPTS = ["Write a story about a dragon who learns to cook.", "Explain how rainbows form.",
           "List ten fruits and describe each.", "Describe the history of the bicycle.",
           "How do airplanes fly?", "Give advice to a new programmer.", "What is photosynthesis?",
           "Write a poem about the sea."]


def prompt_ids(tok, bs):
    msgs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (#{i})"}] for i in range(bs)]
    return [tok.encode_chat(m) for m in msgs]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_prefloop(dtype: str, bs: int, max_tokens: int, quantize: str = "none", compile: bool = False,
                 attention: str = "auto", weight_layout: str = "auto", quant_kernel: str = "auto") -> dict:
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.llm_engine import LLMEngine
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.model.loader import load_model, resolve_model_dir
    from prefloop.server.serving.tokenizer import Tokenizer
    d = resolve_model_dir(None)
    tok = Tokenizer(d)
    engine = LLMEngine(load_model(d, dtype=dtype, quantize=quantize, compile=compile, attention=attention,
                                  weight_layout=weight_layout, quant_kernel=quant_kernel),
                       KVCacheConfig(capacity_tokens=bs * (max_tokens + 64) + 256, enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.generate({"warm": (prompt_ids(tok, 1)[0], SamplingParams(temperature=0, max_tokens=4))})
    ids = prompt_ids(tok, bs)
    t0 = time.perf_counter()
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, params)
    first, produced = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            produced += len(out.new_token_ids)
            first.setdefault(out.request_id, time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": produced / dt, "ttft_s": sum(first.values()) / len(first),
            "peak_rss_mib": peak_rss_mib(), "kv_bytes_per_token": engine.stats().kv_bytes_per_token}


def run_transformers(dtype: str, bs: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefloop.server.model.loader import resolve_model_dir
    from prefloop.server.serving.tokenizer import Tokenizer
    d = resolve_model_dir(None)
    hf_tok = AutoTokenizer.from_pretrained(d)
    hf_tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).eval()
    ids = prompt_ids(Tokenizer(d), bs)
    batch = hf_tok.pad({"input_ids": ids}, return_tensors="pt")
    kw = dict(do_sample=False, pad_token_id=hf_tok.pad_token_id)
    model.generate(**hf_tok.pad({"input_ids": ids[:1]}, return_tensors="pt"), max_new_tokens=4, **kw)
    t0 = time.perf_counter()
    model.generate(**batch, max_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
    dt = time.perf_counter() - t0
    produced = (out.shape[1] - batch["input_ids"].shape[1]) * bs
    return {"tokens_per_s": produced / dt, "ttft_s": ttft, "peak_rss_mib": peak_rss_mib()}


Q8_GGUF: str | None = None  # --q8-gguf: the Q8_0 copy llama.cpp-q8 runs


def run_llama_cpp(dtype: str, bs: int, max_tokens: int, gguf: str | None = None) -> dict:
    from llama_cpp import Llama  # optional peer: only when llama-cpp-python is installed

    from prefloop.server.model.default_model import default_gguf_path
    # n_batch=1: llama-cpp-python 0.3.x built on an AMX Xeon segfaulted evaluating a multi-token
    # prompt in one batch (issue 32); one token per batch leaves the decode speed as it is
    llm = Llama(gguf or str(default_gguf_path()), n_ctx=2048, n_threads=2, n_batch=1, n_ubatch=1,
                verbose=False)
    prompt = llm.tokenize(PROMPTS[0].encode())
    t0 = time.perf_counter()
    llm.eval(prompt)  # one token per batch (above): its TTFT is slower than it could be
    produced = 0
    for _ in llm.generate([], temp=0.0, reset=False):
        produced += 1
        if produced == 1:
            t_first = time.perf_counter()  # decode is timed from here: prompt speed aside
        if produced >= max_tokens:
            break
    dt = time.perf_counter() - t_first
    return {"tokens_per_s": (produced - 1) / dt, "ttft_s": t_first - t0,
            "peak_rss_mib": peak_rss_mib()}


RUNNERS = {"prefloop": run_prefloop, "transformers": run_transformers, "llama.cpp": run_llama_cpp,
           "llama.cpp-q8": lambda dtype, bs, max_tokens: run_llama_cpp(dtype, bs, max_tokens, Q8_GGUF),
           "prefloop-plain": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens,
                                                                        weight_layout="plain"),
           "prefloop-packed": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens,
                                                                         weight_layout="packed"),
           "prefloop-sdpa": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens, attention="sdpa"),
           "prefloop-int8": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens, "int8"),
           "prefloop-int4": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens, "int4"),
           "prefloop-int8-torchk": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens, "int8",
                                                                              quant_kernel="torch"),
           "prefloop-int4-torchk": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens, "int4",
                                                                              quant_kernel="torch"),
           "prefloop-compiled": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens, compile=True),
           "prefloop-compiled-int8": lambda dtype, bs, max_tokens: run_prefloop(dtype, bs, max_tokens, "int8",
                                                                                 compile=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--int8", action="store_true", help="also run prefloop --quantize int8")
    ap.add_argument("--int4", action="store_true", help="also run prefloop --quantize int4")
    ap.add_argument("--torch-kernel", action="store_true",
                    help="with --int8 / --int4, also run them with --quant-kernel torch")
    ap.add_argument("--no-llama-cpp", action="store_true",
                    help="skip llama.cpp even when installed (e.g. under ATEN_CPU_CAPABILITY, which "
                         "does not reach it)")
    ap.add_argument("--llama-cpp-q8", action="store_true",
                    help="also run llama.cpp on a Q8_0 copy of the embedded GGUF (benchmarks/gguf_requant.py)")
    ap.add_argument("--q8-gguf", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help="also run prefloop --compile")
    ap.add_argument("--sdpa", action="store_true", help="also run prefloop --attention sdpa")
    ap.add_argument("--plain", action="store_true", help="also run prefloop --weight-layout plain")
    ap.add_argument("--packed", action="store_true",
                    help="also run prefloop --weight-layout packed (differs from prefloop for float32)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--one", nargs=3, metavar=("SYSTEM", "DTYPE", "BS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global Q8_GGUF
    Q8_GGUF = args.q8_gguf
    if args.one:
        system, dtype, bs = args.one
        print(json.dumps(RUNNERS[system](dtype, int(bs), args.max_tokens)))
        return 0
    try:
        import llama_cpp  # noqa: F401
        systems = ["prefloop", "transformers"] + ([] if args.no_llama_cpp else ["llama.cpp"])
        if args.llama_cpp_q8 and not args.no_llama_cpp:
            from gguf_requant import requantize

            from prefloop.server.model.default_model import cache_root, default_gguf_path
            q8 = cache_root() / "benchmarks" / f"{default_gguf_path().stem}.Q8_0.gguf"
            if not q8.exists():  # converted once per machine (138 MB), then reused
                q8.parent.mkdir(parents=True, exist_ok=True)
                requantize(default_gguf_path(), q8.with_suffix(".tmp"), "Q8_0").rename(q8)
            Q8_GGUF = str(q8)
            systems.append("llama.cpp-q8")
    except ImportError:
        systems = ["prefloop", "transformers"]
        print("(llama-cpp-python not installed: llama.cpp column skipped)")
    variants = [v for v, on in (("prefloop-plain", args.plain), ("prefloop-packed", args.packed),
                                ("prefloop-sdpa", args.sdpa), ("prefloop-compiled", args.compile),
                                ("prefloop-int8", args.int8), ("prefloop-int4", args.int4),
                                ("prefloop-int8-torchk", args.int8 and args.torch_kernel),
                                ("prefloop-int4-torchk", args.int4 and args.torch_kernel),
                                ("prefloop-compiled-int8", args.compile and args.int8)) if on]
    systems[1:1] = variants
    ours_all = ["prefloop"] + variants
    rows = []
    print(f"{'dtype':9} {'bs':>3} " + " ".join(f"{s + ' tok/s':>22}" for s in systems)
          + " " + " ".join(f"{s.replace('prefloop', 'x') + '/hf':>12}" for s in ours_all)
          + f" {'ttft ours/hf (s)':>17} {'peak MiB ours/hf':>17}")
    for dtype in args.dtypes.split(","):
        for bs in map(int, args.batch_sizes.split(",")):
            res = {}
            for system in systems:
                if system.startswith("llama.cpp") and bs != 1:
                    continue  # one stream is its reference point (its own dtype: Q4_1)
                cmd = [sys.executable, __file__, "--one", system, dtype, str(bs), "--max-tokens",
                       str(args.max_tokens)] + (["--q8-gguf", Q8_GGUF] if Q8_GGUF else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                res[system] = json.loads(out.stdout.strip().splitlines()[-1])
            ours, hf = res.get("prefloop", {}), res.get("transformers", {})
            hf_tps = hf.get("tokens_per_s")
            ratios = {s: res[s]["tokens_per_s"] / hf_tps if hf_tps and s in res else float("nan")
                      for s in ours_all}
            llama_tps = res.get("llama.cpp", {}).get("tokens_per_s")
            vs_llama = {s: res[s]["tokens_per_s"] / llama_tps for s in ours_all
                        if llama_tps and s in res}
            q8_tps = res.get("llama.cpp-q8", {}).get("tokens_per_s")
            vs_q8 = " ".join(f"{s.replace('prefloop', 'x')} {res[s]['tokens_per_s'] / q8_tps:.2f}"
                             for s in ours_all if q8_tps and s in res)
            rows.append({"dtype": dtype, "batch_size": bs, "ratio_vs_transformers": ratios["prefloop"],
                         "ratios_vs_transformers": ratios, "ratios_vs_llama_cpp": vs_llama,
                         **{s: r for s, r in res.items()}})
            cols = " ".join(f"{res[s]['tokens_per_s']:22.1f}" if s in res else f"{'-':>22}" for s in systems)
            print(f"{dtype:9} {bs:3d} {cols} " + " ".join(f"{ratios[s]:12.2f}" for s in ours_all)
                  + f" {ours.get('ttft_s', 0):8.3f}/{hf.get('ttft_s', 0):<8.3f} "
                  f"{ours.get('peak_rss_mib', 0):8.0f}/{hf.get('peak_rss_mib', 0):<8.0f}"
                  + ("  vs llama.cpp: " + " ".join(f"{s.replace('prefloop', 'x')} {r:.2f}"
                                                   for s, r in vs_llama.items()) if vs_llama else "")
                  + (f"  vs llama.cpp Q8_0: {vs_q8}" if vs_q8 else ""),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
