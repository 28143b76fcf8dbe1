"""Train on what users saw: a cut answer (max_tokens, Stop, a stop string) goes through the real
training path (TRL's DPO / KTO / SFT / reward-model tokenization, then align/train/cut_answers.py)
and the scoring paths without the chat template's end-of-turn tokens; a finished answer keeps
them."""
from __future__ import annotations

import datetime as dt

import pytest
from align_helpers import tiny_policy

from prefloop.align import evaluate as ev
from prefloop.align.train import cut_answers
from prefloop.align.train import preference as P
from prefloop.align.train.common import load_tokenizer
from prefloop.server.feedback.rows import PreferencePair, RatedAnswer, SftExample

T = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
Q = [{"role": "user", "content": "Tell me a story."}]
CUT, WHOLE = "Once upon a time there", "The end."


def said(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def trained_dataset(tiny, method: str, rows: list, monkeypatch) -> list[dict]:
    """The training set exactly as the trainer would iterate it (train() stops at trainer.train)."""
    import trl
    seen = {}

    def capture(self, *args, **kwargs):
        seen["rows"] = list(self.train_dataset)
        raise KeyboardInterrupt

    trainer = {"dpo": trl.DPOTrainer, "kto": trl.KTOTrainer, "sft": trl.SFTTrainer}[method]
    monkeypatch.setattr(trainer, "train", capture)
    with pytest.raises(KeyboardInterrupt):
        P.train(tiny, [r.to_trl() for r in rows],
                P.TrainConfig(method=method, batch_size=2, max_steps=1, bf16=False))
    return seen["rows"]


def test_the_end_of_turn_tokens_are_the_templates(tok):
    assert tok.convert_ids_to_tokens(cut_answers.end_of_turn_ids(tok)) == ["<|im_end|>", "Ċ"]


def last_text_token(tok, text: str) -> int:
    return tok.encode(text, add_special_tokens=False)[-1]


def test_dpo_trains_a_cut_answer_without_its_end_of_turn(tiny, tok, monkeypatch):
    pair = PreferencePair(Q, said(CUT), said(WHOLE), "f", T, chosen_finish_reason="length",
                          rejected_finish_reason="stop")
    (row, _) = trained_dataset(tiny, "dpo", [pair, pair], monkeypatch)
    assert row["chosen_ids"][-1] == last_text_token(tok, CUT)
    assert tok.convert_ids_to_tokens(row["rejected_ids"][-2:]) == ["<|im_end|>", "Ċ"]
    assert "chosen_cut" not in row  # the flags do not reach TRL's collator


def test_kto_trains_a_cut_answer_without_its_end_of_turn(tiny, tok, monkeypatch):
    rows = [RatedAnswer(Q, said(CUT), False, "f", T, finish_reason="abort"),
            RatedAnswer(Q, said(WHOLE), True, "g", T, finish_reason="stop")]
    cut, whole = trained_dataset(tiny, "kto", rows, monkeypatch)
    assert cut["completion_ids"][-1] == last_text_token(tok, CUT)
    assert tok.convert_ids_to_tokens(whole["completion_ids"][-2:]) == ["<|im_end|>", "Ċ"]


def test_sft_last_label_of_a_cut_answer_is_its_last_word(tiny, tok, monkeypatch):
    rows = [SftExample(Q, said(CUT), T, "f", "chosen", "stop_string"),
            SftExample(Q, said(WHOLE), T, "g", "chosen", "stop")]
    cut, whole = trained_dataset(tiny, "sft", rows, monkeypatch)
    cut_labels = [t for t in cut["labels"] if t != -100] if "labels" in cut else cut["input_ids"]
    assert cut_labels[-1] == last_text_token(tok, CUT)
    assert len(cut["input_ids"]) == len(cut.get("labels", cut["input_ids"]))
    assert tok.convert_ids_to_tokens(whole["input_ids"][-2:]) == ["<|im_end|>", "Ċ"]


def test_scoring_reads_a_cut_answer_as_trained(tok):
    whole = ev.encode(tok, Q, said(CUT), 1024)
    cut = ev.encode(tok, Q, said(CUT), 1024, cut=True)
    assert cut.prompt_ids == whole.prompt_ids
    assert cut.completion_ids == whole.completion_ids[:-2]
    assert cut.completion_ids[-1] == last_text_token(tok, CUT)
    pair = PreferencePair(Q, said(CUT), said(WHOLE), "f", T, chosen_finish_reason="length")
    chosen, rejected = ev.encode_pairs(tok, [pair], 1024)
    assert chosen == cut and rejected == ev.encode(tok, Q, said(WHOLE), 1024)


def test_a_truncated_sequence_loses_nothing_more():
    assert cut_answers.strip_tail([5, 6, 2, 198], [2, 198]) == 2
    assert cut_answers.strip_tail([5, 6, 7], [2, 198]) == 0  # already cut by max_length
    assert cut_answers.strip_tail([198], [2, 198]) == 0


def test_reward_model_trains_and_scores_a_cut_answer_without_its_end_of_turn(tiny, tok, monkeypatch):
    """The reward model reads its score at the last token: for a cut answer that must be the
    answer's last word, in training (RewardTrainer's tokenization) and in scoring alike."""
    import trl

    from prefloop.align.train import reward as R
    seen = {}

    def capture(self, *args, **kwargs):
        seen["rows"] = list(self.train_dataset)
        raise KeyboardInterrupt

    monkeypatch.setattr(trl.RewardTrainer, "train", capture)
    pair = PreferencePair(Q, said(CUT), said(WHOLE), "f", T, chosen_finish_reason="length",
                          rejected_finish_reason="stop")
    with pytest.raises(KeyboardInterrupt):
        R.train_reward_model(tiny, [pair, pair], R.RewardTrainConfig(batch_size=2, max_steps=1,
                                                                     bf16=False))
    row = seen["rows"][0]
    assert row["chosen_ids"][-1] == last_text_token(tok, CUT)
    assert tok.convert_ids_to_tokens(row["rejected_ids"][-2:]) == ["<|im_end|>", "Ċ"]
    assert "chosen_cut" not in row
    scored = R.encode_conversation(tok, Q, said(CUT), 1024, cut=True)
    assert scored == list(row["chosen_ids"])  # scoring reads the sequence training saw
    assert R.encode_conversation(tok, Q, said(WHOLE), 1024) == list(row["rejected_ids"])
