"""Training a candidate with TRL: `DPOTrainer` on preference pairs, `KTOTrainer` on labelled answers.

The policy starts from a registry version's folder and the frozen reference is that same version
(a second copy for full fine-tuning; the policy with its adapters disabled for LoRA). `TrainConfig`
holds every hyperparameter (it is stored in the manifest). `train()` returns the trained model as
plain full weights (a LoRA adapter is merged in) on the main process; other ranks of an
`accelerate launch` run get None after the collective state-dict gather.

CPU by default here; the same code runs on one GPU, or on several through
`accelerate launch -m prefloop.server.cli align dpo ...` (docs/align.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.align.losses import LOSSES
from prefloop.server.errors import InvalidArgument

log = logging.getLogger(__name__)

METHODS = ("dpo", "kto")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = {False: 5e-6, True: 1e-4}  # full fine-tune, LoRA
_SHARDED = ("DistributedType.FSDP", "DistributedType.DEEPSPEED", "FSDP", "DEEPSPEED")


@dataclass(slots=True)
class TrainConfig:
    """Hyperparameters of one training run (all of them land in the version's manifest)."""

    method: str = "dpo"
    beta: float = 0.1
    loss: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # robust dpo: assumed label-flip probability
    epochs: float = 1.0
    lr: float | None = None  # None: 5e-6 full fine-tune, 1e-4 LoRA
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    seed: int = 0
    bf16: bool | None = None  # None: on when a CUDA device with bf16 is used
    gradient_checkpointing: bool = False
    max_steps: int = -1  # > 0 overrides epochs (tests, smoke runs)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"method {self.method!r} is not one of {METHODS}")
        if self.loss not in LOSSES:
            raise InvalidArgument(f"loss {self.loss!r} is not one of {LOSSES}")
        if self.beta <= 0:
            raise InvalidArgument(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise InvalidArgument(f"label smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check_trainer_fields(self, DEFAULT_LR)
        if self.method == "kto" and self.batch_size < 2:
            raise InvalidArgument("kto needs batch size >= 2 (its KL term pairs answers in a batch)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.lora:
            for k in ("lora_r", "lora_alpha", "lora_dropout"):
                d.pop(k)
        if self.method != "kto":
            d.pop("desirable_weight")
            d.pop("undesirable_weight")
        else:
            d.pop("loss")
            d.pop("label_smoothing")
        return d


def check_trainer_fields(cfg, default_lr: dict[bool, float]) -> None:
    """Checks every trainer config shares (DPO/KTO here, the reward model in reward.py): epochs or
    steps, learning rate (`default_lr[lora]` when unset), batch / accumulation / length / LoRA
    sizes."""
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


def _use_bf16(cfg: TrainConfig) -> bool:
    import torch
    if cfg.bf16 is not None:
        return cfg.bf16
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_dir: Path, device: str | None = None):
    """An HF causal LM in float32 (the registry stores full-precision weights), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if device:
        model.to(device)
    return model.eval()


def _common_args(cfg: TrainConfig, output_dir: str) -> dict[str, Any]:
    import torch
    return dict(
        output_dir=output_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, beta=cfg.beta, max_length=cfg.max_length,
        bf16=_use_bf16(cfg), gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available())


def _peft_config(cfg: TrainConfig):
    if not cfg.lora:
        return None
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM", bias="none")


@dataclass(slots=True)
class TrainResult:
    model: Any  # a transformers PreTrainedModel with full (merged) weights; None off rank 0
    tokenizer: Any
    log_history: list[dict[str, Any]]
    steps: int
    runtime_s: float


def train(base_dir: Path, rows: list[dict[str, Any]], cfg: TrainConfig,
          callbacks: list | None = None) -> TrainResult:
    """Train `cfg.method` on `rows` (TRL conversational rows: prompt/chosen/rejected for dpo,
    prompt/completion/label for kto), starting from and regularized towards `base_dir`."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    if not rows:
        raise InvalidArgument("no training rows")
    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir)
    model.train()
    peft_config = _peft_config(cfg)
    ref_model = None if cfg.lora else load_causal_lm(base_dir)
    dataset = Dataset.from_list(rows)
    # Trainer prints its log dicts to stdout: keep stdout for the result (e.g. --json)
    with tempfile.TemporaryDirectory(prefix="prefloop-align-") as work, \
            contextlib.redirect_stdout(sys.stderr):
        if cfg.method == "dpo":
            args = DPOConfig(**_common_args(cfg, work), loss_type=[cfg.loss],
                             label_smoothing=cfg.label_smoothing)
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                                 train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=callbacks)
        else:
            args = KTOConfig(**_common_args(cfg, work), desirable_weight=cfg.desirable_weight,
                             undesirable_weight=cfg.undesirable_weight)
            trainer = KTOTrainer(model=model, ref_model=ref_model, args=args,
                                 train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=callbacks)
        sharded = str(trainer.accelerator.distributed_type) in _SHARDED
        if sharded and cfg.lora:
            raise InvalidArgument("--lora is not supported with FSDP / DeepSpeed sharding; use "
                                  "DDP (the default accelerate config) for LoRA")
        output = trainer.train()
        accelerator = trainer.accelerator
        accelerator.wait_for_everyone()
        # FSDP / ZeRO-3 shard the parameters: gather a full state dict (a collective call).
        state_dict = accelerator.get_state_dict(trainer.model) if sharded else None
        history = list(trainer.state.log_history)
        steps = int(trainer.state.global_step)
        runtime = float(output.metrics.get("train_runtime", 0.0))
        if not accelerator.is_main_process:
            return TrainResult(None, tokenizer, history, steps, runtime)
        policy = accelerator.unwrap_model(trainer.model)
        del trainer, ref_model
    if sharded:
        policy = load_causal_lm(base_dir)
        policy.load_state_dict(state_dict)
    elif cfg.lora:
        policy = policy.merge_and_unload()  # LoRA deltas folded into the full weights
    policy = policy.to("cpu").float().eval()
    return TrainResult(policy, tokenizer, history, steps, runtime)
