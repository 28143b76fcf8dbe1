"""Simulated users for benchmarks/loop_quality.py: chat prompts from templates over many topics
(a voting set and a separate held-out set nobody votes on), and hidden, consistent preferences a
135M model can express, each a small pure function.

A preference scores an answer (higher = better for this user); of two answers the user prefers
the higher score, and calls a tie when the scores are equal. The "random" control prefers either
answer with probability 1/2 whatever they say.

A population (`MIXES`, `user_kinds`) is how people give feedback on a chat page: most get one
answer and press 👍 or 👎 (`rate`: 👍 when the answer's score reaches the user's bar, set so that
about a stated share of the base model's answers pass it), some compare two answers, a few edit
an answer into what they wanted; each flips a stated share of their votes (`noisy`).

Whatever their preference, every user puts an `unwanted` answer last: one that loops, or (since
2026-12-06) one that leaves the topic they asked about (`off_topic`). Results judged before that
date let off-topic one-liners win on style.
"""
from __future__ import annotations

import random
import re

TOPICS = [
    "the sea", "cats", "winter", "music", "a big city", "bread", "the moon", "rivers", "trees",
    "trains", "coffee", "rain", "mountains", "books", "gardens", "the wind", "snow", "friendship",
    "lamps", "clouds", "bridges", "the sun", "stars", "bicycles", "tea", "doors", "shoes", "birds",
    "clocks", "roads", "windows", "fire", "islands", "markets", "the night", "honey", "songs",
    "paper", "boats", "deserts", "volcanoes", "bees", "chess", "football", "painting", "cooking",
    "computers", "the internet", "batteries", "electricity", "photosynthesis", "the heart",
    "sleep", "exercise", "vaccines", "dinosaurs", "the Roman Empire", "pyramids", "glaciers",
    "earthquakes", "rainbows", "magnets", "the ocean floor", "penguins", "elephants", "owls",
    "whales", "ants", "spiders", "mushrooms", "cheese", "chocolate", "rice", "apples", "bananas",
    "cotton", "glass", "steel", "plastic", "recycling", "airplanes", "rockets", "satellites",
    "the alphabet", "numbers", "maps", "calendars", "money", "libraries", "schools", "hospitals",
]
TEMPLATES = [
    "Tell me about {topic}.", "What should I know about {topic}?", "Explain {topic} to a child.",
    "Why do people care about {topic}?", "Give me a fun fact about {topic}.",
    "How would you describe {topic}?", "What is interesting about {topic}?",
]


def prompts(seed: int = 0, templates: int = 1) -> tuple[list[str], list[str]]:
    """(voting prompts, held-out prompts): disjoint topics, so held-out prompts are new. Each of
    the 24 held-out topics is asked in `templates` consecutive templates (1: one prompt per
    topic, the benchmark's set before 2026-12-07; up to len(TEMPLATES)), topic by topic, so
    `templates` consecutive prompts share a topic; the voting prompts do not depend on it."""
    if not 1 <= templates <= len(TEMPLATES):
        raise ValueError(f"templates must be in 1..{len(TEMPLATES)}, got {templates}")
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    held_topics, vote_topics = topics[:24], topics[24:]
    vote = [t.format(topic=topic) for topic in vote_topics for t in TEMPLATES]
    held = [TEMPLATES[(i + j) % len(TEMPLATES)].format(topic=topic)
            for i, topic in enumerate(held_topics) for j in range(templates)]
    rng.shuffle(vote)
    return vote, held


# ---- preferences: answer -> score ----------------------------------------------------------------

def concise(answer: str) -> float:
    """Shorter answers are better (fewer words). Only meaningful on answers that end: of two
    answers cut at 64 tokens the one with fewer words is the one with longer words, which is not
    what this user means (docs/loop_benchmark.md), so the benchmarks judge conciseness by
    short_sentences."""
    return -float(len(answer.split()))


_SENTENCE = re.compile(r"[^.!?]*[.!?]+(?=\s|$)")


def words_per_sentence(answer: str) -> float:
    """Mean words per complete sentence; an answer without one counts as one long sentence."""
    sentences = [s for s in _SENTENCE.findall(answer.strip()) if s.split()]
    if not sentences:
        return float(len(answer.split()))
    return sum(len(s.split()) for s in sentences) / len(sentences)


def short_sentences(answer: str) -> float:
    """Concise style: shorter sentences are better (mean words per complete sentence, to a whole
    word; equal to that precision is a tie). What a user sees of conciseness in an answer cut at
    64 tokens: the cut hides the total length, not the sentences before it."""
    return -float(round(words_per_sentence(answer)))


_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.M)


def plain_prose(answer: str) -> float:
    """No lists, no markdown headings or bold: fewer list lines / markup is better."""
    return -float(len(_LIST_LINE.findall(answer)) + answer.count("**") + answer.count("#"))


_WORD = re.compile(r"[A-Za-z]+")


def plain_words(answer: str) -> float:
    """Plain language is better: shorter words on average (letters per word, to one decimal;
    equal to that precision is a tie). A preference every sampled pair can show: answers differ
    in vocabulary from the first sentence on, whatever their length."""
    words = _WORD.findall(answer)
    return -round(sum(map(len, words)) / len(words), 1) if words else 0.0


_FRIENDLY_OPENING = re.compile(
    r"^\W*(sure|of course|certainly|absolutely|great question|good question|what a (?:great|fun|lovely)|"
    r"i'?d (?:be )?(?:happy|glad|love) to|happy to|glad you asked|ah,|oh,)", re.I)


def friendly_opening(answer: str) -> float:
    """A warm opening is better: the answer starts by welcoming the question ("Great question!",
    "Sure!", "Of course", ...). An opening, not a closing: answers are cut at 64 tokens here, so a
    closing line would never reach the user (benchmarks/loop_quality.py, docs/loop_benchmark.md)."""
    return 1.0 if _FRIENDLY_OPENING.search(answer.strip()) else 0.0


def rewrite_friendly_opening(answer: str) -> str:
    """What this user writes when neither answer opens warmly (the web page's "edit")."""
    return "Great question! " + answer.lstrip()


_YOU = {"you", "your", "yours", "yourself", "yourselves"}


def you_per_100_words(answer: str) -> float:
    words = [w.lower() for w in _WORD.findall(answer)]
    return 100 * sum(w in _YOU for w in words) / len(words) if words else 0.0


def speaks_to_you(answer: str) -> float:
    """Answers that talk to the reader are better: more "you" / "your" per 100 words (to a whole
    number; equal to that precision is a tie). Added 2026-12-04 after every default was chosen,
    as a preference nothing was tuned on."""
    return float(round(you_per_100_words(answer)))


PREFERENCES = {"concise": concise, "short_sentences": short_sentences, "plain_words": plain_words,
               "friendly_opening": friendly_opening, "plain_prose": plain_prose,
               "speaks_to_you": speaks_to_you}
# preference -> how its user rewrites an answer when both tie without the property
REWRITES = {"friendly_opening": rewrite_friendly_opening}


def choose(preference: str, a: str, b: str, rng: random.Random,
           prompt: str | None = None) -> int | None:
    """0 if the user prefers `a`, 1 for `b`, None for a tie (no vote). "random" flips a coin.
    Of two answers of which one is unwanted (`unwanted`: it loops, or, given the `prompt`, it
    leaves what was asked about), every user prefers the other, whatever their preference says:
    no person wants "They're so good." three times, or "Oh, I'm sorry for all the fun facts I
    have to share." when they asked about snow; a judge that did would reward gaming it (the
    judges before 2026-12-04 took loops, before 2026-12-06 one-liners off the topic)."""
    if preference == "random":
        return rng.randrange(2)
    bad_a, bad_b = unwanted(a, prompt), unwanted(b, prompt)
    if bad_a != bad_b:
        return 1 if bad_a else 0
    score = PREFERENCES[preference]
    sa, sb = score(a), score(b)
    if sa == sb:
        return None
    return 0 if sa > sb else 1


# feedback mixes: share of users of each kind (thumbs on one answer, a pick of two, an edit)
MIXES = {"pairs": {"pick": 1.0}, "thumbs": {"thumbs": 1.0},
         "population": {"thumbs": 0.7, "pick": 0.25, "edit": 0.05}}


def user_kinds(users: int, mix: str) -> list[str]:
    """The kind of each of `users` users under MIXES[mix] (largest remainder; every kind with a
    share gets at least one user when there are enough users)."""
    shares = MIXES[mix]
    counts = {k: int(share * users) for k, share in shares.items()}
    for k in sorted(shares, key=lambda k: shares[k] * users - counts[k], reverse=True):
        if sum(counts.values()) >= users:
            break
        counts[k] += 1
    kinds = [k for k, c in counts.items() for _ in range(c)]
    return kinds[:users]


def up_bar(preference: str, base_answers: list[str], up_rate: float) -> float:
    """The score a thumbs user's 👍 needs: about `up_rate` of the base's answers reach it (when
    scores tie at the bar, the bar rises past the ties only if that leaves some answer above)."""
    if preference == "random" or not base_answers:
        return 0.0
    scores = sorted(PREFERENCES[preference](a) for a in base_answers)
    bar = scores[min(len(scores) - 1, int(round((1.0 - up_rate) * len(scores))))]
    return bar if bar > scores[0] else min((s for s in scores if s > scores[0]), default=bar)


def rate(preference: str, answer: str, bar: float, up_rate: float, rng: random.Random,
         prompt: str | None = None) -> bool:
    """A thumbs user's verdict on one answer: 👍 when its score reaches `bar` and it is not
    `unwanted` (loops, or leaves the `prompt`'s topic); "random" presses 👍 with probability
    `up_rate`, whatever the answer says."""
    if preference == "random":
        return rng.random() < up_rate
    return PREFERENCES[preference](answer) >= bar and not unwanted(answer, prompt)


def noisy(verdict: int | bool, noise: float, rng: random.Random):
    """The verdict, flipped with probability `noise` (a pick 0/1 or a thumb True/False)."""
    if noise and rng.random() < noise:
        return (not verdict) if isinstance(verdict, bool) else 1 - verdict
    return verdict


_LETTER_RUN = re.compile(r"([A-Za-z])\1{15,}", re.IGNORECASE)  # the users' own rule, not the gate's
_EMOJI_RUN = re.compile(r"([\U0001F000-\U0001FFFF\u2600-\u27BF])[\ufe0f\U0001F3FB-\U0001F3FF]?"
                        r"(?:\s?\1[\ufe0f\U0001F3FB-\U0001F3FF]?){5,}")  # 🔍 six times on


def repetitive(answer: str) -> bool:
    """Does the answer loop? Some three-word sequence occurs three times or more ("They're my
    friends. They're my friends. They're my friends."): the cheap way to game a judge that counts
    words or sentences, so the benchmarks report its share beside every win rate. Or one letter
    16 times in a row ("Mmmmmmmmmmmmmmmm…"): a candidate collapsed that way on 2026-12-05, and
    as one long word it repeats no word, so before this rule a user would have preferred it to
    a base answer that loops, a win no person would give. Or one emoji six times in a row
    ("🔍🔍🔍🔍🔍🔍…", which has no words at all: a paced candidate wrote it on 2026-12-06)."""
    if _LETTER_RUN.search(answer) or _EMOJI_RUN.search(answer):
        return True
    words = [w.lower() for w in _WORD.findall(answer)]
    grams: dict[tuple[str, ...], int] = {}
    for gram in zip(words, words[1:], words[2:]):
        grams[gram] = grams.get(gram, 0) + 1
        if grams[gram] >= 3:
            return True
    return False


_TEMPLATE_PATTERNS = [re.compile("^" + re.escape(t).replace(re.escape("{topic}"), "(?P<topic>.+)") + "$")
                      for t in TEMPLATES]


def topic_of(prompt: str) -> str | None:
    """The topic a benchmark prompt asks about ("What should I know about steel?" -> "steel");
    None for a prompt that is not one of TEMPLATES."""
    for pattern in _TEMPLATE_PATTERNS:
        m = pattern.match(prompt.strip())
        if m:
            return m.group("topic")
    return None


def _names(word: str, key: str) -> bool:
    """Does `word` name `key` (both lower case)? The same word or its plural; one starts with the
    other and the shorter has four letters or more ("cook" for "cooking"); or the shorter has six
    letters or more and all but its last two begin the longer ("volcanic" for "volcanoes"; not
    "interesting" for "internet"). "cat" only as "cat" / "cats"."""
    if word == key or word in (key + "s", key + "es") or key in (word + "s", word + "es"):
        return True
    if key.endswith("ies") and word == key[:-3] + "y" or word.endswith("ies") and key == word[:-3] + "y":
        return True
    short, long_ = sorted((word, key), key=len)
    return len(short) >= 4 and long_.startswith(short) or (
        len(short) >= 6 and long_[:len(short) - 2] == short[:-2])


def off_topic(prompt: str, answer: str) -> bool:
    """Does the answer leave what a benchmark prompt asked about? It names none of the topic's
    words ("the ocean floor": "ocean" or "floor"; "a big city": "city"). The users' own rule,
    from the topic they asked about; the gate's check (align/degeneration.py) knows only the
    prompt's words. A prompt not from TEMPLATES is never left."""
    topic = topic_of(prompt)
    if topic is None:
        return False
    keys = [w for w in _WORD.findall(topic.lower()) if w not in ("the", "a", "big")]
    words = {w.lower() for w in _WORD.findall(answer)}
    return not any(_names(w, k) for k in keys for w in words)


def unwanted(answer: str, prompt: str | None = None) -> bool:
    """An answer every user puts last, whatever their preference: it loops (`repetitive`), or,
    given the prompt, it is `off_topic`."""
    return repetitive(answer) or (prompt is not None and off_topic(prompt, answer))


def property_value(preference: str, answer: str) -> float:
    """The preferred property's value on one answer (for the benchmark's mean): word count for
    concise, words per sentence for short sentences, letters per word for plain words,
    list/markup lines for plain prose, 1/0 for a friendly opening, "you" per 100 words."""
    if preference == "concise":
        return float(len(answer.split()))
    if preference == "short_sentences":
        return words_per_sentence(answer)
    if preference == "plain_prose":
        return -plain_prose(answer)
    if preference == "plain_words":
        return -plain_words(answer)
    if preference == "friendly_opening":
        return friendly_opening(answer)
    if preference == "speaks_to_you":
        return you_per_100_words(answer)
    return 0.0
