"""The midpoint test's evidence: a KTO run trains the older half of its rows first, and the
checkpoint that has seen only them scores the newer half before training on it.

The gate judges a candidate on the newest fifth of the window (the held-out rows); the other
four fifths only train. With 300 noisy feedback events those 60 held-out answers do not hold the
evidence a season's first decision needs even for a perfect candidate (docs/loop_benchmark.md,
"Each kind of feedback alone"). Here the training rows are split in time (`data.time_split` at one
half: rows of one pick stay together) and trained in that order, each half shuffled within
itself (`train_sampling_strategy="sequential"`). After the last optimizer step whose batches hold
only older rows (or at the end, when the KL stop ends training sooner: the candidate then has
seen older rows only), `MidpointScorer` scores every newer training answer — as the gate scores a
held-out one: its log-prob under the checkpoint minus under the reference (the version the job
started from), summed over its tokens — and training goes on. Those answers are then unseen
evidence for the gate (align/rating_test.py `CombinedTest`), twice as many as the held-out ones.

What the checkpoint may depend on, so that under labels that carry no preference its scores are
independent of how the newer half's labels fall (the test's exactness): the older rows, the
newer rows' texts, and the count of liked answers among them. So the newer half is scored
whole (`scored`), though the looping liked answers of it are not trained on
(`data.without_looping_desirable`), and KTO's label weights and the KL stop's probe are taken
from rows chosen without its labels (`label_free`: the trained older half and the whole newer
half).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from prefloop.align import data as data_mod
from prefloop.server.feedback.rows import RatedAnswer

log = logging.getLogger(__name__)

OLDER_SHARE = 0.5  # the older half trains before the midpoint


@dataclass(slots=True)
class MidpointPlan:
    """The training order of a midpoint run and what the checkpoint scores."""

    older: list[RatedAnswer]  # trained first (shuffled), after the looping filter
    newer: list[RatedAnswer]  # trained after the midpoint (shuffled), after the looping filter
    scored: list[RatedAnswer]  # every newer row, in time order: what the checkpoint scores
    older_rows: int  # rows of the older half before the looping filter

    @property
    def rows(self) -> list[RatedAnswer]:
        """The training rows in the order they train."""
        return self.older + self.newer

    @property
    def label_free(self) -> list[RatedAnswer]:
        """The rows KTO's label weights and the KL stop's probe read (module docstring)."""
        return self.older + self.scored

    @property
    def trained_share(self) -> float:
        """The share of the window's training rows the checkpoint had trained on (label-free:
        counted before the looping filter)."""
        return self.older_rows / max(1, self.older_rows + len(self.scored))

    def weight_share(self, record: "MidpointRecord") -> float:
        """How much the midpoint's answers weigh against the held-out ones, as a share
        (rating_test.CombinedTest): `trained_share`, or 1 when training stopped before the
        midpoint and the candidate itself scored them. Both are fixed before any newer label
        could matter."""
        return 1.0 if record.candidate else self.trained_share


def plan(train: list[RatedAnswer], *, drop_looping: bool, seed: int = 0) -> MidpointPlan | None:
    """Split `train` (a KTO job's training rows) at its time midpoint; None when a half would be
    empty."""
    split = data_mod.time_split(train, heldout_fraction=1.0 - OLDER_SHARE)
    if not split.train or not split.heldout:
        return None
    rng = random.Random(seed)
    halves = []
    for part in (split.train, split.heldout):
        kept = data_mod.without_looping_desirable(part)[0] if drop_looping else list(part)
        rng.shuffle(kept)
        halves.append(kept)
    return MidpointPlan(halves[0], halves[1], list(split.heldout), len(split.train))


@dataclass(slots=True)
class MidpointRecord:
    """What the scorer measured: the step it scored at, and per scored answer its move (summed
    log-prob under the checkpoint minus under the reference)."""

    step: int
    trained_rows: int  # training rows the checkpoint had stepped over
    moves: list[float] = field(default_factory=list)
    kl_per_token: float | None = None
    seconds: float = 0.0
    candidate: bool = False  # training stopped before the midpoint: the scores are the candidate's

    def to_record(self) -> dict[str, Any]:
        return {"step": self.step, "trained_rows": self.trained_rows, "scored": len(self.moves),
                "candidate": self.candidate,
                "kl_per_token": None if self.kl_per_token is None
                else round(self.kl_per_token, 5), "seconds": round(self.seconds, 1)}


class MidpointScorer(TrainerCallback):
    """Score `plan.scored` at the end of the last optimizer step that held only older rows
    (module docstring). `bind` gives it the tokenizer and, for a full fine-tune, the frozen
    reference; with LoRA the reference is the policy with its adapter off."""

    def __init__(self, plan: MidpointPlan, rows_per_step: int, max_length: int,
                 batch_size: int = 4) -> None:
        self.plan, self.max_length, self.batch_size = plan, max_length, batch_size
        self.step = len(plan.older) // max(1, rows_per_step)
        self.rows_per_step = rows_per_step
        self.tokenizer = None
        self.reference = None
        self.record: MidpointRecord | None = None

    def bind(self, tokenizer, reference=None) -> None:
        self.tokenizer, self.reference = tokenizer, reference

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or self.record is not None or state.global_step != self.step:
            return control
        self.record = self.score(model, self.step)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Training ended before the midpoint (the KL stop): the model has seen older rows only,
        and it is the candidate itself (`MidpointRecord.candidate`)."""
        if model is not None and self.record is None and 0 < state.global_step < self.step:
            self.record = self.score(model, int(state.global_step), candidate=True)
        return control

    def score(self, model, step: int, candidate: bool = False) -> MidpointRecord:
        """The moves of every scored answer under `model` as it is now, after `step` steps."""
        import time

        from prefloop.align.evaluate import score_examples
        from prefloop.align.train.kl_stop import _AdapterOff

        started = time.perf_counter()
        reference = self.reference if self.reference is not None else _AdapterOff(model)
        was_training = model.training
        model.eval()
        try:
            scores = score_examples(model, self.tokenizer, self.plan.scored, reference=reference,
                                    batch_size=self.batch_size, max_length=self.max_length,
                                    progress="scoring the newer half at the midpoint")
        finally:
            model.train(was_training)
        kl = float(scores.kl_sum.sum() / scores.tokens.sum().clamp(min=1))
        record = MidpointRecord(step, step * self.rows_per_step,
                                (scores.logps - scores.ref_logps).tolist(), kl,
                                time.perf_counter() - started, candidate)
        log.info("midpoint: step %d scored %d newer answers (KL %.4f per token) in %.0f s",
                 record.step, len(record.moves), kl, record.seconds)
        return record
