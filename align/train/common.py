"""What every trainer shares (TRL DPO/KTO, TRL reward model, our PPO): loading a version's
tokenizer and causal LM, the bf16 choice, the LoRA targets and config, the TRL trainer arguments,
the checks every trainer config makes, and turning a trained (possibly LoRA) model into plain
full CPU weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.server.errors import InvalidArgument

# Default learning rates {lora: lr} of the TRL policy trainers (here, not in train/preference.py,
# so the CLI's help can name them without importing torch). DPO with LoRA: the sweep of
# benchmarks/loop_sweep.py (docs/loop_benchmark.md, "Does the loop keep its promise?") — the largest step
# that kept 200 identical edits inside the gate's KL bound (0.43 < 0.5); the full fine-tune rate
# was measured on one preference only, SFT's not by the sweep.
PREFERENCE_LR = {False: 2e-5, True: 1.25e-4}
SFT_LR = {False: 2e-5, True: 2e-4}

# Every linear layer of a Llama decoder block.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_trainer_fields(cfg, default_lr: dict[bool, float]) -> None:
    """Checks every TRL trainer config shares (DPO/KTO, the reward model): epochs or steps,
    learning rate (`default_lr[lora]` when unset), batch / accumulation / length / LoRA sizes."""
    if cfg.epochs <= 0 and cfg.max_steps <= 0:
        raise InvalidArgument(f"epochs must be > 0, got {cfg.epochs}")
    if cfg.lr is None:
        cfg.lr = default_lr[cfg.lora]
    if cfg.lr <= 0:
        raise InvalidArgument(f"learning rate must be > 0, got {cfg.lr}")
    for name in ("batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha"):
        if getattr(cfg, name) < 1:
            raise InvalidArgument(f"{name.replace('_', '-')} must be >= 1")


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun job (or a plain single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def use_bf16(bf16: bool | None, *, cpu_native: bool = False) -> bool:
    """A config's `bf16` (None: on when a CUDA device with bf16 is present, and with
    `cpu_native` also on a CPU with native bf16 (AVX512-BF16 / AMX), as `serve --dtype auto`
    decides; the preference trainers measured it: docs/align.md)."""
    import torch
    if bf16 is not None:
        return bf16
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    if cpu_native:
        from prefloop.server.model.options import cpu_bf16_flags
        return bool(cpu_bf16_flags())
    return False


def fresh_accelerator_state() -> None:
    """Forget the mixed-precision choice of an earlier trainer in this process: accelerate keeps it
    in a process-wide singleton and refuses a different one, so one process (a notebook, the test
    suite) could not train a bf16 policy and then a float32 PPO or reward model. The distributed
    state (accelerate's PartialState) is kept."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()


def load_tokenizer(model_dir: Path):
    """The version's tokenizer; pad token = EOS when it has none."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_version(model_cls, model_dir: Path, **kwargs):
    """`model_cls.from_pretrained` of a version folder; an adapter version (server/model/
    adapters.py) loads its chain's full root and adds the adapters' deltas."""
    from prefloop.server.model import adapters
    model = model_cls.from_pretrained(str(adapters.root_dir(model_dir)), **kwargs)
    return adapters.merge_into(model, model_dir)


def load_causal_lm(model_dir: Path, device: str | None = None):
    """An HF causal LM in float32 (the registry stores full-precision weights), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    model = load_version(AutoModelForCausalLM, model_dir, dtype=torch.float32)
    if device:
        model.to(device)
    return model.eval()


def lora_config(cfg, task_type: str, dropout: float = 0.0):
    """peft's LoraConfig on `LORA_TARGETS` for `cfg.lora_r` / `cfg.lora_alpha`; None without
    `cfg.lora`. `task_type`: "CAUSAL_LM" (policies) or "SEQ_CLS" (reward models)."""
    if not cfg.lora:
        return None
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=dropout,
                      target_modules=list(LORA_TARGETS), task_type=task_type, bias="none")


def trainer_args(cfg, output_dir: str, *, cpu_bf16: bool = False, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of a TRL `*Config` (TrainingArguments) from a trainer config: sizes,
    schedule, precision, seeds, no checkpoints, no evaluation, no reporting, log every step.
    `extra` adds the trainer's own (beta, center_rewards_coefficient, ...); `cpu_bf16`: bf16
    autocast by default on a CPU with native bf16 too (the policy trainers)."""
    import torch
    return dict(
        output_dir=output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_length=cfg.max_length,
        bf16=use_bf16(cfg.bf16, cpu_native=cpu_bf16),
        gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        disable_tqdm=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        **extra)


VERBOSE = False  # `align ... --verbose`: TRL's per-step log dicts on stderr as well


def set_verbose(verbose: bool) -> None:
    global VERBOSE
    VERBOSE = bool(verbose)


def quiet_progress(trainer) -> None:
    """Keep the trainer's progress bar but show the loss on it instead of printing every step's
    raw log dict (`--verbose` keeps the dicts)."""
    if VERBOSE:
        return
    from transformers.trainer_callback import ProgressCallback

    class LossOnBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bar = getattr(self, "training_bar", None)
            if bar is not None and logs and "loss" in logs:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossOnBar())


@dataclass
class LoraAdapter:
    """A trained LoRA adapter in PEFT's format: its tensors and adapter_config.json's fields."""
    tensors: dict[str, Any]  # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" -> tensor
    config: dict[str, Any]

    def save(self, folder: Path) -> None:
        """adapter_model.safetensors + adapter_config.json (what PEFT's save_pretrained writes)."""
        import json

        from safetensors.torch import save_file

        from prefloop.server.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
        save_file({k: v.contiguous() for k, v in self.tensors.items()},
                  str(Path(folder) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True))


def lora_adapter(model) -> LoraAdapter:
    """The adapter of a PEFT model, in float32 on the CPU (before `plain_weights` merges it)."""
    import torch
    from peft import get_peft_model_state_dict
    tensors = {k: v.detach().to("cpu", dtype=torch.float32).clone()
               for k, v in get_peft_model_state_dict(model).items()}
    config = model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["base_model_name_or_path"] = None  # the registry names the base (manifest.json)
    return LoraAdapter(tensors, config)


def plain_weights(model, lora: bool):
    """The trained model as full float32 weights on the CPU in eval mode (LoRA deltas merged)."""
    if lora:
        model = model.merge_and_unload()  # LoRA deltas folded into the full weights
    return model.to("cpu").float().eval()
