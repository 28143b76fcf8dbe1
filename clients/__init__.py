"""prefloop.clients: Python clients (sync and asyncio), terminal chat, load generator."""
from .client import (AsyncClient, Chunk, Client, Completion, EngineStats, GenerateResult,
                     ModelInfo)
from .errors import ClientError

__all__ = ["AsyncClient", "Chunk", "Client", "ClientError", "Completion", "EngineStats",
           "GenerateResult", "ModelInfo"]
