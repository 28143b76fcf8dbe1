"""Reading the log back (server/feedback/export.py, cli/logs.py): training exports, stats,
and the plain-pyarrow reading path docs/logging.md promises."""
from __future__ import annotations

import argparse
import datetime as dt
import json

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from prefloop.cli import logs as logs_cmd
from prefloop.server.feedback import export as log_export
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.feedback.wal import WalConfig

Q = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture
def data(tmp_path):
    """A small log: 3 answers to Q (v1, v1, v2), one raw-prompt answer, and feedback on them."""
    data = tmp_path / "data"
    with FeedbackStore(StoreConfig(data_dir=data, wal=WalConfig(linger_s=0.001))) as s:
        for rid, text, version in (("q1", "red", "v1"), ("q2", "blue", "v1"),
                                   ("q3", "green", "v2")):
            s.record_generation({"response_id": rid, "messages": Q, "completion": text,
                                 "model_version": version})
        s.record_generation({"response_id": "raw", "prompt": "2+2=", "completion": "4",
                             "model_version": "v2"})
        s.submit_preference(chosen_response_id="q1", rejected_response_id="q2")
        s.submit_preference(chosen_response_id="q1", rejected_response_id="q2")  # same pair again
        s.submit_preference(prompt_messages=Q, chosen_text="crimson", rejected_text="blue")
        s.submit_rating(response_id="q3", score=1)
        s.submit_rating(response_id="q2", score=-1)
        s.submit_rating(response_id="raw", score=3, scale="stars")  # neutral: no KTO row
    # one more, left in the WAL (not compacted) to check readers see it
    with FeedbackStore(StoreConfig(data_dir=data, wal=WalConfig(linger_s=0.001))) as s:
        s.submit_rating(response_id="q1", score=5, scale="stars", comment="vivid")
        s.close(compact=False)  # committed, but left in the WAL
    return data


def texts(rows, column):
    return [r[column][0]["content"] for r in rows]


def test_dpo_pairs_are_deduplicated_chat_messages(data):
    rows = log_export.export_dpo(data).to_pylist()
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("red", "blue"), ("crimson", "blue")]
    assert all(r["prompt"] == Q for r in rows)
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "red"}]
    assert (rows[0]["chosen_model_version"], rows[0]["source"]) == ("v1", "reference")
    assert rows[1]["source"] == "explicit"


def test_dpo_with_rating_pairs(data):
    rows = log_export.export_dpo(data, pairs_from_ratings=True).to_pylist()
    derived = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows
               if r["source"] == "ratings"]
    # q1 5 stars (+1.0), q3 thumbs up (+1), q2 thumbs down (-1): q1 and q3 tie; red > blue
    # is already a preference pair, so only green > blue is new
    assert derived == [("green", "blue")]
    assert len(rows) == 3


def test_rm_pairs_have_margins(data):
    rows = log_export.export_rm(data).to_pylist()
    margins = {(r["chosen"][0]["content"], r["rejected"][0]["content"]): r["margin"]
               for r in rows}
    assert margins[("red", "blue")] == 0.0  # the explicit preference comes first
    assert margins[("green", "blue")] == 2.0
    assert len(rows) == 3


def test_kto_labels(data):
    rows = log_export.export_kto(data).to_pylist()
    got = sorted((r["completion"][0]["content"], r["label"], r["source"]) for r in rows)
    # "blue" rated -1 and "red" rated 5 stars repeat the preferences' rows; the 3-star rating
    # of "raw" is neutral and gives none
    assert got == sorted([("red", True, "preference"), ("blue", False, "preference"),
                          ("crimson", True, "preference"), ("green", True, "rating")])


def test_since_filters_by_date(data):
    assert log_export.export_dpo(data, since="2999-01-01").num_rows == 0
    assert log_export.export_dpo(data, since=dt.date(2000, 1, 1)).num_rows == 2
    with pytest.raises(ValueError):
        log_export.export_dpo(data, since="last tuesday")


def test_stats_counts(data):
    stats = log_export.log_stats(data)
    assert stats["totals"] == {"generation": 4, "preference": 3, "rating": 4}
    by_kind = {}
    for r in stats["rows"]:
        by_kind[(r["model_version"], r["kind"])] = r["count"]
    assert by_kind[("v1", "generation")] == 2 and by_kind[("v2", "generation")] == 2
    assert by_kind[("v1", "preference")] == 2 and by_kind[("-", "preference")] == 1
    assert stats["training"]["dpo_pairs"] == 2 and stats["training"]["kto_examples"] == 4
    assert stats["wal"]["segments"] == 1  # the uncompacted rating


def test_load_table_sees_uncompacted_rows_once(data):
    fb = log_export.load_table(data, logschema.FEEDBACK)
    assert fb.num_rows == 7 and len(set(fb["feedback_id"].to_pylist())) == 7
    assert "vivid" in fb["comment"].to_pylist()
    assert log_export.load_table(data, logschema.FEEDBACK, include_wal=False).num_rows == 6


def test_plain_pyarrow_dataset_reads_the_hive_layout(data):
    table = ds.dataset(data / "feedback", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 6 and "date" in table.column_names
    for part in logschema.part_files(data, logschema.GENERATIONS):
        md = pq.read_schema(part).metadata
        assert md[b"prefloop.schema"] == b"generations/1"


def test_logs_cli(data, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    logs_cmd.add_arguments(parser)
    assert logs_cmd.run(parser.parse_args(["stats", "--data-dir", str(data)])) == 0
    out = capsys.readouterr().out
    assert "training rows: dpo 2 pairs" in out and "v1" in out
    assert logs_cmd.run(parser.parse_args(["stats", "--data-dir", str(data), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["rating"] == 4
    out_file = tmp_path / "out" / "kto.parquet"
    assert logs_cmd.run(parser.parse_args(["export", "--data-dir", str(data), "--format", "kto",
                                           "--out", str(out_file)])) == 0
    assert pq.read_table(out_file).column_names[:3] == ["prompt", "completion", "label"]
    assert logs_cmd.run(parser.parse_args(["export", "--data-dir", str(data), "--format", "dpo",
                                           "--since", "nope", "--out", str(out_file)])) == 2
    assert logs_cmd.run(parser.parse_args(["stats", "--data-dir", str(tmp_path / "none")])) == 2
