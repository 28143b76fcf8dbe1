"""The PPO job (`prefloop align ppo`, `prefloop align run --method ppo`): prompts of the log ->
time split -> `train.ppo.train_ppo` against a reward model -> answers of the candidate and of the
current version sampled on the held-out prompts (same seeds), scored by the reward model: per
prompt a win, loss or tie for the candidate; the candidate's KL to its base -> `gate.ppo_gate`
(the reward model's win rate with an interval, minimum held-out prompts, KL bound) -> publish
(kind "policy", method "ppo") -> promote.

It runs on the skeleton of align/jobs/runner.py (job lock and history, base resolution, split,
publish, conclude). The prompts are every distinct prompt of `generations` and of explicit
preferences, dated by its first appearance; the incremental form (`align run --method ppo`) takes
the prompts newer than the watermark. Per-step metrics (and, with `plot`, a PNG of reward and KL)
go to `<data-dir>/align-runs/<job id>/`.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from prefloop.align import data as data_mod
from prefloop.align.gate import GateConfig, GateDecision, Paired, ppo_gate, with_drift
from prefloop.align.jobs import runner
from prefloop.align.jobs.reward import reward_model_version
from prefloop.align.season import ab_wait, decision_config, season_of, shares_with_ab, too_early, with_season
from prefloop.align.train.ppo import PPOConfig
from prefloop.server import registry as reg
from prefloop.server.errors import InvalidArgument
from prefloop.server.feedback import export as log_export
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.voter_caps import DEFAULT_VOTER_CAP, cap_voters

log = logging.getLogger(__name__)

RUNS_DIR = "align-runs"  # <data-dir>/align-runs/<job_id>/ppo_metrics.jsonl, ppo_curves.png


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
    promote_via: str = "auto"  # gate | ab | auto (runner.conclude)
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


@dataclass(slots=True, frozen=True)
class PromptRow:
    """A distinct prompt of the log, dated by its first appearance (PPO's training row)."""

    prompt: list[dict[str, str]]
    created_at: dt.datetime
    fingerprint: str

    @property
    def feedback_id(self) -> str:  # the tie-break key of the time split and window (rows.Dated)
        return self.fingerprint


def capped(rows: list[dict]) -> list[dict]:
    """`rows` in time order with each user's (or session's) share cut to the default voter cap."""
    rows = sorted(rows, key=lambda r: r["created_at"])
    return cap_voters(rows, DEFAULT_VOTER_CAP)[0]


def load_prompts(data_dir: str | Path, *, since: str | None = None,
                 after: dt.datetime | None = None, max_prompts: int | None = None
                 ) -> list[PromptRow]:
    """Distinct prompts of the log (generations, and explicit preferences' prompt messages),
    each dated by its first appearance, oldest first; no user gives more than the voter cap."""
    since_t = data_mod.parse_time(since)
    day = runner.day_of(since_t)  # not `after`: a prompt first seen before it must keep its first date
    first: dict[str, PromptRow] = {}

    def add(fingerprint: str | None, messages: list[dict], created_at: dt.datetime) -> None:
        if not messages or not any(m.get("content") for m in messages):
            return
        fingerprint = fingerprint or logschema.prompt_fingerprint(None, messages)
        seen = first.get(fingerprint)
        if seen is None or created_at < seen.created_at:
            first[fingerprint] = PromptRow(messages, created_at, fingerprint)

    who = ["user_id", "session_id"]  # each voter capped (voter_caps.py), as every training read
    gens = log_export.load_table(data_dir, logschema.GENERATIONS, since=day,
                                 columns=["prompt", "messages", "prompt_fingerprint", "created_at", *who])
    for g in capped(gens.to_pylist()):
        add(g["prompt_fingerprint"], logschema.prompt_as_messages(g["prompt"], g["messages"]),
            g["created_at"])
    fb = log_export.load_table(data_dir, logschema.FEEDBACK, since=day,
                               columns=["prompt_messages", "prompt_fingerprint", "created_at", *who])
    for f in capped(fb.to_pylist()):
        if f["prompt_messages"]:
            add(f["prompt_fingerprint"], f["prompt_messages"], f["created_at"])
    return data_mod.window_rows(list(first.values()), since_t, after, max_prompts)


def run_ppo_job(cfg: PPOJobConfig, *, train_fn=None) -> runner.JobResult:
    """Train, evaluate, gate, publish (and promote) one PPO candidate under the job lock."""
    return runner.run_locked(cfg.data_dir, cfg.command, "ppo",
                      lambda registry, job_id, main: _run_ppo(cfg, registry, job_id, train_fn,
                                                              main))


def _run_ppo(cfg: PPOJobConfig, registry: reg.Registry, job_id: str, train_fn, main: bool
             ) -> runner.JobResult:
    from prefloop.align.train.ppo import plot_metrics
    base = runner.resolve_base(registry, cfg.base, cfg.model, cfg.cache_dir, main)
    rm_dir = reward_model_version(registry, cfg.rm, cfg.force_rm)
    result = runner.JobResult(job_id, runner.RUNNING, base=base, method="ppo")
    after = runner.watermark(registry) if cfg.incremental else None
    rows = load_prompts(cfg.data_dir, since=cfg.since, after=after, max_prompts=cfg.max_prompts)
    window = {"since_arg": cfg.since, "after_watermark": data_mod.iso(after), "rm": cfg.rm}
    season = season_of(registry, runner.current_version(registry))
    split = runner.split_new_rows(result, rows, window, registry, after=after, incremental=cfg.incremental,
                           min_new=cfg.min_new, heldout_fraction=cfg.heldout_fraction,
                           noun="prompts", empty_reason="no prompts in the window",
                           wait=lambda rows: (ab_wait(registry, cfg.promote, cfg.promote_via, season,
                                                     rows, cfg.gate.ab_span)
                                             or too_early(season, rows, cfg.gate.look_growth)))
    if split is None:
        return result
    base_dir = registry.version_dir(base)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else cfg.data_dir / RUNS_DIR / job_id
    metrics_path = out_dir / "ppo_metrics.jsonl"
    if train_fn is None:
        from prefloop.align.train.ppo import train_ppo as train_fn
    trained = train_fn(base_dir, rm_dir, [r.prompt for r in split.train], cfg.ppo,
                       metrics_path=metrics_path, progress=cfg.progress)
    if not main or trained.model is None:
        result.status = runner.WORKER
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
    shares = shares_with_ab(cfg.gate, cfg.promote, cfg.promote_via)
    gate_config = decision_config(cfg.gate, season.next_decision, shares)
    decision = with_season(_evaluate_ppo(cfg, registry, base, base_dir, rm_dir, trained, split,
                                         result, gate_config), season, cfg.gate, shares)
    result.gate = decision.to_record()
    if decision.passed or cfg.keep_rejected or (
            cfg.promote and cfg.promote_via == "auto" and runner.inconclusive_but_safe(decision)):
        hyper = dict(cfg.ppo.to_dict(), rm=cfg.rm, heldout_fraction=cfg.heldout_fraction,
                     eval_samples=cfg.eval_samples, gate=dataclasses.asdict(cfg.gate),
                     max_prompts=cfg.max_prompts)
        result.version = runner.publish(registry, trained.model, base_dir, kind=reg.KIND_POLICY,
                                 method="ppo", parent=base, hyperparameters=hyper,
                                 data=result.data, metrics=result.metrics, gate=result.gate,
                                 job_id=job_id)
    del trained
    return runner.conclude(result, decision, registry, job_id, "ppo", promote=cfg.promote,
                           promote_via=cfg.promote_via, stated=cfg.gate)


def _evaluate_ppo(cfg: PPOJobConfig, registry: reg.Registry, base: str, base_dir: Path,
                  rm_dir: Path, trained, split: data_mod.Split, result: runner.JobResult,
                  gate_config: GateConfig) -> GateDecision:
    from prefloop.align.train.common import load_causal_lm, load_tokenizer
    from prefloop.align.train.ppo import evaluate_policy
    from prefloop.align.train.reward import load_reward_model
    device = runner.eval_device(cfg.device)
    heldout = [r.prompt for r in split.heldout[-cfg.max_heldout:]]
    tokenizer = trained.tokenizer
    rm, rm_tok = load_reward_model(rm_dir, device), load_tokenizer(rm_dir)
    reference = load_causal_lm(base_dir, device)
    kw = dict(max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature,
              samples=cfg.eval_samples, seed=cfg.ppo.seed, batch_size=cfg.eval_batch_size,
              max_prompt_length=cfg.ppo.max_prompt_length)
    policy = trained.model.to(device)
    candidate = evaluate_policy(policy, reference, rm, tokenizer, rm_tok, heldout,
                                progress="evaluating the candidate", **kw)
    root = runner.root_version(registry, base)
    if root == base:  # the reference is the root: the KL above is the drift
        kl_to_root = candidate.get("kl_per_token")
    else:  # the same seeded answers, KL to the root's next-token distributions
        root_model = load_causal_lm(registry.version_dir(root), device)
        kl_to_root = evaluate_policy(policy, root_model, rm, tokenizer, rm_tok, heldout,
                                     progress=f"KL to the root {root}", **kw).get("kl_per_token")
        del root_model
    candidate["kl_to_root_per_token"], candidate["root_version"] = kl_to_root, root
    policy.to("cpu")
    current = runner.current_version(registry)
    if current is None or current == base:
        current_eval = evaluate_policy(reference, reference, rm, tokenizer, rm_tok, heldout,
                                       progress=f"evaluating {base}", **kw)
    else:
        current_model = load_causal_lm(registry.version_dir(current), device)
        current_eval = evaluate_policy(current_model, reference, rm, tokenizer, rm_tok, heldout,
                                       progress=f"evaluating {current}", **kw)
        del current_model
    del reference, rm
    per_prompt = per_prompt_outcomes(candidate.pop("rewards", []),
                                     current_eval.pop("rewards", []), cfg.eval_samples)
    result.metrics["heldout"] = candidate
    result.metrics["current"] = dict(current_eval, version=current)
    return with_drift(ppo_gate(
        per_prompt=per_prompt, candidate_reward=candidate.get("reward"),
        current_reward=current_eval.get("reward"), current_version=current,
        kl_per_token=candidate.get("kl_per_token"), heldout_prompts=len(heldout),
        config=gate_config), kl_to_root, root, gate_config)


def per_prompt_outcomes(candidate: list[float], current: list[float], samples: int
                        ) -> Paired | None:
    """Per held-out prompt, the reward model's mean score of the candidate's answers minus the
    current version's (same seeds): a win, a loss or a tie. None without rewards."""
    if not candidate or len(candidate) != len(current):
        return None
    diffs = [sum(candidate[i:i + samples]) / samples - sum(current[i:i + samples]) / samples
             for i in range(0, len(candidate), samples)]
    return Paired.from_differences(diffs, 1e-9)
