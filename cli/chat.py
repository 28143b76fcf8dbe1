"""`prefloop chat`: a terminal chat against a running server.

Streams each answer as it is decoded and keeps the conversation (it is sent in full with every
turn). The session and the slash-command table (`COMMANDS`, the `command` decorator) live in
chat_session.py; the feedback keys (chat_feedback.py) plug in there and use
`session.last_response_id`. This module is the terminal loop and its flags. Ctrl-C during an
answer stops it; Ctrl-C or Ctrl-D at the prompt quits, as does /quit.
"""
from __future__ import annotations

import argparse
import os
import sys

from prefloop.clients import chat_feedback  # noqa: F401  (registers /up, /down, /pair, /better)
from prefloop.clients.chat_session import COMMANDS, ChatSession, Command, command, handle_line
from prefloop.clients.client import DEFAULT_TARGET, TOKEN_ENV, Client
from prefloop.clients.errors import ClientError

__all__ = ["COMMANDS", "ChatSession", "Command", "add_arguments", "command", "handle_line", "run",
           "sampling_of"]

PROMPT = "you> "


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
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: keep the smallest set of tokens whose probability "
                             "reaches P, in (0, 1] (default: the server's)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="> 1 discourages tokens already in the context; 1 = off (default: the "
                             "server's)")
    parser.add_argument("--frequency-penalty", type=float, default=None,
                        help="OpenAI's, in [-2, 2]: subtracted from a token's logit per time it occurs "
                             "in the answer so far; 0 = off (default 0)")
    parser.add_argument("--presence-penalty", type=float, default=None,
                        help="OpenAI's, in [-2, 2]: subtracted once from a token that occurs in the "
                             "answer so far; 0 = off (default 0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of each answer's sampling: the same seed and settings give the "
                             "same answer (default: random)")
    parser.add_argument("--session-id", default=None,
                        help="conversation id recorded with each answer (default: random)")
    parser.add_argument("--user-id", default=os.environ.get("USER", ""),
                        help="user id recorded with each answer (default $USER)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="deadline of each call in seconds (default %(default)s)")


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty", "seed")


def sampling_of(args: argparse.Namespace) -> dict:
    """The sampling fields every turn sends: the flags given (None leaves one to the server).
    Raises InvalidArgument for a value no server takes (checked as the server checks it), so a
    mistake is reported before connecting, not after every turn."""
    from prefloop.server.engine.sampling_params import SamplingParams

    sampling = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    SamplingParams(**sampling)
    return sampling


def _catch_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt even when the parent started us with SIGINT ignored
    or blocked (a background job of a shell script, some supervisors): Python then keeps the
    ignore, and Ctrl-C would neither stop an answer nor quit."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


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
    from prefloop.server.errors import InvalidArgument

    try:
        sampling = sampling_of(args)
    except InvalidArgument as exc:
        print(f"prefloop chat: {exc}", file=sys.stderr)
        return 2
    client = Client(args.target, token=args.token, root_certificates=args.tls_root_cert,
                    tls=args.tls, timeout=args.timeout)
    _catch_ctrl_c()
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
