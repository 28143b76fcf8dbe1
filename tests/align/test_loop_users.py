"""The simulated users of benchmarks/loop_quality.py: each preference is a small pure function that
ranks answers the way its docstring says; prompts split into disjoint voting and held-out sets."""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import loop_users as U  # noqa: E402


def test_concise_prefers_fewer_words():
    assert U.choose("concise", "Paris.", "The capital of France is Paris.", random.Random(0)) == 0
    assert U.choose("concise", "one two", "three four", random.Random(0)) is None


def test_short_sentences_prefers_fewer_words_per_complete_sentence_and_ignores_the_cut_tail():
    short = "Bees make honey. They live in hives. They"
    long_ = "Bees are insects that make honey and live together in large hives across the"
    assert U.choose("short_sentences", long_, short, random.Random(0)) == 1
    assert U.property_value("short_sentences", short) == 3.5  # "They" after the last stop is cut
    assert U.property_value("short_sentences", long_) == 14.0  # no complete sentence: one long one
    assert U.property_value("short_sentences", "Yes! It is. Ok.") == 4 / 3
    # equal to a whole word is a tie (no vote)
    assert U.choose("short_sentences", "One two three.", "Four five six seven.", random.Random(0)) == 0
    assert U.choose("short_sentences", "One two three.", "Four five. Six seven eight nine.", random.Random(0)) is None


def test_plain_prose_prefers_no_lists_or_markup():
    listy = "Rivers:\n1. Nile\n2. Amazon\n- **Danube**"
    prose = "The Nile, the Amazon and the Danube are long rivers."
    assert U.choose("plain_prose", listy, prose, random.Random(0)) == 1
    assert U.property_value("plain_prose", listy) == 5  # two numbered, one bullet, one ** pair


def test_friendly_opening_looks_at_the_start_only_and_its_rewrite_has_it():
    warm = "Great question! Bees make honey."
    late = "Bees make honey. Sure, they also make wax."
    assert U.choose("friendly_opening", late, warm, random.Random(0)) == 1
    assert U.property_value("friendly_opening", late) == 0.0
    assert U.choose("friendly_opening", "Sure! Bees.", "Of course, bees.", random.Random(0)) is None
    assert U.property_value("friendly_opening", U.REWRITES["friendly_opening"](late)) == 1.0


def test_random_control_is_a_fair_coin_whatever_the_answers():
    rng = random.Random(1)
    picks = [U.choose("random", "a", "a b c", rng) for _ in range(4000)]
    assert abs(sum(picks) / 4000 - 0.5) < 0.03


def test_voting_and_held_out_prompts_share_no_topic():
    vote, held = U.prompts(seed=0)
    assert len(held) == 24 and len(vote) >= 400
    held_topics = {t for t in U.TOPICS if any(t in p for p in held)}
    assert not any(any(f" {t}" in p for t in held_topics if len(t) > 4) for p in vote)


def test_repetitive_flags_an_answer_that_loops_and_not_one_that_varies():
    assert U.repetitive("They're my friends. They're my friends. They're my friends.")
    assert U.repetitive("Sunshine, Sunshine, Sunshine, Sunshine, Sunshine")
    assert not U.repetitive("They're my friends. They're my family. They are kind to me, my friends.")
    assert not U.repetitive("")


def test_loop_quality_turns_give_the_flooder_its_share_spread_through_the_round():
    import loop_quality as Q
    prompts = [f"p{i}" for i in range(100)]
    turns = Q.turns_of(prompts, users=20, flooder_share=0.5, rng=random.Random(0))
    flood = [i for i, (user, _) in enumerate(turns) if user == Q.FLOODER]
    assert len(turns) == 200 and len(flood) == 100  # half of all turns
    crowd = {user for user, _ in turns if user != Q.FLOODER}
    assert len(crowd) == 20 and sorted(p for u, p in turns if u != Q.FLOODER) == sorted(prompts)
    assert flood[0] < 40 and flood[-1] > 160  # shuffled through the round, not all at its end
    assert len(Q.turns_of(prompts, 20, 0.0, random.Random(0))) == 100
    assert sum(u == Q.FLOODER for u, _ in Q.turns_of(prompts, 20, 0.25, random.Random(0))) == 33
