"""A step that fits the evidence: stop a DPO / KTO run once the policy has moved as far from its
reference as the gate allows a candidate to go, whatever the learning rate would do next.

A fixed learning rate moves a weak preference by hundredths of a nat per token and a strong or
repeated one (the same edit many times, thumbs that all say the same) past the gate's KL bound,
after which the whole job is thrown away. `KLStop` measures the exact KL(policy ‖ reference) per
answer token — the number the gate checks, on a fixed probe of training answers — every
`every` optimizer steps, and ends training when it reaches `target` (by default half the gate's
bound: held-out answers move less than trained ones, and the rest is headroom). The reference is
the LoRA policy with its adapter switched off (the default), or the frozen copy of a full
fine-tune. Each check is two forward passes over the probe (no gradients), a few percent of a
step's cost at the defaults.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from prefloop.align.evaluate import encode, score_encoded

log = logging.getLogger(__name__)

PROBE_ANSWERS = 8


@dataclass(slots=True)
class KLRecord:
    """What the callback saw: (step, KL per token) of every check, and the step it stopped at
    (None: the run ended on its own)."""

    target: float
    checks: list[tuple[int, float]] = field(default_factory=list)
    stopped_at: int | None = None

    def to_record(self) -> dict[str, Any]:
        return {"target": self.target, "stopped_at_step": self.stopped_at,
                "checks": [[s, round(k, 5)] for s, k in self.checks]}


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


def probe_items(tokenizer, rows: list[dict[str, Any]], max_length: int,
                count: int = PROBE_ANSWERS) -> list:
    """The newest `count` training answers (TRL rows: `completion`, or a pair's `chosen`), encoded
    as the evaluation encodes them (a cut answer without its end-of-turn tokens)."""
    items = []
    for row in rows[-count:]:
        completion = row.get("completion") or row.get("chosen")
        cut = bool(row.get("completion_cut") or row.get("chosen_cut"))
        items.append(encode(tokenizer, row["prompt"], completion, max_length, cut))
    return items


class KLStop(TrainerCallback):
    """Stop training when the probe's KL per answer token reaches `target` (module docstring)."""

    def __init__(self, tokenizer, items: list, target: float, every: int = 4,
                 reference=None) -> None:
        self.tokenizer, self.items, self.every = tokenizer, items, max(1, every)
        self.reference = reference
        self.record = KLRecord(target)

    def kl_per_token(self, model) -> float:
        reference = self.reference if self.reference is not None else _AdapterOff(model)
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
        self.record.checks.append((int(state.global_step), kl))
        if kl >= self.record.target:
            self.record.stopped_at = int(state.global_step)
            control.should_training_stop = True
            log.info("KL per token %.4f reached the target %.4f at step %d: training stops",
                     kl, self.record.target, state.global_step)
        return control
