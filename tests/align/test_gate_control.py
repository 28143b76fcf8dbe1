"""benchmarks/gate_control.py's random population log: it must hold every kind of feedback the
default job trains on, with labels that do not depend on the answers, or the control measures
something other than the default job on random feedback."""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gate_control as G  # noqa: E402


def test_the_random_population_log_holds_thumbs_picks_and_edits_as_the_default_job_reads_them(tmp_path):
    from prefloop.server.feedback.export import load_rated_answers
    counts = G.write_random_population(tmp_path / "data", 120, random.Random(3), up_rate=0.3)
    assert sum(counts.values()) == 120 and all(counts[k] > 0 for k in ("thumbs", "compare", "edit"))
    rows = load_rated_answers(tmp_path / "data", voter_cap=None)
    by_source = {"rating": [r for r in rows if r.source == "rating"],
                 "preference": [r for r in rows if r.source == "preference"]}
    assert len(by_source["rating"]) == counts["thumbs"]
    # a pick or an edit is two answers, one liked and one not
    assert len(by_source["preference"]) == 2 * (counts["compare"] + counts["edit"])
    assert sum(r.label for r in by_source["preference"]) == counts["compare"] + counts["edit"]
    ups = sum(r.label for r in by_source["rating"])
    assert 0.15 < ups / counts["thumbs"] < 0.45  # 👍 at 0.3 (binomial, n ~ 84)
    assert any(r.finish_reason == "length" for r in rows) and any(r.finish_reason == "stop" for r in rows)


def test_clopper_pearson_matches_known_intervals():
    lo, hi = G.clopper_pearson(0, 20)
    assert lo == 0.0 and abs(hi - 0.1684) < 5e-4  # the rule of three's exact form
    lo, hi = G.clopper_pearson(5, 100)
    assert abs(lo - 0.0164) < 5e-4 and abs(hi - 0.1128) < 5e-4
