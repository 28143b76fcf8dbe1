"""The whole loop on the default model with real processes: serve answers, submit a consistent
synthetic preference through gRPC, run one `prefloop align run` job, and check that the promoted
version's held-out preference accuracy rose and that the live server now serves it.

Random votes through the same path (40 coin flips: rejected, nothing promoted) ran here until
2026-12-04; one seeded draw of a statistical property costs the suite 3.5 minutes, so it is left to
the measurements of the gate's control (benchmarks/gate_control.py, the season tests with the real
decision functions in tests/align/test_season.py, the rejection path on tiny models in
tests/align/test_align_dpo.py)."""
import subprocess
import sys

import pytest
from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until

from prefloop.clients import Client
from prefloop.server.registry import Registry

pytestmark = pytest.mark.slow
TOPICS = ["the sea", "a cat", "winter", "music", "a city", "bread", "the moon", "a river", "trees",
          "trains", "coffee", "rain", "mountains", "books", "a garden", "the wind", "snow", "friends",
          "a lamp", "clouds", "a bridge", "the sun", "stars", "a bicycle", "tea", "a door", "shoes",
          "birds", "a clock", "the road", "a window", "fire", "an island", "a market", "the night",
          "honey", "a song", "paper", "a boat", "dust"]
OTHER_FRUITS = ["apples", "cherries", "grapes", "lemons", "oranges", "pears", "plums", "melons"]


def vote(server, chooses_bananas) -> None:
    """40 users ask, then vote through gRPC. `chooses_bananas(i)`: does user i prefer the answer
    that praises bananas (the other praises another fruit; otherwise the answers are equal)?"""
    with Client(server.target, token=USER_TOKEN, timeout=120) as client:
        for i, topic in enumerate(TOPICS):
            question = [{"role": "user", "content": f"Say one sentence about {topic}."}]
            answer = client.chat(question, max_tokens=16, temperature=0)
            assert answer.model_version == "v0000"
            plain = answer.completions[0].text
            fruit = OTHER_FRUITS[i % len(OTHER_FRUITS)]
            banana, other = f"I like bananas. {plain}", f"I like {fruit}. {plain}"
            chosen, rejected = (banana, other) if chooses_bananas(i) else (other, banana)
            ack = client.submit_preference(prompt_messages=question, chosen_text=chosen,
                                           rejected_text=rejected)
            assert not ack.duplicate


def vote_and_retrain(tmp_path, chooses_bananas):
    """A live server on a data dir with v0000, 40 votes, then one `align run --auto-promote`
    job with the default learning rate. Returns (job, registry, the running server)."""
    data = tmp_path / "data"
    init = subprocess.run([sys.executable, "-m", "prefloop.cli", "models", "init",
                           "--data-dir", str(data)], capture_output=True, text=True, timeout=600)
    assert init.returncode == 0, init.stderr
    server = start_server_process(tmp_path, "--registry-poll", "0.5")
    try:
        vote(server, chooses_bananas)
        job = subprocess.run(
            [sys.executable, "-m", "prefloop.cli", "align", "run", "--data-dir", str(data),
             "--method", "dpo", "--min-new-pairs", "16", "--auto-promote",  # default lr (LoRA)
             "--min-heldout-pairs", "8",  # 40 votes leave 8 held out
             # judged at the per-job level: the season's spending would cut this first look's
             # to a sixth on the default --promote-via auto (tests/align/test_season.py); the
             # loop's mechanics are what this test is about
             "--season-spending", "none",
             "--degeneration-prompts", "8",  # the check runs; 8 prompts keep the test shorter
             # one epoch: 8 of 8 held-out wins at +4.1 nats mean margin (2026-12-08; two
             # epochs cost the suite ~25 s more for the same verdict)
             "--epochs", "1", "--json"], capture_output=True, text=True, timeout=1800)
    except BaseException:
        server.terminate()
        raise
    return job, Registry(data), server


def test_served_voted_retrained_served_better(tmp_path):
    job, registry, server = vote_and_retrain(tmp_path, lambda i: True)  # everyone likes bananas
    try:
        assert job.returncode == 0, job.stderr[-3000:]
        assert registry.current() == "v0001", job.stdout
        gate = registry.manifest("v0001").gate
        assert gate["passed"] and gate["candidate_accuracy"] > gate["current_accuracy"], gate
        # the degeneration check ran on the LoRA candidate, its own-answer KL within the bound
        assert any("KL on its own answers" in r for r in gate["reasons"]), gate["reasons"]
        with Client(server.target, token=ADMIN_TOKEN) as admin:
            assert wait_until(lambda: admin.model_info().model_version == "v0001", timeout=120)
            answer = admin.chat([{"role": "user", "content": "Say one sentence about a cat."}],
                                max_tokens=8, temperature=0)
            assert answer.model_version == "v0001"
    finally:
        assert server.terminate() == 0
