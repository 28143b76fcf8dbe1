"""The likelihood of liked answers beside KTO (`--liked-nll COEF`, opt-in).

Most feedback on a chat page is thumbs, most of them down, so a KTO job mostly learns what to
avoid: it lowers disliked answers as wholes, and with nothing holding it to plausible text the
mass it frees can go to loops, other topics or gibberish (docs/align.md, the paced runs). The
liked answers are the model's own samples that users liked: fluent, on-policy text with more of
what the users want. Adding their negative log-likelihood to the loss (as RPO adds it to DPO's,
Pang et al. 2024, "Iterative reasoning preference optimization") pulls the model towards them
directly — a filtered behaviour cloning beside the preference loss — where KTO's own pull on a
liked answer saturates once its log-ratio passes the reference point.

`liked_nll_term` gives, per answer, the mean negative log-likelihood of its tokens if it is
liked (👍, 4–5 stars, the winning side of a pick or an edit), else 0; `kto_with_terms`
(align/train/kto_terms.py) adds COEF × its batch mean to KTO's loss and logs it as `liked_nll`.
A cut answer's end-of-turn tokens were already removed (align/train/cut_answers.py), so a cut
liked answer does not teach the model to stop there.
"""
from __future__ import annotations


def liked_nll_term(log_probs, inputs):
    """Per answer: the mean of −log p over its completion tokens if liked, else 0."""
    import torch

    mask = inputs["completion_mask"][:, 1:].to(log_probs.device, log_probs.dtype)
    liked = torch.as_tensor(inputs["label"], dtype=torch.bool, device=log_probs.device)
    nll = -(log_probs * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return nll * liked
