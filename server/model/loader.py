"""Resolving a `--model` argument to an HF folder and loading its weights into `LlamaModel`.

Accepted: nothing (the embedded default model), an HF-format folder (config.json + *.safetensors), or
a Llama .gguf file (converted once into the cache). Anything else raises `UnsupportedModel` naming
what is supported. HF weight names are mapped here, fusing q/k/v and gate/up into one matrix each.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from prefloop.server.errors import UnsupportedModel
from prefloop.server.model import adapters
from prefloop.server.model.config import SUPPORTED_TEXT, ModelConfig
from prefloop.server.model.default_model import cache_root, convert_gguf, default_model_dir
from prefloop.server.model.kernels import resolve_decode_kernel
from prefloop.server.model.llama import LlamaModel
from prefloop.server.model.options import check_model_path
from prefloop.server.model.packed_linear import pack_model, resolve_weight_layout
from prefloop.server.model.quantize import quantize_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(model: str | os.PathLike | None, cache_dir=None) -> Path:
    """The HF folder to load for a --model argument (converting a GGUF on first use)."""
    path = check_model_path(model)
    if path is None:
        return default_model_dir(cache_dir)
    if path.is_file():  # a .gguf (checked)
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_root(cache_dir) / "models" / f"{path.stem}-{key}"
        if (target / "config.json").is_file():
            return target
        try:
            return convert_gguf(path, target)
        except Exception as exc:  # gguf reader errors are user input problems here
            raise UnsupportedModel(f"cannot convert {path}: {exc}; expected {SUPPORTED_TEXT}") from exc
    return path


def _hf_tensors(model_dir: Path):
    """The folder's weights; a LoRA adapter version's are its base's with the adapters merged."""
    return adapters.hf_tensors(model_dir)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def load_model(model_dir: Path, dtype: str = "float32", device: str = "cpu",
               quantize: str = "none", compile: bool = False, attention: str = "auto",
               weight_layout: str = "auto", quant_kernel: str = "auto") -> LlamaModel:
    """Build `LlamaModel` from an HF folder; every parameter must be filled exactly once.
    `quantize` "int8" / "int4": weight-only linear layers (server/model/quantize.py); `compile`: the step
    runs through torch.compile (server/model/compile.py; compiled when an engine warms it up);
    `attention`: auto / native / sdpa decode attention (server/model/kernels.py);
    `weight_layout`: auto / packed / plain linear weights (server/model/packed_linear.py);
    `quant_kernel`: auto / torch / native small-batch matmuls of quantized layers (server/model/quant_gemv.py)."""
    if dtype not in DTYPES:
        raise UnsupportedModel(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    decode_kernel = resolve_decode_kernel(attention, device, DTYPES[dtype])  # before the weights: fail fast
    pack = resolve_weight_layout(weight_layout, device, DTYPES[dtype])
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device="cpu").to(DTYPES[dtype])  # weights are cast as they are copied in
    model.cos_table, model.sin_table = (t.to(DTYPES[dtype]) for t in LlamaModel.rope_tables(cfg))
    if cfg.tie_word_embeddings:  # to_empty() materializes each module separately: tie again
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    pending: dict[str, dict[str, torch.Tensor]] = {}  # fused target -> {part: tensor}
    fuse = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
            "v_proj": ("self_attn.qkv_proj", 2), "gate_proj": ("mlp.gate_up_proj", 0),
            "up_proj": ("mlp.gate_up_proj", 1)}

    def put(name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            raise UnsupportedModel(f"unexpected weight {name!r} in {model_dir}")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise UnsupportedModel(f"weight {name} has shape {tuple(tensor.shape)}, "
                                   f"config expects {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor)
        filled.add(name)

    for hf_name, tensor in _hf_tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = hf_name.removeprefix("model.")
        m = _LAYER.match(hf_name)
        if m:
            layer, rest = m.groups()
            module, _, kind = rest.rpartition(".")  # e.g. self_attn.q_proj, weight
            short = module.split(".")[-1]
            if short in fuse:
                target, idx = fuse[short]
                key = f"layers.{layer}.{target}.{kind}"
                parts = pending.setdefault(key, {})
                parts[idx] = tensor
                need = 3 if "qkv" in target else 2
                if len(parts) == need:
                    put(key, torch.cat([parts[i] for i in range(need)], dim=0))
                    del pending[key]
                continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        put(name, tensor)
    missing = [n for n in params if n not in filled
               and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if pending or missing:
        raise UnsupportedModel(f"{model_dir} is missing weights: {sorted(missing + list(pending))[:5]}")
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    try:
        model = quantize_model(model, quantize, kernel=quant_kernel)
    except ValueError as exc:  # a kernel asked for that cannot run here
        raise UnsupportedModel(str(exc)) from exc
    if pack:
        pack_model(model)
    model.packed_weights = pack
    model.decode_kernel = decode_kernel
    # the kernel library's fused norm / RoPE / SiLU ops: bfloat16 only (float32 keeps torch's exact
    # ops, so it matches transformers within 1e-4; docs/engine.md)
    model.fused_ops = decode_kernel is not None and DTYPES[dtype] == torch.bfloat16
    if compile:
        model.compile_step()
    return model


def read_generation_eos(model_dir: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json, if present (some checkpoints list several)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)

