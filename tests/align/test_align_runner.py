"""The align job skeleton (align/jobs/runner.py): the job lock and job history beside the
registry, base resolution, publishing a trained model with the base's tokenizer files, and the
one gate result shape. Real files in tmp dirs; a fake model object (nothing here trains).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from prefloop.align import gate
from prefloop.align.jobs import runner
from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition, InvalidArgument, Unavailable
from prefloop.server.jobs import JobRecord

BASE_FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"base": true}',
              "chat_template.jinja": b"{{ messages }}",
              "generation_config.json": b'{"from": "base"}'}


def fake_model(path, payload: bytes = b"weights-0") -> str:
    """An HF-like folder: fake weights plus the tokenizer / template / generation config files a
    published version takes over from its base."""
    path.mkdir(parents=True, exist_ok=True)
    for name, content in dict(BASE_FILES, **{"model.safetensors": payload}).items():
        (path / name).write_bytes(content)
    return str(path)


@pytest.fixture
def registry(tmp_path):
    """A registry whose v0000 is a `fake_model` folder."""
    with_base = reg.Registry(tmp_path / "data")
    assert with_base.ensure_base(fake_model(tmp_path / "src")) == reg.BASE_VERSION
    return with_base


LOCK_HOLDER = textwrap.dedent("""
    import sys
    from prefloop.align.jobs.runner import job_lock
    from prefloop.server.registry import Registry
    with job_lock(Registry(sys.argv[1])):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_job_lock_excludes_a_second_process(registry):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(registry.data_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (registry.root / "job.lock").read_text() == f"{holder.pid}\n"
        with pytest.raises(Unavailable, match=f"pid {holder.pid}"):
            with runner.job_lock(registry):
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with runner.job_lock(registry):  # released when the holder exits
        with pytest.raises(Unavailable):
            with runner.job_lock(registry):  # also exclusive within one process
                pass


def test_job_history_merges_events_and_reports_crashes(registry):
    runner.record_job(registry, {"job_id": "j1", "status": "running", "pid": 999999999})
    runner.record_job(registry, {"job_id": "j2", "status": "running", "pid": os.getpid()})
    runner.record_job(registry, {"job_id": "j2", "status": "promoted", "version": "v0001"})
    path = registry.root / "jobs.jsonl"
    assert runner.jobs_path(registry) == path
    first = json.loads(path.read_text().splitlines()[0])  # the on-disk line: sorted keys + "at"
    assert list(first) == sorted(first) and set(first) == {"job_id", "status", "pid", "at"}
    with open(path, "a") as f:
        f.write('{"job_id": "j3", "sta')  # torn last line: ignored
    jobs = runner.job_history(registry)
    assert [(j.job_id, j.status) for j in jobs] == [("j1", "crashed"), ("j2", "promoted")]
    assert jobs[1].pid == os.getpid() and jobs[1].version == "v0001"
    with pytest.raises(InvalidArgument):
        runner.record_job(registry, {"status": "running"})


def test_the_start_line_estimates_from_the_last_job_of_the_same_method_that_trained(registry):
    """The start line's time comes from this registry's last job of the same method that trained
    (its rows and wall time, the whole job); skipped jobs, other methods and records without
    times do not count, and with none the rule of thumb (1 row/s) says "per epoch"."""
    assert runner.last_pace(registry, "kto") is None
    trained = {"metrics": {"training": {"steps": 60}}}
    runner.record_job(registry, {"job_id": "k1", "status": "running", "method": "kto",
                                 "started_at": "2026-12-06T08:00:00Z"})
    runner.record_job(registry, {"job_id": "k1", "status": "rejected", "method": "kto",
                                 "data": {"rows": {"train": 240, "heldout": 60}},
                                 "finished_at": "2026-12-06T08:08:00Z", **trained})
    runner.record_job(registry, {"job_id": "k2", "status": "skipped", "method": "kto",
                                 "started_at": "2026-12-06T09:00:00Z",
                                 "finished_at": "2026-12-06T09:00:05Z",
                                 "data": {"rows": {"train": 0}}})
    runner.record_job(registry, {"job_id": "d1", "status": "promoted", "method": "dpo",
                                 "started_at": "2026-12-06T10:00:00Z",
                                 "finished_at": "2026-12-06T10:01:00Z",
                                 "data": {"rows": {"train": 120, "heldout": 30}}, **trained})
    runner.record_job(registry, {"job_id": "k3", "status": "failed", "method": "kto",
                                 "started_at": "not a time", "finished_at": "2026-12-06T11:00:00Z",
                                 "data": {"rows": {"train": 10}}, **trained})
    runner.record_job(registry, {"job_id": "k4", "status": "rejected", "method": "kto",
                                 "started_at": "2026-12-06T12:00:00Z",
                                 "finished_at": "2026-12-06T12:05:00Z",
                                 "data": {"rows": "many"}, **trained})
    assert runner.last_pace(registry, "kto") == (240, 480.0)
    assert runner.last_pace(registry, "dpo") == (120, 60.0)
    result = runner.JobResult(job_id="j", status="running", method="kto", base="v0001")
    line = runner.start_line(result, 600, 480, 120, "rated answers", (240, 480.0))
    assert line == ("align kto: 600 rated answers found -> train 480 / held-out 120, base v0001; "
                    "rough time ≈ 16 min, at the pace of the last kto job here (240 rows in "
                    "8.0 min, the whole job)")
    assert runner.start_line(result, 600, 480, 120, "rated answers").endswith(
        "rough time ≈ 8 min per epoch on a small CPU for the default model (much less on a GPU)")


def test_a_job_record_has_one_schema_written_and_read_by_the_same_code(registry):
    with pytest.raises(InvalidArgument, match="outcome"):  # a field the records do not have
        runner.record_job(registry, {"job_id": "j1", "status": "published", "outcome": "ok"})
    with pytest.raises(InvalidArgument, match="status"):
        runner.record_job(registry, {"job_id": "j1", "status": "crashed"})  # only ever read
    runner.record_job(registry, {"job_id": "j1", "status": "running", "pid": os.getpid(),
                                 "command": "run", "method": "dpo"})
    runner.record_job(registry, {"job_id": "j1", "status": "rejected", "version": None,
                                 "gate": {"passed": False, "reasons": ["18/30"]}})
    (job,) = runner.job_history(registry)
    assert (job.status, job.command, job.method, job.gate["passed"]) == ("rejected", "run", "dpo", False)
    assert job.finished_at is None and set(job.to_dict()) == set(JobRecord.__dataclass_fields__)


def test_run_locked_records_running_then_the_outcome_or_the_failure(registry):
    def body(r, job_id, main):
        assert main and r.root == registry.root
        return runner.JobResult(job_id, runner.SKIPPED, reason="nothing new")

    done = runner.run_locked(registry.data_dir, "run", "dpo", body)
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_locked(registry.data_dir, "rm", "rm",
                          lambda r, job_id, main: (_ for _ in ()).throw(RuntimeError("boom")))
    jobs = runner.job_history(registry)
    assert [(j.job_id, j.status, j.command) for j in jobs] == [
        (done.job_id, "skipped", "run"), (jobs[1].job_id, "failed", "rm")]
    assert jobs[0].reason == "nothing new" and jobs[0].finished_at is not None
    assert jobs[1].reason == "RuntimeError: boom"
    with runner.job_lock(registry):  # released after both
        pass


def test_resolve_base_ignores_model_once_the_registry_has_a_base(registry, tmp_path, caplog):
    other = fake_model(tmp_path / "other", b"other weights")
    with caplog.at_level(logging.WARNING, logger="prefloop.align.jobs.runner"):
        assert runner.resolve_base(registry, None, other, None, main=True) == "v0000"
    assert "ignored" in caplog.text
    assert registry.manifest("v0000").source == str((tmp_path / "src").resolve())
    empty = reg.Registry(tmp_path / "empty")
    assert runner.resolve_base(empty, None, other, None, main=True) == "v0000"
    assert empty.manifest("v0000").source == str((tmp_path / "other").resolve())
    with pytest.raises(FailedPrecondition, match="models init"):
        runner.resolve_base(reg.Registry(tmp_path / "none"), None, None, None, main=False)


class FakeConfig:
    use_cache = False


class FakeModel:
    """save_pretrained like transformers': weights, config, its own generation config and a
    training extra that is not versioned."""

    def __init__(self) -> None:
        self.config = FakeConfig()

    def save_pretrained(self, path, safe_serialization=True):
        from pathlib import Path
        path = Path(path)
        (path / "model.safetensors").write_bytes(b"trained")
        (path / "config.json").write_text(json.dumps({"use_cache": self.config.use_cache}))
        (path / "generation_config.json").write_text('{"from": "trained"}')
        (path / "training_args.bin").write_bytes(b"x")


@pytest.mark.parametrize("kind", [reg.KIND_POLICY, reg.KIND_REWARD])
def test_publish_copies_the_base_tokenizer_files(registry, kind):
    base_dir = registry.version_dir("v0000")
    model = FakeModel()
    version = runner.publish(registry, model, base_dir, kind=kind, method="x", parent="v0000",
                             hyperparameters={"lr": float("nan")}, data={}, metrics={},
                             gate={"passed": True, "reasons": []}, job_id="job-1")
    folder = registry.version_dir(version)
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "manifest.json",
        "model.safetensors", "tokenizer.json"]
    assert (folder / "model.safetensors").read_bytes() == b"trained"
    assert (folder / "tokenizer.json").read_text() == '{"base": true}'
    assert (folder / "generation_config.json").read_text() == '{"from": "base"}'
    assert json.loads((folder / "config.json").read_text()) == {"use_cache": kind == reg.KIND_POLICY}
    manifest = registry.manifest(version)
    assert manifest.kind == kind and manifest.hyperparameters == {"lr": None}
    assert registry.verify(version).ok


def test_every_gate_has_one_shape_with_the_old_keys():
    cfg = gate.GateConfig(max_kl=0.1, min_heldout=10)
    dpo = gate.decide(implicit=gate.Paired(9, 1), accuracy=None, candidate_accuracy=0.8,
                      current_accuracy=0.6, current_version="v0001", kl_per_token=0.05,
                      heldout_pairs=10, config=cfg).to_dict()
    assert {"passed", "reasons", "candidate_accuracy", "current_accuracy", "current_version",
            "kl_per_token", "max_kl", "wins", "losses", "ties", "interval", "confidence",
            "min_heldout", "heldout_pairs", "metric"} <= set(dpo)
    ppo = gate.ppo_gate(per_prompt=gate.Paired(0, 0), candidate_reward=0.5, current_reward=0.25,
                        current_version="v0001", kl_per_token=0.2, heldout_prompts=0, config=cfg)
    assert isinstance(ppo, gate.GateDecision) and not ppo.passed
    assert ppo.reasons[0] == ("needs >= 10 held-out prompts, have 0: collect more votes, raise "
                              "--heldout-fraction or lower --min-heldout-pairs")
    assert ppo.reasons[2] == "KL to the reference 0.2000 nats/token > bound 0.1"
    assert {"passed", "reasons", "metric", "candidate_reward", "current_reward",
            "current_version", "kl_per_token", "max_kl", "min_improvement"} <= set(ppo.to_dict())
    assert ppo.to_dict()["metric"] == "rm_win_rate"
    missing = gate.ppo_gate(per_prompt=None, candidate_reward=None, current_reward=0.1,
                            current_version="v0", kl_per_token=0.0, heldout_prompts=3,
                            config=cfg)
    assert not missing.passed and missing.reasons[1] == "no held-out rewards to compare"
    rm = gate.reward_model_gate({"pairs": 4, "accuracy": 0.75}, 0.5, min_pairs=4)
    assert not rm.passed  # 3 of 4: the 90% interval reaches below 0.5
    assert rm.to_dict()["heldout_accuracy"] == 0.75 and rm.to_dict()["min_accuracy"] == 0.5
    none = gate.reward_model_gate({"pairs": 0}, 0.5)
    assert not none.passed and none.metrics["heldout_accuracy"] is None


def test_rows_a_reward_model_job_saw_are_still_new_to_the_next_policy_job(registry):
    # `align rm` then `align run --method ppo --rm V` on the same votes: the PPO job must not
    # skip them as already seen
    runner.record_job(registry, {"job_id": "j1", "status": "published", "method": "dpo",
                                 "data": {"until": "2026-11-30T08:00:00Z"}})
    runner.record_job(registry, {"job_id": "j2", "status": "rejected", "method": "rm",
                                 "data": {"until": "2026-11-30T09:00:00Z"}})
    assert runner.last_seen(registry).isoformat().startswith("2026-11-30T08:00:00")
    runner.record_job(registry, {"job_id": "j3", "status": "rejected", "method": "ppo",
                                 "data": {"until": "2026-11-30T10:00:00Z"}})
    assert runner.last_seen(registry).isoformat().startswith("2026-11-30T10:00:00")
