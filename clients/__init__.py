"""prefloop.clients: Python clients (sync and asyncio), terminal chat, load generator."""
from prefloop.clients.client import (
           AsyncClient,
           Chunk,
           Client,
           Completion,
           EngineStats,
           GenerateResult,
           ModelInfo,
)
from prefloop.clients.errors import ClientError

__all__ = ["AsyncClient", "Chunk", "Client", "ClientError", "Completion", "EngineStats",
           "GenerateResult", "ModelInfo"]
