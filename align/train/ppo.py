"""PPO against a reward model, with a per-token KL penalty to a frozen reference (ours; TRL 1.16
has no PPO). The loss pieces are the pure functions of `align/ppo_losses.py`; this module is the
loop around them, on `accelerate` (CPU, one GPU, or `accelerate launch` with DDP):

    for each step:
      rollout   sample `batch_size` prompts, generate answers from the *current* policy
                (HF generate, pure sampling at `temperature`), score each answer with the reward
                model, compute log-probs under the policy (old_logps), the frozen reference
                (ref_logps) and the value head (old_values)
      rewards   r_t = -beta * KL_t at every answer token, + RM score at the last token
      GAE       advantages and returns (gamma, lam); advantages whitened over the batch
      update    `ppo_epochs` passes over shuffled minibatches: clipped surrogate + vf_coef *
                clipped value loss, gradient clipping, AdamW
      beta      fixed, or Ziegler et al.'s adaptive controller towards `kl_target`
      log       one JSON line per step (reward, KL, entropy, clip fraction, value loss, ...)

The value head is a linear layer on the policy's last hidden state (initialized to zero), so
policy and value share the trunk. `train_layers` > 0 trains only the top N decoder layers (+
final norm, value head), which makes CPU runs affordable; the reference stays a full frozen copy.
Answers end at the first EOS token (which is part of the answer: the policy chose to stop);
everything after it is padding and masked out.

Multi-GPU: every process generates its own rollouts from its own share of the prompts;
gradients are averaged by DDP; metrics are averaged over processes. FSDP / DeepSpeed ZeRO-3
shard the parameters and would need a gather around `generate`: not supported (use DDP).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prefloop.align import ppo_losses as L
from prefloop.server.durable_io import write_atomic
from prefloop.server.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PPOConfig:
    """Hyperparameters of one PPO run (all stored in the published version's manifest)."""

    steps: int = 64  # rollout + update iterations
    batch_size: int = 8  # prompts (= answers) per rollout per process
    mini_batch_size: int = 4  # answers per gradient step
    ppo_epochs: int = 2  # passes over each rollout
    lr: float = 1e-5
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling temperature; log-probs use the same temperature
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    clip_eps: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value prediction clip (around the rollout's values)
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    beta: float = 0.05  # KL penalty coefficient (the initial one when adaptive)
    kl_estimator: str = "k1"  # per-token KL in the reward: k1 = log pi - log ref, or k3
    adaptive_kl: bool = False
    kl_target: float = 6.0  # nats per answer (sum over its tokens), adaptive controller
    kl_horizon: float = 10000.0  # answers, adaptive controller
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None  # subtracted from the score of unfinished answers
    score_clip: float | None = None  # clip RM scores to [-c, c]
    train_layers: int = 0  # > 0: train only the top N decoder layers (+ final norm, value head)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool | None = None  # None: on for CUDA devices with bf16

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                     "max_prompt_length"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name.replace('_', '-')} must be >= 1")
        if self.mini_batch_size > self.batch_size:
            raise InvalidArgument("mini-batch-size must be <= batch-size")
        if self.lr <= 0 or self.temperature <= 0:
            raise InvalidArgument("lr and temperature must be > 0")
        if not 0 < self.clip_eps < 1 or self.value_clip <= 0:
            raise InvalidArgument("clip-eps must be in (0, 1) and value-clip > 0")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise InvalidArgument("gamma and lambda must be in [0, 1]")
        if self.beta < 0 or self.vf_coef < 0:
            raise InvalidArgument("beta and vf-coef must be >= 0")
        if self.kl_estimator not in L.KL_ESTIMATORS:
            raise InvalidArgument(f"kl estimator {self.kl_estimator!r} is not one of "
                                  f"{L.KL_ESTIMATORS}")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0 or self.beta <= 0):
            raise InvalidArgument("adaptive KL needs beta, kl-target and kl-horizon > 0")
        if self.train_layers < 0:
            raise InvalidArgument("train-layers must be >= 0 (0 = all layers)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Model pieces


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding), as HF generate does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]


def _hidden_states(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=_position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state  # [B, L, H]


def response_logits(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_len: int) -> torch.Tensor:
    """Logits predicting the last `response_len` tokens of `input_ids` ([B, P + R]):
    `[B, R, V]` (the LM head runs on those positions only)."""
    hidden = _hidden_states(lm, input_ids, attention_mask)[:, -response_len - 1:-1]  # [B, R, H]
    return lm.get_output_embeddings()(hidden)


class PolicyWithValue(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (shared trunk)."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.v_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: `[B, P + R]` (left-padded prompt, right-padded answer).
        Returns `(logits [B, R, V], values [B, R])` at the positions that predict the answer's
        tokens (the value of the state before each answer token)."""
        hidden = _hidden_states(self.lm, input_ids, attention_mask)[:, -response_len - 1:-1]
        logits = self.lm.get_output_embeddings()(hidden)  # [B, R, V]
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)  # [B, R]
        return logits, values.float()


def eos_token_ids(lm, tokenizer) -> list[int]:
    ids = getattr(lm.generation_config, "eos_token_id", None) if hasattr(lm, "generation_config") \
        else None
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not ids:
        raise InvalidArgument("the tokenizer has no EOS token: answers could never end")
    return ids


def answer_mask(responses: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for answer tokens up to and including the first EOS, 0 after it: `[B, R]` float."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device)).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).float()


def encode_prompt(tokenizer, messages: list[dict], max_prompt_length: int) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    return list(ids)[-max_prompt_length:]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask`: [B, longest], padded on the left."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, longest - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, longest - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_answers(lm, query_ids: torch.Tensor, query_mask: torch.Tensor, *,
                   max_new_tokens: int, temperature: float, pad_id: int, eos_ids: list[int]
                   ) -> torch.Tensor:
    """Answers sampled from `lm` (no top-k / top-p: the policy's own distribution at
    `temperature`): `[B, R]`, R <= max_new_tokens, padded with `pad_id` after EOS."""
    from transformers import GenerationConfig
    # every distribution-changing knob explicit: unset (None) fields would be filled from the
    # model's generation_config.json (e.g. a repetition penalty), and the sampler would no
    # longer draw from the policy whose log-probs PPO uses
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                              repetition_penalty=1.0, no_repeat_ngram_size=0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=eos_ids)
    out = lm.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    return out[:, query_ids.shape[1]:]


def answer_texts(tokenizer, responses: torch.Tensor, mask: torch.Tensor,
                 eos_ids: list[int]) -> list[str]:
    """The answers as text (without the EOS token)."""
    texts = []
    for row, m in zip(responses.tolist(), mask.tolist()):
        ids = [t for t, keep in zip(row, m) if keep and t not in eos_ids]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def score_answers(rm, rm_tokenizer, prompts: list[list[dict]], texts: list[str],
                  batch_size: int) -> torch.Tensor:
    """`[B]` float32 scores from a reward model, or from a reward function(prompts, texts)."""
    if callable(rm) and not isinstance(rm, nn.Module):
        return torch.as_tensor(rm(prompts, texts), dtype=torch.float32).reshape(len(texts))
    from prefloop.align.train.reward import score_texts
    return score_texts(rm, rm_tokenizer, prompts, texts, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass(slots=True)
class Rollout:
    """One batch of sampled answers and everything PPO needs about them (all on the device)."""

    input_ids: torch.Tensor  # [B, P + R] left-padded prompts + answers
    attention_mask: torch.Tensor  # [B, P + R]
    responses: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R] answer tokens (through the first EOS)
    old_logps: torch.Tensor  # [B, R] under the sampling policy
    ref_logps: torch.Tensor  # [B, R] under the reference
    old_values: torch.Tensor  # [B, R]
    entropy: torch.Tensor  # [B, R] of the sampling policy
    scores: torch.Tensor  # [B] reward-model scores (after penalty / clip)
    raw_scores: torch.Tensor  # [B] reward-model scores as returned
    finished: torch.Tensor  # [B] 1 if the answer ended with EOS
    texts: list[str]


def _rows_slice(rollout: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids / attention_mask of some rows, trimmed of all-padding columns on both ends;
    returns them and the answer length kept."""
    mask = rollout.mask[idx]
    response_len = max(int(mask.sum(1).max()), 1)
    full = rollout.responses.shape[1]
    ids = rollout.input_ids[idx][:, :rollout.input_ids.shape[1] - (full - response_len)]
    att = rollout.attention_mask[idx][:, :ids.shape[1]]
    prompt_len = ids.shape[1] - response_len
    first = int((att[:, :prompt_len].sum(0) > 0).nonzero()[0]) if prompt_len else 0
    return ids[:, first:], att[:, first:], response_len


@torch.no_grad()
def make_rollout(policy: PolicyWithValue, ref, rm, tokenizer, rm_tokenizer,
                 prompts: list[list[dict]], cfg: PPOConfig, *, device, autocast) -> Rollout:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = eos_token_ids(policy.lm, tokenizer)
    query_ids, query_mask = left_pad([encode_prompt(tokenizer, p, cfg.max_prompt_length)
                                      for p in prompts], pad_id, device)
    with autocast():
        responses = sample_answers(policy.lm, query_ids, query_mask,
                                   max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, pad_id=pad_id, eos_ids=eos_ids)
    mask = answer_mask(responses, eos_ids)  # [B, R]
    response_len = responses.shape[1]
    input_ids = torch.cat([query_ids, responses], dim=1)  # [B, P + R]
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)  # [B, P + R]
    logps, ref_logps, values, entropy = [], [], [], []
    for s in range(0, len(prompts), cfg.mini_batch_size):
        sl = slice(s, s + cfg.mini_batch_size)
        with autocast():
            logits, v = policy(input_ids[sl], attention_mask[sl], response_len)
            ref_logits = response_logits(ref, input_ids[sl], attention_mask[sl], response_len)
        lp, ent = L.token_logps_and_entropy(logits / cfg.temperature, responses[sl])
        rlp, _ = L.token_logps_and_entropy(ref_logits / cfg.temperature, responses[sl])
        logps.append(lp), ref_logps.append(rlp), values.append(v), entropy.append(ent)
    texts = answer_texts(tokenizer, responses, mask, eos_ids)
    with autocast():
        raw = score_answers(rm, rm_tokenizer, prompts, texts, cfg.mini_batch_size).to(device)
    finished = torch.isin(responses, torch.tensor(eos_ids, device=device)).any(1).float()  # [B]
    scores = raw.clone()
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (1 - finished)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return Rollout(input_ids, attention_mask, responses, mask, torch.cat(logps) * mask,
                   torch.cat(ref_logps) * mask, torch.cat(values) * mask, torch.cat(entropy),
                   scores, raw, finished, texts)


# ---------------------------------------------------------------------------------------------
# The update


def ppo_update(policy, optimizer, accelerator, rollout: Rollout, advantages: torch.Tensor,
               returns: torch.Tensor, cfg: PPOConfig, generator: torch.Generator
               ) -> dict[str, float]:
    """`ppo_epochs` passes of minibatch gradient steps over one rollout; mean metrics."""
    params = [p for p in policy.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    count = 0
    n = rollout.responses.shape[0]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(rollout.mask.device)
        for s in range(0, n, cfg.mini_batch_size):
            idx = order[s:s + cfg.mini_batch_size]
            ids, att, r = _rows_slice(rollout, idx)
            logits, values = policy(ids, att, r)
            logps, _ = L.token_logps_and_entropy(logits / cfg.temperature,
                                                 rollout.responses[idx][:, :r])
            mask = rollout.mask[idx][:, :r]
            pg_loss, pm = L.policy_loss(logps, rollout.old_logps[idx][:, :r],
                                        advantages[idx][:, :r], mask, cfg.clip_eps)
            vf_loss, vm = L.value_loss(values, rollout.old_values[idx][:, :r],
                                       returns[idx][:, :r], mask, cfg.value_clip)
            loss = pg_loss + cfg.vf_coef * vf_loss
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) \
                if cfg.max_grad_norm else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = dict(pm, **vm, loss=float(loss.detach()))
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / count for k, v in sums.items()}


def rollout_metrics(rollout: Rollout, rewards_kl: torch.Tensor, beta: float,
                    cfg: PPOConfig) -> dict[str, float]:
    """Reward, KL (k1 and k3, per answer and per token), entropy, lengths of one rollout."""
    mask = rollout.mask
    tokens = mask.sum(1)  # [B]
    k1 = L.kl_per_token(rollout.old_logps, rollout.ref_logps, "k1") * mask
    k3 = L.kl_per_token(rollout.old_logps, rollout.ref_logps, "k3") * mask
    penalty = -beta * (rewards_kl * mask).sum(1)  # [B]
    return {"reward": float(rollout.raw_scores.mean()),
            "reward_std": float(rollout.raw_scores.std(unbiased=False)),
            "score": float(rollout.scores.mean()),
            "kl": float(k1.sum(1).mean()), "kl_k3": float(k3.sum(1).mean()),
            "kl_per_token": float(k1.sum() / tokens.sum().clamp(min=1)),
            "non_score_reward": float(penalty.mean()),
            "total_reward": float((rollout.scores + penalty).mean()),
            "entropy": float(L.masked_mean(rollout.entropy, mask)),
            "response_length": float(tokens.mean()),
            "eos_fraction": float(rollout.finished.mean()),
            "value_mean_rollout": float(L.masked_mean(rollout.old_values, mask))}


# ---------------------------------------------------------------------------------------------
# Evaluation (held-out prompts)


@torch.no_grad()
def evaluate_policy(lm, ref, rm, tokenizer, rm_tokenizer, prompts: list[list[dict]], *,
                    max_new_tokens: int, temperature: float = 1.0, samples: int = 1,
                    seed: int = 0, batch_size: int = 8, max_prompt_length: int = 512,
                    progress: str | None = None, return_texts: bool = False) -> dict[str, Any]:
    """Mean reward of answers sampled from `lm` on `prompts` (`samples` per prompt, seeded so
    two policies draw with the same random numbers), and KL(lm ‖ ref) on those answers: exact
    over the vocabulary per token (`kl_per_token`, what the gate bounds), and the k1 estimate
    per answer. "rewards" lists every answer's score, prompt by prompt (the gate's paired
    comparison). `return_texts` adds every answer under "texts" (else 4 under "examples")."""
    from tqdm.auto import tqdm

    from prefloop.align.losses import token_kl
    if not prompts:
        return {"prompts": 0}
    device = next(lm.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = eos_token_ids(lm, tokenizer)
    items = [p for p in prompts for _ in range(samples)]
    rewards, kl_sum, k1_sum, tokens = [], 0.0, [], 0.0
    texts_all: list[str] = []
    starts = list(range(0, len(items), batch_size))
    for b, s in enumerate(tqdm(starts, desc=progress, disable=progress is None, leave=False)):
        group = items[s:s + batch_size]
        query_ids, query_mask = left_pad([encode_prompt(tokenizer, p, max_prompt_length)
                                          for p in group], pad_id, device)
        torch.manual_seed(seed * 1_000_003 + b)
        responses = sample_answers(lm, query_ids, query_mask, max_new_tokens=max_new_tokens,
                                   temperature=temperature, pad_id=pad_id, eos_ids=eos_ids)
        mask = answer_mask(responses, eos_ids)
        r = responses.shape[1]
        ids = torch.cat([query_ids, responses], 1)
        att = torch.cat([query_mask, mask.long()], 1)
        logits = response_logits(lm, ids, att, r) / temperature  # [b, R, V]
        ref_logits = response_logits(ref, ids, att, r) / temperature
        kl = token_kl(logits, ref_logits) * mask  # [b, R] exact per-token KL
        lp, _ = L.token_logps_and_entropy(logits, responses)
        rlp, _ = L.token_logps_and_entropy(ref_logits, responses)
        k1_sum += ((lp - rlp) * mask).sum(1).tolist()
        kl_sum += float(kl.sum())
        tokens += float(mask.sum())
        texts = answer_texts(tokenizer, responses, mask, eos_ids)
        texts_all += texts
        rewards += score_answers(rm, rm_tokenizer, group, texts, batch_size).tolist()
    rewards_t = torch.tensor(rewards, dtype=torch.float64)
    out = {"prompts": len(prompts), "samples": len(items), "reward": float(rewards_t.mean()),
           "reward_std": float(rewards_t.std(unbiased=False)),
           "kl_per_token": kl_sum / max(tokens, 1.0),
           "kl_per_sequence": kl_sum / len(items),
           "k1_per_sequence": sum(k1_sum) / len(items),
           "response_length": tokens / len(items), "examples": texts_all[:4],
           "rewards": rewards}  # per answer, prompt-major (`samples` per prompt)
    if return_texts:
        out["texts"] = texts_all
    return out


def sample_texts(lm, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int,
                 temperature: float, seed: int, batch_size: int = 8,
                 max_prompt_length: int = 512) -> list[str]:
    """One sampled answer per prompt (same `seed` => the same random stream for every model)."""
    device = next(lm.parameters()).device
    eos = eos_token_ids(lm, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        torch.manual_seed(seed + start)
        ids, mask = left_pad([encode_prompt(tokenizer, p, max_prompt_length)
                              for p in prompts[start:start + batch_size]], pad, device)
        responses = sample_answers(lm, ids, mask, max_new_tokens=max_new_tokens,
                                   temperature=temperature, pad_id=pad, eos_ids=eos)
        out += answer_texts(tokenizer, responses, answer_mask(responses, eos), eos)
    return out


# ---------------------------------------------------------------------------------------------
# Metrics file and plot


def write_metrics_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_metrics(history: list[dict[str, Any]], png_path: Path, title: str = "PPO") -> Path:
    """Reward and KL per step as a small PNG (written to a temp name, then renamed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    ax_r.plot(steps, [h["reward"] for h in history], label="RM score (mean)", marker=".")
    ax_r.plot(steps, [h["total_reward"] for h in history], label="score - KL penalty",
              linestyle="--")
    ax_r.set_xlabel("PPO step")
    ax_r.set_title("reward")
    ax_r.legend(fontsize=7)
    ax_k.plot(steps, [h["kl"] for h in history], label="KL k1 (nats/answer)", marker=".")
    ax_k.plot(steps, [h["kl_k3"] for h in history], label="KL k3", linestyle="--")
    ax_k.set_xlabel("PPO step")
    ax_k.set_title("KL to the reference")
    ax_k.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(png_path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(slots=True)
class PPOResult:
    model: Any  # the trained causal LM (CPU, float32, eval); None off the main process
    tokenizer: Any
    history: list[dict[str, Any]]  # one metrics dict per step
    steps: int
    runtime_s: float
    beta: float  # the final KL coefficient
    trainable_params: int


RewardFn = Callable[[list[list[dict]], list[str]], Any]


def train_ppo(base_dir: Path, rm_dir: Path | None, prompts: list[list[dict]], cfg: PPOConfig, *,
              reward_fn: RewardFn | None = None, metrics_path: Path | None = None,
              progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None
              ) -> PPOResult:
    """PPO of the policy in `base_dir` (also the frozen reference) against the reward model in
    `rm_dir`, on `prompts` (chat message lists). See the module docstring.

    `reward_fn(prompts, answer_texts) -> [B] scores` replaces the reward model (rule-based
    rewards; the tests use it); exactly one of `rm_dir` and `reward_fn` is given."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from prefloop.align.train.common import (
        fresh_accelerator_state,
        load_causal_lm,
        load_tokenizer,
        use_bf16,
    )
    from prefloop.align.train.reward import freeze_lower_layers, load_reward_model

    if not prompts:
        raise InvalidArgument("no prompts to train on")
    fresh_accelerator_state()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16(cfg.bf16) else "no",
                              cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(base_dir)
    lm = load_causal_lm(base_dir)
    freeze_lower_layers(lm, cfg.train_layers)
    policy = PolicyWithValue(lm)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    if (rm_dir is None) == (reward_fn is None):
        raise InvalidArgument("give either a reward model folder or a reward function")
    ref = load_causal_lm(base_dir, str(device))
    if reward_fn is not None:
        rm, rm_tokenizer = reward_fn, None
    else:
        rm = load_reward_model(rm_dir, str(device))
        rm_tokenizer = load_tokenizer(rm_dir)
        for p in rm.parameters():
            p.requires_grad_(False)
    for p in ref.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, eps=1e-5)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    world, rank = accelerator.num_processes, accelerator.process_index
    rng = random.Random(cfg.seed)
    order: list[int] = []
    generator = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    beta = cfg.beta
    history: list[dict[str, Any]] = []
    main = accelerator.is_main_process
    if metrics_path is not None and main:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text("")
    started = time.monotonic()
    bar = tqdm(range(1, cfg.steps + 1), desc="PPO", disable=not (progress and main))
    for step in bar:
        t0 = time.monotonic()
        while len(order) < cfg.batch_size * world:  # epochs over the prompts, reshuffled
            perm = list(range(len(prompts)))
            rng.shuffle(perm)
            order += perm
        global_batch, order = order[:cfg.batch_size * world], order[cfg.batch_size * world:]
        batch = [prompts[i] for i in global_batch[rank * cfg.batch_size:
                                                   (rank + 1) * cfg.batch_size]]
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # sampling
        unwrapped.eval()
        rollout = make_rollout(unwrapped, ref, rm, tokenizer, rm_tokenizer, batch, cfg,
                               device=device, autocast=accelerator.autocast)
        rewards, kl = L.per_token_rewards(rollout.scores, rollout.old_logps, rollout.ref_logps,
                                          rollout.mask, beta, cfg.kl_estimator)
        advantages, returns = L.gae(rewards, rollout.old_values, rollout.mask, cfg.gamma,
                                    cfg.lam)
        if cfg.whiten_advantages:
            advantages = L.masked_whiten(advantages, rollout.mask)
        stats = rollout_metrics(rollout, kl, beta, cfg)
        stats.update(ppo_update(policy, optimizer, accelerator, rollout, advantages, returns,
                                cfg, generator))
        stats["returns_mean"] = float(L.masked_mean(returns, rollout.mask))
        keys = sorted(stats)
        reduced = accelerator.reduce(torch.tensor([stats[k] for k in keys], device=device,
                                                  dtype=torch.float64), reduction="mean")
        stats = dict(zip(keys, reduced.tolist()))
        record = dict(stats, step=step, beta=beta, samples=step * cfg.batch_size * world,
                      step_s=round(time.monotonic() - t0, 3),
                      elapsed_s=round(time.monotonic() - started, 3))
        if cfg.adaptive_kl:
            beta = L.adaptive_kl_coef(beta, stats["kl"], cfg.kl_target, cfg.kl_horizon,
                                      cfg.batch_size * world)
        history.append(record)
        if main:
            if metrics_path is not None:
                write_metrics_line(Path(metrics_path), record)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}",
                            clip=f"{stats['clip_fraction']:.2f}", refresh=False)
            if on_step is not None:
                on_step(record)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"PPO loss is {stats['loss']} at step {step}")
    accelerator.wait_for_everyone()
    runtime = time.monotonic() - started
    if not main:
        return PPOResult(None, tokenizer, history, cfg.steps, runtime, beta, trainable)
    trained = accelerator.unwrap_model(policy).lm.to("cpu").float().eval()
    for p in trained.parameters():
        p.requires_grad_(True)
    del ref, rm, optimizer
    return PPOResult(trained, tokenizer, history, cfg.steps, runtime, beta, trainable)
