"""The skeleton every align job runs on (DPO/KTO in jobs/preference.py, the reward model in
jobs/reward.py, PPO in jobs/ppo.py), one copy of each step:

- the job lock and the job history (server/jobs.py, beside the registry): `run_locked` holds
  the lock for a job's whole length (a second job fails at once with Unavailable), removes
  stale stages of dead jobs, records a "running" event and then the outcome (a failure is
  recorded, then re-raised);
- base resolution (`resolve_base`: the policy version to start from; v0000 from `--model` or the
  default model on first use — v0000 is current from its creation —, `--model` ignored with a
  warning once the registry has a base);
- the new-rows time split (`split_new_rows`, with the watermark of incremental jobs);
- the evaluation device, publishing a trained model through a registry stage (`publish`: its
  weights + the base's tokenizer files, so a failed or killed job leaves no partial version),
  and the outcome after the gate (`conclude`).

Incremental jobs (`align run`) train on the rows newer than the *watermark*: the newest training
row of the current version and its ancestors (`data.trained_until` in their manifests). Rows a job
only held out are trained on by the next one; after a rollback the data of the rolled-back version
is available again. `min_new` counts rows newer than everything any finished job has seen.

Outcomes: skipped (not enough data), rejected (gate failed), published (gate passed, not
promoted), promoted, failed (an exception or Ctrl-C: recorded, then re-raised; a v0000 the
failed job created on first use is removed again, so the registry is as it was); "crashed" when
read back for a job whose process died without an outcome line. A first job that finishes without
promoting (skipped, rejected, published) keeps v0000, the served base, as the base of later jobs.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import logging
import math
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefloop.align import data as data_mod
from prefloop.align.gate import GateConfig, GateDecision
from prefloop.align.train.common import is_main_process
from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition, InvalidArgument, NotFound
from prefloop.server.feedback.rows import Dated
from prefloop.server.jobs import (  # noqa: F401 (the job statuses and history: re-exported)
    CRASHED,
    FAILED,
    PROMOTED,
    PUBLISHED,
    REJECTED,
    RUNNING,
    SKIPPED,
    job_history,
    job_lock,
    jobs_path,
    record_job,
)

log = logging.getLogger(__name__)

WORKER = "worker"  # the result of a non-main rank of `accelerate launch` (it only trains)
# Base files a published version does not take over (it has its own weights and config).
_NOT_COPIED = ("config.json", "model.safetensors.index.json", reg.MANIFEST_FILE)


# ---------------------------------------------------------------------------------------------
# Job lock and job history


# ---------------------------------------------------------------------------------------------
# Results


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


def training_summary(trained) -> dict[str, Any]:
    """Steps, runtime and first / last training loss of a TRL trainer's log history."""
    losses = [h["loss"] for h in trained.log_history if "loss" in h]
    return {"steps": trained.steps, "runtime_s": round(trained.runtime_s, 2),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------------------------------------
# Watermarks and data windows


def current_version(registry: reg.Registry) -> str | None:
    """The version align compares with and continues from: the served one (None on an empty
    registry)."""
    return registry.current()


def root_version(registry: reg.Registry, version: str) -> str:
    """Where `version`'s chain of parents starts (v0000; the oldest ancestor still there when
    `models prune` removed some)."""
    seen = set()
    while version not in seen:
        seen.add(version)
        try:
            parent = registry.manifest(version).parent
            if parent:
                registry.version_dir(parent)  # NotFound once pruned
        except NotFound:
            break
        if not parent:
            break
        version = parent
    return version


def watermark(registry: reg.Registry) -> dt.datetime | None:
    """Newest row trained on by the current version or any of its ancestors."""
    version, best, seen = current_version(registry), None, set()
    while version and version not in seen:
        seen.add(version)
        try:
            manifest = registry.manifest(version)
        except NotFound:  # an ancestor removed by `prefloop models prune/delete`
            break
        until = data_mod.parse_time(manifest.data.get("trained_until"))
        if until is not None and (best is None or until > best):
            best = until
        version = manifest.parent
    return best


def last_seen(registry: reg.Registry) -> dt.datetime | None:
    """Newest row any finished policy job has trained or evaluated on. Reward-model jobs do not
    count: training the judge on the votes must not make the next policy job (PPO against that
    judge) skip them as already seen."""
    times = [data_mod.parse_time(j.data.get("until")) for j in job_history(registry)
             if j.status in (REJECTED, PUBLISHED, PROMOTED) and j.method != "rm"]
    times = [t for t in times if t is not None]
    return max(times) if times else None


def newest_seen(registry: reg.Registry, after: dt.datetime | None) -> dt.datetime | None:
    """The newest row an incremental job counts as seen: the watermark `after` or the newest row
    any finished policy job saw, whichever is later (None: everything is new)."""
    return max([t for t in (after, last_seen(registry)) if t is not None], default=None)


def day_of(*times: dt.datetime | None) -> str | None:
    """The UTC date (YYYY-MM-DD) of the latest of `times`: the first log partition to read."""
    bounds = [t for t in times if t is not None]
    return max(bounds).astimezone(dt.timezone.utc).strftime("%Y-%m-%d") if bounds else None


def split_new_rows(result: JobResult, rows: list[Dated], window: dict, registry: reg.Registry, *,
                   after, incremental: bool, min_new: int, heldout_fraction: float, noun: str,
                   empty_reason: str, wait: Callable[[list], str | None] | None = None
                   ) -> "data_mod.Split | None":
    """The train / held-out time split of `rows`, recorded in `result.data` with `window`; None
    (and `result` marked SKIPPED with the reason) when an incremental job has fewer than `min_new`
    rows newer than the last trained one, when `wait(rows)` says why it must wait (the season's
    next look, align/season.py), or when nothing is left to train on. Every rank decides alike
    (they all read the same files)."""
    if incremental:
        seen = newest_seen(registry, after)
        new = sum(1 for r in rows if seen is None or r.created_at > seen)
        window["new_rows"] = new
        if new < max(min_new, 1):
            result.status, result.data = SKIPPED, window
            result.reason = (f"{new} new {noun} since {data_mod.iso(seen) or 'the beginning'}; "
                             f"need {max(min_new, 1)}")
            return None
        reason = wait(rows) if wait is not None else None
        if reason is not None:
            result.status, result.data, result.reason = SKIPPED, window, reason
            return None
    split = data_mod.time_split(rows, heldout_fraction)
    result.data = dict(split.describe(), **window, total_rows=len(rows),
                       trained_until=data_mod.iso(max((r.created_at for r in split.train),
                                                      default=None)))
    if not split.train:
        result.status, result.reason = SKIPPED, empty_reason
        return None
    print(start_line(result, len(rows), len(split.train), len(split.heldout), noun,
                     last_pace(registry, result.method)), file=sys.stderr, flush=True)
    return split


def last_pace(registry: reg.Registry, method: str) -> tuple[int, float] | None:
    """(training rows, wall seconds) of the newest job of `method` on this registry that trained
    (a training summary, a start and an end), or None: what the next job's start line estimates
    its time from."""
    for job in reversed(job_history(registry)):
        if job.method != method or not (job.metrics or {}).get("training"):
            continue
        try:
            train = int((job.data or {}).get("rows", {}).get("train") or 0)
            started = data_mod.parse_time(job.started_at)
            finished = data_mod.parse_time(job.finished_at)
        except (InvalidArgument, AttributeError, TypeError, ValueError):  # not written by this code
            continue
        if train > 0 and started is not None and finished is not None and finished > started:
            return train, (finished - started).total_seconds()
    return None


def start_line(result: JobResult, found: int, train: int, heldout: int, noun: str,
               pace: tuple[int, float] | None = None) -> str:
    """The one line a job starts with: rows found, the split, base, method, and its rough time:
    at the `pace` (training rows, seconds) of the last such job on this registry, whole job
    included (`last_pace`), else from the rule of thumb that on a 2-core CPU the 135M default
    model trains about 1 row/s (a GPU is far faster)."""
    head = (f"align {result.method}: {found} {noun} found -> train {train} / held-out {heldout}, "
            f"base {result.base}; ")
    if pace is not None:
        rows, seconds = pace
        minutes = max(1, round(train * seconds / rows / 60))
        return (head + f"rough time ≈ {minutes} min, at the pace of the last {result.method} job "
                f"here ({rows} rows in {seconds / 60:.1f} min, the whole job)")
    minutes = max(1, round(train / 60))
    return (head + f"rough time ≈ {minutes} min per epoch on a small CPU for the default model "
            "(much less on a GPU)")


# ---------------------------------------------------------------------------------------------
# The job's steps


JobBody = Callable[[reg.Registry, str, bool], JobResult]


def run_locked(data_dir: str | Path, command: str, method: str, body: JobBody) -> JobResult:
    """`body(registry, job_id, main)` under the job lock, recorded as running, then its outcome
    (or failed) in the job history. Other ranks of `accelerate launch` only train:
    `body(registry, job_id, False)`, no lock, no record."""
    registry = reg.Registry(data_dir)
    job_id = new_job_id()
    if not is_main_process():
        return body(registry, job_id, False)
    with job_lock(registry):
        registry.cleanup_stages()
        record_job(registry, {"job_id": job_id, "status": RUNNING, "pid": os.getpid(),
                              "command": command, "method": method, "started_at": reg.utc_now()})
        before = set(registry.list_versions())
        fresh = not before  # a v0000 this job creates is undone if it fails
        try:
            result = body(registry, job_id, True)
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, KeyboardInterrupt):
                new = sorted(set(registry.list_versions()) - before - {reg.BASE_VERSION})
                reason = "interrupted (Ctrl-C): " + (f"published {', '.join(new)}" if new
                                                     else "nothing was published")
            if fresh and registry.discard_unused_base():
                reason += f"; removed the {reg.BASE_VERSION} this job had created"
            record_job(registry, {"job_id": job_id, "status": FAILED, "finished_at": reg.utc_now(),
                                  "reason": reason[:2000]})
            raise
        record_job(registry, dict(result.to_record(), finished_at=reg.utc_now()))
        return result


def resolve_base(registry: reg.Registry, base: str | None, model: str | None,
                 cache_dir: str | None, main: bool) -> str:
    """The policy version to start from (default: current). On first use the main process
    creates v0000 from `model` (default: the default model); once the registry has a base,
    `model` is ignored with a warning. Other ranks never create it."""
    if main:
        if not registry.list_versions():  # first use: v0000 from --model or the default model
            from prefloop.server.model.loader import resolve_model_dir
            registry.ensure_base(resolve_model_dir(model, cache_dir))
        elif model:
            log.warning("--model %s ignored: the registry in %s already has a base version",
                        model, registry.root)
    elif not registry.list_versions():
        raise FailedPrecondition("the registry has no v0000 yet: run `prefloop models init` "
                                 "once before a multi-process `accelerate launch` job")
    version = base or current_version(registry) or reg.BASE_VERSION
    manifest = registry.manifest(version)
    if manifest.kind != reg.KIND_POLICY:
        raise FailedPrecondition(f"base {version} is a {manifest.kind} model, not a policy")
    return version


def eval_device(choice: str | None) -> str:
    """The evaluation device: `choice`, else cuda if available, else cpu."""
    import torch
    return choice or ("cuda" if torch.cuda.is_available() else "cpu")


def publish(registry: reg.Registry, model, base_dir: Path, *, kind: str, method: str,
            parent: str, hyperparameters: dict, data: dict, metrics: dict, gate: dict | None,
            job_id: str, adapter=None) -> str:
    """Save `model` + the base's tokenizer files (tokenizer, chat template, generation config:
    every base file but weights and config) into a stage and publish it; the new version.
    `adapter` (a `LoraAdapter`): publish it over `parent` instead of `model`'s full weights
    (with the parent's config.json) — unless `parent` already ends a chain of
    `reg.MAX_ADAPTER_CHAIN` adapters, when the merged `model` is published in full. Full weights
    are stored in the dtype of the weights the chain of `parent` is rooted in (the served model's:
    a bfloat16 model's fine-tune takes half the disk of float32); the manifest records it."""
    if kind == reg.KIND_POLICY:
        model.config.use_cache = True  # training turned it off; serving wants it
    if adapter is not None:
        chain = len(registry.adapter_bases(parent))  # the adapters `parent` is made of (0: full)
        if chain >= reg.MAX_ADAPTER_CHAIN:
            log.info("%s ends a chain of %d adapters: publishing full weights", parent, chain)
            adapter = None
    with registry.stage() as stage:
        if adapter is not None:
            adapter.save(stage.path)
            shutil.copyfile(base_dir / "config.json", stage.path / "config.json")
        else:
            save_full_weights(model, stage.path, stored_weights_dtype(registry, parent))
        for p in base_dir.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors") and p.name not in _NOT_COPIED \
                    and p.name != reg.ADAPTER_CONFIG_FILE:
                shutil.copyfile(p, stage.path / p.name)
        for p in list(stage.path.iterdir()):  # save_pretrained extras we do not version
            if p.is_dir() or p.suffix not in reg.MODEL_FILE_SUFFIXES:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        manifest = stage.publish(kind=kind, method=method, parent=parent,
                                 hyperparameters=json_safe(hyperparameters),
                                 data=json_safe(data), metrics=json_safe(metrics),
                                 gate=json_safe(gate), job_id=job_id,
                                 adapter=adapter is not None)
    return manifest.version


def save_full_weights(model, folder: Path, dtype: str | None) -> None:
    """`model.save_pretrained` with the tensors (and config.json's dtype) in `dtype`; the model
    itself is left as it is (the job may still evaluate it)."""
    import torch

    if dtype is None or all(t.dtype == getattr(torch, dtype) or not t.is_floating_point()
                            for t in model.state_dict().values()):
        model.save_pretrained(str(folder), safe_serialization=True)
        return
    target = getattr(torch, dtype)
    converted: dict[int, torch.Tensor] = {}  # by storage: tied weights stay one tensor
    state = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t = converted.setdefault(t.data_ptr(), t.to(target))
        state[name] = t
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def stored_weights_dtype(registry: reg.Registry, version: str) -> str | None:
    """The dtype full weights over `version` are stored in: that of the full version its chain
    starts from (its manifest's record, else read from its files)."""
    bases = registry.adapter_bases(version)
    root = bases[-1] if bases else version  # the last base of a chain holds full weights
    return registry.manifest(root).dtype or reg.stored_dtype(registry.version_dir(root))


AUTO_AB_TRAFFIC = GateConfig().ab_traffic  # --promote-via auto: the share (--ab-traffic) an
# inconclusive but safe candidate gets by default


def inconclusive_but_safe(decision: GateDecision) -> bool:
    """A rejected candidate whose only failed check is the comparison with the current version
    (every other one passed: enough held-out units, KL to its base and to the root in bound, no
    degeneration), and not because it is measurably worse: the paired interval's upper end at or
    above 0.5 (what an A/B test at a small traffic share may settle: `--promote-via auto`). A
    candidate that ranks no held-out pair differently from the current version has changed
    nothing an A/B test could find, so it is not one."""
    failed = decision.failed_checks
    if decision.passed or not failed or decision.kind not in ("policy", "ppo"):
        return False
    if any(c.name != decision.metric for c in failed):
        return False
    paired = decision.paired
    if paired is not None and paired.wins + paired.losses == 0:
        return False
    worse = paired is not None and paired.upper is not None and paired.upper < 0.5
    margin = decision.margin
    worse = worse or (margin is not None and margin.upper is not None and margin.upper < 0)
    return not worse


def _start_auto_ab(result: JobResult, decision: GateDecision, registry: reg.Registry,
                   stated: GateConfig | None) -> JobResult:
    """`--promote-via auto` on an inconclusive but safe candidate: an A/B test at the stated
    `--ab-traffic` (else `AUTO_AB_TRAFFIC`) whose level is the share of the season's decision
    that the job's offline p-value leaves it (align/season.py; without a season, the A/B
    default)."""
    from prefloop.align.season import ab_confidence, ab_decision_number, offline_p_value
    from prefloop.server.ab import state as ab_state
    traffic = stated.ab_traffic if stated is not None else AUTO_AB_TRAFFIC
    futility = (stated or GateConfig()).ab_futility_win
    settings: dict = {"traffic": traffic, "futility_win": futility or None}
    k, offline_p = None, offline_p_value(decision)
    if stated is not None and decision.season_decision:
        k = ab_decision_number(stated, decision.season_decision)
        settings["confidence"] = ab_confidence(stated, decision.season_decision, offline_p)
    try:
        state = ab_state.start(registry, result.version, force=True, **settings)
    except FailedPrecondition as e:  # e.g. another test runs: the version stays published
        result.status = REJECTED
        result.reason += f"; inconclusive offline, and no A/B test could start: {e}"
        return result
    result.status = PUBLISHED
    if result.gate is not None and k is not None:
        result.gate.update(ab_decision=k, ab_confidence=state.confidence)
    share = (f" (its share for the offline p-value {offline_p:.3g})"
             if k == decision.season_decision else "")
    season = (f", the season's decision {k}{share} at confidence {state.confidence:.4g}"
              if k is not None else "")
    futile = (f"; it ends for futility if the candidate looks to win fewer than {futility:g} of "
              "the head-to-head votes" if futility else "")
    result.reason += (f"; inconclusive offline but safe: A/B test started against "
                      f"{state.control} at {traffic:.0%} traffic{season} (head-to-head "
                      f"votes and thumbs decide{futile}; `prefloop models ab status`)")
    return result


def conclude(result: JobResult, decision: GateDecision, registry: reg.Registry, job_id: str,
             method: str, *, promote: bool, promote_via: str = "gate",
             stated: GateConfig | None = None) -> JobResult:
    """After the gate (and publishing): promote if it passed and the job asked to — at once
    (`promote_via` "gate" and "auto") or by starting an online A/B test that live votes decide
    ("ab"); with "auto" an inconclusive but safe candidate (`inconclusive_but_safe`, published by
    the caller) starts an A/B test at `AUTO_AB_TRAFFIC` instead of being discarded —, set the
    status (promoted / published / rejected) and the gate's reasons. Such a test is the season's
    next decision (align/season.py): its confidence spends that decision's share of the `stated`
    gate level, and the gate record keeps its number. Frees the trained model's memory first (the
    caller has dropped its reference)."""
    gc.collect()
    result.reason = "; ".join(decision.reasons)
    if promote and promote_via == "auto" and result.version \
            and inconclusive_but_safe(decision):
        return _start_auto_ab(result, decision, registry, stated)
    if decision.passed and promote and promote_via == "ab":
        from prefloop.server.ab import state as ab_state
        state = ab_state.start(registry, result.version)
        result.status = PUBLISHED
        result.reason += (f"; A/B test started against {state.control} (live votes decide; "
                          "`prefloop models ab status`)")
    elif decision.passed and promote:
        registry.promote(result.version, reason=f"align job {job_id} ({method}): gate passed",
                         actor="align")
        result.status = PROMOTED
    else:
        result.status = PUBLISHED if decision.passed else REJECTED
    return result
