"""The eval gate: may a candidate replace the current version?

A pure decision on measured numbers. The candidate passes only if
1. there are at least `min_heldout` held-out pairs to judge on,
2. its held-out preference accuracy (reference-free: the chosen answer gets the higher mean
   log-probability per token, `losses.preference_accuracy`) beats the current version's on the same pairs by
   more than `min_improvement`, and
3. its KL to the reference (mean per completion token on the held-out answers) is at most
   `max_kl`.
Every check adds a reason, passed or not; the reasons go into the manifest and the job history.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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
    passed: bool
    reasons: list[str] = field(default_factory=list)
    candidate_accuracy: float | None = None
    current_accuracy: float | None = None
    current_version: str | None = None
    kl_per_token: float | None = None
    max_kl: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def kl_within_bound(kl_per_token: float | None, max_kl: float) -> tuple[bool, str]:
    """The KL half of every gate: (passed, reason). Not measured (None / NaN) fails."""
    if kl_per_token is None or math.isnan(kl_per_token):
        return False, "KL to the reference was not measured"
    within = kl_per_token <= max_kl
    return within, (f"KL to the reference {kl_per_token:.4f} nats/token "
                    f"{'<=' if within else '>'} bound {max_kl:g}")


def decide(*, candidate_accuracy: float | None, current_accuracy: float | None,
           current_version: str | None, kl_per_token: float | None, heldout_pairs: int,
           config: GateConfig) -> GateDecision:
    reasons: list[str] = []
    ok = True
    if heldout_pairs < config.min_heldout:
        ok = False
        reasons.append(f"only {heldout_pairs} held-out pairs; the gate needs at least "
                       f"{config.min_heldout}")
    if candidate_accuracy is None or current_accuracy is None or math.isnan(candidate_accuracy) \
            or math.isnan(current_accuracy):
        ok = False
        reasons.append("no held-out preference accuracy to compare")
    else:
        gain = candidate_accuracy - current_accuracy
        verdict = "beats" if gain > config.min_improvement else "does not beat"
        ok = ok and gain > config.min_improvement
        reasons.append(f"held-out preference accuracy {candidate_accuracy:.3f} {verdict} current "
                       f"{current_version}'s {current_accuracy:.3f} (gain {gain:+.3f}, needs > "
                       f"{config.min_improvement:+.3f})")
    within, reason = kl_within_bound(kl_per_token, config.max_kl)
    ok = ok and within
    reasons.append(reason)
    return GateDecision(ok, reasons, candidate_accuracy, current_accuracy, current_version,
                        kl_per_token, config.max_kl)
