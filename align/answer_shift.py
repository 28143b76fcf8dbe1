"""The gate's test on the answers a candidate writes: do the held-out answers people liked look
more like where the candidate's own answers moved than the answers they disliked?

The rating test (align/rating_test.py) asks how the candidate *scores* the held-out answers, which
the current version wrote. On the population benchmark that evidence was too weak to promote
candidates whose served answers users preferred 0.77-0.79 of the time (docs/loop_benchmark.md): what
changed is in the answers the candidate writes. This test looks there, without a judge trained on
the same votes:

1. The degeneration check already has both versions answer the same held-out prompts with the
   same seeds. Each answer becomes its token frequencies (counts / length); the **shift** is the
   mean over prompts of candidate minus current: which tokens the candidate writes more, which
   less ("." and " you" up, "," and " and" down).
2. Every held-out rated answer gets a score: the mean of the shift over its tokens, i.e. how much
   it resembles where the candidate went.
3. The shift's own test (`ShiftTest`: the AUC of the scores, liked against disliked, and the
   rating test's randomization, `rating_test.permutation_p`) is reported beside the verdict; it
   decides nothing. Until 2026-12-06 a KTO job joined the scores to the rating test's moves
   (each answer's two ranks averaged). On 13 kept candidates of four splits the join lowered
   the p-value of 7 (one of them by 0.003) and raised that of 6 (geometric mean 0.154 joined,
   0.096 alone), and the one candidate under a season's first 0.0125 passed alone only
   (speaks_to_you: 0.011 alone, 0.088 joined; the shift of 16 sampled answers is near chance
   for a preference about one word), so the moves decide alone now (docs/loop_benchmark.md "The
   rating test without the answer shift"; benchmarks/gate_power.py still measures the join).

Why the level holds: the shift is computed from the two versions' new answers, which do not
depend on the held-out labels; when those labels carry nothing the candidate learned (random
feedback), every arrangement of them is equally likely given the scores, so the test is exact,
whatever the shift is. The scores are high where the users who were held out liked what the
candidate now writes more of — a question about the answers themselves, which is what a served
win rate measures.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from prefloop.align.rating_test import PermutationTest


def _frequencies(ids: list[int], vocab: int) -> np.ndarray:
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab)[:vocab]
    return counts / max(len(ids), 1)


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's table (GPT-2's, used by the default model's tokenizer): the byte each
    printable character of a token's string stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_OF_CHAR = _byte_of_char()
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_text(tok):
    """`decode(id)` for `AnswerShift.describe_top`: a token's text, or, for a piece of a
    multi-byte character (an emoji is split over tokens, and each piece decodes alone to
    U+FFFD), its bytes: the verdict then names b' \\xf0\\x9f\\x98', not a replacement character."""
    def decode(token_id: int) -> str | bytes:
        text = tok.decode(token_id)
        if "\ufffd" not in text:
            return text
        piece = tok.convert_ids_to_tokens(token_id)
        if _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece's byte fallback: "<0xF0>"
            return bytes([int(piece[3:5], 16)])
        if not all(c in _BYTE_OF_CHAR for c in piece):
            return text  # neither: keep the tokenizer's own rendering
        return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return decode


@dataclass(slots=True, frozen=True)
class AnswerShift:
    """Mean token frequencies of the candidate's answers minus the current version's, over the
    prompts both answered (`shift`, one value per token id)."""

    shift: np.ndarray
    prompts: int

    @classmethod
    def of(cls, candidate: list[list[int]], current: list[list[int]],
           vocab: int) -> "AnswerShift":
        """`candidate[i]` and `current[i]`: the token ids of the two versions' answers to prompt
        i (same seed). Ids at or above `vocab` are ignored, and so is a prompt where either
        answer is empty (`prompts` counts the others)."""
        if len(candidate) != len(current):
            raise ValueError("one answer per prompt from each version")
        shift = np.zeros(vocab, dtype=np.float64)
        prompts = 0
        for a, b in zip(candidate, current):
            a, b = [t for t in a if t < vocab], [t for t in b if t < vocab]
            if a and b:  # an empty answer has no frequencies to compare
                shift += _frequencies(a, vocab) - _frequencies(b, vocab)
                prompts += 1
        return cls(shift / max(prompts, 1), prompts)

    def scores(self, answers: list[list[int]]) -> list[float]:
        """Per answer (token ids): the mean shift of its tokens (0 for an empty answer)."""
        vocab = self.shift.size
        known = [[t for t in ids if t < vocab] for ids in answers]
        return [float(self.shift[ids].mean()) if ids else 0.0 for ids in known]

    def top(self, k: int = 3) -> tuple[list[int], list[int]]:
        """The `k` token ids the candidate writes most more of, and most less of."""
        order = np.argsort(self.shift, kind="stable")
        up = [int(t) for t in order[::-1][:k] if self.shift[t] > 0]
        down = [int(t) for t in order[:k] if self.shift[t] < 0]
        return up, down

    def describe_top(self, decode, k: int = 3) -> str:
        """"more ' you', '.'; less ',', ' and'" with `decode(id) -> str` (or bytes: `token_text`)."""
        up, down = self.top(k)
        more = ", ".join(repr(decode(t)) for t in up) or "-"
        less = ", ".join(repr(decode(t)) for t in down) or "-"
        return f"the candidate writes more {more}; less {less}"


@dataclass(slots=True, frozen=True)
class ShiftEvidence:
    """What the gate needs, gathered by the job: the shift, the held-out answers it scores (token
    ids), their labels and prompts, and the shift's top tokens in words."""

    shift: AnswerShift
    answers: list[list[int]]
    labels: list[bool]
    groups: list[str]
    top: str = ""

    def scores(self) -> list[float]:
        """The held-out answers' resemblance to the shift (`AnswerShift.scores`)."""
        return self.shift.scores(self.answers)

    def test(self, confidence: float) -> "ShiftTest":
        """The shift's own test (reported; it decides nothing)."""
        from prefloop.align.rating_test import PermutationTest
        return ShiftTest(PermutationTest.of(self.scores(), self.labels, self.groups, confidence,
                                            draws=REPORT_DRAWS),
                         self.shift.prompts, self.top)


REPORT_DRAWS = 2000  # the reported test's randomizations (it decides nothing)


@dataclass(slots=True, frozen=True)
class ShiftTest:
    """The shift's own test, reported beside the verdict: the AUC of the held-out answers'
    scores, liked against disliked, and its randomization p-value."""

    test: "PermutationTest"
    prompts: int
    top: str

    def describe(self) -> str:
        t = self.test
        top = f"; {self.top}" if self.top else ""
        head = f"the answers it writes ({self.prompts} held-out prompts{top})"
        if not 0 < t.ups < t.n:
            return f"{head}: held-out answers of one label only, nothing to compare"
        return (f"{head}: a liked held-out answer resembles the shift more than a disliked one in "
                f"{t.mean:.3f} of their pairs (AUC over {t.ups} up, {t.n - t.ups} down), "
                f"{t.confidence:.0%} bootstrap interval [{t.lower:.3f}, {t.upper:.3f}], one-sided "
                f"randomization p = {t.p_value:.3g}")

    def result(self):
        from prefloop.align.gate import ShiftResult
        t = self.test
        return ShiftResult(t.n, self.prompts, t.mean, t.lower, t.upper, t.p_value, self.top)
