"""The eval gates: may a candidate be published as good (and replace the current version)?

Pure decisions on measured numbers, one result shape for all of them (`GateDecision`: passed,
reasons, metrics). Every check adds a reason, passed or not; `GateDecision.to_dict()` (passed,
reasons and the metrics as flat keys) goes into the manifest and the job history.

- `decide` (DPO / KTO candidates) passes only if
  1. there are at least `min_heldout` held-out pairs to judge on,
  2. its held-out preference accuracy (reference-free: the chosen answer gets the higher mean
     log-probability per token, `losses.preference_accuracy`) beats the current version's on the
     same pairs by more than `min_improvement`, and
  3. its KL to the reference (mean per completion token on the held-out answers) is at most
     `max_kl`.
- `ppo_gate` (PPO candidates): the same three checks on held-out *prompts*, with the mean
  reward-model score of sampled answers (same prompts, same seeds) in place of the accuracy.
- `reward_model_gate` (reward models; recorded, never blocks publishing): held-out pairwise
  accuracy above `min_accuracy`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prefloop.server.errors import InvalidArgument

DEFAULT_MAX_KL = 0.5  # nats per completion token


@dataclass(slots=True)
class GateConfig:
    max_kl: float = DEFAULT_MAX_KL
    min_improvement: float = 0.0
    min_heldout: int = 1

    def __post_init__(self) -> None:
        if not self.max_kl > 0:
            raise InvalidArgument(f"max KL must be > 0, got {self.max_kl}")
        if not -1.0 < self.min_improvement < 1.0:
            raise InvalidArgument(f"min improvement must be in (-1, 1), got {self.min_improvement}")
        if self.min_heldout < 1:
            raise InvalidArgument("min held-out must be >= 1")


@dataclass(slots=True)
class GateDecision:
    """One gate's verdict: `passed`, a reason per check, and the numbers it judged on."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """{"passed", "reasons", **metrics}: the manifest's / job history's `gate` object."""
        return {"passed": self.passed, "reasons": list(self.reasons), **self.metrics}


def kl_within_bound(kl_per_token: float | None, max_kl: float) -> tuple[bool, str]:
    """The KL half of every policy gate: (passed, reason). Not measured (None / NaN) fails."""
    if kl_per_token is None or math.isnan(kl_per_token):
        return False, "KL to the reference was not measured"
    within = kl_per_token <= max_kl
    return within, (f"KL to the reference {kl_per_token:.4f} nats/token "
                    f"{'<=' if within else '>'} bound {max_kl:g}")


def _policy_gate(*, candidate: float | None, current: float | None, current_version: str | None,
                 kl_per_token: float | None, heldout: int, config: GateConfig, unit: str,
                 measure: str, missing: str, digits: int) -> tuple[bool, list[str]]:
    """Enough held-out `unit`s, the candidate's `measure` beats the current version's by more
    than `min_improvement`, KL within bound: (passed, reasons)."""
    reasons: list[str] = []
    ok = True
    if heldout < config.min_heldout:
        ok = False
        reasons.append(f"only {heldout} held-out {unit}; the gate needs at least "
                       f"{config.min_heldout}")
    if candidate is None or current is None or not math.isfinite(candidate) \
            or not math.isfinite(current):
        ok = False
        reasons.append(f"no held-out {missing} to compare")
    else:
        gain = candidate - current
        beats = gain > config.min_improvement
        ok = ok and beats
        reasons.append(f"held-out {measure} {candidate:.{digits}f} "
                       f"{'beats' if beats else 'does not beat'} current {current_version}'s "
                       f"{current:.{digits}f} (gain {gain:+.{digits}f}, needs > "
                       f"{config.min_improvement:+.{digits}f})")
    within, reason = kl_within_bound(kl_per_token, config.max_kl)
    reasons.append(reason)
    return ok and within, reasons


def decide(*, candidate_accuracy: float | None, current_accuracy: float | None,
           current_version: str | None, kl_per_token: float | None, heldout_pairs: int,
           config: GateConfig) -> GateDecision:
    """The DPO / KTO gate (module docstring)."""
    ok, reasons = _policy_gate(
        candidate=candidate_accuracy, current=current_accuracy, current_version=current_version,
        kl_per_token=kl_per_token, heldout=heldout_pairs, config=config, unit="pairs",
        measure="preference accuracy", missing="preference accuracy", digits=3)
    return GateDecision(ok, reasons, {
        "candidate_accuracy": candidate_accuracy, "current_accuracy": current_accuracy,
        "current_version": current_version, "kl_per_token": kl_per_token,
        "max_kl": config.max_kl})


def ppo_gate(*, candidate_reward: float | None, current_reward: float | None,
             current_version: str | None, kl_per_token: float | None, heldout_prompts: int,
             config: GateConfig) -> GateDecision:
    """The PPO gate: mean held-out reward must beat the current version's (same prompts, same
    seeds) by more than `min_improvement` (reward-model units), and the candidate's exact KL to
    its base, per answer token, must stay <= `max_kl`."""
    ok, reasons = _policy_gate(
        candidate=candidate_reward, current=current_reward, current_version=current_version,
        kl_per_token=kl_per_token, heldout=heldout_prompts, config=config, unit="prompts",
        measure="mean reward", missing="reward", digits=4)
    return GateDecision(ok, reasons, {
        "metric": "heldout_reward", "candidate_reward": candidate_reward,
        "current_reward": current_reward, "current_version": current_version,
        "kl_per_token": kl_per_token, "max_kl": config.max_kl,
        "min_improvement": config.min_improvement})


def reward_model_gate(heldout: dict[str, Any], min_accuracy: float) -> GateDecision:
    """A reward model's gate on its held-out pairwise metrics (`pairs`, `accuracy`)."""
    pairs, acc = int(heldout.get("pairs", 0)), heldout.get("accuracy")
    if pairs < 1 or acc is None:
        return GateDecision(False, ["no held-out pairs to measure accuracy on"],
                            {"heldout_accuracy": None, "min_accuracy": min_accuracy})
    ok = acc > min_accuracy
    return GateDecision(ok, [f"held-out pairwise accuracy {acc:.3f} on {pairs} pairs "
                             f"{'>' if ok else '<='} {min_accuracy:.3f}"],
                        {"heldout_accuracy": acc, "min_accuracy": min_accuracy})
