"""ModelConfig: the validated hyperparameters of a Llama-family decoder, read from an HF config.json.

Supported: Llama, Mistral, Qwen2 (q/k/v bias) and SmolLM checkpoints — RMSNorm, GQA, SwiGLU, tied or
untied embeddings, rope_theta and rope scaling types default / linear / llama3. Both the transformers
4.x keys (`rope_theta`, `rope_scaling`) and the 5.x key (`rope_parameters`) are read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prefloop.server.errors import UnsupportedModel

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_TEXT = ("Llama-family checkpoints (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) "
                  "as a Hugging Face folder with config.json + *.safetensors, or a Llama .gguf file")


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., factor, ...}
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj; Qwen2's does not
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture {self.architecture!r} is not supported; supported: {SUPPORTED_TEXT}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise UnsupportedModel(f"config field {name} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise UnsupportedModel(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(
                f"rope scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        """Exact KV bytes per cached token: 2 (K and V) x layers x kv_heads x head_dim x
        `dtype_size` (bytes per element of the cache dtype: 4 float32, 2 bfloat16/float16)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(cfg.get("model_type"), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture {arch or cfg.get('model_type')!r} is not supported; "
                f"supported: {SUPPORTED_TEXT}")
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy.items() if k not in rope})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope.setdefault("rope_type", "default")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        if cfg.get("mlp_bias"):
            raise UnsupportedModel("MLP biases (mlp_bias=true) are not supported")
        # Mistral/Qwen2 sliding windows are served as full attention: exact while the context
        # stays within the window (true for the windows these checkpoints ship with, 4k-32k).
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise UnsupportedModel(f"{path} has no config.json; expected {SUPPORTED_TEXT}")
        return cls.from_hf_dict(json.loads(cfg_path.read_text()))


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def read_sampling_defaults(model_dir: Path) -> dict:
    """The sampling defaults the checkpoint ships in generation_config.json (temperature, top_p,
    top_k, repetition_penalty, the keys present; vLLM reads the same), or {} when it has none. A
    checkpoint with `do_sample: false` beside a sampling key asks for greedy decoding:
    temperature 0."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except ValueError:
        return {}
    defaults = {k: cfg[k] for k in SAMPLING_DEFAULT_KEYS if isinstance(cfg.get(k), (int, float))
                and not isinstance(cfg.get(k), bool)}
    if cfg.get("do_sample") is False and defaults.keys() & {"temperature", "top_p", "top_k"}:
        defaults["temperature"] = 0.0
    return defaults
