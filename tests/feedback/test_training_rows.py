"""The typed training rows (server/feedback/rows.py) against the exports that write them: the Arrow
tables have the dataclasses' columns and round-trip into them, and every answer carries how the
user saw it end (its finish reason), so a cut answer is never exported as a finished one."""
from __future__ import annotations

import dataclasses

import pytest

from prefloop.server.feedback import export as log_export
from prefloop.server.feedback import rows
from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.feedback.wal import WalConfig

Q = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture
def log_dir(tmp_path):
    """Answers to Q that ended four ways, a pick and thumbs on them, and a text-form preference."""
    d = tmp_path / "data"
    with FeedbackStore(StoreConfig(data_dir=d, wal=WalConfig(linger_s=0.001))) as s:
        for rid, text, finish, stop in (("whole", "Once upon a time. The end.", "stop", None),
                                        ("long", "Once upon a time there was", "length", None),
                                        ("stopped", "Once upon a", "abort", None),
                                        ("string", "Once upon a time", "stop", "\n\n")):
            s.record_generation({"response_id": rid, "messages": Q, "completion": text,
                                 "model_version": "v0000", "finish_reason": finish,
                                 "stop_reason": stop})
        s.flush()
        s.submit_preference(chosen_response_id="whole", rejected_response_id="long")
        s.submit_rating(response_id="stopped", score=-1)
        s.submit_rating(response_id="string", score=1)
        s.submit_preference(prompt_messages=Q, chosen_text="A user's story.", rejected_text="No.")
    return d


def test_each_row_class_has_its_export_columns_in_order():
    assert [f.name for f in dataclasses.fields(rows.PreferencePair)] == rows.RM_SCHEMA.names
    assert rows.DPO_SCHEMA.names == [n for n in rows.RM_SCHEMA.names if n != "margin"]
    assert [f.name for f in dataclasses.fields(rows.RatedAnswer)] == rows.KTO_SCHEMA.names
    assert {"created_at", "feedback_id"} <= set(rows.SFT_SCHEMA.names)


def test_exported_tables_round_trip_into_the_typed_rows(log_dir):
    for fmt, cls, loaded in (
            ("dpo", rows.PreferencePair, log_export.load_pairs(log_dir)),
            ("rm", rows.PreferencePair, log_export.load_pairs(log_dir, margins=True,
                                                             pairs_from_ratings=True)),
            ("kto", rows.RatedAnswer, log_export.load_rated_answers(log_dir))):
        table = log_export.export(log_dir, fmt)
        assert table.num_rows == len(loaded) > 0, fmt
        typed = [cls.from_row(r) for r in table.to_pylist()]
        assert typed == loaded, fmt
        assert [t.to_row() for t in typed][0].keys() >= set(table.column_names), fmt


def test_answers_carry_how_they_ended(log_dir):
    (pick, explicit) = log_export.load_pairs(log_dir)
    assert (pick.chosen_finish_reason, pick.rejected_finish_reason) == ("stop", "length")
    assert (explicit.chosen_finish_reason, explicit.rejected_finish_reason) == (None, None)
    rated = {(a.text, a.source): a.finish_reason for a in log_export.load_rated_answers(log_dir)}
    assert rated[("Once upon a", "rating")] == "abort"
    assert rated[("Once upon a time", "rating")] == "stop_string"  # "stop" by a stop string
    assert rated[("Once upon a time there was", "preference")] == "length"
    kto = log_export.export_kto(log_dir).to_pylist()
    assert {r["finish_reason"] for r in kto} == {"stop", "length", "abort", "stop_string", None}


def test_only_finished_answers_count_as_whole():
    assert [rows.is_cut(r) for r in ("stop", None, "length", "abort", "stop_string")] == [
        False, False, True, True, True]
    pair = rows.PreferencePair(Q, [{"role": "assistant", "content": "a"}],
                               [{"role": "assistant", "content": "b"}], "f", None,
                               chosen_finish_reason="stop", rejected_finish_reason="length")
    assert pair.to_trl() == {"prompt": Q, "chosen": pair.chosen, "rejected": pair.rejected,
                             "chosen_cut": False, "rejected_cut": True}
    assert pair.to_trl(margin=True)["margin"] == 0.0
