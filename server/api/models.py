"""The Models servicer: what model is served (GetModelInfo) and the engine's state (GetEngineStats).

Thin: reads `generator.info` / `generator.stats()`, the sampling defaults every API applies and
the admission counters, and converts them to proto; the registry RPCs (ListVersions / Promote / Rollback) delegate to the `ModelSwitcher`
(server/serving/hot_swap.py), the A/B RPCs to the `ABController` (server/api/ab_controller.py). Every Models RPC other than GetModelInfo is admin-only (`server/api/auth.py`).
"""
from __future__ import annotations

import json

from prefloop.proto.prefloop.v1 import models_pb2, models_pb2_grpc
from prefloop.server.api.completions import SamplingDefaults
from prefloop.server.api.limits import Admission
from prefloop.server.api.status_mapping import map_errors
from prefloop.server.errors import FailedPrecondition

# gen.stats() keys with a typed field in EngineStats; other numeric keys go to `extra`.
_TYPED_STATS = ("running", "waiting", "free_blocks", "total_blocks", "prefix_cache_hit_tokens")


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, generator, admission: Admission, switcher=None, ab=None,
                 defaults: SamplingDefaults | None = None) -> None:
        self.generator = generator
        self.admission = admission
        self.defaults = defaults or SamplingDefaults()  # the CompletionRunner's (same object)
        self.switcher = switcher  # ModelSwitcher, or None when the server has no registry
        self.ab = ab  # ABController, or None when the server runs no A/B tests

    def _registry(self):
        if self.switcher is None:
            raise FailedPrecondition("this server has no model registry; start it with --data-dir "
                                     "holding registry/ (created by `prefloop models init` or align)")
        return self.switcher

    @map_errors
    async def GetModelInfo(self, request, context):
        info = self.generator.info
        return models_pb2.ModelInfo(
            model_version=info.model_version, architecture=info.architecture,
            context_length=info.context_length, dtype=info.dtype, backend=info.backend,
            sampling_defaults=models_pb2.SamplingDefaults(**self.defaults.as_dict()))

    @map_errors
    async def GetEngineStats(self, request, context):
        stats = dict(self.generator.stats())
        typed = {key: int(stats.pop(key)) for key in _TYPED_STATS if key in stats}
        extra = {key: float(value) for key, value in stats.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return models_pb2.EngineStats(
            **typed, active_requests=self.admission.active,
            queued_requests=self.admission.queued, extra=extra)

    @map_errors
    async def ListVersions(self, request, context):
        switcher = self._registry()
        return models_pb2.ListVersionsResponse(
            versions=[models_pb2.VersionInfo(**v) for v in switcher.list_versions()],
            current_version=switcher.registry.current() or "", serving_version=switcher.serving)

    @map_errors
    async def Promote(self, request, context):
        previous, current = await self._registry().promote(
            request.version, reason=request.reason, actor="grpc", force=request.force)
        return models_pb2.SwitchResponse(previous_version=previous, current_version=current)

    @map_errors
    async def Rollback(self, request, context):
        previous, current = await self._registry().rollback(reason=request.reason, actor="grpc")
        return models_pb2.SwitchResponse(previous_version=previous, current_version=current)

    def _ab(self):
        if self.ab is None:
            raise FailedPrecondition("this server runs no A/B tests (it has no model registry)")
        return self.ab

    @map_errors
    async def StartAB(self, request, context):
        return ab_status_proto(await self._ab().start_test(
            request.candidate,
            traffic=request.traffic if request.HasField("traffic") else None,
            sticky=request.sticky,
            min_votes=request.min_votes if request.HasField("min_votes") else None,
            confidence=request.confidence if request.HasField("confidence") else None,
            max_duration=request.max_duration, force=request.force,
            futility_win=request.futility_win if request.HasField("futility_win") else None))

    @map_errors
    async def GetABStatus(self, request, context):
        return ab_status_proto(await self._ab().status())

    @map_errors
    async def StopAB(self, request, context):
        return ab_status_proto(await self._ab().stop_test(request.outcome, request.reason))


def ab_status_proto(status: dict) -> models_pb2.ABStatus:
    interval = status.get("interval") or [0.0, 0.0]
    return models_pb2.ABStatus(
        running=bool(status.get("running")), candidate=status.get("candidate", ""),
        control=status.get("control", ""), status=status.get("status", ""),
        wins=int(status.get("wins", 0)), losses=int(status.get("losses", 0)),
        interval_low=float(interval[0]), interval_high=float(interval[1]),
        decision=status.get("decision", ""),
        reason=status.get("decision_reason") or status.get("reason", ""),
        status_json=json.dumps(status, sort_keys=True, default=str))
