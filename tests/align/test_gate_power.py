"""benchmarks/gate_power.py's extrapolation of how many events a test needs to reach a level."""
import sys
from pathlib import Path
from statistics import NormalDist

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gate_power import events_for_level  # noqa: E402


def test_events_for_level_scales_events_by_the_squared_ratio_of_z_scores():
    z = NormalDist().inv_cdf
    half = 1 - NormalDist().cdf(z(1 - 0.0125) / 2)  # a p whose z is half the level's
    assert events_for_level(half, 300) == pytest.approx(1200, abs=1)
    assert events_for_level(0.0125, 300) == 300  # already at the level: the events it has
    assert events_for_level(0.001, 300) < 300  # past it: fewer would have done


def test_events_for_level_gives_none_when_the_votes_show_no_direction_and_the_events_at_p_0():
    assert events_for_level(0.5, 300) is None
    assert events_for_level(0.8, 300) is None
    assert events_for_level(0.0, 300) == 300  # already decided: nothing to extrapolate
