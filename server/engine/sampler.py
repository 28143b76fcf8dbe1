"""Sampling as pure functions on logits [num_seqs, vocab].

Order (as in HF/vLLM): repetition penalty -> frequency / presence penalties -> temperature ->
top-k -> top-p -> draw. Greedy rows
(temperature 0) take the argmax. Every random row draws with its own `torch.Generator`, so a seeded
request gives the same tokens alone or in any batch.
"""
from __future__ import annotations

import os

import torch


def request_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """The random generator of one candidate of one request: seeded with `seed + index` (so the
    n candidates of a seeded request differ from each other, and the same request gives the same
    tokens alone or in any batch), or from the OS's entropy when `seed` is None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    else:
        seed += index
    return torch.Generator().manual_seed(seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on one row [vocab] for the token ids in `seen`: divide positive logits,
    multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    ids = seen.unique()
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_frequency_presence_penalties(logits: torch.Tensor, output_ids: list[int],
                                       frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's penalties on one row [vocab], as vLLM applies them: the completion's own tokens
    (not the prompt's) lose `frequency` per occurrence and `presence` once."""
    if (frequency == 0.0 and presence == 0.0) or not output_ids:
        return logits
    counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long),
                            minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of a row [vocab] (k <= 0 or >= vocab keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering of a row [vocab]: keep the smallest set of tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    remove_sorted = mass_before >= p  # the top token always stays
    remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """Draw one token id from a row [vocab] of (already penalized) logits."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    logits = apply_top_p(apply_top_k(logits / temperature, top_k), top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, rows: list) -> list[int]:
    """One token per row. `rows[i]` has .params (SamplingParams), .generator, .token_ids (prompt
    then completion) and .prompt_len."""
    logits = logits.float()
    out: list[int] = []
    greedy_plain = [i for i, r in enumerate(rows) if r.params.greedy and not r.params.penalized]
    argmax = logits.argmax(-1).tolist() if greedy_plain else None
    plain = set(greedy_plain)
    for i, row in enumerate(rows):
        if i in plain:
            out.append(argmax[i])
            continue
        p = row.params
        lg = logits[i]
        if p.repetition_penalty != 1.0:
            lg = apply_repetition_penalty(lg, torch.tensor(row.token_ids, dtype=torch.long),
                                          p.repetition_penalty)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            lg = apply_frequency_presence_penalties(lg, row.token_ids[row.prompt_len:],
                                                    p.frequency_penalty, p.presence_penalty)
        out.append(sample_row(lg, p.temperature, p.top_k, p.top_p, row.generator))
    return out
