"""PPO's pieces as pure functions on per-token tensors: KL estimators, the per-token KL-penalized
reward, GAE, masked whitening, the clipped surrogate, the clipped value loss, entropy, and the
adaptive KL coefficient of Ziegler et al. (2019).

No model, no optimizer, no state: the loop in `align/train/ppo.py` feeds these functions tensors and
every one of them is checked in closed form by tests/align/test_ppo_losses.py.

Shapes. A rollout batch has B sequences; each has up to T generated tokens (the *response*),
right-padded. Every per-token tensor is `[B, T]` and `mask` (`[B, T]`, 1 for a generated token,
0 for padding; each row is 1s followed by 0s) says which entries are real. Padded entries never
change a result (they are masked out of every mean and carry no reward, value or advantage).
`logps` are log π(a_t | s_t) of the sampled tokens under the current policy, `old_logps` the same
under the policy that sampled them (the rollout), `ref_logps` under the frozen reference.
Losses return `(loss, metrics)`: a scalar tensor to differentiate and a dict of float metrics.
"""
from __future__ import annotations

import math

import torch

KL_ESTIMATORS = ("k1", "k3")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1 (over all entries, or along `dim`)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is 1 (0 when there are none)."""
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected, n-1 in the denominator, by default)."""
    n = mask.sum()
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with mean and (unbiased) variance over the masked entries.

    values, mask: `[B, T]`. Padded entries are set to 0. With `shift_mean=False` the mean is added
    back (scale only), as for rewards.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1"
                 ) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π (Schulman, "Approximating
    KL divergence", 2020). With log r = ref_logps - logps:

    - k1 = -log r = logps - ref_logps (unbiased, can be negative, high variance);
    - k3 = (r - 1) - log r (unbiased, always >= 0, lower variance).

    logps, ref_logps: `[B, T]`; returns `[B, T]` (nats). Mask the result yourself.
    """
    log_ratio = ref_logps - logps  # log r, [B, T]
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: mask `[B, T]` -> `[B]` (0 for an empty row)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def per_token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                      mask: torch.Tensor, beta: float, estimator: str = "k1"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The RLHF reward of "Learning to summarize from human feedback" (Stiennon et al. 2020):

        r_t = -beta * KL_t            at every generated token t,
        r_T += score                  at the last generated token T of the row,

    with KL_t = `kl_per_token(logps, ref_logps, estimator)` (k1 gives the paper's
    -beta * (log π - log π_ref)).

    scores: `[B]` reward-model scores of the whole responses; logps, ref_logps, mask: `[B, T]`.
    Returns `(rewards, kl)`, both `[B, T]`, zero at padded positions.
    """
    kl = kl_per_token(logps, ref_logps, estimator) * mask  # [B, T]
    rewards = -beta * kl  # [B, T]
    last = last_token_index(mask)  # [B]
    has_tokens = (mask.sum(1) > 0).to(rewards.dtype)  # [B]: an empty row gets no score
    score_at_last = (scores.to(rewards.dtype) * has_tokens)[:, None]  # [B, 1]
    rewards = rewards.scatter_add(1, last[:, None], score_at_last)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), right to left:

        delta_t = r_t + gamma * V_{t+1} - V_t        (V_{t+1} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A_{t+1} = 0 after the last real token)
        R_t     = A_t + V_t                          (the value targets, "returns")

    rewards, values, mask: `[B, T]`. Returns `(advantages, returns)`, `[B, T]`, zero at padding.
    No gradient flows through them.
    """
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(values.dtype)
    steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])  # [B]
    next_value = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(steps)):
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(mask[:, 0])  # [B]
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage * next_mask) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017), to minimize:

        ratio_t = exp(logps_t - old_logps_t)
        loss    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    the mean over the masked tokens of the batch. logps (with grad), old_logps, advantages,
    mask: `[B, T]`. Metrics: `clip_fraction` (share of tokens where the clipped term is the
    larger one, i.e. the gradient is cut), `approx_kl` (mean of ½(log ratio)², old → new),
    `ratio_mean`, `policy_loss`.
    """
    log_ratio = logps - old_logps.detach()  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # [B, T]
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"policy_loss": float(loss),
                   "clip_fraction": float(masked_mean((clipped > unclipped).to(mask.dtype), mask)),
                   "approx_kl": float(masked_mean(0.5 * log_ratio ** 2, mask)),
                   "ratio_mean": float(masked_mean(ratio, mask))}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float = 0.2
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (as in OpenAI's baselines / lm-human-preferences):

        V_clip = old_V + clip(V - old_V, -c, c)
        loss   = ½ · mean_t max((V_t - R_t)², (V_clip_t - R_t)²)

    values (with grad), old_values, returns, mask: `[B, T]`. Metrics: `value_loss`,
    `value_clip_fraction` (share of tokens where the clipped error is the larger one),
    `value_mean`.
    """
    old_values = old_values.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    error = (values - returns) ** 2  # [B, T]
    clipped_error = (clipped_values - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        metrics = {"value_loss": float(loss),
                   "value_clip_fraction": float(masked_mean((clipped_error > error).to(mask.dtype),
                                                            mask)),
                   "value_mean": float(masked_mean(values, mask))}
    return loss, metrics


def token_logps_and_entropy(logits: torch.Tensor, tokens: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """log-prob of `tokens` and the entropy of each next-token distribution.

    logits: `[B, T, V]` (the distribution over token t given everything before it);
    tokens: `[B, T]`. Returns `(logps, entropy)`, each `[B, T]`, in float32.
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)  # [B, T]
    logps = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_z  # [B, T]
    probs = torch.softmax(logits, dim=-1)  # [B, T, V]
    entropy = log_z - (probs * logits).sum(-1)  # [B, T]
    return logps, entropy


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: float, n_steps: int
                     ) -> float:
    """Ziegler et al. (2019)'s proportional controller for beta:

        e     = clip(kl / target - 1, -0.2, 0.2)
        beta' = beta * (1 + e * n_steps / horizon)

    kl: the measured KL per *sequence* (sum over its tokens, mean over the batch); `n_steps`:
    sequences in that batch; `horizon`: how many sequences it takes to correct most of an error.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
    if not math.isfinite(kl):
        return beta
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)
