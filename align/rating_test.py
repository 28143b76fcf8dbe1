"""The gate's test on every held-out rated answer (KTO jobs: thumbs, stars, both sides of picks):
did the candidate move the answers people liked up relative to the answers they disliked?

Matched (desirable, undesirable) pairs (`data.example_pairs`) use min(#up, #down) of the lone
thumbs and drop the rest; this test uses every held-out answer. A move is the candidate's
log-prob of an answer minus the current version's, summed over the answer's tokens: the
implicit reward KTO and DPO train on (up to β). Until 2026-12-05 it was divided by the answer's
length; on both tuning splits of the population benchmark the sum saw more (randomization p
0.037 -> 0.011 and 0.021 -> 0.017 on the same candidates; a move centred on its expectation
under the current version's own sampling was better on one split and worse on the other;
on the fresh split reported after, no variant separated the candidates, p 0.19-0.20 for the good
one: benchmarks/gate_power.py, docs/loop_benchmark.md "What the gate looks at"). The statistic is
rank-based — the AUC, the share of (liked, disliked) answer pairs in which the liked one moved more (ties
one half), i.e. the Mann-Whitney U scaled to [0, 1] — because moves are heavy-tailed: a mean
difference of moves was tried first and a few large moves of one prompt hid 19 of 27 matched
pairs moving the right way (docs/loop_benchmark.md, the population runs of 2026-12-04). Its p-value is a
randomization test (`permutation_p`): labels are shuffled within each prompt that has several
rated answers (a pick's two sides swap) and across the answers that are the only one of their
prompt. When the labels carry nothing the candidate learned, every such arrangement is equally
likely, so the test is exact in level whatever the share of thumbs up and however the candidate
moved all answers. `PermutationTest` has the interface of gate.MarginTest, so `gate.decide` runs it
in its place, each of the two tests at half the level.

`also` (a second score of the same answers, e.g. the answer shift of align/answer_shift.py) makes
the statistic rank both: each answer's rank among the moves and its rank among the second scores,
averaged (`joint_scores`), then the same AUC and randomization. The gate joined the answer shift
this way from 2026-12-05 (chosen on one tuning split: moves 0.048, shift 0.041, joined 0.025) to
2026-12-06: on 13 kept candidates of four splits it lowered the p-value of 7 (one by 0.003) and
raised that of 6, geometric mean 0.154 against 0.096 alone (docs/loop_benchmark.md "The rating test
without the answer shift"); benchmarks/gate_power.py still measures it.

`CombinedTest` joins this test on the held-out answers with the same test on the newer half of
the training answers, scored by the checkpoint that had trained on the older half only
(align/train/midpoint.py), by a weighted Stouffer sum of the two p-values (`stouffer_p`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prefloop.align.gate import MarginResult

DRAWS = 20000


def _blocks(groups: list[str]) -> np.ndarray:
    """The block of each answer that the test shuffles labels within: one per group of several
    answers, and one for all the answers alone in their group."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    block_of = {g: i for i, g in enumerate(sorted(g for g in sizes if sizes[g] > 1))}
    lone = len(block_of)
    return np.array([block_of.get(g, lone) for g in groups], dtype=np.int64)


def balanced_pairs(labels: list[bool], groups: list[str]) -> float:
    """How many balanced (liked, disliked) pairs this test is as precise as. Its shuffles draw,
    in each block of n_b answers with m_b liked (`_blocks`), which m_b are liked; with the ranks
    spread as at random, the liked answers' rank sum then has variance N(N+1)/12 ·
    Σ_b m_b(n_b − m_b)/n_b, so the AUC's is V = that / (U·D)² (U liked, D disliked, N answers).
    n liked and n disliked answers, each alone in its prompt, give the Mann-Whitney variance
    (2n + 1) / (12n²), which is V for n = (1 + √(1 + 12V)) / (12V). For answers all alone in
    their prompts V = (N + 1) / (12·U·D) and n is about 2UD / (U + D), the harmonic mean of the
    two counts: 19 up and 41 down weigh as 26 pairs, where matching lone thumbs into pairs
    (`data.example_pairs`) makes 19. A prompt whose answers all carry one label is never
    reshuffled and adds nothing. 0 when no arrangement can differ. In tenths rounded down, as
    verdicts show it: a weight of 19.96 is not 20."""
    lab = np.asarray(labels, dtype=bool)
    up, n = int(lab.sum()), lab.size
    if up == 0 or up == n:
        return 0.0
    blocks = _blocks(groups)
    spread = sum(float(m * (k - m) / k) for k, m in
                 zip(np.bincount(blocks), np.bincount(blocks, weights=lab)) if k > 0)
    if spread <= 0.0:
        return 0.0
    v = n * (n + 1) / 12.0 * spread / float(up * (n - up)) ** 2
    return math.floor((1.0 + math.sqrt(1.0 + 12.0 * v)) / (12.0 * v) * 10) / 10


def _ranks(moves: np.ndarray) -> np.ndarray:
    """1-based ranks of `moves`, ties sharing their mean rank."""
    order = np.argsort(moves, kind="stable")
    ranks = np.empty(moves.size, dtype=np.float64)
    ranks[order] = np.arange(1, moves.size + 1)
    values = moves[order]
    start = 0
    for end in range(1, moves.size + 1):  # average the ranks of each run of equal values
        if end == moves.size or values[end] != values[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2
            start = end
    return ranks


def _auc(ranks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The share of (label-True, label-False) pairs whose True answer ranks higher (ties one
    half), from the rank sum of the True answers; `labels` [draws, n] or [n]."""
    lab = labels.astype(np.float64)
    ups = lab.sum(-1)
    downs = ranks.shape[-1] - ups
    u = (lab * ranks).sum(-1) - ups * (ups + 1) / 2
    return u / np.maximum(ups * downs, 1)


def permutation_p(moves: list[float], labels: list[bool], groups: list[str],
                  draws: int | None = None, seed: int = 0) -> float:
    """One-sided p-value of "desirable answers moved up more than undesirable ones" (the AUC of
    their moves above its value under random labels): the share of label arrangements (shuffled
    within each group of several answers; the answers alone in their group shuffled together)
    whose AUC is at least the observed one, with the (1 + hits) / (1 + draws) correction that
    keeps a Monte Carlo p-value valid."""
    draws = DRAWS if draws is None else draws
    m = np.asarray(moves, dtype=np.float64)
    lab = np.asarray(labels, dtype=bool)
    if m.size == 0 or lab.all() or not lab.any():
        return 1.0
    ranks = _ranks(m)
    observed = _auc(ranks, lab) - 1e-12  # ties count as hits
    hits = int((_auc(ranks, arrangements(lab, groups, draws, seed)) >= observed).sum())
    return (1 + hits) / (1 + draws)


def arrangements(labels: np.ndarray, groups: list[str], draws: int, seed: int = 0) -> np.ndarray:
    """[draws, n] arrangements of `labels` as the test draws them: shuffled within each group of
    several answers, and across the answers alone in their group (`_blocks`)."""
    blocks = _blocks(groups)
    rng = np.random.default_rng(seed)
    order = np.argsort(blocks, kind="stable")  # answers grouped by block
    keys = rng.random((draws, labels.size)) + blocks[order][None, :] * 2.0  # shuffles within blocks
    shuffled = order[np.argsort(keys, axis=1)]  # [draws, n]: which answer's label each slot gets
    permuted = np.empty((draws, labels.size), dtype=bool)
    permuted[:, order] = labels[shuffled]
    return permuted


def joint_scores(moves: np.ndarray, also: np.ndarray) -> np.ndarray:
    """Each answer's rank among the moves and its rank among `also`, averaged: one score that is
    high when both are. A fixed function of the scores, not of the labels, so the
    randomization test stays exact."""
    if moves.shape != also.shape:
        raise ValueError("both scores must be of the same answers")
    return (_ranks(moves) + _ranks(also)) / 2


def _interval(moves: np.ndarray, lab: np.ndarray, confidence: float, draws: int = 4000,
              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the AUC, resampling the desirable and the undesirable answers
    separately (reported beside the test): each resample's AUC is its counts of every original
    answer weighting the (liked, disliked) comparison matrix."""
    rng = np.random.default_rng(seed)
    up, down = moves[lab], moves[~lab]
    if up.size == 0 or down.size == 0:
        return math.nan, math.nan
    wins = (up[:, None] > down[None, :]) + 0.5 * (up[:, None] == down[None, :])  # [up, down]
    cu = rng.multinomial(up.size, np.full(up.size, 1 / up.size), size=draws)  # [draws, up]
    cd = rng.multinomial(down.size, np.full(down.size, 1 / down.size), size=draws)
    stats = ((cu @ wins) * cd).sum(1) / (up.size * down.size)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


@dataclass(slots=True, frozen=True)
class PermutationTest:
    """`permutation_p` at one-sided level (1 - confidence) / 2, with the statistic and its
    bootstrap interval; the interface of gate.MarginTest."""

    n: int
    ups: int
    mean: float
    lower: float
    upper: float
    p_value: float
    confidence: float
    joint: bool = False  # the statistic ranks the moves and the answer shift together

    @classmethod
    def of(cls, moves: list[float], labels: list[bool], groups: list[str],
           confidence: float, also: list[float] | None = None,
           draws: int | None = None) -> "PermutationTest":
        """`also`: a second score of the same answers (answer_shift.ShiftEvidence.scores); the
        statistic is then the AUC of each answer's two ranks averaged (`joint_scores`)."""
        m, lab = np.asarray(moves, dtype=np.float64), np.asarray(labels, dtype=bool)
        if also is not None:
            m = joint_scores(m, np.asarray(also, dtype=np.float64))
        stat = float(_auc(_ranks(m), lab)) if lab.any() and not lab.all() else math.nan
        lower, upper = _interval(m, lab, confidence)
        return cls(int(m.size), int(lab.sum()), stat, lower, upper,
                   permutation_p(m.tolist(), labels, groups, draws), confidence, also is not None)

    @property
    def passed(self) -> bool:
        return 0 < self.ups < self.n and self.p_value < (1.0 - self.confidence) / 2

    def describe(self, what: str, unit: str) -> str:
        if not 0 < self.ups < self.n:
            return f"{what}: held-out answers of one label only, nothing to compare"
        verb, statistic = (("ranked higher", "summed moves and answer shift, ranks averaged")
                           if self.joint else ("moved more", "summed moves"))
        return (f"every held-out answer ({self.ups} up, {self.n - self.ups} down): a liked answer "
                f"{verb} than a disliked one in {self.mean:.3f} of their pairs (AUC of the "
                f"{statistic}), {self.confidence:.0%} bootstrap interval [{self.lower:.3f}, "
                f"{self.upper:.3f}]: one-sided randomization p = {self.p_value:.3g} "
                f"{'<' if self.passed else '>='} {(1.0 - self.confidence) / 2:.3g}")

    def result(self) -> MarginResult:
        """As a margin: the AUC minus 1/2, so that 0 is "no move" and a negative upper end is
        "measurably worse", as for the mean margin it stands in for (runner.inconclusive_but_safe
        and the gate record read it so)."""
        return MarginResult(self.n, self.mean - 0.5, self.lower - 0.5, self.upper - 0.5,
                            self.p_value)


def stouffer_p(p_values: list[float], weights: list[float]) -> float:
    """One-sided p-value of the weighted Stouffer combination Σ w_i z_i / √(Σ w_i²), z_i =
    Φ⁻¹(1 − p_i). Valid (≤ its level under the null) for p-values that are each valid given the
    ones before (the midpoint's, then the held-out test's given everything it trained on):
    the combination falls as any p_i rises, so it is at most as often small as for independent
    uniforms. Weights must be fixed without the p-values."""
    from statistics import NormalDist
    normal = NormalDist()
    pairs = [(min(max(p, 1e-12), 1 - 1e-12), w) for p, w in zip(p_values, weights) if w > 0]
    if not pairs:
        return 1.0
    z = sum(w * normal.inv_cdf(1.0 - p) for p, w in pairs) / math.sqrt(sum(w * w for _, w in pairs))
    return float(1.0 - normal.cdf(z))


@dataclass(slots=True, frozen=True)
class CombinedTest:
    """The held-out rating test joined with the midpoint's (align/train/midpoint.py: the newer
    half of the training answers, scored by the checkpoint that had trained on the older half
    only) by `stouffer_p`. Each part weighs as the square root of the balanced pairs it is as
    precise as (`balanced_pairs`); the midpoint's also by the share of the window's training rows
    its checkpoint had trained on (the candidate trained on all of them: a move about that much
    smaller is expected). The interface of gate.MarginTest; the interval is the held-out one."""

    heldout: PermutationTest
    midpoint: PermutationTest
    weights: tuple[float, float]  # (held-out, midpoint)
    p_value: float

    @classmethod
    def of(cls, heldout: PermutationTest, heldout_weight: float, midpoint: PermutationTest,
           midpoint_weight: float, trained_share: float) -> "CombinedTest":
        weights = (math.sqrt(max(heldout_weight, 0.0)),
                   math.sqrt(max(midpoint_weight, 0.0)) * max(trained_share, 0.0))
        return cls(heldout, midpoint, weights,
                   stouffer_p([heldout.p_value, midpoint.p_value], list(weights)))

    @property
    def confidence(self) -> float:
        return self.heldout.confidence

    @property
    def passed(self) -> bool:
        return self.p_value < (1.0 - self.confidence) / 2

    def describe(self, what: str, unit: str) -> str:
        level = (1.0 - self.confidence) / 2
        m = self.midpoint
        part = (f"the newer half of the training answers scored at the midpoint ({m.ups} up, "
                f"{m.n - m.ups} down): AUC {m.mean:.3f}, p = {m.p_value:.3g}"
                if 0 < m.ups < m.n else "the midpoint's answers: one label only, nothing to compare")
        return (f"{self.heldout.describe(what, unit)}; {part}; joined (Stouffer, weights "
                f"{self.weights[0]:.2f} held-out, {self.weights[1]:.2f} midpoint): p = "
                f"{self.p_value:.3g} {'<' if self.passed else '>='} {level:.3g}")

    def result(self) -> MarginResult:
        """The held-out test's result with the joined p-value."""
        r, m = self.heldout.result(), self.midpoint
        parts = {"heldout_p_value": self.heldout.p_value, "midpoint_p_value": m.p_value,
                 "midpoint_auc": None if math.isnan(m.mean) else m.mean,
                 "midpoint_answers": m.n, "midpoint_up": m.ups,
                 "weights": [round(w, 4) for w in self.weights]}
        return MarginResult(r.pairs, r.mean, r.lower, r.upper, self.p_value, parts)
