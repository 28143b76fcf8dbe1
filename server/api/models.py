"""The Models servicer: what model is served (GetModelInfo) and the engine's state (GetEngineStats).

Thin: reads `generator.info` / `generator.stats()` and the admission counters, and converts them
to proto; the registry RPCs (ListVersions / Promote / Rollback) delegate to the `ModelSwitcher`
(server/serving/hot_swap.py). Every Models RPC other than GetModelInfo is admin-only (`server/api/auth.py`).
"""
from __future__ import annotations

from prefloop.proto.prefloop.v1 import models_pb2, models_pb2_grpc
from prefloop.server.api.limits import Admission
from prefloop.server.api.status_mapping import map_errors
from prefloop.server.errors import FailedPrecondition

# gen.stats() keys with a typed field in EngineStats; other numeric keys go to `extra`.
_TYPED_STATS = ("running", "waiting", "free_blocks", "total_blocks", "prefix_cache_hit_tokens")


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, generator, admission: Admission, switcher=None) -> None:
        self.generator = generator
        self.admission = admission
        self.switcher = switcher  # ModelSwitcher, or None when the server has no registry

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
            context_length=info.context_length, dtype=info.dtype, backend=info.backend)

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
