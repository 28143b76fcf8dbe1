"""What a lower-precision mode costs in output quality, measured against float32 on the same weights.

The default model (or `--model`) runs in float32 to produce greedy continuations of the benchmark
prompts; every mode then scores those same sequences teacher-forced (one prefill per sequence, the
logits at every position) and generates its own greedy continuation. Reported per mode:

- KL(fp32 || mode): mean over positions of the KL divergence of the next-token distributions (nats);
  the most sensitive single number, and the one that does not depend on where greedy text forks.
- top-1: how often the mode's most likely next token equals float32's.
- agree: tokens until the mode's greedy continuation first differs from float32's (mean over
  prompts; greedy text forks at the first near-tie, so this is noisy).
- ppl: perplexity on a held text nobody tuned on (`--text`, default benchmarks/data/held_text.txt,
  windows of 256 tokens), and llama.cpp's on the same token ids when llama-cpp-python (the `bench`
  extra) is installed and the model is the embedded one (its Q4_1 GGUF).

    python benchmarks/quant_quality.py [--modes bfloat16,bfloat16+torch-ops,bfloat16+int8] [--max-tokens 64]
                                       [--prompts 8] [--model PATH] [--steps prefill|decode]

A mode is DTYPE, optionally followed by `+int8` (`--quantize int8`), `+int4` (`--quantize int4`:
groups of 32, int8 LM head), `+int4-head` (int4 with the LM head in int4 too), `+torch-ops` (bfloat16
without the kernel library's fused norm / RoPE / SiLU ops, which the engine uses by default: see
docs/engine.md) and/or `+torch-kernel` (a quantized mode's small batches through torch's
weight-only kernels instead of prefloop's integer-dot ones, which round the activations to int8:
server/model/quant_gemv.py; compare them with `--steps decode`, since a prefill never takes them). Modes run eager: `--compile` computes the same model (tests/model/test_compile.py).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

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


STEPS = "prefill"  # or "decode" (--steps): how all_logits feeds a sequence to the model


def all_logits(model, seq_ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len, vocab] (float32) of one sequence: one prefill step, or with
    `--steps decode` one step per token (the path of a decoding stream: quantized modes' small-batch
    kernels, which a prefill's large batch never reaches)."""
    from prefloop.server.engine.model_runner import ModelRunner
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.engine.scheduler import ScheduledSeq
    from prefloop.server.engine.sequence import Sequence
    n, block = len(seq_ids), 16
    runner = ModelRunner(model, -(-n // block), block)
    seq = Sequence(0, "score", 0, list(seq_ids), n, SamplingParams(max_tokens=1), 0)
    seq.block_table, seq.num_computed = list(range(-(-n // block))), 0
    if STEPS == "prefill":
        ids, positions, meta, _, _ = runner.build([ScheduledSeq(seq, n)])
        return model(ids, positions, runner.kv_caches, meta, torch.arange(n)).float()
    rows = []
    for i in range(n):
        seq.num_computed = i
        ids, positions, meta, _, _ = runner.build([ScheduledSeq(seq, 1)])
        rows.append(model(ids, positions, runner.kv_caches, meta, torch.arange(1)).float())
    return torch.cat(rows)


HELD_TEXT = Path(__file__).resolve().parent / "data" / "held_text.txt"
WINDOW = 256


def text_windows(tokenizer, path: Path) -> list[list[int]]:
    ids = tokenizer.encode(path.read_text())
    return [ids[i:i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i:i + WINDOW]) > 1]


def nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] under logits[:-1], and the token count."""
    target = torch.tensor(ids[1:])
    return float(F.cross_entropy(logits[:-1].float(), target, reduction="sum")), len(target)


def perplexity(model, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for w in windows:
        s, n = nll(all_logits(model, w), w)
        total, count = total + s, count + n
    return math.exp(total / count)


def llama_cpp_perplexity(windows: list[list[int]]) -> float | None:
    """llama.cpp's perplexity on the same token ids (the embedded Q4_1 GGUF), or None."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from prefloop.server.model.default_model import default_gguf_path
    llm = Llama(str(default_gguf_path()), n_ctx=WINDOW + 8, n_threads=2, n_batch=1, n_ubatch=1,
                logits_all=True, verbose=False)
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        s, n = nll(torch.from_numpy(llm.scores[:len(w)].copy()), w)
        total, count = total + s, count + n
    return math.exp(total / count)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bfloat16,bfloat16+int8,bfloat16+int4,float32+int8",
                    help="comma-separated (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded model)")
    ap.add_argument("--text", default=str(HELD_TEXT), help="held text for perplexity (default %(default)s)")
    ap.add_argument("--steps", default="prefill", choices=["prefill", "decode"],
                    help="score each sequence in one prefill step or one decode step per token "
                         "(the path a decoding stream takes; default %(default)s)")
    args = ap.parse_args()
    global STEPS
    STEPS = args.steps
    from prefloop.server.model.loader import load_model, resolve_model_dir
    from prefloop.server.serving.tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model)
    tokenizer = Tokenizer(model_dir)
    prompts = prompt_ids(tokenizer, args.prompts)
    windows = text_windows(tokenizer, Path(args.text))
    reference = load_model(model_dir, dtype="float32")
    ref_text = continuations(reference, prompts, args.max_tokens)
    sequences = [p + c for p, c in zip(prompts, ref_text)]
    ref_logits = [all_logits(reference, s) for s in sequences]
    ref_ppl = perplexity(reference, windows)
    del reference
    print(f"{len(prompts)} prompts, {args.max_tokens} greedy tokens each, scored against float32; "
          f"perplexity on {sum(map(len, windows))} tokens of {Path(args.text).name}")
    print(f"{'mode':18} {'KL(fp32||mode)':>15} {'top-1':>7} {'agree':>7} {'ppl':>7} {'seconds':>8}")
    print(f"{'float32':18} {0.0:15.4f} {1.0:7.3f} {args.max_tokens:7.1f} {ref_ppl:7.3f} {'-':>8}")
    if args.model is None:
        llama_ppl = llama_cpp_perplexity(windows)
        if llama_ppl is not None:
            print(f"{'llama.cpp Q4_1':18} {'-':>15} {'-':>7} {'-':>7} {llama_ppl:7.3f} {'-':>8}")
    for mode in args.modes.split(","):
        dtype, *options = mode.split("+")
        unknown = set(options) - {"int8", "int4", "int4-head", "torch-ops", "torch-kernel"}
        if unknown:
            ap.error(f"unknown mode options {sorted(unknown)} in {mode!r}; use +int8, +int4, "
                     "+int4-head, +torch-ops and/or +torch-kernel")
        t0 = time.perf_counter()
        quantize = next((q for q in ("int8", "int4") if q in options), "none")
        if "int4-head" in options or "torch-kernel" in options:  # not serve options: quantized here
            from prefloop.server.model.quantize import quantize_model
            model = quantize_model(load_model(model_dir, dtype=dtype, weight_layout="plain"),
                                   "int4" if "int4-head" in options else quantize,
                                   head="int4" if "int4-head" in options else "int8",
                                   kernel="torch" if "torch-kernel" in options else "auto")
        else:
            model = load_model(model_dir, dtype=dtype, quantize=quantize)
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
        ppl = perplexity(model, windows)
        print(f"{mode:18} {kl:15.4f} {top1:7.3f} {agree:7.1f} {ppl:7.3f} "
              f"{time.perf_counter() - t0:8.1f}", flush=True)


if __name__ == "__main__":
    main()
