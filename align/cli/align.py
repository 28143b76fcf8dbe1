"""`prefloop align`: retrain on the feedback log and publish candidates to the registry.

    prefloop align dpo  --data-dir DIR [--since DATE] [--base VERSION] [--beta 0.1]
                        [--loss sigmoid|ipo|hinge|robust] [--epochs N] [--lr LR] [--lora]
                        [--max-pairs N] [--promote]
    prefloop align kto  --data-dir DIR [...]                   thumbs up/down (KTOTrainer)
    prefloop align run  --data-dir DIR [--method dpo|kto] [--min-new-pairs N] [--auto-promote]
    prefloop align schedule --every 6h [run options]           `align run` on a timer
    prefloop align jobs --data-dir DIR [--json]                the job history

A CLI subcommand module (`add_arguments(parser)`, `run(args) -> int`, registered in
server/cli/main.py). The work is in align/jobs/preference.py; this file maps flags to `JobConfig` and prints the
metrics summary. Exit codes: 0 done (including "skipped" and "rejected"), 1 the job failed,
2 bad arguments or data directory, 3 another job holds the lock.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "PREFLOOP_DATA_DIR"
log = logging.getLogger("prefloop.align")


def _common(p: argparse.ArgumentParser, method: str | None) -> None:
    """Flags shared by dpo, kto, run and schedule (`method` None: run/schedule choose)."""
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                   help=f"the server's data directory (default ${DATA_DIR_ENV} or ./data)")
    p.add_argument("--since", default=None, metavar="DATE",
                   help="only feedback created on/after this date (YYYY-MM-DD) or ISO time")
    p.add_argument("--base", default=None, metavar="VERSION",
                   help="registry version to start from and regularize towards (default: the "
                        "current version)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="HF folder or .gguf that becomes v0000 if the registry is empty "
                        "(default: the embedded default model)")
    p.add_argument("--cache-dir", default=None, help="model cache (default $PREFLOOP_CACHE_DIR)")
    g = p.add_argument_group("training")
    g.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull towards the reference (default %(default)s)")
    if method in (None, "dpo"):
        g.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "robust"],
                       help="DPO loss (default %(default)s)")
        g.add_argument("--label-smoothing", type=float, default=0.0,
                       help="robust loss: assumed probability that a label is flipped")
        g.add_argument("--pairs-from-ratings", action="store_true",
                       help="also train on pairs of differently rated answers to one prompt")
    if method in (None, "kto"):
        g.add_argument("--desirable-weight", type=float, default=1.0)
        g.add_argument("--undesirable-weight", type=float, default=1.0)
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 5e-6, or 1e-4 with --lora)")
    g.add_argument("--batch-size", type=int, default=4, help="pairs per step per device")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--max-length", type=int, default=1024,
                   help="longest prompt+answer in tokens (longer ones are cut at the end)")
    g.add_argument("--warmup", type=float, default=0.0, help="warmup ratio of the steps")
    g.add_argument("--lora", action="store_true",
                   help="train a LoRA adapter (peft), merged into full weights before publishing")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 mixed precision (default: on for CUDA devices with bf16)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="trade compute for memory (worth it on GPUs with long sequences)")
    d = p.add_argument_group("data and evaluation")
    d.add_argument("--max-pairs", type=int, default=None, metavar="N",
                   help="use only the newest N pairs (kto: examples)")
    d.add_argument("--heldout-fraction", type=float, default=0.2,
                   help="newest fraction of the rows held out for evaluation (default 0.2)")
    d.add_argument("--eval-batch-size", type=int, default=4)
    d.add_argument("--device", default=None, help="evaluation device (default cuda if present)")
    gate = p.add_argument_group("eval gate")
    gate.add_argument("--max-kl", type=float, default=None,
                      help="largest KL(candidate ‖ reference) per held-out answer token, nats "
                           "(default 0.5)")
    gate.add_argument("--min-improvement", type=float, default=0.0,
                      help="held-out preference accuracy must beat the current version's by "
                           "more than this (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefloop.align.cli import reward_ppo as rlhf_cmd
    sub = parser.add_subparsers(dest="align_command",
                                metavar="{dpo,kto,rm,score,ppo,run,schedule,jobs}", required=True)
    dpo = sub.add_parser("dpo", help="train a candidate with DPO on preference pairs",
                         description="Train a candidate with TRL's DPOTrainer on the preference "
                                     "pairs of the log, evaluate it on the newest pairs, gate "
                                     "it and publish it as a new registry version.")
    _common(dpo, "dpo")
    dpo.add_argument("--promote", action="store_true", help="promote it if the gate passes")
    kto = sub.add_parser("kto", help="train a candidate with KTO on thumbs up/down",
                         description="Like `align dpo`, from labelled answers (ratings; each "
                                     "preference gives one good and one bad answer).")
    _common(kto, "kto")
    kto.add_argument("--promote", action="store_true", help="promote it if the gate passes")
    run_p = sub.add_parser(
        "run", help="one incremental job: new data -> train -> gate -> publish -> promote",
        description="Train on the feedback newer than the watermark (the newest row the current "
                    "version was trained on), under the registry's job lock; gate, publish, and "
                    "with --auto-promote promote.")
    add_run_arguments(run_p)
    sched = sub.add_parser("schedule", help="run `align run` every --every",
                           description="Run `prefloop align run` as a subprocess on a timer "
                                       "(docs/align.md has cron and systemd timer versions).")
    add_run_arguments(sched)
    sched.add_argument("--every", required=True, metavar="DURATION",
                       help="interval, e.g. 30m, 6h, 1d")
    sched.add_argument("--max-runs", type=int, default=None,
                       help="stop after N jobs (default: run until SIGTERM/SIGINT)")
    sched.add_argument("--no-initial-run", action="store_true",
                       help="wait one interval before the first job")
    rlhf_cmd.register(sub)  # rm, score, ppo (align/cli/reward_ppo.py)
    jobs = sub.add_parser("jobs", help="the job history of the registry")
    jobs.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"))
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument("--last", type=int, default=20, help="show the last N jobs (default 20)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `align run` (also accepted by `align schedule`, which passes them on)."""
    _common(p, None)
    from prefloop.align.cli import reward_ppo as rlhf_cmd
    p.add_argument("--method", default="dpo", choices=["dpo", "kto", "ppo"],
                   help="dpo | kto | ppo (ppo needs --rm VERSION)")
    rlhf_cmd.add_ppo_run_arguments(p)
    p.add_argument("--min-new-pairs", type=int, default=8, metavar="N",
                   help="skip the job unless N rows are newer than any job has seen "
                        "(default %(default)s)")
    p.add_argument("--auto-promote", action="store_true",
                   help="promote the candidate when the gate passes")
    p.add_argument("--keep-rejected", action="store_true",
                   help="publish candidates the gate rejected (default: only record why)")


def job_config(args: argparse.Namespace):
    from prefloop.align.gate import DEFAULT_MAX_KL, GateConfig
    from prefloop.align.jobs.preference import JobConfig
    from prefloop.align.train.preference import TrainConfig

    method = args.align_command if args.align_command in ("dpo", "kto") else args.method
    train = TrainConfig(
        method=method, beta=args.beta, loss=getattr(args, "loss", "sigmoid") or "sigmoid",
        label_smoothing=getattr(args, "label_smoothing", 0.0), epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, warmup_ratio=args.warmup,
        lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        desirable_weight=getattr(args, "desirable_weight", 1.0),
        undesirable_weight=getattr(args, "undesirable_weight", 1.0))
    gate = GateConfig(max_kl=args.max_kl if args.max_kl is not None else DEFAULT_MAX_KL,
                      min_improvement=args.min_improvement)
    incremental = args.align_command in ("run", "schedule")
    return JobConfig(
        data_dir=Path(args.data_dir), train=train, gate=gate, command=args.align_command,
        base=args.base, model=args.model, cache_dir=args.cache_dir, since=args.since,
        incremental=incremental, min_new=args.min_new_pairs if incremental else 0,
        max_rows=args.max_pairs, pairs_from_ratings=getattr(args, "pairs_from_ratings", False),
        heldout_fraction=args.heldout_fraction,
        promote=args.auto_promote if incremental else args.promote,
        keep_rejected=args.keep_rejected if incremental else True,
        eval_batch_size=args.eval_batch_size, device=args.device)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_result(result) -> str:
    """The metrics summary: train vs held-out, the current version, the gate's reasons."""
    r = result if isinstance(result, dict) else result.to_record()
    lines = [f"job {r['job_id']}: {r['status']}" + (f" -> {r['version']}" if r.get("version")
                                                     else "") + f" (base {r.get('base')})"]
    metrics = r.get("metrics") or {}
    train, held = metrics.get("train") or {}, metrics.get("heldout") or {}
    data = r.get("data") or {}
    if data.get("rows") and any(data["rows"].values()):
        lines.append(f"data: {data.get('since')} .. {data.get('until')}  "
                     f"train {data['rows']['train']}  held-out {data['rows']['heldout']}"
                     f" (from {data.get('heldout_since')})")
    tr = metrics.get("training") or {}
    if tr:
        lines.append(f"training: {tr.get('steps')} steps in {tr.get('runtime_s')} s, loss "
                     f"{_fmt(tr.get('first_loss'))} -> {_fmt(tr.get('last_loss'))}")
    if train or held:
        rows = [("pairs", "pairs", 0), ("examples", "examples", 0), ("loss", "loss", 4),
                ("reward accuracy", "reward_accuracy", 3), ("reward margin", "reward_margin", 4),
                ("label accuracy", "label_accuracy", 3), ("pref accuracy", "pref_accuracy", 3),
                ("ref pref accuracy", "ref_pref_accuracy", 3),
                ("KL/token to ref", "kl_per_token", 4), ("KL/sequence", "kl_per_sequence", 4)]
        lines.append(f"{'':22}{'train':>10}{'held-out':>10}")
        seen = set()
        for label, key, digits in rows:
            if key in seen or (key not in train and key not in held):
                continue
            seen.add(key)
            lines.append(f"{label:22}{_fmt(train.get(key), digits):>10}"
                         f"{_fmt(held.get(key), digits):>10}")
    cur = metrics.get("current") or {}
    if cur:
        lines.append(f"current {cur.get('version')}: held-out pref accuracy "
                     f"{_fmt(cur.get('heldout_pref_accuracy'))} ({metrics.get('gate_basis')})")
    gate = r.get("gate")
    if gate:
        lines.append(f"gate: {'PASSED' if gate['passed'] else 'REJECTED'}")
        lines += [f"  - {reason}" for reason in gate.get("reasons", [])]
    elif r.get("reason"):
        lines.append(f"reason: {r['reason']}")
    return "\n".join(lines)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _run_job(args: argparse.Namespace) -> int:
    from prefloop.server.errors import PrefloopError, Unavailable
    if getattr(args, "method", None) == "ppo" and args.align_command in ("run", "schedule"):
        from prefloop.align.cli.reward_ppo import run_ppo_job_from_args
        return run_ppo_job_from_args(args)

    from prefloop.align.jobs.preference import run_job
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # unwind: stage removed, failure recorded
    try:
        cfg = job_config(args)
        result = run_job(cfg)
    except Unavailable as exc:
        print(f"prefloop align: {exc}", file=sys.stderr)
        return 3
    except PrefloopError as exc:
        print(f"prefloop align: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"prefloop align: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # recorded as a failed job in registry/jobs.jsonl
        log.exception("align job failed")
        print(f"prefloop align: job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if result.status == "worker":
        return 0
    print(json.dumps(result.to_record(), indent=2) if args.json else format_result(result),
          flush=True)
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from prefloop.server.registry import Registry
    jobs = Registry(args.data_dir).jobs()[-args.last:] if args.last else []
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print("no align jobs yet")
        return 0
    print(f"{'job':32} {'status':10} {'method':6} {'base':6} {'version':8} {'rows':>11}  reason")
    for j in jobs:
        rows = (j.get("data") or {}).get("rows") or {}
        rows_text = f"{rows.get('train', '-')}/{rows.get('heldout', '-')}" if rows else "-"
        reason = (j.get("reason") or "").split("; ")[0][:80]
        print(f"{j['job_id']:32} {j.get('status', '?'):10} {j.get('method') or '-':6} "
              f"{j.get('base') or '-':6} {j.get('version') or '-':8} {rows_text:>11}  {reason}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.align_command == "jobs":
        return _jobs(args)
    if args.align_command == "schedule":
        from prefloop.align.jobs.schedule import run_schedule
        return run_schedule(args, add_run_arguments)
    if args.align_command in ("rm", "score", "ppo"):
        from prefloop.align.cli import reward_ppo as rlhf_cmd
        return rlhf_cmd.run(args)
    if not Path(args.data_dir).is_dir():
        print(f"prefloop align: no data directory at {args.data_dir}", file=sys.stderr)
        return 2
    return _run_job(args)
