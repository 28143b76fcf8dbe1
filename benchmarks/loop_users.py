"""Simulated users for benchmarks/loop_quality.py: chat prompts from templates over many topics
(a voting set and a separate held-out set nobody votes on), and hidden, consistent preferences a
135M model can express, each a small pure function.

A preference scores an answer (higher = better for this user); of two answers the user prefers
the higher score, and calls a tie when the scores are equal. The "random" control prefers either
answer with probability 1/2 whatever they say.
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


def prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(voting prompts, held-out prompts): disjoint topics, so held-out prompts are new."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    held_topics, vote_topics = topics[:24], topics[24:]
    vote = [t.format(topic=topic) for topic in vote_topics for t in TEMPLATES]
    held = [TEMPLATES[i % len(TEMPLATES)].format(topic=topic) for i, topic in enumerate(held_topics)]
    rng.shuffle(vote)
    return vote, held


# ---- preferences: answer -> score ----------------------------------------------------------------

def concise(answer: str) -> float:
    """Shorter answers are better (fewer words)."""
    return -float(len(answer.split()))


_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.M)


def plain_prose(answer: str) -> float:
    """No lists, no markdown headings or bold: fewer list lines / markup is better."""
    return -float(len(_LIST_LINE.findall(answer)) + answer.count("**") + answer.count("#"))


_FRIENDLY = re.compile(r"\b(hope|enjoy|glad|happy to help|let me know|feel free|have a (?:great|nice|good))\b",
                       re.I)


def friendly_closing(answer: str) -> float:
    """A friendly closing line is better: the last sentence wishes well or offers more help."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    return 1.0 if sentences and _FRIENDLY.search(sentences[-1]) else 0.0


PREFERENCES = {"concise": concise, "plain_prose": plain_prose, "friendly_closing": friendly_closing}


def choose(preference: str, a: str, b: str, rng: random.Random) -> int | None:
    """0 if the user prefers `a`, 1 for `b`, None for a tie (no vote). "random" flips a coin."""
    if preference == "random":
        return rng.randrange(2)
    score = PREFERENCES[preference]
    sa, sb = score(a), score(b)
    if sa == sb:
        return None
    return 0 if sa > sb else 1


def property_value(preference: str, answer: str) -> float:
    """The preferred property's value on one answer (for the benchmark's mean): word count for
    concise, list/markup lines for plain prose, 1/0 for a friendly closing."""
    if preference == "concise":
        return float(len(answer.split()))
    if preference == "plain_prose":
        return -plain_prose(answer)
    if preference == "friendly_closing":
        return friendly_closing(answer)
    return 0.0
