"""Scoring models on preference pairs: sequence log-probs, reward metrics, KL to the reference.

Tokenization is TRL's for conversational rows: the prompt rendered with the chat template and
`add_generation_prompt=True`, the completion = the rest of the rendered prompt + answer (from
where the two token lists diverge), truncated to `max_length` keeping the start. An answer the
user saw cut (max_tokens, Stop, a stop string) is scored without the end-of-turn tokens, as it is
trained (align/train/cut_answers.py). Chosen and
rejected answers of a batch go through one concatenated forward pass per model.

- `score_pairs(policy, tokenizer, pairs, reference=...)`: per-pair summed log-probs of the policy
  (and of the reference, plus the exact per-token KL(policy ‖ reference) over the completion
  tokens, both models reading the same batch);
- `pair_metrics(...)`: loss, reward accuracy / margin (implicit rewards β·log π/π_ref, as TRL logs
  them), reference-free preference accuracy (what the gate compares), KL per token;
- `score_examples` / `example_metrics`: the same for unpaired KTO examples;
- `centered_moves`: per answer, the candidate's log-ratio to the current version minus its
  expectation under the current version's own sampling (benchmarks/gate_power.py);
- `paired_pair_outcomes` / `indexed_pair_outcomes`: candidate vs current version on the same
  held-out items, as the win / loss / tie counts the gate's paired tests take (align/gate.py);
- `sft_metrics`: negative log-likelihood per token of supervised examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from prefloop.align.gate import Paired
from prefloop.align.losses import preference_accuracy, preference_loss, reward_metrics, token_kl
from prefloop.server.feedback.rows import PreferencePair, RatedAnswer, SftExample, is_cut

_KL_CHUNK = 512  # predicted tokens per KL chunk: bounds the [chunk, vocab] temporaries


@dataclass(slots=True)
class Encoded:
    prompt_ids: list[int]
    completion_ids: list[int]


def _template_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def encode(tokenizer, prompt: list[dict], completion: list[dict], max_length: int,
           cut: bool = False) -> Encoded:
    """Token ids of a conversational (prompt, completion) the way TRL's trainers build them; a
    `cut` answer (rows.is_cut) ends where its text ends, without the end-of-turn tokens."""
    prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _template_ids(tokenizer, list(prompt) + list(completion),
                             **({"continue_final_message": True} if cut else {}))
    k = 0
    while k < min(len(prompt_ids), len(full_ids)) and prompt_ids[k] == full_ids[k]:
        k += 1
    full_ids = full_ids[:max_length]  # keep_start truncation
    return Encoded(full_ids[:k], full_ids[k:])


def _batch(items: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded `input_ids`, `attention_mask`, `completion_mask`, each [batch, seq]."""
    seq = max(len(e.prompt_ids) + len(e.completion_ids) for e in items)
    input_ids = torch.full((len(items), seq), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), seq), dtype=torch.long)
    completion_mask = torch.zeros((len(items), seq), dtype=torch.long)
    for i, e in enumerate(items):
        ids = e.prompt_ids + e.completion_ids
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        completion_mask[i, len(e.prompt_ids):len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device)


def _completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       predict: torch.Tensor) -> torch.Tensor:
    """Logits only where a completion token is predicted (the LM head and the softmax over the
    vocabulary dominate the cost; prompt positions are skipped).

    input_ids, attention_mask: [batch, seq]; predict: [batch, seq-1] bool, True where position t
    predicts completion token t+1. Returns [n_predicted, vocab].
    """
    hidden = model.get_decoder()(input_ids=input_ids,
                                 attention_mask=attention_mask).last_hidden_state  # [b, s, h]
    return model.get_output_embeddings()(hidden[:, :-1][predict])  # [n, vocab]


@dataclass(slots=True)
class Scores:
    """Per item (a pair's chosen, or an example): summed completion log-probs and token counts."""

    logps: torch.Tensor  # [n]
    tokens: torch.Tensor  # [n]
    ref_logps: torch.Tensor | None = None  # [n]
    kl_sum: torch.Tensor | None = None  # [n] sum over completion tokens of KL(policy ‖ ref)
    back_kl_sum: torch.Tensor | None = None  # [n] the same sum of KL(ref ‖ policy), if asked


@torch.no_grad()
def _score_items(policy, tokenizer, items: list[Encoded], groups: Iterable[list[int]], *,
                 reference=None, progress: str | None = None, back_kl: bool = False) -> Scores:
    """Score `items`; each group of item indices goes through one forward pass per model
    (`back_kl`: also Σ_t KL_t(reference ‖ policy), for `centered_moves`)."""
    from tqdm.auto import tqdm
    device = next(policy.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(items)
    logps, tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    ref_logps = torch.zeros(n, dtype=torch.float64) if reference is not None else None
    kl_sum = torch.zeros(n, dtype=torch.float64) if reference is not None else None
    back_kl_sum = torch.zeros(n, dtype=torch.float64) if reference is not None and back_kl \
        else None
    groups = list(groups)
    for group in tqdm(groups, desc=progress, disable=progress is None, leave=False):
        input_ids, attention_mask, completion_mask = _batch([items[i] for i in group], pad_id,
                                                            device)
        predict = completion_mask[:, 1:].bool()  # [batch, seq-1]
        labels = input_ids[:, 1:][predict]  # [n]
        rows = predict.nonzero()[:, 0].cpu()  # [n] batch row of each predicted token
        index = torch.tensor(group)
        logits = _completion_logits(policy, input_ids, attention_mask, predict).float()
        token_logps = (logits.gather(-1, labels[:, None]).squeeze(-1)
                       - logits.logsumexp(-1)).double().cpu()  # [n]
        logps[index] = torch.zeros(len(group), dtype=torch.float64).index_add_(0, rows, token_logps)
        tokens[index] = predict.sum(1).double().cpu()
        if reference is not None:
            ref_logits = _completion_logits(reference, input_ids, attention_mask, predict).float()
            ref_token_logps = (ref_logits.gather(-1, labels[:, None]).squeeze(-1)
                               - ref_logits.logsumexp(-1)).double().cpu()  # [n]
            ref_logps[index] = torch.zeros(len(group), dtype=torch.float64).index_add_(
                0, rows, ref_token_logps)
            kl = torch.cat([token_kl(logits[s:s + _KL_CHUNK], ref_logits[s:s + _KL_CHUNK])
                            for s in range(0, logits.shape[0], _KL_CHUNK)]).double().cpu()  # [n]
            kl_sum[index] = torch.zeros(len(group), dtype=torch.float64).index_add_(0, rows, kl)
            if back_kl_sum is not None:
                back = torch.cat([token_kl(ref_logits[s:s + _KL_CHUNK], logits[s:s + _KL_CHUNK])
                                  for s in range(0, logits.shape[0], _KL_CHUNK)]).double().cpu()
                back_kl_sum[index] = torch.zeros(len(group), dtype=torch.float64).index_add_(
                    0, rows, back)
    return Scores(logps, tokens, ref_logps, kl_sum, back_kl_sum)


def centered_moves(scores: Scores) -> list[float]:
    """Per answer scored with `back_kl` (policy = candidate, reference = the version it would
    replace): its move, Σ_t log π_cand/π_cur (y_t), minus what that sum is expected to be had
    every token been drawn from the current version given the same prefix
    (−Σ_t KL_t(π_cur ‖ π_cand)), so that a prompt all of whose answers the candidate shifts
    centres near 0. A statistic the gate was measured with and did not take (the tuning votes
    disagreed about it: benchmarks/gate_power.py, docs/loop_benchmark.md)."""
    if scores.ref_logps is None or scores.back_kl_sum is None:
        raise ValueError("centered moves need scores taken with back_kl against the current "
                         "version")
    return (scores.logps - scores.ref_logps + scores.back_kl_sum).tolist()


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> list[Encoded]:
    """[chosen_0, ..., chosen_{n-1}, rejected_0, ..., rejected_{n-1}]."""
    chosen = [encode(tokenizer, p.prompt, p.chosen, max_length, is_cut(p.chosen_finish_reason))
              for p in pairs]
    rejected = [encode(tokenizer, p.prompt, p.rejected, max_length,
                       is_cut(p.rejected_finish_reason)) for p in pairs]
    return chosen + rejected


def score_pairs(policy, tokenizer, pairs: list[PreferencePair], *, reference=None,
                batch_size: int = 4, max_length: int = 1024,
                progress: str | None = None) -> Scores:
    """Scores of 2n items: chosen answers first, then rejected. A batch of `batch_size` pairs is
    one forward pass over its chosen and rejected answers together."""
    items = encode_pairs(tokenizer, pairs, max_length)
    n = len(pairs)
    groups = [list(range(s, min(s + batch_size, n))) + list(range(n + s, n + min(s + batch_size, n)))
              for s in range(0, n, batch_size)]
    return _score_items(policy, tokenizer, items, groups, reference=reference, progress=progress)


def score_examples(policy, tokenizer, examples: list[RatedAnswer | SftExample], *,
                   reference=None, batch_size: int = 8, max_length: int = 1024,
                   progress: str | None = None, back_kl: bool = False) -> Scores:
    items = [encode(tokenizer, e.prompt, e.completion, max_length, is_cut(e.finish_reason))
             for e in examples]
    return score_encoded(policy, tokenizer, items, reference=reference, batch_size=batch_size,
                         progress=progress, back_kl=back_kl)


def score_encoded(policy, tokenizer, items: list[Encoded], *, reference=None,
                  batch_size: int = 8, progress: str | None = None,
                  back_kl: bool = False) -> Scores:
    """Scores of already encoded (prompt, completion) items (`encode`), `batch_size` a pass."""
    groups = [list(range(s, min(s + batch_size, len(items))))
              for s in range(0, len(items), batch_size)]
    return _score_items(policy, tokenizer, items, groups, reference=reference, progress=progress,
                        back_kl=back_kl)


def split_pair_scores(scores: Scores) -> tuple[Scores, Scores]:
    n = scores.logps.numel() // 2

    def part(sl: slice) -> Scores:
        return Scores(scores.logps[sl], scores.tokens[sl],
                      None if scores.ref_logps is None else scores.ref_logps[sl],
                      None if scores.kl_sum is None else scores.kl_sum[sl],
                      None if scores.back_kl_sum is None else scores.back_kl_sum[sl])
    return part(slice(0, n)), part(slice(n, 2 * n))


def kl_metrics(scores: Scores) -> dict[str, float]:
    """Mean KL(policy ‖ reference) per completion token and per sequence."""
    if scores.kl_sum is None or scores.tokens.sum() == 0:
        return {}
    return {"kl_per_token": float(scores.kl_sum.sum() / scores.tokens.sum()),
            "kl_per_sequence": float(scores.kl_sum.mean())}


def pair_metrics(scores: Scores, *, beta: float, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0) -> dict[str, float]:
    """Metrics of a policy scored (with its reference) on pairs; see the module docstring."""
    chosen, rejected = split_pair_scores(scores)
    out: dict[str, float] = {"pairs": chosen.logps.numel()}
    if chosen.logps.numel() == 0:
        return out
    # length-normalized (mean log-prob per completion token): summed log-probs would favour the
    # shorter answer whatever users preferred (e.g. an answer extended by the user always loses)
    out["pref_accuracy"] = preference_accuracy(chosen.logps / chosen.tokens.clamp(min=1),
                                               rejected.logps / rejected.tokens.clamp(min=1))
    if scores.ref_logps is not None:
        losses, cr, rr = preference_loss(
            chosen.logps, rejected.logps, chosen.ref_logps, rejected.ref_logps, beta=beta,
            loss_type=loss_type, label_smoothing=label_smoothing,
            chosen_tokens=chosen.tokens, rejected_tokens=rejected.tokens)
        out.update(reward_metrics(losses, cr, rr))
        out["ref_pref_accuracy"] = preference_accuracy(
            chosen.ref_logps / chosen.tokens.clamp(min=1),
            rejected.ref_logps / rejected.tokens.clamp(min=1))
        out.update(kl_metrics(scores))
    return out


def example_metrics(scores: Scores, labels: list[bool], *, beta: float) -> dict[str, float]:
    """KTO examples: mean implicit reward of desirable / undesirable answers, label accuracy
    (reward sign agrees with the label, zero counts one half), KL per token."""
    out: dict[str, float] = {"examples": len(labels)}
    if not labels or scores.ref_logps is None:
        return out
    rewards = beta * (scores.logps - scores.ref_logps)  # [n]
    lab = torch.tensor(labels, dtype=torch.bool)
    agree = torch.where(lab, rewards > 0, rewards < 0).double() + 0.5 * (rewards == 0).double()
    out["label_accuracy"] = float(agree.mean())
    if lab.any():
        out["desirable_reward"] = float(rewards[lab].mean())
    if (~lab).any():
        out["undesirable_reward"] = float(rewards[~lab].mean())
    if lab.any() and (~lab).any():
        out["reward_margin"] = out["desirable_reward"] - out["undesirable_reward"]
    out.update(kl_metrics(scores))
    return out


def indexed_pair_accuracy(scores: Scores, pairs: list[tuple[int, int]]) -> float | None:
    """Over (desirable, undesirable) index pairs into example scores: how often the desirable
    answer has the higher mean per-token log-prob (ties count one half)."""
    if not pairs:
        return None
    idx = torch.tensor([g for g, _ in pairs] + [b for _, b in pairs])
    return float(per_token_correct(Scores(scores.logps[idx], scores.tokens[idx])).mean())


# ---------------------------------------------------------------------------------------------
# Candidate vs current on the same held-out items (what the gate's paired tests count)

TIE_TOL = 1e-6  # nats: two float32 forward passes of identical weights agree far closer


def per_token_correct(scores: Scores) -> torch.Tensor:
    """Per pair [n]: 1 if the chosen answer has the higher mean log-prob per token, 0.5 on a
    tie, else 0 (reference-free; `losses.preference_accuracy` is its mean)."""
    chosen, rejected = split_pair_scores(scores)
    c = chosen.logps / chosen.tokens.clamp(min=1)
    r = rejected.logps / rejected.tokens.clamp(min=1)
    return (c > r).double() + 0.5 * (c == r).double()


def relative_margins(candidate: Scores, current: Scores) -> torch.Tensor:
    """Per pair [n]: (log π_cand − log π_current)(chosen) − (…)(rejected), summed over the
    answer tokens: β times it is DPO's implicit reward margin with the current version as the
    reference. Positive: the candidate moved towards the voters' choice relative to the current
    version. `candidate` and `current` are the pair scores (chosen first, then rejected) of the
    same pairs."""
    cand_c, cand_r = split_pair_scores(candidate)
    cur_c, cur_r = split_pair_scores(current)
    return (cand_c.logps - cur_c.logps) - (cand_r.logps - cur_r.logps)


def paired_pair_outcomes(candidate: Scores, current: Scores, *, beta: float
                         ) -> dict[str, Any]:
    """The two paired comparisons of candidate vs current on the same pairs, as gate inputs:
    `implicit` (sign of `relative_margins`), `accuracy` (candidate right and current wrong is a
    win, the reverse a loss), and the implicit-reward accuracy / mean margin reported beside."""
    margins = relative_margins(candidate, current)  # [n]
    diff = per_token_correct(candidate) - per_token_correct(current)  # [n] in {-1, -.5, 0, .5, 1}
    out: dict[str, Any] = {
        "implicit": Paired.from_differences(margins.tolist(), TIE_TOL),
        "accuracy": Paired.from_differences(diff.tolist()),
        "margins": margins.tolist(),
    }
    if margins.numel():
        out["implicit_reward_accuracy"] = float((margins > TIE_TOL).double().mean())
        out["implicit_reward_margin"] = float(beta * margins.mean())
    return out


def indexed_pair_outcomes(candidate: Scores, current: Scores,
                          pairs: list[tuple[int, int]], *, beta: float) -> dict[str, Any]:
    """`paired_pair_outcomes` for (desirable, undesirable) index pairs into example scores
    (`data.example_pairs`: same-prompt pairs and examples matched across prompts)."""
    if not pairs:
        return {}
    good = torch.tensor([g for g, _ in pairs])
    bad = torch.tensor([b for _, b in pairs])

    def as_pairs(s: Scores) -> Scores:
        idx = torch.cat([good, bad])
        return Scores(s.logps[idx], s.tokens[idx])
    return paired_pair_outcomes(as_pairs(candidate), as_pairs(current), beta=beta)


def sft_metrics(scores: Scores) -> dict[str, float]:
    """Supervised examples: negative log-likelihood per answer token of the policy (and of its
    reference, when scored with one)."""
    tokens = float(scores.tokens.sum())
    out: dict[str, float] = {"examples": int(scores.logps.numel())}
    if tokens:
        out["nll_per_token"] = float(-scores.logps.sum() / tokens)
        if scores.ref_logps is not None:
            out["ref_nll_per_token"] = float(-scores.ref_logps.sum() / tokens)
            out.update(kl_metrics(scores))
    return out
