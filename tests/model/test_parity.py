"""Parity with transformers (the oracle): greedy tokens and per-step logits on the same weights."""
import pytest
import torch
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.model.loader import load_model, resolve_model_dir

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def run_with_logits(engine, prompt_ids, max_tokens):
    steps = []
    engine.logits_hook = lambda rows, logits: steps.append(logits[0].clone())
    out = engine.generate({"r": (prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                             ignore_eos=True))})
    engine.logits_hook = None
    return out["r"][0], torch.stack(steps)


def hf_greedy_with_logits(hf, prompt_ids, max_tokens):
    ids = torch.tensor([prompt_ids])
    out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt_ids):].tolist(), torch.cat(out.logits).float()


def check_parity(model_dir, prompts_ids, max_tokens=12, block_size=4, compile=False, attention="auto"):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = LLMEngine(load_model(model_dir, compile=compile, attention=attention),
                       KVCacheConfig(block_size=block_size, capacity_tokens=2048))
    for ids in prompts_ids:
        ours, our_logits = run_with_logits(engine, ids, max_tokens)
        ref, ref_logits = hf_greedy_with_logits(hf, ids, max_tokens)
        assert ours == ref
        assert (our_logits - ref_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {"attention_bias": True}),  # GQA, untied, q/k/v(/o) bias
    ("qwen2", {}),  # q/k/v bias without o bias
    ("mistral", {}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ("llama", {"tie_word_embeddings": True}),
    # head_dim 64 / 128: the native kernel's vector path (head_dim 16 above takes its portable path)
    ("llama", {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1}),
    ("qwen2", {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2}),
])
@pytest.mark.parametrize("attention", ["native", "sdpa"])
def test_tiny_parity(tmp_path, arch, overrides, attention):
    model_dir = save_tiny(tmp_path / arch, arch, **overrides)
    prompts = [[1, 5, 9, 33, 7], list(range(3, 40)), [1] + [17] * 9]
    check_parity(model_dir, prompts, max_tokens=16, attention=attention)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["native", "sdpa"])
def test_default_model_parity(attention):
    model_dir = resolve_model_dir(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    check_parity(model_dir, [tok(p)["input_ids"] for p in PROMPTS], max_tokens=10, block_size=16,
                 attention=attention)
