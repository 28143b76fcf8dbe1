"""The simulated users of benchmarks/loop_quality.py: each preference is a small pure function that
ranks answers the way its docstring says; prompts split into disjoint voting and held-out sets."""
import random
import sys
from pathlib import Path

import pytest

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


def test_held_out_templates_ask_each_topic_in_consecutive_templates_and_keep_the_old_set_first():
    vote, held = U.prompts(seed=3)
    vote7, held7 = U.prompts(seed=3, templates=7)
    assert vote7 == vote and len(held7) == 24 * 7 and len(set(held7)) == 24 * 7
    assert held7[::7] == held  # the one-template set is each topic's first prompt
    for i in range(24):  # the 7 prompts of a topic are consecutive and all its templates
        topic = next(t for t in U.TOPICS if held[i] == U.TEMPLATES[i % 7].format(topic=t))
        assert sorted(held7[7 * i:7 * i + 7]) == sorted(t.format(topic=topic) for t in U.TEMPLATES)
    with pytest.raises(ValueError, match="templates"):
        U.prompts(seed=3, templates=8)


def test_the_served_interval_resamples_whole_topics_when_answers_share_one():
    from loop_quality import judge, wilson
    # 6 topics x 4 answers: four topics all wins, two all losses -> answers within a topic agree
    # more than independent answers would, so the topic bootstrap is wider than Wilson's
    base = ["One two three four five six seven eight. Nine ten eleven twelve."] * 24
    win, lose = "One two. Three four.", "One two three four five six seven eight nine ten eleven twelve."
    served = [win] * 16 + [lose] * 8
    by_answer = judge("short_sentences", base, served, random.Random(0), 1)
    by_topic = judge("short_sentences", base, served, random.Random(0), 1, cluster=4)
    assert by_answer["interval_kind"] == "Wilson"
    assert by_topic["interval_kind"] == "cluster bootstrap by topic, or Wilson where wider"
    assert by_topic["win_rate"] == by_answer["win_rate"] == 16 / 24
    (lo_a, hi_a), (lo_t, hi_t) = by_answer["interval"], by_topic["interval"]
    assert lo_t <= lo_a and hi_t >= hi_a and hi_t - lo_t > hi_a - lo_a + 0.1
    # topics that agree with each other: the bootstrap is narrow, and Wilson's interval stands
    even = judge("short_sentences", base, [win, win, lose] * 8, random.Random(0), 1, cluster=3)
    assert even["interval"] == pytest.approx(list(wilson(16, 24)))


def test_repetitive_flags_an_answer_that_loops_and_not_one_that_varies():
    assert U.repetitive("They're my friends. They're my friends. They're my friends.")
    assert U.repetitive("Sunshine, Sunshine, Sunshine, Sunshine, Sunshine")
    assert not U.repetitive("They're my friends. They're my family. They are kind to me, my friends.")
    assert not U.repetitive("")
    assert U.repetitive("Mmmmmmmmmmmmmmmmmmmmmmmm")  # one long word: no repeated words
    assert not U.repetitive("Hmmm, a bookkeeper's committee. Noooooooo!")  # these are words
    # a collapsed answer counts as looping: against an answer that loops by its words, the
    # preference decides (shorter words), as between any two answers that loop
    collapsed, looping = "M" + "m" * 150, "Deserts are dry. Deserts are dry. Deserts are dry."
    assert U.choose("plain_words", collapsed, looping, random.Random(0)) == 1


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


def test_population_kinds_follow_the_mix_and_every_kind_gets_a_user():
    kinds = U.user_kinds(20, "population")
    assert len(kinds) == 20 and kinds.count("thumbs") == 14 and kinds.count("pick") == 5
    assert kinds.count("edit") == 1
    assert U.user_kinds(7, "thumbs") == ["thumbs"] * 7 and U.user_kinds(3, "pairs") == ["pick"] * 3


def test_thumbs_users_pass_about_the_stated_share_of_base_answers():
    words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
             "november oscar papa quebec romeo sierra tango").split()  # no answer loops
    answers = [" ".join(words[:n]) + "." for n in range(1, 21)]  # 1..20 words per sentence
    bar = U.up_bar("short_sentences", answers, up_rate=0.3)
    ups = [U.rate("short_sentences", a, bar, 0.3, random.Random(0)) for a in answers]
    assert sum(ups) == 6 and all(ups[:6]) and not any(ups[6:])  # the six shortest
    # a binary property most base answers lack: only answers that have it pass
    rare = ["Sure! Bees."] + ["Bees."] * 9
    bar = U.up_bar("friendly_opening", rare, up_rate=0.3)
    assert [U.rate("friendly_opening", a, bar, 0.3, random.Random(0)) for a in rare] == [True] + [False] * 9
    rng = random.Random(1)
    share = sum(U.rate("random", "x", 0.0, 0.3, rng) for _ in range(4000)) / 4000
    assert 0.27 < share < 0.33


def test_noise_flips_the_stated_share_of_votes():
    rng = random.Random(2)
    picks = [U.noisy(0, 0.2, rng) for _ in range(5000)]
    thumbs = [U.noisy(True, 0.2, rng) for _ in range(5000)]
    assert 0.17 < sum(picks) / 5000 < 0.23 and 0.17 < thumbs.count(False) / 5000 < 0.23
    assert U.noisy(1, 0.0, rng) == 1 and U.noisy(False, 0.0, rng) is False


def test_every_user_prefers_an_answer_that_does_not_loop():
    loops = "Bees. They're so good. They're so good. They're so good."
    plain = "Bees are insects that make honey and live together in large hives."
    assert U.repetitive(loops) and not U.repetitive(plain)
    assert U.choose("short_sentences", loops, plain, random.Random(0)) == 1  # shorter, but loops
    assert U.choose("short_sentences", plain, loops, random.Random(0)) == 0
    assert not U.rate("short_sentences", loops, bar=-20.0, up_rate=0.3, rng=random.Random(0))
    assert U.repetitive("I'm a bit overwhelmed by the internet! 🌍" + "🔍" * 30)  # no words loop
    assert not U.repetitive("Great job! 🎉🎉🎉")
    assert U.repetitive("Love it " + "❤️" * 8)  # with the emoji's variant selector


def test_a_benchmark_prompt_names_its_topic_and_an_answer_that_names_none_of_it_is_off_topic():
    assert U.topic_of("What should I know about the ocean floor?") == "the ocean floor"
    assert U.topic_of("Explain volcanoes to a child.") == "volcanoes"
    assert U.topic_of("Write me a poem.") is None
    asked = "Give me a fun fact about volcanoes."
    assert U.off_topic(asked, "Oh, I'm sorry for all the fun facts I have to share.")
    for named in ("A volcano erupts.", "Volcanic rock is light.", "VOLCANOES smoke."):
        assert not U.off_topic(asked, named), named
    assert not U.off_topic("Tell me about the ocean floor.", "The floor of the sea is dark.")
    assert not U.off_topic("Tell me about cooking.", "People cook to eat.")
    assert not U.off_topic("Tell me about batteries.", "A battery stores energy.")
    assert U.off_topic("Tell me about cats.", "A category of animals.")  # "cat" only as itself
    assert U.off_topic("What is interesting about the internet?", "It is interesting!")
    assert U.off_topic("Tell me about electricity.", "The election was close.")
    assert not U.off_topic("Write me a poem.", "Anything at all.")  # not a benchmark prompt


def test_every_user_puts_an_off_topic_answer_last_when_it_knows_the_prompt():
    asked = "Tell me about owls."
    off = "I'm a helpful assistant."  # short sentences, but not about owls
    on = "Owls hunt at night and they can turn their heads very far around to look behind them."
    rng = random.Random(0)
    assert U.choose("short_sentences", off, on, rng) == 0  # without the prompt: style alone
    assert U.choose("short_sentences", off, on, rng, asked) == 1
    assert U.choose("short_sentences", on, off, rng, asked) == 0
    bar = U.up_bar("short_sentences", [off, on], 0.5)
    assert U.rate("short_sentences", off, bar, 0.5, rng)
    assert not U.rate("short_sentences", off, bar, 0.5, rng, asked)
    assert U.unwanted(off, asked) and not U.unwanted(on, asked) and not U.unwanted(off)


def test_the_served_judgement_reports_off_topic_shares_and_counts_them_as_losses():
    from loop_quality import judge
    held = ["Tell me about owls.", "Tell me about rain."]
    base = ["Owls hunt at night, and they are quiet, and they see well in the dark woods.",
            "Rain falls from clouds, and it waters the fields, and it fills the rivers too."]
    served = ["I'm a helpful assistant.", "Rain falls. It waters fields."]
    row = judge("short_sentences", base, served, random.Random(0), 1, held)
    assert (row["wins"], row["losses"]) == (1, 1)  # the shorter owl answer loses: off topic
    assert row["base_off_topic"] == 0.0 and row["served_off_topic"] == 0.5
    assert judge("short_sentences", base, served, random.Random(0))["wins"] == 2  # style alone


def test_speaks_to_you_prefers_more_you_per_word_to_a_whole_percent():
    rng = random.Random(0)
    to_you = "You can see it. Your eyes know it."  # 2 of 8 words: 25 per 100
    about_it = "One can see it. The eyes know it."  # none
    assert U.speaks_to_you(to_you) == 25.0 and U.speaks_to_you(about_it) == 0.0
    assert U.choose("speaks_to_you", about_it, to_you, rng) == 1
    assert U.choose("speaks_to_you", about_it, "Eyes know it.", rng) is None  # 0 and 0: a tie
    assert U.property_value("speaks_to_you", to_you) == 25.0
