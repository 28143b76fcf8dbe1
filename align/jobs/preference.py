"""One align job: data -> time split -> train (TRL) -> evaluate -> gate -> publish -> promote.

`run_job(JobConfig)` is what `prefloop align dpo|kto|run` call. It holds the registry's job lock
for its whole length (a second job fails at once with Unavailable), records a "running" event
and then its outcome in `registry/jobs.jsonl`, and writes a version only through a registry stage
(so a job that fails or is killed leaves no partial version; stale stages of dead jobs are
removed by the next job).

Incremental jobs (`align run`) train on the rows newer than the *watermark*: the newest training
row of the current version and its ancestors (`data.trained_until` in their manifests). Rows a job
only held out are trained on by the next one; after a rollback the data of the rolled-back version
is available again. `min_new` counts rows newer than everything any finished job has seen.

Outcomes: skipped (not enough data), rejected (gate failed), published (gate passed, not
promoted), promoted, failed (an exception: recorded, then re-raised).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefloop.align import data as data_mod
from prefloop.align.gate import GateConfig, GateDecision, decide
from prefloop.align.train.preference import TrainConfig, is_main_process
from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

SKIPPED, REJECTED, PUBLISHED, PROMOTED, FAILED, RUNNING = (
    "skipped", "rejected", "published", "promoted", "failed", "running")
_WEIGHT_OR_CONFIG = ("config.json", "model.safetensors.index.json", reg.MANIFEST_FILE)


@dataclass(slots=True)
class JobConfig:
    data_dir: Path
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    command: str = "dpo"  # what started it: dpo | kto | run
    base: str | None = None  # version to train from and regularize towards (default: current)
    model: str | None = None  # --model for creating v0000 on first use (default model if None)
    cache_dir: str | None = None
    since: str | None = None  # only rows created on/after this date or time
    incremental: bool = False  # only rows newer than the watermark (align run)
    min_new: int = 0  # skip unless at least this many rows are newer than any job has seen
    max_rows: int | None = None  # keep the newest N pairs / examples
    pairs_from_ratings: bool = False  # dpo: add pairs of differently rated answers
    heldout_fraction: float = 0.2
    promote: bool = False  # promote the candidate when the gate passes
    keep_rejected: bool = True  # publish a candidate the gate rejected (marked rejected)
    eval_batch_size: int = 4
    max_train_eval: int = 256  # newest training rows scored for the train metrics
    device: str | None = None  # evaluation device (default: cuda if available, else cpu)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.base is not None:
            reg.version_number(self.base)
        if self.min_new < 0 or self.eval_batch_size < 1 or self.max_train_eval < 0:
            raise InvalidArgument("min-new, eval batch size and max-train-eval must be >= 0 / 1")
        if self.max_rows is not None and self.max_rows < 2:
            raise InvalidArgument("max pairs must be >= 2 (one to train on, one to hold out)")


@dataclass(slots=True)
class JobResult:
    job_id: str
    status: str
    reason: str = ""
    version: str | None = None
    base: str | None = None
    method: str = "dpo"
    gate: dict | None = None
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, recursively (manifests and job lines are strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def new_job_id() -> str:
    return f"job-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------------
# Watermarks


def watermark(registry: reg.Registry) -> dt.datetime | None:
    """Newest row trained on by the current version or any of its ancestors."""
    version, best, seen = registry.current(), None, set()
    while version and version not in seen:
        seen.add(version)
        manifest = registry.manifest(version)
        until = data_mod.parse_time(manifest.data.get("trained_until"))
        if until is not None and (best is None or until > best):
            best = until
        version = manifest.parent
    return best


def last_seen(registry: reg.Registry) -> dt.datetime | None:
    """Newest row any finished job has trained or evaluated on."""
    times = [data_mod.parse_time((j.get("data") or {}).get("until"))
             for j in registry.jobs() if j.get("status") in (REJECTED, PUBLISHED, PROMOTED)]
    times = [t for t in times if t is not None]
    return max(times) if times else None


# ---------------------------------------------------------------------------------------------
# The job


TrainFn = Callable[[Path, list, TrainConfig], Any]


def run_job(cfg: JobConfig, *, train_fn: TrainFn | None = None) -> JobResult:
    """Run one job under the registry's job lock; see the module docstring."""
    registry = reg.Registry(cfg.data_dir)
    job_id = new_job_id()
    return run_locked(registry, job_id, cfg.command, cfg.train.method,
                      lambda main: _run(cfg, registry, job_id, train_fn, main=main))


def run_locked(registry: reg.Registry, job_id: str, command: str, method: str,
               fn: Callable[[bool], JobResult]) -> JobResult:
    """`fn(main)` under the registry's job lock, recorded as running, then its outcome (or failed)
    in the job history. Other ranks of `accelerate launch` only train: `fn(False)`, no lock."""
    if not is_main_process():
        return fn(False)
    with registry.job_lock():
        registry.cleanup_stages()
        registry.record_job({"job_id": job_id, "status": RUNNING, "pid": os.getpid(),
                             "command": command, "method": method, "started_at": reg.utc_now()})
        try:
            result = fn(True)
        except BaseException as exc:
            registry.record_job({"job_id": job_id, "status": FAILED, "finished_at": reg.utc_now(),
                                 "reason": f"{type(exc).__name__}: {exc}"[:2000]})
            raise
        registry.record_job(dict(result.to_record(), finished_at=reg.utc_now()))
        return result


def split_new_rows(result: JobResult, rows: list[dict], window: dict, registry: reg.Registry, *,
                   after, incremental: bool, min_new: int, heldout_fraction: float, noun: str,
                   empty_reason: str) -> "data_mod.Split | None":
    """The train / held-out time split of `rows`, recorded in `result.data` with `window`; None
    (and `result` marked SKIPPED with the reason) when an incremental job has fewer than `min_new`
    rows newer than the last trained one, or when nothing is left to train on. Every rank decides
    alike (they all read the same files)."""
    if incremental:
        seen = max([t for t in (after, last_seen(registry)) if t is not None], default=None)
        new = sum(1 for r in rows if seen is None or r["created_at"] > seen)
        window["new_rows"] = new
        if new < max(min_new, 1):
            result.status, result.data = SKIPPED, window
            result.reason = (f"{new} new {noun} since {data_mod.iso(seen) or 'the beginning'}; "
                             f"need {max(min_new, 1)}")
            return None
    split = data_mod.time_split(rows, heldout_fraction)
    result.data = dict(split.describe(), **window, total_rows=len(rows),
                       trained_until=data_mod.iso(max((r["created_at"] for r in split.train),
                                                      default=None)))
    if not split.train:
        result.status, result.reason = SKIPPED, empty_reason
        return None
    return split


def _resolve_base(cfg: JobConfig, registry: reg.Registry, main: bool) -> str:
    if main:
        if not registry.list_versions():  # first use: v0000 from --model or the default model
            from prefloop.server.model.loader import resolve_model_dir
            registry.ensure_base(resolve_model_dir(cfg.model, cfg.cache_dir))
        else:
            if cfg.model:
                log.warning("--model %s ignored: the registry in %s already has a base version",
                            cfg.model, registry.root)
            registry.ensure_base()  # no-op unless CURRENT is missing
    elif not registry.list_versions():
        raise FailedPrecondition("the registry has no v0000 yet: run `prefloop models init` "
                                 "once before a multi-process `accelerate launch` job")
    base = cfg.base or registry.current() or reg.BASE_VERSION
    manifest = registry.manifest(base)
    if manifest.kind != reg.KIND_POLICY:
        raise FailedPrecondition(f"base {base} is a {manifest.kind} model, not a policy")
    return base


def _load_rows(cfg: JobConfig, registry: reg.Registry) -> tuple[list[dict], dt.datetime | None]:
    after = watermark(registry) if cfg.incremental else None
    if cfg.train.method == "dpo":
        rows = data_mod.load_pairs(cfg.data_dir, since=cfg.since, after=after,
                                   max_pairs=cfg.max_rows,
                                   pairs_from_ratings=cfg.pairs_from_ratings)
    else:
        rows = data_mod.load_examples(cfg.data_dir, since=cfg.since, after=after,
                                      max_examples=cfg.max_rows)
    return rows, after


def _run(cfg: JobConfig, registry: reg.Registry, job_id: str, train_fn: TrainFn | None,
         main: bool) -> JobResult:
    method = cfg.train.method
    base = _resolve_base(cfg, registry, main)
    result = JobResult(job_id, RUNNING, base=base, method=method)
    rows, after = _load_rows(cfg, registry)
    window = {"since_arg": cfg.since, "after_watermark": data_mod.iso(after)}
    split = split_new_rows(result, rows, window, registry, after=after, incremental=cfg.incremental,
                           min_new=cfg.min_new, heldout_fraction=cfg.heldout_fraction,
                           noun="pairs" if method == "dpo" else "examples",
                           empty_reason="no training rows in the window")
    if split is None:
        return result
    base_dir = registry.version_dir(base)
    trl_rows = (data_mod.trl_pairs(split.train) if method == "dpo"
                else data_mod.trl_examples(split.train))
    if train_fn is None:
        from prefloop.align.train.preference import train as train_fn
    trained = train_fn(base_dir, trl_rows, cfg.train)
    if not main or trained.model is None:
        result.status = "worker"
        return result
    result.metrics["training"] = _training_summary(trained)
    decision = _evaluate(cfg, registry, base, base_dir, trained, split, result)
    result.gate = decision.to_dict()
    if decision.passed or cfg.keep_rejected:
        result.version = _publish(cfg, registry, base, base_dir, trained, result, job_id)
    del trained
    return conclude(result, decision, registry, job_id, method, promote=cfg.promote)


def conclude(result: JobResult, decision, registry: reg.Registry, job_id: str, method: str, *,
             promote: bool) -> JobResult:
    """After the gate (and publishing): promote if it passed and the job asked to, set the
    status (promoted / published / rejected) and the gate's reasons. Frees the trained model's
    memory first (the caller has dropped its reference)."""
    gc.collect()
    if decision.passed and promote:
        registry.promote(result.version, reason=f"align job {job_id} ({method}): gate passed",
                         actor="align")
        result.status = PROMOTED
    else:
        result.status = PUBLISHED if decision.passed else REJECTED
    result.reason = "; ".join(decision.reasons)
    return result


def _training_summary(trained) -> dict[str, Any]:
    losses = [h["loss"] for h in trained.log_history if "loss" in h]
    last = next((h for h in reversed(trained.log_history) if "loss" in h), {})
    return {"steps": trained.steps, "runtime_s": round(trained.runtime_s, 2),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "last_log": {k: v for k, v in last.items() if isinstance(v, (int, float))}}


def _device(cfg: JobConfig) -> str:
    import torch
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _evaluate(cfg: JobConfig, registry: reg.Registry, base: str, base_dir: Path, trained,
              split: data_mod.Split, result: JobResult) -> GateDecision:
    """Train / held-out metrics of the candidate against its reference, the current version's
    held-out preference accuracy, and the gate decision."""
    from prefloop.align import evaluate as ev
    from prefloop.align.train.preference import load_causal_lm

    device = _device(cfg)
    tok, tc = trained.tokenizer, cfg.train
    policy = trained.model.to(device)
    reference = load_causal_lm(base_dir, device)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=tc.max_length)
    train_rows = split.train[-cfg.max_train_eval:] if cfg.max_train_eval else []
    current = registry.current()
    if tc.method == "dpo":
        loss_kw = dict(beta=tc.beta, loss_type=tc.loss, label_smoothing=tc.label_smoothing)
        gate_pairs = split.heldout
        if train_rows:
            result.metrics["train"] = ev.pair_metrics(ev.score_pairs(
                policy, tok, train_rows, reference=reference, progress="scoring train pairs",
                **kw), **loss_kw)
        held = ev.score_pairs(policy, tok, gate_pairs, reference=reference,
                              progress="scoring held-out pairs", **kw)
        heldout = ev.pair_metrics(held, **loss_kw)
        basis = "held-out preference pairs"
        ref_accuracy = heldout.get("ref_pref_accuracy")
    else:
        labels = [bool(r["label"]) for r in split.heldout]
        if train_rows:
            result.metrics["train"] = ev.example_metrics(ev.score_examples(
                policy, tok, train_rows, reference=reference, progress="scoring train examples",
                **kw), [bool(r["label"]) for r in train_rows], beta=tc.beta)
        held = ev.score_examples(policy, tok, split.heldout, reference=reference,
                                 progress="scoring held-out examples", **kw)
        heldout = ev.example_metrics(held, labels, beta=tc.beta)
        gate_pairs = data_mod.pairs_from_examples(split.heldout) or None
        if gate_pairs:
            pm = ev.pair_metrics(ev.score_pairs(policy, tok, gate_pairs, reference=reference,
                                                **kw), beta=tc.beta)
            heldout["pref_accuracy"], heldout["pairs"] = pm["pref_accuracy"], pm["pairs"]
            ref_accuracy = pm.get("ref_pref_accuracy")
            basis = "same-prompt (desirable, undesirable) held-out pairs"
        else:
            heldout["pref_accuracy"] = ev.cross_prompt_accuracy(held, labels)
            ref_accuracy = ev.cross_prompt_accuracy(ev.Scores(held.ref_logps, held.tokens), labels)
            heldout["pairs"] = sum(labels) * (len(labels) - sum(labels))
            basis = "all (desirable, undesirable) held-out examples, mean per-token log-prob"
    result.metrics["heldout"] = heldout
    result.metrics["gate_basis"] = basis
    del reference
    if current == base or current is None:
        current_accuracy = ref_accuracy
    else:
        current_accuracy = _current_accuracy(cfg, registry, current, tok, split, gate_pairs,
                                             device)
    result.metrics["current"] = {"version": current, "heldout_pref_accuracy": current_accuracy}
    policy.to("cpu")
    return decide(candidate_accuracy=heldout.get("pref_accuracy"),
                  current_accuracy=current_accuracy, current_version=current,
                  kl_per_token=heldout.get("kl_per_token"), heldout_pairs=int(heldout["pairs"]),
                  config=cfg.gate)


def _current_accuracy(cfg: JobConfig, registry: reg.Registry, current: str, tok,
                      split: data_mod.Split, gate_pairs: list | None, device: str
                      ) -> float | None:
    """The current version's held-out preference accuracy on the gate's pairs (or, for KTO
    without same-prompt pairs, on all held-out examples)."""
    from prefloop.align import evaluate as ev
    from prefloop.align.train.preference import load_causal_lm

    model = load_causal_lm(registry.version_dir(current), device)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.train.max_length)
    try:
        if gate_pairs is not None:
            scores = ev.score_pairs(model, tok, gate_pairs,
                                    progress=f"scoring held-out pairs with {current}", **kw)
            return ev.pair_metrics(scores, beta=cfg.train.beta)["pref_accuracy"]
        labels = [bool(r["label"]) for r in split.heldout]
        scores = ev.score_examples(model, tok, split.heldout, **kw)
        return ev.cross_prompt_accuracy(scores, labels)
    finally:
        del model


def _publish(cfg: JobConfig, registry: reg.Registry, base: str, base_dir: Path, trained,
             result: JobResult, job_id: str) -> str:
    """Save the merged weights + the base's tokenizer files into a stage and publish it."""
    trained.model.config.use_cache = True  # training turned it off; serving wants it
    with registry.stage() as stage:
        trained.model.save_pretrained(str(stage.path), safe_serialization=True)
        for p in base_dir.iterdir():  # tokenizer, chat template, generation config: the base's
            if p.is_file() and not p.name.endswith(".safetensors") \
                    and p.name not in _WEIGHT_OR_CONFIG:
                shutil.copyfile(p, stage.path / p.name)
        for p in list(stage.path.iterdir()):  # save_pretrained extras we do not version
            if p.is_dir() or p.suffix not in (".safetensors", ".json", ".jinja", ".txt", ".model"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        hyper = dict(cfg.train.to_dict(), heldout_fraction=cfg.heldout_fraction,
                     gate=dataclasses.asdict(cfg.gate), pairs_from_ratings=cfg.pairs_from_ratings,
                     max_rows=cfg.max_rows)
        manifest = stage.publish(
            kind=reg.KIND_POLICY, method=cfg.train.method, parent=base,
            hyperparameters=json_safe(hyper), data=json_safe(result.data),
            metrics=json_safe(result.metrics), gate=json_safe(result.gate), job_id=job_id)
    return manifest.version
