"""Which of a rater's head-to-head votes an A/B test counts: its first few, then its fair share.

Until 2026-12-06 each rater counted with its first 5 votes of a test, and no more. That stops one
user flooding compare votes from deciding a test, but it also caps a small team's test for good:
25 people who compare can give 125 counted votes in all, however long the test runs (the real
loop of 2026-12-06 stopped at 74–51 that way, its evidence frozen; docs/ab.md), and a team of 10
can give 50, fewer than a candidate that wins 0.7 needs at a season's first level.

`RaterAllowance` counts a rater's vote when the rater has counted fewer than `floor` (5), or — past
that — when counting it leaves the rater with at most `share` (a quarter) of the counted votes and
at most `factor` (4) times the median count of the other raters. So:

- a team whose members compare about as often as each other counts every vote, however long the
  test runs, once it has at least five such members (4 or fewer keep the old 5 each);
- one user alone counts 5 votes; among others, never more than a quarter of what counts nor four
  times a typical rater (the training reads' voter cap is 4x the median voter too:
  server/feedback/voter_caps.py), so a single enthusiast cannot carry a test;
- which votes count depends only on who voted in which order, never on what they chose, so the
  sequential rule keeps its level (server/ab/decision.py: each counted vote, given the ones before,
  is won with probability at most one half while the candidate is no better).

`RaterAllowance(factor=0)` is the old rule (each rater's first `floor`), for the benchmarks that
compare the two.
"""
from __future__ import annotations

from bisect import bisect_left, insort

FLOOR = 5  # a quarter of the default min_votes (20): alone, a rater cannot reach it
SHARE = 0.25
FACTOR = 4.0


class RaterAllowance:
    """Feed it the raters of a test's head-to-head votes in arrival order (`admit`)."""

    def __init__(self, floor: int = FLOOR, share: float = SHARE, factor: float = FACTOR) -> None:
        self.floor, self.share, self.factor = floor, share, factor
        self.counts: dict[str, int] = {}
        self.total = 0
        self._sorted: list[int] = []  # every rater's count, ascending

    def admit(self, rater: str) -> bool:
        """Whether `rater`'s next vote counts (and if so, count it)."""
        mine = self.counts.get(rater, 0)
        if mine >= self.floor and not (mine + 1 <= self.share * (self.total + 1)
                                       and mine + 1 <= self.factor * self._median_of_others(mine)):
            return False
        if mine:
            del self._sorted[bisect_left(self._sorted, mine)]
        insort(self._sorted, mine + 1)
        self.counts[rater] = mine + 1
        self.total += 1
        return True

    def _median_of_others(self, mine: int) -> float:
        """The median count of the raters other than one whose count is `mine` (> 0, so it is in
        `_sorted`); 0 when there are none."""
        n = len(self._sorted) - 1
        if n <= 0:
            return 0.0
        skip = bisect_left(self._sorted, mine)  # drop one occurrence of `mine`

        def at(k: int) -> int:
            return self._sorted[k if k < skip else k + 1]
        return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2
