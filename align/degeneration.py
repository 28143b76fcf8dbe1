"""The gate's degeneration check: does the candidate loop or collapse more than the current version?

A preference judged on held-out votes can be gamed by answers no user wants (a judge that counts
short sentences passes "They're so good." ×3). So both versions answer the same held-out prompts
— sampled with the same seeds at the server's default temperature, up to `max_new_tokens` — and
each answer is measured (`answer_stats`):

- **loops**: some three-word sequence occurs three times or more, one letter 16 times in a row
  ("Mmmmmmmmmmmmmmmm…": a collapse into one long word, which repeats no word; a plain-words
  candidate trained on thumbs alone wrote it on 2026-12-05, docs/loop_benchmark.md), or one symbol
  outside ASCII 8 times in a row ("🔍🔍🔍🔍🔍🔍🔍🔍…", 2026-12-06);
- **distinct ratio**: distinct words / words among the first 32 (1.0: no word repeated; a fixed
  window, so a preference for longer answers does not lower it by itself);
- **length**: words;
- **off topic**: the answer shares no content word with its prompt's last user message (words
  of two letters or fewer, contractions, function words and the verbs of asking left out;
  plurals and "-ing" folded, so "volcanoes" meets "volcano" and "cooking" meets "cook";
  irregular plurals like "wolves" do not fold). A prompt with no content
  word ("hi") counts as on topic for both versions. On the loop benchmark's fresh split of
  2026-12-06 the base's served answers were on topic 98 % of the time, and a short-sentence
  candidate that had gone to one-liners ("Oh, I'm sorry for all the fun facts I have to share.")
  75 %; the likelihood and prompt-PMI detectors tried before did not separate such answers
  (docs/loop_benchmark.md, "Pacing again");
- **KL on its own answers**: the exact per-token KL(candidate ‖ current) at every prefix of the
  candidate's sampled answers, averaged over their tokens. The gate's KL bound is measured on the
  held-out answers, which the current version wrote; this is the same quantity where the
  candidate actually goes, so the bound holds there too. On the five population candidates of
  2026-12-05 it read 0.6-1.0x their held-out KL (0.019-0.073 nats/token; docs/loop_benchmark.md, "What
  the gate looks at"), the off-topic ones included: it bounds a candidate that has gone far, it does
  not detect a mild drift of topic.

`degeneration_check` rejects a candidate that loops in measurably more prompts than the current
version (one-sided exact sign test on the prompts where exactly one of the two loops, at 5 %),
whose answers are off topic in measurably more prompts (the same test),
whose mean distinct ratio drops by more than `max_distinct_drop`, or whose mean length leaves
[current / `max_length_ratio`, current × `max_length_ratio`] (collapsed or runaway answers), or
whose KL on its own answers exceeds `max_own_kl` (the gate's KL bound).
The numbers go into the gate's reasons either way, and the record (`metrics.degeneration`, the
manifest and `align jobs --json`) keeps `samples`: up to 6 prompts with both versions' answers
(300 characters each) and each answer's verdicts, the prompts where the two verdicts differ
first, so a reader sees what the counts were counted on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from prefloop.align.gate import Check, sign_test_p

CHECK_DEGENERATION = "degeneration"
_WORD = re.compile(r"[\w']+")
# one letter 16+ times in a row, either case: a collapse, not a word ("Noooooooo!", "0xFFFFFFFF"
# and "哈哈哈哈" stay words; a 16-letter "xxxx…" placeholder counts)
_LETTER_RUN = re.compile(r"([^\W\d_])\1{15,}", re.IGNORECASE)
# one symbol outside ASCII (an emoji, "…") 8+ times in a row: "🔍🔍🔍🔍🔍🔍🔍🔍…", a loop the words
# miss (a paced plain-words candidate wrote it on 2026-12-06); rules of dashes or box-drawing
# lines ("--------", "────────") stay; each may carry an emoji's variant selector or skin tone
_SYMBOL_RUN = re.compile(r"([^\w\s\x00-\x7f\u2010-\u2015\u2500-\u257f])"
                         r"[\ufe0f\U0001F3FB-\U0001F3FF]?(?:\s?\1[\ufe0f\U0001F3FB-\U0001F3FF]?){7,}")
DISTINCT_WINDOW = 32  # words
# what a request is made of rather than what it is about: function words and the verbs of asking
_REQUEST_WORDS = frozenset("""
a an the and or but if then so of to in on at by for with from about as into over under than
that this these those it its is are was were be been being do does did have has had i me my mine
you your yours we us our he him his she her they them their what which who whom whose when where
why how all any some no not very can could would should will shall may might must also just
tell explain describe give write show make want need please help know think say get let like
one ones thing things something anything more most here there now other others really much
many well even still such only own same too out off again once each few both yes yeah sure okay
hello hey thanks thank way lot bit kind sort good great new""".split())


def _folded(word: str) -> str:
    """A word with its plural, "-ing" and a final "e" / "y" folded away, lower case: not a stem
    anyone reads, but the singular and plural, or the verb and its "-ing", of one word fold to
    the same string ("volcanoes" / "volcano", "batteries" / "battery", "skies" / "sky",
    "strings" / "string", "running" / "run"): enough to tell whether two texts share a word."""
    w = word.lower()
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("sses", "shes", "ches", "xes", "zes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        w = w[:-1]
    if w.endswith("ing") and len(w) > 5:
        w = w[:-3]
        if len(w) > 3 and w[-1] == w[-2] and w[-1] in "bdgmnprt":  # running -> runn -> run
            w = w[:-1]
    if w.endswith("y") and len(w) > 3:
        return w[:-1] + "i"
    return w[:-1] if w.endswith("e") and len(w) > 4 else w


def _words(text: str) -> list[str]:
    """The words of `text`, a possessive "'s" dropped and other contractions ("I'm", "don't")
    left out: they are function words."""
    out = []
    for w in _WORD.findall(text):
        w = w.strip("'")
        if w.lower().endswith("'s"):
            w = w[:-2]
        if w and "'" not in w:
            out.append(w)
    return out


def content_words(text: str) -> set[str]:
    """The folded words of `text` that say what it is about (three letters or more, not a
    function word or a verb of asking)."""
    return {_folded(w) for w in _words(text) if len(w) >= 3 and w.lower() not in _REQUEST_WORDS}


def off_topic(prompt: str, answer: str) -> bool:
    """The answer shares no content word with the prompt (a prompt without any: never)."""
    asked = content_words(prompt)
    return bool(asked) and not asked & {_folded(w) for w in _words(answer)}


def last_user_text(prompt: str | list[dict]) -> str:
    """What was asked: the prompt itself, or a chat's last user message ("" when it has none or
    its content is not text)."""
    if isinstance(prompt, str):
        return prompt
    texts = [m.get("content") for m in prompt if m.get("role") == "user"]
    return texts[-1] if texts and isinstance(texts[-1], str) else ""


def _tally(a: list[bool], b: list[bool]) -> tuple[int, int, int, int]:
    """(in a, in b, only in a, only in b): how often each version's answers have a property,
    and the discordant prompts the sign test reads."""
    return (sum(a), sum(b), sum(x and not y for x, y in zip(a, b)),
            sum(y and not x for x, y in zip(a, b)))


def _more_often(only_candidate: int, only_current: int, level: float) -> tuple[bool, float]:
    """Is the candidate's answer measurably more often the bad one of the two (one-sided exact
    sign test on the discordant prompts)? And its p-value."""
    p = sign_test_p(only_candidate, only_current)
    return only_candidate > only_current and p < level, p


@dataclass(slots=True, frozen=True)
class AnswerStats:
    words: int
    distinct_ratio: float
    loops: bool


def answer_stats(text: str) -> AnswerStats:
    words = [w.lower() for w in _WORD.findall(text)]
    grams: dict[tuple[str, ...], int] = {}
    loops = _LETTER_RUN.search(text) is not None or _SYMBOL_RUN.search(text) is not None
    for gram in zip(words, words[1:], words[2:]):
        grams[gram] = grams.get(gram, 0) + 1
        loops = loops or grams[gram] >= 3
    window = words[:DISTINCT_WINDOW]
    return AnswerStats(len(words), len(set(window)) / len(window) if window else 1.0, loops)


@dataclass(slots=True, frozen=True)
class Degeneration:
    """Both versions' answers to the same prompts, summarized."""

    prompts: int
    candidate_loops: int  # prompts where the candidate's answer loops
    current_loops: int
    only_candidate_loops: int  # the discordant prompts
    only_current_loops: int
    candidate_distinct: float  # mean distinct-word ratio
    current_distinct: float
    candidate_words: float  # mean answer length in words
    current_words: float
    candidate_own_kl: float | None = None  # nats per token on its own answers (None: unmeasured)
    # prompts where the candidate's answer shares no word with its prompt (None: no prompts given)
    candidate_off_topic: int | None = None
    current_off_topic: int | None = None
    only_candidate_off_topic: int | None = None  # the discordant prompts
    only_current_off_topic: int | None = None
    # a few prompts with both answers (`samples`): what the numbers were counted on
    samples: tuple[dict, ...] = ()

    @classmethod
    def of(cls, candidate: list[str], current: list[str],
           candidate_own_kl: float | None = None,
           prompts: list[str] | list[list[dict]] | None = None) -> "Degeneration":
        """`prompts` (texts or chat messages, one per answer) adds the off-topic counts."""
        if len(candidate) != len(current) or (prompts is not None and len(prompts) != len(current)):
            raise ValueError("one answer per prompt from each version")
        a = [answer_stats(t) for t in candidate]
        b = [answer_stats(t) for t in current]
        topic: tuple[int | None, ...] = (None,) * 4
        asked = [last_user_text(p) for p in prompts] if prompts is not None else None
        away_a = away_b = [None] * len(a)
        if asked is not None:
            away_a = [off_topic(q, t) for q, t in zip(asked, candidate)]
            away_b = [off_topic(q, t) for q, t in zip(asked, current)]
            topic = _tally(away_a, away_b)
        loops_a, loops_b, only_a, only_b = _tally([s.loops for s in a], [s.loops for s in b])
        n = max(len(a), 1)
        rows = [{"prompt": _cut(asked[i]) if asked is not None else None,
                 "candidate": _cut(candidate[i]), "current": _cut(current[i]),
                 "candidate_loops": a[i].loops, "current_loops": b[i].loops,
                 "candidate_off_topic": away_a[i], "current_off_topic": away_b[i]}
                for i in range(len(a))]
        samples = sorted(rows, key=lambda r: r["candidate_loops"] == r["current_loops"]
                         and r["candidate_off_topic"] == r["current_off_topic"])[:SAMPLES]  # stable
        return cls(len(a), loops_a, loops_b, only_a, only_b,
                   sum(s.distinct_ratio for s in a) / n, sum(s.distinct_ratio for s in b) / n,
                   sum(s.words for s in a) / n, sum(s.words for s in b) / n, candidate_own_kl,
                   *topic, samples=tuple(samples))

    def to_record(self) -> dict:
        return {name: list(getattr(self, name)) if name == "samples" else getattr(self, name)
                for name in self.__slots__}


SAMPLES = 6  # prompts whose two answers the record keeps: where the verdicts differ first
SAMPLE_CHARS = 300  # of each text kept


def _cut(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS - 1] + "…"


def degeneration_check(d: Degeneration, *, level: float = 0.05, max_distinct_drop: float = 0.2,
                       max_length_ratio: float = 4.0, max_own_kl: float | None = None) -> Check:
    """The deciding check (see the module docstring); its text carries every number."""
    more_loops, p = _more_often(d.only_candidate_loops, d.only_current_loops, level)
    measured = d.only_candidate_off_topic is not None and d.only_current_off_topic is not None
    drifted, p_topic = (_more_often(d.only_candidate_off_topic, d.only_current_off_topic, level)
                        if measured else (False, 1.0))
    drop = d.current_distinct - d.candidate_distinct
    ratio = (d.candidate_words / d.current_words) if d.current_words else float("inf")
    extreme = d.current_words > 0 and not 1 / max_length_ratio <= ratio <= max_length_ratio
    far = (max_own_kl is not None and d.candidate_own_kl is not None
           and d.candidate_own_kl > max_own_kl)
    problems = [what for bad, what in (
        (more_loops, f"loops in more prompts (p {p:.3f} < {level:g})"),
        (drifted, f"answers off topic in more prompts (p {p_topic:.3f} < {level:g}): they share "
                  f"no word with what was asked"),
        (drop > max_distinct_drop, f"distinct-word ratio dropped by {drop:.2f} > "
                                   f"{max_distinct_drop:g}"),
        (extreme, f"mean length {ratio:.2f}x the current version's (outside "
                  f"[1/{max_length_ratio:g}, {max_length_ratio:g}])"),
        (far, f"KL on its own answers {d.candidate_own_kl or 0:.3f} nats/token > bound "
              f"{max_own_kl or 0:g} (it writes what the current version would not)")) if bad]
    text = (f"degeneration on {d.prompts} held-out prompts: loops {d.candidate_loops} vs current "
            f"{d.current_loops} (only one loops: {d.only_candidate_loops} / "
            f"{d.only_current_loops}, sign-test p {p:.3f}); distinct-word ratio "
            f"{d.candidate_distinct:.2f} vs {d.current_distinct:.2f}; mean words "
            f"{d.candidate_words:.1f} vs {d.current_words:.1f}"
            + ("" if not measured else
               f"; off topic (no word of the prompt) {d.candidate_off_topic} vs "
               f"{d.current_off_topic} (only one: {d.only_candidate_off_topic} / "
               f"{d.only_current_off_topic}, sign-test p {p_topic:.3f})")
            + ("" if d.candidate_own_kl is None else
               f"; KL on its own answers {d.candidate_own_kl:.3f} nats/token"))
    return Check(CHECK_DEGENERATION, not problems,
                 text + (": " + "; ".join(problems) if problems else ""))
