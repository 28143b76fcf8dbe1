"""The DPO / KTO / SFT job (`prefloop align dpo|kto|sft|run`): log -> time split -> train
(TRL) -> evaluate -> gate -> publish -> promote.

`run_job(JobConfig)` runs on the skeleton of align/jobs/runner.py (job lock and history, base
resolution, the new-rows split with the watermark of `align run`, publish, conclude). What is
its own: which rows it trains on (preference pairs for DPO, labelled answers for KTO, the
users' own and top-rated answers for SFT: `data.load_sft_examples`), the evaluation (train /
held-out metrics against the frozen reference; the candidate against the current version on
the same held-out pairs — for SFT the preference pairs of the held-out window) and the gate
(`gate.decide`: paired test, minimum held-out pairs, KL bound). A KTO job against the current
version can also train its older half first and have that checkpoint score the newer half,
evidence the gate's rating test joins (`--midpoint-test`, opt-in; align/train/midpoint.py).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefloop.align import data as data_mod
from prefloop.align.degeneration import Degeneration, degeneration_check
from prefloop.align.gate import GateConfig, GateDecision, decide, with_check, with_drift
from prefloop.align.jobs import runner
from prefloop.align.rating_test import balanced_pairs
from prefloop.align.season import ab_wait, decision_config, season_of, shares_with_ab, too_early, with_season
from prefloop.align.train.preference import TrainConfig
from prefloop.server import registry as reg
from prefloop.server.errors import InvalidArgument
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.rows import PreferencePair
from prefloop.server.feedback.voter_caps import DEFAULT_VOTER_CAP, VoterCap

log = logging.getLogger(__name__)
DEGENERATION_BATCH = 32  # prompts the degeneration check samples at once (16 by default)


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
    voter_cap: VoterCap | None = DEFAULT_VOTER_CAP  # each voter's share of the rows (None: all)
    heldout_fraction: float = 0.2
    promote: bool = False  # promote the candidate when the gate passes
    promote_via: str = "auto"  # gate: at once; ab: an A/B test instead; auto: gate, or A/B
    # when the offline evidence is inconclusive but the candidate safe (runner.conclude)
    keep_rejected: bool = True  # publish a candidate the gate rejected (marked rejected)
    eval_batch_size: int = 4
    max_train_eval: int = 16  # newest training rows scored for the train metrics (TRL logs its own)
    device: str | None = None  # evaluation device (default: cuda if available, else cpu)
    publish: str = "adapter"  # LoRA: publish the adapter, or "full" merged weights
    drop_looping: bool = True  # train no looping answer as a good one (data.without_looping_desirable)
    midpoint: bool = False  # kto: the midpoint test's evidence (align/train/midpoint.py)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.publish not in ("adapter", "full"):
            raise InvalidArgument(f"publish must be adapter or full, got {self.publish!r}")
        if self.base is not None:
            reg.version_number(self.base)
        if self.min_new < 0 or self.eval_batch_size < 1 or self.max_train_eval < 0:
            raise InvalidArgument("min-new, eval batch size and max-train-eval must be >= 0 / 1")
        if self.max_rows is not None and self.max_rows < 2:
            raise InvalidArgument("max pairs must be >= 2 (one to train on, one to hold out)")


# ---------------------------------------------------------------------------------------------
# The job


TrainFn = Callable[[Path, list, TrainConfig], Any]


def run_job(cfg: JobConfig, *, train_fn: TrainFn | None = None) -> runner.JobResult:
    """Run one job under the job lock (align/jobs/runner.py); see the module docstring."""
    return runner.run_locked(cfg.data_dir, cfg.command, cfg.train.method,
                      lambda registry, job_id, main: _run(cfg, registry, job_id, train_fn, main))


def _load_rows(cfg: JobConfig, registry: reg.Registry) -> tuple[list, dt.datetime | None]:
    after = runner.watermark(registry) if cfg.incremental else None
    if cfg.train.method == "dpo":
        rows = data_mod.load_pairs(cfg.data_dir, since=cfg.since, after=after,
                                   max_pairs=cfg.max_rows,
                                   pairs_from_ratings=cfg.pairs_from_ratings,
                                   voter_cap=cfg.voter_cap)
    elif cfg.train.method == "sft":
        rows = data_mod.load_sft_examples(cfg.data_dir, since=cfg.since, after=after,
                                          max_examples=cfg.max_rows, voter_cap=cfg.voter_cap)
    else:
        rows = data_mod.load_examples(cfg.data_dir, since=cfg.since, after=after,
                                      max_examples=cfg.max_rows, voter_cap=cfg.voter_cap)
    return rows, after


def _ratings_waiting(cfg: JobConfig, registry: reg.Registry, after: dt.datetime | None) -> str:
    """For a DPO job skipped for want of pairs: how many ratings (thumbs, stars) newer than any
    job has seen are waiting, and what trains on them ("" when none)."""
    seen = runner.newest_seen(registry, after)
    ratings = sum(1 for e in data_mod.load_examples(cfg.data_dir, since=cfg.since, after=seen,
                                                         voter_cap=cfg.voter_cap)
                  if e.source == "rating")
    if not ratings:
        return ""
    return (f"; {ratings} new rating{'s' if ratings != 1 else ''} (thumbs / stars) are waiting: "
            "`align run kto` trains on them, or `align run dpo --pairs-from-ratings` pairs "
            "differently rated answers to one prompt")


def _run(cfg: JobConfig, registry: reg.Registry, job_id: str, train_fn: TrainFn | None,
         main: bool) -> runner.JobResult:
    method = cfg.train.method
    base = runner.resolve_base(registry, cfg.base, cfg.model, cfg.cache_dir, main)
    result = runner.JobResult(job_id, runner.RUNNING, base=base, method=method)
    rows, after = _load_rows(cfg, registry)
    window = {"since_arg": cfg.since, "after_watermark": data_mod.iso(after)}
    season = season_of(registry, runner.current_version(registry))
    split = runner.split_new_rows(result, rows, window, registry, after=after, incremental=cfg.incremental,
                           min_new=cfg.min_new, heldout_fraction=cfg.heldout_fraction,
                           noun="pairs" if method == "dpo" else "examples",
                           empty_reason="no training rows in the window",
                           wait=lambda rows: (ab_wait(registry, cfg.promote, cfg.promote_via, season,
                                                     rows, cfg.gate.ab_span)
                                             or too_early(season, rows, cfg.gate.look_growth)))
    if split is None and result.status == runner.SKIPPED and method == "dpo" \
            and not cfg.pairs_from_ratings:
        result.reason += _ratings_waiting(cfg, registry, after)
    if split is None or _too_few_to_judge(cfg, split, result):
        return result
    base_dir = registry.version_dir(base)
    train_rows = split.train
    if cfg.drop_looping:
        train_rows, dropped = data_mod.without_looping_desirable(split.train)
        result.data["looping_desirable_dropped"] = dropped
        if not train_rows:
            result.status, result.reason = runner.SKIPPED, (
                f"every one of the {dropped} training rows trains a looping answer as a good "
                "one (--keep-looping trains on them)")
            return result
    scorer = _midpoint_scorer(cfg, registry, base, split, train_fn is None)
    if scorer is not None:
        train_rows = scorer.plan.rows  # the same rows, the older half first
    trl_rows = [r.to_trl() for r in train_rows]
    if train_fn is None:
        from prefloop.align.train.preference import train as train_fn
    started = time.perf_counter()
    trained = train_fn(base_dir, trl_rows, cfg.train,
                       **({"midpoint": scorer} if scorer is not None else {}))
    if not main or trained.model is None:
        result.status = runner.WORKER
        return result
    result.metrics["training"] = _training_summary(trained)
    seconds = {"load_and_train": time.perf_counter() - started}
    started = time.perf_counter()
    shares = shares_with_ab(cfg.gate, cfg.promote, cfg.promote_via)
    decision = with_season(_evaluate(cfg, registry, base, base_dir, trained, split, result,
                                     decision_config(cfg.gate, season.next_decision, shares),
                                     scorer),
                           season, cfg.gate, shares)
    seconds["score"] = time.perf_counter() - started
    result.metrics["seconds"] = {k: round(v, 1) for k, v in seconds.items()} | \
        result.metrics.get("seconds", {})
    result.gate = decision.to_record()
    if decision.passed or cfg.keep_rejected or (
            cfg.promote and cfg.promote_via == "auto" and runner.inconclusive_but_safe(decision)):
        hyper = dict(cfg.train.to_dict(), heldout_fraction=cfg.heldout_fraction,
                     gate=dataclasses.asdict(cfg.gate), pairs_from_ratings=cfg.pairs_from_ratings,
                     drop_looping=cfg.drop_looping, midpoint=cfg.midpoint,
                     max_rows=cfg.max_rows,
                     voter_cap=dataclasses.asdict(cfg.voter_cap) if cfg.voter_cap else None)
        adapter = getattr(trained, "adapter", None) if cfg.publish == "adapter" else None
        result.version = runner.publish(registry, trained.model, base_dir, kind=reg.KIND_POLICY,
                                 method=method, parent=base, hyperparameters=hyper,
                                 data=result.data, metrics=result.metrics, gate=result.gate,
                                 job_id=job_id, adapter=adapter)
    del trained
    return runner.conclude(result, decision, registry, job_id, method, promote=cfg.promote,
                           promote_via=cfg.promote_via, stated=cfg.gate)


def _midpoint_scorer(cfg: JobConfig, registry: reg.Registry, base: str, split,
                     real_training: bool):
    """The midpoint test's scorer (align/train/midpoint.py) for a KTO job that trains in one
    process against the current version (the moves it scores are the gate's); else None."""
    if not (cfg.midpoint and real_training and cfg.train.method == "kto"):
        return None
    if runner.current_version(registry) not in (None, base):
        log.info("no midpoint test: the current version is not the job's base %s", base)
        return None
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.warning("the midpoint test runs in one process only: the gate reads the held-out "
                    "answers alone")
        return None
    from prefloop.align.train.midpoint import MidpointScorer, plan
    halves = plan(split.train, drop_looping=cfg.drop_looping, seed=cfg.train.seed)
    if halves is None:
        return None
    return MidpointScorer(halves, cfg.train.batch_size * cfg.train.grad_accum,
                          cfg.train.max_length, cfg.eval_batch_size)


def _too_few_to_judge(cfg: JobConfig, split, result: runner.JobResult) -> bool:
    """A DPO or KTO job whose held-out pairs (KTO: `data.example_pairs` of its held-out answers,
    or the balanced pairs its rated answers weigh as, `gate.enough_rated`) are fewer than the
    gate's minimum is rejected whatever it trains, and without
    --keep-rejected nothing of it is kept: skip before loading a model (`result` SKIPPED with
    what is missing). The feedback stays for the next job."""
    method, need = cfg.train.method, cfg.gate.min_heldout
    if method not in ("dpo", "kto") or cfg.keep_rejected:
        return False
    have = (len(split.heldout) if method == "dpo"
            else len(data_mod.example_pairs(split.heldout)[0]))
    weight = (balanced_pairs([bool(r.label) for r in split.heldout],
                             [logschema.prompt_fingerprint(None, r.prompt) for r in split.heldout])
              if method == "kto" and cfg.gate.rating_test_decides() else 0.0)  # gate.enough_rated
    if max(have, weight) >= need:
        return False
    total, fraction = len(split.train) + len(split.heldout), cfg.heldout_fraction
    if method == "dpo":
        more = (f"about {max(1, math.ceil((need - 0.5) / fraction) - total)} more votes, or "
                if fraction > 0 else "")  # round(fraction * n) held out (data.time_split)
        what = f"this window holds {have} (of {total})"
    else:
        ups = sum(1 for r in split.heldout if r.label)
        more = ("more feedback (the rarer of up and down counts most: lone thumbs weigh about "
                "2·up·down/(up + down)), or " if fraction > 0 else "")
        what = (f"the window's {len(split.heldout)} held-out answers ({ups} up, "
                f"{len(split.heldout) - ups} down) make {have}"
                + (f" and the rating test weighs them as {weight:.1f}" if weight > have else ""))
    result.status = runner.SKIPPED
    result.reason = (f"the gate needs >= {need} held-out pairs and {what}: {more}raise "
                     f"--heldout-fraction (now {fraction}) or lower --min-heldout-pairs; nothing "
                     "was trained (--keep-rejected trains anyway)")
    print(f"align {method}: skipped: {result.reason}", file=sys.stderr, flush=True)
    return True


def _training_summary(trained) -> dict[str, Any]:
    last = next((h for h in reversed(trained.log_history) if "loss" in h), {})
    out = dict(runner.training_summary(trained),
               last_log={k: v for k, v in last.items() if isinstance(v, (int, float))})
    if getattr(trained, "kl_stop", None) is not None:
        out["kl_stop"] = trained.kl_stop.to_record()
    if getattr(trained, "kto_weights", None) is not None:
        out["kto_weights"] = list(trained.kto_weights)
    for name in ("unlikelihood", "liked_nll"):  # extra KTO terms (align/train/kto_terms.py)
        terms = [h[name] for h in trained.log_history if name in h]
        if terms:
            out[name] = {"mean": round(sum(terms) / len(terms), 5), "steps": len(terms)}
    return out


def _sft_gate_pairs(cfg: JobConfig, split: data_mod.Split, after) -> list[PreferencePair]:
    """An SFT job's gate pairs: the log's preference pairs (and rating pairs) of the held-out
    window, less those whose chosen answer the job trained on."""
    if split.cutoff is None:
        return []
    trained = {data_mod.answer_key(r.prompt, r.text) for r in split.train}
    pairs = data_mod.load_pairs(cfg.data_dir, since=split.cutoff, after=after,
                                pairs_from_ratings=True, voter_cap=cfg.voter_cap)
    return [p for p in pairs if data_mod.answer_key(p.prompt, p.chosen_text) not in trained]


def _evaluate(cfg: JobConfig, registry: reg.Registry, base: str, base_dir: Path, trained,
              split: data_mod.Split, result: runner.JobResult,
              gate_config: GateConfig, scorer=None) -> GateDecision:
    """Train / held-out metrics of the candidate against its reference; the candidate against
    the current version on the same held-out pairs (paired counts, align/gate.py); its KL to the
    root version and whether it degenerates; the gate.

    The candidate's scores come from `trained.model` (the weights just trained); the current
    version's from the reference pass when it is the base, else from its own registry folder."""
    from prefloop.align import evaluate as ev
    from prefloop.align.train.common import load_causal_lm

    dev = runner.eval_device(cfg.device)
    tok, tc = trained.tokenizer, cfg.train
    policy = trained.model.to(dev)
    reference = load_causal_lm(base_dir, dev)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=tc.max_length)
    train_rows = split.train[-cfg.max_train_eval:] if cfg.max_train_eval else []
    current = runner.current_version(registry)
    pair_kw = dict(beta=tc.beta, loss_type=tc.loss if tc.method == "dpo" else "sigmoid",
                   label_smoothing=tc.label_smoothing if tc.method == "dpo" else 0.0)
    example_scores, index_pairs = None, []
    if tc.method == "dpo":
        gate_pairs = split.heldout
        if train_rows:
            result.metrics["train"] = ev.pair_metrics(ev.score_pairs(
                policy, tok, train_rows, reference=reference, progress="scoring train pairs",
                **kw), **pair_kw)
        basis = "held-out preference pairs"
        heldout: dict[str, Any] = {}
    elif tc.method == "sft":
        if train_rows:
            result.metrics["train"] = ev.sft_metrics(ev.score_examples(
                policy, tok, train_rows, reference=reference, progress="scoring train examples",
                **kw))
        heldout = {"sft": ev.sft_metrics(ev.score_examples(
            policy, tok, split.heldout, reference=reference,
            progress="scoring held-out examples", **kw))} if split.heldout else {}
        gate_pairs = _sft_gate_pairs(cfg, split, runner.watermark(registry)
                                     if cfg.incremental else None)
        basis = "preference pairs of the held-out window (chosen answers not trained on)"
    else:  # kto: every held-out example, paired within its prompt or across prompts
        labels = [bool(r.label) for r in split.heldout]
        if train_rows:
            result.metrics["train"] = ev.example_metrics(ev.score_examples(
                policy, tok, train_rows, reference=reference, progress="scoring train examples",
                **kw), [bool(r.label) for r in train_rows], beta=tc.beta)
        example_scores = ev.score_examples(policy, tok, split.heldout, reference=reference,
                                           progress="scoring held-out examples", **kw)
        heldout = ev.example_metrics(example_scores, labels, beta=tc.beta)
        index_pairs, same_prompt = data_mod.example_pairs(split.heldout)
        gate_pairs = []
        basis = (f"(desirable, undesirable) held-out answers: {same_prompt} pairs of the same "
                 f"prompt, {len(index_pairs) - same_prompt} matched across prompts; the "
                 f"randomization test: all {len(split.heldout)} answers")
    outcomes: dict[str, Any] = {}
    if gate_pairs:
        held = ev.score_pairs(policy, tok, gate_pairs, reference=reference,
                              progress="scoring held-out pairs", **kw)
        heldout.update(ev.pair_metrics(held, **pair_kw))
        current_scores = (ev.Scores(held.ref_logps, held.tokens) if current in (None, base)
                          else _current_scores(cfg, registry, current, tok, gate_pairs, None,
                                               dev))
        outcomes = ev.paired_pair_outcomes(held, current_scores, beta=tc.beta)
        current_accuracy = ev.preference_accuracy(
            *(s.logps / s.tokens.clamp(min=1)
              for s in ev.split_pair_scores(current_scores)))
        heldout_units = len(gate_pairs)
    elif example_scores is not None and index_pairs:
        current_scores = (ev.Scores(example_scores.ref_logps, example_scores.tokens)
                          if current in (None, base)
                          else _current_scores(cfg, registry, current, tok, None, split.heldout,
                                               dev))
        outcomes = ev.indexed_pair_outcomes(example_scores, current_scores, index_pairs,
                                            beta=tc.beta)
        moves = (example_scores.logps - current_scores.logps).tolist()  # summed: rating_test
        outcomes["ratings"] = (moves, [bool(r.label) for r in split.heldout],
                               [logschema.prompt_fingerprint(None, r.prompt)
                                for r in split.heldout])
        heldout["pref_accuracy"] = ev.indexed_pair_accuracy(example_scores, index_pairs)
        current_accuracy = ev.indexed_pair_accuracy(current_scores, index_pairs)
        heldout_units = len(index_pairs)
    else:
        current_accuracy, heldout_units = None, 0
    heldout.setdefault("pairs", heldout_units)
    root = runner.root_version(registry, base)
    if root == base:  # the reference is the root: the KL above is the drift
        kl_to_root = heldout.get("kl_per_token")
    else:
        kl_to_root = _kl_to(cfg, registry.version_dir(root), policy, tok,
                            gate_pairs or None, None if gate_pairs else split.heldout, dev)
    heldout["kl_to_root_per_token"], heldout["root_version"] = kl_to_root, root
    prompts = distinct_prompts([p.prompt for p in gate_pairs] or [r.prompt for r in split.heldout],
                                gate_config.degeneration_prompts)
    degeneration = shift = None
    if prompts:
        started = time.perf_counter()
        current_model = (reference if current in (None, base)
                         else load_causal_lm(registry.version_dir(current), dev))
        degeneration, written = _degeneration(policy, current_model, tok, prompts, gate_config,
                                              tc.bf16)
        shift = _shift_evidence(tok, written, gate_pairs, split.heldout if example_scores
                                is not None else [])
        result.metrics["degeneration"] = degeneration.to_record()
        del current_model
        result.metrics["seconds"] = {"degeneration": round(time.perf_counter() - started, 1)}
    for key in ("implicit_reward_accuracy", "implicit_reward_margin"):
        if key in outcomes:
            heldout[f"{key}_vs_current"] = outcomes[key]
    result.metrics["heldout"] = heldout
    result.metrics["gate_basis"] = basis
    del reference
    result.metrics["current"] = {"version": current, "heldout_pref_accuracy": current_accuracy}
    policy.to("cpu")
    midpoint = _midpoint_evidence(scorer, getattr(trained, "midpoint", None), result)
    decision = decide(implicit=outcomes.get("implicit"), accuracy=outcomes.get("accuracy"),
                      candidate_accuracy=heldout.get("pref_accuracy"),
                      current_accuracy=current_accuracy, current_version=current,
                      kl_per_token=heldout.get("kl_per_token"), heldout_pairs=heldout_units,
                      config=gate_config, margins=outcomes.get("margins"),
                      ratings=outcomes.get("ratings"), answer_shift=shift,
                      midpoint=midpoint if outcomes.get("ratings") else None)
    decision = with_drift(decision, kl_to_root, root, gate_config)
    if degeneration is not None:
        decision = with_check(decision, degeneration_check(degeneration,
                                                           max_own_kl=gate_config.max_kl))
    return decision


def _midpoint_evidence(scorer, record, result: runner.JobResult):
    """The gate's `midpoint` argument from what the scorer measured (None when it did not
    score: the older half filled no optimizer step), recorded in the job's metrics either
    way."""
    if scorer is None:
        return None
    plan = scorer.plan
    result.metrics["midpoint"] = {"older_rows": plan.older_rows, "newer_rows": len(plan.scored),
                                  "trained_share": round(plan.trained_share, 4),
                                  "planned_step": scorer.step}
    if record is None:
        result.metrics["midpoint"]["scored"] = 0
        return None
    result.metrics["midpoint"] |= record.to_record()
    return (record.moves, [bool(r.label) for r in plan.scored],
            [logschema.prompt_fingerprint(None, r.prompt) for r in plan.scored],
            plan.weight_share(record))


def distinct_prompts(prompts: list[list[dict]], limit: int) -> list[list[dict]]:
    """The newest `limit` distinct prompts of `prompts` (oldest first)."""
    seen, out = set(), []
    for p in reversed(prompts):
        key = logschema.prompt_fingerprint(None, p)
        if key not in seen and len(out) < limit:
            seen.add(key)
            out.append(p)
    return out[::-1]


def _shift_evidence(tok, written: tuple[list[str], list[str]], pairs: list,
                    examples: list):
    """The answer-shift test's evidence (align/answer_shift.py): the shift between the two
    versions' `written` answers, and the held-out answers it scores — every rated answer of a
    KTO job (grouped by prompt), or both sides of each held-out pair (a pair is its own group,
    so shuffling its labels swaps them). The shift's test is reported beside the verdict; it
    decides nothing (since 2026-12-06). None when there is nothing to score."""
    from prefloop.align.answer_shift import AnswerShift, ShiftEvidence, token_text
    if pairs:
        texts = [t for p in pairs for t in (p.chosen_text, p.rejected_text)]
        labels = [True, False] * len(pairs)
        groups = [str(i // 2) for i in range(len(texts))]
    elif examples:
        texts = [r.text for r in examples]
        labels = [bool(r.label) for r in examples]
        groups = [logschema.prompt_fingerprint(None, r.prompt) for r in examples]
    else:
        return None
    ids = tok([*written[0], *written[1], *texts], add_special_tokens=False).input_ids
    n = len(written[0])
    shift = AnswerShift.of(ids[:n], ids[n:2 * n], len(tok))
    return ShiftEvidence(shift, ids[2 * n:], labels, groups, shift.describe_top(token_text(tok)))


def _degeneration(policy, current_model, tok, prompts: list[list[dict]], gate_config: GateConfig,
                  bf16: bool | None = None):
    """Both versions answer `prompts` (same seeds, temperature 0.7: the page's default), under
    bf16 autocast where training would use it (`use_bf16`: a 1.4x shorter check on this CPU; the
    check counts loops and words, and both versions sample in the same precision), up to
    `DEGENERATION_BATCH` prompts a batch (a decoding step reads every weight whatever the batch,
    so one batch of 16 costs about what one of 8 did). Returns the summary and the two versions'
    answers (candidate's, current's), which the answer-shift test reads."""
    import torch

    from prefloop.align.train.common import use_bf16
    from prefloop.align.train.ppo import sample_texts
    kw = dict(max_new_tokens=gate_config.degeneration_tokens, temperature=0.7, seed=0,
              batch_size=max(1, min(len(prompts), DEGENERATION_BATCH)))
    device = next(policy.parameters()).device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16,
                              enabled=use_bf16(bf16, cpu_native=True) and device in ("cpu", "cuda"))
    was_training = policy.training
    policy.eval()
    try:
        with autocast:
            candidate = sample_texts(policy, tok, prompts, **kw)
            current = sample_texts(current_model, tok, prompts, **kw)
        return (Degeneration.of(candidate, current,
                                own_answer_kl(policy, current_model, tok, prompts, candidate),
                                prompts),
                (candidate, current))
    finally:
        policy.train(was_training)


def own_answer_kl(policy, current_model, tok, prompts: list[list[dict]],
                  answers: list[str]) -> float | None:
    """The exact per-token KL(policy ‖ current) at every prefix of `answers` (the policy's own
    samples), per answer token: align/degeneration.py. Each answer is scored as written (no
    end-of-turn token appended: it may have been cut at the length limit)."""
    from prefloop.align import evaluate as ev
    items = [ev.encode(tok, p, [{"role": "assistant", "content": a}], 4096, cut=True)
             for p, a in zip(prompts, answers) if a]
    if not items:
        return None
    scores = ev.score_encoded(policy, tok, items, reference=current_model, batch_size=8)
    return float(scores.kl_sum.sum() / scores.tokens.sum().clamp(min=1))


def _kl_to(cfg: JobConfig, root_dir: Path, policy, tok, pairs: list | None,
           examples: list | None, device: str) -> float | None:
    """The candidate's KL per completion token to the model in `root_dir` on the held-out pairs
    (or examples): one more reference pass over what the gate judged."""
    from prefloop.align import evaluate as ev
    from prefloop.align.train.common import load_causal_lm

    if not pairs and not examples:
        return None
    root = load_causal_lm(root_dir, device)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.train.max_length, reference=root,
              progress="KL to the root version")
    try:
        scores = (ev.score_pairs(policy, tok, pairs, **kw) if pairs
                  else ev.score_examples(policy, tok, examples, **kw))
    finally:
        del root
    return ev.kl_metrics(scores).get("kl_per_token")


def _current_scores(cfg: JobConfig, registry: reg.Registry, current: str, tok,
                    gate_pairs: list | None, examples: list | None, device: str):
    """The current version's scores (its own weights, from its registry folder) on the gate's
    pairs, or on the held-out examples (KTO without same-prompt pairs)."""
    from prefloop.align import evaluate as ev
    from prefloop.align.train.common import load_causal_lm

    model = load_causal_lm(registry.version_dir(current), device)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.train.max_length)
    try:
        if gate_pairs is not None:
            return ev.score_pairs(model, tok, gate_pairs,
                                  progress=f"scoring held-out pairs with {current}", **kw)
        return ev.score_examples(model, tok, examples, **kw)
    finally:
        del model
