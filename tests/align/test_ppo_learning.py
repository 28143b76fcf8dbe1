"""PPO end to end.

Fast (tiny random Llama with the default model's tokenizer):
- rollout log-probs equal the sampler's own (HF generate scores), with left-padded prompts, and
  equal the reference's at the start (KL exactly 0);
- a tiny policy whose output concentrates on 16 words learns, with a rule-based reward ("say
  yes"), to say the word more often on held-out prompts, KL to the reference bounded, every
  per-step metric logged, the plot written, and frozen layers untouched;
- `align ppo` through the registry: reward model kind check, gate, publish, promote; `align run
  --method ppo` style incremental job (watermark, skip).

The same flow on the default model (SmolLM2-135M, a TRL reward model on the model's own
answers, then PPO) is `benchmarks/ppo_default_model.py`: minutes of CPU, so not in the suite.
"""
from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
from align_helpers import tiny_policy, write_pairs

from prefloop.align import ppo_losses as L
from prefloop.align.train import ppo as P
from prefloop.align.train.common import load_causal_lm, load_tokenizer
from prefloop.server.jobs import job_history

WORDS = (" yes", " no", " red", " blue", " cat", " dog", " sun", " moon", " tree", " rock",
         " fish", " bird", " rain", " snow", " milk", " salt")
TARGET = " yes"


def focused_policy(path):
    """The tiny policy rewired so that its samples are sequences of 16 one-token words: every
    token embedding gets a large constant first coordinate (so the final hidden state always
    has one), the LM head rows of the 16 words put a large weight on it (logits ~ +15 against 0
    for the other 49k tokens), and their other coordinates give a context-dependent spread of a
    few nats among the words. A learnable, fast setting for PPO."""
    from safetensors.torch import load_file, save_file
    tiny_policy(path)
    tok = load_tokenizer(path)
    ids = []
    for w in WORDS:
        enc = tok(w, add_special_tokens=False)["input_ids"]
        assert len(enc) == 1, (w, enc)
        ids.append(enc[0])
    state = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(state["model.embed_tokens.weight"].shape, generator=g)
    embed[:, 0] = 4.0
    head = torch.zeros_like(state["lm_head.weight"])
    head[ids] = torch.randn(len(ids), head.shape[1], generator=g) * 0.5
    head[ids, 0] = 4.5
    state["model.embed_tokens.weight"] = embed
    state["lm_head.weight"] = head
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def say_yes(prompts, texts):
    """Rule-based reward: the share of answer words that are "yes"."""
    out = []
    for t in texts:
        words = t.split()
        out.append(sum(w == TARGET.strip() for w in words) / max(len(words), 1))
    return out


def prompts_for(n, offset=0):
    return [[{"role": "user", "content": f"Tell me about thing {offset + i}."}] for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads make small matmuls
    several times slower, and the results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def focused(tmp_path_factory):
    return focused_policy(tmp_path_factory.mktemp("focused") / "model")


def test_answer_mask_by_hand():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert P.answer_mask(responses, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert P.answer_mask(responses, [7, 2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_rollout_logps_match_the_sampler_and_the_reference(focused):
    from transformers import GenerationConfig
    tok = load_tokenizer(focused)
    policy = P.PolicyWithValue(load_causal_lm(focused))
    ref = load_causal_lm(focused)
    prompts = [[{"role": "user", "content": "Hi."}],
               [{"role": "user", "content": "Tell me a much longer story about a river."}]]
    cfg = P.PPOConfig(batch_size=2, mini_batch_size=1, max_new_tokens=6, temperature=0.8)
    torch.manual_seed(7)
    rollout = P.make_rollout(policy, ref, say_yes, tok, None, prompts, cfg, device="cpu",
                             autocast=contextlib.nullcontext)
    # the same sampling again, asking HF for its (temperature-scaled) scores
    ids, mask = P.left_pad([P.encode_prompt(tok, p, 512) for p in prompts], tok.pad_token_id,
                           "cpu")
    assert mask[0, 0] == 0  # the short prompt is left-padded
    torch.manual_seed(7)
    out = policy.lm.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
        do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=6,
        pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id]),
        output_scores=True, return_dict_in_generate=True)
    responses = out.sequences[:, ids.shape[1]:]
    assert torch.equal(responses, rollout.responses)
    sampler = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, responses[..., None])[..., 0]
    m = rollout.mask
    assert torch.allclose(rollout.old_logps * m, sampler * m, atol=1e-4)
    assert torch.equal(rollout.old_logps, rollout.ref_logps)  # same weights: KL exactly 0
    assert torch.count_nonzero(rollout.old_values) == 0  # zero-initialized value head
    # padding does not change a row: the short prompt alone gives the same log-probs
    single = P.response_logits(ref, torch.cat([ids[:1, (mask[0] == 0).sum():],
                                               responses[:1]], 1),
                               torch.ones(1, ids.shape[1] - int((mask[0] == 0).sum())
                                          + responses.shape[1], dtype=torch.long),
                               responses.shape[1])
    lp, _ = L.token_logps_and_entropy(single / 0.8, responses[:1])
    assert torch.allclose(lp * m[:1], rollout.ref_logps[:1] * m[:1], atol=1e-4)
    assert rollout.texts[0] and all(w in WORDS for w in (" " + rollout.texts[0]).split(" ")[1:]
                                    if w) is not None


def test_update_at_zero_learning_rate_sees_ratio_one(focused):
    """Rollout and update read the same log-probs although the update trims each minibatch's
    padding differently (prompts of several lengths, answers ending early at EOS)."""
    from accelerate import Accelerator
    tok = load_tokenizer(focused)
    lm = load_causal_lm(focused)
    with torch.no_grad():  # let EOS be sampled as often as " yes": answers of varied length
        yes = tok(TARGET, add_special_tokens=False)["input_ids"][0]
        lm.lm_head.weight[tok.eos_token_id] = lm.lm_head.weight[yes] + 0.3
    policy, ref = P.PolicyWithValue(lm), load_causal_lm(focused)
    prompts = [[{"role": "user", "content": "Hi."}],
               [{"role": "user", "content": "Tell me a much longer story about a river, please."}],
               [{"role": "user", "content": "Why?"}],
               [{"role": "user", "content": "What is the name of the tallest tree?"}]]
    cfg = P.PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8)
    torch.manual_seed(11)
    rollout = P.make_rollout(policy, ref, say_yes, tok, None, prompts, cfg, device="cpu",
                             autocast=contextlib.nullcontext)
    lengths = rollout.mask.sum(1).tolist()
    assert min(lengths) < 8 and len(set(lengths)) > 1, lengths  # some answers ended early
    rewards, _ = L.per_token_rewards(rollout.scores, rollout.old_logps, rollout.ref_logps,
                                     rollout.mask, 0.05)
    adv, ret = L.gae(rewards, rollout.old_values, rollout.mask)
    adv = L.masked_whiten(adv, rollout.mask)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    m = P.ppo_update(policy, optimizer, Accelerator(cpu=True), rollout, adv, ret, cfg,
                     torch.Generator().manual_seed(0))
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["clip_fraction"] == 0.0 and m["approx_kl"] < 1e-9
    assert m["value_clip_fraction"] == 0.0


@pytest.fixture(scope="module")
def tiny_run(focused, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-run")
    cfg = P.PPOConfig(steps=12, batch_size=16, mini_batch_size=8, ppo_epochs=2, lr=3e-3,
                      max_new_tokens=6, beta=0.02, train_layers=1, seed=0)
    before = _eval(focused, focused)
    result = P.train_ppo(focused, None, prompts_for(24), cfg, reward_fn=say_yes,
                         metrics_path=out / "ppo_metrics.jsonl", progress=False)
    trained_dir = out / "trained"
    result.model.save_pretrained(trained_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(focused / f, trained_dir / f)
    after = _eval(trained_dir, focused)
    return out, result, before, after


def _eval(policy_dir, ref_dir):
    return P.evaluate_policy(load_causal_lm(policy_dir), load_causal_lm(ref_dir), say_yes,
                             load_tokenizer(policy_dir), None, prompts_for(16, offset=1000),
                             max_new_tokens=6, samples=2, seed=5, batch_size=16)


def test_tiny_ppo_raises_heldout_reward_with_bounded_kl(tiny_run):
    _, result, before, after = tiny_run
    assert before["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert after["reward"] > before["reward"] + 0.1, (before, after)
    assert 0.0 < after["kl_per_token"] < 3.0, after
    history = result.history
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == ref
    late = sum(h["reward"] for h in history[-3:]) / 3
    assert late > history[0]["reward"] + 0.1


def test_metrics_file_and_plot(tiny_run, tmp_path):
    out, result, _, _ = tiny_run
    lines = [json.loads(x) for x in (out / "ppo_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    for key in ("reward", "kl", "kl_k3", "kl_per_token", "entropy", "clip_fraction",
                "value_loss", "policy_loss", "approx_kl", "beta", "response_length"):
        assert all(isinstance(x[key], float) for x in lines), key
    assert lines == P.read_metrics(out / "ppo_metrics.jsonl") == json.loads(json.dumps(
        result.history))
    assert all(x["kl_k3"] >= 0 for x in lines)
    png = P.plot_metrics(lines, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_frozen_layers_stay_frozen(tiny_run, focused):
    _, result, _, _ = tiny_run
    base = load_causal_lm(focused).state_dict()
    trained = result.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), \
        changed


def test_adaptive_beta_moves_towards_the_target(focused):
    cfg = P.PPOConfig(steps=3, batch_size=8, mini_batch_size=8, ppo_epochs=1, lr=3e-3,
                      max_new_tokens=4, beta=0.1, adaptive_kl=True, kl_target=100.0,
                      kl_horizon=16, seed=1)
    result = P.train_ppo(focused, None, prompts_for(8), cfg, reward_fn=say_yes, progress=False)
    betas = [h["beta"] for h in result.history]
    # KL far below the target: error clipped to -0.2, beta *= 1 - 0.2 * 8 / 16 each step
    assert betas == pytest.approx([0.1, 0.09, 0.081], rel=1e-9)
    assert result.beta == pytest.approx(0.0729, rel=1e-9)


def test_config_validation():
    from prefloop.server.errors import InvalidArgument
    with pytest.raises(InvalidArgument):
        P.PPOConfig(batch_size=2, mini_batch_size=4)
    with pytest.raises(InvalidArgument):
        P.PPOConfig(kl_estimator="k2")
    with pytest.raises(InvalidArgument):
        P.PPOConfig(clip_eps=1.5)


# ---- the job: registry, gate, publish, promote ---------------------------------------------------

@pytest.fixture(scope="module")
def ppo_log(focused, tmp_path_factory):
    """A data dir whose log holds 20 prompts (explicit preferences), v0000 = the focused tiny
    policy, and v0001 = an (untrained) tiny reward model."""
    from align_helpers import banana_pairs

    from prefloop.align.train.reward import load_reward_model
    from prefloop.server import registry as reg
    d = tmp_path_factory.mktemp("ppo-log") / "data"
    write_pairs(d, banana_pairs(20))
    registry = reg.Registry(d)
    registry.ensure_base(focused)
    torch.manual_seed(0)
    rm = load_reward_model(focused, new_head=True)
    rm.config.pad_token_id = load_tokenizer(focused).pad_token_id
    with registry.stage() as stage:
        rm.save_pretrained(stage.path)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(focused / f, stage.path / f)
        stage.publish(kind=reg.KIND_REWARD, method="rm", parent=reg.BASE_VERSION)
    return d


PPO_FAST = ["--steps", "4", "--batch-size", "8", "--lr", "1e-2", "--max-new-tokens", "8",
            "--eval-samples", "1", "--eval-batch-size", "8"]


def _cli(argv):
    """`prefloop align ARGV...` in-process; (exit code, stdout)."""
    import io
    from contextlib import redirect_stdout

    from prefloop import cli
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["align", *argv])
    return rc, buf.getvalue()


def test_ppo_job_gate_publish_promote(ppo_log, tmp_path):
    from prefloop.server import registry as reg
    out = tmp_path / "run"
    rc, text = _cli(["ppo", "--data-dir", str(ppo_log), "--rm", "v0001", "--plot", "--out-dir",
                     str(out), "--max-kl", "100", "--max-root-kl", "100", "--min-improvement", "-0.49",
                     "--min-heldout-pairs", "1", "--promote",
                     "--json", *PPO_FAST])
    assert rc == 0, text
    result = json.loads(text)
    assert result["status"] == "promoted", result
    registry = reg.Registry(ppo_log)
    manifest = registry.manifest(result["version"])
    assert manifest.kind == "policy" and manifest.method == "ppo" and manifest.parent == "v0000"
    assert manifest.hyperparameters["rm"] == "v0001"
    assert manifest.hyperparameters["clip_eps"] == 0.2
    assert manifest.gate["passed"] and manifest.gate["metric"] == "rm_win_rate"
    assert manifest.data["rows"] == {"train": 16, "heldout": 4}  # 20 prompts, newest 20%
    assert manifest.data["trained_until"] < manifest.data["heldout_since"]
    assert registry.current() == result["version"]
    assert registry.verify(result["version"]).ok
    lines = (out / "ppo_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and (out / "ppo_curves.png").stat().st_size > 1000
    held = manifest.metrics["heldout"]
    assert held["samples"] == 4 and held["kl_per_token"] > 0
    # trained on the root: its KL to the root is the KL to its reference, and the gate reads it
    assert held["root_version"] == "v0000" and held["kl_to_root_per_token"] == held["kl_per_token"]
    assert any("KL to the root v0000" in r for r in manifest.gate["reasons"])
    assert manifest.metrics["current"]["version"] == "v0000"
    assert job_history(registry)[-1].status == "promoted"


def test_ppo_job_rejected_by_kl_bound_publishes_nothing(ppo_log):
    from prefloop.align.gate import GateConfig
    from prefloop.align.jobs.ppo import PPOJobConfig, run_ppo_job
    from prefloop.align.train.ppo import PPOConfig
    from prefloop.server import registry as reg
    registry = reg.Registry(ppo_log)
    versions = registry.list_versions()
    cfg = PPOJobConfig(data_dir=ppo_log, rm="v0001", base="v0000", keep_rejected=False,
                       eval_samples=1, gate=GateConfig(max_kl=1e-9, min_improvement=-0.49),
                       ppo=PPOConfig(steps=2, batch_size=8, mini_batch_size=8, lr=3e-3,
                                     max_new_tokens=4), progress=False)
    result = run_ppo_job(cfg)
    assert result.status == "rejected" and result.version is None
    assert any("KL to the reference" in r and "> bound" in r for r in result.gate["reasons"])
    assert registry.list_versions() == versions


def test_ppo_on_a_child_version_measures_its_drift_from_the_root(ppo_log):
    """A PPO job whose base is not the root (v0000) measures the candidate's KL to the root on
    the same seeded answers, and the drift bound rejects it."""
    from prefloop.align.gate import GateConfig
    from prefloop.align.jobs.ppo import PPOJobConfig, run_ppo_job
    from prefloop.align.train.ppo import PPOConfig
    from prefloop.server import registry as reg

    def job(base: str, **gate):
        return run_ppo_job(PPOJobConfig(
            data_dir=ppo_log, rm="v0001", base=base, keep_rejected=True, eval_samples=1,
            gate=GateConfig(max_kl=100, min_improvement=-0.49, min_heldout=1, **gate),
            ppo=PPOConfig(steps=1, batch_size=8, mini_batch_size=8, lr=3e-3, max_new_tokens=4),
            progress=False))
    child = job("v0000", max_root_kl=100).version
    assert reg.Registry(ppo_log).manifest(child).parent == "v0000"
    result = job(child, max_root_kl=1e-12)
    held = reg.Registry(ppo_log).manifest(result.version).metrics["heldout"]
    assert held["root_version"] == "v0000" and held["kl_to_root_per_token"] > 0
    assert held["kl_to_root_per_token"] != held["kl_per_token"]  # measured against v0000
    assert result.status == "rejected"
    assert any("KL to the root v0000" in r and "> bound" in r for r in result.gate["reasons"])


def test_ppo_refuses_a_policy_as_reward_model_and_needs_rm(ppo_log):
    from prefloop.server import registry as reg
    versions = reg.Registry(ppo_log).list_versions()
    rc, _ = _cli(["ppo", "--data-dir", str(ppo_log), "--rm", "v0000", *PPO_FAST])
    assert rc == 2  # v0000 is a policy
    rc, _ = _cli(["ppo", "--data-dir", str(ppo_log), *PPO_FAST])
    assert rc == 2  # no --rm
    assert reg.Registry(ppo_log).list_versions() == versions


def test_incremental_ppo_run_skips_without_new_prompts(ppo_log):
    from prefloop.align.jobs.ppo import PPOJobConfig, run_ppo_job
    from prefloop.align.train.ppo import PPOConfig
    cfg = PPOJobConfig(data_dir=ppo_log, rm="v0001", command="run", incremental=True,
                       min_new=1, eval_samples=1, progress=False,
                       ppo=PPOConfig(steps=1, batch_size=8, mini_batch_size=8, max_new_tokens=4))
    first = run_ppo_job(cfg)  # skipped already when an earlier test's job saw every prompt
    assert first.status in ("skipped", "rejected", "published"), first
    rc, text = _cli(["run", "--method", "ppo", "--rm", "v0001", "--data-dir", str(ppo_log),
                     "--min-new-pairs", "1", "--json"])
    assert rc == 0, text
    second = json.loads(text)
    assert second["status"] == "skipped" and second["method"] == "ppo", second
    assert second["reason"].startswith("0 new prompts since")
