"""The per-voter cap on training reads (server/feedback/voter_caps.py): the rule on rows, and
its effect on an export where one user casts half of all votes for the opposite of what
everyone else prefers."""
from __future__ import annotations

import datetime as dt

import pytest
from test_feedback_store import open_store

from prefloop.server.feedback import export
from prefloop.server.feedback.voter_caps import VoterCap, cap_voters, evenly_spaced, heaviest_voters

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


def rows_of(spec: list[tuple[str | None, str | None]]) -> list[dict]:
    return [{"feedback_id": f"fb-{i}", "created_at": T0 + dt.timedelta(seconds=i),
             "user_id": user, "session_id": session} for i, (user, session) in enumerate(spec)]


def test_an_ordinary_crowd_is_untouched():
    rows = rows_of([(f"u{i % 7}", None) for i in range(70)] + [(None, "tab")] * 30)
    kept, report = cap_voters(rows)
    assert kept == rows and report.capped == [] and report.voters == 8
    assert report.median_rows == 10 and report.cap == 40  # 4 x the median, above the floor


def test_a_flooder_is_cut_to_the_cap_evenly_over_time_and_anonymous_rows_stay():
    crowd = [(f"u{i % 10}", None) for i in range(50)]  # 10 voters x 5 rows
    flood = [("flood", None)] * 100
    anonymous = [(None, None)] * 7
    rows = rows_of(crowd + flood + anonymous)
    kept, report = cap_voters(rows, VoterCap(factor=4.0, floor=20))
    assert report.median_rows == 5 and report.cap == 20  # max(20, 4 x 5)
    assert report.capped == [{"voter": "user flood", "rows": 100, "kept": 20}]
    assert report.dropped == 80 and len(kept) == 50 + 20 + 7
    flood_ids = [int(r["feedback_id"][3:]) - 50 for r in kept if r["user_id"] == "flood"]
    assert flood_ids == list(range(2, 100, 5))  # the middle of each fifth-of-ten stretch
    assert [r["feedback_id"] for r in kept] == sorted((r["feedback_id"] for r in kept),
                                                      key=lambda f: int(f[3:]))  # order kept
    assert cap_voters(rows, None)[0] == rows


def test_sessions_count_as_voters_and_helpers():
    rows = rows_of([(None, "tab-1")] * 30 + [(None, "tab-2")] * 2 + [("u", "tab-3")] * 2)
    kept, report = cap_voters(rows, VoterCap(factor=2, floor=3))
    assert report.capped == [{"voter": "session tab-1", "rows": 30, "kept": 4}]
    assert evenly_spaced(10, 10) == list(range(10)) and evenly_spaced(3, 1) == [1]
    top = heaviest_voters(rows, top=2)
    assert top[0] == {"voter": "session tab-1", "rows": 30, "share": 30 / 34}
    with pytest.raises(ValueError, match="factor"):
        VoterCap(factor=0.5)


def test_one_user_voting_half_the_log_against_the_crowd_no_longer_decides_the_export(tmp_path, capsys):
    """12 users prefer the short answer, 5 pairs each (60 votes); one user submits 60 votes for
    the long one. Uncapped, the export is split half and half; capped, the crowd's side has
    60 of 80 pairs."""
    store = open_store(tmp_path / "data")
    try:
        short, long_ = "Yes.", "Well, it depends on many things, so let me explain at length."
        for i in range(60):
            q = [{"role": "user", "content": f"question {i}"}]
            store.submit_preference(prompt_messages=q, chosen_text=short, rejected_text=long_,
                                    user_id=f"u{i % 12}")
            q2 = [{"role": "user", "content": f"question {i} (again)"}]
            store.submit_preference(prompt_messages=q2, chosen_text=long_, rejected_text=short,
                                    user_id="flood")
        store.flush()
    finally:
        store.close()

    def short_share(pairs):
        return sum(p.chosen_text == short for p in pairs) / len(pairs)

    uncapped = export.load_pairs(tmp_path / "data", voter_cap=None)
    capped = export.load_pairs(tmp_path / "data")
    assert len(uncapped) == 120 and short_share(uncapped) == 0.5
    assert len(capped) == 80 and short_share(capped) == 0.75  # flood cut to max(20, 4 x 5)
    stats = export.log_stats(tmp_path / "data")
    assert stats["voters"]["heaviest"][0] == {"voter": "user flood", "rows": 60, "share": 0.5}
    assert stats["voters"]["rows_dropped_by_cap"] == 40 and stats["training"]["dpo_pairs"] == 80
    from prefloop import cli
    assert cli.main(["logs", "stats", "--data-dir", str(tmp_path / "data")]) == 0
    text = capsys.readouterr().out
    assert "user flood: 60 rows (50%)" in text and "user flood 60 -> 20" in text
    assert "dpo 80 pairs" in text
    assert cli.main(["logs", "stats", "--data-dir", str(tmp_path / "data"),
                     "--voter-cap", "0"]) == 0
    assert "dpo 120 pairs" in capsys.readouterr().out
    assert cli.main(["logs", "stats", "--data-dir", str(tmp_path / "data"),
                     "--voter-cap", "0.5"]) == 2


def test_align_reads_the_capped_log_and_its_voter_cap_flag_turns_the_cap_off_or_refuses(tmp_path):
    """The align jobs' loaders (DPO pairs, KTO examples, SFT examples, RM pairs, PPO prompts) cap a flooder
    by default; `--voter-cap 0` on `align run` / `align rm` reads every row; 0.5 is refused."""
    from prefloop.align import data as data_mod
    from prefloop.align.jobs.reward import load_rm_pairs
    from prefloop.cli.align import canonical_argv, job_config, rm_job_config
    from prefloop.cli.main import build_parser
    from prefloop.server.errors import InvalidArgument
    store = open_store(tmp_path / "data")
    try:
        for i in range(60):
            store.submit_preference(prompt_messages=[{"role": "user", "content": f"q{i}"}],
                                    chosen_text="Yes.", rejected_text="No.", user_id=f"u{i % 12}")
            store.submit_preference(prompt_messages=[{"role": "user", "content": f"r{i}"}],
                                    chosen_text="No.", rejected_text="Yes.", user_id="flood")
        store.flush()
    finally:
        store.close()
    data = tmp_path / "data"
    assert len(data_mod.load_pairs(data)) == 80 and len(data_mod.load_pairs(data, voter_cap=None)) == 120
    assert len(data_mod.load_sft_examples(data)) < len(data_mod.load_sft_examples(data, voter_cap=None))
    assert len(load_rm_pairs(data)) == 80 and len(load_rm_pairs(data, voter_cap=None)) == 120
    from prefloop.align.jobs.ppo import load_prompts
    prompts = [r.prompt[0]["content"] for r in load_prompts(data)]  # PPO's prompts: capped too
    assert len(prompts) == 80 and sum(p.startswith("r") for p in prompts) == 20

    def parsed(*argv):
        argv = canonical_argv(["align", *argv])
        return build_parser(argv).parse_args(argv)
    assert job_config(parsed("run")).voter_cap == VoterCap(factor=4.0, floor=20)
    assert job_config(parsed("run", "kto", "--voter-cap", "0")).voter_cap is None
    assert job_config(parsed("dpo", "--voter-cap", "2")).voter_cap == VoterCap(factor=2.0)
    assert rm_job_config(parsed("rm", "--voter-cap", "0")).voter_cap is None
    with pytest.raises(InvalidArgument, match="--voter-cap must be >= 1"):
        job_config(parsed("run", "--voter-cap", "0.5"))
