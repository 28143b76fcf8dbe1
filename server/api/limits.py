"""Server limits: what one request may ask for, and how many requests the server holds at once.

`Limits` is the validated settings dataclass; `Admission` enforces the concurrency part: at most
`max_concurrent` requests generate at once, at most `max_queued` more wait for a slot, and any
request beyond that fails at once with RESOURCE_EXHAUSTED instead of growing memory. Messages
name the limit so a user knows what to change.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

from prefloop.server.engine.response_format import DEFAULT_MAX_GRAMMAR_SIZE
from prefloop.server.errors import InvalidArgument, ResourceExhausted


@dataclass(slots=True)
class Limits:
    max_prompt_tokens: int = 8192  # the engine also checks the model's context length
    max_max_tokens: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # max_tokens when a request leaves it unset
    max_n: int = 8  # completions per request
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC max_receive_message_length
    max_concurrent: int = 64  # requests generating at once
    max_queued: int = 256  # requests waiting for a slot beyond max_concurrent
    max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE  # largest response_format grammar

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_max_tokens", "default_max_tokens", "max_n",
                     "max_message_bytes", "max_concurrent", "max_grammar_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if self.default_max_tokens > self.max_max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_max_tokens ({self.max_max_tokens})")

    def check_request(self, *, prompt_tokens: int, max_tokens: int | None, n: int | None,
                      context_length: int) -> int:
        """Validate one request against the server limits; returns the max_tokens to use.

        An unset max_tokens takes `default_max_tokens`, shortened to what fits in the context when
        the prompt leaves room. Whether prompt + max_tokens may outgrow the context is the
        engine's call (its context-overflow mode: error, truncate or shift), not checked here.
        """
        if n is not None and n > self.max_n:
            raise InvalidArgument(f"n={n} exceeds the server limit max_n={self.max_n}")
        if prompt_tokens > self.max_prompt_tokens:
            raise InvalidArgument(
                f"the prompt has {prompt_tokens} tokens; the server limit is max_prompt_tokens="
                f"{self.max_prompt_tokens}")
        if max_tokens is None:
            room = context_length - prompt_tokens
            return min(self.default_max_tokens, room) if room > 0 else self.default_max_tokens
        if max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be > 0, got {max_tokens}")
        if max_tokens > self.max_max_tokens:
            raise InvalidArgument(
                f"max_tokens={max_tokens} exceeds the server limit max_max_tokens="
                f"{self.max_max_tokens}")
        return max_tokens


class Admission:
    """Admits at most `max_concurrent` requests at once and queues at most `max_queued` more."""

    def __init__(self, max_concurrent: int, max_queued: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.active = 0
        self.queued = 0
        self._slots = asyncio.Semaphore(max_concurrent)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one generation slot for the body; raises ResourceExhausted when the queue is full."""
        if self.active >= self.max_concurrent or self._slots.locked():
            if self.queued >= self.max_queued:
                raise ResourceExhausted(
                    f"server busy: {self.active} requests running (max concurrent "
                    f"{self.max_concurrent}) and {self.queued} queued (max queued "
                    f"{self.max_queued}); retry later")
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
