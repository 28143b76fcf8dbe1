"""Training a candidate with TRL: `DPOTrainer` on preference pairs, `KTOTrainer` on labelled
answers, `SFTTrainer` on supervised (prompt, completion) examples (loss on the answer tokens only).

The policy starts from a registry version's folder and the frozen reference is that same version
(a second copy for full fine-tuning; the policy with its adapters disabled for LoRA; SFT has
none). DPO and KTO runs carry the KL stop and pacing of align/train/kl_stop.py, and KTO takes its
reference point from that stop's probe (align/train/kto_reference.py) and, with `unlikelihood`,
weighs the loops of disliked answers (align/train/unlikelihood.py), with `liked_nll` the
likelihood of liked answers (align/train/liked_nll.py). `TrainConfig`
holds every hyperparameter (it is stored in the manifest). `train()` returns the trained model as
plain full weights (a LoRA adapter is merged in) on the main process; other ranks of an
`accelerate launch` run get None after the collective state-dict gather.

CPU by default here; the same code runs on one GPU, or on several through
`accelerate launch -m prefloop.cli align dpo ...` (docs/align.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.align.gate import DEFAULT_MAX_KL
from prefloop.align.losses import LOSSES
from prefloop.align.train.common import (
    PREFERENCE_LR,
    SFT_LR,
    LoraAdapter,
    check_trainer_fields,
    fresh_accelerator_state,
    load_causal_lm,
    load_tokenizer,
    lora_adapter,
    lora_config,
    plain_weights,
    quiet_progress,
    trainer_args,
)
from prefloop.align.train.cut_answers import drop_end_of_turn
from prefloop.align.train.kl_stop import KLRecord, KLStop, probe_items
from prefloop.align.train.kto_reference import probe_reference_kto
from prefloop.align.train.kto_terms import kto_with_terms
from prefloop.align.train.liked_nll import liked_nll_term
from prefloop.align.train.unlikelihood import unlikelihood_term
from prefloop.server.errors import InvalidArgument

log = logging.getLogger(__name__)

METHODS = ("dpo", "kto", "sft")
KTO_MAX_WEIGHT = 10.0  # the balancing weight of a rare label, at most
_SHARDED = ("DistributedType.FSDP", "DistributedType.DEEPSPEED", "FSDP", "DEEPSPEED")


@dataclass(slots=True)
class TrainConfig:
    """Hyperparameters of one training run (all of them land in the version's manifest)."""

    method: str = "dpo"
    beta: float = 0.1
    loss: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # robust dpo: assumed label-flip probability
    epochs: float = 1.0
    lr: float | None = None  # None: PREFERENCE_LR (sft: SFT_LR) by lora (train/common.py)
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lora: bool = True  # a LoRA adapter, merged before publishing (--no-lora: full fine-tune)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    desirable_weight: float | None = None  # kto; None (both): balance the label counts
    undesirable_weight: float | None = None  # kto
    stop_kl: float = DEFAULT_MAX_KL / 2  # dpo, kto: stop at this KL per token (0: off; kl_stop.py)
    max_lr_scale: float = 4.0  # dpo, kto: pacing may raise the rate up to this (1: off; kl_stop.py)
    pace_kl: float = 0.1  # dpo, kto: pacing aims under this KL per token (0: the stop KL; kl_stop.py)
    min_lr_scale: float = 1.0  # dpo, kto: pacing may lower the rate down to this (1: never under it)
    unlikelihood: float = 0.0  # kto: weight of the loops of disliked answers (0: off; unlikelihood.py)
    liked_nll: float = 0.0  # kto: weight of the liked answers' likelihood (0: off; liked_nll.py)
    seed: int = 0
    bf16: bool | None = None  # None: on for CUDA with bf16 or a CPU with native bf16
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
        check_trainer_fields(self, SFT_LR if self.method == "sft" else PREFERENCE_LR)
        if self.stop_kl < 0:
            raise InvalidArgument(f"stop KL must be >= 0 (0: off), got {self.stop_kl}")
        if not self.max_lr_scale >= 1:
            raise InvalidArgument(f"max lr scale must be >= 1 (1: no pacing), got {self.max_lr_scale}")
        if not 0 < self.min_lr_scale <= 1:
            raise InvalidArgument(f"min lr scale must be in (0, 1] (1: never under the set rate), "
                                  f"got {self.min_lr_scale}")
        if not self.pace_kl >= 0:
            raise InvalidArgument(f"pace KL must be >= 0 (0: the stop KL), got {self.pace_kl}")
        if not self.unlikelihood >= 0:
            raise InvalidArgument(f"unlikelihood must be >= 0 (0: off), got {self.unlikelihood}")
        if self.unlikelihood and self.method != "kto":
            raise InvalidArgument("unlikelihood weighs the loops of disliked answers: kto runs only")
        if not self.liked_nll >= 0:
            raise InvalidArgument(f"liked nll must be >= 0 (0: off), got {self.liked_nll}")
        if self.liked_nll and self.method != "kto":
            raise InvalidArgument("liked nll weighs the liked answers of rated feedback: kto runs only")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise InvalidArgument(f"{name.replace('_', ' ')} must be > 0")
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
            d.pop("unlikelihood")
            d.pop("liked_nll")
        if self.method == "sft":
            d.pop("stop_kl")
            d.pop("max_lr_scale")
            d.pop("pace_kl")
            d.pop("min_lr_scale")
        if self.method != "dpo":
            d.pop("loss")
            d.pop("label_smoothing")
        return d


def _dpo_kto_args(cfg: TrainConfig, output_dir: str, sequential: bool = False) -> dict[str, Any]:
    """`sequential`: the rows train in the order given (a midpoint run, align/train/midpoint.py)."""
    return trainer_args(cfg, output_dir, cpu_bf16=True, beta=cfg.beta,
                        ddp_find_unused_parameters=False,
                        **({"train_sampling_strategy": "sequential"} if sequential else {}))


@dataclass(slots=True)
class TrainResult:
    model: Any  # a transformers PreTrainedModel with full (merged) weights; None off rank 0
    tokenizer: Any
    log_history: list[dict[str, Any]]
    steps: int
    runtime_s: float
    adapter: LoraAdapter | None = None  # the trained LoRA adapter (what a job publishes)
    kl_stop: KLRecord | None = None  # the KL checks of align/train/kl_stop.py (dpo, kto)
    kto_weights: tuple[float, float] | None = None  # kto: (desirable, undesirable) weights used
    midpoint: Any = None  # midpoint.MidpointRecord: the newer half scored at the midpoint


def kto_weights(rows: list[dict[str, Any]], desirable: float | None,
                undesirable: float | None) -> tuple[float, float]:
    """KTO's loss weights: the given ones, or (neither given) weights that balance the label
    counts — the rarer label weighs n_more / n_rarer (at most KTO_MAX_WEIGHT), the other 1 — so
    that mostly-down thumbs do not train the model only to avoid (TRL's KTO docs: keep
    λ_D·n_D / λ_U·n_U in [1, 4/3])."""
    if desirable is not None or undesirable is not None:
        return (1.0 if desirable is None else desirable, 1.0 if undesirable is None else undesirable)
    ups = sum(1 for r in rows if r.get("label"))
    downs = len(rows) - ups
    if not ups or not downs:
        return 1.0, 1.0
    if downs > ups:
        return min(downs / ups, KTO_MAX_WEIGHT), 1.0
    return 1.0, min(ups / downs, KTO_MAX_WEIGHT)


def train(base_dir: Path, rows: list[dict[str, Any]], cfg: TrainConfig,
          callbacks: list | None = None, midpoint=None) -> TrainResult:
    """Train `cfg.method` on `rows` (TRL conversational rows: prompt/chosen/rejected for dpo,
    prompt/completion/label for kto, prompt/completion for sft; `rows.*.to_trl()` adds the cut
    flags of align/train/cut_answers.py), starting from (and, for dpo and kto, regularized
    towards) `base_dir`. `midpoint` (kto: a midpoint.MidpointScorer): `rows` train in their
    order, the scorer scores the newer half at the midpoint, and KTO's label weights and the KL
    stop's probe come from its label-free rows (align/train/midpoint.py)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    if not rows:
        raise InvalidArgument("no training rows")
    if midpoint is not None and cfg.method != "kto":
        raise InvalidArgument("the midpoint test scores rated answers: kto runs only")
    fresh_accelerator_state()
    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir)
    model.train()
    peft_config = lora_config(cfg, "CAUSAL_LM", cfg.lora_dropout)
    ref_model = None if cfg.lora or cfg.method == "sft" else load_causal_lm(base_dir)
    dataset = Dataset.from_list(rows)
    callbacks = list(callbacks or [])
    if midpoint is not None:
        midpoint.bind(tokenizer, ref_model)
        callbacks.append(midpoint)
    label_free = rows if midpoint is None else [r.to_trl() for r in midpoint.plan.label_free]
    kl_stop = None
    if cfg.stop_kl and cfg.method in ("dpo", "kto"):
        kl_stop = KLStop(tokenizer, probe_items(tokenizer, label_free, cfg.max_length),
                         cfg.stop_kl, reference=ref_model, max_scale=cfg.max_lr_scale,
                         pace_kl=cfg.pace_kl, min_scale=cfg.min_lr_scale)
        callbacks.append(kl_stop)
    weights = kto_weights(label_free, cfg.desirable_weight, cfg.undesirable_weight) \
        if cfg.method == "kto" else None
    # Trainer prints its log dicts to stdout: keep stdout for the result (e.g. --json)
    with tempfile.TemporaryDirectory(prefix="prefloop-align-") as work, \
            contextlib.redirect_stdout(sys.stderr):
        if cfg.method == "dpo":
            args = DPOConfig(**_dpo_kto_args(cfg, work), loss_type=[cfg.loss],
                             label_smoothing=cfg.label_smoothing)
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                                 train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=callbacks)
        elif cfg.method == "sft":  # loss on the answer tokens only (prompt tokens masked)
            args = SFTConfig(**trainer_args(cfg, work, cpu_bf16=True), completion_only_loss=True)
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=peft_config,
                                 callbacks=callbacks)
        else:
            args = KTOConfig(**_dpo_kto_args(cfg, work, sequential=midpoint is not None),
                             desirable_weight=weights[0],
                             undesirable_weight=weights[1])
            # with the KL stop, z0 is its probe's KL (align/train/kto_reference.py)
            kto_class = KTOTrainer if kl_stop is None else probe_reference_kto(kl_stop)
            terms = [(name, coef, term) for name, coef, term in (
                ("unlikelihood", cfg.unlikelihood, unlikelihood_term),  # loops of disliked answers
                ("liked_nll", cfg.liked_nll, liked_nll_term)) if coef]  # liked answers' likelihood
            if terms:  # added to KTO's loss from its own policy pass (align/train/kto_terms.py)
                kto_class = kto_with_terms(kto_class, terms)
            trainer = kto_class(model=model, ref_model=ref_model, args=args,
                                train_dataset=dataset, processing_class=tokenizer,
                                peft_config=peft_config, callbacks=callbacks)
        # answers the user saw cut keep no end-of-turn tokens (TRL's template adds them)
        trainer.train_dataset = drop_end_of_turn(trainer.train_dataset, tokenizer, cfg.method)
        quiet_progress(trainer)
        sharded = str(trainer.accelerator.distributed_type) in _SHARDED
        if sharded and kl_stop is not None:  # its forward passes would run outside FSDP / ZeRO
            trainer.remove_callback(kl_stop)
            log.warning("--stop-kl is not measured under FSDP / DeepSpeed sharding: every step runs")
            kl_stop = None
            if hasattr(trainer, "kl_source"):
                trainer.kl_source = None  # KTO's reference point: TRL's own estimate
        if sharded and midpoint is not None:  # the same: its scoring would run outside sharding
            trainer.remove_callback(midpoint)
            log.warning("the midpoint test does not run under FSDP / DeepSpeed sharding")
            midpoint = None
        if sharded and cfg.lora:
            raise InvalidArgument("LoRA (the default) is not supported with FSDP / DeepSpeed "
                                  "sharding: pass --no-lora for a sharded full fine-tune, or use "
                                  "DDP (the default accelerate config) for LoRA")
        output = trainer.train()
        accelerator = trainer.accelerator
        accelerator.wait_for_everyone()
        # FSDP / ZeRO-3 shard the parameters: gather a full state dict (a collective call).
        state_dict = accelerator.get_state_dict(trainer.model) if sharded else None
        history = list(trainer.state.log_history)
        steps = int(trainer.state.global_step)
        runtime = float(output.metrics.get("train_runtime", 0.0))
        record = None if kl_stop is None else kl_stop.record
        scored = None if midpoint is None else midpoint.record
        if not accelerator.is_main_process:
            return TrainResult(None, tokenizer, history, steps, runtime, None, record, weights,
                               scored)
        policy = accelerator.unwrap_model(trainer.model)
        del trainer, ref_model
    if sharded:
        policy = load_causal_lm(base_dir)
        policy.load_state_dict(state_dict)
    adapter = lora_adapter(policy) if cfg.lora and not sharded else None
    policy = plain_weights(policy, lora=cfg.lora and not sharded)
    return TrainResult(policy, tokenizer, history, steps, runtime, adapter, record, weights,
                       scored)
