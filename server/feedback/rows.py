"""The typed training rows the log exports: one dataclass per row kind, the Arrow schema beside it.

Writer (`export.py`) and readers (align's data, jobs, training and scoring) share these types
instead of dicts keyed by strings; a test checks that each dataclass's fields are its schema's
column names, in order, so the two cannot drift apart.

- `PreferencePair`: prompt / chosen / rejected as chat messages (TRL's conversational preference
  format) with where it came from (`source`: "reference" | "explicit" | "ratings" |
  "examples"), the model versions and finish reasons of both answers, and the reward-model
  `margin` (0 for a pick; the `dpo` export leaves that column out);
- `RatedAnswer`: prompt / completion / label (TRL's unpaired format, KTO) from a rating or from
  one side of a pick;
- `SftExample`: a supervised (prompt, completion) example (align/data.py builds them).

Every row has `created_at` (UTC) and `feedback_id`, the two keys the time split and the job
window sort on (`Dated`).

Finish reasons (`finish_reason`, `chosen_finish_reason`, ...) say how the answer the user saw
ended: "stop" (the model ended its turn), "length" (max_tokens), "abort" (the user's Stop, a
dropped stream), "stop_string" (a stop string of the request cut it), or None (a text the user
wrote, or a row logged before finish reasons were exported: taken as whole). `is_cut` is the one
place that says which of them are not finished answers: those are trained without the chat
template's end-of-turn tokens (align/train/cut_answers.py).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol

import pyarrow as pa

from prefloop.server.feedback import schema as logschema

Messages = list[dict[str, str]]

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_STOP_STRING = (
    "stop", "length", "abort", "stop_string")
CUT_REASONS = frozenset({FINISH_LENGTH, FINISH_ABORT, FINISH_STOP_STRING})


def is_cut(finish_reason: str | None) -> bool:
    """True when an answer that ended this way is not a finished answer (see the module doc)."""
    return finish_reason in CUT_REASONS


class Dated(Protocol):
    """What the time split and the job window need of a row."""

    created_at: dt.datetime
    feedback_id: str | None


class _Row:
    """`from_row` / `to_row` between a dataclass and an Arrow row dict of its schema."""

    __slots__ = ()
    SCHEMA: ClassVar[pa.Schema]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]):
        """The row of a table with this class's schema (a column it does not know is an error)."""
        return cls(**row)

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(slots=True, frozen=True)
class PreferencePair(_Row):
    prompt: Messages
    chosen: Messages
    rejected: Messages
    feedback_id: str | None  # the first submission of this pair ("ratings:<ids>", "<id>,<id>")
    created_at: dt.datetime
    chosen_model_version: str | None = None
    rejected_model_version: str | None = None
    source: str | None = None  # "reference" | "explicit" | "ratings" | "examples"
    chosen_finish_reason: str | None = None
    rejected_finish_reason: str | None = None
    margin: float = 0.0  # reward-model margin: difference of mean normalized ratings; 0 for picks

    @property
    def chosen_text(self) -> str:
        return self.chosen[0]["content"] if self.chosen else ""

    @property
    def rejected_text(self) -> str:
        return self.rejected[0]["content"] if self.rejected else ""

    def to_trl(self, margin: bool = False) -> dict[str, Any]:
        """The columns TRL's DPOTrainer (RewardTrainer with `margin`) reads, plus the cut flags
        our training path reads (align/train/cut_answers.py) and removes before TRL's collator."""
        row = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
               "chosen_cut": is_cut(self.chosen_finish_reason),
               "rejected_cut": is_cut(self.rejected_finish_reason)}
        if margin:
            row["margin"] = float(self.margin or 0.0)
        return row


@dataclass(slots=True, frozen=True)
class RatedAnswer(_Row):
    prompt: Messages
    completion: Messages
    label: bool  # desirable (thumbs up, 4-5 stars, the chosen side of a pick) or not
    feedback_id: str | None
    created_at: dt.datetime
    model_version: str | None = None
    source: str | None = None  # "rating" | "preference"
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self.completion[0]["content"] if self.completion else ""

    def to_trl(self) -> dict[str, Any]:
        """TRL's KTOTrainer columns plus the cut flag (align/train/cut_answers.py)."""
        return {"prompt": self.prompt, "completion": self.completion, "label": bool(self.label),
                "completion_cut": is_cut(self.finish_reason)}


@dataclass(slots=True, frozen=True)
class SftExample(_Row):
    prompt: Messages
    completion: Messages
    created_at: dt.datetime
    feedback_id: str | None
    source: str  # "user_answer" | "chosen" | "top_rated"
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self.completion[0]["content"] if self.completion else ""

    def to_trl(self) -> dict[str, Any]:
        """TRL's SFTTrainer columns plus the cut flag (align/train/cut_answers.py)."""
        return {"prompt": self.prompt, "completion": self.completion,
                "completion_cut": is_cut(self.finish_reason)}


_COLUMN_TYPES = {
    "prompt": logschema.MESSAGES, "chosen": logschema.MESSAGES, "rejected": logschema.MESSAGES,
    "completion": logschema.MESSAGES, "label": pa.bool_(), "created_at": logschema.TIMESTAMP,
    "margin": pa.float64(),
}


def _schema_of(cls, leave_out: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema([(f.name, _COLUMN_TYPES.get(f.name, pa.string()))
                      for f in dataclasses.fields(cls) if f.name not in leave_out])


RM_SCHEMA = PreferencePair.SCHEMA = _schema_of(PreferencePair)
DPO_SCHEMA = _schema_of(PreferencePair, leave_out=("margin",))
KTO_SCHEMA = RatedAnswer.SCHEMA = _schema_of(RatedAnswer)
SFT_SCHEMA = SftExample.SCHEMA = _schema_of(SftExample)
