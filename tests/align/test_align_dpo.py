"""align with real TRL training on a tiny random Llama (hidden 32, the default model's tokenizer):
closed-form checks at initialization, one DPO job through the CLI that must move held-out
preference accuracy on a clear synthetic rule ("banana" answers win), the incremental `align run`
loop (watermark, skip, promote, lock, failure), LoRA merging, KTO, and the schedule."""
from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from align_helpers import banana_pairs, tiny_policy, write_pairs
from safetensors import safe_open

from prefloop import cli
from prefloop.align import data as data_mod
from prefloop.align import evaluate as ev
from prefloop.align.jobs.preference import JobConfig, run_job
from prefloop.align.jobs.runner import watermark
from prefloop.align.train.common import load_causal_lm, load_tokenizer
from prefloop.align.train.preference import TrainConfig, TrainResult
from prefloop.server import registry as reg
from prefloop.server.errors import Unavailable
from prefloop.server.feedback.rows import PreferencePair
from prefloop.server.jobs import job_history, job_lock
from prefloop.server.model.loader import load_model

# 32 votes hold out 6 pairs: even 6 wins of 6 (p = 1/64) pass only at the per-job level, so these
# tests of learning and orchestration judge at it (the season's spending: test_season.py, below)
FAST = ["--no-lora", "--lr", "1e-2", "--batch-size", "8", "--eval-batch-size", "8", "--min-heldout-pairs", "3",
        "--season-spending", "none"]


def as_pairs(pairs: list[dict]) -> list[PreferencePair]:
    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return [PreferencePair(p["prompt"], [{"role": "assistant", "content": p["chosen"]}],
                           [{"role": "assistant", "content": p["rejected"]}], f"fb-{i}", t)
            for i, p in enumerate(pairs)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def log_32(tmp_path_factory):
    d = tmp_path_factory.mktemp("log") / "data"
    write_pairs(d, banana_pairs(32))
    return d


def fresh_copy(log_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(log_dir, target, ignore=shutil.ignore_patterns("registry", "LOCK"))
    return target


@pytest.fixture(scope="module")
def dpo_job(tiny, log_32, tmp_path_factory):
    """One real `prefloop align dpo` run (module-wide: the other tests reuse its weights)."""
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["align", "dpo", "--data-dir", str(log_32), "--model", str(tiny),
                       "--epochs", "3", "--json", *FAST])
    return rc, json.loads(buf.getvalue()), reg.Registry(log_32)


def test_initial_metrics_are_closed_form_and_match_trl(tiny, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    tok, policy, ref = load_tokenizer(tiny), load_causal_lm(tiny), load_causal_lm(tiny)
    pairs = as_pairs(banana_pairs(8, seed=1))
    scores = ev.score_pairs(policy, tok, pairs, reference=ref, batch_size=4)
    m = ev.pair_metrics(scores, beta=0.1)
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-9)  # policy == reference
    assert m["reward_accuracy"] == 0.0 and m["reward_margin"] == 0.0
    assert m["kl_per_token"] == pytest.approx(0.0, abs=1e-9)
    assert m["pref_accuracy"] == m["ref_pref_accuracy"]
    # TRL's DPOTrainer sees exactly the same sequences and log-probs (tokenization check)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=4,
                     bf16=False, use_cpu=True, gradient_checkpointing=False)
    trl_rows = Dataset.from_list([{k: getattr(p, k) for k in ("prompt", "chosen", "rejected")}
                                  for p in pairs])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                         train_dataset=trl_rows)
    trl_metrics = trainer.evaluate(trl_rows)
    chosen, rejected = ev.split_pair_scores(scores)
    assert trl_metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert trl_metrics["eval_logps/chosen"] == pytest.approx(float(chosen.logps.mean()), rel=1e-4)
    assert trl_metrics["eval_logps/rejected"] == pytest.approx(float(rejected.logps.mean()),
                                                               rel=1e-4)


def test_dpo_job_moves_heldout_accuracy_and_publishes_a_version(dpo_job, tiny):
    rc, out, registry = dpo_job
    assert rc == 0 and out["status"] == "published" and out["version"] == "v0001"
    held, train = out["metrics"]["heldout"], out["metrics"]["train"]
    base_accuracy = out["metrics"]["current"]["heldout_pref_accuracy"]
    print(f"held-out pref accuracy {base_accuracy} -> {held['pref_accuracy']}; "
          f"reward accuracy {held['reward_accuracy']}, margin {held['reward_margin']:.3f}, "
          f"KL/token {held['kl_per_token']:.4f}; train loss {train['loss']:.3f}")
    assert out["metrics"]["current"]["version"] == "v0000"
    assert held["pairs"] == 6 and train["pairs"] == 16  # the newest 16 of 26 (--max-train-eval)
    assert held["pref_accuracy"] >= 0.9 and held["pref_accuracy"] > base_accuracy
    assert held["reward_accuracy"] >= 0.9 and held["reward_margin"] > 0
    assert train["loss"] < math.log(2) - 0.2
    assert 0 < held["kl_per_token"] < 0.5
    # count, both tests, KL, root KL, degeneration, 3 reported (answer shift, pref accuracy, season)
    assert out["gate"]["passed"] and len(out["gate"]["reasons"]) == 8
    # a DPO job's held-out pairs: the answer-shift test is reported, not joined
    assert any(r.startswith("reported: the answers it writes (") for r in out["gate"]["reasons"])
    assert out["gate"]["answer_shift"]["answers"] == 12 and not out["gate"]["answer_shift"]["joined"]
    m = registry.manifest("v0001")
    assert (m.parent, m.method, m.kind, m.job_id) == ("v0000", "dpo", "policy", out["job_id"])
    assert m.hyperparameters["beta"] == 0.1 and m.hyperparameters["lr"] == 0.01
    assert m.hyperparameters["loss"] == "sigmoid" and m.hyperparameters["epochs"] == 3
    assert m.data["rows"] == {"train": 26, "heldout": 6} and m.data["trained_until"]
    assert m.metrics["heldout"]["pref_accuracy"] == held["pref_accuracy"]
    assert m.gate["passed"] is True
    folder = registry.version_dir("v0001")
    assert m.files["model.safetensors"]["sha256"] == reg.sha256_file(folder / "model.safetensors")
    assert registry.verify("v0001").ok
    # published, not promoted (no --promote): the base the job created stays current
    assert registry.current() == "v0000" and registry.list_versions() == ["v0000", "v0001"]
    # the server's loader takes the folder, and the weights moved
    served = load_model(folder)
    base = load_model(registry.version_dir("v0000"))
    assert not torch.equal(served.lm_head.weight, base.lm_head.weight)
    assert (folder / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True


def trained_weights(dpo_job):
    """A train_fn that returns the module's DPO result at once (orchestration tests)."""
    registry = dpo_job[2]
    folder = registry.version_dir("v0001")

    def train_fn(base_dir, rows, cfg):
        train_fn.calls.append((base_dir.name, len(rows)))
        return TrainResult(load_causal_lm(folder), load_tokenizer(folder), [{"loss": 0.5}], 1, 0.1)
    train_fn.calls = []
    return train_fn


def test_align_run_trains_on_new_data_only_and_promotes(dpo_job, log_32, tiny, tmp_path):
    data_dir = fresh_copy(log_32, tmp_path)
    train_fn = trained_weights(dpo_job)
    from prefloop.align.gate import GateConfig
    cfg = dict(data_dir=data_dir, model=str(tiny), command="run", incremental=True, min_new=8,
               promote=True, keep_rejected=False, eval_batch_size=8,
               gate=GateConfig(min_heldout=3, spending="none"))
    first = run_job(JobConfig(**cfg), train_fn=train_fn)
    registry = reg.Registry(data_dir)
    assert first.status == "promoted" and registry.current() == first.version == "v0001"
    assert train_fn.calls == [("v0000", 26)]
    assert registry.history()[-1].reason.startswith(f"align job {first.job_id}")
    mark = watermark(registry)
    assert data_mod.iso(mark) == first.data["trained_until"]

    again = run_job(JobConfig(**cfg), train_fn=train_fn)  # nothing new
    assert again.status == "skipped" and "0 new pairs" in again.reason
    assert len(train_fn.calls) == 1

    write_pairs(data_dir, banana_pairs(10, seed=7))
    third = run_job(JobConfig(**cfg), train_fn=train_fn)
    # 6 rows held out by job 1 + 10 new ones; only 10 are new since anything was seen
    assert train_fn.calls[-1] == ("v0001", 13)
    assert third.data["after_watermark"] == first.data["trained_until"]
    assert third.data["new_rows"] == 10 and third.data["rows"] == {"train": 13, "heldout": 3}
    assert third.metrics["current"]["version"] == "v0001"
    # drift: job 1's candidate (base = root) measured its KL to v0000 once; job 3 (base v0001)
    # measures its candidate (v0001's weights again) against v0000 on its own held-out pairs
    assert first.metrics["heldout"]["kl_to_root_per_token"] == first.metrics["heldout"]["kl_per_token"]
    assert third.metrics["heldout"]["root_version"] == "v0000"
    assert third.metrics["heldout"]["kl_to_root_per_token"] > 0.0
    assert third.gate["kl_to_root"] == third.metrics["heldout"]["kl_to_root_per_token"]
    assert any(r.startswith("KL to the root v0000 ") for r in third.gate["reasons"])
    # job 3 starts from v0001 and its "training" returns v0001 itself: no held-out change
    assert third.status == "rejected" and third.version is None
    assert "no pairs differ, nothing to judge on" in third.reason  # the same weights: all ties
    jobs = job_history(registry)
    assert [j.status for j in jobs] == ["promoted", "skipped", "rejected"]
    assert registry.list_versions() == ["v0000", "v0001"]


def test_a_failing_job_leaves_no_partial_version(dpo_job, log_32, tiny, tmp_path):
    data_dir = fresh_copy(log_32, tmp_path)
    inner = trained_weights(dpo_job)

    def failing_train_fn(base_dir, rows, cfg):
        result = inner(base_dir, rows, cfg)

        def save_pretrained(path, **kw):
            (Path(path) / "model.safetensors").write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        result.model.save_pretrained = save_pretrained
        return result

    with pytest.raises(OSError, match="No space left"):
        run_job(JobConfig(data_dir=data_dir, model=str(tiny), eval_batch_size=8),
                train_fn=failing_train_fn)
    registry = reg.Registry(data_dir)
    # the job created v0000 on first use; failing, it removes it again (nothing half-written,
    # and the registry and served version are as they were: none)
    assert registry.list_versions() == [] and registry.current() is None
    assert list(registry.versions_dir.iterdir()) == []
    job = job_history(registry)[-1]
    assert job.status == "failed" and "No space left" in job.reason
    with job_lock(registry):  # released
        pass


def test_a_second_job_is_refused_while_one_runs(log_32, tiny, tmp_path, capsys):
    data_dir = fresh_copy(log_32, tmp_path)
    registry = reg.Registry(data_dir)
    with job_lock(registry):
        rc = cli.main(["align", "run", "--data-dir", str(data_dir), "--model", str(tiny)])
        with pytest.raises(Unavailable):
            run_job(JobConfig(data_dir=data_dir, model=str(tiny)))
    assert rc == 3 and "another align job is running" in capsys.readouterr().err
    assert job_history(registry) == []


def test_lora_publishes_an_adapter_that_loads_as_the_full_weights_of_the_same_training(
        tiny, log_32, tmp_path, capsys):
    lora = ["--model", str(tiny), *FAST, "--lora", "--lora-r", "4", "--max-steps", "2", "--json"]
    full_dir, adapter_dir = fresh_copy(log_32, tmp_path / "full"), fresh_copy(log_32, tmp_path / "a")
    assert cli.main(["align", "dpo", "--data-dir", str(full_dir), *lora, "--publish", "full"]) == 0
    capsys.readouterr()
    assert cli.main(["align", "dpo", "--data-dir", str(adapter_dir), *lora]) == 0  # the default
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "v0001"
    full, adapter = reg.Registry(full_dir), reg.Registry(adapter_dir)
    folder = full.version_dir("v0001")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        assert sorted(keys) == sorted(f.keys())  # --publish full: plain Llama weights
        assert not torch.equal(q, f.get_tensor("model.layers.0.self_attn.q_proj.weight"))
    m = adapter.manifest("v0001")
    assert m.format == "adapter" and m.adapter["base"] == "v0000" and full.manifest("v0001").format == "full"
    assert "adapter_model.safetensors" in m.files and m.hyperparameters["lora_r"] == 4
    assert adapter.version_bytes("v0001") < full.version_bytes("v0001") / 2
    assert adapter.verify("v0001").ok
    merged, plain = load_model(adapter.version_dir("v0001")), load_model(folder)
    for (name, a), (_, b) in zip(merged.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # same training


def test_kto_on_labelled_answers(tiny, log_32, tmp_path, capsys):
    data_dir = fresh_copy(log_32, tmp_path)
    rc = cli.main(["align", "kto", "--data-dir", str(data_dir), "--model", str(tiny),
                   "--max-steps", "3", "--midpoint-test", "--unlikelihood", "1", "--json", *FAST])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["version"] == "v0001", out
    held = out["metrics"]["heldout"]
    # the two answers of one preference share a timestamp: they stay on one side of the split
    assert held["examples"] == 14 and 0.0 <= held["label_accuracy"] <= 1.0
    assert "kl_per_token" in held and held["pairs"] == 7
    assert "7 pairs of the same prompt, 0 matched across prompts" in out["metrics"]["gate_basis"]
    assert out["data"]["looping_desirable_dropped"] == 0  # counted (none of these answers loops)
    assert reg.Registry(data_dir).manifest("v0001").method == "kto"
    # unlikelihood on the loops of disliked answers (--unlikelihood 1) is recorded
    assert reg.Registry(data_dir).manifest("v0001").hyperparameters["unlikelihood"] == 1.0
    assert out["metrics"]["training"]["unlikelihood"]["steps"] == 3
    # the midpoint test (align/train/midpoint.py): the 50 training answers split in time, the
    # checkpoint after the older 24 (3 steps of 8) scores the newer 26, and the rating test's
    # p-value joins both (the held-out p alone beside it)
    mid, parts = out["metrics"]["midpoint"], out["gate"]["margin_parts"]
    assert (mid["older_rows"], mid["newer_rows"], mid["step"], mid["scored"]) == (24, 26, 3, 26)
    assert parts["midpoint_answers"] == 26 and parts["midpoint_up"] == 13
    assert out["gate"]["margin_p_value"] < max(parts["heldout_p_value"], parts["midpoint_p_value"])
    assert "scored at the midpoint (13 up, 13 down)" in " ".join(out["gate"]["reasons"])
    # a candidate trained from v0000 while v0001 is current: judged against v0001's own weights
    reg.Registry(data_dir).promote("v0001", force=True, reason="test")
    rc = cli.main(["align", "kto", "--data-dir", str(data_dir), "--model", str(tiny),
                   "--base", "v0000", "--max-steps", "2", "--midpoint-test", "--json", *FAST])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] in ("rejected", "published"), out  # no --auto-promote
    assert "midpoint" not in out["metrics"]  # its moves would be against v0000, not v0001
    reasons = " ".join(out["gate"]["reasons"])
    assert "vs v0001" in reasons and "AUC of the summed moves" in reasons, reasons
    # the degeneration check's answers give the answer-shift test (align/answer_shift.py): the
    # 14 held-out answers scored and its test reported; the moves alone decide
    assert "ranks averaged" not in reasons, reasons
    assert "reported: the answers it writes (" in reasons
    shift = out["gate"]["answer_shift"]
    assert shift["answers"] == 14 and shift["prompts"] >= 1 and 0 <= shift["p_value"] <= 1
    # the degeneration check read the prompts too: both versions' off-topic answers counted
    assert "off topic (no word of the prompt)" in reasons, reasons
    degeneration = out["metrics"]["degeneration"]
    assert degeneration["candidate_off_topic"] is not None, degeneration  # measured: prompts given
    assert 0 <= degeneration["candidate_off_topic"] <= degeneration["prompts"], degeneration
    # and keeps what it counted on: each sample a held-out prompt with both versions' answers
    samples = degeneration["samples"]
    assert 1 <= len(samples) <= min(6, degeneration["prompts"]), samples
    assert all(isinstance(x["candidate"], str) and isinstance(x["current"], str)
               and x["prompt"] and isinstance(x["candidate_loops"], bool) for x in samples), samples


def test_schedule_runs_jobs_on_a_timer(log_32, tiny, tmp_path):
    data_dir = fresh_copy(log_32, tmp_path)
    reg.Registry(data_dir).ensure_base(tiny)
    proc = subprocess.run(
        [sys.executable, "-m", "prefloop.cli", "align", "schedule", "--every", "1s",
         "--max-runs", "2", "--data-dir", str(data_dir), "--min-new-pairs", "1000"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done after") == 2
    jobs = job_history(reg.Registry(data_dir))
    assert [j.status for j in jobs] == ["skipped", "skipped"]
    assert "need 1000" in jobs[0].reason


def test_models_cli_offline_and_through_a_server(dpo_job, tiny, tmp_path, capsys):
    """`prefloop models` on the folder, and with --target through a real server (tiny model)."""
    from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until

    from prefloop.clients import Client
    data_dir = tmp_path / "data"
    registry = reg.Registry(data_dir)
    registry.ensure_base(tiny)
    trained = dpo_job[2].version_dir("v0001")
    with registry.stage() as stage:  # the module's DPO weights as this registry's v0001
        for p in trained.iterdir():
            if p.name != reg.MANIFEST_FILE:
                shutil.copyfile(p, stage.path / p.name)
        stage.publish(kind="policy", method="dpo", parent="v0000",
                      gate={"passed": True, "reasons": ["test"]})
    assert cli.main(["models", "list", "--data-dir", str(data_dir)]) == 0
    listing = capsys.readouterr().out
    assert "* v0000" in listing and "  v0001" in listing and "passed" in listing
    assert cli.main(["models", "verify", "--data-dir", str(data_dir)]) == 0
    server = start_server_process(tmp_path, "--registry-poll", "0.2", ready_timeout=120)
    try:
        target = ["--target", server.target]
        with Client(server.target, token=USER_TOKEN) as client:
            assert client.model_info().model_version == "v0000"
            assert cli.main(["models", "promote", "v0001", *target, "--token", USER_TOKEN]) == 1
            assert "admin" in capsys.readouterr().err
            assert cli.main(["models", "promote", "v0001", *target, "--token", ADMIN_TOKEN,
                             "--reason", "cli test"]) == 0
            assert "v0000 -> v0001" in capsys.readouterr().out
            assert client.model_info().model_version == "v0001"
            assert registry.current() == "v0001"
            assert cli.main(["models", "list", *target, "--token", ADMIN_TOKEN, "--json"]) == 0
            remote = json.loads(capsys.readouterr().out)
            assert remote["serving_version"] == "v0001"
            assert [v["version"] for v in remote["versions"]] == ["v0000", "v0001"]
            # offline rollback: the server follows the pointer
            assert cli.main(["models", "rollback", "--data-dir", str(data_dir)]) == 0
            assert wait_until(lambda: client.model_info().model_version == "v0000", timeout=60)
    finally:
        assert server.terminate() == 0
    actions = [(e.action, e.version, e.reason) for e in registry.history()]
    assert actions[-2:] == [("promote", "v0001", "cli test"), ("rollback", "v0000", "")]


def test_trainer_log_dicts_only_with_verbose(tiny, log_32, tmp_path, capsys):
    """Default: a progress bar with the loss; --verbose adds TRL's raw per-step dicts."""
    quiet_dir, verbose_dir = fresh_copy(log_32, tmp_path / "q"), fresh_copy(log_32, tmp_path / "v")
    args = ["--model", str(tiny), "--max-steps", "2", "--json", *FAST]
    assert cli.main(["align", "dpo", "--data-dir", str(quiet_dir), *args]) == 0
    quiet = capsys.readouterr().err
    assert cli.main(["align", "dpo", "--data-dir", str(verbose_dir), "--verbose", *args]) == 0
    verbose = capsys.readouterr().err
    assert "'loss'" not in quiet and "loss=" in quiet
    assert "'loss'" in verbose


def test_a_job_too_small_for_the_gate_skips_before_training_unless_asked_to_keep(dpo_job, log_32, tiny,
                                                                                 tmp_path):
    data_dir = fresh_copy(log_32, tmp_path)
    train_fn = trained_weights(dpo_job)
    cfg = dict(data_dir=data_dir, model=str(tiny), command="run", incremental=True, min_new=8,
               promote=True, eval_batch_size=8)  # the gate's default minimum: 20 held-out pairs
    skipped = run_job(JobConfig(**cfg, keep_rejected=False), train_fn=train_fn)
    assert skipped.status == "skipped" and train_fn.calls == []
    assert skipped.reason.startswith("the gate needs >= 20 held-out pairs and this window holds 6 "
                                     "(of 32): about 66 more votes, or raise --heldout-fraction")
    kto = run_job(JobConfig(**cfg, train=TrainConfig(method="kto"), keep_rejected=False),
                  train_fn=train_fn)  # the default method: the held-out answers' pairs count
    assert kto.status == "skipped" and train_fn.calls == []
    assert "the window's 14 held-out answers (7 up, 7 down) make 7: more feedback" in kto.reason
    registry = reg.Registry(data_dir)
    assert registry.list_versions() == ["v0000"] and watermark(registry) is None
    kept = run_job(JobConfig(**cfg, keep_rejected=True), train_fn=train_fn)  # the votes are still new
    assert train_fn.calls == [("v0000", 26)] and kept.status == "rejected"
    assert kept.reason.startswith("needs >= 20 held-out pairs, have 6")


def test_align_run_spends_its_level_over_a_season_and_waits_for_new_evidence(dpo_job, log_32, tiny,
                                                                              tmp_path):
    """Decisions against one current version share the stated 5 % (the k-th at 5 %/(k(k+1)),
    of which the offline gate gets a third on the default --promote-via auto, the rest kept for
    an A/B test), and a scheduled job looks again only once the window grew 1.5x since the last
    decision."""
    from prefloop.align.gate import GateConfig
    data_dir = fresh_copy(log_32, tmp_path)
    train_fn = trained_weights(dpo_job)
    cfg = dict(data_dir=data_dir, model=str(tiny), command="run", incremental=True, min_new=2,
               promote=True, keep_rejected=False, eval_batch_size=8, heldout_fraction=0.25,
               gate=GateConfig(min_heldout=3))
    first = run_job(JobConfig(**cfg), train_fn=train_fn)  # decision 1 against v0000: 8 of 8 won
    assert first.status == "promoted" and first.gate["season_decision"] == 1
    assert first.gate["confidence"] == pytest.approx(1 - 2 * 0.025 / 3)
    assert first.gate["stated_confidence"] == 0.9
    write_pairs(data_dir, banana_pairs(10, seed=7))
    second = run_job(JobConfig(**cfg), train_fn=train_fn)  # v0001's season starts afresh
    assert second.status == "rejected" and second.gate["season_decision"] == 1
    assert second.data["total_rows"] == 18  # the 8 job 1 held out + 10 new
    write_pairs(data_dir, banana_pairs(5, seed=8))
    early = run_job(JobConfig(**cfg), train_fn=train_fn)
    assert early.status == "skipped" and len(train_fn.calls) == 2  # before loading a model
    assert early.reason.startswith("5 rows since the last decision against v0001; its next look "
                                   "(decision 2) waits for 9 (--look-growth 1.5")
    write_pairs(data_dir, banana_pairs(5, seed=9))
    third = run_job(JobConfig(**cfg), train_fn=train_fn)
    assert third.status == "rejected" and third.gate["season_decision"] == 2
    assert third.gate["confidence"] == pytest.approx(1 - 2 * 0.05 / 6 / 3)
    assert any(r.startswith("reported: decision 2 against v0001 since it became current: "
                            "one-sided level 0.05/(2·3) = 0.00833; the offline gate gets 0.333 of "
                            "it (0.00278) and an A/B test this job starts the rest")
               for r in third.gate["reasons"])
    per_job = run_job(JobConfig(**dict(cfg, incremental=False, command="dpo",
                                       gate=GateConfig(min_heldout=3, spending="none"))),
                      train_fn=train_fn)
    assert per_job.gate["season_decision"] == 3 and per_job.gate["confidence"] == 0.9
