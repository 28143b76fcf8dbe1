"""Structured outputs in the native engine: llguidance matchers and the logits mask.

`GrammarCompiler` (one per engine) holds the model's tokenizer in llguidance's form (built on first
use) and one fresh matcher per schema (cached by schema); every constrained sequence gets a copy.
`apply_masks` sets the logits of the tokens a sequence's grammar forbids to -inf, so greedy and
sampled rows alike can only pick allowed tokens, and EOS only where the grammar is complete.

Why llguidance: it has no Python dependencies (xgrammar pulls in triton), compiles a schema in
milliseconds and computes a 49k-token mask in tens of microseconds
(`benchmarks/structured_outputs.py`, docs/performance.md).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from prefloop.server.engine.response_format import (
    DEFAULT_MAX_GRAMMAR_SIZE,
    ResponseFormat,
    check_grammar,
    limits,
    short_error,
)
from prefloop.server.errors import InvalidArgument

CACHE_SIZE = 64


class GrammarCompiler:
    """The model's tokenizer for llguidance and one fresh matcher per schema (one per engine)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...],
                 max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE):
        self.vocab_size = vocab_size
        self.max_grammar_size = max_grammar_size
        self._tokenizer_json = tokenizer_json
        self._eos = list(eos_token_ids)
        self._tokenizer = None  # llguidance's, built on first use (≈ 0.1-1 s)
        self._matchers: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses)

    @classmethod
    def for_model(cls, model_dir: Path, vocab_size: int, eos_token_ids: tuple[int, ...],
                  max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> "GrammarCompiler | None":
        """None when the model folder has no tokenizer.json (structured outputs then refused)."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return None
        return cls(path.read_text(), vocab_size, eos_token_ids, max_grammar_size)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from llguidance import LLTokenizer

            self._tokenizer = LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                          eos_token=self._eos or None)
        return self._tokenizer

    def matcher(self, fmt: ResponseFormat):
        """A fresh matcher for `fmt` (a copy of the cached one; compiled and checked on a miss,
        InvalidArgument when the schema cannot be served)."""
        key = fmt.schema if fmt.schema is not None else fmt.kind
        with self._lock:
            template = self._matchers.get(key)
            if template is not None:
                self._matchers.move_to_end(key)
                return template.deep_copy()
        template = self._compile(fmt)
        with self._lock:
            self.compiled += 1
            self._matchers[key] = template
            while len(self._matchers) > CACHE_SIZE:
                self._matchers.popitem(last=False)
        return template.deep_copy()

    def _compile(self, fmt: ResponseFormat):
        from llguidance import LLMatcher

        grammar = fmt.grammar()
        check_grammar(grammar, self.tokenizer, self.max_grammar_size)
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0,
                            limits=limits(self.max_grammar_size))
        if matcher.is_error():
            raise InvalidArgument(f"json_schema.schema is not supported: "
                                  f"{short_error(matcher.get_error())}")
        return matcher


_BITS = torch.arange(32, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, rows: list) -> torch.Tensor:
    """`logits` with, for each row whose sequence has a matcher, the tokens its grammar does not
    allow next at -inf (a new tensor; `logits` itself when no row has one). `rows[i].matcher` is
    an LLMatcher or None; rows without one are untouched."""
    constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
    if not constrained:
        return logits
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bitmask = torch.empty((len(constrained), words), dtype=torch.int32)
    for j, i in enumerate(constrained):
        rows[i].matcher.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), words * 4)
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).view(len(constrained), -1)[:, :vocab]
    index = torch.tensor(constrained)
    masked = logits[index].masked_fill(allowed == 0, float("-inf"))
    return logits.index_copy(0, index, masked)  # out of place: the logits are inference tensors
