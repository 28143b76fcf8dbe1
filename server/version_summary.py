"""The numbers a listing shows of a version or a job, read from its manifest in one place.

A version's manifest (and a job's record) keeps what its job measured: `metrics` (sections by
method: `heldout`, `current`, `training`, ...; align/jobs writes them) and `gate` (the gate's
record: align/gate.py `GateDecision.to_record`). Where a number lives differs by method — a
preference job's held-out accuracy is the gate's `candidate_accuracy` (else `heldout.pref_accuracy`),
a reward model's is `heldout.accuracy`, PPO has a held-out reward instead. `VersionSummary.of`
is the one reader of those places; `models list`, `align jobs`, `/v1/admin/versions` (the web
page's Models view) and the tests read its fields, never the raw records. Pure standard library.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping


def _number(*values: Any) -> float | None:
    """The first finite number of `values` (None if there is none)."""
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


@dataclass(slots=True, frozen=True)
class VersionSummary:
    """What a version's (or job's) job measured, where listings need it; None = not measured."""

    heldout_accuracy: float | None = None  # preference accuracy on held-out rows (rm: pairwise)
    heldout_rows: int | None = None  # held-out pairs / examples / PPO prompts judged
    kl_per_token: float | None = None  # to the version it was trained from
    kl_to_root: float | None = None  # to the root version (v0000): the drift of the whole chain
    gate_win_rate: float | None = None  # candidate vs current on the gate's held-out pairs
    current_version: str | None = None  # what it was compared against
    current_accuracy: float | None = None  # that version's held-out preference accuracy
    heldout_reward: float | None = None  # ppo: mean reward of its held-out answers
    ab_win_rate: float | None = None  # the live A/B test's head-to-head win rate, if any

    @classmethod
    def of(cls, metrics: Mapping[str, Any] | None, gate: Mapping[str, Any] | None,
           ab_win_rate: float | None = None) -> "VersionSummary":
        metrics, gate = metrics or {}, gate or {}
        held = metrics.get("heldout") or {}
        current = metrics.get("current") or {}
        rows = _number(gate.get("heldout_pairs"), gate.get("heldout_prompts"), held.get("pairs"),
                       held.get("samples"), held.get("examples"))
        return cls(
            heldout_accuracy=_number(gate.get("candidate_accuracy"), held.get("pref_accuracy"),
                                     held.get("accuracy")),
            heldout_rows=None if rows is None else int(rows),
            kl_per_token=_number(gate.get("kl_per_token"), held.get("kl_per_token")),
            kl_to_root=_number(gate.get("kl_to_root"), held.get("kl_to_root_per_token")),
            gate_win_rate=_number(gate.get("win_rate")),
            current_version=current.get("version") or gate.get("current_version"),
            current_accuracy=_number(gate.get("current_accuracy"),
                                     current.get("heldout_pref_accuracy")),
            heldout_reward=_number(gate.get("candidate_reward"), held.get("reward")),
            ab_win_rate=_number(ab_win_rate))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
