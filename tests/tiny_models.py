"""Tiny random Llama-family checkpoints saved as HF folders, for fast unit tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch


def greedy(n: int):
    """Greedy sampling of exactly n tokens (EOS ignored)."""
    from prefloop.server.engine.sampling_params import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def random_prompts(count: int, seed: int) -> list[list[int]]:
    """`count` prompts of 3-39 random ids in the tiny models' vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def save_tiny(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A 2-layer random model with GQA (4 heads / 2 KV heads) saved with transformers."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = kinds[arch]
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # HF initializes biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path
