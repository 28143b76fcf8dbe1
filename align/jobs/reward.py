"""The reward-model jobs: train one (`prefloop align rm`) and score the log with one
(`prefloop align score`).

- RM job (`run_rm_job`), on the skeleton of align/jobs/runner.py (job lock and history, base
  resolution, split, publish): the `rm` export of the log (preference pairs, margin 0, plus pairs
  derived from ratings with their rating difference as margin) -> time split (newest pairs held
  out) -> TRL RewardTrainer -> pairwise accuracy on train / held-out pairs -> published as a
  version of kind "reward" (`method: "rm"`). Its gate (`gate.reward_model_gate`; recorded, never
  blocks publishing; reward models are never served): at least `min_heldout` held-out pairs and
  the exact `confidence` interval of the held-out accuracy above `min_accuracy`. PPO
  refuses a reward model whose gate failed unless forced (`reward_model_version`).
- Scoring (`score_log`): the logged generations a reward model has not scored yet -> the
  `scores` table (align/scores.py).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefloop.align import data as data_mod
from prefloop.align.gate import DEFAULT_CONFIDENCE, DEFAULT_MIN_HELDOUT, GateDecision, reward_model_gate
from prefloop.align.jobs import runner
from prefloop.align.train.reward import RewardTrainConfig
from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition, InvalidArgument
from prefloop.server.feedback import export as log_export
from prefloop.server.feedback.rows import PreferencePair
from prefloop.server.feedback.voter_caps import DEFAULT_VOTER_CAP, VoterCap

log = logging.getLogger(__name__)


def reward_model_version(registry: reg.Registry, version: str, force: bool = False) -> Path:
    """The folder of reward model `version`; FailedPrecondition if it is not a reward model
    or its gate failed (unless `force`)."""
    manifest = registry.manifest(version)
    if manifest.kind != reg.KIND_REWARD:
        raise FailedPrecondition(f"{version} is a {manifest.kind} model, not a reward model "
                                 "(train one with `prefloop align rm`)")
    if manifest.gate_passed is False and not force:
        verdict = GateDecision.from_record(manifest.gate)  # gate_passed False: a gate record
        reasons = "; ".join(verdict.failed or verdict.reasons)
        raise FailedPrecondition(f"reward model {version} failed its gate ({reasons}); pass "
                                 "--force-rm to use it anyway")
    return registry.version_dir(version)


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
    voter_cap: VoterCap | None = DEFAULT_VOTER_CAP  # each voter's share of the pairs (None: all)
    heldout_fraction: float = 0.2
    min_accuracy: float = 0.5  # the gate: held-out pairwise accuracy's lower end above this
    confidence: float = DEFAULT_CONFIDENCE  # of the gate's interval (two-sided, exact)
    min_heldout: int = DEFAULT_MIN_HELDOUT  # held-out pairs the gate needs
    eval_batch_size: int = 8
    max_train_eval: int = 256
    device: str | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.base is not None:
            reg.version_number(self.base)
        if not 0.0 <= self.min_accuracy < 1.0:
            raise InvalidArgument("min accuracy must be in [0, 1)")
        if not 0.5 <= self.confidence < 1.0 or self.min_heldout < 1:
            raise InvalidArgument("gate confidence must be in [0.5, 1), min held-out >= 1")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise InvalidArgument("max pairs must be >= 2 (one to train on, one to hold out)")


def load_rm_pairs(data_dir: str | Path, *, since: str | None = None,
                  max_pairs: int | None = None, pairs_from_ratings: bool = True,
                  voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> list[PreferencePair]:
    """The `rm` export's pairs (with margins), oldest first."""
    since_t = data_mod.parse_time(since)
    pairs = log_export.load_pairs(data_dir, since=runner.day_of(since_t),
                                  pairs_from_ratings=pairs_from_ratings, margins=True,
                                  voter_cap=voter_cap)
    return data_mod.window_rows(pairs, since_t, None, max_pairs)


def run_rm_job(cfg: RMJobConfig, *, train_fn=None) -> runner.JobResult:
    """Train, evaluate, gate and publish one reward model under the job lock."""
    return runner.run_locked(cfg.data_dir, "rm", "rm",
                      lambda registry, job_id, main: _run_rm(cfg, registry, job_id, train_fn,
                                                             main))


def _run_rm(cfg: RMJobConfig, registry: reg.Registry, job_id: str, train_fn, main: bool
            ) -> runner.JobResult:
    import torch

    from prefloop.align.train.common import load_tokenizer
    from prefloop.align.train.reward import pairwise_metrics, score_pairs
    base = runner.resolve_base(registry, cfg.base, cfg.model, cfg.cache_dir, main)
    result = runner.JobResult(job_id, runner.RUNNING, base=base, method="rm")
    rows = load_rm_pairs(cfg.data_dir, since=cfg.since, max_pairs=cfg.max_pairs,
                         pairs_from_ratings=cfg.pairs_from_ratings, voter_cap=cfg.voter_cap)
    split = runner.split_new_rows(result, rows, {"since_arg": cfg.since}, registry, after=None,
                           incremental=False, min_new=0, heldout_fraction=cfg.heldout_fraction,
                           noun="pairs", empty_reason="no preference pairs in the window")
    if split is None:
        return result
    base_dir = registry.version_dir(base)
    if train_fn is None:
        from prefloop.align.train.reward import train_reward_model as train_fn
    trained = train_fn(base_dir, split.train, cfg.train)
    if not main or trained.model is None:
        result.status = runner.WORKER
        return result
    result.metrics["training"] = dict(runner.training_summary(trained),
                                      trainable_params=trained.trainable_params)
    model = trained.model.to(runner.eval_device(cfg.device))
    tokenizer = load_tokenizer(base_dir)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.train.max_length)

    def metrics(pairs: list[PreferencePair], label: str) -> dict[str, Any]:
        chosen, rejected = score_pairs(model, tokenizer, pairs, progress=label, **kw)
        margins = torch.tensor([float(p.margin or 0.0) for p in pairs]) \
            if cfg.train.margin else None
        out = pairwise_metrics(chosen, rejected, margins)
        diff = chosen.double() - rejected.double()
        out.update(correct=int((diff > 0).sum()), wrong=int((diff < 0).sum()),
                   ties=int((diff == 0).sum()))
        return out

    train_rows = split.train[-cfg.max_train_eval:] if cfg.max_train_eval else []
    if train_rows:
        result.metrics["train"] = metrics(train_rows, "scoring train pairs")
    result.metrics["heldout"] = metrics(split.heldout, "scoring held-out pairs") \
        if split.heldout else {"pairs": 0}
    decision = reward_model_gate(result.metrics["heldout"], cfg.min_accuracy,
                                 confidence=cfg.confidence, min_pairs=cfg.min_heldout)
    result.gate = decision.to_record()
    model.to("cpu")
    hyper = dict(cfg.train.to_dict(), heldout_fraction=cfg.heldout_fraction,
                 pairs_from_ratings=cfg.pairs_from_ratings, max_pairs=cfg.max_pairs,
                 min_accuracy=cfg.min_accuracy, gate_confidence=cfg.confidence,
                 min_heldout_pairs=cfg.min_heldout,
                 voter_cap=dataclasses.asdict(cfg.voter_cap) if cfg.voter_cap else None)
    result.version = runner.publish(registry, model, base_dir, kind=reg.KIND_REWARD, method="rm",
                             parent=base, hyperparameters=hyper, data=result.data,
                             metrics=result.metrics, gate=result.gate, job_id=job_id)
    return runner.conclude(result, decision, registry, job_id, "rm", promote=False)


# ---------------------------------------------------------------------------------------------
# Scoring the log


def score_log(data_dir: str | Path, rm_version: str, *, since: str | None = None,
              rescore: bool = False, limit: int | None = None, batch_size: int = 8,
              max_length: int = 1024, device: str | None = None, force: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Score the logged generations `rm_version` has not scored yet and append them to the
    scores table (align/scores.py). Returns counts, the part written and per-version means."""
    from prefloop.align import scores as scores_mod
    from prefloop.align.train.common import load_tokenizer
    from prefloop.align.train.reward import load_reward_model, score_texts
    registry = reg.Registry(data_dir)
    rm_dir = reward_model_version(registry, rm_version, force=force)
    rows = scores_mod.generations_to_score(data_dir, rm_version, since=since, rescore=rescore,
                                           limit=limit)
    part = None
    if rows:
        model = load_reward_model(rm_dir, runner.eval_device(device))
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
