"""What a new user meets in the first hour (CLI through subprocess
`python -m prefloop.cli` where the user meets it): a second server on a data dir in use,
a failed align job leaving the registry as it was, Ctrl-C during align, align's start line and
next steps, help text, `models prune/delete`, the chat client's `/up` and `/pair`, `bench`
progress and `stats`."""
from __future__ import annotations

import os
import subprocess
import sys

from prefloop.server.feedback.store import lock_holder, open_store

CLI = [sys.executable, "-m", "prefloop.cli"]


def prefloop(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)


# ---------------------------------------------------------------------------------------------
# 1. a second server on a data dir in use


def test_second_serve_on_a_data_dir_in_use_refuses_before_loading_the_model(tmp_path):
    data = tmp_path / "data"
    assert lock_holder(data) is None  # no log yet
    store = open_store(data)
    try:
        assert lock_holder(data) == str(os.getpid())
        res = prefloop("serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
                       "--model", "/no/such/model")
        assert res.returncode == 2
        assert f"in use by another process (pid {os.getpid()}" in res.stderr
        assert "--no-feedback-log" in res.stderr
        assert "cannot load the model" not in res.stderr  # refused before the model loads
        # the flag it names gets past the check (then fails on the bogus model path)
        res = prefloop("serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
                       "--model", "/no/such/model", "--no-feedback-log")
        assert res.returncode == 2 and "cannot load the model" in res.stderr
        assert "in use" not in res.stderr
    finally:
        store.close()
    assert lock_holder(data) is None


# ---------------------------------------------------------------------------------------------
# 2 + 3. a failed or interrupted align job leaves the registry and the served version as they were


def _pairs_log(tmp_path):
    from align_helpers import banana_pairs, write_pairs
    data = tmp_path / "data"
    write_pairs(data, banana_pairs(10))
    return data


def _fake_model(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "tokenizer.json").write_text("{}")
    return path


def test_a_job_failing_after_base_resolution_creates_no_version_and_moves_nothing(tmp_path):
    import pytest

    from prefloop.align.jobs.preference import JobConfig, run_job
    from prefloop.server import registry as reg
    from prefloop.server.jobs import job_history

    data, model = _pairs_log(tmp_path), _fake_model(tmp_path / "model")

    registry = reg.Registry(data)
    seen_while_training = []

    def trainer_fails(base_dir, rows, cfg):
        assert (base_dir / "model.safetensors").is_file()  # after v0000 was created
        seen_while_training.append(registry.current())  # what a server following CURRENT sees
        raise RuntimeError("No module named 'datasets'")

    with pytest.raises(RuntimeError, match="datasets"):
        run_job(JobConfig(data_dir=data, model=str(model)), train_fn=trainer_fails)
    assert registry.list_versions() == [] and registry.current() is None  # the base is undone
    assert seen_while_training == ["v0000"]  # v0000 is the served base from its creation
    assert registry.history() == []
    assert not [p for p in registry.versions_dir.iterdir()]  # no stage left either
    job = job_history(registry)[-1]
    assert job.status == "failed" and "removed the v0000" in job.reason
    # on a registry that had versions, a failure moves nothing either
    registry.ensure_base(model)
    with pytest.raises(RuntimeError):
        run_job(JobConfig(data_dir=data, model=str(model)), train_fn=trainer_fails)
    assert registry.list_versions() == ["v0000"] and registry.current() == "v0000"


def test_a_base_a_job_created_is_current_and_a_later_failing_job_leaves_it(tmp_path):
    import pytest

    from prefloop.align.jobs.preference import JobConfig, run_job
    from prefloop.align.jobs.runner import current_version, resolve_base
    from prefloop.server import registry as reg

    data, model = _pairs_log(tmp_path), _fake_model(tmp_path / "model")
    registry = reg.Registry(data)
    # what a first job that trained but promoted nothing leaves: v0000, current
    assert resolve_base(registry, None, str(model), None, True) == reg.BASE_VERSION
    assert registry.list_versions() == ["v0000"] and registry.current_path.read_text() == "v0000\n"
    assert current_version(registry) == "v0000"  # align compares with and starts from the base

    def trainer_fails(base_dir, rows, cfg):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_job(JobConfig(data_dir=data), train_fn=trainer_fails)
    assert registry.list_versions() == ["v0000"] and registry.current() == "v0000"  # as it was
    # the first promotion records the base first, so a rollback returns to it
    with registry.stage() as stage:
        (stage.path / "config.json").write_text("{}")
        (stage.path / "model.safetensors").write_bytes(b"trained")
        v1 = stage.publish(kind="policy", method="dpo", parent="v0000").version
    registry.promote(v1, verify=False)
    assert registry.current() == v1 and registry.served_stack() == ["v0000", v1]
    assert registry.rollback(verify=False).version == "v0000"


def test_a_first_job_starting_an_ab_test_makes_the_base_its_control(tmp_path):
    from prefloop.align.gate import Check, GateDecision
    from prefloop.align.jobs import runner
    from prefloop.server import registry as reg
    from prefloop.server.ab import state as ab_state

    registry = reg.Registry(tmp_path / "data")
    registry.ensure_base(_fake_model(tmp_path / "model"))
    with registry.stage() as stage:
        (stage.path / "config.json").write_text("{}")
        (stage.path / "model.safetensors").write_bytes(b"trained")
        v1 = stage.publish(kind="policy", method="dpo", parent="v0000",
                           gate={"passed": True, "reasons": []}).version
    result = runner.JobResult(job_id="job-1", status="running", version=v1)
    runner.conclude(result, GateDecision(True, [Check("test", True, "ok")]), registry, "job-1",
                    "dpo", promote=True, promote_via="ab")
    assert result.status == runner.PUBLISHED and registry.current() == "v0000"
    assert ab_state.running_state(registry).control == "v0000"


INTERRUPTED_JOB = """
import sys
import prefloop.align.train.preference as P
def train(*a, **k):
    raise KeyboardInterrupt
P.train = train
from prefloop.cli.main import main
sys.exit(main(["align", "dpo", "--data-dir", sys.argv[1], "--model", sys.argv[2],
               "--min-heldout-pairs", "2"]))  # 10 pairs: a job the gate could judge
"""


def test_ctrl_c_during_align_says_nothing_was_published_and_exits_130(tmp_path):
    from prefloop.server import registry as reg
    from prefloop.server.jobs import job_history

    data, model = _pairs_log(tmp_path), _fake_model(tmp_path / "model")
    res = subprocess.run([sys.executable, "-c", INTERRUPTED_JOB, str(data), str(model)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 130, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == \
        "prefloop align: interrupted: nothing was published"
    assert "Traceback" not in res.stderr
    job = job_history(reg.Registry(data))[-1]
    assert job.status == "failed" and job.reason.startswith("interrupted (Ctrl-C)")
    assert reg.Registry(data).list_versions() == []


# ---------------------------------------------------------------------------------------------
# 6. models prune / delete


def _registry_with_versions(tmp_path, n: int = 5):
    """v0000 (base) .. v{n-1}: v0001 promoted, then rolled forward to v0003; others not served."""
    from prefloop.server import registry as reg
    registry = reg.Registry(tmp_path / "data")
    registry.ensure_base(_fake_model(tmp_path / "model"))
    for i in range(1, n):
        with registry.stage() as stage:
            (stage.path / "config.json").write_text("{}")
            (stage.path / "model.safetensors").write_bytes(b"w" * (1000 * i))
            stage.publish(kind="policy", method="dpo", parent=f"v{i - 1:04d}")
    registry.promote("v0001", verify=False)
    registry.promote("v0003", verify=False)
    return registry


def test_models_prune_and_delete_keep_current_rollback_stack_and_ab(tmp_path):
    import json

    from prefloop.server.ab import state as ab_state
    registry = _registry_with_versions(tmp_path, 6)  # v0000..v0005; served v0000 -> v0001 -> v0003
    data = str(registry.data_dir)
    dry = prefloop("models", "prune", "--keep", "1", "--dry-run", "--data-dir", data)
    assert dry.returncode == 0, dry.stderr
    expected = registry.version_bytes("v0002") + registry.version_bytes("v0004")
    assert "would delete v0002 (2." in dry.stdout and "would delete v0004 (4." in dry.stdout
    assert (f"would delete 2 versions, {expected / 1000:.1f} KB (dry run: nothing deleted)"
            in dry.stdout)
    assert "v0003 (the current version)" in dry.stdout
    assert len(registry.list_versions()) == 6  # dry run
    for version, why in (("v0003", "the current version"), ("v0001", "on the rollback stack"),
                         ("v0000", "on the rollback stack")):
        res = prefloop("models", "delete", version, "--data-dir", data)
        assert res.returncode == 1 and f"{version} cannot be deleted: it is {why}" in res.stderr
    ab_state.start(registry, "v0004", force=True)  # a running A/B keeps its candidate
    res = prefloop("models", "delete", "v0004", "--data-dir", data)
    assert res.returncode == 1 and "running A/B test (candidate)" in res.stderr
    res = prefloop("models", "prune", "--keep", "1", "--json", "--data-dir", data)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["deleted"] == ["v0002"] and out["bytes"] > 2000
    assert registry.list_versions() == ["v0000", "v0001", "v0003", "v0004", "v0005"]
    assert not [p for p in registry.versions_dir.iterdir() if p.name.startswith(".")]
    res = prefloop("models", "delete", "v0005", "--data-dir", data)
    assert res.returncode == 0 and "deleted v0005" in res.stdout
    assert registry.list_versions() == ["v0000", "v0001", "v0003", "v0004"]
    assert registry.current() == "v0003" and registry.rollback(verify=False).version == "v0001"


def test_watermark_survives_a_deleted_ancestor(tmp_path):
    from prefloop.align.jobs.runner import watermark
    registry = _registry_with_versions(tmp_path, 4)  # current v0003, parent v0002 never served
    registry.delete_version("v0002")
    assert registry.manifest("v0003").parent == "v0002"
    assert watermark(registry) is None  # was: NotFound for v0002


# ---------------------------------------------------------------------------------------------
# 5. help text for every align / models flag; PPO flags apart in `align run --help`


def _subparsers(parser):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_align_and_models_flag_has_help():
    import argparse

    from prefloop.cli.main import build_parser
    missing = []
    for command in ("align", "models", "stats", "serve"):
        top = dict(_subparsers(build_parser([command])))[command]
        todo = [(command, top)]
        while todo:
            name, parser = todo.pop()
            missing += [f"{name} {a.option_strings or a.dest}" for a in parser._actions
                        if not a.help and a.dest != "help"
                        and not isinstance(a, argparse._SubParsersAction)]
            todo += [(f"{name} {n}", p) for n, p in _subparsers(parser)]
    assert not missing, missing


def test_align_run_lists_its_methods_and_each_method_shows_only_its_flags():
    listing = prefloop("align", "run", "--help").stdout
    assert "{dpo,kto,sft,ppo}" in listing and "PPO against a reward model" in listing
    dpo = prefloop("align", "run", "dpo", "--help").stdout
    assert "\n  --beta" in dpo and "\n  --loss" in dpo and "LoRA rank" in dpo
    for other in ("--clip-eps", "\n  --rm VERSION", "--steps", "--desirable-weight", "PPO:"):
        assert other not in dpo, other
    ppo = prefloop("align", "run", "--method", "ppo", "--help").stdout  # the older spelling
    assert "PPO:" in ppo and "\n  --clip-eps" in ppo and "\n  --rm VERSION" in ppo
    assert "\n  --beta" in ppo and "KL penalty coefficient" in ppo
    assert "\n  --loss" not in ppo and "--lora" not in ppo and "--gate-metric" not in ppo
    kto = prefloop("align", "schedule", "--help", "--method=kto").stdout
    assert "KTO loss weight" in kto and "\n  --loss" not in kto and "--clip-eps" not in kto
    assert "\n  --every" in kto


def test_align_run_takes_the_method_as_a_word_or_as_the_older_flag():
    from prefloop.cli.align import canonical_argv, ppo_job_config
    from prefloop.cli.main import build_parser
    for argv in (["align", "run", "ppo", "--rm", "v0001", "--steps", "3", "--clip-eps", "0.1"],
                 ["align", "run", "--rm", "v0001", "--method", "ppo", "--steps", "3",
                  "--clip-eps", "0.1"]):
        argv = canonical_argv(argv)
        args = build_parser(argv).parse_args(argv)
        assert (args.method, args.steps, args.clip_eps, args.beta) == ("ppo", 3, 0.1, 0.1)
        assert ppo_job_config(args).ppo.steps == 3
    res = prefloop("align", "run", "ppo", "--clip-epz", "0.1", "--data-dir", "/no/such/dir")
    assert res.returncode == 2 and "did you mean --clip-eps?" in res.stderr
    res = prefloop("align", "run", "--method", "ppo", "--loss", "ipo", "--data-dir", "/no/such/dir")
    assert res.returncode == 2 and "unrecognized arguments: --loss" in res.stderr  # DPO's flag
    assert "prefloop align run ppo" in res.stderr  # reported with the usage of the method's parser


def test_one_off_jobs_keep_rejected_candidates_only_when_asked():
    from prefloop.cli.align import canonical_argv, job_config
    from prefloop.cli.main import build_parser
    for argv, keep in ((["align", "dpo"], False), (["align", "dpo", "--keep-rejected"], True),
                       (["align", "run"], False), (["align", "run", "--keep-rejected"], True)):
        argv = canonical_argv(argv)
        args = build_parser(argv).parse_args(argv)
        assert job_config(args).keep_rejected is keep, argv


# ---------------------------------------------------------------------------------------------
# 4. align's start line and what to do after a rejection


def test_align_job_starts_with_one_line_and_a_rejection_says_what_next(tmp_path, capsys):
    import pytest

    from prefloop.align.jobs.preference import JobConfig, run_job
    from prefloop.cli.align_output import format_result

    data, model = _pairs_log(tmp_path), _fake_model(tmp_path / "model")

    def trainer_fails(base_dir, rows, cfg):
        raise RuntimeError("stop after the start line")

    with pytest.raises(RuntimeError):
        run_job(JobConfig(data_dir=data, model=str(model)), train_fn=trainer_fails)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("align dpo: 10 pairs found -> train 8 / held-out 2, base v0000; "
                           "rough time")
    rejected = {"job_id": "job-1", "status": "rejected", "method": "dpo", "base": "v0000",
                "data": {"rows": {"train": 8, "heldout": 2}},
                "gate": {"passed": False, "reasons": ["no gain"]}}
    text = format_result(rejected)
    assert "next: collect more votes (the gate judged 2 held-out rows)" in text
    assert "--heldout-fraction" in text and "--keep-rejected" in text
    assert "next:" not in format_result(dict(rejected, status="published",
                                             gate={"passed": True, "reasons": []}))
