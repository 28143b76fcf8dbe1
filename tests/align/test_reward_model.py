"""Reward models on a tiny random Llama (the default model's tokenizer): pairwise metrics in closed
form, TRL's tokenization, one real `align rm` job (TRL RewardTrainer) that must learn a clear
synthetic rule ("banana" answers win) and land in the registry as kind "reward", and `align score`
writing the queryable scores table."""
from __future__ import annotations

import datetime as dt
import math

import pyarrow.parquet as pq
import pytest
import torch
from align_helpers import banana_pairs, tiny_policy, write_pairs

from prefloop.align import scores as S
from prefloop.align.jobs.reward import RMJobConfig, load_rm_pairs, run_rm_job, score_log
from prefloop.align.train import reward as R
from prefloop.align.train.common import load_tokenizer
from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition
from prefloop.server.feedback.rows import PreferencePair
from prefloop.server.jobs import job_history


def test_pairwise_metrics_by_hand():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    m = R.pairwise_metrics(chosen, rejected)
    # wins: 1 (1 > 0), 1/2 (tie), 0 (2 < 3)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["margin"] == pytest.approx(0.0)
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(1))) / 3
    assert m["loss"] == pytest.approx(expected, abs=1e-12)
    # with margins: -log σ(d - m)
    m2 = R.pairwise_metrics(chosen, rejected, torch.tensor([1.0, 0.0, 0.0]))
    assert m2["loss"] == pytest.approx((math.log(2) + math.log(2) + math.log(1 + math.e)) / 3,
                                       abs=1e-12)
    assert R.pairwise_metrics(torch.zeros(0), torch.zeros(0)) == {"pairs": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (two are several times slower on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


def test_encode_conversation_is_trls_tokenization(tiny):
    from trl.data_utils import _tokenize
    tok = load_tokenizer(tiny)
    prompt = [{"role": "user", "content": "Say something."}]
    answer = [{"role": "assistant", "content": "banana river."}]
    ids = R.encode_conversation(tok, prompt, answer, max_length=1024)
    assert ids == list(_tokenize(tok, prompt + answer)["input_ids"])
    assert R.encode_conversation(tok, prompt, "banana river.", 1024) == ids
    assert R.encode_conversation(tok, prompt, answer, 5) == ids[-5:]  # keeps the end


def test_score_pairs_uses_one_forward_per_batch_and_matches_single_scoring(tiny):
    tok = load_tokenizer(tiny)
    model = R.load_reward_model(tiny, new_head=True)
    model.config.pad_token_id = tok.pad_token_id
    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    pairs = [PreferencePair(p["prompt"], [{"role": "assistant", "content": p["chosen"]}],
                            [{"role": "assistant", "content": p["rejected"]}], f"f{i}", t)
             for i, p in enumerate(banana_pairs(3))]
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    chosen, rejected = R.score_pairs(model, tok, pairs, batch_size=4)
    handle.remove()
    assert len(calls) == 1  # chosen and rejected of the batch concatenated
    alone = R.score_texts(model, tok, [p.prompt for p in pairs], [p.chosen for p in pairs],
                          batch_size=1)
    assert torch.allclose(chosen, alone, atol=1e-5)  # padding does not change a score
    assert not torch.allclose(chosen, rejected)


@pytest.fixture(scope="module")
def rm_job(tiny, tmp_path_factory):
    """One real reward-model job on 40 banana pairs (module-wide)."""
    d = tmp_path_factory.mktemp("rmlog") / "data"
    write_pairs(d, banana_pairs(40))
    cfg = RMJobConfig(data_dir=d, model=str(tiny), min_heldout=8,
                      train=R.RewardTrainConfig(epochs=4, lr=3e-3, batch_size=8, max_length=128))
    return d, run_rm_job(cfg)


def test_rm_job_learns_the_rule_and_is_published_as_reward(rm_job):
    d, result = rm_job
    registry = reg.Registry(d)
    assert result.status == "published", result.reason
    manifest = registry.manifest(result.version)
    assert manifest.kind == reg.KIND_REWARD and manifest.method == "rm"
    assert manifest.parent == reg.BASE_VERSION
    held = manifest.metrics["heldout"]
    assert held["pairs"] == 8  # the newest 20% of 40
    assert held["accuracy"] >= 0.875, held
    assert manifest.gate["passed"] is True
    assert manifest.data["rows"] == {"train": 32, "heldout": 8}
    assert registry.verify(result.version).ok
    with pytest.raises(FailedPrecondition):  # reward models are never served
        registry.promote(result.version)
    jobs = job_history(registry)
    assert jobs[-1].status == "published" and jobs[-1].method == "rm"
    # the published folder loads as a one-output sequence classifier with the base's tokenizer
    model = R.load_reward_model(registry.version_dir(result.version))
    assert model.config.num_labels == 1
    tok = load_tokenizer(registry.version_dir(result.version))
    s = R.score_texts(model, tok, [[{"role": "user", "content": "Say something about x."}]] * 2,
                      ["banana river stone.", "plum river stone."])
    assert s[0] > s[1]


def test_rm_pairs_carry_margins(rm_job):
    d, _ = rm_job
    rows = load_rm_pairs(d)
    assert len(rows) == 40 and all(r.margin == 0.0 for r in rows)
    assert rows == sorted(rows, key=lambda r: r.created_at)
    trl = R.trl_rows(rows[:2], margin=True)
    cut_flags = {"chosen_cut", "rejected_cut"}  # applied and removed by train_reward_model
    assert set(trl[0]) == {"prompt", "chosen", "rejected", "margin"} | cut_flags
    assert set(R.trl_rows(rows[:2], margin=False)[0]) == {"prompt", "chosen", "rejected"} | cut_flags


def _log_generations(data_dir, texts: list[str]) -> list[str]:
    from prefloop.server.feedback.store import FeedbackStore, StoreConfig
    from prefloop.server.feedback.wal import WalConfig
    ids = []
    with FeedbackStore(StoreConfig(data_dir=data_dir, wal=WalConfig(linger_s=0.0005))) as store:
        for i, text in enumerate(texts):
            rid = f"resp-test-{i}"
            ids.append(rid)
            store.record_generation({
                "response_id": rid, "request_id": f"req-{i}",
                "created_at": dt.datetime.now(dt.timezone.utc), "model_version": "v0000",
                "backend": "native", "messages": [{"role": "user",
                                                   "content": f"Say something about x{i}."}],
                "completion": text, "finish_reason": "stop", "prompt_tokens": 5,
                "completion_tokens": 3, "sampling": {"temperature": 1.0, "n": 1},
                "latency_ms": 1.0})
    return ids


def test_score_writes_a_queryable_table_once_per_generation(rm_job):
    d, result = rm_job
    ids = _log_generations(d, ["banana river stone.", "plum river stone.", "banana cloud.", ""])
    out = score_log(d, result.version, progress=False)
    assert out["scored"] == 3  # the empty completion is skipped
    table = S.load_scores(d, result.version)
    assert table.num_rows == 3 and set(table.column("response_id").to_pylist()) == set(ids[:3])
    by_id = dict(zip(table.column("response_id").to_pylist(), table.column("score").to_pylist()))
    assert by_id[ids[0]] > by_id[ids[1]]  # banana wins
    files = S.part_files(d, result.version)
    assert len(files) == 1 and files[0].parent.name == f"rm={result.version}"
    assert pq.read_table(files[0]).schema.equals(S.SCHEMA)
    # nothing new: nothing scored; --rescore appends, readers keep the latest row per response
    assert score_log(d, result.version, progress=False)["scored"] == 0
    assert score_log(d, result.version, rescore=True, progress=False)["scored"] == 3
    assert len(S.part_files(d, result.version)) == 2
    assert S.load_scores(d, result.version).num_rows == 3
    summary = S.summary_by_model_version(S.load_scores(d))
    assert summary[0]["model_version"] == "v0000" and summary[0]["count"] == 3
    # a policy version is not a reward model
    with pytest.raises(FailedPrecondition):
        score_log(d, reg.BASE_VERSION, progress=False)
    # the command: JSON summary on stdout, exit 2 for a policy version
    import io
    import json
    from contextlib import redirect_stdout

    from prefloop import cli
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["align", "score", "--data-dir", str(d), "--rm", result.version,
                         "--json"]) == 0
        assert cli.main(["align", "score", "--data-dir", str(d), "--rm", "v0000"]) == 2
    out = json.loads(buf.getvalue())
    assert out["scored"] == 0 and out["total"] == 3
