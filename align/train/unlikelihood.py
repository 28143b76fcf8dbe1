"""Unlikelihood on the loops of disliked answers (KTO, `--unlikelihood COEF`, opt-in).

The base model loops in a third to a half of its 128-token answers at the web page's settings,
and users put those answers last. KTO lowers a disliked answer's log-probability as a whole: it
may do that on the answer's ordinary opening as well as on the loop that made it bad, and a
weak preference trained that way has left candidates looping more, not less (docs/align.md).
Unlikelihood training (Welleck et al. 2019, "Neural text generation with unlikelihood
training") puts the loss where the loop is: at every token of a disliked answer that completes
a token n-gram the answer has already written at least twice, the loss adds −log(1 − p(token)),
whose gradient on that token's logit is proportional to p — bounded, and gone once the model no
longer repeats it. Only disliked answers (thumbs down, the losing side of a pick) carry it: the term follows
the users' labels, so labels that carry nothing spread it over liked and disliked loops alike.

`unlikelihood_term` gives, per answer, a disliked answer's mean unlikelihood over its repeated
tokens (liked answers, and answers without repeats, count 0); `kto_with_terms`
(align/train/kto_terms.py) adds COEF × its batch mean to KTO's loss, read from TRL's own policy
pass, and logs it as `unlikelihood` in the trainer's history.
"""
from __future__ import annotations

NGRAM = 4  # tokens: a repeat is a 4-token sequence written again
REPEATS_BEFORE = 2  # ... for at least the third time (a loop, not a phrase said twice)


def repeated_tokens(input_ids, completion_mask, n: int = NGRAM, before: int = REPEATS_BEFORE):
    """Bool tensor shaped like `input_ids`: token t is in the completion and the n tokens ending
    at t (all in the completion) already ended at `before` or more earlier positions of it."""
    import torch

    flags = []
    for row, mask in zip(input_ids.tolist(), completion_mask.bool().tolist()):
        seen: dict[tuple[int, ...], int] = {}
        out = [False] * len(row)
        for t in range(n - 1, len(row)):
            if not all(mask[t - n + 1:t + 1]):
                continue
            gram = tuple(row[t - n + 1:t + 1])
            count = seen.get(gram, 0)
            out[t] = count >= before
            seen[gram] = count + 1
        flags.append(out)
    return torch.tensor(flags, dtype=torch.bool, device=input_ids.device).view(input_ids.shape)


def answer_unlikelihood(log_probs, repeated):
    """Per answer: the mean of −log(1 − p) over its repeated tokens (0 without any).
    `log_probs[:, j]` is the log-probability of token j + 1 (TRL's shifted labels), so
    `repeated` is the mask of `repeated_tokens` without its first column. p is clamped under
    1 − 1e-6: a repeat the model is that sure of adds 13.8 and no gradient."""
    import torch

    p = log_probs.exp().clamp(max=1 - 1e-6)
    terms = -torch.log1p(-p) * repeated
    return terms.sum(-1) / repeated.sum(-1).clamp(min=1)


def unlikelihood_term(log_probs, inputs):
    """Per answer: its mean unlikelihood over its repeats if disliked, else 0."""
    import torch

    repeated = repeated_tokens(inputs["input_ids"], inputs["completion_mask"])[:, 1:]
    repeated = repeated.to(log_probs.device)
    disliked = ~torch.as_tensor(inputs["label"], dtype=torch.bool, device=repeated.device)
    return answer_unlikelihood(log_probs, repeated) * disliked
