"""The KL stop of DPO / KTO training (align/train/kl_stop.py) and KTO's balancing weights: a
run stops at the first check whose KL reaches the target, that KL is the one an independent
scoring of the returned weights against the base measures, and a target of 0 trains every step."""
from __future__ import annotations

import datetime as dt
import types

import pytest
import torch
from align_helpers import banana_pairs, tiny_policy, train_config_of

from prefloop.align import evaluate as ev
from prefloop.align.train.common import load_causal_lm, load_tokenizer
from prefloop.align.train.kl_stop import KLStop, probe_items
from prefloop.align.train.preference import TrainConfig, kto_weights, train
from prefloop.server.errors import InvalidArgument
from prefloop.server.feedback.rows import PreferencePair

T = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


def dpo_rows(n: int) -> list[dict]:
    return [PreferencePair(p["prompt"], [{"role": "assistant", "content": p["chosen"]}],
                           [{"role": "assistant", "content": p["rejected"]}], f"f{i}", T).to_trl()
            for i, p in enumerate(banana_pairs(n, seed=3))]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_training_stops_at_the_first_check_over_the_target_with_the_kl_the_weights_have(tiny, lora):
    rows = dpo_rows(16)
    cfg = TrainConfig(method="dpo", lr=5e-2 if lora else 1e-2, batch_size=4, max_steps=12,
                      lora=lora, lora_r=4, stop_kl=1e-3, bf16=False)
    trained = train(tiny, rows, cfg)
    record = trained.kl_stop
    assert trained.steps == 4 and record.stopped_at == 4, record
    (step, kl, _), = record.checks
    assert step == 4 and kl >= cfg.stop_kl
    # the callback's reference (the adapter switched off / the frozen copy) is the base: scoring
    # the returned weights against a fresh load of the base gives the same KL on the same answers
    items = probe_items(trained.tokenizer, rows, cfg.max_length)
    scores = ev.score_encoded(trained.model.float().eval(), trained.tokenizer, items,
                              reference=load_causal_lm(tiny), batch_size=len(items))
    assert float(scores.kl_sum.sum() / scores.tokens.sum()) == pytest.approx(kl, rel=1e-3)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_later_checks_measure_the_kl_the_weights_have_with_the_reference_run_once(tiny, lora,
                                                                                  monkeypatch):
    from prefloop.align.train import kl_stop
    runs = []

    class Counting:  # the reference, counting the passes of its decoder
        def __init__(self, reference):
            self.reference = reference

        def get_decoder(self):
            decoder = self.reference.get_decoder()

            def run(**kwargs):
                runs.append(1)
                return decoder(**kwargs)
            return run

        def get_output_embeddings(self):
            return self.reference.get_output_embeddings()
    real_init = kl_stop._OnceOnProbe.__init__
    monkeypatch.setattr(kl_stop._OnceOnProbe, "__init__",
                        lambda self, reference: real_init(self, Counting(reference)))
    rows = dpo_rows(16)
    cfg = TrainConfig(method="dpo", lr=5e-2 if lora else 1e-2, batch_size=4, max_steps=8,
                      lora=lora, lora_r=4, stop_kl=10.0, max_lr_scale=1.0, bf16=False)
    trained = train(tiny, rows, cfg)
    assert [s for s, _, _ in trained.kl_stop.checks] == [4, 8] and len(runs) == 1
    (_, first, _), (_, last, _) = trained.kl_stop.checks
    items = probe_items(trained.tokenizer, rows, cfg.max_length)
    scores = ev.score_encoded(trained.model.float().eval(), trained.tokenizer, items,
                              reference=load_causal_lm(tiny), batch_size=len(items))
    assert last != first
    assert float(scores.kl_sum.sum() / scores.tokens.sum()) == pytest.approx(last, rel=1e-3)


def test_the_probe_holds_the_newest_answers_within_its_answer_token_budget(tiny):
    tok, rows = load_tokenizer(tiny), dpo_rows(16)
    eight = probe_items(tok, rows, 1024, max_tokens=10**6)
    assert [i.completion_ids for i in eight] == [
        ev.encode(tok, r["prompt"], r["chosen"], 1024, False).completion_ids for r in rows[-8:]]
    lengths = [len(i.completion_ids) for i in eight]
    # the newest answers, oldest first, while their answer tokens fit the budget
    assert probe_items(tok, rows, 1024, max_tokens=sum(lengths[-3:])) == eight[-3:]
    assert probe_items(tok, rows, 1024, max_tokens=sum(lengths[-3:]) - 1) == eight[-2:]
    # the newest answer always, whatever its length; never more than `count`
    assert probe_items(tok, rows, 1024, max_tokens=0) == eight[-1:]
    assert probe_items(tok, rows, 1024, count=2, max_tokens=10**6) == eight[-2:]


def test_a_target_of_zero_trains_every_step(tiny):
    cfg = TrainConfig(method="dpo", lr=1e-2, batch_size=4, max_steps=8, lora=False, stop_kl=0.0,
                      bf16=False)
    trained = train(tiny, dpo_rows(16), cfg)
    assert trained.steps == 8 and trained.kl_stop is None


def test_kto_weights_balance_the_labels_unless_given():
    rows = [{"label": True}] * 5 + [{"label": False}] * 20
    assert kto_weights(rows, None, None) == (4.0, 1.0)
    assert kto_weights([{"label": True}] * 30 + [{"label": False}] * 10, None, None) == (1.0, 3.0)
    assert kto_weights([{"label": True}] + [{"label": False}] * 50, None, None) == (10.0, 1.0)
    assert kto_weights(rows, 2.0, None) == (2.0, 1.0)  # one given: the other stays 1
    assert kto_weights([{"label": False}] * 4, None, None) == (1.0, 1.0)  # one label only
    with pytest.raises(InvalidArgument, match="stop KL"):
        TrainConfig(method="kto", stop_kl=-1.0)
    with pytest.raises(InvalidArgument, match="desirable weight"):
        TrainConfig(method="kto", desirable_weight=0.0)


def test_the_stop_defaults_to_half_the_gates_kl_bound_and_sft_has_none():
    def stop(*argv):
        return train_config_of(*argv).stop_kl
    assert stop("run") == 0.25 and stop("run", "--max-kl", "0.4") == 0.2
    assert stop("dpo", "--stop-kl", "0") == 0.0 and stop("kto", "--stop-kl", "0.1") == 0.1
    assert stop("sft") == 0.0


def test_pace_gain_reaches_the_aim_if_kl_grows_with_the_square_of_the_rate_spent():
    from prefloop.align.train.kl_stop import PACE_AIM, PACE_GAIN, pace_gain
    # spent 1, KL 0.002 of target 0.25: the end wants sqrt(0.2 / 0.002) = 10x the distance, so
    # 9 more units of rate; 6 remain at the present rate: x1.5
    assert pace_gain(0.002, 0.25, spent=1.0, remaining=6.0) == pytest.approx(
        (((PACE_AIM * 0.25) / 0.002) ** 0.5 - 1) / 6.0)
    assert pace_gain(0.0002, 0.25, 1.0, 6.0) == PACE_GAIN  # far under: at most PACE_GAIN a check
    assert pace_gain(0.0, 0.25, 1.0, 6.0) == PACE_GAIN
    assert pace_gain(0.15, 0.25, 1.0, 6.0) == 1.0  # on course already: never down
    assert pace_gain(0.01, 0.25, 1.0, 0.0) == 1.0  # nothing left to scale
    # past the aim: down by what the projection asks, to the floor (the set schedule) at most
    assert pace_gain(0.15, 0.25, 1.0, 6.0, floor=0.25) == pytest.approx(
        max(0.25, ((PACE_AIM * 0.25 / 0.15) ** 0.5 - 1) / 6.0))
    assert pace_gain(0.5, 0.25, 1.0, 6.0, floor=0.25) == 0.25


def test_pacing_takes_back_its_raise_when_the_kl_heads_past_the_aim_but_never_goes_under_the_set_rate():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    stop = KLStop(None, [], target=0.25, max_scale=4.0, pace_kl=0.1)

    def check(step, kl):
        stop.spent += 4 * optimizer.param_groups[0]["lr"]  # the 4 steps since the last check
        stop._pace(kl, types.SimpleNamespace(global_step=step, max_steps=40), optimizer, scheduler)
        return stop.scale, optimizer.param_groups[0]["lr"]
    assert check(4, 1e-5) == (2.0, pytest.approx(2e-3))  # far under: up, x2 a check
    assert check(8, 1e-5) == (4.0, pytest.approx(4e-3))  # up to max_scale in all
    # 0.01 after 0.028 spent, 28 steps of 4e-3 to go: (0.14 / 0.028)^2 x 0.01 = 0.25, past 0.08
    scale, lr = check(12, 0.01)
    assert scale == pytest.approx(4.0 * 0.028 * ((0.08 / 0.01) ** 0.5 - 1) / 0.112)  # what lands on it
    assert 1.0 < scale < 4.0 and lr == pytest.approx(1e-3 * scale)
    assert check(16, 0.2) == (1.0, pytest.approx(1e-3))  # far past: the set rate, exactly
    assert scheduler.base_lrs == pytest.approx([1e-3])  # and every later step's rate with it


def test_a_min_lr_scale_under_one_lets_pacing_slow_the_set_rate_of_a_run_heading_past_its_aim():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    stop = KLStop(None, [], target=0.25, max_scale=1.0, pace_kl=0.1, min_scale=0.25)

    def check(step, kl):
        stop.spent += 4 * optimizer.param_groups[0]["lr"]
        stop._pace(kl, types.SimpleNamespace(global_step=step, max_steps=40), optimizer, scheduler)
        return stop.scale, optimizer.param_groups[0]["lr"]
    assert check(4, 1e-5) == (1.0, pytest.approx(1e-3))  # far under, but max_scale 1: no raise
    # 0.02 after 0.008 spent, 32 steps of 1e-3 to go: on course for (0.04 / 0.008)^2 x 0.02 =
    # 0.5; slowed to what lands on 0.08: 0.008 x (sqrt(0.08 / 0.02) - 1) / 0.032 = 0.25
    assert check(8, 0.02) == (pytest.approx(0.25), pytest.approx(2.5e-4))
    assert scheduler.base_lrs == pytest.approx([2.5e-4])
    assert check(12, 0.5) == (0.25, pytest.approx(2.5e-4))  # far past: min_scale, exactly
    assert stop.record.to_record()["min_lr_scale"] == 0.25
    # the default (1) never goes under the set rate, the behaviour before the flag
    default = KLStop(None, [], target=0.25, max_scale=1.0, pace_kl=0.1)
    default.spent = 0.008
    default._pace(0.5, types.SimpleNamespace(global_step=8, max_steps=40), optimizer, scheduler)
    assert default.scale == 1.0 and default.record.min_scale == 1.0


def test_pacing_raises_the_rest_of_the_schedule_when_the_kl_is_far_under_the_target(tiny):
    rows = dpo_rows(32)

    def run(max_scale, pace_kl=0.1):
        cfg = TrainConfig(method="dpo", lr=1e-4, batch_size=4, max_steps=12, lora=True, lora_r=4,
                          stop_kl=10.0, max_lr_scale=max_scale, pace_kl=pace_kl, bf16=False)
        return train(tiny, rows, cfg)
    plain, paced, aimed_low = run(1.0), run(4.0), run(4.0, pace_kl=1e-9)
    # a run already on course for 0.8 x its pace KL is never paced up, whatever the stop's target
    assert [g for _, _, g in aimed_low.kl_stop.checks] == [1.0, 1.0, 1.0]
    assert plain.kl_stop.lr_scale == 1.0 and plain.steps == paced.steps == 12
    # x2 a check, 4 in all; the last check (step 12) has no steps left to scale
    assert [g for _, _, g in paced.kl_stop.checks] == [2.0, 4.0, 4.0]
    lrs = {name: [h["learning_rate"] for h in r.log_history if "learning_rate" in h]
           for name, r in (("plain", plain), ("paced", paced))}
    # steps 1-4 ran at the set schedule; steps 5-8 at 2x the plain run's rate, then 4x
    assert lrs["paced"][:4] == pytest.approx(lrs["plain"][:4])
    assert lrs["paced"][4:8] == pytest.approx([2 * x for x in lrs["plain"][4:8]])
    assert lrs["paced"][8:11] == pytest.approx([4 * x for x in lrs["plain"][8:11]])
    (_, kl_plain, _), (_, kl_paced, _) = plain.kl_stop.checks[-1], paced.kl_stop.checks[-1]
    assert kl_paced > 2 * kl_plain
    record = paced.kl_stop.to_record()
    assert record["max_lr_scale"] == 4.0 and record["lr_scale"] == 4.0 and record["pace_kl"] == 0.1


def test_pacing_aims_at_the_pace_kl_or_the_stop_kl_whichever_is_lower():
    def aim(target, pace_kl):
        return KLStop(None, [], target, max_scale=4.0, pace_kl=pace_kl).pace_target
    assert aim(0.25, 0.1) == 0.1 and aim(0.25, 0.5) == 0.25
    assert aim(0.25, None) == 0.25 and aim(0.25, 0.0) == 0.25  # 0: the stop KL, as before


def kto_rows(n: int) -> list[dict]:
    rows = []
    for p in banana_pairs(n, seed=5):
        rows.append({"prompt": p["prompt"], "completion": [
            {"role": "assistant", "content": p["chosen"]}], "label": True})
        rows.append({"prompt": p["prompt"], "completion": [
            {"role": "assistant", "content": p["rejected"]}], "label": False})
    return rows


def test_kto_takes_its_reference_point_from_the_probe_without_forward_passes_of_its_own(
        tiny, monkeypatch):
    import trl

    from prefloop.align.train import preference as P
    from prefloop.align.train.kto_reference import probe_reference_kto

    def no_kl_passes(self, model, batch):
        raise AssertionError("TRL's KL forward passes ran")
    monkeypatch.setattr(trl.KTOTrainer, "_compute_kl_logps", no_kl_passes)
    calls = []  # (lengths, returned, the probe's KL at the time)

    def recording(kl_stop):
        class Recording(probe_reference_kto(kl_stop)):
            def _compute_kl_logps(self, model, batch):
                out = super()._compute_kl_logps(model, batch)
                calls.append((batch["KL_completion_mask"].sum(-1).float(), out,
                               kl_stop.latest_kl))
                return out
        return Recording
    monkeypatch.setattr(P, "probe_reference_kto", recording)
    cfg = TrainConfig(method="kto", lr=5e-3, batch_size=4, max_steps=8, lora=True, lora_r=4,
                      stop_kl=10.0, max_lr_scale=1.0, bf16=False)
    trained = train(tiny, kto_rows(16), cfg)
    assert trained.steps == 8 and len(calls) == 16  # a policy and a reference call a step
    (_, kl_at_4, _), _ = trained.kl_stop.checks
    assert kl_at_4 > 0
    for i, (lengths, out, kl) in enumerate(calls):
        policy_call = i % 2 == 0
        assert kl == (0.0 if i < 8 else kl_at_4)  # steps 1-4 before the first check, 5-8 after
        assert out.tolist() == pytest.approx((lengths * kl).tolist() if policy_call
                                             else [0.0] * len(lengths))
    # TRL's logged z0 is the mean of the policy's minus the reference's values
    logged = [h["kl"] for h in trained.log_history if "kl" in h]
    assert logged[:4] == [0.0] * 4
    assert logged[4:] == pytest.approx([float(calls[2 * s][0].mean()) * kl_at_4
                                        for s in range(4, 8)], rel=1e-5)


def test_pacing_is_on_by_default_up_to_four_times_and_one_turns_it_off():
    def scale(*argv):
        return train_config_of(*argv).max_lr_scale
    assert TrainConfig().max_lr_scale == 4.0 and scale("run") == 4.0 and scale("run", "kto") == 4.0
    assert scale("run", "dpo") == 4.0 and scale("run", "--max-lr-scale", "1") == 1.0
    assert TrainConfig().pace_kl == 0.1 and train_config_of("run").pace_kl == 0.1
    assert train_config_of("run", "--pace-kl", "0").pace_kl == 0.0
    with pytest.raises(InvalidArgument, match="pace KL"):
        TrainConfig(pace_kl=-0.1)
    with pytest.raises(InvalidArgument, match="max lr scale"):
        TrainConfig(max_lr_scale=0.5)
    assert TrainConfig().min_lr_scale == 1.0 and train_config_of("run").min_lr_scale == 1.0
    assert train_config_of("run", "--min-lr-scale", "0.25").min_lr_scale == 0.25
    for bad in (0.0, 1.5):
        with pytest.raises(InvalidArgument, match="min lr scale"):
            TrainConfig(min_lr_scale=bad)
