"""Context overflow (server/engine/context.py): error / truncate / shift on tiny random models.

Shift must (a) give layer-0 keys equal to a recompute at the shifted positions (RoPE:
R(-d) R(p) = R(p - d)), (b) keep generating past the window, (c) keep block accounting exact
(copy-on-write of shared blocks, shifted blocks out of the prefix-cache index, all blocks free at
the end), and (d) in a 1-layer model — where nothing but layer-0 K/V is cached — generate exactly
what dropping the same tokens and recomputing generates.
"""
import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_models import save_tiny

from prefloop.cli.model_args import add_model_arguments, generator_kwargs
from prefloop.server.engine.block_manager import BlockManager
from prefloop.server.engine.context import ContextConfig, admission_drop
from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.kv_shift import apply_shift_plan, rotate_keys, shift_cos_sin
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import InvalidArgument
from prefloop.server.model.loader import load_model
from prefloop.server.model.rope import apply_rope, config_cos_sin, precompute_cos_sin

WINDOW = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("ctx") / "m", "llama", max_position_embeddings=WINDOW,
                  attention_bias=True)
    return load_model(d)


@pytest.fixture(scope="module")
def tiny_one_layer(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("ctx1") / "m", "llama", num_hidden_layers=1,
                  max_position_embeddings=WINDOW)
    return load_model(d)


def engine(model, overflow="shift", keep=4, discard=16, method="rotate", block_size=4, tokens=1024,
           prefix=True):
    return LLMEngine(model, KVCacheConfig(block_size=block_size, capacity_tokens=tokens,
                                          enable_prefix_caching=prefix),
                     context=ContextConfig(overflow, keep=keep, discard=discard, shift_method=method))


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def prompt(n, seed=3):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_all_blocks_free(e):
    assert all(c == 0 for c in e.blocks.ref_counts)
    assert e.blocks.num_free == e.blocks.num_blocks
    assert not e.requests and not e.scheduler.running and not e.scheduler.waiting


def cached(e, seq, layer):
    bs = e.blocks.block_size
    idx = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(seq.num_computed)])
    k, v = e.runner.kv_caches[layer]
    return k.view(-1, *k.shape[2:])[idx].clone(), v.view(-1, *v.shape[2:])[idx].clone()


def recompute_kv(model, ids):
    """K/V of every layer for `ids` at positions 0.. from a fresh engine (one prefill)."""
    e = LLMEngine(model, KVCacheConfig(block_size=4, capacity_tokens=256, enable_prefix_caching=False))
    e.add_request("r", ids + [5], greedy(2))  # still running after its prefill
    seq = e.requests["r"].seqs[0]
    e.step()
    n = len(ids)
    return [tuple(t[:n] for t in cached(e, seq, layer)) for layer in range(model.config.num_layers)]


# -- the rotation itself -----------------------------------------------------------------------

def test_rotating_by_minus_delta_equals_rotating_at_shifted_positions():
    torch.manual_seed(0)
    cos, sin = precompute_cos_sin(32, 4096, 10000.0, dtype=torch.float64)
    k = torch.randn(50, 2, 32, dtype=torch.float64)
    pos = torch.arange(1000, 1050)
    cached_k = apply_rope(k, cos[pos], sin[pos])
    for delta in (1, 37, 999):
        c, s = cos[[delta]], -sin[[delta]]  # R(-delta)
        assert torch.allclose(rotate_keys(cached_k, c, s), apply_rope(k, cos[pos - delta], sin[pos - delta]),
                              atol=1e-12)


def test_shift_cos_sin_matches_the_model_tables(tiny):
    cos, sin = config_cos_sin(tiny.config, torch.float64)
    c, s = shift_cos_sin(tiny.config, 20, torch.float64)
    assert torch.allclose(c[0], cos[20]) and torch.allclose(s[0], -sin[20])


# -- admission: error and truncate -------------------------------------------------------------

def test_error_mode_names_the_limit_and_the_option(tiny):
    e = engine(tiny, overflow="error")
    with pytest.raises(InvalidArgument, match=r"context length 64.*--context-overflow"):
        e.add_request("a", prompt(40), greedy(30))
    with pytest.raises(InvalidArgument, match="context length is 64"):
        e.add_request("b", prompt(64), greedy(1))
    out = e.generate({"c": (prompt(40), greedy(24))})  # exactly the window: fine
    assert len(out["c"][0]) == 24
    assert_all_blocks_free(e)


def test_truncate_drops_oldest_prompt_tokens_after_keep(tiny):
    p = prompt(60)
    e = engine(tiny, overflow="truncate", keep=5)
    out = e.generate({"a": (p, greedy(20))})["a"][0]
    assert len(out) == 20 and e.stats().truncated_prompts == 1 and e.stats().context_shifts == 0
    kept = p[:5] + p[-(WINDOW - 20 - 5):]  # 44 prompt tokens + 20 new = the window
    ref = engine(tiny, overflow="error").generate({"a": (kept, greedy(20))})["a"][0]
    assert out == ref
    assert_all_blocks_free(e)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        e.add_request("b", p, greedy(60))  # 60 new tokens leave no room for keep + 1 prompt token
    assert admission_drop(10, 20, 64, ContextConfig("truncate"), 16) == 0


def test_config_validation():
    with pytest.raises(ValueError):
        ContextConfig("wrap")
    with pytest.raises(ValueError):
        ContextConfig("shift", keep=-1)
    with pytest.raises(InvalidArgument, match="below the context length"):
        ContextConfig("shift", keep=60, discard=8).discard_tokens(64, 4)
    assert ContextConfig("shift", keep=4).discard_tokens(64, 4) == 28  # half of 60, whole blocks
    assert ContextConfig("shift", keep=4, discard=5).discard_tokens(64, 4) == 8  # rounded up


# -- shift in the engine -----------------------------------------------------------------------

def test_layer0_keys_after_shift_equal_recompute_at_shifted_positions(tiny):
    e = engine(tiny, keep=6, discard=16)
    e.add_request("a", prompt(30), greedy(100))
    seq = e.requests["a"].seqs[0]
    while seq.num_shifts == 0:
        e.step()
    assert seq.cache_shifted and seq.num_dropped == 16 and seq.num_computed == WINDOW - 16
    ref = recompute_kv(tiny, seq.context_ids[:seq.num_computed])
    k0, v0 = cached(e, seq, 0)
    assert (k0 - ref[0][0]).abs().max() < 1e-5  # rotated keys == keys computed at the new positions
    assert (v0 - ref[0][1]).abs().max() < 1e-5  # values carry no position
    k1, _ = cached(e, seq, 1)
    # deeper layers still carry the dropped tokens (they were attended to): shift != recompute there
    assert (k1[6:] - ref[1][0][6:]).abs().max() > 1e-3
    e.abort("a")
    assert_all_blocks_free(e)


@pytest.mark.parametrize("keep", [4, 5, 0])
def test_one_layer_model_shift_generates_what_recompute_generates(tiny_one_layer, keep):
    p = prompt(20, seed=keep)
    outs, logits = {}, {}
    for method in ("rotate", "recompute"):
        e = engine(tiny_one_layer, keep=keep, discard=16, method=method, prefix=False)
        rows = []
        e.logits_hook = lambda seqs, lg, rows=rows: rows.append(lg[0].clone())
        outs[method] = e.generate({"a": (p, greedy(150))})["a"][0]
        logits[method] = torch.stack(rows)
        assert e.stats().context_shifts == 7
        assert_all_blocks_free(e)
    assert len(outs["rotate"]) == 150 and outs["rotate"] == outs["recompute"]
    assert (logits["rotate"] - logits["recompute"]).abs().max() < 1e-4


def test_generation_continues_past_the_window_and_blocks_are_exact(tiny):
    e = engine(tiny, keep=4, discard=16)
    out = e.generate({"a": (prompt(30), greedy(200)), "b": (prompt(10, seed=9), greedy(120))})
    assert len(out["a"][0]) == 200 and len(out["b"][0]) == 120
    assert e.stats().context_shifts >= 10
    assert_all_blocks_free(e)


def test_shifted_candidates_do_not_touch_shared_blocks(tiny):
    """n=2 candidates share the prompt's blocks; each shifts. Copy-on-write must keep each one's
    keys its own: the pair generates exactly what each candidate generates alone."""
    p = prompt(33)
    params = SamplingParams(temperature=1.0, n=2, seed=11, max_tokens=90, ignore_eos=True)
    e = engine(tiny, keep=5, discard=16)
    e.add_request("pair", p, params)
    e.step()
    parent, child = e.requests["pair"].seqs
    shared = [b for b in parent.block_table if b in child.block_table]
    assert shared and all(e.blocks.ref_counts[b] == 2 for b in shared)
    hashed = [b for b in shared if b in e.blocks.hash_of_block]
    assert hashed
    shifted_tables = None
    while e.has_unfinished():
        e.step()
        if shifted_tables is None and parent.num_shifts and child.num_shifts:
            shifted_tables = (list(parent.block_table), list(child.block_table))
    assert shifted_tables is not None
    kept_blocks = 5 // 4
    a, b = shifted_tables
    assert a[:kept_blocks] == b[:kept_blocks]  # unmodified kept prefix stays shared
    assert not set(a[kept_blocks:]) & set(b[kept_blocks:])  # everything rewritten is private
    outs = {parent.index: parent.output_ids, child.index: child.output_ids}
    assert_all_blocks_free(e)
    for index in (0, 1):
        alone = engine(tiny, keep=5, discard=16)
        single = SamplingParams(temperature=1.0, seed=11 + index, max_tokens=90, ignore_eos=True)
        assert alone.generate({"x": (p, single)})["x"][0] == outs[index]


def test_prefix_cache_never_serves_shifted_blocks(tiny):
    e = engine(tiny, keep=4, discard=16)
    e.add_request("a", prompt(40), greedy(40))
    seq = e.requests["a"].seqs[0]
    while seq.num_shifts == 0:
        e.step()
    context = list(seq.context_ids)
    shifted = seq.block_table[1:]
    assert not set(shifted) & set(e.blocks.hash_of_block)
    for _ in range(8):
        e.step()
    assert not set(seq.block_table[1:]) & set(e.blocks.hash_of_block)  # and nothing registered since
    # a new request with exactly the shifted context may reuse only the kept (unshifted) block
    blocks, _ = e.blocks.match_prefix(context + [7])
    assert blocks == seq.block_table[:1]
    e.abort("a")
    assert_all_blocks_free(e)


def test_shift_mode_admits_a_prompt_longer_than_the_window(tiny):
    e = engine(tiny, keep=4, discard=16)
    p = prompt(100)
    out = e.generate({"a": (p, greedy(30))})["a"][0]
    assert len(out) == 30 and e.stats().truncated_prompts == 1
    assert_all_blocks_free(e)


def test_shift_falls_back_to_recompute_when_copy_on_write_has_no_blocks(tiny):
    # Two candidates share a 40-token prompt (10 blocks of 4); at the window each holds 6 blocks of
    # its own (22 of 23). The first shift must copy the 5 shared prompt blocks after the dropped
    # span and finds 1 free block: it drops the tokens and recomputes instead.
    p = prompt(40)
    e = engine(tiny, keep=4, discard=16, tokens=92)
    requeued = []
    original = e.scheduler.requeue_for_recompute

    def spy(seq):
        requeued.append(seq.num_computed)
        original(seq)
    e.scheduler.requeue_for_recompute = spy
    out = e.generate({"a": (p, SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=60, ignore_eos=True))})
    assert all(len(v) == 60 for v in out["a"].values())
    assert WINDOW in requeued  # the fallback happened at the window (not a preemption mid-way)
    assert e.stats().context_shifts >= 2
    assert_all_blocks_free(e)


# -- block manager surgery on a symbolic cache --------------------------------------------------

@pytest.mark.parametrize("keep", [0, 3, 4, 6])
def test_block_manager_shift_moves_every_token_to_its_new_slot(keep):
    bs, n, discard = 4, 30, 8
    bm = BlockManager(num_blocks=40, block_size=bs)
    table, hashes = [], []
    tokens = list(range(100, 100 + n))
    bm.grow(table, n)
    bm.register_full_blocks(table, hashes, tokens, n)
    other = bm.fork(table, n)  # a candidate sharing every full block
    bm.take_pending_copies()
    slots = {}  # slot -> token: a cache made of labels
    for i, t in enumerate(tokens):
        slots[table[i // bs] * bs + i % bs] = t
    before_other = {b: [slots.get(b * bs + j) for j in range(bs)] for b in other[:n // bs]}
    plan = bm.shift(table, n, keep, discard)
    new = dict(slots)
    for s, d in zip(plan.copy_src, plan.copy_dst):
        new[d] = slots[s]
    for s, d in zip(plan.move_src, plan.move_dst):
        new[d] = ("rotated", slots[s])
    expect = tokens[:keep] + tokens[keep + discard:]
    got = [new[table[i // bs] * bs + i % bs] for i in range(len(expect))]
    assert got == [t if i < keep else ("rotated", t) for i, t in enumerate(expect)]
    written = set(plan.move_dst) | set(plan.copy_dst)
    for b, labels in before_other.items():  # the other sequence's blocks are untouched
        assert all(b * bs + j not in written for j in range(bs))
    for b in table[keep // bs:]:
        assert b not in bm.hash_of_block
    bm.free(table)
    bm.free(other)
    assert bm.num_free == 40 and all(c == 0 for c in bm.ref_counts)


def test_apply_shift_plan_rotates_in_place(tiny):
    cfg = tiny.config
    caches = [(torch.randn(4, 4, cfg.num_kv_heads, cfg.head_dim), torch.randn(4, 4, cfg.num_kv_heads, cfg.head_dim))]
    k_before, v_before = caches[0][0].clone(), caches[0][1].clone()
    bm = BlockManager(num_blocks=4, block_size=4)
    table = []
    bm.grow(table, 14)
    plan = bm.shift(table, 14, 4, 4)  # drop block 1: blocks 2, 3 rotate in place
    apply_shift_plan(caches, plan, cfg)
    c, s = shift_cos_sin(cfg, 4)
    assert table == [0, 2, 3]
    assert torch.allclose(caches[0][0][2], rotate_keys(k_before[2], c, s))
    assert torch.equal(caches[0][0][0], k_before[0]) and torch.equal(caches[0][1], v_before)


# -- plumbing: model_args -> build_generator -> LLMEngine ----------------------------------------

def test_flags_reach_the_generator_kwargs():
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    kw = generator_kwargs(p.parse_args(["--context-overflow", "shift", "--context-keep", "12",
                                        "--context-discard", "64"]))
    assert (kw["context_overflow"], kw["context_keep"], kw["context_discard"]) == ("shift", 12, 64)
    assert generator_kwargs(p.parse_args([]))["context_overflow"] == "error"


@pytest.mark.slow
def test_cli_generate_with_shift_runs_past_the_window(tmp_path):
    from prefloop.server.model.loader import resolve_model_dir
    src = resolve_model_dir(None)
    d = save_tiny(tmp_path / "m", "llama", vocab_size=49152, max_position_embeddings=WINDOW)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, d / name)
    base = [sys.executable, "-m", "prefloop.cli", "generate", "Once upon a time", "--model", str(d),
            "--max-tokens", "100", "--json", "--kv-cache-tokens", "512", "--block-size", "8",
            "--dtype", "float32"]
    res = subprocess.run(base + ["--context-overflow", "shift"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["completion_tokens"] > WINDOW
    res = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "context length 64" in res.stderr
