"""Unlikelihood on the loops of disliked answers (align/train/unlikelihood.py): which tokens count
as repeats, the term in closed form, and through the real KTO training path that it lowers the
probability of a disliked loop, and is zero where only liked answers loop."""
from __future__ import annotations

import math

import pytest
import torch
from align_helpers import tiny_policy, train_config_of

from prefloop.align import evaluate as ev
from prefloop.align.train.common import load_causal_lm, load_tokenizer
from prefloop.align.train.preference import TrainConfig, train
from prefloop.align.train.unlikelihood import answer_unlikelihood, repeated_tokens
from prefloop.server.errors import InvalidArgument


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


def test_a_repeat_is_a_4_token_sequence_written_for_the_third_time_inside_the_completion():
    a, b, c, d, x = 11, 12, 13, 14, 99
    #        prompt | completion: a b c d ×4
    ids = torch.tensor([[a, b, c, d] + [a, b, c, d] * 4, [x] * 8 + [a, b, c, d] * 2 + [x] * 4])
    mask = torch.tensor([[0] * 4 + [1] * 16, [0] * 4 + [1] * 16])
    rep = repeated_tokens(ids, mask)
    # row 0: the prompt's a b c d does not count; in the completion each 4-gram ends first at
    # 7..10, again at 11..14, a third time at 15..18, and (a b c d) a fourth time at 19
    assert rep[0].nonzero().view(-1).tolist() == [15, 16, 17, 18, 19]
    # row 1: the completion x x x x a b c d a b c d x x x x writes every 4-gram at most twice
    assert not rep[1].any()
    # a second time: (a b c d) at 15, (x x x x) at 19
    assert repeated_tokens(ids, mask, before=1)[1].nonzero().view(-1).tolist() == [15, 19]


def test_answer_unlikelihood_is_the_mean_of_minus_log_one_minus_p_over_the_repeats():
    p = torch.tensor([[0.5, 0.9, 0.2, 0.99], [0.3, 0.3, 0.3, 0.3]])
    rep = torch.tensor([[False, True, False, True], [False, False, False, False]])
    got = answer_unlikelihood(p.log(), rep)
    assert got.tolist() == pytest.approx([(-math.log(0.1) - math.log(0.01)) / 2, 0.0], rel=1e-5)


LOOP = "Yes it is. " * 12


def rows(disliked_loop: bool, n: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Tell me about item {i}."}]
        plain = f"Item {i} is a small thing that people like."
        out.append({"prompt": prompt, "label": True, "completion": [
            {"role": "assistant", "content": plain if disliked_loop else LOOP}]})
        out.append({"prompt": prompt, "label": False, "completion": [
            {"role": "assistant", "content": LOOP if disliked_loop else plain}]})
    return out


def loop_scores(model, tokenizer, item: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent scoring of LOOP as the answer to item `item`'s prompt: the log-prob of each
    token after the first, and which of those tokens are repeats."""
    enc = ev.encode(tokenizer, [{"role": "user", "content": f"Tell me about item {item}."}],
                    [{"role": "assistant", "content": LOOP}], max_length=256)
    ids = torch.tensor([enc.prompt_ids + enc.completion_ids])
    mask = torch.tensor([[0] * len(enc.prompt_ids) + [1] * len(enc.completion_ids)])
    rep = repeated_tokens(ids, mask)[:, 1:]
    assert rep.sum() > 10
    with torch.no_grad():
        logits = model(ids).logits.float()
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0], rep


def loop_repeat_logprob(model, tokenizer) -> float:
    """Mean log-prob of the repeated tokens of LOOP as an answer."""
    logp, rep = loop_scores(model, tokenizer)
    return float(logp[rep].mean())


def cfg(coef: float) -> TrainConfig:
    return TrainConfig(method="kto", lr=2e-2, batch_size=4, max_steps=8, lora=True, lora_r=4,
                       bf16=False, stop_kl=10.0, unlikelihood=coef)


def test_kto_with_unlikelihood_lowers_a_disliked_loop_more_than_kto_alone(tiny):
    # the random tiny model gives each repeat p ~ 1/49152, so -log(1 - p) ~ p: a large weight
    # makes its gradient (coef x p on the repeat's logit) count
    coef = 1e4
    tokenizer = load_tokenizer(tiny)
    plain = train(tiny, rows(disliked_loop=True), cfg(0.0))
    ul = train(tiny, rows(disliked_loop=True), cfg(coef))
    assert not any("unlikelihood" in h for h in plain.log_history)
    terms = [h["unlikelihood"] for h in ul.log_history if "unlikelihood" in h]
    assert terms and all(t > 0 for t in terms)
    # the first step's loss is KTO's (the same weights, the same batch) plus coef x the term
    first = [h["loss"] for h in plain.log_history if "loss" in h][0]
    first_ul = [h["loss"] for h in ul.log_history if "loss" in h][0]
    assert first_ul - first == pytest.approx(coef * terms[0], rel=1e-3)
    # and that term is the one the base model gives the first batch (rows 0-3 in order: the
    # LoRA policy is still the base; liked answers count 0), scored independently
    base = load_causal_lm(tiny)
    expected = sum(float(answer_unlikelihood(*loop_scores(base, tokenizer, i))) for i in (0, 1)) / 4
    assert terms[0] == pytest.approx(expected, rel=1e-3)
    assert loop_repeat_logprob(ul.model, tokenizer) < loop_repeat_logprob(plain.model, tokenizer) - 0.01


def test_liked_loops_carry_no_unlikelihood(tiny):
    trained = train(tiny, rows(disliked_loop=False), cfg(1.0))
    terms = [h["unlikelihood"] for h in trained.log_history if "unlikelihood" in h]
    assert terms and all(t == 0.0 for t in terms)


def test_unlikelihood_is_off_by_default_and_kto_only():
    assert train_config_of("run").unlikelihood == 0.0 and TrainConfig(method="kto").unlikelihood == 0.0
    assert train_config_of("run", "--unlikelihood", "1").unlikelihood == 1.0
    assert train_config_of("kto", "--unlikelihood", "2").unlikelihood == 2.0
    assert train_config_of("dpo").unlikelihood == 0.0
    assert "unlikelihood" in TrainConfig(method="kto").to_dict()
    assert "unlikelihood" not in TrainConfig(method="dpo").to_dict()
    with pytest.raises(InvalidArgument, match="kto runs only"):
        TrainConfig(method="dpo", unlikelihood=0.5)
    with pytest.raises(InvalidArgument, match=">= 0"):
        TrainConfig(method="kto", unlikelihood=-1.0)
