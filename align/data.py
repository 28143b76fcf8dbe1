"""Training sets from the preference log: loading, the time-based held-out split, the watermark.

Rows are the log's typed training rows (`prefloop.server.feedback.rows`: `PreferencePair`,
`RatedAnswer`, `SftExample`; `to_trl()` gives TRL's conversational columns) and keep their
`created_at`. Everything here is plain Python on lists of rows, so it is tested without a model:

- `load_pairs` / `load_examples`: DPO pairs / KTO examples newer than a watermark, oldest first;
- `time_split`: the newest fraction is held out, with every held-out row strictly newer than
  every training row (rows sharing the boundary timestamp stay on one side);
- `window_rows`: rows of a time window (since / after the watermark / the newest N);
- `example_pairs`: held-out KTO examples as (desirable, undesirable) index pairs of the same
  prompt, plus the examples left over matched across prompts (thumbs on one answer per prompt),
  so every kind of feedback is gated on the same paired differences;
- `without_looping_desirable`: training rows less those that would teach a looping answer as a
  good one (a thumbs-up / chosen / SFT answer that repeats a three-word sequence three times);
- `sft_examples` / `load_sft_examples`: supervised (prompt, completion) examples for SFT: the
  chosen answer of every preference (a text-form preference's chosen text is what the user wrote
  themselves: source "user_answer"; a pick between two generated answers: "chosen") and every
  top-rated answer (thumbs up, 4-5 stars: "top_rated"), one per distinct (prompt, answer).
"""
from __future__ import annotations

import datetime as dt
import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from prefloop.server.errors import InvalidArgument
from prefloop.server.feedback import export as log_export
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.rows import Dated, PreferencePair, RatedAnswer, SftExample
from prefloop.server.feedback.voter_caps import DEFAULT_VOTER_CAP, VoterCap

D = TypeVar("D", bound=Dated)

MAX_PAIRS_PER_PROMPT = 16


def parse_time(value: str | dt.date | dt.datetime | None) -> dt.datetime | None:
    """A UTC datetime from "YYYY-MM-DD", an ISO timestamp ("...Z" allowed), a date or datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    text = str(value).strip()
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"{value!r} is not a date (YYYY-MM-DD) or ISO timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def window_rows(rows: list[D], since: dt.datetime | None, after: dt.datetime | None,
                max_rows: int | None) -> list[D]:
    """Rows with since <= created_at and after < created_at, oldest first (ties by feedback_id),
    the newest `max_rows` of them."""
    kept = [r for r in rows
            if (since is None or r.created_at >= since)
            and (after is None or r.created_at > after)]
    kept.sort(key=_order)
    if max_rows is not None and max_rows > 0 and len(kept) > max_rows:
        kept = kept[-max_rows:]
    return kept


def _order(row: Dated) -> tuple[dt.datetime, str]:
    return row.created_at, row.feedback_id or ""


def _export_since(since: dt.datetime | None, after: dt.datetime | None) -> str | None:
    """The date filter for the export (day granularity; the exact cut happens in `_window`)."""
    bounds = [t for t in (since, after) if t is not None]
    return max(bounds).astimezone(dt.timezone.utc).strftime("%Y-%m-%d") if bounds else None


def load_pairs(data_dir: str | Path, *, since: str | dt.datetime | None = None,
               after: str | dt.datetime | None = None, max_pairs: int | None = None,
               pairs_from_ratings: bool = False,
               voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> list[PreferencePair]:
    """DPO pairs of the log, oldest first.

    `since`: created on or after this time; `after`: strictly after it (the job watermark);
    `max_pairs`: keep the newest N; `voter_cap`: each voter's share (None: every row).
    """
    since_t, after_t = parse_time(since), parse_time(after)
    pairs = log_export.load_pairs(data_dir, since=_export_since(since_t, after_t),
                                  pairs_from_ratings=pairs_from_ratings, voter_cap=voter_cap)
    return window_rows(pairs, since_t, after_t, max_pairs)


def load_examples(data_dir: str | Path, *, since: str | dt.datetime | None = None,
                  after: str | dt.datetime | None = None, max_examples: int | None = None,
                  voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> list[RatedAnswer]:
    """KTO examples (rated answers) of the log, oldest first."""
    since_t, after_t = parse_time(since), parse_time(after)
    examples = log_export.load_rated_answers(data_dir, since=_export_since(since_t, after_t),
                                             voter_cap=voter_cap)
    return window_rows(examples, since_t, after_t, max_examples)


@dataclass(slots=True)
class Split(Generic[D]):
    train: list[D]
    heldout: list[D]
    cutoff: dt.datetime | None  # every held-out row has created_at >= cutoff > every train row

    def describe(self) -> dict[str, Any]:
        times = [r.created_at for r in self.train + self.heldout]
        return {"since": iso(min(times)) if times else None,
                "until": iso(max(times)) if times else None,
                "heldout_since": iso(self.cutoff),
                "rows": {"train": len(self.train), "heldout": len(self.heldout)}}


def time_split(rows: list[D], heldout_fraction: float = 0.2, min_heldout: int = 1) -> Split[D]:
    """Hold out the newest rows: about `heldout_fraction` of them (at least `min_heldout`, and at
    least one row left for training). Rows sharing the boundary timestamp go together to the
    held-out side (or to the train side when that would leave nothing to train on)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise InvalidArgument(f"heldout fraction {heldout_fraction} must be in [0, 1)")
    rows = sorted(rows, key=_order)
    n = len(rows)
    if n < 2 or heldout_fraction == 0.0:
        return Split(rows, [], None)
    n_held = min(n - 1, max(min_heldout, round(heldout_fraction * n)))
    cutoff = rows[n - n_held].created_at
    train = [r for r in rows if r.created_at < cutoff]
    if not train:  # the boundary timestamp reaches back to the oldest row: ties go to train
        train = [r for r in rows if r.created_at <= cutoff]
        heldout = [r for r in rows if r.created_at > cutoff]
        cutoff = heldout[0].created_at if heldout else None
        return Split(train, heldout, cutoff)
    return Split(train, [r for r in rows if r.created_at >= cutoff], cutoff)


def example_pairs(examples: list[RatedAnswer], seed: int = 0,
                  max_per_prompt: int = MAX_PAIRS_PER_PROMPT) -> tuple[list[tuple[int, int]], int]:
    """(desirable, undesirable) index pairs of `examples` for the gate, and how many of them
    answer the same prompt (they come first: every liked x disliked answer of one prompt with
    different texts, at most `max_per_prompt` a prompt).

    An example in no same-prompt pair (a thumb on the only answer a prompt got, the usual case
    on a chat page) is matched to one of the other label answering another prompt: the
    desirable and the undesirable leftovers are shuffled with `seed` and zipped, each used once.
    The gate's difference for a pair is (candidate − current)(desirable) − (…)(undesirable).
    With labels that carry nothing the candidate learned, the two sides are exchangeable, so
    the difference is symmetric about 0 and the sign and sign-flip tests keep their level —
    whatever the share of thumbs up (signing each example's own move by its label would not: a
    candidate that lowers every answer "wins" each thumb down)."""
    import random

    by_prompt: dict[str, dict[bool, list[int]]] = defaultdict(lambda: {True: [], False: []})
    for i, e in enumerate(examples):
        by_prompt[logschema.prompt_fingerprint(None, e.prompt)][bool(e.label)].append(i)
    same: list[tuple[int, int]] = []
    used: set[int] = set()
    for groups in by_prompt.values():  # insertion order: the order prompts first appear
        pairs = [(g, b) for g, b in itertools.product(groups[True], groups[False])
                 if examples[g].text != examples[b].text]
        for g, b in pairs[:max_per_prompt]:
            same.append((g, b))
            used.update((g, b))
    rng = random.Random(seed)
    left = {lab: [i for i, e in enumerate(examples) if bool(e.label) is lab and i not in used]
            for lab in (True, False)}
    for lab in left:
        rng.shuffle(left[lab])
    return same + list(zip(left[True], left[False])), len(same)


def desirable_text(row: PreferencePair | RatedAnswer | SftExample) -> str | None:
    """The answer a row trains as a good one: a pair's chosen, a liked rated answer, an SFT
    completion (None for a disliked rated answer)."""
    if isinstance(row, PreferencePair):
        return row.chosen_text
    if isinstance(row, RatedAnswer):
        return row.text if row.label else None
    return row.text


def without_looping_desirable(rows: list[D]) -> tuple[list[D], int]:
    """`rows` less those whose desirable answer loops (align/degeneration.py's `answer_stats`:
    a three-word sequence three times or more), and how many went. Nobody wants a loop; a liked
    or chosen one is a misclick or a preference the loop happens to satisfy ("They're so good."
    three times is very short sentences), and training on it teaches the cheapest way to
    please that preference. Disliked and rejected looping answers stay: they teach the right
    thing."""
    from prefloop.align.degeneration import answer_stats

    kept = [r for r in rows if (t := desirable_text(r)) is None or not answer_stats(t).loops]
    return kept, len(rows) - len(kept)

SFT_SOURCES = {"explicit": "user_answer", "reference": "chosen", "ratings": "chosen"}


def sft_examples(pairs: list[PreferencePair], examples: list[RatedAnswer]) -> list[SftExample]:
    """SFT examples from preference `pairs` (their chosen side) and rated `examples` (their
    top-rated answers: label True from a rating), the first of every distinct (prompt, answer),
    oldest first. Empty answers are left out."""
    candidates = [SftExample(p.prompt, p.chosen, p.created_at, p.feedback_id,
                             SFT_SOURCES.get(p.source or "", "chosen"), p.chosen_finish_reason)
                  for p in pairs]
    candidates += [SftExample(e.prompt, e.completion, e.created_at, e.feedback_id, "top_rated",
                              e.finish_reason)
                   for e in examples if e.source == "rating" and e.label]
    candidates.sort(key=_order)
    seen: set[tuple[str, str]] = set()
    out = []
    for c in candidates:
        key = answer_key(c.prompt, c.text)
        if not c.text.strip() or key in seen:
            continue
        seen.add(key)
        out.append(c)
    return out


def load_sft_examples(data_dir: str | Path, *, since: str | dt.datetime | None = None,
                      after: str | dt.datetime | None = None, max_examples: int | None = None,
                      voter_cap: VoterCap | None = DEFAULT_VOTER_CAP) -> list[SftExample]:
    """SFT examples (`sft_examples`) of the log in the window, oldest first."""
    since_t, after_t = parse_time(since), parse_time(after)
    day = _export_since(since_t, after_t)
    rows = sft_examples(log_export.load_pairs(data_dir, since=day, voter_cap=voter_cap),
                        log_export.load_rated_answers(data_dir, since=day, voter_cap=voter_cap))
    return window_rows(rows, since_t, after_t, max_examples)


def answer_key(prompt: list[dict], text: str) -> tuple[str, str]:
    """(prompt fingerprint, answer text): held-out pairs whose chosen answer an SFT job trained
    on are left out of its gate."""
    return logschema.prompt_fingerprint(None, prompt), text
