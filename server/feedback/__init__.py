"""prefloop.server.feedback: the preference log — Arrow schemas, feedback store, WAL, Parquet compaction, exports."""
