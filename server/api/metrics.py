"""Prometheus metrics of one server (prometheus_client), fed by both APIs, served at GET /metrics.

Every metric lives in the server's own `CollectorRegistry` (two servers in one process, as in
tests, never share counters). Requests, tokens and latencies are observed by `CompletionRunner`;
HTTP statuses by the HTTP app; feedback acks and WAL fsync latency by the feedback routes and
store; engine gauges (running / waiting / KV use / prefix-cache hits) are read from the generator
when scraped; the feedback log's state (takes votes or not, free bytes, rows waiting, failed
writes) from `FeedbackStore.health()` when scraped; hot-swaps by the model switcher's callback.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from prefloop.server.api.completions import Call, CompletionState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    """Engine gauges, read from the generator at scrape time."""

    def __init__(self, stats: Callable[[], dict], admission) -> None:
        self._stats = stats
        self._admission = admission

    def collect(self):
        try:
            stats = self._stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine is swapping
            stats = {}
        gauges = {
            "prefloop_requests_running": ("requests generating in the engine", stats.get("running")),
            "prefloop_requests_waiting": ("requests waiting in the engine", stats.get("waiting")),
            "prefloop_requests_admitted": ("requests holding an admission slot", self._admission.active),
            "prefloop_requests_queued": ("requests waiting for an admission slot", self._admission.queued),
        }
        total, free = stats.get("total_blocks"), stats.get("free_blocks")
        if total:
            gauges["prefloop_kv_cache_usage_ratio"] = ("fraction of KV-cache blocks in use",
                                                        (total - free) / total)
        queries = stats.get("prefix_cache_queries")
        if queries is not None:
            hits = stats.get("prefix_cache_hit_tokens", 0)
            gauges["prefloop_prefix_cache_hit_ratio"] = (
                "prefix-cache hit tokens per queried prompt token", hits / queries if queries else 0.0)
        for name, (doc, value) in gauges.items():
            if value is not None:
                family = GaugeMetricFamily(name, doc)
                family.add_metric([], float(value))
                yield family


class _FeedbackLogCollector:
    """Feedback-log gauges, read from `store.health()` at scrape time."""

    def __init__(self, health: Callable[[], dict]) -> None:
        self._health = health

    def collect(self):
        h = self._health()
        gauges = {
            "prefloop_feedback_log_available": (
                "1 when the feedback log takes votes, 0 when not (disk full, unusable directory)",
                1.0 if h["status"] == "ok" else 0.0),
            "prefloop_feedback_log_free_bytes": ("free bytes on the feedback log's filesystem",
                                                 h["free_bytes"]),
            "prefloop_feedback_log_pending_rows": ("log rows waiting for the disk",
                                                   h["pending_rows"]),
        }
        for name, (doc, value) in gauges.items():
            if value is not None:
                family = GaugeMetricFamily(name, doc)
                family.add_metric([], float(value))
                yield family
        failures = CounterMetricFamily("prefloop_feedback_log_write_failures",
                                       "failed writes of the feedback log (each refused its votes)")
        failures.add_metric([], float(h["write_failures"]))
        yield failures


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prefloop_requests", "requests by API, method/route and status",
                                ["api", "route", "status"], registry=r)
        self.prompt_tokens = Counter("prefloop_prompt_tokens", "prompt tokens of finished requests",
                                     ["api"], registry=r)
        self.completion_tokens = Counter("prefloop_completion_tokens", "tokens generated",
                                         ["api"], registry=r)
        self.ttft = Histogram("prefloop_time_to_first_token_seconds", "request start to first text",
                              ["api"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("prefloop_inter_token_latency_seconds", "gap between two text deltas",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.feedback = Counter("prefloop_feedback_acks", "acknowledged feedback by kind and API",
                                ["kind", "api", "duplicate"], registry=r)
        self.wal_fsync = Histogram("prefloop_feedback_durable_seconds",
                                   "feedback submission to its fsync'd acknowledgement",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.model = Info("prefloop_model", "the model version being served", registry=r)
        self.swaps = Counter("prefloop_hot_swaps", "hot-swaps to another model version", registry=r)
        self.swap_seconds = Histogram("prefloop_hot_swap_seconds", "duration of a hot-swap",
                                      buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)

    def watch_engine(self, stats: Callable[[], dict], admission) -> None:
        self.registry.register(_EngineCollector(stats, admission))

    def watch_feedback_log(self, health: Callable[[], dict]) -> None:
        self.registry.register(_FeedbackLogCollector(health))

    def set_model(self, version: str, backend: str = "", dtype: str = "") -> None:
        self.model.info({"version": version, "backend": backend, "dtype": dtype})

    def observe_call(self, call: "Call") -> None:
        api = call.meta.api
        if api == "grpc":  # HTTP requests are counted with their HTTP status by the app
            self.requests.labels(api, call.meta.method, call.status).inc()
        self.prompt_tokens.labels(api).inc(call.prompt_tokens)

    def observe_completion(self, call: "Call", state: "CompletionState") -> None:
        self.completion_tokens.labels(call.meta.api).inc(state.completion_tokens)
        if state.first_text_at is not None:
            self.ttft.labels(call.meta.api).observe(state.first_text_at - call.started)

    def observe_token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_feedback(self, kind: str, api: str, duplicate: bool, started: float) -> None:
        self.feedback.labels(kind, api, str(bool(duplicate)).lower()).inc()
        self.wal_fsync.observe(time.perf_counter() - started)

    def observe_swap(self, version: str, seconds: float) -> None:
        self.swaps.inc()
        self.swap_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
