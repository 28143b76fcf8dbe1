"""The likelihood of liked answers beside KTO (align/train/liked_nll.py, through
align/train/kto_terms.py): the term in closed form, through the real KTO training path that it
is the base model's mean NLL of the batch's liked answers (scored independently) and that it
makes a liked answer likelier than KTO alone, and the flag and config defaults."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from align_helpers import tiny_policy, train_config_of

from prefloop.align import evaluate as ev
from prefloop.align.train.common import load_causal_lm, load_tokenizer
from prefloop.align.train.liked_nll import liked_nll_term
from prefloop.align.train.preference import TrainConfig, train
from prefloop.server.errors import InvalidArgument

LIKED = "A small thing that people like, and it is green."
DISLIKED = "No. Never. Not at all, go away."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


def test_liked_nll_term_is_the_mean_token_nll_of_liked_answers_and_zero_for_disliked():
    log_probs = torch.tensor([[-9.0, -1.0, -2.0, -3.0], [-9.0, -1.0, -1.0, -1.0],
                              [-5.0, -5.0, -4.0, -9.0]])
    inputs = {"completion_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]),
              "label": [True, False, True]}
    # log_probs[:, j] is token j + 1's: row 0's completion is tokens 2-4 -> columns 1-3
    assert liked_nll_term(log_probs, inputs).tolist() == pytest.approx([2.0, 0.0, (5 + 5 + 4) / 3])


def rows(n: int = 4) -> list[dict]:
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Tell me about item {i}."}]
        out.append({"prompt": prompt, "label": True, "completion": [{"role": "assistant", "content": LIKED}]})
        out.append({"prompt": prompt, "label": False,
                    "completion": [{"role": "assistant", "content": DISLIKED}]})
    return out


def liked_logprob(model, tokenizer, item: int = 0) -> tuple[float, int]:
    """Independent scoring of LIKED as the answer to item `item`'s prompt: its summed log-prob
    and its token count (the template's end-of-turn tokens included, as training sees them)."""
    enc = ev.encode(tokenizer, [{"role": "user", "content": f"Tell me about item {item}."}],
                    [{"role": "assistant", "content": LIKED}], max_length=256)
    ids = torch.tensor([enc.prompt_ids + enc.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[0, :, 0]
    return float(logp[-len(enc.completion_ids):].sum()), len(enc.completion_ids)


def cfg(coef: float, steps: int = 8, batch: int = 4) -> TrainConfig:
    return TrainConfig(method="kto", lr=2e-2, batch_size=batch, max_steps=steps, lora=True,
                       lora_r=4, bf16=False, stop_kl=10.0, liked_nll=coef)


def test_first_step_term_is_the_base_models_liked_nll_and_the_loss_adds_coef_times_it(tiny):
    tokenizer = load_tokenizer(tiny)
    # one step over all 8 rows at once: the batch is the whole set whatever the shuffle
    plain = train(tiny, rows(), cfg(0.0, steps=1, batch=8))
    nll = train(tiny, rows(), cfg(0.5, steps=1, batch=8))
    assert not any("liked_nll" in h for h in plain.log_history)
    terms = [h["liked_nll"] for h in nll.log_history if "liked_nll" in h]
    base = load_causal_lm(tiny)
    scored = [liked_logprob(base, tokenizer, i) for i in range(4)]
    expected = sum(-s / n for s, n in scored) / 8  # 4 liked of 8 answers; disliked count 0
    assert terms[0] == pytest.approx(expected, rel=1e-3)
    first = [h["loss"] for h in plain.log_history if "loss" in h][0]
    first_nll = [h["loss"] for h in nll.log_history if "loss" in h][0]
    assert first_nll - first == pytest.approx(0.5 * terms[0], rel=1e-3)


def test_kto_with_liked_nll_makes_a_liked_answer_likelier_than_kto_alone(tiny):
    tokenizer = load_tokenizer(tiny)
    plain = train(tiny, rows(), cfg(0.0))
    nll = train(tiny, rows(), cfg(5.0))
    terms = [h["liked_nll"] for h in nll.log_history if "liked_nll" in h]
    assert len(terms) >= 2 and terms[-1] < terms[0]
    assert liked_logprob(nll.model, tokenizer)[0] > liked_logprob(plain.model, tokenizer)[0] + 0.5


def test_liked_nll_is_off_by_default_and_kto_only():
    assert train_config_of("run").liked_nll == 0.0 and TrainConfig(method="kto").liked_nll == 0.0
    assert train_config_of("run", "--liked-nll", "1").liked_nll == 1.0
    assert train_config_of("kto", "--liked-nll", "0.5").liked_nll == 0.5
    assert train_config_of("dpo").liked_nll == 0.0
    assert "liked_nll" in TrainConfig(method="kto").to_dict()
    assert "liked_nll" not in TrainConfig(method="dpo").to_dict()
    with pytest.raises(InvalidArgument, match="kto runs only"):
        TrainConfig(method="dpo", liked_nll=0.5)
    with pytest.raises(InvalidArgument, match=">= 0"):
        TrainConfig(method="kto", liked_nll=-1.0)


def test_both_kto_terms_together_are_logged_and_added_each_with_its_weight(tiny):
    looping = [dict(r, completion=[{"role": "assistant", "content": "Go away now. " * 8}])
               if not r["label"] else r for r in rows()]
    plain = train(tiny, looping, cfg(0.0, steps=1, batch=8))
    # the tiny model's repeats have p ~ 1/49152: a large weight makes them count
    both = train(tiny, looping, dataclasses.replace(cfg(0.5, steps=1, batch=8), unlikelihood=1e4))
    nll = [h["liked_nll"] for h in both.log_history if "liked_nll" in h][0]
    ul = [h["unlikelihood"] for h in both.log_history if "unlikelihood" in h][0]
    assert nll > 0 and ul > 0
    first = [h["loss"] for h in plain.log_history if "loss" in h][0]
    first_both = [h["loss"] for h in both.log_history if "loss" in h][0]
    assert first_both - first == pytest.approx(0.5 * nll + 1e4 * ul, rel=1e-3)
    assert 1e4 * ul > 0.01 * (0.5 * nll)  # the unlikelihood part is not lost in the tolerance
