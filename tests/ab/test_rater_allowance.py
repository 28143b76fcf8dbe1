"""Which head-to-head votes an A/B test counts (server/ab/allowance.py): a rater's first 5, then
while it holds at most a quarter of the counted votes and at most 4x the median other rater's.
Checked against a direct recount with `statistics.median` on random streams, on the cases the
rule is for (a small team's long test keeps growing; one user alone or among others stays
bounded), and through the feedback log's tally."""
from __future__ import annotations

import random
import statistics

from prefloop.cli.models import format_ab
from prefloop.server.ab import state as ab_state
from prefloop.server.ab.allowance import RaterAllowance
from prefloop.server.ab.evidence import status as ab_status
from prefloop.server.ab.evidence import tally


def counted(raters, allowance=None) -> dict:
    allowance = allowance or RaterAllowance()
    for r in raters:
        allowance.admit(r)
    return dict(allowance.counts)


def test_admit_matches_a_direct_recount_with_statistics_median_on_random_streams():
    rng = random.Random(0)
    for trial in range(40):
        weights = [rng.paretovariate(1.2) for _ in range(rng.randint(1, 12))]
        stream = rng.choices(range(len(weights)), weights, k=rng.randint(1, 300))
        fast, counts = RaterAllowance(), {}
        for r in stream:
            mine, total = counts.get(r, 0), sum(counts.values())
            others = [c for k, c in counts.items() if k != r]
            median = statistics.median(others) if others else 0.0
            expect = mine < 5 or (mine + 1 <= 0.25 * (total + 1) and mine + 1 <= 4 * median)
            assert fast.admit(r) == expect, (trial, r, counts)
            if expect:
                counts[r] = mine + 1
        assert fast.counts == counts


def test_a_team_of_25_comparing_alike_counts_every_vote_where_first_five_stopped_at_125():
    stream = [f"u{i}" for _ in range(12) for i in range(25)]  # 300 votes, 12 per rater
    assert sum(counted(stream).values()) == 300
    assert sum(counted(stream, RaterAllowance(factor=0)).values()) == 125  # the old rule


def test_one_rater_alone_counts_five_and_four_alike_keep_the_old_cap():
    assert counted(["fan"] * 200) == {"fan": 5}
    four = counted([f"u{i}" for _ in range(10) for i in range(4)])
    assert four == {f"u{i}": 5 for i in range(4)}
    five = counted([f"u{i}" for _ in range(10) for i in range(5)])
    assert five == {f"u{i}": 10 for i in range(5)}


def test_a_flooder_among_twenty_raters_stays_within_four_medians_and_a_quarter():
    rng = random.Random(1)
    stream = [f"u{i}" for _ in range(3) for i in range(20)] + ["fan"] * 200
    rng.shuffle(stream)
    counts = counted(stream)
    assert all(counts[f"u{i}"] == 3 for i in range(20))  # the others all count
    assert counts["fan"] == 12  # 4 x the median other rater's 3
    assert counts["fan"] <= 0.25 * sum(counts.values())


def test_the_tally_and_ab_status_count_a_small_teams_long_test_whole_and_cap_its_flooder(tmp_path):
    from ab_helpers import one_answer_each, two_versions
    registry, v1 = two_versions(tmp_path)
    state = ab_state.start(registry, v1, force=True)
    with one_answer_each(tmp_path, v1) as store:
        for round_ in range(8):  # ten colleagues compare 8 times each: 6 for the candidate
            for i in range(10):
                chosen, rejected = ("c", "k") if round_ < 6 else ("k", "c")
                store.submit_preference(chosen_response_id=chosen, rejected_response_id=rejected,
                                        user_id=f"colleague-{i}")
        for _ in range(100):  # then one of them keeps going
            store.submit_preference(chosen_response_id="c", rejected_response_id="k",
                                    user_id="colleague-0")
    counts = tally(tmp_path / "data", state)
    # all 80 count (first 5 each: 50); colleague-0 then up to a quarter of what counts: 24 in all
    # (72 from the others; 4 x their median 8 would allow 32)
    assert (counts.wins, counts.losses) == (60 + 16, 20)
    assert counts.over_cap == 100 - 16
    shown = format_ab(ab_status(registry, tmp_path / "data"))
    assert "head-to-head: 76 wins, 20 losses" in shown
    assert "84 more head-to-head votes not counted: past their rater's allowance" in shown
