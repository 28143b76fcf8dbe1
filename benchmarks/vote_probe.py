"""Can a judge learned from the votes see more than the candidate does? One or more kept loop runs
(`loop_sweep.py --keep` run dirs), every rated answer of each log (thumbs, stars, both sides of
picks; the job's voter cap), and beside each other:

- the probe: the base model's last hidden state averaged over each answer's tokens, a ridge
  regression of the label on it, cross-fitted over 5 folds of prompts (a pick's two answers and
  one prompt's thumbs stay in one fold), at several strengths λ (× the features' mean variance ×
  the answers: fixed scales, nothing chosen on the labels). Its out-of-fold AUC (a liked answer
  scored above a disliked one) and a one-sided randomization p: the labels shuffled as the gate's
  rating test shuffles them (align/rating_test.py: within each prompt of several answers, and
  across the lone ones) and the probe refitted on each arrangement — exact in level, because the
  out-of-fold scores are a fixed linear map of the labels (features and folds do not see them);
- with --preference, the ceiling on the same answers: the users' own preference as the score
  (benchmarks/gate_power.py), i.e. the most any judge could see in these votes.

The gate's tests see only the held-out fifth of a log; a judge cross-fitted on all of it would see
five times the answers, so it could promote a candidate where the held-out votes cannot (the
candidate would then be judged by the probe on its own answers, as the PPO gate judges with its
reward model). This measures whether such a judge learns the preference from 300 noisy events.

    python benchmarks/vote_probe.py --preference short_sentences --runs /tmp/fresh18/short_sentences/*/run-default
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prefloop.align import data as data_mod
from prefloop.align import evaluate as ev
from prefloop.align.rating_test import _auc, arrangements
from prefloop.align.train.common import load_causal_lm, load_tokenizer
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.voter_caps import DEFAULT_VOTER_CAP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_power import ceiling  # noqa: E402

FOLDS = 5
SCALES = (0.01, 0.1, 1.0, 10.0)


def answer_features(model, tokenizer, rows, batch_size: int = 8) -> np.ndarray:
    """[answers, hidden]: the last hidden state averaged over each answer's tokens (the answer as
    the user saw it: a cut one without the end-of-turn tokens)."""
    items = [ev.encode(tokenizer, r.prompt, r.completion, 1024, cut=True) for r in rows]
    out = []
    with torch.inference_mode():
        for s in range(0, len(items), batch_size):
            ids, att, comp = ev._batch(items[s:s + batch_size], tokenizer.pad_token_id or 0, "cpu")
            h = model.model(input_ids=ids, attention_mask=att).last_hidden_state.float()
            m = comp.unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
    return np.concatenate(out)


def out_of_fold_map(x: np.ndarray, folds: np.ndarray, lam: float) -> np.ndarray:
    """S [n, n] with S @ y = the out-of-fold predictions of a ridge regression (with intercept)
    of y on x: each fold predicted by the fit on the other folds."""
    n, d = x.shape
    s = np.zeros((n, n))
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        mu = x[tr].mean(0)
        xc = x[tr] - mu
        a = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T)  # [d, n_train]
        k = int(tr.sum())
        centre = np.eye(k) - 1.0 / k  # y_train minus its mean
        s[np.ix_(te, tr)] = (x[te] - mu) @ a @ centre + 1.0 / k
    return s


def aucs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC of each row of `scores` [draws, n] against the same row of `labels` (continuous
    scores: no ties)."""
    return _auc(np.argsort(np.argsort(scores, axis=-1), axis=-1) + 1.0, labels)


def probe_test(x: np.ndarray, labels: np.ndarray, groups: list[str], scale: float,
               draws: int = 4000, seed: int = 0) -> tuple[float, float]:
    """(out-of-fold AUC, one-sided randomization p) of the cross-fitted ridge probe."""
    prompt_of = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    folds = np.array([prompt_of[g] % FOLDS for g in groups])
    lam = scale * float(np.trace(np.cov(x.T))) * len(x) / x.shape[1]
    s = out_of_fold_map(x, folds, lam)
    observed = float(aucs(s @ labels.astype(float), labels))
    arranged = arrangements(labels, groups, draws, seed)  # [draws, n]
    null = aucs(arranged.astype(float) @ s.T, arranged)
    return observed, float((1 + (null >= observed).sum()) / (1 + draws))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True,
                    help="run dirs of loop_sweep.py --keep (their registry holds the base v0000)")
    ap.add_argument("--preference", default=None,
                    help="the simulated users' preference, for the ceiling (loop_users.py)")
    ap.add_argument("--draws", type=int, default=4000, help="label arrangements per p-value")
    args = ap.parse_args()
    print(f"vote_probe: {len(args.runs)} log(s), λ scales {SCALES}", flush=True)
    for run in args.runs:
        started = time.perf_counter()
        base = run / "registry" / "versions" / "v0000"
        tok, model = load_tokenizer(base), load_causal_lm(base)
        rows = data_mod.load_examples(run, voter_cap=DEFAULT_VOTER_CAP)
        labels = np.array([bool(r.label) for r in rows])
        groups = [logschema.prompt_fingerprint(None, r.prompt) for r in rows]
        x = answer_features(model, tok, rows)
        cells = [probe_test(x, labels, groups, s, args.draws) for s in SCALES]
        line = "  ".join(f"λ×{s:g}: AUC {a:.3f} p {p:.3f}" for s, (a, p) in zip(SCALES, cells))
        if args.preference:
            c = ceiling(args.preference, rows)
            line += f"  | ceiling AUC {c['auc']:.3f} p {'≤ ' if c['at_floor'] else ''}{c['p']:g}"
        print(f"{run.parent.name}: {len(rows)} answers ({int(labels.sum())} liked)  {line}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
