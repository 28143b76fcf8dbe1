"""Which held-out statistic sees what a candidate learned from votes? One kept candidate (a
`loop_sweep.py --keep` run dir), the gate's own held-out answers (the job's time split), and the
rating test's one-sided randomization p-value (align/rating_test.py) under each way of measuring
an answer's move, side by side:

- per_token: Σ_t log π_cand/π_cur (y_t) / tokens (the gate until 2026-12-05);
- sum: the same sum undivided (the implicit reward KTO and DPO train; the gate now);
- centered_per_token / centered_sum: minus its expectation had every token been drawn from the
  current version given the same prefix, −Σ_t KL_t(π_cur ‖ π_cand) (`evaluate.centered_moves`);
- sampled_baseline (with --samples K > 0): per_token minus the mean per-token move of K answers
  the current version samples for the same prompt at the page's settings — the same idea by
  sampling, at the cost of generating K answers per held-out prompt.

Beside them: the candidate's KL to the current version on the held-out answers (the gate's KL) and
on its own answers to --own-kl-prompts held-out prompts (the degeneration check's,
align/degeneration.py), and from those answers and the current version's (same seeds) the
answer-shift test (align/answer_shift.py) on all of them and on the newest half, each alone and
joined with the summed moves as the gate joined them until 2026-12-06 (`+sum`: ranks averaged).
With --preference, the ceiling: the same test scoring every held-out answer by the simulated users'
own preference.

    python benchmarks/gate_power.py --run /tmp/sweep3/short_sentences-...-seed2/run-default
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

from prefloop.align import data as data_mod
from prefloop.align import evaluate as ev
from prefloop.align.answer_shift import AnswerShift, token_text
from prefloop.align.degeneration import last_user_text
from prefloop.align.jobs.preference import distinct_prompts, own_answer_kl
from prefloop.align.rating_test import DRAWS, PermutationTest
from prefloop.align.train.common import load_causal_lm
from prefloop.align.train.ppo import sample_texts
from prefloop.server import registry as reg
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.voter_caps import DEFAULT_VOTER_CAP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_users import PREFERENCES, unwanted  # noqa: E402


def heldout_ceiling(data_dir: Path, preference: str, fraction: float = 0.2) -> dict:
    """`ceiling` on the held-out answers a job with `--heldout-fraction fraction` would judge, with
    the feedback events (a thumb, a pick: distinct feedback ids) the whole log holds."""
    rows = data_mod.load_examples(data_dir, voter_cap=DEFAULT_VOTER_CAP)
    held = data_mod.time_split(rows, fraction).heldout
    return dict(ceiling(preference, held), answers=len(held),
                events=len({r.feedback_id for r in rows}))


def midpoint_ceiling(data_dir: Path, preference: str, fraction: float = 0.2) -> dict:
    """`ceiling` of the midpoint test (align/train/midpoint.py) on the same log: the newer half
    of a default job's training answers, and that joined with the held-out ceiling as the gate
    joins them (rating_test.CombinedTest's weights)."""
    from prefloop.align.rating_test import balanced_pairs, stouffer_p
    from prefloop.align.train.midpoint import plan
    rows = data_mod.load_examples(data_dir, voter_cap=DEFAULT_VOTER_CAP)
    split = data_mod.time_split(rows, fraction)
    halves = plan(split.train, drop_looping=False)
    newer = ceiling(preference, halves.scored)

    def weight(part) -> float:
        return math.sqrt(balanced_pairs([bool(r.label) for r in part],
                                        [logschema.prompt_fingerprint(None, r.prompt) for r in part]))
    held = ceiling(preference, split.heldout)
    joined = stouffer_p([held["p"], newer["p"]],
                        [weight(split.heldout), weight(halves.scored) * halves.trained_share])
    return dict(newer, answers=len(halves.scored), joined_p=float(f"{joined:.3g}"),
                events=len({r.feedback_id for r in rows}))


def ceiling(preference: str, held) -> dict:
    """The rating test with the users' own preference as the score of every held-out answer
    (benchmarks/loop_users.py; an `unwanted` answer, looping or off topic, scores lowest, as those
    users rate it): how much evidence the held-out labels carry at all."""
    score = [PREFERENCES[preference](r.text) - (1e9 if unwanted(r.text, last_user_text(r.prompt)) else 0.0)
             for r in held]
    test = PermutationTest.of(score, [bool(r.label) for r in held],
                              [logschema.prompt_fingerprint(None, r.prompt) for r in held], 0.9)
    # three significant digits: rounded to four decimals a p-value under 5e-5 read as 0, and
    # `events_for_level` then gave the events the votes already have
    return {"auc": round(test.mean, 3), "p": float(f"{test.p_value:.3g}"),
            "at_floor": test.p_value <= 1.0 / (1 + DRAWS) * (1 + 1e-9)}


def events_for_level(p: float, events: int, level: float = 0.0125) -> int | None:
    """About how many events the votes would need before a test whose one-sided p is `p` on
    `events` reaches `level`, if each event carried as much evidence as these do: the z-score of a
    rank test grows with the square root of the answers it ranks, so events × (z_level / z_p)²
    (None when p ≥ 0.5: these votes show no direction to extrapolate). Applied to the ceiling it
    estimates the events any candidate needs to promote offline: roughly, since it extrapolates
    one Monte Carlo p-value of one draw of votes."""
    if not 0.0 < p < 0.5:
        return None if p >= 0.5 else events
    z = NormalDist().inv_cdf
    return math.ceil(events * (z(1 - level) / z(1 - p)) ** 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", type=Path, required=True,
                    help="a kept loop_sweep run dir (its registry holds v0000 and the candidate)")
    ap.add_argument("--candidate", default=None, help="the candidate version (default: newest)")
    ap.add_argument("--samples", type=int, default=0,
                    help="current's answers per held-out prompt for sampled_baseline (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=128, help="of each sampled answer")
    ap.add_argument("--temperature", type=float, default=0.7, help="of the sampled answers")
    ap.add_argument("--heldout-fraction", type=float, default=0.2, help="as the job's")
    ap.add_argument("--seed", type=int, default=0, help="of the sampled answers")
    ap.add_argument("--preference", default=None,
                    help="the loop_users preference the votes were cast by: adds the ceiling, the "
                         "same test with every held-out answer scored by that preference itself "
                         "(a looping answer last), which no statistic of the candidate can beat "
                         "by more than chance")
    ap.add_argument("--own-kl-prompts", type=int, default=16,
                    help="held-out prompts the candidate answers for its KL on its own answers, "
                         "as the degeneration check takes it (0: skip)")
    args = ap.parse_args()
    started = time.perf_counter()
    registry = reg.Registry(args.run)
    cand = args.candidate or sorted(p.name for p in registry.versions_dir.iterdir())[-1]
    held = data_mod.time_split(data_mod.load_examples(args.run, voter_cap=DEFAULT_VOTER_CAP),
                               args.heldout_fraction).heldout
    print(f"gate_power: {cand} vs v0000 on {len(held)} held-out answers", file=sys.stderr,
          flush=True)
    out: dict = {"run": str(args.run), "candidate": cand}
    if args.preference:
        out["ceiling"] = ceiling(args.preference, held)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(registry.version_dir("v0000"))
    policy = load_causal_lm(registry.version_dir(cand), "cpu")
    current = load_causal_lm(registry.version_dir("v0000"), "cpu")
    scores = ev.score_examples(policy, tok, held, reference=current, batch_size=4, back_kl=True)
    raw = (scores.logps - scores.ref_logps).numpy()
    centered = np.array(ev.centered_moves(scores))
    tokens = scores.tokens.clamp(min=1).numpy()
    labels = [bool(r.label) for r in held]
    groups = [logschema.prompt_fingerprint(None, r.prompt) for r in held]
    variants = {"per_token": raw / tokens, "sum": raw, "centered_per_token": centered / tokens,
                "centered_sum": centered}
    keys = sorted(set(groups))
    if args.samples > 0:
        prompt_of = {g: r.prompt for g, r in zip(groups, held)}
        asked = [g for g in keys for _ in range(args.samples)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            texts = sample_texts(current, tok, [prompt_of[g] for g in asked],
                                 max_new_tokens=args.max_tokens, temperature=args.temperature,
                                 seed=args.seed)
        s_items = [ev.encode(tok, prompt_of[g], [{"role": "assistant", "content": t}], 1024,
                             cut=True) for g, t in zip(asked, texts)]
        s = ev.score_encoded(policy, tok, s_items, reference=current, batch_size=4)
        s_moves = ((s.logps - s.ref_logps) / s.tokens.clamp(min=1)).numpy()
        baseline = {g: float(np.mean([m for h, m in zip(asked, s_moves) if h == g]))
                    for g in keys}
        variants["sampled_baseline"] = raw / tokens - np.array([baseline[g] for g in groups])
    out.update({"answers": len(held), "ups": sum(labels), "prompts": len(keys),
                "samples_per_prompt": args.samples})
    for name, moves in variants.items():
        test = PermutationTest.of(moves.tolist(), labels, groups, 0.9)
        out[name] = {"auc": round(test.mean, 3), "p": round(test.p_value, 4)}
    if args.own_kl_prompts:
        prompts = distinct_prompts([r.prompt for r in held], args.own_kl_prompts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            answers = sample_texts(policy, tok, prompts, max_new_tokens=96, temperature=0.7,
                                   seed=0)
            theirs = sample_texts(current, tok, prompts, max_new_tokens=96, temperature=0.7,
                                  seed=0)
        out["own_answer_kl"] = round(own_answer_kl(policy, current, tok, prompts, answers), 4)
        out["heldout_kl"] = round(float(scores.kl_sum.sum() / scores.tokens.sum()), 4)
        ids = lambda texts: [tok(t, add_special_tokens=False).input_ids for t in texts]  # noqa: E731
        held_ids = ids([r.text for r in held])
        for name, sl in (("answer_shift", slice(None)),
                         (f"answer_shift_newest_{len(prompts) // 2}", slice(len(prompts) // 2, None))):
            shift = AnswerShift.of(ids(answers[sl]), ids(theirs[sl]), len(tok))
            scores_s = np.array(shift.scores(held_ids))
            test = PermutationTest.of(scores_s.tolist(), labels, groups, 0.9)
            out[name] = {"auc": round(test.mean, 3), "p": round(test.p_value, 4),
                         "prompts": len(prompts[sl]), "top": shift.describe_top(token_text(tok))}
            test = PermutationTest.of(raw.tolist(), labels, groups, 0.9, also=scores_s.tolist())
            out[name + "+sum"] = {"auc": round(test.mean, 3), "p": round(test.p_value, 4)}
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))
    print(f"gate_power: done in {out['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
