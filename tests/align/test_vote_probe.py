"""benchmarks/vote_probe.py's cross-fitted ridge probe: its out-of-fold map against per-fold fits,
and its randomization test's power and level."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from vote_probe import out_of_fold_map, probe_test  # noqa: E402


def test_the_out_of_fold_map_gives_each_fold_the_ridge_fit_of_the_other_folds():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=30)
    folds, lam = np.arange(30) % 3, 2.5
    expected = np.empty(30)
    for f in range(3):  # the oracle: an explicit ridge fit with an unpenalized intercept
        tr, te = folds != f, folds == f
        design = np.hstack([np.ones((tr.sum(), 1)), x[tr]])
        penalty = lam * np.diag([0.0, 1, 1, 1, 1])
        coef = np.linalg.solve(design.T @ design + penalty, design.T @ y[tr])
        expected[te] = np.hstack([np.ones((te.sum(), 1)), x[te]]) @ coef
    assert out_of_fold_map(x, folds, lam) @ y == pytest.approx(expected, abs=1e-9)


def test_the_probe_finds_labels_its_features_carry_and_holds_its_level_on_random_labels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5))
    groups = [f"prompt-{i // 2}" for i in range(60)]  # picks: two answers of each prompt
    carried = np.zeros(60, dtype=bool)
    for i in range(0, 60, 2):  # the liked answer of each pick is the one higher on x[:, 0]
        carried[i + int(x[i + 1, 0] > x[i, 0])] = True
    auc, p = probe_test(x, carried, groups, scale=0.1, draws=400)
    # across prompts a liked answer can sit lower than another prompt's disliked one: the AUC
    # of the feature itself is about 0.75 here
    assert auc > 0.7 and p < 0.01
    random_ps = []
    for _ in range(100):
        labels = np.zeros(60, dtype=bool)
        labels[np.arange(0, 60, 2) + rng.integers(0, 2, 30)] = True
        random_ps.append(probe_test(x, labels, groups, scale=0.1, draws=200)[1])
    assert np.mean(np.array(random_ps) <= 0.1) <= 0.18  # 0.1 expected; 0.18 is 2.7 sd above it
