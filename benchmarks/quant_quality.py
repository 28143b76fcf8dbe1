"""What a lower-precision mode costs in output quality, measured against float32 on the same weights.

The default model (or `--model`) runs in float32 to produce greedy continuations of the benchmark
prompts; every mode then scores those same sequences teacher-forced (one prefill per sequence, the
logits at every position) and generates its own greedy continuation. Reported per mode:

- KL(fp32 || mode): mean over positions of the KL divergence of the next-token distributions (nats);
  the most sensitive single number, and the one that does not depend on where greedy text forks.
- top-1: how often the mode's most likely next token equals float32's.
- agree: tokens until the mode's greedy continuation first differs from float32's (mean over
  prompts; greedy text forks at the first near-tie, so this is noisy).

    python benchmarks/quant_quality.py [--modes bfloat16,bfloat16+torch-ops,bfloat16+int8] [--max-tokens 64]
                                       [--prompts 8] [--model PATH]

A mode is DTYPE, optionally followed by `+int8` (`--quantize int8`) and/or `+torch-ops` (bfloat16
without the kernel library's fused norm / RoPE / SiLU ops, which the engine uses by default: see
docs/engine.md). Modes run eager: `--compile` computes the same model (tests/model/test_compile.py).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from engine_throughput import prompt_ids


def continuations(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.llm_engine import LLMEngine
    from prefloop.server.engine.sampling_params import SamplingParams
    engine = LLMEngine(model, KVCacheConfig(capacity_tokens=len(prompts) * (max_tokens + 96) + 256,
                                            enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = engine.generate({str(i): (p, params) for i, p in enumerate(prompts)})
    return [out[str(i)][0] for i in range(len(prompts))]


def all_logits(model, seq_ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len, vocab] (float32) of one sequence: one prefill step."""
    from prefloop.server.engine.model_runner import ModelRunner
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.engine.scheduler import ScheduledSeq
    from prefloop.server.engine.sequence import Sequence
    n, block = len(seq_ids), 16
    runner = ModelRunner(model, -(-n // block), block)
    seq = Sequence(0, "score", 0, list(seq_ids), n, SamplingParams(max_tokens=1), 0)
    seq.block_table, seq.num_computed = list(range(-(-n // block))), 0
    ids, positions, meta, _, _ = runner.build([ScheduledSeq(seq, n)])
    return model(ids, positions, runner.kv_caches, meta, torch.arange(n)).float()


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bfloat16,bfloat16+int8,float32+int8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded model)")
    args = ap.parse_args()
    from prefloop.server.model.loader import load_model, resolve_model_dir
    from prefloop.server.serving.tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model)
    prompts = prompt_ids(Tokenizer(model_dir), args.prompts)
    reference = load_model(model_dir, dtype="float32")
    ref_text = continuations(reference, prompts, args.max_tokens)
    sequences = [p + c for p, c in zip(prompts, ref_text)]
    ref_logits = [all_logits(reference, s) for s in sequences]
    del reference
    print(f"{len(prompts)} prompts, {args.max_tokens} greedy tokens each, scored against float32")
    print(f"{'mode':18} {'KL(fp32||mode)':>15} {'top-1':>7} {'agree':>7} {'seconds':>8}")
    for mode in args.modes.split(","):
        dtype, *options = mode.split("+")
        unknown = set(options) - {"int8", "torch-ops"}
        if unknown:
            ap.error(f"unknown mode options {sorted(unknown)} in {mode!r}; use +int8 and/or +torch-ops")
        t0 = time.perf_counter()
        model = load_model(model_dir, dtype=dtype, quantize="int8" if "int8" in options else "none")
        if "torch-ops" in options:
            model.fused_ops = False
        logits = [all_logits(model, s) for s in sequences]
        kl = statistics.mean(
            float(F.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"))
            for lg, ref in zip(logits, ref_logits))
        top1 = statistics.mean(float((lg.argmax(-1) == ref.argmax(-1)).float().mean())
                               for lg, ref in zip(logits, ref_logits))
        agree = statistics.mean(first_difference(a, b)
                                for a, b in zip(continuations(model, prompts, args.max_tokens), ref_text))
        print(f"{mode:18} {kl:15.4f} {top1:7.3f} {agree:7.1f} {time.perf_counter() - t0:8.1f}", flush=True)


if __name__ == "__main__":
    main()
