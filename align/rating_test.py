"""The gate's test on every held-out rated answer (KTO jobs: thumbs, stars, both sides of picks):
did the candidate move the answers people liked up relative to the answers they disliked?

Matched (desirable, undesirable) pairs (`data.example_pairs`) use min(#up, #down) of the lone
thumbs and drop the rest; this test uses every held-out answer. Its statistic is the mean move
of the desirable answers minus that of the undesirable ones, a move being the candidate's log-prob
of the answer minus the current version's, per answer token. Its p-value is a randomization test
(`permutation_p`): labels are shuffled within each prompt that has several rated answers (a pick's
two sides swap) and across the answers that are the only one of their prompt. When the labels
carry nothing the candidate learned, every such arrangement is equally likely, so the test is
exact in level whatever the share of thumbs up and however the candidate moved all answers.
`PermutationTest` has the interface of gate.MarginTest, so `gate.decide` runs it in its place,
each of the two tests at half the level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prefloop.align.gate import MarginResult

DRAWS = 20000


def _statistic(moves: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean move of label-True answers minus label-False ones; `labels` [draws, n] or [n]."""
    labels = labels.astype(np.float64)
    ups = labels.sum(-1)
    up_mean = (labels * moves).sum(-1) / np.maximum(ups, 1)
    down_mean = ((1 - labels) * moves).sum(-1) / np.maximum(moves.shape[-1] - ups, 1)
    return up_mean - down_mean


def permutation_p(moves: list[float], labels: list[bool], groups: list[str],
                  draws: int | None = None, seed: int = 0) -> float:
    """One-sided p-value of "desirable answers moved up more than undesirable ones": the share
    of label arrangements (shuffled within each group of several answers; the answers alone in
    their group shuffled together) whose statistic is at least the observed one, with the
    (1 + hits) / (1 + draws) correction that keeps a Monte Carlo p-value valid."""
    draws = DRAWS if draws is None else draws
    m = np.asarray(moves, dtype=np.float64)
    lab = np.asarray(labels, dtype=bool)
    if m.size == 0 or lab.all() or not lab.any():
        return 1.0
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    block_of = {g: i for i, g in enumerate(sorted(g for g in sizes if sizes[g] > 1))}
    lone = len(block_of)  # one block for every answer alone in its group
    blocks = np.array([block_of.get(g, lone) for g in groups])
    observed = _statistic(m, lab) - 1e-12 * max(1.0, float(np.abs(m).sum()))  # ties count as hits
    rng = np.random.default_rng(seed)
    order = np.argsort(blocks, kind="stable")  # answers grouped by block
    keys = rng.random((draws, m.size)) + blocks[order][None, :] * 2.0  # shuffles within blocks
    shuffled = order[np.argsort(keys, axis=1)]  # [draws, n]: which answer's label each slot gets
    permuted = np.empty((draws, m.size), dtype=bool)
    permuted[:, order] = lab[shuffled]
    hits = int((_statistic(m, permuted) >= observed).sum())
    return (1 + hits) / (1 + draws)


def _interval(moves: np.ndarray, lab: np.ndarray, confidence: float, draws: int = 4000,
              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the statistic, resampling the desirable and the undesirable
    answers separately (reported beside the test)."""
    rng = np.random.default_rng(seed)
    up, down = moves[lab], moves[~lab]
    if up.size == 0 or down.size == 0:
        return math.nan, math.nan
    stats = (up[rng.integers(0, up.size, (draws, up.size))].mean(1)
             - down[rng.integers(0, down.size, (draws, down.size))].mean(1))
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

    @classmethod
    def of(cls, moves: list[float], labels: list[bool], groups: list[str],
           confidence: float) -> "PermutationTest":
        m, lab = np.asarray(moves, dtype=np.float64), np.asarray(labels, dtype=bool)
        stat = float(_statistic(m, lab)) if lab.any() and not lab.all() else math.nan
        lower, upper = _interval(m, lab, confidence)
        return cls(int(m.size), int(lab.sum()), stat, lower, upper,
                   permutation_p(moves, labels, groups), confidence)

    @property
    def passed(self) -> bool:
        return 0 < self.ups < self.n and self.p_value < (1.0 - self.confidence) / 2

    def describe(self, what: str, unit: str) -> str:
        if not 0 < self.ups < self.n:
            return f"{what}: held-out answers of one label only, nothing to compare"
        return (f"every held-out answer ({self.ups} up, {self.n - self.ups} down): mean move of "
                f"the liked minus the disliked {self.mean:+.4f} nats/token, "
                f"{self.confidence:.0%} bootstrap interval [{self.lower:+.4f}, {self.upper:+.4f}]:"
                f" one-sided randomization p = {self.p_value:.3g} "
                f"{'<' if self.passed else '>='} {(1.0 - self.confidence) / 2:.3g}")

    def result(self) -> MarginResult:
        return MarginResult(self.n, self.mean, self.lower, self.upper, self.p_value)
