"""The RLHF jobs: train a reward model (`align rm`), score the log with it (`align score`), and
PPO against it (`align ppo`, `align run --method ppo`).

Both training jobs follow align/jobs/preference.py's contract: they hold the registry's job lock for their
whole length, record a "running" event and then their outcome in `registry/jobs.jsonl` (a failure
is recorded and re-raised), and write a version only through a registry stage.

- RM job: the `rm` export of the log (preference pairs, margin 0, plus pairs derived from ratings
  with their rating difference as margin) -> time split (newest pairs held out) -> TRL
  RewardTrainer -> pairwise accuracy on train / held-out pairs -> published as a version of kind
  "reward" (`method: "rm"`). Its gate (recorded, never blocks publishing; reward models are never
  served): held-out accuracy > `min_accuracy`. PPO refuses a reward model whose gate failed
  unless forced.
- PPO job: prompts of the log (every distinct prompt of `generations` and of explicit
  preferences, dated by its first appearance) -> time split -> `ppo.train_ppo` -> mean reward of
  the candidate and of the current version on the held-out prompts (same seeds) and the
  candidate's KL to its base -> `reward_gate` -> publish (kind "policy", method "ppo") -> promote.
  The incremental form (`align run --method ppo`) takes the prompts newer than the watermark.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefloop.align import data as data_mod
from prefloop.align.gate import GateConfig, kl_within_bound
from prefloop.align.jobs.preference import (
    PUBLISHED,
    REJECTED,
    RUNNING,
    JobResult,
    conclude,
    json_safe,
    new_job_id,
    run_locked,
    split_new_rows,
    watermark,
)
from prefloop.align.train.ppo import PPOConfig
from prefloop.align.train.reward import RewardTrainConfig
from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition, InvalidArgument
from prefloop.server.feedback import export as log_export
from prefloop.server.feedback import schema as logschema

log = logging.getLogger(__name__)

RUNS_DIR = "align-runs"  # <data-dir>/align-runs/<job_id>/ppo_metrics.jsonl, ppo_curves.png
_NOT_COPIED = ("config.json", "model.safetensors.index.json", reg.MANIFEST_FILE)
_VERSION_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _device(device: str | None) -> str:
    import torch
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_policy_base(registry: reg.Registry, base: str | None, model: str | None,
                        cache_dir: str | None, main: bool = True) -> str:
    """The policy version to start from (default: current), creating v0000 on first use."""
    if main:
        from prefloop.server.model.loader import resolve_model_dir
        model_dir = None
        if model or not registry.list_versions():
            model_dir = resolve_model_dir(model, cache_dir)
        registry.ensure_base(model_dir)
    elif not registry.list_versions():
        raise FailedPrecondition("the registry has no v0000 yet: run `prefloop models init` "
                                 "once before a multi-process `accelerate launch` job")
    version = base or registry.current() or reg.BASE_VERSION
    manifest = registry.manifest(version)
    if manifest.kind != reg.KIND_POLICY:
        raise FailedPrecondition(f"base {version} is a {manifest.kind} model, not a policy")
    return version


def reward_model_version(registry: reg.Registry, version: str, force: bool = False) -> Path:
    """The folder of reward model `version`; FailedPrecondition if it is not a reward model
    or its gate failed (unless `force`)."""
    manifest = registry.manifest(version)
    if manifest.kind != reg.KIND_REWARD:
        raise FailedPrecondition(f"{version} is a {manifest.kind} model, not a reward model "
                                 "(train one with `prefloop align rm`)")
    if manifest.gate_passed is False and not force:
        reasons = "; ".join((manifest.gate or {}).get("reasons", []))
        raise FailedPrecondition(f"reward model {version} failed its gate ({reasons}); pass "
                                 "--force-rm to use it anyway")
    return registry.version_dir(version)


def publish_model(registry: reg.Registry, model, base_dir: Path, *, kind: str, method: str,
                  parent: str, hyperparameters: dict, data: dict, metrics: dict,
                  gate: dict | None, job_id: str) -> str:
    """Save `model` + the base's tokenizer files into a stage and publish it; the version."""
    with registry.stage() as stage:
        model.save_pretrained(str(stage.path), safe_serialization=True)
        for p in base_dir.iterdir():  # tokenizer, chat template, generation config: the base's
            if p.is_file() and not p.name.endswith(".safetensors") and p.name not in _NOT_COPIED \
                    and not (stage.path / p.name).exists():
                shutil.copyfile(p, stage.path / p.name)
        for p in list(stage.path.iterdir()):  # save_pretrained extras we do not version
            if p.is_dir() or p.suffix not in _VERSION_SUFFIXES:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        manifest = stage.publish(kind=kind, method=method, parent=parent,
                                 hyperparameters=json_safe(hyperparameters),
                                 data=json_safe(data), metrics=json_safe(metrics),
                                 gate=json_safe(gate), job_id=job_id)
    return manifest.version


def _window(rows: list[dict[str, Any]], since: dt.datetime | None, after: dt.datetime | None,
            max_rows: int | None, key: str) -> list[dict[str, Any]]:
    kept = [r for r in rows if (since is None or r["created_at"] >= since)
            and (after is None or r["created_at"] > after)]
    kept.sort(key=lambda r: (r["created_at"], r.get(key) or ""))
    return kept[-max_rows:] if max_rows and len(kept) > max_rows else kept


def _day(*times: dt.datetime | None) -> str | None:
    bounds = [t for t in times if t is not None]
    return max(bounds).astimezone(dt.timezone.utc).strftime("%Y-%m-%d") if bounds else None


# ---------------------------------------------------------------------------------------------
# Reward model job


@dataclass(slots=True)
class RMJobConfig:
    data_dir: Path
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    base: str | None = None  # policy version the reward model starts from (default: current)
    model: str | None = None
    cache_dir: str | None = None
    since: str | None = None
    max_pairs: int | None = None
    pairs_from_ratings: bool = True
    heldout_fraction: float = 0.2
    min_accuracy: float = 0.5  # the gate: held-out pairwise accuracy must be above this
    eval_batch_size: int = 8
    max_train_eval: int = 256
    device: str | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.base is not None:
            reg.version_number(self.base)
        if not 0.0 <= self.min_accuracy < 1.0:
            raise InvalidArgument("min accuracy must be in [0, 1)")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise InvalidArgument("max pairs must be >= 2 (one to train on, one to hold out)")


def load_rm_pairs(data_dir: str | Path, *, since: str | None = None,
                  max_pairs: int | None = None, pairs_from_ratings: bool = True
                  ) -> list[dict[str, Any]]:
    """The `rm` export (prompt / chosen / rejected / margin + created_at ...), oldest first."""
    since_t = data_mod.parse_time(since)
    table = log_export.export_rm(data_dir, since=_day(since_t),
                                 pairs_from_ratings=pairs_from_ratings)
    return _window(table.to_pylist(), since_t, None, max_pairs, "feedback_id")


def reward_gate(heldout: dict[str, Any], min_accuracy: float) -> dict[str, Any]:
    pairs, acc = int(heldout.get("pairs", 0)), heldout.get("accuracy")
    if pairs < 1 or acc is None:
        return {"passed": False, "reasons": ["no held-out pairs to measure accuracy on"],
                "heldout_accuracy": None, "min_accuracy": min_accuracy}
    ok = acc > min_accuracy
    return {"passed": ok, "heldout_accuracy": acc, "min_accuracy": min_accuracy,
            "reasons": [f"held-out pairwise accuracy {acc:.3f} on {pairs} pairs "
                        f"{'>' if ok else '<='} {min_accuracy:.3f}"]}


def run_rm_job(cfg: RMJobConfig, *, train_fn=None) -> JobResult:
    registry = reg.Registry(cfg.data_dir)
    job_id = new_job_id()
    return run_locked(registry, job_id, "rm", "rm",
                      lambda main: _run_rm(cfg, registry, job_id, train_fn, main))


def _run_rm(cfg: RMJobConfig, registry: reg.Registry, job_id: str, train_fn, main: bool
            ) -> JobResult:
    import torch

    from prefloop.align.train.reward import load_tokenizer, pairwise_metrics, score_pairs
    base = resolve_policy_base(registry, cfg.base, cfg.model, cfg.cache_dir, main)
    result = JobResult(job_id, RUNNING, base=base, method="rm")
    rows = load_rm_pairs(cfg.data_dir, since=cfg.since, max_pairs=cfg.max_pairs,
                         pairs_from_ratings=cfg.pairs_from_ratings)
    split = split_new_rows(result, rows, {"since_arg": cfg.since}, registry, after=None,
                           incremental=False, min_new=0, heldout_fraction=cfg.heldout_fraction,
                           noun="pairs", empty_reason="no preference pairs in the window")
    if split is None:
        return result
    base_dir = registry.version_dir(base)
    if train_fn is None:
        from prefloop.align.train.reward import train_reward_model as train_fn
    trained = train_fn(base_dir, split.train, cfg.train)
    if not main or trained.model is None:
        result.status = "worker"
        return result
    losses = [h["loss"] for h in trained.log_history if "loss" in h]
    result.metrics["training"] = {"steps": trained.steps, "runtime_s": round(trained.runtime_s, 2),
                                  "first_loss": losses[0] if losses else None,
                                  "last_loss": losses[-1] if losses else None,
                                  "trainable_params": trained.trainable_params}
    model = trained.model.to(_device(cfg.device))
    tokenizer = load_tokenizer(base_dir)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.train.max_length)

    def metrics(pairs: list[dict], label: str) -> dict[str, Any]:
        chosen, rejected = score_pairs(model, tokenizer, pairs, progress=label, **kw)
        margins = torch.tensor([float(p.get("margin") or 0.0) for p in pairs]) \
            if cfg.train.margin else None
        return pairwise_metrics(chosen, rejected, margins)

    train_rows = split.train[-cfg.max_train_eval:] if cfg.max_train_eval else []
    if train_rows:
        result.metrics["train"] = metrics(train_rows, "scoring train pairs")
    result.metrics["heldout"] = metrics(split.heldout, "scoring held-out pairs") \
        if split.heldout else {"pairs": 0}
    gate = reward_gate(result.metrics["heldout"], cfg.min_accuracy)
    result.gate = gate
    model.to("cpu")
    hyper = dict(cfg.train.to_dict(), heldout_fraction=cfg.heldout_fraction,
                 pairs_from_ratings=cfg.pairs_from_ratings, max_pairs=cfg.max_pairs,
                 min_accuracy=cfg.min_accuracy)
    result.version = publish_model(registry, model, base_dir, kind=reg.KIND_REWARD, method="rm",
                                   parent=base, hyperparameters=hyper, data=result.data,
                                   metrics=result.metrics, gate=gate, job_id=job_id)
    result.status = PUBLISHED if gate["passed"] else REJECTED
    result.reason = "; ".join(gate["reasons"])
    return result


# ---------------------------------------------------------------------------------------------
# Scoring the log


def score_log(data_dir: str | Path, rm_version: str, *, since: str | None = None,
              rescore: bool = False, limit: int | None = None, batch_size: int = 8,
              max_length: int = 1024, device: str | None = None, force: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Score the logged generations `rm_version` has not scored yet and append them to the
    scores table (align/scores.py). Returns counts, the part written and per-version means."""
    from prefloop.align import scores as scores_mod
    from prefloop.align.train.reward import load_reward_model, load_tokenizer, score_texts
    registry = reg.Registry(data_dir)
    rm_dir = reward_model_version(registry, rm_version, force=force)
    rows = scores_mod.generations_to_score(data_dir, rm_version, since=since, rescore=rescore,
                                           limit=limit)
    part = None
    if rows:
        model = load_reward_model(rm_dir, _device(device))
        tokenizer = load_tokenizer(rm_dir)
        values = score_texts(model, tokenizer, [r["prompt"] for r in rows],
                             [r["completion"] for r in rows], batch_size=batch_size,
                             max_length=max_length,
                             progress="scoring generations" if progress else None)
        out = [{k: r[k] for k in ("response_id", "model_version", "prompt_fingerprint")}
               | {"generated_at": r["generated_at"], "score": float(v)}
               for r, v in zip(rows, values.tolist())]
        part = scores_mod.write_part(data_dir, rm_version, out)
    table = scores_mod.load_scores(data_dir, rm_version)
    return {"rm_version": rm_version, "scored": len(rows), "part": str(part) if part else None,
            "total": table.num_rows, "by_model_version": scores_mod.summary_by_model_version(table)}


# ---------------------------------------------------------------------------------------------
# PPO job


@dataclass(slots=True)
class PPOJobConfig:
    data_dir: Path
    rm: str  # the reward model version
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    command: str = "ppo"  # ppo | run | schedule
    base: str | None = None
    model: str | None = None
    cache_dir: str | None = None
    since: str | None = None
    incremental: bool = False  # only prompts newer than the watermark (align run)
    min_new: int = 0
    max_prompts: int | None = None  # the newest N prompts
    heldout_fraction: float = 0.2
    max_heldout: int = 64  # held-out prompts evaluated (the newest ones)
    eval_samples: int = 2  # answers per held-out prompt
    eval_batch_size: int = 8
    promote: bool = False
    keep_rejected: bool = True
    force_rm: bool = False
    out_dir: Path | None = None  # metrics + plot (default <data-dir>/align-runs/<job id>/)
    plot: bool = False
    device: str | None = None  # evaluation device
    progress: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        reg.version_number(self.rm)
        if self.base is not None:
            reg.version_number(self.base)
        if self.max_prompts is not None and self.max_prompts < 2:
            raise InvalidArgument("max prompts must be >= 2 (one to train on, one to hold out)")
        if self.eval_samples < 1 or self.max_heldout < 1 or self.min_new < 0:
            raise InvalidArgument("eval samples and max held-out must be >= 1, min-new >= 0")


def load_prompts(data_dir: str | Path, *, since: str | None = None,
                 after: dt.datetime | None = None, max_prompts: int | None = None
                 ) -> list[dict[str, Any]]:
    """Distinct prompts of the log (generations, and explicit preferences' prompt messages),
    each dated by its first appearance, oldest first: {prompt, created_at, fingerprint}."""
    since_t = data_mod.parse_time(since)
    day = _day(since_t)  # not `after`: a prompt first seen before it must keep its first date
    first: dict[str, dict[str, Any]] = {}

    def add(fingerprint: str | None, messages: list[dict], created_at: dt.datetime) -> None:
        if not messages or not any(m.get("content") for m in messages):
            return
        fingerprint = fingerprint or logschema.prompt_fingerprint(None, messages)
        seen = first.get(fingerprint)
        if seen is None or created_at < seen["created_at"]:
            first[fingerprint] = {"prompt": messages, "created_at": created_at,
                                  "fingerprint": fingerprint, "feedback_id": fingerprint}

    gens = log_export.load_table(data_dir, logschema.GENERATIONS, since=day,
                                 columns=["prompt", "messages", "prompt_fingerprint", "created_at"])
    for g in gens.to_pylist():
        add(g["prompt_fingerprint"], logschema.prompt_as_messages(g["prompt"], g["messages"]),
            g["created_at"])
    fb = log_export.load_table(data_dir, logschema.FEEDBACK, since=day,
                               columns=["prompt_messages", "prompt_fingerprint", "created_at"])
    for f in fb.to_pylist():
        if f["prompt_messages"]:
            add(f["prompt_fingerprint"], f["prompt_messages"], f["created_at"])
    return _window(list(first.values()), since_t, after, max_prompts, "fingerprint")


@dataclass(slots=True)
class RewardGateDecision:
    """The PPO gate: mean held-out reward must beat the current version's (same prompts, same
    seeds) by more than `min_improvement` (reward-model units), and the candidate's exact KL to
    its base, per answer token, must stay <= `max_kl`."""

    passed: bool
    reasons: list[str]
    metric: str = "heldout_reward"
    candidate_reward: float | None = None
    current_reward: float | None = None
    current_version: str | None = None
    kl_per_token: float | None = None
    max_kl: float | None = None
    min_improvement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reward_gate_decision(*, candidate_reward: float | None, current_reward: float | None,
                         current_version: str | None, kl_per_token: float | None,
                         heldout_prompts: int, config: GateConfig) -> RewardGateDecision:
    reasons, ok = [], True
    if heldout_prompts < config.min_heldout:
        ok = False
        reasons.append(f"only {heldout_prompts} held-out prompts; the gate needs at least "
                       f"{config.min_heldout}")
    if candidate_reward is None or current_reward is None or not math.isfinite(candidate_reward) \
            or not math.isfinite(current_reward):
        ok = False
        reasons.append("no held-out reward to compare")
    else:
        gain = candidate_reward - current_reward
        beats = gain > config.min_improvement
        ok = ok and beats
        reasons.append(f"held-out mean reward {candidate_reward:.4f} "
                       f"{'beats' if beats else 'does not beat'} current {current_version}'s "
                       f"{current_reward:.4f} (gain {gain:+.4f}, needs > "
                       f"{config.min_improvement:+.4f})")
    within, reason = kl_within_bound(kl_per_token, config.max_kl)
    ok = ok and within
    reasons.append(reason)
    return RewardGateDecision(ok, reasons, candidate_reward=candidate_reward,
                              current_reward=current_reward, current_version=current_version,
                              kl_per_token=kl_per_token, max_kl=config.max_kl,
                              min_improvement=config.min_improvement)


def run_ppo_job(cfg: PPOJobConfig, *, train_fn=None) -> JobResult:
    registry = reg.Registry(cfg.data_dir)
    job_id = new_job_id()
    return run_locked(registry, job_id, cfg.command, "ppo",
                      lambda main: _run_ppo(cfg, registry, job_id, train_fn, main))


def _run_ppo(cfg: PPOJobConfig, registry: reg.Registry, job_id: str, train_fn, main: bool
             ) -> JobResult:
    from prefloop.align.train.ppo import plot_metrics
    base = resolve_policy_base(registry, cfg.base, cfg.model, cfg.cache_dir, main)
    rm_dir = reward_model_version(registry, cfg.rm, cfg.force_rm)
    result = JobResult(job_id, RUNNING, base=base, method="ppo")
    after = watermark(registry) if cfg.incremental else None
    rows = load_prompts(cfg.data_dir, since=cfg.since, after=after, max_prompts=cfg.max_prompts)
    window = {"since_arg": cfg.since, "after_watermark": data_mod.iso(after), "rm": cfg.rm}
    split = split_new_rows(result, rows, window, registry, after=after, incremental=cfg.incremental,
                           min_new=cfg.min_new, heldout_fraction=cfg.heldout_fraction,
                           noun="prompts", empty_reason="no prompts in the window")
    if split is None:
        return result
    base_dir = registry.version_dir(base)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else cfg.data_dir / RUNS_DIR / job_id
    metrics_path = out_dir / "ppo_metrics.jsonl"
    if train_fn is None:
        from prefloop.align.train.ppo import train_ppo as train_fn
    trained = train_fn(base_dir, rm_dir, [r["prompt"] for r in split.train], cfg.ppo,
                       metrics_path=metrics_path, progress=cfg.progress)
    if not main or trained.model is None:
        result.status = "worker"
        return result
    history = trained.history
    result.metrics["training"] = {
        "steps": trained.steps, "runtime_s": round(trained.runtime_s, 2),
        "trainable_params": trained.trainable_params, "final_beta": trained.beta,
        "first": {k: history[0].get(k) for k in ("reward", "kl", "entropy")} if history else {},
        "last": {k: history[-1].get(k) for k in ("reward", "kl", "entropy", "clip_fraction",
                                                 "value_loss")} if history else {},
        "metrics_file": str(metrics_path)}
    if cfg.plot and history:
        result.metrics["training"]["plot"] = str(plot_metrics(
            history, out_dir / "ppo_curves.png", title=f"PPO {job_id} (rm {cfg.rm})"))
    decision = _evaluate_ppo(cfg, registry, base, base_dir, rm_dir, trained, split, result)
    result.gate = decision.to_dict()
    if decision.passed or cfg.keep_rejected:
        hyper = dict(cfg.ppo.to_dict(), rm=cfg.rm, heldout_fraction=cfg.heldout_fraction,
                     eval_samples=cfg.eval_samples, gate=dataclasses.asdict(cfg.gate),
                     max_prompts=cfg.max_prompts)
        result.version = publish_model(registry, trained.model, base_dir, kind=reg.KIND_POLICY,
                                       method="ppo", parent=base, hyperparameters=hyper,
                                       data=result.data, metrics=result.metrics,
                                       gate=result.gate, job_id=job_id)
    del trained
    return conclude(result, decision, registry, job_id, "ppo", promote=cfg.promote)


def _evaluate_ppo(cfg: PPOJobConfig, registry: reg.Registry, base: str, base_dir: Path,
                  rm_dir: Path, trained, split: data_mod.Split, result: JobResult
                  ) -> RewardGateDecision:
    from prefloop.align.train.ppo import evaluate_policy
    from prefloop.align.train.preference import load_causal_lm
    from prefloop.align.train.reward import load_reward_model, load_tokenizer
    device = _device(cfg.device)
    heldout = [r["prompt"] for r in split.heldout[-cfg.max_heldout:]]
    tokenizer = trained.tokenizer
    rm, rm_tok = load_reward_model(rm_dir, device), load_tokenizer(rm_dir)
    reference = load_causal_lm(base_dir, device)
    kw = dict(max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature,
              samples=cfg.eval_samples, seed=cfg.ppo.seed, batch_size=cfg.eval_batch_size,
              max_prompt_length=cfg.ppo.max_prompt_length)
    policy = trained.model.to(device)
    candidate = evaluate_policy(policy, reference, rm, tokenizer, rm_tok, heldout,
                                progress="evaluating the candidate", **kw)
    policy.to("cpu")
    current = registry.current()
    if current is None or current == base:
        current_eval = evaluate_policy(reference, reference, rm, tokenizer, rm_tok, heldout,
                                       progress=f"evaluating {base}", **kw)
    else:
        current_model = load_causal_lm(registry.version_dir(current), device)
        current_eval = evaluate_policy(current_model, reference, rm, tokenizer, rm_tok, heldout,
                                       progress=f"evaluating {current}", **kw)
        del current_model
    del reference, rm
    result.metrics["heldout"] = candidate
    result.metrics["current"] = dict(current_eval, version=current)
    return reward_gate_decision(
        candidate_reward=candidate.get("reward"), current_reward=current_eval.get("reward"),
        current_version=current, kl_per_token=candidate.get("kl_per_token"),
        heldout_prompts=len(heldout), config=cfg.gate)
