"""Feedback keys of `prefloop chat`: registered into chat's command table on import.

    /up [comment]     rate the last answer up (thumbs +1)
    /down [comment]   rate the last answer down (thumbs -1)
    /pair <message>   ask for two answers side by side (n=2) and pick the better one
    /better <text>    your own better answer: recorded as preferred over the last answer,
                      and it replaces that answer in the conversation

Every submission carries a fresh idempotency key and is retried once with the same key when the
server answers UNAVAILABLE, so a retry can never record it twice.
"""
from __future__ import annotations

import uuid
from typing import Callable

from prefloop.clients.chat_session import ChatSession, command
from prefloop.clients.client import FeedbackAck
from prefloop.clients.errors import ClientError, Unavailable

# how /pair reads the choice (tests replace it)
read_choice: Callable[[str], str] = input


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


@command("/pair", "two answers to <message> side by side; pick the better")
def _pair(session: ChatSession, arg: str) -> bool:
    if not arg:
        session.say("usage: /pair <message>")
        return True
    turn = session.messages + [{"role": "user", "content": arg}]
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
    for number, completion in ((1, first), (2, second)):
        session.say(f"--- [{number}] ---")
        session.say(completion.text)
    try:
        choice = read_choice("better? [1/2, Enter to skip] ").strip()
    except (EOFError, KeyboardInterrupt):
        choice = ""
    if choice not in ("1", "2"):
        session.say("[no preference recorded; the first answer is kept]")
        chosen = first
    else:
        chosen, rejected = (first, second) if choice == "1" else (second, first)
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
        session.last_reply = arg
        session.last_response_id = None  # the conversation's last answer is now the user's
    return True
