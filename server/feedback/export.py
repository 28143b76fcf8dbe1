"""Reading the preference log back: whole tables, statistics, and training-ready exports.

This is what align imports (the server never imports align). It reads only files, never the
server's memory, so it works beside a running server or on a copied data directory:

- `load_table(data_dir, table)`: the Parquet parts plus the WAL segments not compacted yet,
  deduplicated by primary key (a segment compacted while we read shows up in both places);
- `export_dpo` / `export_rm`: prompt / chosen / rejected as chat messages (TRL's conversational
  preference format), one row per distinct (prompt, chosen, rejected);
- `export_kto`: prompt / completion / label (TRL's unpaired preference format);
- `load_pairs` / `load_rated_answers`: the same rows typed (`rows.PreferencePair`,
  `rows.RatedAnswer`), what align reads;
- `log_stats`: counts by day, model version and kind, how many training rows each export has,
  the heaviest voters and whom the voter cap cuts.

Every training read caps each voter (voter_caps.py: at most 4x the median voter's rows, at least
20) before feedback rows become pairs or examples, so one user's flood of votes cannot outweigh
everyone else; `voter_cap=None` reads every row.

Preferences by reference are resolved against the generations table (prompt and completions); a
raw-prompt generation becomes one user message. Ratings map to labels: thumbs +1 → True,
-1 → False; stars 4-5 → True, 1-2 → False, 3 is left out. Every answer of a generation row
carries its finish reason (rows.py: "stop", "length", "abort", "stop_string"), so a cut answer
is never trained as a finished one; a text the user wrote has none (whole).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from prefloop.server.feedback import rows as rows_mod
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.rows import (
    DPO_SCHEMA,
    KTO_SCHEMA,
    RM_SCHEMA,
    PreferencePair,
    RatedAnswer,
)
from prefloop.server.feedback.voter_caps import DEFAULT_VOTER_CAP, VoterCap, cap_voters, heaviest_voters
from prefloop.server.feedback.wal import read_segment, segments_of_logs

log = logging.getLogger(__name__)

FORMATS = ("dpo", "kto", "rm")
MAX_RATING_PAIRS_PER_PROMPT = 16

ASSISTANT = "assistant"


# ---------------------------------------------------------------------------------------------
# Reading


def _wal_rows(data_dir: Path, table: str) -> list[dict[str, Any]]:
    rows = []
    for _, _, path in segments_of_logs(logschema.wal_dirs(data_dir)):  # every replica's
        try:
            records = read_segment(path).records
        except FileNotFoundError:  # compacted meanwhile: its rows are in the parts read later
            continue
        for payload in records:
            t, row = logschema.decode_record(payload)
            if t == table:
                row["date"] = logschema.date_of_micros(row["created_at"])
                rows.append(row)
    return rows


def load_table(data_dir: str | Path, table: str, *, since: str | None = None,
               columns: list[str] | None = None, include_wal: bool = True) -> pa.Table:
    """All rows of `table` (with a `date` column), Parquet plus uncompacted WAL, one per key.

    `since` ("YYYY-MM-DD") keeps rows whose UTC date is on or after it.
    """
    schema = logschema.SCHEMAS[table].append(pa.field("date", pa.string()))
    parts = []
    if include_wal:  # WAL first: a segment deleted after this is already in Parquet below
        wal = _wal_rows(Path(data_dir), table)
        if wal:
            parts.append(pa.Table.from_pylist(wal, schema=schema))
    dataset = logschema.open_dataset(data_dir, table)
    parts.insert(0, dataset.to_table())
    result = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if since:
        result = result.filter(pc.field("date") >= since)
    result = _dedupe(result, [logschema.PRIMARY_KEY[table]])
    if table == logschema.FEEDBACK:
        result = _dedupe_keys(result)
    return result.select(columns) if columns else result


def _dedupe_keys(feedback: pa.Table) -> pa.Table:
    """One row per idempotency key, the earliest (created_at, then feedback_id), in the
    original order: a vote retried on another replica is logged by both (each checks keys
    against its own log: peers.py), and whatever the files' order the same row counts."""
    keys = feedback.column("idempotency_key")
    if feedback.num_rows == 0 or keys.null_count == feedback.num_rows:
        return feedback
    marked = pc.if_else(pc.is_null(keys), pc.binary_join_element_wise(
        "\0", feedback.column("feedback_id"), ""), keys)
    order = pc.sort_indices(feedback, [("created_at", "ascending"), ("feedback_id", "ascending")])
    ranked = pa.table({"key": pc.take(marked, order), "row": order})
    first = ranked.append_column("rank", pa.array(range(len(order)), pa.int64())).group_by(
        "key", use_threads=False).aggregate([("rank", "min")])
    if first.num_rows == feedback.num_rows:
        return feedback
    chosen = pc.take(ranked.column("row"), first.column("rank_min"))
    return feedback.take(pc.take(chosen, pc.sort_indices(chosen)))


def _dedupe(table: pa.Table, keys: list[str]) -> pa.Table:
    """First row of every distinct value of `keys`, in the original order."""
    if table.num_rows == 0:
        return table
    indexed = table.select(keys).append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by(keys, use_threads=False).aggregate([("__row", "min")])
    if first.num_rows == table.num_rows:
        return table
    return table.take(first.sort_by("__row_min").column("__row_min"))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # compacted meanwhile
        return 0


def _since_date(since: str | dt.date | None) -> str | None:
    if since is None or since == "":
        return None
    if isinstance(since, dt.date):
        return since.strftime("%Y-%m-%d")
    return dt.date.fromisoformat(str(since)).strftime("%Y-%m-%d")


# ---------------------------------------------------------------------------------------------
# Building training rows


def _assistant(text: str | None) -> list[dict[str, str]]:
    return [{"role": ASSISTANT, "content": text or ""}]


def _finish_reason(generation: dict[str, Any]) -> str | None:
    """How a logged answer ended, as the exports carry it (rows.is_cut): the engine's reason,
    with "stop" by a stop string of the request told apart from the model ending its turn."""
    reason = generation.get("finish_reason") or None
    if reason == rows_mod.FINISH_STOP and generation.get("stop_reason"):
        return rows_mod.FINISH_STOP_STRING
    return reason


class _Responses:
    """Lookup of generation rows by response_id (only the ids feedback refers to are loaded)."""

    def __init__(self, data_dir: Path, response_ids: Iterable[str]) -> None:
        wanted = sorted(set(r for r in response_ids if r))
        self.rows: dict[str, dict[str, Any]] = {}
        if not wanted:
            return
        cols = ["response_id", "prompt", "messages", "completion", "model_version",
                "prompt_fingerprint", "finish_reason", "stop_reason"]
        table = load_table(data_dir, logschema.GENERATIONS, columns=cols)
        table = table.filter(pc.is_in(table.column("response_id"), pa.array(wanted)))
        for row in table.to_pylist():
            self.rows[row["response_id"]] = row

    def get(self, response_id: str | None) -> dict[str, Any] | None:
        return self.rows.get(response_id) if response_id else None


def _label(scale: str | None, score: int) -> bool | None:
    if scale == logschema.SCALE_STARS:
        return True if score >= 4 else False if score <= 2 else None
    return score > 0


def _normalized_score(scale: str | None, score: int) -> float:
    """Thumbs ±1 and stars (1..5 → -1..+1) on one scale."""
    return (score - 3) / 2.0 if scale == logschema.SCALE_STARS else float(score)


def _feedback_and_responses(data_dir: Path, since: str | None,
                            voter_cap: VoterCap | None = DEFAULT_VOTER_CAP
                            ) -> tuple[list[dict[str, Any]], _Responses]:
    fb = load_table(data_dir, logschema.FEEDBACK, since=since)
    rows = sorted(fb.to_pylist(), key=lambda r: (r["created_at"], r["feedback_id"]))
    rows, report = cap_voters(rows, voter_cap)
    if report.capped:
        log.info("voter cap (%gx the median voter's %g rows, at least %d): kept %d rows of %s",
                 voter_cap.factor, report.median_rows, voter_cap.floor, report.cap,
                 ", ".join(f"{c['voter']} ({c['rows']})" for c in report.capped[:5]))
    ids = itertools.chain.from_iterable(
        (r["chosen_response_id"], r["rejected_response_id"], r["response_id"]) for r in rows)
    return rows, _Responses(data_dir, ids)


def _preference_pairs(rows: list[dict[str, Any]], responses: _Responses) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []
    for r in rows:
        if r["kind"] != logschema.KIND_PREFERENCE:
            continue
        if r["chosen_response_id"]:
            chosen, rejected = (responses.get(r["chosen_response_id"]),
                                responses.get(r["rejected_response_id"]))
            if chosen is None or rejected is None:
                continue  # its generation rows are missing (log lost): nothing to train on
            pairs.append(PreferencePair(
                prompt=logschema.prompt_as_messages(chosen["prompt"], chosen["messages"]),
                chosen=_assistant(chosen["completion"]),
                rejected=_assistant(rejected["completion"]),
                feedback_id=r["feedback_id"], created_at=r["created_at"],
                chosen_model_version=chosen["model_version"],
                rejected_model_version=rejected["model_version"], source="reference",
                chosen_finish_reason=_finish_reason(chosen),
                rejected_finish_reason=_finish_reason(rejected)))
        else:  # a text-form preference: both texts are whole (the user's own answer, often)
            pairs.append(PreferencePair(
                prompt=r["prompt_messages"], chosen=_assistant(r["chosen_text"]),
                rejected=_assistant(r["rejected_text"]), feedback_id=r["feedback_id"],
                created_at=r["created_at"], source="explicit"))
    return pairs


def _unique_pairs(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """The first pair of every distinct (prompt, chosen, rejected)."""
    seen: set[tuple] = set()
    out = []
    for p in pairs:
        key = (logschema.prompt_fingerprint(None, p.prompt), p.chosen_text, p.rejected_text)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _rating_pairs(rows: list[dict[str, Any]], responses: _Responses) -> list[PreferencePair]:
    """Pairs from ratings of different responses to the same prompt (higher mean score wins)."""
    scores: dict[str, list[float]] = defaultdict(list)
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["kind"] == logschema.KIND_RATING and responses.get(r["response_id"]) is not None:
            scores[r["response_id"]].append(_normalized_score(r["scale"], r["score"]))
            first.setdefault(r["response_id"], r)
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for rid in scores:
        by_prompt[responses.get(rid)["prompt_fingerprint"]].append(rid)
    pairs = []
    for rids in by_prompt.values():
        mean = {rid: sum(scores[rid]) / len(scores[rid]) for rid in rids}
        ranked = sorted(rids, key=lambda rid: (-mean[rid], rid))
        made = 0
        for hi, lo in itertools.combinations(ranked, 2):
            if made >= MAX_RATING_PAIRS_PER_PROMPT:
                break
            chosen, rejected = responses.get(hi), responses.get(lo)
            if mean[hi] <= mean[lo] or chosen["completion"] == rejected["completion"]:
                continue
            made += 1
            pairs.append(PreferencePair(
                prompt=logschema.prompt_as_messages(chosen["prompt"], chosen["messages"]),
                chosen=_assistant(chosen["completion"]),
                rejected=_assistant(rejected["completion"]),
                feedback_id=f"ratings:{first[hi]['feedback_id']},{first[lo]['feedback_id']}",
                created_at=max(first[hi]["created_at"], first[lo]["created_at"]),
                chosen_model_version=chosen["model_version"],
                rejected_model_version=rejected["model_version"], source="ratings",
                chosen_finish_reason=_finish_reason(chosen),
                rejected_finish_reason=_finish_reason(rejected),
                margin=mean[hi] - mean[lo]))
    return pairs


def dpo_pairs(rows: list[dict[str, Any]], responses: _Responses, *,
              pairs_from_ratings: bool = False) -> list[PreferencePair]:
    pairs = _preference_pairs(rows, responses)
    if pairs_from_ratings:
        pairs += [dataclasses.replace(p, margin=0.0) for p in _rating_pairs(rows, responses)]
    return _unique_pairs(pairs)


def rm_pairs(rows: list[dict[str, Any]], responses: _Responses, *,
             pairs_from_ratings: bool = True) -> list[PreferencePair]:
    pairs = _preference_pairs(rows, responses)
    if pairs_from_ratings:
        pairs += _rating_pairs(rows, responses)
    return _unique_pairs(pairs)


def rated_answers(rows: list[dict[str, Any]], responses: _Responses) -> list[RatedAnswer]:
    out: list[RatedAnswer] = []
    seen: set[tuple] = set()

    def add(answer: RatedAnswer) -> None:
        key = (logschema.prompt_fingerprint(None, answer.prompt), answer.text, answer.label)
        if key not in seen:
            seen.add(key)
            out.append(answer)

    for r in rows:
        if r["kind"] == logschema.KIND_RATING:
            g = responses.get(r["response_id"])
            label = _label(r["scale"], r["score"])
            if g is not None and label is not None:
                add(RatedAnswer(
                    prompt=logschema.prompt_as_messages(g["prompt"], g["messages"]),
                    completion=_assistant(g["completion"]), label=label,
                    feedback_id=r["feedback_id"], created_at=r["created_at"],
                    model_version=g["model_version"], source="rating",
                    finish_reason=_finish_reason(g)))
        else:
            for pair in _preference_pairs([r], responses):
                common = dict(prompt=pair.prompt, feedback_id=r["feedback_id"],
                              created_at=r["created_at"], source="preference")
                add(RatedAnswer(completion=pair.chosen, label=True,
                                model_version=pair.chosen_model_version,
                                finish_reason=pair.chosen_finish_reason, **common))
                add(RatedAnswer(completion=pair.rejected, label=False,
                                model_version=pair.rejected_model_version,
                                finish_reason=pair.rejected_finish_reason, **common))
    return out


def _table(items: list, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{f: getattr(x, f) for f in schema.names} for x in items],
                                schema=schema)


def load_pairs(data_dir: str | Path, *, since: str | dt.date | None = None,
               pairs_from_ratings: bool = False, margins: bool = False,
               voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> list[PreferencePair]:
    """The typed rows of `export_dpo` (`margins`: of `export_rm`, ratings pairs with margins).
    Every voter is capped (voter_caps.py) unless `voter_cap` is None."""
    rows, responses = _feedback_and_responses(Path(data_dir), _since_date(since), voter_cap)
    build = rm_pairs if margins else dpo_pairs
    return build(rows, responses, pairs_from_ratings=pairs_from_ratings)


def load_rated_answers(data_dir: str | Path, *, since: str | dt.date | None = None,
                       voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> list[RatedAnswer]:
    """The typed rows of `export_kto` (every voter capped unless `voter_cap` is None)."""
    rows, responses = _feedback_and_responses(Path(data_dir), _since_date(since), voter_cap)
    return rated_answers(rows, responses)


def export_dpo(data_dir: str | Path, *, since: str | dt.date | None = None,
               pairs_from_ratings: bool = False,
               voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> pa.Table:
    """Preference pairs: prompt / chosen / rejected as chat messages, one per distinct triple.

    With `pairs_from_ratings`, also pairs of differently rated answers to the same prompt.
    """
    return _table(load_pairs(data_dir, since=since, pairs_from_ratings=pairs_from_ratings,
                             voter_cap=voter_cap), DPO_SCHEMA)


def export_rm(data_dir: str | Path, *, since: str | dt.date | None = None,
              pairs_from_ratings: bool = True,
              voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> pa.Table:
    """Reward-model pairs: the preference pairs (margin 0) plus pairs derived from ratings of
    answers to the same prompt (margin = difference of mean normalized scores, in (0, 2])."""
    return _table(load_pairs(data_dir, since=since, pairs_from_ratings=pairs_from_ratings,
                             margins=True, voter_cap=voter_cap), RM_SCHEMA)


def export_kto(data_dir: str | Path, *, since: str | dt.date | None = None,
               voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> pa.Table:
    """Unpaired examples: prompt / completion / label; one row per distinct triple.

    A preference gives two examples (chosen True, rejected False).
    """
    return _table(load_rated_answers(data_dir, since=since, voter_cap=voter_cap), KTO_SCHEMA)


EXPORTERS = {"dpo": export_dpo, "kto": export_kto, "rm": export_rm}


def export(data_dir: str | Path, fmt: str, *, since: str | dt.date | None = None,
           **kwargs: Any) -> pa.Table:
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return EXPORTERS[fmt](data_dir, since=since, **kwargs)


# ---------------------------------------------------------------------------------------------
# Statistics


def log_stats(data_dir: str | Path, *, since: str | dt.date | None = None,
              voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> dict[str, Any]:
    """Counts by (date, model_version, kind), training-row counts per export (after the voter
    cap), the heaviest voters and whom the cap cuts, and WAL backlog.

    A feedback row counts under the model versions it involves ("v1,v2" for a cross-version
    pair, "-" for explicit preferences).
    """
    data_dir = Path(data_dir)
    since = _since_date(since)
    counts: Counter[tuple[str, str, str]] = Counter()
    totals: Counter[str] = Counter()
    gen = load_table(data_dir, logschema.GENERATIONS, since=since,
                     columns=["date", "model_version"])
    for date, version in zip(gen.column("date").to_pylist(),
                             gen.column("model_version").to_pylist()):
        counts[(date, version or "-", "generation")] += 1
    totals["generation"] = gen.num_rows
    rows, responses = _feedback_and_responses(data_dir, since, voter_cap=None)
    heaviest = heaviest_voters(rows)
    capped_rows, cap = cap_voters(rows, voter_cap)
    for r in rows:
        versions = ",".join(sorted({v or "-" for v in r["model_versions"] or []})) or "-"
        counts[(r["date"], versions, r["kind"])] += 1
        totals[r["kind"]] += 1
    labels = [r.label for r in rated_answers(capped_rows, responses)]
    logs = segments_of_logs(logschema.wal_dirs(data_dir))
    segments = [(s, p) for _, s, p in logs]
    # each replica's share of the files (docs/scaling.md)
    replicas: dict[str, Counter] = defaultdict(lambda: Counter(parts=0, wal_segments=0,
                                                                wal_bytes=0))
    for owner, _, path in logs:
        if owner is not None:
            replicas[owner].update(wal_segments=1, wal_bytes=_size(path))
    for table in logschema.TABLES:
        for part in logschema.part_files(data_dir, table):
            owner = logschema.part_owner(part.name)
            if owner is not None and owner[0] is not None:
                replicas[owner[0]]["parts"] += 1
    return {
        "replicas": {rid: dict(c) for rid, c in sorted(replicas.items())},
        "data_dir": str(data_dir),
        "rows": [{"date": d, "model_version": v, "kind": k, "count": n}
                 for (d, v, k), n in sorted(counts.items())],
        "totals": {k: totals[k] for k in ("generation", logschema.KIND_PREFERENCE,
                                          logschema.KIND_RATING)},
        "training": {"dpo_pairs": len(dpo_pairs(capped_rows, responses)),
                     "rm_pairs": len(rm_pairs(capped_rows, responses)),
                     "kto_examples": len(labels),
                     "kto_desirable": sum(1 for x in labels if x),
                     "kto_undesirable": sum(1 for x in labels if not x)},
        "voters": {"with_id": cap.voters, "rows_without_id": cap.anonymous_rows,
                   "median_rows": cap.median_rows, "cap": cap.cap if voter_cap else None,
                   "capped": cap.capped, "rows_dropped_by_cap": cap.dropped,
                   "heaviest": heaviest},
        "wal": {"segments": len(segments),
                "bytes": sum(_size(p) for _, p in segments)},
    }
