"""Tokenizer and chat template, outside the engine: HF `tokenizers` + the model's jinja template.

`Tokenizer` encodes raw prompts and chat messages (rendered with the model's own template in a
sandboxed jinja environment, as transformers does) and decodes. `IncrementalDecoder` turns a growing
list of token ids into text deltas that never split a multi-byte character, and enforces stop
strings (holding back text that could be the start of one).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from prefloop.server.errors import InvalidArgument, UnsupportedModel

ROLES = ("system", "user", "assistant", "tool")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UnsupportedModel(f"{model_dir} has no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self.chat_template_source = template
        self.special_tokens = {k: self._token_text(config.get(k))
                               for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_token_id = self._tok.token_to_id(self.special_tokens["eos_token"] or "")
        self.vocab_size = self._tok.get_vocab_size()
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(template)

    @staticmethod
    def _token_text(value) -> str | None:
        if isinstance(value, dict):
            return value.get("content")
        return value

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise InvalidArgument("this model has no chat template; use Generate with a raw prompt")
        if not messages:
            raise InvalidArgument("messages is empty: send at least one {role, content} message")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise InvalidArgument(f"messages[{i}].role {m.get('role')!r} is not one of {ROLES}")
            if not isinstance(m.get("content"), str):
                raise InvalidArgument(f"messages[{i}].content must be a string")
        if all(not m["content"] for m in messages):
            raise InvalidArgument("every message content is empty")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidArgument(f"the chat template rejected these messages: {exc}") from exc

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template already writes the special tokens; don't add BOS/EOS again.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class IncrementalDecoder:
    """Text deltas for one candidate's growing output, with stop strings enforced."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already returned
        self.text = ""
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the text

    def push(self, new_ids: list[int], final: bool) -> str:
        """Add tokens; return the new text that is safe to show. Sets .stopped on a stop string."""
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return ""  # a multi-byte character is incomplete
        self.text = text
        if self.stop:
            start = max(0, self.emitted - self.hold)
            hits = [(i, s) for s in self.stop if (i := text.find(s, start)) != -1]
            if hits:
                at, self.stop_string = min(hits, key=lambda h: h[0])
                self.text = text[:at]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
