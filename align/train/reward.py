"""Reward models: training one with TRL's `RewardTrainer`, loading one, scoring conversations.

A reward model is an HF sequence-classification model with one output (`num_labels=1`)
initialized from a policy version (the Llama trunk plus a fresh linear `score` head on the last
non-padding token). TRL trains it with the Bradley-Terry loss

    loss = -log σ(r(chosen) - r(rejected) - margin)

(`margin` only with `RewardTrainConfig.margin`: the log export gives rating-derived pairs their
difference of normalized ratings; explicit preferences have margin 0).

A conversation is tokenized the way TRL tokenizes it for training: the chat template applied to
prompt + [assistant answer] (`encode_conversation`), so `score_texts` at scoring time and in PPO
sees exactly the token layout the model was trained on. Chosen and rejected answers of a batch go
through one concatenated forward pass (`score_pairs`). `pairwise_metrics` is the pure function
behind the held-out pairwise accuracy.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefloop.align.train.common import (
    check_trainer_fields,
    fresh_accelerator_state,
    load_tokenizer,
    load_version,
    lora_config,
    plain_weights,
    quiet_progress,
    trainer_args,
)
from prefloop.align.train.cut_answers import drop_end_of_turn
from prefloop.server.errors import InvalidArgument
from prefloop.server.feedback.rows import PreferencePair, is_cut

log = logging.getLogger(__name__)

DEFAULT_LR = {False: 1e-5, True: 1e-4}  # full fine-tune, LoRA


@dataclass(slots=True)
class RewardTrainConfig:
    """Hyperparameters of one reward-model training run (stored in the version's manifest)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float | None = None  # None: 1e-5 full fine-tune, 1e-4 LoRA
    batch_size: int = 4  # pairs per step per device
    grad_accum: int = 1
    max_length: int = 1024  # pairs with a longer chosen or rejected conversation are dropped (TRL)
    margin: bool = False  # subtract the pair's margin inside the sigmoid
    center_rewards: float | None = None  # TRL's center_rewards_coefficient (e.g. 0.01)
    train_layers: int = 0  # > 0: train only the top N decoder layers, final norm and score head
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool | None = None  # None: on for CUDA devices with bf16
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_trainer_fields(self, DEFAULT_LR)
        if self.train_layers < 0:
            raise InvalidArgument("train-layers must be >= 0 (0 = all layers)")
        if self.lora and self.train_layers:
            raise InvalidArgument("--lora and --train-layers are alternatives; pick one")
        if self.center_rewards is not None and self.center_rewards < 0:
            raise InvalidArgument("center-rewards must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.lora:
            d.pop("lora_r")
            d.pop("lora_alpha")
        return d


# ---------------------------------------------------------------------------------------------
# Loading and freezing


def load_reward_model(model_dir: Path, device: str | None = None, *, new_head: bool = False):
    """A sequence-classification model with one output, float32, eval mode.

    `new_head`: the folder is a causal LM (a policy version) and the `score` head is created
    (randomly initialized); otherwise it is a trained reward model.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    if new_head:  # "score.weight newly initialized" / "lm_head unused" are expected here
        hf_logging.set_verbosity_error()
    try:
        model = load_version(AutoModelForSequenceClassification, model_dir, num_labels=1,
                             dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "num_labels", None) != 1:
        raise InvalidArgument(f"{model_dir} is not a reward model (num_labels != 1)")
    if device:
        model.to(device)
    return model.eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of an HF Llama-family model (causal LM or sequence classifier)."""
    trunk = model.base_model if hasattr(model, "base_model") else model
    layers = getattr(trunk, "layers", None)
    if layers is None:
        raise InvalidArgument(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def freeze_lower_layers(model, train_layers: int, keep: tuple[str, ...] = ()) -> int:
    """Freeze everything but the top `train_layers` decoder layers, the final norm and the
    modules named in `keep` (e.g. "score", "v_head"). 0 leaves everything trainable.
    Returns the number of trainable parameters."""
    if train_layers > 0:
        layers = decoder_layers(model)
        if train_layers > len(layers):
            raise InvalidArgument(f"train-layers {train_layers} > the model's {len(layers)} layers")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[-train_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        trunk = model.base_model if hasattr(model, "base_model") else model
        if getattr(trunk, "norm", None) is not None:
            for p in trunk.norm.parameters():
                p.requires_grad_(True)
        for name in keep:
            module = getattr(model, name, None)
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Tokenizing and scoring


def _content(message_list_or_text: Any) -> str:
    """An answer given as text or as TRL's one-assistant-message list."""
    if isinstance(message_list_or_text, str):
        return message_list_or_text
    return "".join(m["content"] for m in message_list_or_text)


def encode_conversation(tokenizer, prompt: list[dict], answer: Any, max_length: int,
                        cut: bool = False) -> list[int]:
    """Token ids of prompt + [assistant answer] with the chat template (TRL's RewardTrainer
    layout). Longer conversations keep their *last* `max_length` tokens (the score is read at
    the last token). A `cut` answer (rows.is_cut) ends where its text ends, without the
    end-of-turn tokens, as it is trained (align/train/cut_answers.py)."""
    messages = list(prompt) + [{"role": "assistant", "content": _content(answer)}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        **({"continue_final_message": True} if cut else {}))["input_ids"]
    ids = list(ids)
    return ids[-max_length:]


def _right_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask`: [batch, longest]."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def score_ids(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Scores of token sequences, one right-padded forward pass: `[len(seqs)]` float32 on the
    CPU. The model reads its score at the last non-padding token, as in training."""
    device = next(model.parameters()).device
    input_ids, attention_mask = _right_pad(seqs, pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [batch, 1]
    return logits[:, 0].float().cpu()


def score_texts(model, tokenizer, prompts: list[list[dict]], answers: list[Any], *,
                batch_size: int = 8, max_length: int = 1024,
                progress: str | None = None) -> torch.Tensor:
    """Reward of each (prompt, answer): `[n]` float32."""
    from tqdm.auto import tqdm
    if len(prompts) != len(answers):
        raise InvalidArgument("prompts and answers differ in length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.zeros(len(prompts), dtype=torch.float32)
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        seqs = [encode_conversation(tokenizer, p, a, max_length)
                for p, a in zip(prompts[s:s + batch_size], answers[s:s + batch_size])]
        out[s:s + len(seqs)] = score_ids(model, seqs, pad_id)
    return out


def score_pairs(model, tokenizer, pairs: list[PreferencePair], *, batch_size: int = 4,
                max_length: int = 1024, progress: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(chosen_scores, rejected_scores)`, each `[n]`: the chosen and rejected answers of
    `batch_size` pairs go through one concatenated forward pass."""
    from tqdm.auto import tqdm
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(pairs)
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    for s in tqdm(range(0, n, batch_size), desc=progress, disable=progress is None, leave=False):
        group = pairs[s:s + batch_size]
        seqs = ([encode_conversation(tokenizer, p.prompt, p.chosen, max_length,
                                     is_cut(p.chosen_finish_reason)) for p in group]
                + [encode_conversation(tokenizer, p.prompt, p.rejected, max_length,
                                       is_cut(p.rejected_finish_reason)) for p in group])
        scores = score_ids(model, seqs, pad_id)  # [2 * len(group)]
        chosen[s:s + len(group)] = scores[:len(group)]
        rejected[s:s + len(group)] = scores[len(group):]
    return chosen, rejected


def pairwise_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                     margins: torch.Tensor | None = None) -> dict[str, float]:
    """Pairwise accuracy (chosen scored strictly higher; ties count one half), mean margin,
    mean scores and the Bradley-Terry loss -log σ(r_c - r_r - margin).

    chosen_scores, rejected_scores, margins: `[n]`.
    """
    n = chosen_scores.numel()
    if n == 0:
        return {"pairs": 0}
    diff = chosen_scores.double() - rejected_scores.double()  # [n]
    m = torch.zeros_like(diff) if margins is None else margins.double()
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    return {"pairs": n, "accuracy": float(wins.mean()), "margin": float(diff.mean()),
            "chosen_score": float(chosen_scores.double().mean()),
            "rejected_score": float(rejected_scores.double().mean()),
            "loss": float(-torch.nn.functional.logsigmoid(diff - m).mean())}


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(slots=True)
class RewardTrainResult:
    model: Any  # the trained sequence-classification model (full weights, CPU); None off rank 0
    tokenizer: Any
    log_history: list[dict[str, Any]]
    steps: int
    runtime_s: float
    trainable_params: int


def trl_rows(rows: list[PreferencePair], margin: bool) -> list[dict[str, Any]]:
    """The columns RewardTrainer reads (conversational prompt / chosen / rejected [+ margin]),
    plus the cut flags that `train_reward_model` applies and removes (cut_answers.py)."""
    keep = ("prompt", "chosen", "rejected", "chosen_cut", "rejected_cut") + (("margin",) if margin else ())
    return [{k: v for k, v in r.to_trl(margin=margin).items() if k in keep} for r in rows]


def train_reward_model(base_dir: Path, rows: list[PreferencePair], cfg: RewardTrainConfig,
                       callbacks: list | None = None) -> RewardTrainResult:
    """Train a reward model from the policy folder `base_dir` on preference rows (the `rm`
    export: prompt / chosen / rejected as chat messages, optional margin)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    if not rows:
        raise InvalidArgument("no training pairs")
    fresh_accelerator_state()
    tokenizer = load_tokenizer(base_dir)
    torch.manual_seed(cfg.seed)  # the score head's initialization
    model = load_reward_model(base_dir, new_head=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    trainable = freeze_lower_layers(model, cfg.train_layers, keep=("score",))
    peft_config = lora_config(cfg, "SEQ_CLS")
    with tempfile.TemporaryDirectory(prefix="prefloop-rm-") as work:
        args = RewardConfig(**trainer_args(cfg, work,
                                           center_rewards_coefficient=cfg.center_rewards))
        trainer = RewardTrainer(model=model, args=args,
                                train_dataset=Dataset.from_list(trl_rows(rows, cfg.margin)),
                                processing_class=tokenizer, peft_config=peft_config,
                                callbacks=callbacks)
        # answers the user saw cut keep no end-of-turn tokens (TRL's template adds them)
        trainer.train_dataset = drop_end_of_turn(trainer.train_dataset, tokenizer, "rm")
        quiet_progress(trainer)
        if len(trainer.train_dataset) == 0:
            raise InvalidArgument(f"every pair is longer than max-length {cfg.max_length} tokens")
        output = trainer.train()
        accelerator = trainer.accelerator
        accelerator.wait_for_everyone()
        history = list(trainer.state.log_history)
        steps = int(trainer.state.global_step)
        runtime = float(output.metrics.get("train_runtime", 0.0))
        if not accelerator.is_main_process:
            return RewardTrainResult(None, tokenizer, history, steps, runtime, trainable)
        trained = accelerator.unwrap_model(trainer.model)
        del trainer
    trained = plain_weights(trained, cfg.lora)
    for p in trained.parameters():
        p.requires_grad_(False)
    return RewardTrainResult(trained, tokenizer, history, steps, runtime, trainable)
