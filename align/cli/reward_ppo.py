"""`prefloop align rm | score | ppo`: the RLHF path's subcommands (the flags -> align/jobs/reward_ppo.py).

    prefloop align rm    --data-dir DIR [--base VERSION] [--margin] [--train-layers N] ...
    prefloop align score --data-dir DIR --rm VERSION [--since DATE] [--rescore]
    prefloop align ppo   --data-dir DIR --rm VERSION [--steps N] [--beta 0.05] [--adaptive-kl]
                         [--plot] [--promote] ...
    prefloop align run   --method ppo --rm VERSION [...]       (through align_cmd.py's `run`)

`register(sub)` adds the three subparsers to `prefloop align`'s subparser set and `run(args)`
runs them; `add_ppo_run_arguments(parser)` adds the PPO-only flags to `align run` / `align
schedule`, and `run_ppo_job_from_args(args)` is what `align run --method ppo` calls. Exit codes
as in align_cmd: 0 done (also skipped / rejected), 1 the job failed, 2 bad arguments or data,
3 another job holds the lock.
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
from typing import Any

DATA_DIR_ENV = "PREFLOOP_DATA_DIR"
SUBCOMMANDS = ("rm", "score", "ppo")
log = logging.getLogger("prefloop.align")


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                   help=f"the server's data directory (default ${DATA_DIR_ENV} or ./data)")


def _base_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default=None, metavar="DATE",
                   help="only log rows created on/after this date (YYYY-MM-DD) or ISO time")
    p.add_argument("--base", default=None, metavar="VERSION",
                   help="policy version to start from (default: the current version)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="HF folder or .gguf that becomes v0000 if the registry is empty")
    p.add_argument("--cache-dir", default=None, help="model cache (default $PREFLOOP_CACHE_DIR)")


def add_rm_arguments(p: argparse.ArgumentParser) -> None:
    _data_dir(p)
    _base_flags(p)
    g = p.add_argument_group("training (TRL RewardTrainer, Bradley-Terry loss)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-5, or 1e-4 with --lora)")
    g.add_argument("--batch-size", type=int, default=4, help="pairs per step per device")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-length", type=int, default=1024,
                   help="pairs with a longer prompt+answer (tokens) are left out")
    g.add_argument("--margin", action="store_true",
                   help="use each pair's margin: -log σ(r_c - r_r - margin) (rating pairs have "
                        "their rating difference; preferences 0)")
    g.add_argument("--center-rewards", type=float, default=None, metavar="COEF",
                   help="push the mean reward towards 0 (TRL center_rewards_coefficient, "
                        "e.g. 0.01)")
    g.add_argument("--train-layers", type=int, default=0, metavar="N",
                   help="train only the top N decoder layers + score head (0 = all; cheap on CPU)")
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter (merged afterwards)")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--gradient-checkpointing", action="store_true")
    d = p.add_argument_group("data and evaluation")
    d.add_argument("--max-pairs", type=int, default=None, metavar="N",
                   help="use only the newest N pairs")
    d.add_argument("--no-pairs-from-ratings", action="store_true",
                   help="train on explicit preferences only (default: also pairs of "
                        "differently rated answers to one prompt)")
    d.add_argument("--heldout-fraction", type=float, default=0.2)
    d.add_argument("--min-accuracy", type=float, default=0.5,
                   help="gate: held-out pairwise accuracy must be above this (default 0.5)")
    d.add_argument("--eval-batch-size", type=int, default=8)
    d.add_argument("--max-train-eval", type=int, default=256, metavar="N",
                   help="newest N training pairs scored for the train accuracy (0: none)")
    d.add_argument("--device", default=None, help="evaluation device (default cuda if present)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    _data_dir(p)
    p.add_argument("--rm", required=True, metavar="VERSION", help="the reward model version")
    p.add_argument("--since", default=None, metavar="DATE",
                   help="only generations of this UTC date (YYYY-MM-DD) or later")
    p.add_argument("--rescore", action="store_true",
                   help="score again what this reward model already scored (latest row wins)")
    p.add_argument("--limit", type=int, default=None, help="score at most N generations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024,
                   help="longer conversations are scored on their last N tokens")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")


def add_ppo_run_arguments(p: argparse.ArgumentParser) -> None:
    """PPO-only flags; `align run` / `align schedule` already define the shared ones (--beta,
    --lr, --batch-size, --seed, --bf16, --max-steps, --heldout-fraction, --max-kl, ...)."""
    p.add_argument("--rm", default=None, metavar="VERSION",
                   help="reward model version (required for --method ppo)")
    p.add_argument("--force-rm", action="store_true",
                   help="use a reward model whose accuracy gate failed")
    g = p.add_argument_group("PPO")
    g.add_argument("--steps", type=int, default=None,
                   help="PPO iterations (rollout + update; default 64, or --max-steps)")
    g.add_argument("--mini-batch-size", type=int, default=None,
                   help="answers per gradient step (default: half of --batch-size)")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled answer")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--max-prompt-length", type=int, default=512)
    g.add_argument("--clip-eps", type=float, default=0.2, help="policy ratio clip (default 0.2)")
    g.add_argument("--value-clip", type=float, default=0.2)
    g.add_argument("--vf-coef", type=float, default=0.1, help="value loss weight")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    g.add_argument("--kl-estimator", default="k1", choices=["k1", "k3"],
                   help="per-token KL in the reward (default k1 = log π - log π_ref)")
    g.add_argument("--adaptive-kl", action="store_true",
                   help="adapt beta towards --kl-target (Ziegler et al. 2019)")
    g.add_argument("--kl-target", type=float, default=6.0, help="nats per answer (adaptive)")
    g.add_argument("--kl-horizon", type=float, default=10000.0, help="answers (adaptive)")
    g.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtract this from the score of answers cut at --max-new-tokens")
    g.add_argument("--score-clip", type=float, default=None)
    g.add_argument("--train-layers", type=int, default=0, metavar="N",
                   help="train only the top N decoder layers + value head (0 = all)")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    d = p.add_argument_group("PPO data, evaluation and output")
    d.add_argument("--max-prompts", type=int, default=None, help="use only the newest N prompts")
    d.add_argument("--eval-samples", type=int, default=2, help="answers per held-out prompt")
    d.add_argument("--max-heldout", type=int, default=64, help="held-out prompts evaluated")
    d.add_argument("--out-dir", default=None,
                   help="metrics / plot folder (default <data-dir>/align-runs/<job id>)")
    d.add_argument("--plot", action="store_true",
                   help="write ppo_curves.png (reward and KL per step) next to the metrics")


def add_ppo_arguments(p: argparse.ArgumentParser) -> None:
    _data_dir(p)
    _base_flags(p)
    p.add_argument("--beta", type=float, default=0.05,
                   help="KL penalty coefficient (initial value with --adaptive-kl)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per rollout per device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="evaluation device (default cuda if present)")
    gate = p.add_argument_group("eval gate")
    gate.add_argument("--max-kl", type=float, default=None,
                      help="largest KL(candidate ‖ base) per held-out answer token (default 0.5)")
    gate.add_argument("--min-improvement", type=float, default=0.0,
                      help="held-out mean reward must beat the current version's by more than "
                           "this (reward units, default 0)")
    add_ppo_run_arguments(p)
    p.add_argument("--promote", action="store_true", help="promote it if the gate passes")
    p.add_argument("--json", action="store_true")


def register(sub) -> None:
    """Add `rm`, `score` and `ppo` to `prefloop align`'s subparsers."""
    rm = sub.add_parser("rm", help="train a reward model on the preference log (TRL)",
                        description="Train a reward model (TRL RewardTrainer, Bradley-Terry) on "
                                    "the preference pairs of the log, measure its held-out "
                                    "pairwise accuracy and publish it as a registry version of "
                                    "kind 'reward'.")
    add_rm_arguments(rm)
    score = sub.add_parser("score", help="score logged generations with a reward model",
                           description="Append reward-model scores of logged generations to "
                                       "<data-dir>/scores/rm=VERSION/*.parquet (docs/ppo.md).")
    add_score_arguments(score)
    ppo = sub.add_parser("ppo", help="PPO against a reward model, with a per-token KL penalty",
                         description="PPO on the prompts of the log against --rm, with a "
                                     "per-token KL penalty to the base; gate, publish, promote.")
    add_ppo_arguments(ppo)


# ---------------------------------------------------------------------------------------------
# args -> configs


def rm_job_config(args: argparse.Namespace):
    from prefloop.align.jobs.reward_ppo import RMJobConfig
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
                       heldout_fraction=args.heldout_fraction, min_accuracy=args.min_accuracy,
                       eval_batch_size=args.eval_batch_size,
                       max_train_eval=args.max_train_eval, device=args.device)


def ppo_job_config(args: argparse.Namespace):
    """A PPOJobConfig from `align ppo` args, or from `align run/schedule --method ppo` args."""
    from prefloop.align.gate import DEFAULT_MAX_KL, GateConfig
    from prefloop.align.jobs.reward_ppo import PPOJobConfig
    from prefloop.align.train.ppo import PPOConfig
    from prefloop.server.errors import InvalidArgument
    if not getattr(args, "rm", None):
        raise InvalidArgument("PPO needs --rm VERSION (a reward model from `prefloop align rm`)")
    command = getattr(args, "align_command", "ppo") or "ppo"
    steps = args.steps if args.steps is not None else (
        args.max_steps if getattr(args, "max_steps", -1) and args.max_steps > 0 else 64)
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
    gate = GateConfig(max_kl=args.max_kl if args.max_kl is not None else DEFAULT_MAX_KL,
                      min_improvement=args.min_improvement)
    incremental = command in ("run", "schedule")
    return PPOJobConfig(
        data_dir=Path(args.data_dir), rm=args.rm, ppo=ppo, gate=gate, command=command,
        base=args.base, model=args.model, cache_dir=args.cache_dir, since=args.since,
        incremental=incremental,
        min_new=getattr(args, "min_new_pairs", 0) if incremental else 0,
        max_prompts=args.max_prompts, heldout_fraction=args.heldout_fraction,
        max_heldout=args.max_heldout, eval_samples=args.eval_samples,
        eval_batch_size=args.eval_batch_size,
        promote=getattr(args, "auto_promote", False) if incremental else args.promote,
        keep_rejected=getattr(args, "keep_rejected", False) if incremental else True,
        force_rm=args.force_rm, out_dir=Path(args.out_dir) if args.out_dir else None,
        plot=args.plot, device=args.device)


# ---------------------------------------------------------------------------------------------
# Output


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_rlhf_result(result) -> str:
    r = result if isinstance(result, dict) else result.to_record()
    lines = [f"job {r['job_id']}: {r['status']}" + (f" -> {r['version']}" if r.get("version")
                                                     else "") + f" (base {r.get('base')})"]
    data, metrics = r.get("data") or {}, r.get("metrics") or {}
    if data.get("rows"):
        lines.append(f"data: {data.get('since')} .. {data.get('until')}  train "
                     f"{data['rows']['train']}  held-out {data['rows']['heldout']}")
    tr = metrics.get("training") or {}
    if tr:
        lines.append(f"training: {tr.get('steps')} steps in {tr.get('runtime_s')} s")
    if r.get("method") == "rm":
        train, held = metrics.get("train") or {}, metrics.get("heldout") or {}
        lines.append(f"{'':18}{'train':>10}{'held-out':>10}")
        for key, digits in (("pairs", 0), ("accuracy", 3), ("margin", 3), ("loss", 4)):
            lines.append(f"{key:18}{_f(train.get(key), digits):>10}{_f(held.get(key), digits):>10}")
    elif r.get("method") == "ppo":
        first, last = tr.get("first") or {}, tr.get("last") or {}
        if first:
            lines.append(f"rollout reward {_f(first.get('reward'))} -> {_f(last.get('reward'))}, "
                         f"KL/answer {_f(first.get('kl'))} -> {_f(last.get('kl'))}")
        held, cur = metrics.get("heldout") or {}, metrics.get("current") or {}
        if held:
            lines.append(f"held-out ({held.get('samples')} answers): reward "
                         f"{_f(held.get('reward'), 4)} vs {cur.get('version')} "
                         f"{_f(cur.get('reward'), 4)}; KL/token {_f(held.get('kl_per_token'), 4)}")
        if tr.get("metrics_file"):
            lines.append(f"metrics: {tr['metrics_file']}" +
                         (f"  plot: {tr['plot']}" if tr.get("plot") else ""))
    gate = r.get("gate")
    if gate:
        lines.append(f"gate: {'PASSED' if gate['passed'] else 'REJECTED'}")
        lines += [f"  - {reason}" for reason in gate.get("reasons", [])]
    elif r.get("reason"):
        lines.append(f"reason: {r['reason']}")
    return "\n".join(lines)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _guarded(fn, args: argparse.Namespace) -> int:
    from prefloop.server.errors import PrefloopError, Unavailable
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # unwind: stage removed, failure recorded
    try:
        return fn(args)
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


def _print_result(result, as_json: bool) -> int:
    if result.status == "worker":
        return 0
    print(json.dumps(result.to_record(), indent=2) if as_json else format_rlhf_result(result),
          flush=True)
    return 0


def _rm(args: argparse.Namespace) -> int:
    from prefloop.align.jobs.reward_ppo import run_rm_job
    cfg = rm_job_config(args)
    with contextlib.redirect_stdout(sys.stderr):  # trainer logs: stdout is the result only
        result = run_rm_job(cfg)
    return _print_result(result, args.json)


def _ppo(args: argparse.Namespace) -> int:
    from prefloop.align.jobs.reward_ppo import run_ppo_job
    cfg = ppo_job_config(args)
    with contextlib.redirect_stdout(sys.stderr):
        result = run_ppo_job(cfg)
    return _print_result(result, args.json)


def _score(args: argparse.Namespace) -> int:
    from prefloop.align.jobs.reward_ppo import score_log
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


def run_ppo_job_from_args(args: argparse.Namespace) -> int:
    """`align run --method ppo` (and the scheduled form)."""
    return _guarded(_ppo, args)


def run(args: argparse.Namespace) -> int:
    if not Path(args.data_dir).is_dir():
        print(f"prefloop align: no data directory at {args.data_dir}", file=sys.stderr)
        return 2
    fn = {"rm": _rm, "score": _score, "ppo": _ppo}[args.align_command]
    return _guarded(fn, args)


def main(argv: list[str] | None = None) -> int:
    """`python -m prefloop.align.cli.reward_ppo rm|score|ppo ...` (same as `prefloop align ...`)."""
    parser = argparse.ArgumentParser(prog="prefloop align")
    sub = parser.add_subparsers(dest="align_command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
