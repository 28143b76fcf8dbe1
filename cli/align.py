"""`prefloop align`: retrain on the feedback log and publish candidates to the registry, every
method in one command module.

    prefloop align dpo   --data-dir DIR [--since DATE] [--base VERSION] [--beta 0.1]
                         [--loss sigmoid|ipo|hinge|robust] [--epochs N] [--lr LR] [--no-lora]
                         [--max-pairs N] [--promote]
    prefloop align kto   --data-dir DIR [...]                  thumbs up/down (KTOTrainer)
    prefloop align sft   --data-dir DIR [...]                  users' own / top-rated answers
    prefloop align rm    --data-dir DIR [--base VERSION] [--margin] [--train-layers N] ...
    prefloop align score --data-dir DIR --rm VERSION [--since DATE] [--rescore]
    prefloop align ppo   --data-dir DIR --rm VERSION [--steps N] [--beta 0.05] [--adaptive-kl]
                         [--plot] [--promote] ...
    prefloop align run   [kto|dpo|sft|ppo] --data-dir DIR [--min-new-pairs N] [--auto-promote]
                         (no method: kto, on every kind of feedback; the older
                         `align run --method M` spelling is rewritten to this)
    prefloop align schedule dpo|kto|sft|ppo --every 6h [run options]   `align run` on a timer
    prefloop align jobs  --data-dir DIR [--json]               the job history

A CLI subcommand module (`add_arguments(parser)`, `run(args) -> int`, registered in
cli/main.py). The work is in align/jobs/ (preference.py: dpo, kto; reward.py: rm, score;
ppo.py; schedule.py); this file declares the flags (one parser per method, with only the flags
that method reads), maps them to the job configs and runs the job; align_output.py prints the
result. Exit codes: 0 done (including "skipped" and "rejected"), 1 the job failed, 2 bad
arguments or data directory, 3 another job holds the lock, 130 interrupted (Ctrl-C; recorded in
the job history).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from prefloop.server.registry import DATA_DIR_ENV, MAX_ADAPTER_CHAIN
from prefloop.server.version_summary import VersionSummary

log = logging.getLogger("prefloop.align")


# ---------------------------------------------------------------------------------------------
# Flag groups (each declared once)


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                   help=f"the server's data directory (default ${DATA_DIR_ENV} or ./data)")


def _source(p: argparse.ArgumentParser) -> None:
    """--data-dir and where a job starts from: the rows' window and the base version."""
    _data_dir(p)
    p.add_argument("--since", default=None, metavar="DATE",
                   help="only log rows created on/after this date (YYYY-MM-DD) or ISO time")
    p.add_argument("--base", default=None, metavar="VERSION",
                   help="policy version to start from (and regularize towards; default: the "
                        "current version)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="HF folder or .gguf that becomes v0000 if the registry is empty "
                        "(default: the embedded default model)")
    p.add_argument("--cache-dir", default=None, help="model cache (default $PREFLOOP_CACHE_DIR)")


def _trainer(g, *, default_lr: str, max_length_help: str, lora: bool = False) -> None:
    """The flags of a TRL trainer (DPO / KTO / reward model); `g` is the training group.
    `lora`: whether LoRA is the default (the policy trainers; --no-lora for a full fine-tune)."""
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {default_lr})")
    g.add_argument("--batch-size", type=int, default=4, help="pairs per step per device")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--max-length", type=int, default=1024, help=max_length_help)
    g.add_argument("--lora", action=argparse.BooleanOptionalAction if lora else "store_true",
                   default=lora, help="train a LoRA adapter (peft) "
                                      f"(default {'on' if lora else 'off'})")
    if lora:
        g.add_argument("--publish", choices=("adapter", "full"), default="adapter",
                       help="with LoRA, what a published version holds: the adapter (a few MB; "
                            "served over its base version) or merged full weights; after "
                            f"{MAX_ADAPTER_CHAIN} adapters in a row the next version is full "
                            "(default %(default)s)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (with --lora)")
    g.add_argument("--lora-alpha", type=int, default=32,
                   help="LoRA scaling alpha (with --lora; the update is scaled by alpha / r)")
    _seed_bf16(g)
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="trade compute for memory (worth it on GPUs with long sequences)")


def _seed_bf16(g) -> None:
    g.add_argument("--seed", type=int, default=0,
                   help="random seed of shuffling, initialization and sampling")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 mixed precision (default: on for CUDA with bf16; DPO / KTO / SFT "
                        "also on a CPU with native bf16, AVX512-BF16 / AMX)")
    g.add_argument("--verbose", action="store_true",
                   help="print the trainer's raw per-step log dicts (default: a progress bar "
                        "with the loss)")


def _evaluation(g, *, eval_batch_size: int) -> None:
    g.add_argument("--heldout-fraction", type=float, default=0.2,
                   help="newest fraction of the rows held out for evaluation (default 0.2)")
    g.add_argument("--eval-batch-size", type=int, default=eval_batch_size,
                   help="sequences per forward pass when scoring train / held-out rows")
    g.add_argument("--device", default=None, help="evaluation device (default cuda if present)")


def _voter_cap(g) -> None:
    g.add_argument("--voter-cap", type=float, default=4.0, metavar="FACTOR",
                   help="no voter (user or session id) gives more than FACTOR x the median "
                        "voter's rows (at least 20), so one user flooding votes cannot steer "
                        "the model; 0: every row counts (default %(default)s)")


def _voter_cap_of(args: argparse.Namespace):
    from prefloop.server.errors import InvalidArgument
    from prefloop.server.feedback.voter_caps import cap_of_factor
    try:
        return cap_of_factor(args.voter_cap)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _gate_statistics(g) -> None:
    g.add_argument("--gate-confidence", type=float, default=0.9, metavar="C",
                   help="confidence of the gate's exact two-sided interval; it passes only if "
                        "the interval's lower end clears the bar, so a candidate no better "
                        "passes at most (1-C)/2 of the time (default %(default)s: 5%%)")
    g.add_argument("--min-heldout-pairs", type=int, default=20, metavar="N",
                   help="the gate never passes on fewer held-out pairs (ppo: prompts; kto: or "
                        "rated answers that weigh as that many balanced pairs, "
                        "2·up·down/(up+down)) (default %(default)s)")


def _gate(p: argparse.ArgumentParser, improvement: str, *, policy_metric: bool = False) -> None:
    gate = p.add_argument_group("eval gate (docs/align.md)")
    gate.add_argument("--max-kl", type=float, default=None,
                      help="largest KL(candidate ‖ reference) per held-out answer token, nats "
                           "(default 0.5)")
    gate.add_argument("--min-improvement", type=float, default=0.0,
                      help=f"{improvement}: the interval's lower end must be above 0.5 + this "
                           "(default 0)")
    _gate_statistics(gate)
    gate.add_argument("--max-root-kl", type=float, default=1.0, metavar="NATS",
                      help="largest KL per held-out answer token to the root version v0000: "
                           "the drift of the whole chain of versions, which per-job KL bounds "
                           "do not limit (default %(default)s)")
    gate.add_argument("--season-spending", choices=("harmonic", "separate", "none"),
                      default="harmonic",
                      help="the level of each decision against one current version: harmonic "
                           "spends the stated level over the season (the k-th decision at "
                           "level/(k(k+1)), so all of them together false-promote at most the "
                           "stated 5%%; with --promote-via auto the offline gate gets a third of "
                           "a decision and an A/B test it starts the rest, more of it the closer "
                           "the offline p-value came); separate: the same, with each A/B test a "
                           "decision of its own (the rule before 2026-12-06); none: the full "
                           "level every job (align/season.py) (default %(default)s)")
    gate.add_argument("--look-growth", type=float, default=1.5, metavar="X",
                      help="align run / schedule: after a decision against the current version, "
                           "the next job runs once the window has grown by this factor "
                           "(default %(default)s)")
    gate.add_argument("--ab-span", type=float, default=3.0, metavar="X",
                      help="align run / schedule with --promote-via auto: an A/B test a job "
                           "started that is still undecided when the window has grown by this "
                           "factor since that job ends (the current version stays) and the next "
                           "job trains (default %(default)s; docs/align.md)")
    gate.add_argument("--ab-traffic", type=float, default=0.1, metavar="SHARE",
                      help="align run / schedule with --promote-via auto: the share of users an "
                           "A/B test a job starts serves the candidate to; more decides sooner "
                           "on thumbs and shows more users an unproven version (default "
                           "%(default)s; docs/ab.md)")
    gate.add_argument("--ab-futility-win", type=float, default=0.7, metavar="P",
                      help="align run / schedule with --promote-via auto: an A/B test a job "
                           "started also ends, rejected, once its head-to-head votes are 10 times "
                           "likelier at a win rate of 1/2 than at P while the ratings do not "
                           "lean the candidate's way, so the next job trains sooner; a candidate "
                           "that wins at least P of the votes is ended so with probability <= 0.1 "
                           "(0: never; default %(default)s; docs/ab.md)")
    if policy_metric:
        gate.add_argument("--degeneration-prompts", type=int, default=16, metavar="N",
                          help="held-out prompts the candidate and the current version both "
                               "answer; the gate rejects a candidate that loops, repeats words, "
                               "changes its answer length or leaves its prompts' topic "
                               "measurably more; KTO's rating "
                               "test also ranks the held-out answers by how much they resemble "
                               "what the candidate writes more of there (0: neither) "
                               "(default %(default)s)")
        gate.add_argument("--gate-metric", default="implicit_either",
                          choices=["implicit_either", "implicit_margin", "implicit_reward",
                                   "pref_accuracy"],
                          help="paired comparison with the current version on held-out pairs: "
                               "implicit_reward (the share of pairs where the candidate's "
                               "log-ratio margin to the current version ranks the voters' choice "
                               "higher, sign test), implicit_margin (the mean of those margins, "
                               "sign-flip test), implicit_either (either test at half the "
                               "level: the same false-pass rate) or pref_accuracy (discordant "
                               "pairs of reference-free accuracy) (default %(default)s)")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _policy_lr() -> str:
    from prefloop.align.train.common import PREFERENCE_LR, SFT_LR

    def e(x: float) -> str:
        return f"{x:.2e}".replace(".00e", "e").replace("0e", "e").replace("e-0", "e-")
    return (f"{e(PREFERENCE_LR[True])} with LoRA, {e(PREFERENCE_LR[False])} with --no-lora; sft "
            f"{e(SFT_LR[True])} / {e(SFT_LR[False])}")


# Flags a method does not read, with the values its job config needs (each method's parser has
# only its own flags; these fill the rest so the config builders read plain attributes).
_UNREAD_DEFAULTS = {"publish": "full", "loss": "sigmoid", "label_smoothing": 0.0, "pairs_from_ratings": False,
                    "desirable_weight": None, "undesirable_weight": None, "gate_metric": None,
                    "stop_kl": None, "max_lr_scale": 1.0, "pace_kl": 0.0, "min_lr_scale": 1.0,
                    "unlikelihood": 0.0, "liked_nll": 0.0, "keep_looping": False,
                    "midpoint": False, "max_steps": -1, "verbose": False}


def _fill_unread(p: argparse.ArgumentParser) -> None:
    """Give `p`'s namespace the `_UNREAD_DEFAULTS` of the flags it does not declare (parser-level
    defaults would override a declared flag's own default, so only the undeclared ones)."""
    declared = {a.dest for a in p._actions}
    p.set_defaults(**{k: v for k, v in _UNREAD_DEFAULTS.items() if k not in declared})


def _common(p: argparse.ArgumentParser, method: str) -> None:
    """The flags of one policy method (dpo, kto, sft: TRL trainers; ppo inside `align run` /
    `align schedule`: the shared ones PPO reads, its own come from `add_ppo_run_arguments`)."""
    trl = method != "ppo"
    _source(p)
    g = p.add_argument_group("training")
    g.add_argument("--beta", type=float, default=0.1,
                   help="KL penalty coefficient (initial value with --adaptive-kl)" if not trl
                   else "strength of the pull towards the reference (default %(default)s)")
    if method == "dpo":
        g.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "robust"],
                       help="DPO loss (default %(default)s)")
        g.add_argument("--label-smoothing", type=float, default=0.0,
                       help="robust loss: assumed probability that a label is flipped")
        g.add_argument("--pairs-from-ratings", action="store_true",
                       help="also train on pairs of differently rated answers to one prompt")
    if method == "kto":
        g.add_argument("--desirable-weight", type=float, default=None,
                       help="KTO loss weight of thumbs-up answers (default: with "
                            "--undesirable-weight unset too, balance the label counts: the rarer "
                            "label weighs n_more / n_rarer, the other 1)")
        g.add_argument("--undesirable-weight", type=float, default=None,
                       help="KTO loss weight of thumbs-down answers (default: see "
                            "--desirable-weight; one given, the other is 1)")
        g.add_argument("--midpoint-test", dest="midpoint",
                       action=argparse.BooleanOptionalAction, default=False,
                       help="train the older half of the rows first; the checkpoint that has "
                            "seen only them scores the newer half, and the gate's rating test "
                            "reads those answers too, three times the held-out answers, for "
                            "about a fifth more job time (default: off; it found nothing the "
                            "held-out answers missed on the fresh-split runs, docs/align.md; "
                            "one process)")
        g.add_argument("--unlikelihood", type=float, default=0.0, metavar="COEF",
                       help="add COEF x the unlikelihood of the loops of disliked answers (each "
                            "token that writes a 4-token sequence for the third time or more; "
                            "align/train/unlikelihood.py) to the KTO loss (default %(default)s: "
                            "off; at 1 it lowered looping on a tuning split but did not win more "
                            "on a fresh one, docs/align.md)")
        g.add_argument("--liked-nll", type=float, default=0.0, metavar="COEF",
                       help="add COEF x the batch mean of each answer's negative "
                            "log-likelihood per token, liked answers only (thumbs up, the "
                            "winning side of a pick; disliked ones count 0; "
                            "align/train/liked_nll.py) to the KTO loss, as RPO adds it to DPO's "
                            "(default %(default)s: off; level with the default on a tuning "
                            "split, docs/align.md)")
    if method in ("dpo", "kto"):
        g.add_argument("--stop-kl", type=float, default=None, metavar="NATS",
                       help="stop training once the KL per answer token to the reference, "
                            "measured every 4 steps on 8 training answers, reaches NATS "
                            "(default: half of --max-kl; 0: train every step"
                            + (", and KTO's reference point is TRL's per-batch estimate again"
                               if method == "kto" else "") + ")")
        g.add_argument("--max-lr-scale", type=float, default=4.0, metavar="X",
                       help="at each of those checks, when the KL is on course to end far under "
                            "--pace-kl, raise the rest of the learning-rate schedule towards it, "
                            "up to X times the set rate in all; when it heads past it, take the "
                            "raise back, down to the set rate (default %(default)s; 1: no pacing; "
                            "needs --stop-kl; docs/align.md)")
        g.add_argument("--pace-kl", type=float, default=0.1, metavar="NATS",
                       help="pacing aims the run's end at 0.8 x NATS KL per answer token (or 0.8 x "
                            "the stop KL where that is lower; 0: the stop KL): most paced runs "
                            "that ended past about 0.12 drifted off topic, docs/align.md "
                            "(default %(default)s)")
        g.add_argument("--min-lr-scale", type=float, default=1.0, metavar="X",
                       help="when the KL heads past the pace KL even at the set rate, pacing may "
                            "lower the rest of the schedule down to X times the set rate (in (0, "
                            "1]; default %(default)s: never under the set rate; e.g. 0.25 holds a "
                            "log whose votes all say the same near the pace KL instead of letting "
                            "it run to the stop)")
    if trl:
        _trainer(g, default_lr=_policy_lr(), lora=True,
                 max_length_help="longest prompt+answer in tokens (longer ones are cut at the end)")
        g.add_argument("--warmup", type=float, default=0.0, help="warmup ratio of the steps")
    else:
        g.add_argument("--max-steps", type=int, default=-1,
                       help="PPO iterations when --steps is not given")
        g.add_argument("--lr", type=float, default=None,
                       help="learning rate of policy and value head (default 1e-5)")
        g.add_argument("--batch-size", type=int, default=4, help="prompts per rollout per device")
        g.add_argument("--seed", type=int, default=0,
                       help="random seed of shuffling, initialization and sampling")
        g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 mixed precision (default: on for CUDA with bf16)")
    d = p.add_argument_group("data and evaluation")
    if trl:
        d.add_argument("--max-pairs", type=int, default=None, metavar="N",
                       help="use only the newest N pairs (kto: examples)")
        d.add_argument("--keep-looping", action="store_true",
                       help="also train on rows whose liked / chosen answer loops (a three-word "
                            "sequence three times); by default they are left out and counted")
        _voter_cap(d)
    _evaluation(d, eval_batch_size=4)
    if trl:
        d.add_argument("--max-train-eval", type=int, default=16, metavar="N",
                       help="newest N training rows scored for the train metrics (0: none; the "
                            "gate reads held-out rows only; the trainer's last logged metrics "
                            "are in the job record either way)")
    _gate(p, "win rate over the current version on held-out pairs" if trl else
          "reward-model win rate of its answers over the current version's", policy_metric=trl)
    _json(p)
    _fill_unread(p)


def add_rm_arguments(p: argparse.ArgumentParser) -> None:
    _source(p)
    g = p.add_argument_group("training (TRL RewardTrainer, Bradley-Terry loss)")
    _trainer(g, default_lr="1e-5",
             max_length_help="pairs with a longer prompt+answer (tokens) are left out")
    g.add_argument("--margin", action="store_true",
                   help="use each pair's margin: -log σ(r_c - r_r - margin) (rating pairs have "
                        "their rating difference; preferences 0)")
    g.add_argument("--center-rewards", type=float, default=None, metavar="COEF",
                   help="push the mean reward towards 0 (TRL center_rewards_coefficient, "
                        "e.g. 0.01)")
    g.add_argument("--train-layers", type=int, default=0, metavar="N",
                   help="train only the top N decoder layers + score head (0 = all; cheap on CPU)")
    d = p.add_argument_group("data and evaluation")
    d.add_argument("--max-pairs", type=int, default=None, metavar="N",
                   help="use only the newest N pairs")
    d.add_argument("--no-pairs-from-ratings", action="store_true",
                   help="train on explicit preferences only (default: also pairs of "
                        "differently rated answers to one prompt)")
    _voter_cap(d)
    _evaluation(d, eval_batch_size=8)
    d.add_argument("--min-accuracy", type=float, default=0.5,
                   help="gate: the interval of the held-out pairwise accuracy must lie above "
                        "this (default 0.5)")
    _gate_statistics(d)
    d.add_argument("--max-train-eval", type=int, default=256, metavar="N",
                   help="newest N training pairs scored for the train accuracy (0: none)")
    _json(p)


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    _data_dir(p)
    p.add_argument("--rm", required=True, metavar="VERSION", help="the reward model version")
    p.add_argument("--since", default=None, metavar="DATE",
                   help="only generations of this UTC date (YYYY-MM-DD) or later")
    p.add_argument("--rescore", action="store_true",
                   help="score again what this reward model already scored (latest row wins)")
    p.add_argument("--limit", type=int, default=None, help="score at most N generations")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass")
    p.add_argument("--max-length", type=int, default=1024,
                   help="longer conversations are scored on their last N tokens")
    p.add_argument("--device", default=None, help="scoring device (default cuda if present)")
    _json(p)
    _fill_unread(p)


def add_ppo_run_arguments(p: argparse.ArgumentParser, title: str = "PPO") -> None:
    """PPO-only flags, in groups of their own (`title`); `align ppo` and `align run ppo` define
    the shared ones (--beta, --lr, --batch-size, --seed, --bf16, --heldout-fraction, --max-kl,
    ...) themselves."""
    g = p.add_argument_group(title)
    g.add_argument("--rm", default=None, metavar="VERSION",
                   help="reward model version (required for --method ppo)")
    g.add_argument("--force-rm", action="store_true",
                   help="use a reward model whose accuracy gate failed")
    g.add_argument("--steps", type=int, default=None,
                   help="PPO iterations (rollout + update; default 64, or --max-steps)")
    g.add_argument("--mini-batch-size", type=int, default=None,
                   help="answers per gradient step (default: half of --batch-size)")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled answer")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--max-prompt-length", type=int, default=512,
                   help="longer prompts (tokens) are cut from the left")
    g.add_argument("--clip-eps", type=float, default=0.2, help="policy ratio clip (default 0.2)")
    g.add_argument("--value-clip", type=float, default=0.2,
                   help="value prediction clip around the rollout's values")
    g.add_argument("--vf-coef", type=float, default=0.1, help="value loss weight")
    g.add_argument("--gamma", type=float, default=1.0, help="GAE discount per token")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    g.add_argument("--kl-estimator", default="k1", choices=["k1", "k3"],
                   help="per-token KL in the reward (default k1 = log π - log π_ref)")
    g.add_argument("--adaptive-kl", action="store_true",
                   help="adapt beta towards --kl-target (Ziegler et al. 2019)")
    g.add_argument("--kl-target", type=float, default=6.0, help="nats per answer (adaptive)")
    g.add_argument("--kl-horizon", type=float, default=10000.0, help="answers (adaptive)")
    g.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtract this from the score of answers cut at --max-new-tokens")
    g.add_argument("--score-clip", type=float, default=None,
                   help="clip reward-model scores to [-X, X] (default: no clip)")
    g.add_argument("--train-layers", type=int, default=0, metavar="N",
                   help="train only the top N decoder layers + value head (0 = all)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    d = p.add_argument_group(f"{title}: data, evaluation and output")
    d.add_argument("--max-prompts", type=int, default=None, help="use only the newest N prompts")
    d.add_argument("--eval-samples", type=int, default=2, help="answers per held-out prompt")
    d.add_argument("--max-heldout", type=int, default=64, help="held-out prompts evaluated")
    d.add_argument("--out-dir", default=None,
                   help="metrics / plot folder (default <data-dir>/align-runs/<job id>)")
    d.add_argument("--plot", action="store_true",
                   help="write ppo_curves.png (reward and KL per step) next to the metrics")


def add_ppo_arguments(p: argparse.ArgumentParser) -> None:
    _source(p)
    p.add_argument("--beta", type=float, default=0.05,
                   help="KL penalty coefficient (initial value with --adaptive-kl)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of policy and value head")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per rollout per device")
    _seed_bf16(p)
    _evaluation(p, eval_batch_size=8)
    _gate(p, "reward-model win rate of its answers over the current version's")
    add_ppo_run_arguments(p, title="PPO")
    p.add_argument("--promote", action="store_true", help="promote it if the gate passes")
    _keep_rejected(p)
    _json(p)
    _fill_unread(p)


def _keep_rejected(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-rejected", action="store_true",
                   help="publish candidates the gate rejected, marked rejected, to inspect them "
                        "(default: only record why in the job history)")


RUN_METHODS = ("dpo", "kto", "sft", "ppo")
DEFAULT_RUN_METHOD = "kto"  # every kind of feedback trains (docs/align.md, "What trains")
_METHOD_HELP = {"dpo": "DPO on the new preference pairs (picks, edits)",
                "kto": "KTO on every kind of new feedback: thumbs and stars on single answers, "
                       "both sides of picks and edits (the default when no method is given)",
                "sft": "supervised fine-tuning on users' own and top-rated answers",
                "ppo": "PPO against a reward model (--rm VERSION)"}


def add_run_arguments(p: argparse.ArgumentParser, method: str) -> None:
    """The flags of `align run METHOD` (also accepted by `align schedule METHOD`, which passes
    them on)."""
    p.set_defaults(method=method)
    _common(p, method)
    if method == "ppo":
        add_ppo_run_arguments(p)
    p.add_argument("--min-new-pairs", type=int, default=8, metavar="N",
                   help="skip the job unless N rows are newer than any job has seen "
                        "(default %(default)s)")
    p.add_argument("--auto-promote", action="store_true",
                   help="promote the candidate when the gate passes")
    p.add_argument("--promote-via", choices=("gate", "ab", "auto"), default="auto",
                   help="with --auto-promote: auto promotes a clear offline win at once and "
                        "starts an A/B test at 10%% traffic for a candidate the offline evidence "
                        "leaves undecided but safe (enough held-out pairs, KL in bound, not "
                        "significantly worse; the test is the season's next decision, at its "
                        "level, and ends undecided after --ab-span); gate promotes only on an "
                        "offline pass; ab starts an A/B test on an offline pass (docs/ab.md) "
                        "(default %(default)s)")
    _keep_rejected(p)


def _method_parsers(p: argparse.ArgumentParser, command: str, extra=None) -> None:
    """`align run|schedule dpo|kto|sft|ppo`: one parser per method, with only its flags;
    `extra(parser)` adds the command's own (schedule: --every, ...)."""
    sub = p.add_subparsers(dest="run_method", metavar="{" + ",".join(RUN_METHODS) + "}",
                           required=True)
    for method in RUN_METHODS:
        mp = sub.add_parser(method, help=_METHOD_HELP[method],
                            description=f"`align {command} {method}`: {_METHOD_HELP[method]}.")
        add_run_arguments(mp, method)
        if extra is not None:
            extra(mp)


def _schedule_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--every", required=True, metavar="DURATION",
                   help="interval, e.g. 30m, 6h, 1d")
    p.add_argument("--max-runs", type=int, default=None,
                   help="stop after N jobs (default: run until SIGTERM/SIGINT)")
    p.add_argument("--no-initial-run", action="store_true",
                   help="wait one interval before the first job")


def canonical_argv(argv: list[str]) -> list[str]:
    """The old spelling `align run|schedule [flags] --method M [flags]` as the sub-command form
    `align run|schedule M [flags]`; no method at all: DEFAULT_RUN_METHOD (kto, which trains on
    every kind of feedback). `align run --help` without a method keeps listing the methods.
    Other command lines are returned as they are."""
    try:
        at = argv.index("align")
    except ValueError:
        return argv
    if at + 1 >= len(argv) or argv[at + 1] not in ("run", "schedule"):
        return argv
    head, rest = argv[:at + 2], argv[at + 2:]
    if rest and rest[0] in RUN_METHODS:
        return argv
    method, words, i = None, [], 0
    while i < len(rest):
        if rest[i] == "--method" and i + 1 < len(rest):
            method, i = rest[i + 1], i + 2
            continue
        if rest[i].startswith("--method="):
            method = rest[i].split("=", 1)[1]
        else:
            words.append(rest[i])
        i += 1
    if method is None and any(w in ("-h", "--help") for w in words):
        return argv
    return head + [method or DEFAULT_RUN_METHOD] + words


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="align_command",
                                metavar="{dpo,kto,sft,rm,score,ppo,run,schedule,jobs}",
                                required=True)
    dpo = sub.add_parser("dpo", help="train a candidate with DPO on preference pairs",
                         description="Train a candidate with TRL's DPOTrainer on the preference "
                                     "pairs of the log, evaluate it on the newest pairs, gate "
                                     "it and publish it as a new registry version.")
    kto = sub.add_parser("kto", help="train a candidate with KTO on thumbs up/down",
                         description="Like `align dpo`, from labelled answers (ratings; each "
                                     "preference gives one good and one bad answer).")
    sft = sub.add_parser("sft", help="supervised fine-tuning on users' own and top-rated answers",
                         description="Train a candidate with TRL's SFTTrainer on what users "
                                     "wrote themselves (text-form preferences), the chosen "
                                     "answers of preferences and top-rated answers (thumbs up, "
                                     "4-5 stars); gate it on the held-out window's preference "
                                     "pairs and publish it. It can be the --base of a later dpo "
                                     "/ rm / ppo job.")
    for p, method in ((dpo, "dpo"), (kto, "kto"), (sft, "sft")):
        _common(p, method)
        p.add_argument("--promote", action="store_true", help="promote it if the gate passes")
        _keep_rejected(p)
    add_rm_arguments(sub.add_parser(
        "rm", help="train a reward model on the preference log (TRL)",
        description="Train a reward model (TRL RewardTrainer, Bradley-Terry) on the preference "
                    "pairs of the log, measure its held-out pairwise accuracy and publish it as a "
                    "registry version of kind 'reward'."))
    add_score_arguments(sub.add_parser(
        "score", help="score logged generations with a reward model",
        description="Append reward-model scores of logged generations to "
                    "<data-dir>/scores/rm=VERSION/*.parquet (docs/ppo.md)."))
    add_ppo_arguments(sub.add_parser(
        "ppo", help="PPO against a reward model, with a per-token KL penalty",
        description="PPO on the prompts of the log against --rm, with a per-token KL penalty to "
                    "the base; gate, publish, promote."))
    run = sub.add_parser(
        "run", help="one incremental job: new data -> train -> gate -> publish -> promote",
        description="Train on the feedback newer than the watermark (the newest row the current "
                    "version was trained on), under the job lock; gate, publish, and with "
                    "--auto-promote promote. With no METHOD: kto, which trains on every kind of "
                    "feedback (thumbs, stars, picks, edits). `align run METHOD --help` shows a "
                    "method's flags (the older `align run --method METHOD` spelling works too).")
    _method_parsers(run, "run")
    sched = sub.add_parser("schedule", help="run `align run` every --every",
                           description="Run `prefloop align run METHOD` as a subprocess on a "
                                       "timer (docs/align.md has cron and systemd timer versions).")
    _method_parsers(sched, "schedule", _schedule_arguments)
    jobs = sub.add_parser("jobs", help="the job history of the registry",
                          description="The job history of the registry: one line per job (status, "
                                      "version, train / held-out rows, the gate's win rate with its "
                                      "interval and count, KL per token, and the first failed check "
                                      "or else the first reason).")
    _data_dir(jobs)
    jobs.add_argument("--json", action="store_true", help="print the jobs as one JSON list")
    jobs.add_argument("--last", type=int, default=20, help="show the last N jobs (default 20)")


# ---------------------------------------------------------------------------------------------
# args -> job configs


def _incremental(args: argparse.Namespace) -> bool:
    return args.align_command in ("run", "schedule")


def _gate_config(args: argparse.Namespace):
    from prefloop.align.gate import DEFAULT_MAX_KL, GateConfig
    return GateConfig(max_kl=args.max_kl if args.max_kl is not None else DEFAULT_MAX_KL,
                      min_improvement=args.min_improvement,
                      confidence=args.gate_confidence, min_heldout=args.min_heldout_pairs,
                      metric=args.gate_metric or "implicit_reward",
                      spending=args.season_spending, look_growth=args.look_growth,
                      ab_span=args.ab_span, ab_traffic=args.ab_traffic,
                      ab_futility_win=args.ab_futility_win,
                      max_root_kl=args.max_root_kl,
                      degeneration_prompts=getattr(args, "degeneration_prompts", 0))


def _promote_and_keep(args: argparse.Namespace) -> dict:
    """`--auto-promote` / `--keep-rejected` for run and schedule; `--promote` / `--keep-rejected`
    for a one-off job."""
    if _incremental(args):
        return {"promote": args.auto_promote, "promote_via": args.promote_via,
                "keep_rejected": args.keep_rejected}
    return {"promote": args.promote, "keep_rejected": args.keep_rejected}


def _stop_kl(args: argparse.Namespace, method: str, max_kl: float) -> float:
    """--stop-kl, or half of the gate's KL bound `max_kl` (align/train/kl_stop.py); 0 for sft."""
    if method not in ("dpo", "kto"):
        return 0.0
    return args.stop_kl if args.stop_kl is not None else max_kl / 2


def job_config(args: argparse.Namespace):
    """A preference JobConfig from `align dpo|kto` args, or `align run/schedule` (dpo/kto)."""
    from prefloop.align.jobs.preference import JobConfig
    from prefloop.align.train.preference import TrainConfig

    method = args.align_command if args.align_command in ("dpo", "kto", "sft") else args.method
    gate = _gate_config(args)
    train = TrainConfig(
        method=method, beta=args.beta, loss=args.loss, label_smoothing=args.label_smoothing,
        epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, warmup_ratio=args.warmup,
        lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
        stop_kl=_stop_kl(args, method, gate.max_kl), max_lr_scale=args.max_lr_scale,
        pace_kl=args.pace_kl, min_lr_scale=args.min_lr_scale,
        unlikelihood=args.unlikelihood, liked_nll=args.liked_nll)
    incremental = _incremental(args)
    return JobConfig(
        data_dir=Path(args.data_dir), train=train, gate=gate,
        command=args.align_command, base=args.base, model=args.model, cache_dir=args.cache_dir,
        since=args.since, incremental=incremental,
        min_new=args.min_new_pairs if incremental else 0, max_rows=args.max_pairs,
        pairs_from_ratings=args.pairs_from_ratings, voter_cap=_voter_cap_of(args),
        heldout_fraction=args.heldout_fraction, eval_batch_size=args.eval_batch_size,
        max_train_eval=args.max_train_eval, publish=args.publish,
        drop_looping=not args.keep_looping, midpoint=args.midpoint,
        device=args.device, **_promote_and_keep(args))


def rm_job_config(args: argparse.Namespace):
    from prefloop.align.jobs.reward import RMJobConfig
    from prefloop.align.train.reward import RewardTrainConfig
    train = RewardTrainConfig(
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, margin=args.margin,
        center_rewards=args.center_rewards, train_layers=args.train_layers, lora=args.lora,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing)
    return RMJobConfig(data_dir=Path(args.data_dir), train=train, base=args.base,
                       model=args.model, cache_dir=args.cache_dir, since=args.since,
                       max_pairs=args.max_pairs, pairs_from_ratings=not args.no_pairs_from_ratings,
                       voter_cap=_voter_cap_of(args), heldout_fraction=args.heldout_fraction,
                       min_accuracy=args.min_accuracy,
                       confidence=args.gate_confidence, min_heldout=args.min_heldout_pairs,
                       eval_batch_size=args.eval_batch_size,
                       max_train_eval=args.max_train_eval, device=args.device)


def ppo_job_config(args: argparse.Namespace):
    """A PPOJobConfig from `align ppo` args, or from `align run/schedule --method ppo` args."""
    from prefloop.align.jobs.ppo import PPOJobConfig
    from prefloop.align.train.ppo import PPOConfig
    from prefloop.server.errors import InvalidArgument
    if not args.rm:
        raise InvalidArgument("PPO needs --rm VERSION (a reward model from `prefloop align rm`)")
    steps = args.steps if args.steps is not None else (
        args.max_steps if args.max_steps > 0 else 64)
    batch = args.batch_size
    ppo = PPOConfig(
        steps=steps, batch_size=batch,
        mini_batch_size=args.mini_batch_size or max(1, batch // 2), ppo_epochs=args.ppo_epochs,
        lr=args.lr if args.lr is not None else 1e-5, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, max_prompt_length=args.max_prompt_length,
        clip_eps=args.clip_eps, value_clip=args.value_clip, vf_coef=args.vf_coef,
        gamma=args.gamma, lam=args.lam, beta=args.beta, kl_estimator=args.kl_estimator,
        adaptive_kl=args.adaptive_kl, kl_target=args.kl_target, kl_horizon=args.kl_horizon,
        missing_eos_penalty=args.missing_eos_penalty, score_clip=args.score_clip,
        train_layers=args.train_layers, max_grad_norm=args.max_grad_norm, seed=args.seed,
        bf16=args.bf16)
    incremental = _incremental(args)
    return PPOJobConfig(
        data_dir=Path(args.data_dir), rm=args.rm, ppo=ppo, gate=_gate_config(args),
        command=args.align_command, base=args.base,
        model=args.model, cache_dir=args.cache_dir, since=args.since, incremental=incremental,
        min_new=args.min_new_pairs if incremental else 0,
        max_prompts=args.max_prompts, heldout_fraction=args.heldout_fraction,
        max_heldout=args.max_heldout, eval_samples=args.eval_samples,
        eval_batch_size=args.eval_batch_size, force_rm=args.force_rm,
        out_dir=Path(args.out_dir) if args.out_dir else None, plot=args.plot,
        device=args.device, **_promote_and_keep(args))


# ---------------------------------------------------------------------------------------------
# Running


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C left: the job history's word on it (`interrupted (Ctrl-C): ...`)."""
    from prefloop.server.jobs import job_history
    from prefloop.server.registry import Registry
    try:
        last = job_history(Registry(args.data_dir))[-1]
    except Exception:  # noqa: BLE001 - the message must not fail
        return "interrupted: nothing was published"
    reason = last.reason or ""
    if reason.startswith("interrupted") and last.pid == os.getpid():
        return "interrupted: " + reason.split(": ", 1)[-1].split("; ")[0]
    return "interrupted: nothing was published"


def _guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`fn(args)` with SIGTERM unwinding it (stage removed, failure recorded) and the exit-code
    ladder: 3 another job holds the lock, 2 bad arguments or data, 1 the job failed."""
    from prefloop.server.errors import PrefloopError, Unavailable
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn(args)
    except KeyboardInterrupt:  # Ctrl-C: the job history records it (runner.run_locked)
        print(f"prefloop align: {_interrupted(args)}", file=sys.stderr)
        return 130
    except Unavailable as exc:
        print(f"prefloop align: {exc}", file=sys.stderr)
        return 3
    except (PrefloopError, FileNotFoundError) as exc:
        print(f"prefloop align: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # recorded as a failed job in registry/jobs.jsonl
        log.exception("align job failed")
        print(f"prefloop align: job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _job(args: argparse.Namespace) -> int:
    """Run the training job the args name (dpo, kto, rm, ppo, or run's --method) and print its
    result; trainer logs go to stderr (stdout is the result only)."""
    method = args.method if _incremental(args) else args.align_command
    if method == "rm":
        from prefloop.align.jobs.reward import run_rm_job as run_job
        cfg = rm_job_config(args)
    elif method == "ppo":
        from prefloop.align.jobs.ppo import run_ppo_job as run_job
        cfg = ppo_job_config(args)
    else:
        from prefloop.align.jobs.preference import run_job
        cfg = job_config(args)
    with contextlib.redirect_stdout(sys.stderr):
        result = run_job(cfg)
    if result.status == "worker":
        return 0
    from prefloop.cli.align_output import format_result
    print(json.dumps(result.to_record(), indent=2) if args.json else format_result(result),
          flush=True)
    return 0


def _score(args: argparse.Namespace) -> int:
    from prefloop.align.jobs.reward import score_log
    with contextlib.redirect_stdout(sys.stderr):
        out = score_log(args.data_dir, args.rm, since=args.since, rescore=args.rescore,
                        limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                        device=args.device)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"scored {out['scored']} new generations with {out['rm_version']}"
          + (f" -> {out['part']}" if out["part"] else "") + f"; {out['total']} scored in all")
    for row in out["by_model_version"]:
        print(f"  {row['model_version'] or '-':12} {row['count']:>8}  mean score "
              f"{row['mean_score']:.4f}")
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from prefloop.server.jobs import job_history
    from prefloop.server.registry import Registry
    jobs = job_history(Registry(args.data_dir))[-args.last:] if args.last else []
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no align jobs yet")
        return 0
    from prefloop.cli.models import gate_numbers, verdict_of
    print(f"{'job':32} {'status':10} {'method':6} {'base':6} {'version':8} {'train/held':>10} "
          f"{'gate win rate [interval] n':>28} {'KL/tok':>8}  reason")
    for j in jobs:
        rows = j.data.get("rows") or {}
        rows_text = f"{rows.get('train', '-')}/{rows.get('heldout', '-')}" if rows else "-"
        kl = VersionSummary.of(j.metrics, j.gate).kl_per_token
        verdict = verdict_of(j.gate)  # the gate's failed checks, first one shown
        failed = verdict.failed if verdict else []
        reason = (failed[0] if failed else j.reason.split("; ")[0])[:80]
        print(f"{j.job_id:32} {j.status:10} {j.method or '-':6} {j.base or '-':6} "
              f"{j.version or '-':8} {rows_text:>10} {gate_numbers(j.gate):>28} "
              f"{'-' if kl is None else f'{kl:.4f}':>8}  {reason}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.align_command == "jobs":
        return _jobs(args)
    if args.align_command == "schedule":
        from prefloop.align.jobs.schedule import run_schedule
        return run_schedule(args, lambda p: add_run_arguments(p, args.method))
    if not Path(args.data_dir).is_dir():
        print(f"prefloop align: no data directory at {args.data_dir}", file=sys.stderr)
        return 2
    from prefloop.align.train.common import set_verbose
    set_verbose(args.verbose)
    return _guarded(_score if args.align_command == "score" else _job, args)
