"""prefloop.clients: Python clients (sync and asyncio), terminal chat, load generator."""
