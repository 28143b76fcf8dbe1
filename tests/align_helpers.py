"""Helpers for the align tests: a tiny random policy with the default model's tokenizer, a
feedback log of synthetic preferences written through the real FeedbackStore, and the training
config an `align` command line builds."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from tiny_models import save_tiny

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")
FRUITS = ("apple", "cherry", "grape", "melon", "peach", "plum", "lemon", "mango")
WORDS = ("river", "stone", "cloud", "green", "quiet", "music", "paper", "light", "north", "table",
         "storm", "glass", "field", "dream", "sugar", "metal")


def tiny_policy(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) with the default model's 49152-token vocab and tokenizer."""
    from prefloop.server.model.loader import resolve_model_dir
    save_tiny(path, seed=seed, vocab_size=49152, hidden_size=32, intermediate_size=64,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
              pad_token_id=2, tie_word_embeddings=False)
    src = resolve_model_dir(None)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, path / name)
    return path


def banana_pairs(n: int, seed: int = 0) -> list[dict]:
    """Explicit preferences with one clear rule: the answer that starts with "banana" wins."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        w1, w2, w3 = rng.sample(WORDS, 3)
        prompt = [{"role": "system", "content": "Be brief."},  # shorter than the default one
                  {"role": "user", "content": f"Say something about {w1} number {i}."}]
        tail = f" {w2} {w3}."
        pairs.append({"prompt": prompt, "chosen": "banana" + tail,
                      "rejected": rng.choice(FRUITS) + tail})
    return pairs


def write_pairs(data_dir: Path, pairs: list[dict]) -> None:
    """Submit the pairs in order (so created_at increases) and compact them into Parquet."""
    from prefloop.server.feedback.store import FeedbackStore, StoreConfig
    from prefloop.server.feedback.wal import WalConfig
    with FeedbackStore(StoreConfig(data_dir=Path(data_dir), wal=WalConfig(linger_s=0.0005))) as s:
        for p in pairs:
            s.submit_preference(prompt_messages=p["prompt"], chosen_text=p["chosen"],
                                rejected_text=p["rejected"])


def train_config_of(*argv):
    """The TrainConfig an `align ...` command line builds."""
    from prefloop.cli.align import canonical_argv, job_config
    from prefloop.cli.main import build_parser
    argv = canonical_argv(["align", *argv])
    return job_config(build_parser(argv).parse_args(argv)).train
