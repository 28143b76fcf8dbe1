"""The Feedback servicer (prefloop.v1.Feedback) and how the feedback log plugs into `serve`.

Thin: proto ↔ `FeedbackStore` calls only. Validation, durability and idempotency live in
`server/feedback/store.py`; typed errors become statuses in `status_mapping.map_errors`.
`feedback_extension(data_dir)` opens the store and returns what `serve` needs: the recorder of
generation rows (the store itself) and the service registration, whose `on_shutdown` commits and
compacts the log after the gRPC server has stopped.
"""
from __future__ import annotations

import asyncio
import os
import time

from prefloop.proto.prefloop.v1 import feedback_pb2, feedback_pb2_grpc
from prefloop.server.api.auth import bearer_token
from prefloop.server.api.grpc_server import ServiceRegistration
from prefloop.server.api.metrics import Metrics
from prefloop.server.api.status_mapping import map_errors
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.store import Ack, FeedbackStore, StoreConfig
from prefloop.server.feedback.vote_rate import caller_of_token
from prefloop.server.feedback.wal import WalConfig

FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name

_SCALES = {feedback_pb2.RATING_SCALE_UNSPECIFIED: None,
           feedback_pb2.RATING_SCALE_THUMBS: logschema.SCALE_THUMBS,
           feedback_pb2.RATING_SCALE_STARS: logschema.SCALE_STARS}


def _ack(ack: Ack) -> feedback_pb2.FeedbackAck:
    return feedback_pb2.FeedbackAck(feedback_id=ack.feedback_id, duplicate=ack.duplicate)


class FeedbackService(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, store: FeedbackStore, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics

    def _acked(self, kind: str, ack: Ack, started: float) -> feedback_pb2.FeedbackAck:
        if self.metrics is not None:
            self.metrics.observe_feedback(kind, "grpc", ack.duplicate, started)
        return _ack(ack)

    @map_errors
    async def SubmitPreference(self, request, context):
        started = time.perf_counter()
        return self._acked("preference", await self.store.asubmit_preference(
            chosen_response_id=request.chosen_response_id,
            rejected_response_id=request.rejected_response_id,
            prompt_messages=request.prompt_messages, chosen_text=request.chosen_text,
            rejected_text=request.rejected_text, comment=request.comment,
            idempotency_key=request.idempotency_key, user_id=request.user_id,
            session_id=request.session_id, caller=_caller(context)), started)

    @map_errors
    async def SubmitRating(self, request, context):
        started = time.perf_counter()
        return self._acked("rating", await self.store.asubmit_rating(
            response_id=request.response_id, score=request.score,
            scale=_SCALES.get(request.scale, "unknown"), comment=request.comment,
            idempotency_key=request.idempotency_key, user_id=request.user_id,
            session_id=request.session_id, caller=_caller(context)), started)


def _caller(context) -> str:
    """Who sent the vote, for the rate limits: a fingerprint of its bearer token."""
    return caller_of_token(bearer_token(context.invocation_metadata()))


# WAL rotation knobs for `serve` (tests and operators): seconds / bytes per segment
SEGMENT_SECONDS_ENV = "PREFLOOP_WAL_SEGMENT_SECONDS"
SEGMENT_BYTES_ENV = "PREFLOOP_WAL_SEGMENT_BYTES"


def store_config_from_env(data_dir, environ=os.environ) -> StoreConfig:
    wal = WalConfig()
    if environ.get(SEGMENT_SECONDS_ENV):
        wal.max_segment_age_s = float(environ[SEGMENT_SECONDS_ENV])
    if environ.get(SEGMENT_BYTES_ENV):
        wal.max_segment_bytes = int(environ[SEGMENT_BYTES_ENV])
    wal.__post_init__()
    return StoreConfig(data_dir=data_dir, wal=wal)


def feedback_extension(data_dir, config: StoreConfig | None = None, metrics: Metrics | None = None,
                       ) -> tuple[FeedbackStore, ServiceRegistration]:
    """Open the feedback log in `data_dir` (never raises: an unusable directory leaves the store
    answering UNAVAILABLE) and build the Feedback service registration."""
    store = FeedbackStore(config or store_config_from_env(data_dir))
    if metrics is not None:
        metrics.watch_feedback_log(store.health)

    async def on_shutdown() -> None:
        await asyncio.to_thread(store.close)

    registration = ServiceRegistration(FEEDBACK_SERVICE,
                                       feedback_pb2_grpc.add_FeedbackServicer_to_server,
                                       FeedbackService(store, metrics), on_shutdown)
    return store, registration
