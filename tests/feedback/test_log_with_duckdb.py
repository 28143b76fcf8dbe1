"""The compacted log is one table to other tools: the DuckDB queries printed in docs/logging.md run
as written on a real log (written through the FeedbackStore, compacted to hive-partitioned
Parquet) and give the rows that were submitted."""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import duckdb  # a test dependency (pyproject: test extra)

from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.feedback.wal import WalConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "logging.md"


def doc_duckdb_statements() -> list[str]:
    """The statements of the ```sql block that starts with `-- DuckDB` in docs/logging.md."""
    block = re.search(r"```sql\n-- DuckDB\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/logging.md has no DuckDB block"
    return [s.strip() for s in block.group(1).split(";") if s.strip()]


def write_log(data_dir: Path) -> None:
    with FeedbackStore(StoreConfig(data_dir=data_dir, wal=WalConfig(linger_s=0.0005))) as store:
        for rid, text in (("a1", "Paris."), ("b1", "Lyon, I think."), ("a2", "Four."), ("b2", "Five.")):
            store.record_generation({
                "response_id": rid, "request_id": f"req-{rid[1]}",
                "created_at": dt.datetime.now(dt.timezone.utc), "model_version": "v0000",
                "backend": "native", "messages": [{"role": "user", "content": f"Q{rid[1]}?"}],
                "completion": text, "finish_reason": "stop", "prompt_tokens": 3,
                "completion_tokens": 2, "sampling": {"temperature": 1.0, "n": 2}, "latency_ms": 1.0})
        store.flush()
        store.submit_preference(chosen_response_id="a1", rejected_response_id="b1")
        store.submit_preference(chosen_response_id="b2", rejected_response_id="a2")
        store.submit_rating(response_id="a2", score=-1, scale="thumbs")
    # closing the store compacts every segment into <table>/date=D/part-N.parquet


def test_the_documented_duckdb_queries_read_the_log_as_one_table(tmp_path, monkeypatch):
    write_log(tmp_path / "data")
    assert list((tmp_path / "data" / "feedback").glob("date=*/*.parquet"))
    monkeypatch.chdir(tmp_path)  # the doc's paths are relative: data/feedback/...
    counts, pairs = (duckdb.sql(s).fetchall() for s in doc_duckdb_statements())
    today = dt.datetime.now(dt.timezone.utc).date()
    by_kind = {kind: n for date, kind, n in counts}
    assert {str(date) for date, _, _ in counts} == {today.isoformat()}
    assert sum(by_kind.values()) == 3 and len(by_kind) == 2  # two preferences, one rating
    assert sorted((chosen, rejected) for _, chosen, rejected in pairs) == [
        ("Five.", "Four."), ("Paris.", "Lyon, I think.")]
