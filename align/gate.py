"""The eval gates: may a candidate be published as good (and replace the current version)?

Pure decisions on measured numbers, one result shape for all of them (`GateDecision`: passed,
reasons, metrics). Every check adds a reason, passed or not; `GateDecision.to_dict()` (passed,
reasons and the metrics as flat keys) goes into the manifest and the job history.

Every gate knows its sample size. The candidate is compared with the current version on the
SAME held-out units (pairs, or prompts for PPO); each unit is a win, a loss or a tie
(`Paired`). Ties carry no information about which one is better and are left out (McNemar /
the exact sign test); the wins out of the units that differ get an exact (Clopper-Pearson)
two-sided interval at `confidence`, and a check passes only if the interval's LOWER end is above
its threshold (0.5 + `min_improvement` for "candidate better than current"). Under the null
(candidate no better: every differing unit a coin flip) a check passes with probability at most
(1 - confidence) / 2: 5 % at the default confidence 0.9. Below `min_heldout` units no gate passes.

- `decide` (DPO / KTO / SFT candidates), on held-out preference pairs:
  1. at least `min_heldout` held-out pairs;
  2. the paired comparison of `metric` passes. Pair i's implicit-reward margin is
     (log π_cand − log π_current)(chosen) − (…)(rejected): > 0 when DPO's implicit reward
     β·log π_cand/π_current ranks the voters' choice higher, i.e. the candidate moved towards
     what voters preferred relative to the version it would replace. "implicit_reward": the
     share of pairs with a positive margin (sign test; interval's lower end above 0.5 +
     `min_improvement`); "implicit_margin": the mean margin (sign-flip test, `MarginTest`);
     "implicit_either" (default): either of the two at half the level (`EitherTest`, Bonferroni:
     the same 5 % under random votes); "pref_accuracy": a win when the candidate ranks the pair
     right by mean log-prob per token and the current version does not;
  3. the candidate's KL to its reference (mean per completion token) is at most `max_kl`.
  The reference-free preference accuracy of both versions is reported either way.
- `ppo_gate` (PPO candidates), on held-out prompts: per prompt, the reward model's mean score of
  the candidate's sampled answers vs the current version's (same seeds): a win when the
  candidate's is higher. The same interval check (the reward model's win rate of candidate
  generations over current generations), the same minimum and the same KL bound.
- `reward_model_gate` (reward models; recorded, PPO refuses a failed one unless forced): at
  least `min_pairs` held-out pairs and the interval of its pairwise accuracy (chosen scored
  strictly higher; ties left out) above `min_accuracy`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from prefloop.server.errors import InvalidArgument

DEFAULT_MAX_KL = 0.5  # nats per completion token
DEFAULT_CONFIDENCE = 0.9  # two-sided; one-sided false-pass rate (1 - 0.9) / 2 = 5 %
DEFAULT_MIN_HELDOUT = 20
METRICS = ("implicit_either", "implicit_margin", "implicit_reward", "pref_accuracy")
MISSING_HINT = "collect more votes, raise --heldout-fraction or lower --min-heldout-pairs"


# ---------------------------------------------------------------------------------------------
# Statistics (exact, pure Python)


def binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    # sum in log space: n up to a few thousand without overflow
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            + j * math.log(p) + (n - j) * math.log1p(-p) for j in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins), X ~ Binomial(wins + losses, 1/2)."""
    return binomial_tail(wins, wins + losses, 0.5)


def _solve(f, target: float) -> float:
    """p in [0, 1] with f(p) = target for f increasing in p (bisection to 1e-12)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """The exact two-sided `confidence` interval of a binomial proportion k / n
    (each side (1 - confidence) / 2); (0, 1) when n == 0."""
    if not 0.0 < confidence < 1.0:
        raise InvalidArgument(f"confidence must be in (0, 1), got {confidence}")
    if n < 0 or not 0 <= k <= n:
        raise InvalidArgument(f"need 0 <= k <= n, got k={k}, n={n}")
    alpha = (1.0 - confidence) / 2
    # lower: P(X >= k | p) = alpha; upper: P(X >= k+1 | p) = 1 - alpha (both increasing in p)
    lower = 0.0 if k == 0 else _solve(lambda p: binomial_tail(k, n, p), alpha)
    upper = 1.0 if k == n else _solve(lambda p: binomial_tail(k + 1, n, p), 1.0 - alpha)
    return lower, upper


def sign_flip_p(values: list[float], draws: int = 20000, seed: int = 0) -> float:
    """One-sided p-value of "mean(values) > 0" under random signs: the share of sign flips of
    `values` whose sum is at least the observed sum. Exact (all 2^n flips) for n <= 16, else
    Monte Carlo with `draws` flips and the (1 + hits) / (1 + draws) correction, which keeps it
    a valid p-value. Exact in level when each value's sign is a coin flip independent of its
    size: held-out votes that are random relative to what the candidate learned."""
    import numpy as np
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n == 0:
        return 1.0
    observed = v.sum() - 1e-12 * max(1.0, float(np.abs(v).sum()))  # ties count as hits
    if n <= 16:
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(((signs @ v) >= observed).mean())
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(draws, n), dtype=np.int8) * 2 - 1
    hits = int(((signs @ v) >= observed).sum())
    return (1 + hits) / (1 + draws)


def bootstrap_mean_interval(values: list[float], confidence: float, draws: int = 4000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (reported beside the sign-flip test)."""
    import numpy as np
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(draws, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@dataclass(slots=True, frozen=True)
class MarginTest:
    """The implicit-reward margins of the held-out pairs (candidate vs current, per pair, in
    nats summed over the answer): is their mean above 0 at `confidence`? One-sided sign-flip
    test at level (1 - confidence) / 2; the bootstrap interval of the mean is reported."""

    n: int
    mean: float
    lower: float
    upper: float
    p_value: float
    confidence: float

    @classmethod
    def of(cls, margins: list[float], confidence: float) -> "MarginTest":
        lower, upper = bootstrap_mean_interval(margins, confidence)
        mean = sum(margins) / len(margins) if margins else math.nan
        return cls(len(margins), mean, lower, upper, sign_flip_p(margins), confidence)

    @property
    def passed(self) -> bool:
        return self.n > 0 and self.p_value < (1.0 - self.confidence) / 2

    def describe(self, what: str, unit: str) -> str:
        if not self.n:
            return f"{what}: no {unit} to judge on"
        return (f"{what} {self.mean:+.3f} nats over {self.n} {unit}, {self.confidence:.0%} "
                f"bootstrap interval [{self.lower:+.3f}, {self.upper:+.3f}]: one-sided sign-flip "
                f"p = {self.p_value:.3g} {'<' if self.passed else '>='} "
                f"{(1.0 - self.confidence) / 2:.3g}")

    def to_metrics(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}mean_margin": self.mean, f"{prefix}margin_interval": [self.lower, self.upper],
                f"{prefix}margin_p_value": self.p_value, f"{prefix}margin_pairs": self.n}


@dataclass(slots=True, frozen=True)
class Paired:
    """A paired comparison on held-out units: the candidate wins, loses or ties each one."""

    wins: int
    losses: int
    ties: int = 0

    def __post_init__(self) -> None:
        if min(self.wins, self.losses, self.ties) < 0:
            raise InvalidArgument("win / loss / tie counts must be >= 0")

    @property
    def units(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def differing(self) -> int:
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        """Wins out of the units that differ (None when none does)."""
        return self.wins / self.differing if self.differing else None

    @classmethod
    def from_differences(cls, differences: Iterable[float], tol: float = 0.0) -> "Paired":
        """Counts from per-unit differences (candidate − current; > tol wins, < -tol loses)."""
        wins = losses = ties = 0
        for d in differences:
            if d > tol:
                wins += 1
            elif d < -tol:
                losses += 1
            else:
                ties += 1
        return cls(wins, losses, ties)


@dataclass(slots=True, frozen=True)
class Comparison:
    """The interval check of one `Paired`: is the win rate above `threshold` at `confidence`?"""

    paired: Paired
    confidence: float
    threshold: float
    lower: float
    upper: float
    p_value: float  # one-sided exact sign test against 1/2

    @classmethod
    def of(cls, paired: Paired, confidence: float, threshold: float = 0.5) -> "Comparison":
        lower, upper = clopper_pearson(paired.wins, paired.differing, confidence)
        return cls(paired, confidence, threshold, lower, upper,
                   sign_test_p(paired.wins, paired.losses))

    @property
    def passed(self) -> bool:
        return self.paired.differing > 0 and self.lower > self.threshold

    def describe(self, what: str, unit: str) -> str:
        """e.g. "implicit-reward win rate vs v0001 0.724 (21 wins, 8 losses, 0 ties of 29 pairs),
        90% interval [0.56, 0.85]: lower end > 0.50"."""
        p = self.paired
        rate = "-" if p.win_rate is None else f"{p.win_rate:.3f}"
        head = (f"{what} {rate} ({p.wins} wins, {p.losses} losses, {p.ties} ties of {p.units} "
                f"{unit}), {self.confidence:.0%} interval [{self.lower:.3f}, {self.upper:.3f}]")
        if not p.differing:
            return f"{head}: no {unit} differ, nothing to judge on"
        return (f"{head}: lower end {'>' if self.passed else '<='} {self.threshold:.3f} "
                f"(one-sided sign-test p = {self.p_value:.3g})")

    def to_metrics(self, prefix: str = "") -> dict[str, Any]:
        p = self.paired
        return {f"{prefix}wins": p.wins, f"{prefix}losses": p.losses, f"{prefix}ties": p.ties,
                f"{prefix}win_rate": p.win_rate, f"{prefix}interval": [self.lower, self.upper],
                f"{prefix}p_value": self.p_value}


@dataclass(slots=True, frozen=True)
class EitherTest:
    """The sign test and the sign-flip test on the same held-out pairs, each at half the level
    (both built at confidence 1 - (1 - c) / 2): passes when either does, so under random votes it
    passes with probability at most (1 - c) / 2 (Bonferroni). The sign test sees many small
    moves, the margin test a few large ones (docs/align.md). The margin test has no win-rate
    threshold, so with --min-improvement > 0 only the sign test can pass."""

    sign: Comparison
    margin: MarginTest | None

    @property
    def passed(self) -> bool:
        margin_counts = self.margin is not None and self.sign.threshold == 0.5
        return self.sign.passed or (margin_counts and self.margin.passed)

    def describe(self, what: str, unit: str) -> str:
        level = (1.0 - self.sign.confidence) / 2
        margin = (self.margin.describe("mean margin", unit) if self.margin is not None
                  else "mean margin: not measured")
        return (f"{what}, {'passed' if self.passed else 'failed'}: either test at half the level "
                f"(one-sided {level:.3g} each): win rate {self.sign.describe('', unit).lstrip()}; "
                f"{margin}")


# ---------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(slots=True)
class GateConfig:
    max_kl: float = DEFAULT_MAX_KL
    min_improvement: float = 0.0  # the win rate's lower end must be above 0.5 + this
    min_heldout: int = DEFAULT_MIN_HELDOUT
    confidence: float = DEFAULT_CONFIDENCE
    metric: str = "implicit_either"  # decide(): one of METRICS

    def __post_init__(self) -> None:
        if not self.max_kl > 0:
            raise InvalidArgument(f"max KL must be > 0, got {self.max_kl}")
        if not -0.5 < self.min_improvement < 0.5:
            raise InvalidArgument(
                f"min improvement (of the win rate over 0.5) must be in (-0.5, 0.5), got "
                f"{self.min_improvement}")
        if self.min_heldout < 1:
            raise InvalidArgument("min held-out pairs must be >= 1")
        if not 0.5 <= self.confidence < 1.0:
            raise InvalidArgument(f"gate confidence must be in [0.5, 1), got {self.confidence}")
        if self.metric not in METRICS:
            raise InvalidArgument(f"gate metric {self.metric!r} is not one of {METRICS}")

    @property
    def threshold(self) -> float:
        return 0.5 + self.min_improvement

    def stated(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "min_heldout": self.min_heldout,
                "max_kl": self.max_kl, "min_improvement": self.min_improvement}


@dataclass(slots=True)
class GateDecision:
    """One gate's verdict: `passed`, a reason per check, and the numbers it judged on."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # the reasons of the checks that failed

    def to_dict(self) -> dict[str, Any]:
        """{"passed", "reasons", "failed", **metrics}: the manifest's / job history's `gate`."""
        return {"passed": self.passed, "reasons": list(self.reasons), "failed": list(self.failed),
                **self.metrics}


def kl_within_bound(kl_per_token: float | None, max_kl: float) -> tuple[bool, str]:
    """The KL half of every policy gate: (passed, reason). Not measured (None / NaN) fails."""
    if kl_per_token is None or math.isnan(kl_per_token):
        return False, "KL to the reference was not measured"
    within = kl_per_token <= max_kl
    return within, (f"KL to the reference {kl_per_token:.4f} nats/token "
                    f"{'<=' if within else '>'} bound {max_kl:g}")


def enough_heldout(have: int, need: int, unit: str) -> tuple[bool, str]:
    """The sample-size check: (passed, reason naming what is missing)."""
    if have < need:
        return False, f"needs >= {need} held-out {unit}, have {have}: {MISSING_HINT}"
    return True, f"{have} held-out {unit} (>= {need})"


def _policy_gate(comparison: Comparison | MarginTest | EitherTest | None, *, what: str, unit: str,
                 heldout: int, kl_per_token: float | None, config: GateConfig, missing: str
                 ) -> list[tuple[bool, str]]:
    """(passed, reason) of each check: enough held-out units, the comparison, KL in bound."""
    return [enough_heldout(heldout, config.min_heldout, unit),
            (False, f"no held-out {missing} to compare") if comparison is None
            else (comparison.passed, comparison.describe(what, unit)),
            kl_within_bound(kl_per_token, config.max_kl)]


def _verdict(checks: list[tuple[bool, str]], reported: list[str], metrics: dict[str, Any]
             ) -> GateDecision:
    """Passed when every check passed; the checks' reasons, then the reported ones."""
    return GateDecision(all(ok for ok, _ in checks), [r for _, r in checks] + reported, metrics,
                        [r for ok, r in checks if not ok])


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def decide(*, implicit: Paired | None, accuracy: Paired | None,
           candidate_accuracy: float | None, current_accuracy: float | None,
           current_version: str | None, kl_per_token: float | None, heldout_pairs: int,
           config: GateConfig, margins: list[float] | None = None) -> GateDecision:
    """The DPO / KTO / SFT gate (module docstring). `implicit`: per pair, the sign of the
    candidate's log-ratio margin against the current version; `margins`: those margins
    themselves (nats); `accuracy`: per pair, candidate right and current wrong (win) or the
    reverse (loss); the accuracies, and the tests the metric does not use, are reported."""
    either = config.metric == "implicit_either"
    confidence = 1.0 - (1.0 - config.confidence) / 2 if either else config.confidence
    margin_test = MarginTest.of(margins, confidence) if margins else None
    implicit_test = (Comparison.of(implicit, confidence, config.threshold)
                     if implicit is not None else None)
    what = {"implicit_either": f"implicit reward vs {current_version}",
            "implicit_margin": f"implicit-reward mean margin vs {current_version}",
            "implicit_reward": f"implicit-reward win rate vs {current_version}",
            "pref_accuracy": f"preference-accuracy win rate vs {current_version} (discordant pairs)"
            }[config.metric]
    if either:
        comparison: Comparison | MarginTest | EitherTest | None = (
            EitherTest(implicit_test, margin_test) if implicit_test is not None else None)
    elif config.metric == "implicit_margin":
        comparison = margin_test
    elif config.metric == "implicit_reward":
        comparison = implicit_test
    else:
        comparison = Comparison.of(accuracy, config.confidence, config.threshold) \
            if accuracy is not None else None
    checks = _policy_gate(comparison, what=what, unit="pairs", heldout=heldout_pairs,
                          kl_per_token=kl_per_token, config=config,
                          missing="implicit reward" if either else config.metric.replace("_", " "))
    reasons: list[str] = []  # reported beside the checks
    if margin_test is not None and config.metric not in ("implicit_margin", "implicit_either"):
        reasons.append("reported: " + margin_test.describe(
            f"implicit-reward mean margin vs {current_version}", "pairs"))
    if implicit_test is not None and config.metric not in ("implicit_reward", "implicit_either"):
        reasons.append("reported: " + implicit_test.describe(
            f"implicit-reward win rate vs {current_version}", "pairs"))
    reasons.append(f"reported: reference-free preference accuracy {_fmt(candidate_accuracy)} "
                   f"vs current {current_version}'s {_fmt(current_accuracy)}")
    metrics: dict[str, Any] = {
        "candidate_accuracy": candidate_accuracy, "current_accuracy": current_accuracy,
        "current_version": current_version, "kl_per_token": kl_per_token,
        "metric": config.metric, "heldout_pairs": heldout_pairs, **config.stated()}
    if isinstance(comparison, Comparison):
        metrics.update(comparison.to_metrics())
    elif implicit_test is not None:  # the margin metric: the win-rate keys describe its pairs
        metrics.update(implicit_test.to_metrics())
    if margin_test is not None:
        metrics.update(margin_test.to_metrics())
    if implicit_test is not None:
        metrics["implicit_reward_accuracy"] = implicit.win_rate
        metrics["implicit"] = implicit_test.to_metrics()
    if accuracy is not None:
        metrics["accuracy_paired"] = Comparison.of(accuracy, config.confidence,
                                                   config.threshold).to_metrics()
    return _verdict(checks, reasons, metrics)


def ppo_gate(*, per_prompt: Paired | None, candidate_reward: float | None,
             current_reward: float | None, current_version: str | None,
             kl_per_token: float | None, heldout_prompts: int,
             config: GateConfig) -> GateDecision:
    """The PPO gate: the reward model's win rate of the candidate's answers over the current
    version's (per held-out prompt, mean score of the same-seed samples) must have its
    interval's lower end above 0.5 + `min_improvement`, on at least `min_heldout` prompts, and
    the candidate's exact KL to its base, per answer token, must stay <= `max_kl`. The mean
    rewards are reported (reward-model units mean nothing across reward models)."""
    comparison = Comparison.of(per_prompt, config.confidence, config.threshold) \
        if per_prompt is not None else None
    checks = _policy_gate(comparison, what=f"reward-model win rate vs {current_version}",
                          unit="prompts", heldout=heldout_prompts,
                          kl_per_token=kl_per_token, config=config, missing="rewards")
    reasons: list[str] = []
    if candidate_reward is not None and current_reward is not None:
        reasons.append(f"reported: mean reward {candidate_reward:.4f} vs current "
                       f"{current_version}'s {current_reward:.4f}")
    metrics: dict[str, Any] = {
        "metric": "rm_win_rate", "candidate_reward": candidate_reward,
        "current_reward": current_reward, "current_version": current_version,
        "kl_per_token": kl_per_token, "heldout_prompts": heldout_prompts, **config.stated()}
    if comparison is not None:
        metrics.update(comparison.to_metrics())
    return _verdict(checks, reasons, metrics)


def reward_model_gate(heldout: dict[str, Any], min_accuracy: float, *,
                      confidence: float = DEFAULT_CONFIDENCE,
                      min_pairs: int = DEFAULT_MIN_HELDOUT) -> GateDecision:
    """A reward model's gate on its held-out pairwise results: `pairs`, `accuracy` and the
    counts `correct` / `wrong` / `ties` (chosen scored higher / lower / equal)."""
    pairs, acc = int(heldout.get("pairs", 0)), heldout.get("accuracy")
    metrics: dict[str, Any] = {"heldout_accuracy": acc, "min_accuracy": min_accuracy,
                               "confidence": confidence, "min_heldout": min_pairs,
                               "heldout_pairs": pairs}
    if pairs < 1 or acc is None:
        return _verdict([enough_heldout(pairs, min_pairs, "pairs"),
                         (False, "no held-out pairs to measure accuracy on")], [], metrics)
    paired = Paired(int(heldout.get("correct", round(acc * pairs))),
                    int(heldout.get("wrong", pairs - round(acc * pairs))),
                    int(heldout.get("ties", 0)))
    comparison = Comparison.of(paired, confidence, min_accuracy)
    metrics.update(comparison.to_metrics())
    return _verdict([enough_heldout(pairs, min_pairs, "pairs"),
                     (comparison.passed, comparison.describe("held-out pairwise accuracy", "pairs"))],
                    [], metrics)
