"""SFT (`prefloop align sft`): the training rows from each feedback kind, one real job on a tiny
random Llama, an SFT version as the base of a later DPO job; and the held-out scoring check: a
deliberately changed model must score differently on held-out pairs, through the job's own
evaluation, whether the current version is the base or a registry version."""
from __future__ import annotations

import datetime as dt
import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from align_helpers import banana_pairs, tiny_policy, write_pairs

from prefloop import cli
from prefloop.align import data as data_mod
from prefloop.align.gate import GateConfig
from prefloop.align.jobs.preference import JobConfig, run_job
from prefloop.align.train.common import load_causal_lm, load_tokenizer
from prefloop.align.train.preference import TrainConfig, TrainResult
from prefloop.server import registry as reg
from prefloop.server.feedback.rows import PreferencePair, RatedAnswer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


def _store(data_dir):
    from prefloop.server.feedback.store import FeedbackStore, StoreConfig
    from prefloop.server.feedback.wal import WalConfig
    return FeedbackStore(StoreConfig(data_dir=data_dir, wal=WalConfig(linger_s=0.0005)))


def _generation(store, rid: str, prompt: str, text: str) -> None:
    store.record_generation({
        "response_id": rid, "request_id": f"req-{rid}", "created_at": dt.datetime.now(dt.timezone.utc),
        "model_version": "v0000", "backend": "native",
        "messages": [{"role": "user", "content": prompt}], "completion": text,
        "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 3,
        "sampling": {"temperature": 1.0, "n": 2}, "latency_ms": 1.0})


def test_a_pairs_job_without_pairs_says_how_many_ratings_wait_and_what_trains_on_them(tmp_path):
    """Thumbs alone: `align run` (dpo) skips, and its reason counts the waiting ratings and names
    the jobs that use them, instead of only "0 new pairs"."""
    from conftest import fake_model
    d = tmp_path / "data"
    with _store(d) as s:
        for i in range(3):
            _generation(s, f"t{i}", f"Question {i}?", f"answer {i}")
        s.flush()
        for i, score in enumerate((1, -1, -1)):
            s.submit_rating(response_id=f"t{i}", score=score, scale="thumbs")
    cfg = JobConfig(data_dir=d, command="run", incremental=True, min_new=8,
                    model=fake_model(tmp_path / "model"))
    result = run_job(cfg, train_fn=lambda *a: pytest.fail("nothing to train on"))
    assert result.status == "skipped" and result.reason.startswith("0 new pairs since")
    assert "3 new ratings (thumbs / stars) are waiting" in result.reason
    assert "`align run kto`" in result.reason and "--pairs-from-ratings" in result.reason


def test_sft_rows_from_each_feedback_kind(tmp_path):
    d = tmp_path / "data"
    with _store(d) as s:
        # a text-form preference: the user's own better answer
        s.submit_preference(prompt_messages=[{"role": "user", "content": "Name a fruit."}],
                            chosen_text="Banana, written by the user.", rejected_text="Plum.")
        # a pick between two generated answers
        _generation(s, "g-a", "Say hi.", "Hi there!")
        _generation(s, "g-b", "Say hi.", "Go away.")
        s.flush()
        s.submit_preference(chosen_response_id="g-a", rejected_response_id="g-b")
        # ratings: thumbs up, 5 stars and 4 stars are top rated; thumbs down, 3 and 2 stars not
        for rid, prompt, text in (("r-up", "Q1?", "up answer"), ("r-down", "Q2?", "down answer"),
                                  ("r-5", "Q3?", "five stars"), ("r-4", "Q4?", "four stars"),
                                  ("r-3", "Q5?", "three stars"), ("r-2", "Q6?", "two stars")):
            _generation(s, rid, prompt, text)
        s.flush()
        s.submit_rating(response_id="r-up", score=1, scale="thumbs")
        s.submit_rating(response_id="r-down", score=-1, scale="thumbs")
        for rid, stars in (("r-5", 5), ("r-4", 4), ("r-3", 3), ("r-2", 2)):
            s.submit_rating(response_id=rid, score=stars, scale="stars")
        # the same answer rated again: one row
        s.submit_rating(response_id="r-up", score=1, scale="thumbs")
    rows = data_mod.load_sft_examples(d)
    got = {(r.text, r.source) for r in rows}
    assert got == {("Banana, written by the user.", "user_answer"), ("Hi there!", "chosen"),
                   ("up answer", "top_rated"), ("five stars", "top_rated"),
                   ("four stars", "top_rated")}
    assert rows == sorted(rows, key=lambda r: r.created_at)
    by_text = {r.text: r for r in rows}
    assert by_text["Hi there!"].prompt == [{"role": "user", "content": "Say hi."}]
    assert by_text["Hi there!"].completion == [{"role": "assistant", "content": "Hi there!"}]
    assert rows[0].to_trl().keys() == {"prompt", "completion", "completion_cut"}
    later = data_mod.load_sft_examples(d, after=by_text["Hi there!"].created_at)
    assert "Banana, written by the user." not in {r.text for r in later}


def test_sft_examples_pure_function_dedupes_and_skips_empty():
    t = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    p = [{"role": "user", "content": "x"}]
    a = [{"role": "assistant", "content": "same"}]
    pairs = [PreferencePair(p, a, a, "f1", t, source="explicit"),
             PreferencePair(p, [{"role": "assistant", "content": " "}], a, "f2", t,
                            source="reference")]
    examples = [RatedAnswer(p, a, True, "f3", t + dt.timedelta(seconds=1), source="rating"),
                RatedAnswer(p, a, True, "f4", t, source="preference")]
    rows = data_mod.sft_examples(pairs, examples)
    assert [(r.feedback_id, r.source) for r in rows] == [("f1", "user_answer")]


# ---- held-out scoring runs the candidate's weights --------------------------------------------


def _nudged(base_dir, rows, toward: str, steps: int = 15):
    """The base model after `steps` Adam steps raising the log-prob of each pair's `toward`
    answer: a deliberately changed model (no TRL, no reference)."""
    from prefloop.align import evaluate as ev
    tok, model = load_tokenizer(base_dir), load_causal_lm(base_dir)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    items = [ev.encode(tok, r.prompt, getattr(r, toward), 256) for r in rows]
    input_ids, attention_mask, completion_mask = ev._batch(items, tok.pad_token_id, "cpu")
    for _ in range(steps):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        loss = -(logp * completion_mask[:, 1:]).sum() / completion_mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _train_fn_returning(model):
    def train_fn(base_dir, rows, cfg):
        return TrainResult(model, load_tokenizer(base_dir), [{"loss": 0.1}], 1, 0.1)
    return train_fn


def test_heldout_scoring_runs_the_candidates_weights(tiny, tmp_path):
    d = tmp_path / "data"
    write_pairs(d, banana_pairs(40, seed=3))
    heldout = data_mod.time_split(data_mod.load_pairs(d), 0.2).heldout
    assert len(heldout) == 8
    # deliberately far from the base (KL and drift unbounded; a nudged tiny model's answers
    # are not what the degeneration check should judge here)
    gate = GateConfig(min_heldout=8, max_kl=100.0, max_root_kl=100.0, degeneration_prompts=0)
    cfg = dict(data_dir=d, model=str(tiny), eval_batch_size=8, gate=gate)
    good = run_job(JobConfig(**cfg), train_fn=_train_fn_returning(_nudged(tiny, heldout,
                                                                          "chosen")))
    held, cur = good.metrics["heldout"], good.metrics["current"]
    assert cur["version"] == "v0000"
    from prefloop.align import evaluate as ev
    base_scores = ev.score_pairs(load_causal_lm(tiny), load_tokenizer(tiny), heldout)
    assert cur["heldout_pref_accuracy"] == ev.pair_metrics(base_scores, beta=0.1)["pref_accuracy"]
    assert held["pref_accuracy"] == 1.0
    assert held["implicit_reward_accuracy_vs_current"] == 1.0
    assert good.gate["wins"] == 8 and good.gate["losses"] == 0 and good.gate["passed"]
    # the current version is now a registry version (not the reference pass): promote the good
    # one, then a candidate nudged the other way must score differently again, against it
    registry = reg.Registry(d)
    registry.promote(good.version, reason="test")
    bad = run_job(JobConfig(**dict(cfg, base="v0000")),
                  train_fn=_train_fn_returning(_nudged(tiny, heldout, "rejected")))
    assert bad.metrics["current"]["version"] == good.version
    assert bad.metrics["current"]["heldout_pref_accuracy"] == held["pref_accuracy"]
    assert bad.metrics["heldout"]["pref_accuracy"] == 0.0
    assert bad.gate["losses"] == 8 and not bad.gate["passed"] and bad.status == "rejected"


# ---- the SFT job ------------------------------------------------------------------------------


def test_align_sft_job_then_dpo_from_the_sft_version(tiny, tmp_path):
    d = tmp_path / "data"
    write_pairs(d, banana_pairs(40, seed=5))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["align", "sft", "--data-dir", str(d), "--model", str(tiny), "--lr", "1e-2",
                       "--batch-size", "8", "--epochs", "2", "--eval-batch-size", "8",
                       "--min-heldout-pairs", "8", "--json"])
    out = json.loads(buf.getvalue())
    assert rc == 0 and out["method"] == "sft" and out["version"] == "v0001", out
    assert out["data"]["rows"] == {"train": 32, "heldout": 8}
    held = out["metrics"]["heldout"]
    assert held["pairs"] == 8  # the held-out window's preference pairs, not trained on
    assert held["sft"]["nll_per_token"] < held["sft"]["ref_nll_per_token"]
    assert out["metrics"]["train"]["nll_per_token"] < out["metrics"]["train"]["ref_nll_per_token"]
    assert held["kl_per_token"] > 0 and "implicit_reward_accuracy_vs_current" in held
    gate = out["gate"]
    assert {"passed", "reasons", "wins", "losses", "interval", "kl_per_token"} <= set(gate)
    # count, both tests, KL, root KL, degeneration, 3 reported (answer shift, pref accuracy, season)
    assert gate["heldout_pairs"] == 8 and len(gate["reasons"]) == 8
    assert gate["answer_shift"]["answers"] == 16 and not gate["answer_shift"]["joined"]
    registry = reg.Registry(d)
    m = registry.manifest("v0001")
    assert (m.method, m.kind, m.parent) == ("sft", "policy", "v0000")
    assert m.hyperparameters["method"] == "sft" and "loss" not in m.hyperparameters
    assert registry.verify("v0001").ok
    # SFT -> DPO: a later job starts from the SFT version
    write_pairs(d, banana_pairs(10, seed=6))

    def train_fn(base_dir, rows, cfg):
        train_fn.base = base_dir.name
        return TrainResult(load_causal_lm(base_dir), load_tokenizer(base_dir), [], 1, 0.1)
    dpo = run_job(JobConfig(data_dir=d, base="v0001", eval_batch_size=8,
                            train=TrainConfig(method="dpo")), train_fn=train_fn)
    assert train_fn.base == "v0001" and dpo.base == "v0001"
    assert dpo.metrics["heldout"]["kl_per_token"] == pytest.approx(0.0, abs=1e-9)
    # judged against the current version (still v0000): the SFT weights' move is what it sees
    assert dpo.metrics["current"]["version"] == "v0000" and dpo.gate["current_version"] == "v0000"
