"""align without a model: the time split, the log window (since / watermark / newest N), KTO
pairs, the losses in closed form, the eval gate, and the schedule's argument plumbing."""
from __future__ import annotations

import argparse
import datetime as dt
import math
from types import SimpleNamespace

import pytest
import torch
from align_helpers import banana_pairs, write_pairs

from prefloop.align import data, gate, losses
from prefloop.align.jobs import schedule
from prefloop.server.errors import InvalidArgument

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rows_at(*seconds: float) -> list[SimpleNamespace]:
    return [SimpleNamespace(created_at=T0 + dt.timedelta(seconds=s), feedback_id=f"fb-{i}")
            for i, s in enumerate(seconds)]


def test_time_split_holds_out_the_newest_rows():
    split = data.time_split(rows_at(5, 1, 4, 2, 3, 6, 7, 8, 9, 10), heldout_fraction=0.2)
    assert [r.created_at.second for r in split.train] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r.created_at.second for r in split.heldout] == [9, 10]
    assert max(r.created_at for r in split.train) < split.cutoff
    assert all(r.created_at >= split.cutoff for r in split.heldout)
    assert split.describe()["rows"] == {"train": 8, "heldout": 2}


def test_time_split_keeps_ties_on_one_side():
    split = data.time_split(rows_at(1, 2, 3, 3, 3), heldout_fraction=0.2)  # boundary tie at 3
    assert len(split.train) == 2 and len(split.heldout) == 3
    split = data.time_split(rows_at(1, 1, 1, 1, 2), heldout_fraction=0.5)  # ties reach back
    assert len(split.train) == 4 and len(split.heldout) == 1
    split = data.time_split(rows_at(1, 1, 1), heldout_fraction=0.5)  # one timestamp: no held-out
    assert len(split.train) == 3 and split.heldout == []


def test_time_split_edge_cases():
    assert data.time_split(rows_at(1), 0.2).heldout == []
    assert len(data.time_split(rows_at(1, 2), 0.2).heldout) == 1  # at least one held out
    assert len(data.time_split(rows_at(*range(10)), 0.99).train) == 1  # at least one trained on
    assert data.time_split(rows_at(1, 2, 3), 0.0).heldout == []
    with pytest.raises(InvalidArgument):
        data.time_split(rows_at(1, 2), 1.0)


def test_load_pairs_window_from_a_real_log(tmp_path):
    write_pairs(tmp_path, banana_pairs(10))
    pairs = data.load_pairs(tmp_path)
    assert len(pairs) == 10
    assert pairs[0].chosen == [{"role": "assistant", "content": banana_pairs(10)[0]["chosen"]}]
    times = [p.created_at for p in pairs]
    assert times == sorted(times) and len(set(times)) == 10
    assert [p.created_at for p in data.load_pairs(tmp_path, after=times[6])] == times[7:]
    assert [p.created_at for p in data.load_pairs(tmp_path, since=times[3])] == times[3:]
    assert [p.created_at for p in data.load_pairs(tmp_path, max_pairs=3)] == times[7:]
    assert data.load_pairs(tmp_path, since="2999-01-01") == []
    examples = data.load_examples(tmp_path)  # each preference: one good, one bad answer
    assert len(examples) == 20 and sum(e.label for e in examples) == 10
    kto_pairs, same_prompt = data.example_pairs(examples)
    assert len(kto_pairs) == 10 and same_prompt == 10
    assert all(examples[g].text.startswith("banana") and examples[g].label and not examples[b].label
               for g, b in kto_pairs)


def test_parse_time():
    assert data.parse_time("2026-01-01") == T0
    assert data.parse_time("2026-01-01T00:00:01Z") == T0 + dt.timedelta(seconds=1)
    assert data.iso(T0) == "2026-01-01T00:00:00.000000Z"
    with pytest.raises(InvalidArgument):
        data.parse_time("last tuesday")


def test_losses_in_closed_form_at_initialization():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    zero = dict(policy_chosen_logps=logps, policy_rejected_logps=logps - 2,
                ref_chosen_logps=logps, ref_rejected_logps=logps - 2, beta=0.1)
    tokens = torch.tensor([3.0, 4.0, 5.0])
    out = {t: losses.preference_loss(**zero, loss_type=t, label_smoothing=0.1,
                                     chosen_tokens=tokens, rejected_tokens=tokens)[0]
           for t in losses.LOSSES}
    assert torch.allclose(out["sigmoid"], torch.full((3,), math.log(2)))
    assert torch.allclose(out["robust"], torch.full((3,), math.log(2)))
    assert torch.allclose(out["hinge"], torch.ones(3))
    assert torch.allclose(out["ipo"], torch.full((3,), (1 / 0.2) ** 2))
    # a margin of +10 nats: sigmoid loss = log(1 + e^{-1}), rewards are beta * log-ratios
    l, cr, rr = losses.preference_loss(logps + 4, logps - 6, logps, logps, beta=0.1)
    assert torch.allclose(l, torch.full((3,), math.log1p(math.exp(-1.0))))
    m = losses.reward_metrics(l, cr, rr)
    assert m["reward_accuracy"] == 1.0 and m["reward_margin"] == pytest.approx(1.0)
    assert m["chosen_reward"] == pytest.approx(0.4)


def test_preference_accuracy_and_token_kl():
    assert losses.preference_accuracy(torch.tensor([-1.0, -5.0, -2.0, -3.0]),
                                      torch.tensor([-2.0, -4.0, -2.0, -9.0])) == 0.625
    logits = torch.randn(2, 3, 7)
    assert torch.allclose(losses.token_kl(logits, logits), torch.zeros(2, 3), atol=1e-6)
    p, q = torch.tensor([[[math.log(0.9), math.log(0.1)]]]), torch.tensor([[[0.0, 0.0]]])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert losses.token_kl(p, q).item() == pytest.approx(expected, rel=1e-5)


def test_gate_decisions_always_give_reasons():
    """One reason per check (count, comparison, KL) plus the reported accuracies; the paired
    statistics themselves are tested in closed form in test_align_gate.py."""
    cfg = gate.GateConfig(max_kl=0.1, min_heldout=10)
    kw = dict(candidate_accuracy=0.8, current_accuracy=0.6, current_version="v0001",
              heldout_pairs=10, config=cfg)
    ok = gate.decide(implicit=gate.Paired(10, 0), accuracy=gate.Paired(2, 0, 8),
                     kl_per_token=0.05, **kw)
    assert ok.passed and len(ok.reasons) == 4
    assert "10 wins, 0 losses, 0 ties of 10 pairs" in ok.reasons[1]
    same = gate.decide(implicit=gate.Paired(5, 5), accuracy=None, kl_per_token=0.05, **kw)
    assert not same.passed and "<= 0.500" in same.reasons[1]
    drift = gate.decide(implicit=gate.Paired(10, 0), accuracy=None, kl_per_token=0.5, **kw)
    assert not drift.passed and "> bound 0.1" in drift.reasons[2]
    empty = gate.decide(implicit=None, accuracy=None, candidate_accuracy=float("nan"),
                        current_accuracy=0.5, current_version="v0000", kl_per_token=None,
                        heldout_pairs=0, config=cfg)
    assert not empty.passed and len(empty.reasons) == 4
    assert empty.reasons[0].startswith("needs >= 10 held-out pairs, have 0")
    with pytest.raises(InvalidArgument):
        gate.GateConfig(max_kl=0)


def test_schedule_durations_and_run_flags():
    assert schedule.parse_duration("6h") == 21600
    assert schedule.parse_duration("1h30m") == 5400
    assert schedule.parse_duration("45") == 45
    for bad in ("soon", "6x", "0s", "h"):
        with pytest.raises(InvalidArgument):
            schedule.parse_duration(bad)
    from prefloop.cli import align as align_cmd
    parser = argparse.ArgumentParser()
    align_cmd.add_arguments(parser)
    args = parser.parse_args(["schedule", "kto", "--every", "6h", "--data-dir", "/d",
                              "--auto-promote", "--beta", "0.2", "--no-bf16", "--max-runs", "2"])
    argv = schedule.run_argv(args, lambda p: align_cmd.add_run_arguments(p, "kto"))
    assert argv == ["--data-dir", "/d", "--beta", "0.2", "--no-bf16", "--auto-promote"]
    again = parser.parse_args(["run", "kto", *argv])
    assert (again.method, again.auto_promote, again.beta, again.bf16) == ("kto", True, 0.2, False)


def test_schedule_passes_the_season_drift_degeneration_and_ab_flags_on():
    from prefloop.cli import align as align_cmd
    parser = argparse.ArgumentParser()
    align_cmd.add_arguments(parser)
    args = parser.parse_args(["schedule", "dpo", "--every", "6h", "--data-dir", "/d",
                              "--season-spending", "none", "--look-growth", "2",
                              "--degeneration-prompts", "4", "--max-root-kl", "2",
                              "--auto-promote", "--promote-via", "auto", "--ab-traffic", "0.3",
                              "--ab-futility-win", "0.6"])
    argv = schedule.run_argv(args, lambda p: align_cmd.add_run_arguments(p, "dpo"))
    again = parser.parse_args(["run", "dpo", *argv])
    gate_cfg = align_cmd._gate_config(again)
    assert (gate_cfg.spending, gate_cfg.look_growth, gate_cfg.degeneration_prompts,
            gate_cfg.max_root_kl, gate_cfg.ab_traffic, gate_cfg.ab_futility_win) == (
        "none", 2.0, 4, 2.0, 0.3, 0.6)
    assert again.promote_via == "auto"
    defaults = align_cmd._gate_config(parser.parse_args(["run", "dpo"]))
    assert (defaults.ab_traffic, defaults.ab_futility_win) == (0.1, 0.7)
    assert align_cmd._gate_config(parser.parse_args(
        ["run", "dpo", "--ab-futility-win", "0"])).ab_futility_win == 0.0  # no futility stop
    with pytest.raises(InvalidArgument, match=r"futility win rate must be in \(0.5, 1\), or 0"):
        align_cmd._gate_config(parser.parse_args(["run", "dpo", "--ab-futility-win", "0.5"]))
    with pytest.raises(InvalidArgument, match=r"A/B traffic .* must be in \(0, 1\), got 1.5"):
        align_cmd._gate_config(parser.parse_args(["run", "dpo", "--ab-traffic", "1.5"]))


def test_no_looping_answer_is_trained_as_a_good_one():
    from prefloop.server.feedback.rows import PreferencePair, RatedAnswer, SftExample
    loop = [{"role": "assistant", "content": "They are good. They are good. They are good."}]
    fine = [{"role": "assistant", "content": "Bees make honey in their hives."}]
    q = [{"role": "user", "content": "Tell me about bees."}]
    rows = [PreferencePair(q, loop, fine, "p1", T0), PreferencePair(q, fine, loop, "p2", T0),
            RatedAnswer(q, loop, True, "r1", T0), RatedAnswer(q, loop, False, "r2", T0),
            RatedAnswer(q, fine, True, "r3", T0), SftExample(q, loop, T0, "s1", "chosen"),
            SftExample(q, fine, T0, "s2", "chosen")]
    kept, dropped = data.without_looping_desirable(rows)
    # a chosen / liked / SFT loop goes; a rejected or disliked one teaches the right thing
    assert dropped == 3 and [r.feedback_id for r in kept] == ["p2", "r2", "r3", "s2"]
