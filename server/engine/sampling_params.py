"""SamplingParams: the validated per-request sampling settings the engine understands.

Stop *strings* are carried here but enforced outside the engine (the engine sees token ids only);
see `server/serving/generator.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from prefloop.server.engine.response_format import ResponseFormat
from prefloop.server.errors import InvalidArgument

# Stop strings are matched against the decoded text after every step, so they cost every step.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty")
MAX_ABS_PENALTY = 2.0  # OpenAI's (and vLLM's) range for frequency / presence penalties


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 disables top-k
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    repetition_penalty: float = 1.0  # 1 disables; > 1 discourages repeats
    # OpenAI's: subtracted from a token's logit per time it occurs in the completion so far
    # (frequency) or once if it occurs at all (presence); 0 disables, < 0 encourages repeats
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None  # JSON output constraint (None: free text)

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        for name in _FLOAT_FIELDS:  # inf / nan pass the range checks below in some forms
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidArgument(f"{name} must be a finite number, got {value}")
        if not (self.temperature >= 0.0):
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if self.max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.n < 1:
            raise InvalidArgument(f"n must be >= 1, got {self.n}")
        if not (self.repetition_penalty > 0.0):
            raise InvalidArgument(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if abs(getattr(self, name)) > MAX_ABS_PENALTY:
                raise InvalidArgument(f"{name} must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}] "
                                      f"(0 = off), got {getattr(self, name)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if any(s == "" for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidArgument(
                f"each stop string may have at most {MAX_STOP_STRING_CHARS} characters, got one "
                f"of {longest}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Does any penalty change the logits (so greedy is not a plain argmax)?"""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)
