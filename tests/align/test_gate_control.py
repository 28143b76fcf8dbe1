"""benchmarks/gate_control.py's random population log: it must hold every kind of feedback the
default job trains on (thumbs at the stated 👍 rate, picks, edits, cut and finished answers), or
the control measures something other than the default job on random feedback."""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gate_control as G  # noqa: E402


def test_the_random_population_log_holds_thumbs_picks_and_edits_as_the_default_job_reads_them(tmp_path):
    from prefloop.server.feedback.export import load_rated_answers
    counts = G.write_random_population(tmp_path / "data", 120, random.Random(3), up_rate=0.3)
    assert sum(counts.values()) == 120 and all(counts[k] > 0 for k in ("thumbs", "pick", "edit"))
    rows = load_rated_answers(tmp_path / "data", voter_cap=None)
    by_source = {"rating": [r for r in rows if r.source == "rating"],
                 "preference": [r for r in rows if r.source == "preference"]}
    assert len(by_source["rating"]) == counts["thumbs"]
    # a pick or an edit is two answers, one liked and one not
    assert len(by_source["preference"]) == 2 * (counts["pick"] + counts["edit"])
    assert sum(r.label for r in by_source["preference"]) == counts["pick"] + counts["edit"]
    ups = sum(r.label for r in by_source["rating"])
    assert 0.15 < ups / counts["thumbs"] < 0.45  # 👍 at 0.3 (binomial, n ~ 84)
    assert any(r.finish_reason == "length" for r in rows) and any(r.finish_reason == "stop" for r in rows)

