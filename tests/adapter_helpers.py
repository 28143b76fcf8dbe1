"""Random LoRA adapters published as registry versions, as an align job publishes them (tests of
adapter versions and of per-request adapters)."""
from __future__ import annotations

import shutil

import torch

from prefloop.align.train.common import load_causal_lm, lora_adapter
from prefloop.server.registry import Registry

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trained_adapter(base_dir, seed: int, scale: float = 0.5):
    """A PEFT LoRA model over `base_dir` with random (non-zero) A and B, as training leaves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_causal_lm(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    return peft_model


def publish_random_adapter(registry: Registry, parent: str, seed: int, scale: float = 0.5):
    """Publish a random adapter over `parent` as the align job does; (version, PEFT's merge)."""
    base_dir = registry.version_dir(parent)
    peft_model = trained_adapter(base_dir, seed, scale)
    adapter = lora_adapter(peft_model)
    merged = peft_model.merge_and_unload().eval()  # PEFT's own merge: the oracle
    with registry.stage() as stage:
        adapter.save(stage.path)
        for p in base_dir.iterdir():
            if p.is_file() and p.suffix != ".safetensors" and p.name not in (
                    "manifest.json", "adapter_config.json"):
                shutil.copyfile(p, stage.path / p.name)
        manifest = stage.publish(kind="policy", method="dpo", parent=parent, adapter=True)
    return manifest.version, merged


