"""The Models servicer: what model is served (GetModelInfo) and the engine's state (GetEngineStats).

Thin: reads `generator.info` / `generator.stats()` and the admission counters, and converts them
to proto. The registry RPCs (ListVersions / Promote / Rollback) arrive with the hot-swap issue;
every Models RPC other than GetModelInfo is admin-only (`server/auth.py`).
"""
from __future__ import annotations

from prefloop.proto.prefloop.v1 import models_pb2, models_pb2_grpc

from .limits import Admission
from .status_mapping import map_errors

# gen.stats() keys with a typed field in EngineStats; other numeric keys go to `extra`.
_TYPED_STATS = ("running", "waiting", "free_blocks", "total_blocks", "prefix_cache_hit_tokens")


class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, generator, admission: Admission) -> None:
        self.generator = generator
        self.admission = admission

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
