"""`prefloop chat`: a terminal chat against a running server.

Streams each answer as it is decoded and keeps the conversation (it is sent in full with every
turn). Slash commands live in one table, `COMMANDS`; add one with the `command` decorator (the
feedback keys plug in there and use `session.last_response_id`). Ctrl-C during an answer stops it;
Ctrl-C or Ctrl-D at the prompt quits, as does /quit.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from prefloop.clients.client import DEFAULT_TARGET, TOKEN_ENV, Client
from prefloop.clients.errors import ClientError

PROMPT = "you> "


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help="server address host:port (default %(default)s)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token (default ${TOKEN_ENV})")
    parser.add_argument("--tls-root-cert", default=None,
                        help="PEM root certificate to verify the server (enables TLS)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--system", default=None, help="system message opening the conversation")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per answer (default: the server's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (0 = greedy; default: the server's)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--session-id", default=None,
                        help="conversation id recorded with each answer (default: random)")
    parser.add_argument("--user-id", default=os.environ.get("USER", ""),
                        help="user id recorded with each answer (default $USER)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="deadline of each call in seconds (default %(default)s)")


def _read_line() -> str | None:
    try:
        return input(PROMPT)
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    import uuid

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    client = Client(args.target, token=args.token, root_certificates=args.tls_root_cert,
                    tls=args.tls, timeout=args.timeout)
    sampling = {k: v for k, v in dict(max_tokens=args.max_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed).items() if v is not None}
    session = ChatSession(client, system=args.system, sampling=sampling,
                          session_id=args.session_id or f"chat-{uuid.uuid4().hex[:12]}",
                          user_id=args.user_id)
    try:
        try:
            info = client.model_info(timeout=10)
        except ClientError as exc:
            print(f"prefloop chat: cannot reach {args.target}: {exc}", file=sys.stderr)
            return 1
        session.say(f"connected to {args.target}: {info.model_version}. /help for commands.")
        while True:
            try:
                line = _read_line()
            except KeyboardInterrupt:
                line = None
            if line is None:  # Ctrl-D / Ctrl-C at the prompt
                session.say()
                break
            if not handle_line(session, line):
                break
        return 0
    finally:
        client.close()
from prefloop.clients import chat_feedback  # noqa: E402,F401  (registers /up, /down, /pair, /better)
