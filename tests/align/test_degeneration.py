"""The gate's degeneration check (align/degeneration.py): loops, repeated words and answer
length of the candidate's answers against the current version's on the same prompts."""
from __future__ import annotations

import pytest

from prefloop.align.degeneration import (
    Degeneration,
    answer_stats,
    content_words,
    degeneration_check,
    off_topic,
)

FINE = "The cat sat on the warm mat and looked at the garden for a while."
LOOP = "They're so good. They're so good. They're so good. They're so good."


def test_answer_stats():
    fine, loop = answer_stats(FINE), answer_stats(LOOP)
    assert not fine.loops and fine.words == 15 and fine.distinct_ratio == 13 / 15
    assert loop.loops and loop.words == 12 and loop.distinct_ratio == 3 / 12
    assert answer_stats("").distinct_ratio == 1.0 and not answer_stats("").loops
    collapsed = answer_stats("Mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm")  # one word, no 3-gram
    assert collapsed.loops and collapsed.words == 1
    emoji_run = answer_stats("I'm a bit overwhelmed by the internet! 🌍🔍" + "🔍" * 20)
    assert emoji_run.loops and emoji_run.words == 7
    assert answer_stats("Spaced out: " + "🔍 " * 9).loops
    assert answer_stats("Love " + "❤️" * 10).loops and answer_stats("Yes " + "👍🏽" * 10).loops
    for word in ("Hmmm, the committee's bookkeeper.", "Noooooooo!", "0xFFFFFFFF", "哈哈哈哈哈哈哈哈",
                 "1000000000000000000000", "Great job! 🎉🎉🎉", "| --- | ---------------- |",
                 "Wait……", "Section\n────────────────\nText", "one ———————— two"):
        assert not answer_stats(word).loops, word


def test_a_candidate_that_loops_where_the_current_does_not_is_rejected_with_its_numbers():
    d = Degeneration.of([LOOP] * 8 + [FINE] * 2, [FINE] * 10)
    assert (d.candidate_loops, d.current_loops, d.only_candidate_loops) == (8, 0, 8)
    check = degeneration_check(d)
    assert check.passed is False and check.name == "degeneration"
    assert "loops 8 vs current 0" in check.text and "loops in more prompts (p 0.004" in check.text
    assert "distinct-word ratio dropped by" in check.text


def test_the_same_answers_or_a_modest_change_pass():
    assert degeneration_check(Degeneration.of([FINE] * 10, [FINE] * 10)).passed
    shorter = "The cat sat on the mat."
    assert degeneration_check(Degeneration.of([shorter] * 10, [FINE] * 10)).passed  # 0.4x
    one_loop = Degeneration.of([LOOP] + [FINE] * 9, [FINE] * 10)  # p 0.5: not measurably more
    assert degeneration_check(one_loop).passed


def test_collapsed_or_runaway_length_is_rejected():
    collapsed = degeneration_check(Degeneration.of(["Yes."] * 10, [FINE] * 10))
    assert not collapsed.passed and "mean length 0.07x" in collapsed.text
    runaway = degeneration_check(Degeneration.of([" ".join([FINE] * 5)] * 10, [FINE] * 10))
    assert not runaway.passed and "outside [1/4, 4]" in runaway.text


def test_an_answer_is_off_topic_when_it_shares_no_content_word_with_the_prompt():
    assert content_words("What should I know about volcanoes?") == {"volcano"}
    assert content_words("Tell me about cooking, please.") == content_words("Cook!") == {"cook"}
    assert off_topic("What should I know about steel?", "Me: Welcome to your trusty sidekick!")
    assert not off_topic("What should I know about steel?", "Steel is iron with a little carbon.")
    # plurals and -ing fold both ways, case does not matter
    assert not off_topic("Tell me about volcanoes.", "A volcano is a mountain that erupts.")
    assert not off_topic("Tell me about batteries.", "A battery stores energy.")
    assert not off_topic("Tell me about guitar strings.", "A string vibrates.")
    assert not off_topic("Tell me about cookies.", "This cookie is sweet.")
    assert not off_topic("Tell me about the horse.", "Horses run fast.")
    assert not off_topic("Tell me about the sky.", "The skies are blue.")
    assert not off_topic("Why do people like running?", "They run to feel free.")
    assert not off_topic("What is Earth's core made of?", "The core is iron.")
    # unrelated short words and contractions do not make an answer on topic
    assert off_topic("Tell me about notes.", "I'm not sure, here is more!")
    assert off_topic("I'm curious, what's a volcano?", "I'm a helpful assistant.")
    assert content_words("Can you tell me more about tigers?") == {"tiger"}
    assert not off_topic("Why do people like cooking?", "They cook for friends.")
    assert not off_topic("Tell me about the MOON.", "The moon is bright.")
    # a prompt that asks about nothing in particular: never off topic
    assert not off_topic("hi, can you help me?", "Of course! What would you like to know?")


def test_a_candidate_whose_answers_leave_their_prompts_is_rejected_with_its_numbers():
    prompts = [f"Tell me about {t}." for t in ("cats", "steel", "rivers", "bread", "trains",
                                                 "honey", "maps", "clocks", "owls", "rice")]
    on = [f"{q.split()[-1][:-1].capitalize()} are worth knowing about, and here is why." for q in prompts]
    drift = "I'm a helpful assistant and I love to chat with you."
    d = Degeneration.of([drift] * 8 + on[8:], on, prompts=prompts)
    assert (d.candidate_off_topic, d.current_off_topic, d.only_candidate_off_topic) == (8, 0, 8)
    check = degeneration_check(d)
    assert not check.passed
    assert "off topic (no word of the prompt) 8 vs 0" in check.text
    assert "answers off topic in more prompts (p 0.004" in check.text
    # one drifted answer is not measurably more (p 0.5); chat messages count their last user turn
    chats = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi!"},
              {"role": "user", "content": q}] for q in prompts]
    one = Degeneration.of([drift] + on[1:], on, prompts=chats)
    assert one.only_candidate_off_topic == 1 and degeneration_check(one).passed
    # without prompts the off-topic counts are unmeasured, and the reason does not print them
    unmeasured = Degeneration.of([drift] * 10, on)
    assert unmeasured.candidate_off_topic is None and unmeasured.only_current_off_topic is None
    assert "off topic" not in degeneration_check(unmeasured).text
    with pytest.raises(ValueError):
        Degeneration.of(on, on, prompts=prompts[:3])


def test_the_record_keeps_sample_answers_where_the_verdicts_differ_first_cut_to_length():
    import json

    from prefloop.align.degeneration import SAMPLE_CHARS, SAMPLES
    prompts = [f"Tell me about {t}." for t in ("cats", "steel", "rivers", "bread", "trains",
                                                 "honey", "maps", "clocks")]
    on = [f"{q.split()[-1][:-1].capitalize()} are worth knowing about." for q in prompts]
    long_on = on[0] + " " + " ".join(f"fact{i}" for i in range(80))  # long, no loop
    candidate = [long_on] + on[1:5] + [LOOP] + on[6:7] + ["I'm a helpful assistant."]
    d = Degeneration.of(candidate, on, prompts=prompts)
    record = json.loads(json.dumps(d.to_record()))  # what the manifest and job log store
    samples = record["samples"]
    assert len(samples) == SAMPLES
    # the looping answer (prompt 6) and the off-topic one (prompt 8) come first, in prompt order
    assert [s["prompt"] for s in samples[:2]] == ["Tell me about honey.", "Tell me about clocks."]
    assert samples[0]["candidate_loops"] and not samples[0]["current_loops"]
    assert samples[1]["candidate_off_topic"] and not samples[1]["current_off_topic"]
    assert samples[1]["current"] == on[7] and samples[1]["candidate"] == "I'm a helpful assistant."
    # then the others from the first prompt on; long texts are cut with an ellipsis
    assert samples[2]["prompt"] == "Tell me about cats."
    assert len(samples[2]["candidate"]) == SAMPLE_CHARS and samples[2]["candidate"].endswith("…")
    # without prompts the answers are kept, the prompt and off-topic verdicts are unmeasured
    bare = Degeneration.of(candidate, on).to_record()["samples"]
    assert bare[0]["prompt"] is None and bare[0]["candidate"] == LOOP
    assert bare[0]["candidate_off_topic"] is None


def test_a_longer_natural_answer_keeps_its_distinct_ratio():
    long = ("The cat sat on the warm mat and looked at the garden for a while, then it "
            "walked to the kitchen where the dog was sleeping near the door, and the two of "
            "them waited there until the evening came and the lights went on in the house.")
    assert answer_stats(long).distinct_ratio > 0.75  # the first 32 words only
    assert degeneration_check(Degeneration.of([long] * 10, [FINE] * 10)).passed  # 3.2x longer


def test_a_candidate_far_from_the_current_version_on_its_own_answers_is_rejected():
    def check(kl):
        return degeneration_check(Degeneration.of([FINE] * 10, [FINE] * 10, kl), max_own_kl=0.5)
    far = check(0.9)
    assert not far.passed
    assert "KL on its own answers 0.900 nats/token > bound 0.5" in far.text
    assert check(0.3).passed and "KL on its own answers 0.300 nats/token" in check(0.3).text
    assert check(None).passed and "own answers" not in check(None).text  # not measured


def test_own_answer_kl_is_zero_for_the_same_weights_and_grows_with_a_perturbation(tmp_path):
    import torch
    from align_helpers import tiny_policy
    from transformers import AutoTokenizer

    from prefloop.align.jobs.preference import own_answer_kl
    from prefloop.align.train.common import load_causal_lm
    path = tiny_policy(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(path)
    current, candidate = load_causal_lm(path), load_causal_lm(path)
    prompts = [[{"role": "user", "content": q}] for q in ("hi", "tell me about cats")]
    answers = ["hello there friend", "cats are small and they like to sleep"]
    assert own_answer_kl(candidate, current, tok, prompts, answers) == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        candidate.get_output_embeddings().weight.mul_(3.0)  # sharper everywhere
    kl = own_answer_kl(candidate, current, tok, prompts, answers)
    assert kl > 0.01
    assert own_answer_kl(candidate, current, tok, prompts, ["", ""]) is None  # nothing to score
