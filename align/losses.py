"""Preference losses and metrics as pure functions of sequence log-probabilities.

TRL trains; these functions are what prefloop evaluates with (train and held-out metrics, the eval
gate), written once and tested in closed form (at initialization, policy == reference, the DPO
sigmoid loss is exactly log 2). Same definitions as TRL 1.16's `DPOTrainer` for the four losses
`prefloop align dpo --loss` offers.

Shapes: every tensor argument is `[batch]` (one value per pair, summed over completion tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and implicit rewards.

    Returns `(losses, chosen_rewards, rejected_rewards)`, each `[batch]`, where
    `chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)` (same for rejected).
    - sigmoid (DPO): -log σ(β Δ), Δ = chosen log-ratio - rejected log-ratio;
    - hinge (SLiC): max(0, 1 - β Δ);
    - ipo: (Δ_tok - 1/(2β))², Δ_tok from log-ratios divided by completion token counts
      (`chosen_tokens` / `rejected_tokens`, `[batch]`), as TRL does;
    - robust (rDPO): (-(1-ε) log σ(β Δ) + ε log σ(-β Δ)) / (1 - 2ε), ε = `label_smoothing`.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [batch]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [batch]
    delta = chosen_logratios - rejected_logratios  # [batch]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens")
        per_token = (chosen_logratios / chosen_tokens.clamp(min=1)
                     - rejected_logratios / rejected_tokens.clamp(min=1))
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown loss {loss_type!r}; choose one of {LOSSES}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reward_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor,
                   rejected_rewards: torch.Tensor) -> dict[str, float]:
    """loss, reward accuracy (chosen reward strictly above rejected, like TRL) and margin."""
    margins = chosen_rewards - rejected_rewards  # [batch]
    return {"loss": float(losses.mean()), "reward_accuracy": float((margins > 0).float().mean()),
            "reward_margin": float(margins.mean()), "chosen_reward": float(chosen_rewards.mean()),
            "rejected_reward": float(rejected_rewards.mean())}


def preference_accuracy(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> float:
    """Reference-free: the fraction of pairs where the model gives the chosen answer the higher
    log-probability (ties count one half). This is what the eval gate compares across versions.

    chosen_logps, rejected_logps: `[batch]` completion log-probs of one model (the evaluator passes
    the mean per token, so answer length does not decide).
    """
    if chosen_logps.numel() == 0:
        return float("nan")
    wins = (chosen_logps > rejected_logps).float() + 0.5 * (chosen_logps == rejected_logps).float()
    return float(wins.mean())


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(policy ‖ reference) over the vocabulary.

    policy_logits, ref_logits: `[..., vocab]` (e.g. `[tokens, vocab]`); returns `[...]` (nats).
    """
    policy_logp = F.log_softmax(policy_logits.float(), dim=-1)  # [..., vocab]
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)  # [..., vocab]
    return (policy_logp.exp() * (policy_logp - ref_logp)).sum(-1)  # [...]
