"""The chat session of `prefloop chat` and its slash-command table.

`ChatSession` holds the conversation and the client; `COMMANDS` maps `/name` to a handler, added with
the `command` decorator. The basic commands (/help, /version, /reset, /quit) live here; the feedback
keys (chat_feedback.py) register theirs on import, and cli/chat.py (the terminal loop and its flags)
imports both — so neither of those two imports the other.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from prefloop.clients.client import Client
from prefloop.clients.errors import ClientError


@dataclass
class ChatSession:
    """The conversation and the client it talks through; what slash commands act on."""

    client: Client
    out: TextIO = sys.stdout
    system: str | None = None
    sampling: dict = field(default_factory=dict)  # max_tokens, temperature, ... (None = default)
    session_id: str = ""
    user_id: str = ""
    messages: list[dict] = field(default_factory=list)
    last_response_id: str | None = None  # the handle for feedback on the last answer
    last_reply: str | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last_response_id = self.last_reply = None

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def ask(self, text: str) -> str | None:
        """Send a user turn, stream the answer to `out`; returns it (None if it failed)."""
        turn = self.messages + [{"role": "user", "content": text}]
        parts: list[str] = []
        response_id = None
        try:
            for chunk in self.client.chat_stream(turn, session_id=self.session_id,
                                                 user_id=self.user_id, **self.sampling):
                response_id = chunk.response_id
                parts.append(chunk.text_delta)
                self.say(chunk.text_delta, end="")
        except KeyboardInterrupt:
            self.say("\n[answer interrupted; it is not kept in the conversation]")
            return None
        except ClientError as exc:
            self.say(("\n" if parts else "") + f"error: {exc}")
            return None
        self.say()
        reply = "".join(parts)
        self.messages = turn + [{"role": "assistant", "content": reply}]
        self.last_response_id, self.last_reply = response_id, reply
        return reply


# A command gets the session and the rest of its line; it returns False to end the chat.
Command = Callable[[ChatSession, str], bool]
COMMANDS: dict[str, tuple[Command, str]] = {}


def command(name: str, help_text: str) -> Callable[[Command], Command]:
    """Register `/name` (e.g. feedback keys: `@command("/good", "rate the last answer up")`)."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (fn, help_text)
        return fn

    return register


@command("/help", "list the commands")
def _help(session: ChatSession, arg: str) -> bool:
    for name, (_, help_text) in sorted(COMMANDS.items()):
        session.say(f"  {name:<10} {help_text}")
    session.say("  Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt quits.")
    return True


@command("/version", "show the served model and its version")
def _version(session: ChatSession, arg: str) -> bool:
    try:
        info = session.client.model_info()
    except ClientError as exc:
        session.say(f"error: {exc}")
        return True
    session.say(f"model version {info.model_version} ({info.architecture}, {info.backend} "
                f"backend, {info.dtype}, context {info.context_length} tokens)")
    if info.sampling_defaults:
        session.say("server sampling defaults: " + ", ".join(
            f"{k} {v:g}" for k, v in info.sampling_defaults.items()))
    return True


@command("/reset", "forget the conversation and start over")
def _reset(session: ChatSession, arg: str) -> bool:
    session.reset()
    session.say("[conversation reset]")
    return True


@command("/quit", "leave the chat")
def _quit(session: ChatSession, arg: str) -> bool:
    return False


def handle_line(session: ChatSession, line: str) -> bool:
    """Act on one input line; returns False when the chat should end."""
    line = line.strip()
    if not line:
        return True
    if line.startswith("/"):
        name, _, arg = line.partition(" ")
        entry = COMMANDS.get(name)
        if entry is None:
            session.say(f"unknown command {name}; /help lists them")
            return True
        return entry[0](session, arg.strip())
    session.ask(line)
    return True
