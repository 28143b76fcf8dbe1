"""Feedback keys of `prefloop chat`: registered into chat's command table on import.

    /up [comment]     rate the last answer up (thumbs +1)
    /down [comment]   rate the last answer down (thumbs -1)
    /pair [message]   two answers (n=2) to <message>, or to your last message when none is
                      given, side by side when the terminal is wide enough (else A then B);
                      pick the better one
    /better <text>    your own better answer: recorded as preferred over the last answer,
                      and it replaces that answer in the conversation

Every submission carries a fresh idempotency key and is retried once with the same key when the
server answers UNAVAILABLE, so a retry can never record it twice.
"""
from __future__ import annotations

import itertools
import shutil
import textwrap
import uuid
from typing import Callable

from prefloop.clients.chat_session import ChatSession, command
from prefloop.clients.client import FeedbackAck
from prefloop.clients.errors import ClientError, Unavailable

# how /pair reads the choice and the terminal's width (tests replace them)
read_choice: Callable[[str], str] = input
terminal_width: Callable[[], int] = lambda: shutil.get_terminal_size((80, 24)).columns
SIDE_BY_SIDE_MIN_WIDTH = 100  # two columns of at least 48 characters


def side_by_side(left: str, right: str, width: int, labels: tuple[str, str] = ("A", "B")
                 ) -> list[str]:
    """Two texts in two columns of a `width`-character terminal, each wrapped to its column."""
    col = (width - 3) // 2

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, col, replace_whitespace=False,
                                   drop_whitespace=True) or [""]
        return lines

    head = [f"{'--- [' + labels[0] + '] ---':<{col}} | {'--- [' + labels[1] + '] ---'}"]
    return head + [f"{a:<{col}} | {b}".rstrip()
                   for a, b in itertools.zip_longest(wrap(left), wrap(right), fillvalue="")]


def _submit(session: ChatSession, call: Callable[..., FeedbackAck], **kwargs) -> bool:
    key = uuid.uuid4().hex
    for attempt in (1, 2):
        try:
            ack = call(idempotency_key=key, user_id=session.user_id,
                       session_id=session.session_id, **kwargs)
        except Unavailable as exc:
            if attempt == 2:
                session.say(f"feedback not recorded: {exc}")
                return False
            continue
        except ClientError as exc:
            session.say(f"feedback not recorded: {exc}")
            return False
        session.say(f"[recorded {ack.feedback_id}]")
        return True
    return False


def _rate(session: ChatSession, score: int, comment: str) -> bool:
    if session.last_response_id is None:
        session.say("nothing to rate yet: ask something first")
        return True
    _submit(session, session.client.submit_rating, response_id=session.last_response_id,
            score=score, comment=comment)
    return True


@command("/up", "rate the last answer up (optional comment)")
def _up(session: ChatSession, arg: str) -> bool:
    return _rate(session, +1, arg)


@command("/down", "rate the last answer down (optional comment)")
def _down(session: ChatSession, arg: str) -> bool:
    return _rate(session, -1, arg)


def _last_user_turn(session: ChatSession) -> list[dict] | None:
    """The conversation up to and including the last user message (None: none yet)."""
    for i in range(len(session.messages) - 1, -1, -1):
        if session.messages[i]["role"] == "user":
            return session.messages[:i + 1]
    return None


@command("/pair", "[message]: two answers to it (default: your last message) side by side; "
                  "pick the better")
def _pair(session: ChatSession, arg: str) -> bool:
    if arg:
        turn = session.messages + [{"role": "user", "content": arg}]
    else:  # two new answers to the last message (they replace the answer given to it)
        turn = _last_user_turn(session)
        if turn is None:
            session.say("usage: /pair <message> (or /pair alone after a message: two answers "
                        "to it)")
            return True
    sampling = dict(session.sampling, n=2)
    if sampling.get("temperature") == 0:
        sampling.pop("temperature")  # greedy would give the same answer twice
    try:
        result = session.client.chat(turn, session_id=session.session_id,
                                     user_id=session.user_id, **sampling)
    except ClientError as exc:
        session.say(f"error: {exc}")
        return True
    first, second = result.completions[0], result.completions[1]
    width = terminal_width()
    if width >= SIDE_BY_SIDE_MIN_WIDTH:
        for line in side_by_side(first.text, second.text, width):
            session.say(line)
    else:
        for label, completion in (("A", first), ("B", second)):
            session.say(f"--- [{label}] ---")
            session.say(completion.text)
    try:
        choice = read_choice("better? [A/B, Enter to skip] ").strip().upper()
    except (EOFError, KeyboardInterrupt):
        choice = ""
    choice = {"1": "A", "2": "B"}.get(choice, choice)
    if choice not in ("A", "B"):
        session.say("[no preference recorded; answer A is kept]")
        chosen = first
    else:
        chosen, rejected = (first, second) if choice == "A" else (second, first)
        if chosen.text == rejected.text:
            session.say("[the answers are identical; nothing to prefer]")
        else:
            _submit(session, session.client.submit_preference,
                    chosen_response_id=chosen.response_id,
                    rejected_response_id=rejected.response_id)
    session.messages = turn + [{"role": "assistant", "content": chosen.text}]
    session.last_response_id, session.last_reply = chosen.response_id, chosen.text
    return True


@command("/better", "<text>: your better version of the last answer")
def _better(session: ChatSession, arg: str) -> bool:
    if not arg:
        session.say("usage: /better <your better answer>")
        return True
    if session.last_reply is None or not session.messages \
            or session.messages[-1]["role"] != "assistant":
        session.say("nothing to improve yet: ask something first")
        return True
    prompt = session.messages[:-1]
    if _submit(session, session.client.submit_preference, prompt_messages=prompt,
               chosen_text=arg, rejected_text=session.last_reply):
        session.messages = prompt + [{"role": "assistant", "content": arg}]
        session.last_reply = arg  # last_response_id stays: /up, /down rate the answer shown
    return True
