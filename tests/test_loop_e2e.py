"""The whole loop on the default model with real processes: serve answers, submit a consistent
synthetic preference through gRPC, run one `prefloop align run` job, and check that the promoted
version's held-out preference accuracy rose and that the live server now serves it."""
import json
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


def test_served_voted_retrained_served_better(tmp_path):
    data = tmp_path / "data"
    init = subprocess.run([sys.executable, "-m", "prefloop.server.cli", "models", "init",
                           "--data-dir", str(data)], capture_output=True, text=True, timeout=600)
    assert init.returncode == 0, init.stderr
    server = start_server_process(tmp_path, "--registry-poll", "0.5")
    try:
        with Client(server.target, token=USER_TOKEN, timeout=120) as client:
            for i, topic in enumerate(TOPICS):
                question = [{"role": "user", "content": f"Say one sentence about {topic}."}]
                answer = client.chat(question, max_tokens=16, temperature=0)
                assert answer.model_version == "v0000"
                plain = answer.completions[0].text
                # the users' consistent taste: of two otherwise equal answers, the one that
                # praises bananas is better (the other praises some other fruit)
                other = OTHER_FRUITS[i % len(OTHER_FRUITS)]
                ack = client.submit_preference(
                    prompt_messages=question, chosen_text=f"I like bananas. {plain}",
                    rejected_text=f"I like {other}. {plain}")
                assert not ack.duplicate
        job = subprocess.run(
            [sys.executable, "-m", "prefloop.server.cli", "align", "run", "--data-dir", str(data),
             "--method", "dpo", "--min-new-pairs", "16", "--auto-promote", "--lr", "1e-5",
             "--min-heldout-pairs", "8",  # 40 votes leave 8 held out: the gate's sign test decides
             "--epochs", "2", "--json"], capture_output=True, text=True, timeout=1800)
        assert job.returncode == 0, job.stderr[-3000:]
        registry = Registry(data)
        assert registry.current() == "v0001", job.stdout
        gate = registry.manifest("v0001").gate
        assert gate["passed"] and gate["candidate_accuracy"] > gate["current_accuracy"], gate
        with Client(server.target, token=ADMIN_TOKEN) as admin:
            assert wait_until(lambda: admin.model_info().model_version == "v0001", timeout=120)
            answer = admin.chat([{"role": "user", "content": "Say one sentence about a cat."}],
                                max_tokens=8, temperature=0)
            assert answer.model_version == "v0001"
    finally:
        assert server.terminate() == 0
