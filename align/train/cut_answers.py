"""Training on what users saw: an answer cut before its end is not trained as a finished one.

TRL's trainers render every conversational answer through the chat template, which closes the
assistant turn (`<|im_end|>` and a newline for ChatML). For an answer stopped by `max_tokens`,
the user's Stop or a stop string (`rows.is_cut`) that teaches the model to end its turn where
the text happened to stop. The training rows carry a flag per answer (`chosen_cut`,
`rejected_cut`, `completion_cut`: `rows.*.to_trl()`); after TRL has tokenized the training set,
`drop_end_of_turn` removes the closing tokens from the ids of the flagged answers (the
scoring path does the same through `evaluate.encode(..., cut=True)`) and drops the flags.

The closing tokens are the template's own: the ids of a rendered conversation past the ids of
the same conversation rendered with `continue_final_message=True` (the transformers option for
an unfinished last message).
"""
from __future__ import annotations

from typing import Any

# flag column -> the token-id columns of that answer (every per-token column of the row is cut
# by the same count: SFT also has a completion mask of the same length)
FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "dpo": {"chosen_cut": ("chosen_ids",), "rejected_cut": ("rejected_ids",)},
    "rm": {"chosen_cut": ("chosen_ids",), "rejected_cut": ("rejected_ids",)},
    "kto": {"completion_cut": ("completion_ids",)},
    "sft": {"completion_cut": ("input_ids", "labels", "completion_mask", "attention_mask",
                               "assistant_masks")},
}

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids the chat template puts after an assistant message's text."""
    def ids(**kwargs: Any) -> list[int]:
        out = tokenizer.apply_chat_template(_PROBE, tokenize=True, return_dict=True, **kwargs)
        return list(out["input_ids"])
    full, open_ended = ids(), ids(continue_final_message=True)
    if full[:len(open_ended)] != open_ended:
        raise ValueError("the chat template renders an unfinished answer as something other than "
                         "a prefix of the finished one; cannot tell its end-of-turn tokens")
    return full[len(open_ended):]


def strip_tail(ids: list[int], tail: list[int]) -> int:
    """How many tokens to remove from the end of `ids`: len(tail) when `ids` ends with `tail`
    (a sequence truncated before its end has nothing to remove), else 0."""
    return len(tail) if tail and len(ids) >= len(tail) and list(ids[-len(tail):]) == tail else 0


def drop_end_of_turn(dataset, tokenizer, method: str):
    """The tokenized `dataset` (a `datasets.Dataset` TRL prepared) with the end-of-turn tokens of
    every answer flagged cut removed, and without the flag columns."""
    flags = {f: cols for f, cols in FLAGS[method].items() if f in dataset.column_names}
    if not flags:
        return dataset
    tail = end_of_turn_ids(tokenizer)

    def cut(row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for flag, columns in flags.items():
            present = [c for c in columns if c in row and row[c] is not None]
            if not row[flag] or not present:
                continue
            n = strip_tail(row[present[0]], tail)
            if n:
                out.update({c: row[c][:-n] for c in present if len(row[c]) == len(row[present[0]])})
        return out

    return dataset.map(cut, desc="dropping end-of-turn tokens of cut answers").remove_columns(
        list(flags))
