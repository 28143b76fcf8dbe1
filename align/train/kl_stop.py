"""A step that fits the evidence: stop a DPO / KTO run once the policy has moved as far from its
reference as the gate allows a candidate to go, whatever the learning rate would do next.

A fixed learning rate moves a weak preference by hundredths of a nat per token and a strong or
repeated one (the same edit many times, thumbs that all say the same) past the gate's KL bound,
after which the whole job is thrown away. `KLStop` measures the exact KL(policy ‖ reference) per
answer token — the number the gate checks, on a fixed probe of training answers (the newest
8, at most about 1,000 answer tokens: `probe_items`) — every `every` optimizer steps, and ends
training when it reaches `target` (by default half the gate's bound: held-out answers move less
than trained ones, and the rest is headroom). The reference is the LoRA policy with its adapter
switched off (the default), or the frozen copy of a full fine-tune. Each check is one forward
pass of the policy over the probe (no gradients; the frozen reference's hidden states on it are
computed at the first check and kept); its time counts in the job's training time.

It also **paces** the run (`max_scale` > 1): at each check it projects the KL the run would end
at if the learning rate kept its schedule — the distance from the reference grows with the
learning rate spent, and the KL with the square of the distance — and, when that projection falls
short of `PACE_AIM` of the pace KL (`pace_kl`, or the target where that is lower), multiplies the
rest of the schedule by what would reach it (at most `PACE_GAIN` per check, `max_scale` in all);
when it projects past that aim, it takes back what it had added, down to the set schedule and
never under it unless `min_scale` < 1 (`--min-lr-scale`, opt-in) lets it slow the set schedule
too. A weak preference then moves a tenth of a nat per token instead of hundredths, in the same
number of steps (no extra epochs, no extra minutes), and a strong one reaches the target and stops
as before. The pace KL sits under the stop because the KL budget is not a quality budget: six of
the seven paced runs that ended past about 0.12 nats/token wrote answers that left their topic,
and the seventh gained nothing (docs/loop_benchmark.md, "Pacing's aim" and "fresh split 18").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from prefloop.align.evaluate import encode, score_encoded

log = logging.getLogger(__name__)

PROBE_ANSWERS = 8  # the newest training answers the probe holds, at most
# ... and at most this many answer tokens after its newest answer: what 8 answers hold at the
# 128-token length pacing was tuned at (677-1,023 tokens on seeds 18-19), so at the server's 256 a
# check scores 5 or 6 answers in the time 8 shorter ones took, not 8 whole ones (1,385 tokens)
PROBE_TOKENS = 1024
PACE_AIM = 0.8  # pacing aims the run's end at this share of the target (the stop catches overshoot)
PACE_GAIN = 2.0  # the most one check multiplies the learning rate by


@dataclass(slots=True)
class KLRecord:
    """What the callback saw: (step, KL per token, learning-rate multiplier from then on) of every
    check, and the step it stopped at (None: the run ended on its own)."""

    target: float
    max_scale: float = 1.0
    pace_kl: float | None = None
    min_scale: float = 1.0
    checks: list[tuple[int, float, float]] = field(default_factory=list)
    stopped_at: int | None = None

    @property
    def latest_kl(self) -> float:
        """The last check's KL per token (0 before the first: the policy starts as its reference)."""
        return self.checks[-1][1] if self.checks else 0.0

    @property
    def lr_scale(self) -> float:
        """The learning-rate multiplier the run ended with (1: never paced up)."""
        return self.checks[-1][2] if self.checks else 1.0

    def to_record(self) -> dict[str, Any]:
        return {"target": self.target, "stopped_at_step": self.stopped_at,
                "max_lr_scale": self.max_scale, "pace_kl": self.pace_kl,
                "min_lr_scale": self.min_scale,
                "lr_scale": round(self.lr_scale, 4),
                "checks": [[s, round(k, 5), round(g, 4)] for s, k, g in self.checks]}


def pace_gain(kl: float, target: float, spent: float, remaining: float,
              floor: float = 1.0) -> float:
    """By how much to multiply the rest of the learning-rate schedule so that a run that has
    spent `spent` (sum of the rates of its steps so far) and reached `kl` ends near `PACE_AIM` ×
    `target`, if the KL grows with the square of the rate spent: the distance still wanted is
    spent·(sqrt(aim·target / kl) − 1), `remaining` at the present rate. Between `floor` (1: never
    down; 1/multiplier so far: back to the set schedule at most) and `PACE_GAIN`."""
    if spent <= 0 or remaining <= 0:
        return 1.0
    if kl <= 0:
        return PACE_GAIN
    wanted = spent * (((PACE_AIM * target) / kl) ** 0.5 - 1.0)
    return float(min(PACE_GAIN, max(floor, wanted / remaining)))


class _AdapterOff:
    """The LoRA policy as its own reference: the base weights, adapters switched off while the
    decoder runs (the output embedding carries no adapter)."""

    def __init__(self, peft_model) -> None:
        self._model = peft_model

    def get_decoder(self):
        decoder = self._model.get_decoder()

        def run(**kwargs):
            with self._model.disable_adapter():
                return decoder(**kwargs)
        return run

    def get_output_embeddings(self):
        return self._model.get_output_embeddings()


class _OnceOnProbe:
    """A reference that does not change while training runs (LoRA's base weights, or the frozen
    copy of a full fine-tune), so its decoder's output on the fixed probe is computed at the first
    check and reused: each later check runs the decoder once (the policy), not twice. The LM head
    still runs on the cached hidden states (a few MB; caching the logits would take hundreds)."""

    def __init__(self, reference) -> None:
        self._reference = reference
        self._inputs: tuple | None = None
        self._output = None

    def get_decoder(self):
        decoder = self._reference.get_decoder()

        def run(*, input_ids, attention_mask, **kwargs):
            if self._inputs is not None and torch.equal(self._inputs[0], input_ids) \
                    and torch.equal(self._inputs[1], attention_mask):
                return self._output
            self._output = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            self._inputs = (input_ids.clone(), attention_mask.clone())
            return self._output
        return run

    def get_output_embeddings(self):
        return self._reference.get_output_embeddings()


def probe_items(tokenizer, rows: list[dict[str, Any]], max_length: int,
                count: int = PROBE_ANSWERS, max_tokens: int = PROBE_TOKENS) -> list:
    """The newest training answers (TRL rows: `completion`, or a pair's `chosen`), at most `count`
    of them and — the newest always — at most `max_tokens` answer tokens in all, encoded as the
    evaluation encodes them (a cut answer without its end-of-turn tokens), oldest first."""
    items, tokens = [], 0
    for row in reversed(rows[-count:]):
        completion = row.get("completion") or row.get("chosen")
        cut = bool(row.get("completion_cut") or row.get("chosen_cut"))
        item = encode(tokenizer, row["prompt"], completion, max_length, cut)
        tokens += len(item.completion_ids)
        if items and tokens > max_tokens:
            break
        items.append(item)
    return items[::-1]


class KLStop(TrainerCallback):
    """Stop training when the probe's KL per answer token reaches `target` (module docstring)."""

    @property
    def latest_kl(self) -> float:
        return self.record.latest_kl

    def __init__(self, tokenizer, items: list, target: float, every: int = 4,
                 reference=None, max_scale: float = 1.0, pace_kl: float | None = None,
                 min_scale: float = 1.0) -> None:
        self.tokenizer, self.items, self.every = tokenizer, items, max(1, every)
        self.reference = None if reference is None else _OnceOnProbe(reference)
        self.record = KLRecord(target, max_scale, pace_kl or None, min(1.0, min_scale))
        self.scale = 1.0  # the learning-rate multiplier pacing has applied so far
        self.spent = 0.0  # the sum of the learning rates of the steps run so far

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.spent += float(optimizer.param_groups[0]["lr"])
        return control

    def kl_per_token(self, model) -> float:
        if self.reference is None:  # LoRA: the policy with its adapters off, cached once
            self.reference = _OnceOnProbe(_AdapterOff(model))
        reference = self.reference
        was_training = model.training
        model.eval()
        try:
            scores = score_encoded(model, self.tokenizer, self.items, reference=reference,
                                   batch_size=len(self.items))
        finally:
            model.train(was_training)
        return float(scores.kl_sum.sum() / scores.tokens.sum().clamp(min=1))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or not self.items or state.global_step % self.every:
            return control
        if self.reference is None and not hasattr(model, "disable_adapter"):
            return control  # neither an adapter to switch off nor a frozen copy: no reference
        kl = self.kl_per_token(model)
        if kl >= self.record.target:
            self.record.checks.append((int(state.global_step), kl, self.scale))
            self.record.stopped_at = int(state.global_step)
            control.should_training_stop = True
            log.info("KL per token %.4f reached the target %.4f at step %d: training stops",
                     kl, self.record.target, state.global_step)
            return control
        self._pace(kl, state, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
        self.record.checks.append((int(state.global_step), kl, self.scale))
        return control

    @property
    def pace_target(self) -> float:
        """The KL pacing aims `PACE_AIM` of: the pace KL, or the stop's target where lower."""
        pace = self.record.pace_kl
        return self.record.target if pace is None else min(pace, self.record.target)

    def _pace(self, kl: float, state, optimizer, scheduler) -> None:
        """Multiply the rest of the schedule by `pace_gain` (within `max_scale`, and down to
        `min_scale` of the set schedule at most: 1, the default, never under it): the scheduler's base
        rates (what every later step's rate is computed from) and the rate the next step already
        got (and the scheduler's record of it, which the trainer logs)."""
        inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
        lambdas = getattr(inner, "lr_lambdas", None)
        lowest, highest = self.record.min_scale, self.record.max_scale
        if (highest <= 1.0 and lowest >= 1.0) or optimizer is None or not lambdas:
            return
        step, last = int(state.global_step), int(state.max_steps)
        base = float(inner.base_lrs[0])
        remaining = base * sum(float(lambdas[0](t)) for t in range(step, last))
        wanted = pace_gain(kl, self.pace_target, self.spent, remaining, floor=0.0)
        scale = min(highest, max(lowest, self.scale * wanted))  # exact at either bound
        if scale == self.scale:
            return
        gain, self.scale = scale / self.scale, scale
        inner.base_lrs = [b * gain for b in inner.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= gain
        if hasattr(inner, "_last_lr"):  # what the trainer logs as the next step's rate
            inner._last_lr = [group["lr"] for group in optimizer.param_groups]
        log.info("KL per token %.4f at step %d is on course to end %s the pace KL %.4f: "
                 "learning rate x%.2f from now on", kl, step,
                 "far under" if gain > 1.0 else "past", self.pace_target, self.scale)
