"""The eval gates: may a candidate be published as good (and replace the current version)?

Pure decisions on measured numbers, one result shape for all of them (`GateDecision`: passed,
its `Check`s — name, passed (None: reported only, not deciding), text — and the numbers it judged
on as typed fields). `GateDecision.to_record()` is the dict stored in the manifest and the job
history (`passed`, `reasons`: every check's text in order, `failed`: the texts of the failed
checks, `checks`, and the numbers as flat keys); `GateDecision.from_record()` reads it back, also
records written before `checks` existed, so writer and readers share one schema.

Every gate knows its sample size. The candidate is compared with the current version on the
SAME held-out units (pairs, or prompts for PPO); each unit is a win, a loss or a tie
(`Paired`). Ties carry no information about which one is better and are left out (McNemar /
the exact sign test); the wins out of the units that differ get an exact (Clopper-Pearson)
two-sided interval at `confidence`, and a check passes only if the interval's LOWER end is above
its threshold (0.5 + `min_improvement` for "candidate better than current"). Under the null
(candidate no better: every differing unit a coin flip) a check passes with probability at most
(1 - confidence) / 2: 5 % at the default confidence 0.9. Below `min_heldout` units no gate passes.

- `decide` (DPO / KTO / SFT candidates), on held-out preference pairs:
  1. at least `min_heldout` held-out pairs (where the rating test decides, or held-out rated
     answers as precise as that many balanced pairs: `enough_rated`);
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

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from prefloop.server.errors import InvalidArgument

if TYPE_CHECKING:
    from prefloop.align.answer_shift import ShiftEvidence

DEFAULT_MAX_KL = 0.5  # nats per completion token
DEFAULT_MAX_ROOT_KL = 1.0  # nats per completion token, to the root version (the cumulative drift)
SPENDING = ("harmonic", "separate", "none")  # how a season's decisions share the level
# (align/season.py; "separate": an A/B test a job starts is a decision of its own, the rule
# before 2026-12-06)
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


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _interval(lower: float | None, upper: float | None) -> list[float | None] | None:
    return None if lower is None and upper is None else [lower, upper]


def _ends(record: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    ends = record.get(key) or [None, None]
    return _opt_float(ends[0]), _opt_float(ends[1]) if len(ends) > 1 else None


@dataclass(slots=True, frozen=True)
class PairedResult:
    """The recorded numbers of one paired test: counts, the interval of the win rate and the
    one-sided sign-test p-value (None where a record does not have them)."""

    wins: int
    losses: int
    ties: int = 0
    lower: float | None = None
    upper: float | None = None
    p_value: float | None = None

    @property
    def n(self) -> int:
        """The units that differ: what the test judged on (ties left out)."""
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.n if self.n else None

    def to_record(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}wins": self.wins, f"{prefix}losses": self.losses,
                f"{prefix}ties": self.ties, f"{prefix}win_rate": self.win_rate,
                f"{prefix}interval": _interval(self.lower, self.upper),
                f"{prefix}p_value": self.p_value}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None, prefix: str = ""
                    ) -> "PairedResult | None":
        """None when the record holds no counts under `prefix`."""
        if not record or record.get(f"{prefix}wins") is None \
                or record.get(f"{prefix}losses") is None:
            return None
        lower, upper = _ends(record, f"{prefix}interval")
        return cls(int(record[f"{prefix}wins"]), int(record[f"{prefix}losses"]),
                   int(record.get(f"{prefix}ties") or 0), lower, upper,
                   _opt_float(record.get(f"{prefix}p_value")))


@dataclass(slots=True, frozen=True)
class MarginResult:
    """The recorded numbers of the margin test: pairs, mean margin (nats), its bootstrap
    interval and the one-sided sign-flip p-value."""

    pairs: int
    mean: float
    lower: float | None
    upper: float | None
    p_value: float
    parts: dict[str, Any] | None = None  # a joined test's parts (rating_test.CombinedTest)

    def to_record(self) -> dict[str, Any]:
        out = {"mean_margin": self.mean, "margin_interval": _interval(self.lower, self.upper),
               "margin_p_value": self.p_value, "margin_pairs": self.pairs}
        return out if self.parts is None else out | {"margin_parts": self.parts}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "MarginResult | None":
        if record.get("margin_pairs") is None or record.get("margin_p_value") is None:
            return None
        lower, upper = _ends(record, "margin_interval")
        mean = record.get("mean_margin")
        return cls(int(record["margin_pairs"]), math.nan if mean is None else float(mean),
                   lower, upper, float(record["margin_p_value"]), record.get("margin_parts"))


@dataclass(slots=True, frozen=True)
class ShiftResult:
    """The recorded numbers of the answer-shift test (align/answer_shift.py): held-out answers
    scored, prompts both versions answered, the AUC with its bootstrap interval, the one-sided
    randomization p-value, what the candidate writes more and less of, and whether the scores
    joined the rating test (gates of 2026-12-05 to 2026-12-06, whose `margin` is that joint
    test's AUC − 1/2; false since)."""

    answers: int
    prompts: int
    auc: float
    lower: float | None
    upper: float | None
    p_value: float
    top: str = ""
    joined: bool = False  # the scores joined the deciding rating test (KTO gates before 2026-12-06)

    def to_record(self) -> dict[str, Any]:
        def number(x: float | None) -> float | None:  # NaN (one label only) stored as null
            return None if x is None or math.isnan(x) else x
        return {"answer_shift": {"answers": self.answers, "prompts": self.prompts,
                                 "auc": number(self.auc),
                                 "interval": _interval(number(self.lower), number(self.upper)),
                                 "p_value": self.p_value, "top": self.top,
                                 "joined": self.joined}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ShiftResult | None":
        r = record.get("answer_shift")
        if not isinstance(r, dict) or r.get("p_value") is None:
            return None
        lower, upper = _ends(r, "interval")
        auc = r.get("auc")
        return cls(int(r.get("answers") or 0), int(r.get("prompts") or 0),
                   math.nan if auc is None else float(auc), lower, upper,
                   float(r["p_value"]), str(r.get("top") or ""), bool(r.get("joined")))


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

    def result(self) -> MarginResult:
        return MarginResult(self.n, self.mean, self.lower, self.upper, self.p_value)


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

    def result(self) -> PairedResult:
        p = self.paired
        return PairedResult(p.wins, p.losses, p.ties, self.lower, self.upper, self.p_value)


@dataclass(slots=True, frozen=True)
class EitherTest:
    """The sign test and the sign-flip test on the same held-out pairs, each at half the level
    (both built at confidence 1 - (1 - c) / 2): passes when either does, so under random votes it
    passes with probability at most (1 - c) / 2 (Bonferroni). The sign test sees many small
    moves, the margin test a few large ones (docs/align.md). The margin test has no win-rate
    threshold, so with --min-improvement > 0 only the sign test can pass."""

    sign: Comparison
    margin: MarginTest | None
    sign_counts: bool = True  # False: fewer pairs than the minimum (`enough_rated`): reported only

    @property
    def passed(self) -> bool:
        margin_counts = self.margin is not None and self.sign.threshold == 0.5
        return (self.sign_counts and self.sign.passed) or (margin_counts and self.margin.passed)

    def describe(self, what: str, unit: str) -> str:
        level = (1.0 - self.sign.confidence) / 2
        margin = (self.margin.describe("mean margin", unit) if self.margin is not None
                  else "mean margin: not measured")
        sign = self.sign.describe('', unit).lstrip()
        if not self.sign_counts:
            sign += " (fewer pairs than the minimum: reported, it cannot pass the candidate)"
        return (f"{what}, {'passed' if self.passed else 'failed'}: either test at half the level "
                f"(one-sided {level:.3g} each): win rate {sign}; {margin}")


# ---------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(slots=True)
class GateConfig:
    max_kl: float = DEFAULT_MAX_KL
    min_improvement: float = 0.0  # the win rate's lower end must be above 0.5 + this
    min_heldout: int = DEFAULT_MIN_HELDOUT
    confidence: float = DEFAULT_CONFIDENCE
    metric: str = "implicit_either"  # decide(): one of METRICS
    spending: str = "harmonic"  # the level of a season's k-th decision (align/season.py)
    look_growth: float = 1.5  # a scheduled job looks again once its window grew by this factor
    ab_span: float = 3.0  # --promote-via auto: an undecided A/B test ends once the window grew this much
    ab_traffic: float = 0.1  # --promote-via auto: the candidate's share of users in the test a job starts
    ab_futility_win: float = 0.7  # --promote-via auto: its test ends for futility below this win rate (0: never)
    max_root_kl: float = DEFAULT_MAX_ROOT_KL  # KL to the root version (v0000): drift over a chain
    degeneration_prompts: int = 16  # held-out prompts both versions answer (0: no check)
    degeneration_tokens: int = 96  # the longest answer sampled for it

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
        if self.spending not in SPENDING:
            raise InvalidArgument(f"season spending {self.spending!r} is not one of {SPENDING}")
        if self.degeneration_prompts < 0 or self.degeneration_tokens < 1:
            raise InvalidArgument("degeneration prompts must be >= 0 and tokens >= 1")
        if not self.max_root_kl > 0:
            raise InvalidArgument(f"max root KL must be > 0, got {self.max_root_kl}")
        if not 1.0 <= self.look_growth <= 10.0:
            raise InvalidArgument(f"look growth must be in [1, 10], got {self.look_growth}")
        if not self.look_growth <= self.ab_span <= 100.0:
            raise InvalidArgument(f"A/B span must be in [look growth {self.look_growth:g}, 100], "
                                  f"got {self.ab_span}")
        if not (self.ab_futility_win == 0.0 or 0.5 < self.ab_futility_win < 1.0):
            raise InvalidArgument(f"A/B futility win rate must be in (0.5, 1), or 0 for no "
                                  f"futility stop, got {self.ab_futility_win}")
        if not 0.0 < self.ab_traffic < 1.0:
            raise InvalidArgument(f"A/B traffic (the candidate's share of users) must be in "
                                  f"(0, 1), got {self.ab_traffic}")

    @property
    def threshold(self) -> float:
        return 0.5 + self.min_improvement

    def rating_test_decides(self) -> bool:
        """Can the rating test (a KTO job's, align/rating_test.py) pass a candidate? It stands in
        for the margin test, which has no win-rate threshold: only at --min-improvement 0."""
        return self.metric == "implicit_margin" or (self.metric == "implicit_either"
                                                     and self.threshold == 0.5)

    def stated(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "min_heldout": self.min_heldout,
                "max_kl": self.max_kl, "min_improvement": self.min_improvement}


# Check names: the sample size, the KL bound, and (reported only) what sits beside the verdict; the
# comparison check is named after its metric (METRICS, "rm_win_rate", "rm_accuracy").
CHECK_HELDOUT = "min_heldout"
CHECK_KL = "max_kl"
REPORTED = "reported: "  # the text of every reported-only check starts with this
KINDS = ("policy", "ppo", "reward_model", "")  # "": a verdict made by hand (tests, tools)


@dataclass(slots=True, frozen=True)
class Check:
    """One line of a verdict: `passed` True / False for a deciding check, None for a number
    reported beside the verdict (it decides nothing)."""

    name: str
    passed: bool | None
    text: str

    def __post_init__(self) -> None:
        if self.passed not in (True, False, None) or not isinstance(self.text, str):
            raise InvalidArgument(f"a gate check needs passed True/False/None and a text, got "
                                  f"{self.passed!r}, {self.text!r}")

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "text": self.text}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Check":
        return cls(str(record.get("name") or "check"), record.get("passed"),
                   str(record.get("text", "")))


# The wording of failed checks, for records written before `failed` and `checks` were stored.
# The either test's text says which way it went first (its sub-tests' words may say otherwise).
_FAILED_WORDING = re.compile(r"needs >= |lower end <= |, failed: |> bound |no held-out |"
                             r"not measured|nothing to judge|no \w+ to judge on|"
                             r"sign-flip p = \S+ >= ")


def _failed_by_wording(text: str) -> bool:
    return ", passed: either test" not in text and bool(_FAILED_WORDING.search(text))

# Scalar numbers, on disk under the field's own name; which of them a gate kind always writes
# (None included), as the gates wrote them before the record had a schema.
_SCALARS = ("metric", "current_version", "candidate_accuracy", "current_accuracy",
            "candidate_reward", "current_reward", "heldout_accuracy", "min_accuracy",
            "kl_per_token", "confidence", "min_heldout", "max_kl", "min_improvement",
            "season_decision", "stated_confidence", "kl_to_root", "root_version",
            "max_root_kl")
_ALWAYS = {
    "policy": {"candidate_accuracy", "current_accuracy", "current_version", "kl_per_token",
               "metric", "heldout", "confidence", "min_heldout", "max_kl", "min_improvement"},
    "ppo": {"metric", "candidate_reward", "current_reward", "current_version", "kl_per_token",
            "heldout", "confidence", "min_heldout", "max_kl", "min_improvement"},
    "reward_model": {"heldout_accuracy", "min_accuracy", "confidence", "min_heldout", "heldout"},
    "": set(),
}
_STRUCTURED = {"passed", "reasons", "failed", "checks", "heldout_pairs", "heldout_prompts",
               "wins", "losses", "ties", "win_rate", "interval", "p_value", "mean_margin",
               "margin_interval", "margin_p_value", "margin_pairs", "margin_parts", "implicit",
               "implicit_reward_accuracy", "accuracy_paired", "answer_shift", *_SCALARS}


@dataclass(slots=True)
class GateDecision:
    """One gate's verdict: `passed`, its checks in order (the deciding ones, then the reported
    ones) and the numbers it judged on. `paired`: the paired test the flat win-rate keys
    describe (the deciding one, or for the margin metrics the implicit-reward sign test);
    `implicit` / `accuracy_paired`: the implicit-reward and preference-accuracy paired tests;
    `heldout`: the held-out units (`unit`: prompts for PPO, else pairs)."""

    passed: bool
    checks: list[Check] = field(default_factory=list)
    kind: str = ""
    metric: str | None = None
    current_version: str | None = None
    heldout: int | None = None
    paired: PairedResult | None = None
    margin: MarginResult | None = None
    implicit: PairedResult | None = None
    accuracy_paired: PairedResult | None = None
    answer_shift: ShiftResult | None = None  # the answer-shift test (align/answer_shift.py)
    kl_per_token: float | None = None
    candidate_accuracy: float | None = None
    current_accuracy: float | None = None
    candidate_reward: float | None = None
    current_reward: float | None = None
    heldout_accuracy: float | None = None
    min_accuracy: float | None = None
    confidence: float | None = None
    min_heldout: int | None = None
    max_kl: float | None = None
    min_improvement: float | None = None
    season_decision: int | None = None  # the k-th decision against current_version (season.py)
    stated_confidence: float | None = None  # the per-job confidence the season's spending split
    kl_to_root: float | None = None  # the candidate's KL per token to root_version (drift)
    root_version: str | None = None
    max_root_kl: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a record this schema lacks

    def __post_init__(self) -> None:
        if not isinstance(self.passed, bool):
            raise InvalidArgument(f"a gate verdict needs a boolean 'passed', got {self.passed!r}")
        if self.kind not in KINDS:
            raise InvalidArgument(f"gate kind {self.kind!r} is not one of {KINDS}")
        if self.passed and any(c.passed is False for c in self.checks):
            raise InvalidArgument("a gate verdict cannot pass with a failed check")

    @property
    def unit(self) -> str:
        return "prompts" if self.kind == "ppo" else "pairs"

    @property
    def reasons(self) -> list[str]:
        """Every check's text, in order (what users read)."""
        return [c.text for c in self.checks]

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    @property
    def failed(self) -> list[str]:
        """The texts of the checks that failed."""
        return [c.text for c in self.failed_checks]

    def to_record(self) -> dict[str, Any]:
        """The manifest's / job history's `gate`: {"passed", "reasons", "failed", "checks", and
        the numbers as flat keys (the comparison's wins, losses, ties, win_rate, interval,
        p_value; the margin test's mean_margin, margin_interval, margin_p_value, margin_pairs;
        `implicit` and `accuracy_paired` as nested dicts)}."""
        always = _ALWAYS[self.kind]
        out: dict[str, Any] = {"passed": self.passed, "reasons": self.reasons,
                               "failed": self.failed,
                               "checks": [c.to_record() for c in self.checks]}
        for name in _SCALARS:
            value = getattr(self, name)
            if value is not None or name in always:
                out[name] = value
        if self.heldout is not None or "heldout" in always:
            out[f"heldout_{self.unit}"] = self.heldout
        if self.paired is not None:
            out.update(self.paired.to_record())
        if self.margin is not None:
            out.update(self.margin.to_record())
        if self.implicit is not None:
            out["implicit_reward_accuracy"] = self.implicit.win_rate
            out["implicit"] = self.implicit.to_record()
        if self.accuracy_paired is not None:
            out["accuracy_paired"] = self.accuracy_paired.to_record()
        if self.answer_shift is not None:
            out.update(self.answer_shift.to_record())
        out.update(self.extra)
        return out

    to_dict = to_record

    @property
    def metrics(self) -> dict[str, Any]:
        """The record's numbers alone (no verdict, reasons or checks)."""
        return {k: v for k, v in self.to_record().items()
                if k not in ("passed", "reasons", "failed", "checks")}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "GateDecision":
        """A verdict from its stored dict. A record without `checks` (written before they were
        stored) gets one check per reason: "reported: …" reported only; with `failed`, the
        reasons listed there failed and the others passed; without it, a passed verdict's
        checks passed and a failed one's failed where their wording says so (all of them when
        none does: the record does not say which)."""
        if not isinstance(record, dict):
            raise InvalidArgument(f"a gate record is a dict, got {type(record).__name__}")
        passed = record.get("passed")
        kind = ("ppo" if record.get("metric") == "rm_win_rate" or "heldout_prompts" in record
                else "reward_model" if "min_accuracy" in record
                else "policy" if record.get("metric") in METRICS else "")
        if record.get("checks") is not None:
            checks = [Check.from_record(c) for c in record["checks"]]
        else:
            checks = _checks_of_old_record(bool(passed), list(record.get("reasons") or []),
                                           record.get("failed"), record.get("metric"))
        scalars = {name: record.get(name) for name in _SCALARS}
        heldout = record.get("heldout_prompts", record.get("heldout_pairs"))
        return cls(passed, checks, kind, heldout=None if heldout is None else int(heldout),
                   paired=PairedResult.from_record(record),
                   margin=MarginResult.from_record(record),
                   implicit=PairedResult.from_record(record.get("implicit")),
                   accuracy_paired=PairedResult.from_record(record.get("accuracy_paired")),
                   answer_shift=ShiftResult.from_record(record),
                   extra={k: v for k, v in record.items() if k not in _STRUCTURED}, **scalars)


def _checks_of_old_record(passed: bool, reasons: list[str], failed: list[str] | None,
                          metric: str | None) -> list[Check]:
    """The checks of a record that stored only its reasons (and perhaps `failed`)."""
    def name_of(text: str) -> str:
        if text.startswith(REPORTED):
            return "reported"
        if text.startswith("needs >= ") or re.search(r"held-out \w+ \(>= \d+\)$", text):
            return CHECK_HELDOUT
        if text.startswith("KL to the reference"):
            return CHECK_KL
        return metric or "comparison"

    deciding = [r for r in reasons if not r.startswith(REPORTED)]
    if failed is not None:
        failing = set(failed)
    elif passed:
        failing = set()
    else:
        failing = {r for r in deciding if _failed_by_wording(r)} or set(deciding)
    return [Check(name_of(r), None if r.startswith(REPORTED) else r not in failing, r)
            for r in reasons]


def kl_within_bound(kl_per_token: float | None, max_kl: float) -> Check:
    """The KL half of every policy gate. Not measured (None / NaN) fails."""
    if kl_per_token is None or math.isnan(kl_per_token):
        return Check(CHECK_KL, False, "KL to the reference was not measured")
    within = kl_per_token <= max_kl
    return Check(CHECK_KL, within, f"KL to the reference {kl_per_token:.4f} nats/token "
                                   f"{'<=' if within else '>'} bound {max_kl:g}")


CHECK_ROOT_KL = "max_root_kl"


def with_check(decision: "GateDecision", check: Check, **numbers: Any) -> "GateDecision":
    """`decision` with one more check (a failed deciding one fails it) and typed `numbers`."""
    return dataclasses.replace(decision, passed=decision.passed and check.passed is not False,
                               checks=[*decision.checks, check], **numbers)


def with_drift(decision: "GateDecision", kl_to_root: float | None, root: str | None,
               config: GateConfig) -> "GateDecision":
    """`decision` with its drift check: the candidate's KL per token to the root version (v0000,
    where every chain of versions starts) at most `config.max_root_kl`, so steps that each pass
    the per-job bound cannot walk the model anywhere. Not measured (None): reported only."""
    if kl_to_root is None or math.isnan(kl_to_root):
        check = _reported(CHECK_ROOT_KL, f"KL to the root {root} not measured")
    else:
        within = kl_to_root <= config.max_root_kl
        check = Check(CHECK_ROOT_KL, within,
                      f"KL to the root {root} {kl_to_root:.4f} nats/token "
                      f"{'<=' if within else '>'} bound {config.max_root_kl:g} (drift over the "
                      "chain of versions)")
    return with_check(decision, check, kl_to_root=kl_to_root, root_version=root,
                      max_root_kl=config.max_root_kl)


def enough_heldout(have: int, need: int, unit: str) -> Check:
    """The sample-size check (its text names what is missing)."""
    if have < need:
        return Check(CHECK_HELDOUT, False,
                     f"needs >= {need} held-out {unit}, have {have}: {MISSING_HINT}")
    return Check(CHECK_HELDOUT, True, f"{have} held-out {unit} (>= {need})")


def enough_rated(pairs: int, labels: list[bool], groups: list[str], need: int) -> Check:
    """The sample-size check where the rating test decides (a KTO job at --min-improvement 0):
    its held-out answers count as the balanced pairs they are as precise as
    (`rating_test.balanced_pairs`) when that is more than the matched pairs: lone thumbs, mostly
    👎, are matched into min(up, down) pairs, while the rating test ranks every one of them.
    Met that way only, the sign test on the fewer pairs is reported and cannot pass (`decide`)."""
    from prefloop.align.rating_test import balanced_pairs
    weight = balanced_pairs(labels, groups)
    if weight <= pairs:
        return enough_heldout(pairs, need, "pairs")
    up = sum(1 for label in labels if label)
    answers = (f"the rating test's {len(labels)} answers ({up} up, {len(labels) - up} down) "
               f"weigh as {weight:.1f} balanced pairs")
    if weight < need:
        return Check(CHECK_HELDOUT, False,
                     f"needs >= {need} held-out pairs, have {pairs}; {answers}: {MISSING_HINT}")
    return Check(CHECK_HELDOUT, True, f"{pairs} held-out pairs; {answers} (>= {need})")


def _policy_checks(comparison: Comparison | MarginTest | EitherTest | None, *, name: str,
                   what: str, unit: str, heldout: int, kl_per_token: float | None,
                   config: GateConfig, missing: str) -> list[Check]:
    """The deciding checks of a policy gate: enough held-out units, the comparison, KL in bound."""
    return [enough_heldout(heldout, config.min_heldout, unit),
            Check(name, False, f"no held-out {missing} to compare") if comparison is None
            else Check(name, comparison.passed, comparison.describe(what, unit)),
            kl_within_bound(kl_per_token, config.max_kl)]


def _reported(name: str, text: str) -> Check:
    return Check(name, None, REPORTED + text)


def _passes(checks: list[Check]) -> bool:
    """A verdict passes when no check failed (reported ones decide nothing)."""
    return all(c.passed is not False for c in checks)


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def decide(*, implicit: Paired | None, accuracy: Paired | None,
           candidate_accuracy: float | None, current_accuracy: float | None,
           current_version: str | None, kl_per_token: float | None, heldout_pairs: int,
           config: GateConfig, margins: list[float] | None = None,
           ratings: tuple[list[float], list[bool], list[str]] | None = None,
           answer_shift: "ShiftEvidence | None" = None,
           midpoint: tuple[list[float], list[bool], list[str], float] | None = None
           ) -> GateDecision:
    """The DPO / KTO / SFT gate (module docstring). `implicit`: per pair, the sign of the
    candidate's log-ratio margin against the current version; `margins`: those margins
    themselves (nats); `accuracy`: per pair, candidate right and current wrong (win) or the
    reverse (loss); the accuracies, and the tests the metric does not use, are reported.
    `ratings` (KTO: every held-out answer's move per token, label and prompt) replaces the margin
    test by the randomization test of align/rating_test.py. `answer_shift`
    (answer_shift.ShiftEvidence: what the candidate writes more and less of than the current
    version, and the held-out answers' resemblance to it) is tested and reported; it decides
    nothing (from 2026-12-06: joined with the moves it lowered the p-value of 7 of 13 kept
    candidates, one by 0.003, and raised that of 6, docs/loop_benchmark.md "The rating test without
    the answer shift"). `midpoint` (KTO: the newer half of the
    training answers' moves under the midpoint checkpoint, labels, prompts, and the share of the
    training rows that checkpoint had trained on; align/train/midpoint.py) joins the rating
    test by rating_test.CombinedTest."""
    either = config.metric == "implicit_either"
    confidence = 1.0 - (1.0 - config.confidence) / 2 if either else config.confidence
    shift_test = None if answer_shift is None else answer_shift.test(confidence)
    if ratings is not None:
        from prefloop.align.rating_test import PermutationTest
        moves, labels, groups = ratings
        margin_test = PermutationTest.of(moves, labels, groups, confidence)
        if midpoint is not None:
            from prefloop.align.rating_test import CombinedTest, balanced_pairs
            m_moves, m_labels, m_groups, share = midpoint
            margin_test = CombinedTest.of(
                margin_test, balanced_pairs(labels, groups),
                PermutationTest.of(m_moves, m_labels, m_groups, confidence),
                balanced_pairs(m_labels, m_groups), share)
    else:
        margin_test = MarginTest.of(margins, confidence) if margins else None
    implicit_test = (Comparison.of(implicit, confidence, config.threshold)
                     if implicit is not None else None)
    what = {"implicit_either": f"implicit reward vs {current_version}",
            "implicit_margin": f"implicit-reward mean margin vs {current_version}",
            "implicit_reward": f"implicit-reward win rate vs {current_version}",
            "pref_accuracy": f"preference-accuracy win rate vs {current_version} (discordant pairs)"
            }[config.metric]
    rated_minimum = ratings is not None and config.rating_test_decides()  # `enough_rated`
    by_weight = rated_minimum and heldout_pairs < config.min_heldout  # met by weight or not at all
    if either:
        comparison: Comparison | MarginTest | EitherTest | None = (
            EitherTest(implicit_test, margin_test, sign_counts=not by_weight)
            if implicit_test is not None else None)
    elif config.metric == "implicit_margin":
        comparison = margin_test
    elif config.metric == "implicit_reward":
        comparison = implicit_test
    else:
        comparison = Comparison.of(accuracy, config.confidence, config.threshold) \
            if accuracy is not None else None
    checks = _policy_checks(comparison, name=config.metric, what=what, unit="pairs",
                            heldout=heldout_pairs, kl_per_token=kl_per_token, config=config,
                            missing="implicit reward" if either
                            else config.metric.replace("_", " "))
    if rated_minimum:
        checks[0] = enough_rated(heldout_pairs, ratings[1], ratings[2], config.min_heldout)
    if margin_test is not None and config.metric not in ("implicit_margin", "implicit_either"):
        checks.append(_reported("mean_margin", margin_test.describe(
            f"implicit-reward mean margin vs {current_version}", "pairs")))
    if implicit_test is not None and config.metric not in ("implicit_reward", "implicit_either"):
        checks.append(_reported("implicit_reward", implicit_test.describe(
            f"implicit-reward win rate vs {current_version}", "pairs")))
    if shift_test is not None:
        checks.append(_reported("answer_shift", shift_test.describe()))
    checks.append(_reported("pref_accuracy", f"reference-free preference accuracy "
                            f"{_fmt(candidate_accuracy)} vs current {current_version}'s "
                            f"{_fmt(current_accuracy)}"))
    # the flat win-rate numbers: the deciding comparison's, or for the margin metrics (whose
    # deciding test has no counts) the implicit-reward sign test's on the same pairs
    paired = comparison.result() if isinstance(comparison, Comparison) else \
        implicit_test.result() if implicit_test is not None else None
    return GateDecision(
        _passes(checks), checks, "policy", config.metric, current_version, heldout_pairs,
        paired=paired, margin=None if margin_test is None else margin_test.result(),
        implicit=None if implicit_test is None else implicit_test.result(),
        accuracy_paired=None if accuracy is None else
        Comparison.of(accuracy, config.confidence, config.threshold).result(),
        answer_shift=None if shift_test is None else shift_test.result(),
        kl_per_token=kl_per_token, candidate_accuracy=candidate_accuracy,
        current_accuracy=current_accuracy, **config.stated())


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
    checks = _policy_checks(comparison, name="rm_win_rate",
                            what=f"reward-model win rate vs {current_version}", unit="prompts",
                            heldout=heldout_prompts, kl_per_token=kl_per_token, config=config,
                            missing="rewards")
    if candidate_reward is not None and current_reward is not None:
        checks.append(_reported("mean_reward", f"mean reward {candidate_reward:.4f} vs current "
                                f"{current_version}'s {current_reward:.4f}"))
    return GateDecision(
        _passes(checks), checks, "ppo", "rm_win_rate", current_version, heldout_prompts,
        paired=None if comparison is None else comparison.result(), kl_per_token=kl_per_token,
        candidate_reward=candidate_reward, current_reward=current_reward, **config.stated())


def reward_model_gate(heldout: dict[str, Any], min_accuracy: float, *,
                      confidence: float = DEFAULT_CONFIDENCE,
                      min_pairs: int = DEFAULT_MIN_HELDOUT) -> GateDecision:
    """A reward model's gate on its held-out pairwise results: `pairs`, `accuracy` and the
    counts `correct` / `wrong` / `ties` (chosen scored higher / lower / equal)."""
    pairs, acc = int(heldout.get("pairs", 0)), heldout.get("accuracy")
    numbers = dict(heldout=pairs, heldout_accuracy=acc, min_accuracy=min_accuracy,
                   confidence=confidence, min_heldout=min_pairs)
    if pairs < 1 or acc is None:
        checks = [enough_heldout(pairs, min_pairs, "pairs"),
                  Check("rm_accuracy", False, "no held-out pairs to measure accuracy on")]
        return GateDecision(False, checks, "reward_model", **numbers)
    paired = Paired(int(heldout.get("correct", round(acc * pairs))),
                    int(heldout.get("wrong", pairs - round(acc * pairs))),
                    int(heldout.get("ties", 0)))
    comparison = Comparison.of(paired, confidence, min_accuracy)
    checks = [enough_heldout(pairs, min_pairs, "pairs"),
              Check("rm_accuracy", comparison.passed,
                    comparison.describe("held-out pairwise accuracy", "pairs"))]
    return GateDecision(_passes(checks), checks, "reward_model", paired=comparison.result(),
                        **numbers)
