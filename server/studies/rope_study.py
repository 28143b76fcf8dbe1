"""The RoPE study behind `prefloop rope`: why rotary position encoding suits a KV cache, measured.

`run_rope_study()` loads a model (default: the embedded SmolLM2-135M) and measures, with its own
weights and the engine's own code paths:

1. cache == recompute: keys in the paged cache, written chunk by chunk and token by token, equal a
   one-pass recompute, and cached keys never change while tokens are appended;
2. only relative position matters: the same text at positions 0 and p gives the same layer-0
   attention scores q_m . k_n and the same logits, up to float error;
3. moving a cached prefix: rotating cached keys by delta (one elementwise pass,
   R(delta) R(p) = R(p + delta)) equals recomputing them at the shifted positions, timed against
   the recompute; and what dropping tokens in the middle (a context shift) leaves behind per layer;
4. the contrast: the same measurements on three small models that differ only in their position
   encoding (server/studies/position_families.py: RoPE, learned absolute embeddings, T5 relative bias),
   plus the per-decode-step cost of each and the distances the T5 buckets can tell apart.

It returns one JSON-ready dict, and writes `rope_relative.png` (attention logit against relative
distance for several absolute offsets, one panel per family) when `out_dir` is given.
`format_report(result)` renders the terminal table. docs/rope.md discusses the numbers.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.kv_shift import rotate_keys, shift_cos_sin
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.model_runner import ModelRunner
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.engine.scheduler import ScheduledSeq, SchedulerConfig
from prefloop.server.engine.sequence import Sequence
from prefloop.server.model.llama import LlamaModel
from prefloop.server.model.loader import load_model, resolve_model_dir
from prefloop.server.model.rope import apply_rope
from prefloop.server.studies.position_families import (
    FAMILIES,
    FamilyCache,
    FamilyConfig,
    FamilyModel,
    t5_bucket,
)

STUDY_TEXT = (
    "The river town woke slowly. Fishermen untied their boats while the baker pulled the first loaves "
    "from an oven that had been warm since midnight. On the hill above the harbour, the old "
    "lighthouse keeper wrote the weather into a ledger his grandfather had started: wind from the "
    "west, light rain, visibility good. Children ran along the sea wall on their way to school, "
    "counting the gulls and arguing about whether the ferry would be late again. At the market, a "
    "woman sold honey from her own hives and explained to anyone who asked how bees decide where to "
    "build, how they dance to share directions, and why a hive in winter hums like a small engine. "
    "By noon the clouds had lifted. The ferry arrived, late again, and unloaded a piano, three "
    "bicycles, a crate of oranges and a schoolteacher from the mainland who had come to stay for a "
    "year. She took a room above the bookshop, opened the window, and listened to the harbour: ropes "
    "creaking, engines idling, someone laughing on a deck. In the evening she walked to the "
    "lighthouse and asked the keeper what he wrote in his ledger. He showed her a century of "
    "weather, storms marked in red ink, calm weeks in pencil, and a note from 1953 about a whale "
    "that had followed the fishing fleet home. She asked whether the town had changed much. He said "
    "the boats had engines now and the bakery had a new oven, but the tides kept the same hours, and "
    "people still counted gulls on the way to school.")


# -- helpers on the loaded model -----------------------------------------------------------------

def study_token_ids(model_dir: Path, vocab_size: int, n: int) -> list[int]:
    """n token ids of STUDY_TEXT (repeated as needed), or seeded random ids without a tokenizer."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        from prefloop.server.serving.tokenizer import Tokenizer
        tok = Tokenizer(model_dir)
        ids: list[int] = []
        while len(ids) < n:
            ids += tok.encode(STUDY_TEXT, add_special_tokens=not ids)
        return ids[:n]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (n,), generator=gen).tolist()


def forward_at(model: LlamaModel, ids: list[int], offset: int = 0):
    """One prefill of `ids` at positions offset, offset + 1, ... through the engine's runner.

    Returns logits [n, vocab] and the runner's paged caches (block 0.. hold tokens 0..n-1).
    """
    n = len(ids)
    assert n > 1, "a single token would be scheduled as a decode"
    block_size = 16
    runner = ModelRunner(model, -(-n // block_size), block_size)
    seq = Sequence(0, "rope-study", 0, list(ids), n, SamplingParams(temperature=0), 0)
    seq.block_table = list(range(-(-n // block_size)))
    ids_t, positions, meta, _, _ = runner.build([ScheduledSeq(seq, n)])
    logits = model(ids_t, positions + offset, runner.kv_caches, meta, torch.arange(n))
    return logits, runner.kv_caches


def cached_keys(kv_caches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) [n, n_kv, head_dim] of the first n slots."""
    return [(k.view(-1, *k.shape[2:])[:n].clone(), v.view(-1, *v.shape[2:])[:n].clone()) for k, v in kv_caches]


@torch.inference_mode()
def layer0_qk(model: LlamaModel, ids: list[int], positions: torch.Tensor):
    """Layer-0 q [n, heads, hd] and k [n, n_kv, hd], rotated at `positions` (the model's tables)."""
    attn = model.layers[0].self_attn
    cfg = model.config
    h = model.layers[0].input_layernorm(model.embed_tokens(torch.tensor(ids)))
    q, k, _ = attn.qkv_proj(h).split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                                      cfg.num_kv_heads * cfg.head_dim], dim=-1)
    cos, sin = model.cos_table[positions].float(), model.sin_table[positions].float()
    q = apply_rope(q.float().view(len(ids), cfg.num_heads, cfg.head_dim), cos, sin)
    k = apply_rope(k.float().view(len(ids), cfg.num_kv_heads, cfg.head_dim), cos, sin)
    return q, k


def layer0_scores(model: LlamaModel, ids: list[int], offset: int) -> torch.Tensor:
    """Causal layer-0 attention logits q_m . k_n / sqrt(d) [heads, n, n] (future entries 0)."""
    n = len(ids)
    q, k = layer0_qk(model, ids, torch.arange(n) + offset)
    group = model.config.num_heads // model.config.num_kv_heads
    k = k.repeat_interleave(group, dim=1)  # [n, heads, hd]
    scores = torch.einsum("mhd,nhd->hmn", q, k) * model.config.head_dim ** -0.5
    return scores * torch.ones(n, n).tril()


def _best_ms(fn, repeats: int) -> float:
    """Best of `repeats` wall times in ms: on a shared machine the minimum is the work, the rest is
    waiting for a core."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


# -- 1. cache == recompute -----------------------------------------------------------------------

def measure_cache_stability(model: LlamaModel, ids: list[int], append: int) -> dict:
    """Chunked prefill + token-by-token decode in the engine vs one full recompute."""
    chunk, block_size = 64, 16
    engine = LLMEngine(model, KVCacheConfig(block_size=block_size, capacity_tokens=len(ids) + append + 64,
                                            enable_prefix_caching=False),
                       SchedulerConfig(max_num_batched_tokens=chunk))
    engine.add_request("s", ids, SamplingParams(temperature=0, max_tokens=append + 1, ignore_eos=True))
    seq = engine.requests["s"].seqs[0]

    def snapshot(n):
        bs = engine.blocks.block_size
        slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(n)])
        return [(k.view(-1, *k.shape[2:])[slots].clone(), v.view(-1, *v.shape[2:])[slots].clone())
                for k, v in engine.runner.kv_caches]

    while seq.num_computed < len(ids):
        engine.step()
    first = snapshot(len(ids))
    max_change = 0.0
    for _ in range(append - 1):
        engine.step()
        now = snapshot(len(ids))
        max_change = max(max_change, max(float((a[0] - b[0]).abs().max()) for a, b in zip(first, now)))
    n = seq.num_computed
    cache = snapshot(n)
    engine.abort("s")
    _, ref_caches = forward_at(model, seq.context_ids[:n])
    ref = cached_keys(ref_caches, n)
    k_diff = [float((c[0] - r[0]).abs().max()) for c, r in zip(cache, ref)]
    v_diff = [float((c[1] - r[1]).abs().max()) for c, r in zip(cache, ref)]
    return {"prompt_tokens": len(ids), "appended_tokens": n - len(ids), "prefill_chunk": chunk,
            "block_size": block_size, "max_abs_diff_k": max(k_diff), "max_abs_diff_v": max(v_diff),
            "k_diff_per_layer": k_diff, "k_scale": max(float(c[0].abs().max()) for c in cache),
            "cached_keys_max_change": max_change}


# -- 2. only relative position matters -----------------------------------------------------------

def measure_relative(model: LlamaModel, ids: list[int], offsets: list[int]) -> dict:
    base_scores = layer0_scores(model, ids, 0)
    base_logits, _ = forward_at(model, ids, 0)
    rows = []
    for p in offsets:
        scores = layer0_scores(model, ids, p)
        logits, _ = forward_at(model, ids, p)
        rows.append({"offset": p,
                     "layer0_score_max_abs_diff": float((scores - base_scores).abs().max()),
                     "logits_max_abs_diff": float((logits - base_logits).abs().max()),
                     "top1_agreement": float((logits.argmax(-1) == base_logits.argmax(-1)).float().mean())})
    return {"tokens": len(ids), "layer0_score_scale": float(base_scores.abs().max()),
            "logits_scale": float(base_logits.abs().max()), "rows": rows}


# -- 3. moving a cached prefix -------------------------------------------------------------------

def rotate_cache(keys: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
    return [rotate_keys(k, cos, sin) for k in keys]


def measure_move(model: LlamaModel, ids: list[int], deltas: list[int], keep: int, drop: int,
                 repeats: int = 3) -> dict:
    """Rotate-vs-recompute error per layer and best-of-`repeats` timings, for each delta."""
    cfg = model.config
    n = len(ids)
    _, caches = forward_at(model, ids, 0)
    keys = [k for k, _ in cached_keys(caches, n)]
    rows = []
    for delta in deltas:
        cos, sin = shift_cos_sin(cfg, -delta)  # R(+delta): move the prefix later
        rotated = rotate_cache(keys, cos, sin)
        _, ref_caches = forward_at(model, ids, delta)
        ref = [k for k, _ in cached_keys(ref_caches, n)]
        diffs = [float((a - b).abs().max()) for a, b in zip(rotated, ref)]
        rotate_ms = _best_ms(lambda: rotate_cache(keys, cos, sin), repeats * 3)
        recompute_ms = _best_ms(lambda: forward_at(model, ids, delta), repeats)
        rows.append({"delta": delta, "layer0_max_abs_diff": diffs[0], "all_layers_max_abs_diff": max(diffs),
                     "rotate_ms": rotate_ms, "recompute_ms": recompute_ms})
    # a context shift: drop [keep, keep + drop) and move the rest back by `drop`
    cos, sin = shift_cos_sin(cfg, drop)  # R(-drop)
    shifted = [torch.cat([k[:keep], rotate_keys(k[keep + drop:], cos, sin)]) for k in keys]
    _, ref_caches = forward_at(model, ids[:keep] + ids[keep + drop:], 0)
    ref = [k for k, _ in cached_keys(ref_caches, n - drop)]
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(shifted, ref)]
    return {"tokens": n, "rows": rows, "layers": cfg.num_layers,
            "drop": {"keep": keep, "dropped": drop, "k_relative_error_per_layer": rel}}


# -- 4. the other families ----------------------------------------------------------------------

def _family_scores(m: FamilyModel, ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Layer-0 attention logits (q.k / sqrt(d) + position bias) [heads, n, n], causal part."""
    pos = torch.arange(len(ids)) + offset
    with torch.inference_mode():
        q, k, _ = m.qkv_at(0, m.embed_at(ids, pos), pos)
        s = torch.einsum("mhd,nhd->hmn", q, k) * m.cfg.head_dim ** -0.5 + m.attention_bias(pos, pos)
    return torch.nan_to_num(s, neginf=0.0)


def measure_family(kind: str, offsets: list[int], move_delta: int, table: int = 1024,
                   tokens: int = 64) -> dict:
    m = FamilyModel(FamilyConfig(kind, max_positions=table))
    ids = torch.randint(0, m.cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(tokens)
    # 1. cache == recompute; cached keys stable while appending
    full = FamilyCache()
    m(ids, pos, full)
    inc = FamilyCache()
    half = tokens // 2
    for i in range(tokens):
        m(ids[i:i + 1], pos[i:i + 1], inc)
        if i == half - 1:
            early = [k.clone() for k in inc.keys]
    cache_diff = max(float((a - b).abs().max()) for a, b in zip(inc.keys, full.keys))
    change = max(float((a - b[:half]).abs().max()) for a, b in zip(early, inc.keys))
    # 2. same text at 0 and p
    base_logits, base_scores = m(ids, pos), _family_scores(m, ids, 0)
    rel = []
    for p in offsets:
        try:
            rel.append({"offset": p, "logits_max_abs_diff": float((m(ids, pos + p) - base_logits).abs().max()),
                        "layer0_score_max_abs_diff": float((_family_scores(m, ids, p) - base_scores).abs().max())})
        except ValueError:
            rel.append({"offset": p, "logits_max_abs_diff": None, "layer0_score_max_abs_diff": None,
                        "representable": False})
    # 3. move a cached prefix by move_delta, then continue over it
    prefix, cont = ids[:half], ids[half:]
    cache = FamilyCache()
    m(prefix, pos[:half], cache)
    moved = m.move_cache(cache, move_delta)
    move_ms = _best_ms(lambda: m.move_cache(cache, move_delta), 5)
    reused = moved is None
    if reused:  # absolute: no transform exists; show what reusing the cache unchanged gives
        moved = cache.clone()
        moved.positions = cache.positions + move_delta
    got = m(cont, pos[half:] + move_delta, moved)
    ref = m(ids, pos + move_delta)[half:]
    recompute_ms = _best_ms(lambda: m(prefix, pos[:half] + move_delta), 5)
    out = {"kind": kind, "cache_vs_recompute_max_abs_diff_k": cache_diff,
           "cached_keys_max_change": change, "relative": rel,
           "move": {"delta": move_delta, "method": {"rope": "rotate keys", "t5": "nothing to do",
                                                     "absolute": "none exists: must recompute"}[kind],
                    "continuation_logits_max_abs_diff": float((got - ref).abs().max()),
                    "move_ms": None if reused else move_ms, "recompute_ms": recompute_ms},
           "position_table": table if kind == "absolute" else None}
    if kind == "t5":
        buckets = t5_bucket(torch.arange(4 * m.cfg.t5_max_distance), m.cfg.t5_num_buckets, m.cfg.t5_max_distance)
        out["t5"] = {"num_buckets": m.cfg.t5_num_buckets, "max_distance": m.cfg.t5_max_distance,
                     "first_distance_in_last_bucket": int((buckets == buckets.max()).nonzero()[0])}
    return out


def measure_step_costs(contexts: list[int], table: int = 1024, rounds: int = 5, repeats: int = 10) -> dict:
    """Per decode step, one layer's attention (projection + position work + SDPA) per family at
    several context lengths, in microseconds (best of rounds x repeats; families interleaved so
    load drifts hit all alike), plus the T5 bias alone."""
    models = {kind: FamilyModel(FamilyConfig(kind, max_positions=table)) for kind in FAMILIES}
    cfg = models["rope"].cfg
    h = torch.randn(1, cfg.hidden_size)
    out: dict = {kind: {} for kind in FAMILIES}
    out["t5_bias_only"] = {}
    for ctx in contexts:
        keys = torch.randn(cfg.num_heads, ctx, cfg.head_dim)  # [heads, ctx, head_dim]
        values = torch.randn(cfg.num_heads, ctx, cfg.head_dim)
        kpos, qpos = torch.arange(ctx), torch.tensor([ctx])
        steps = {kind: (lambda m=m: m.decode_attention(0, h, qpos, keys, values, kpos)) for kind, m in models.items()}
        steps["t5_bias_only"] = lambda: models["t5"].step_bias(qpos, kpos)
        samples: dict = {name: [] for name in steps}
        for _ in range(rounds):
            for name, fn in steps.items():
                fn()  # warm
                samples[name].append(_best_ms(fn, repeats) * 1e3)
        for name in steps:
            out[name][str(ctx)] = min(samples[name])
    return out


# -- the plot -----------------------------------------------------------------------------------

def curves(model: LlamaModel, ids: list[int], offsets: list[int], distances: int, table: int,
           rope_extra: int | None = None) -> dict:
    """Attention logit of a query token at position o + r on a key token at o, against r.

    RoPE uses the loaded model (plus one far offset, `rope_extra`); the absolute and T5 panels
    use the small comparison models (their offsets must stay inside the absolute table)."""
    qa, kb = ids[len(ids) // 2], ids[len(ids) // 3]
    out = {"rope (loaded model, layer 0, head 0)": {}}
    last = model.config.max_position_embeddings - distances - 1  # the largest offset that fits
    for o in sorted({min(o, last) for o in offsets + ([rope_extra] if rope_extra else [])}):
        pos = torch.tensor([o] + [o + r for r in range(distances)])
        q, k = layer0_qk(model, [kb] + [qa] * distances, pos)
        out["rope (loaded model, layer 0, head 0)"][o] = (
            (q[1:, 0] @ k[0, 0]) * model.config.head_dim ** -0.5).tolist()
    for kind in ("absolute", "t5"):
        m = FamilyModel(FamilyConfig(kind, max_positions=table))
        name = {"absolute": "learned absolute (small model)", "t5": "T5 relative bias (small model)"}[kind]
        out[name] = {}
        for o in offsets:
            pos = torch.tensor([o] + [o + r for r in range(distances)])
            ids_t = torch.tensor([kb % m.cfg.vocab_size] + [qa % m.cfg.vocab_size] * distances)
            with torch.inference_mode():
                q, k, _ = m.qkv_at(0, m.embed_at(ids_t, pos), pos)
                s = (q[1:, 0] @ k[0, 0]) * m.cfg.head_dim ** -0.5
                s = s + m.attention_bias(pos[1:], pos[:1])[0, :, 0]
            out[name][o] = s.tolist()
    return out


def spread(curve_set: dict) -> float:
    """Largest gap between offsets at one distance (0 when only relative position matters)."""
    rows = torch.tensor(list(curve_set.values()))
    return float((rows.max(0).values - rows.min(0).values).max())


def plot_curves(all_curves: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(all_curves), figsize=(4.0 * len(all_curves), 3.2), dpi=72)
    for ax, (name, by_offset) in zip(axes, all_curves.items()):
        for o, ys in by_offset.items():
            ax.plot(range(len(ys)), ys, lw=1.2, label=f"offset {o}")
        ax.set_title(f"{name}\nspread {spread(by_offset):.2g}", fontsize=9)
        ax.set_xlabel("relative distance m - n")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attention logit q_m . k_n / sqrt(d)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, pil_kwargs={"optimize": True})
    plt.close(fig)
    tmp.replace(path)
    return path


# -- the study ----------------------------------------------------------------------------------

def run_rope_study(model: str | None = None, out_dir: str | Path | None = None, *,
                   cache_dir: str | None = None, dtype: str = "float32", device: str = "cpu",
                   num_tokens: int = 256, append_tokens: int = 24,
                   offsets: tuple[int, ...] = (1, 100, 1000, 8000), move_deltas: tuple[int, ...] = (64, 4000),
                   keep: int = 4, drop: int = 64, family_table: int = 1024,
                   step_contexts: tuple[int, ...] = (1024, 4096, 16384)) -> dict:
    """Measure the four RoPE properties on a model (None = the embedded default); see module doc.

    Offsets/deltas that do not fit the model's max_position_embeddings are clamped to the last
    position that fits. Returns a JSON-ready dict; with `out_dir`, also writes rope_relative.png.
    """
    t_start = time.perf_counter()
    model_dir = resolve_model_dir(model, cache_dir)
    llama = load_model(model_dir, dtype=dtype, device=device)
    cfg = llama.config
    num_tokens = min(num_tokens, cfg.max_position_embeddings // 2)
    ids = study_token_ids(model_dir, cfg.vocab_size, num_tokens + append_tokens)
    short = ids[:num_tokens // 2]
    fit = cfg.max_position_embeddings - num_tokens
    offsets_fit = sorted({min(p, cfg.max_position_embeddings - len(short)) for p in offsets})
    deltas_fit = sorted({min(d, fit) for d in move_deltas})
    drop = min(drop, num_tokens // 2)
    result = {
        "model": {"path": str(model_dir), "name": Path(model_dir).name, "architecture": cfg.architecture,
                  "layers": cfg.num_layers, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                  "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
                  "rope_scaling": cfg.rope_scaling.get("rope_type", "default"),
                  "max_position_embeddings": cfg.max_position_embeddings, "dtype": dtype},
        "cache_vs_recompute": measure_cache_stability(llama, ids[:num_tokens], append_tokens),
        "relative_only": measure_relative(llama, short, offsets_fit),
        "move_prefix": measure_move(llama, ids[:num_tokens], deltas_fit, keep, drop),
        "families": {kind: measure_family(kind, [100, family_table - 64 - 16, family_table + 100],
                                          500, family_table) for kind in FAMILIES},
        "decode_step_us": measure_step_costs(list(step_contexts), family_table),
    }
    all_curves = curves(llama, ids, [0, 100, 300, 700], min(256, cfg.max_position_embeddings // 2),
                        family_table, rope_extra=7000)
    result["curve_spread"] = {name: spread(c) for name, c in all_curves.items()}
    if out_dir is not None:
        result["plot"] = str(plot_curves(all_curves, Path(out_dir) / "rope_relative.png"))
    result["seconds"] = time.perf_counter() - t_start
    return result


# -- the terminal table -------------------------------------------------------------------------

def _g(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "0" if x == 0 else f"{x:.2g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3g}"
    return str(x)


def format_report(r: dict) -> str:
    m = r["model"]
    c, rel, mv, fam = r["cache_vs_recompute"], r["relative_only"], r["move_prefix"], r["families"]
    lines = [f"prefloop rope - {m['name']} ({m['layers']} layers, {m['heads']} heads / {m['kv_heads']} KV, "
             f"head_dim {m['head_dim']}, theta {m['rope_theta']:g}, {m['dtype']})", "",
             f"1. cache == recompute ({c['prompt_tokens']} prompt tokens in chunks of {c['prefill_chunk']}, "
             f"{c['appended_tokens']} appended one by one)",
             f"   max |K_cache - K_recompute| over {m['layers']} layers   {_g(c['max_abs_diff_k'])}"
             f"   (V {_g(c['max_abs_diff_v'])}; |K| up to {_g(c['k_scale'])})",
             f"   max change of cached keys while appending    {_g(c['cached_keys_max_change'])}", "",
             f"2. only relative position matters ({rel['tokens']} tokens at 0 vs at p; layer-0 |score| up to "
             f"{_g(rel['layer0_score_scale'])}, |logit| up to {_g(rel['logits_scale'])})",
             "   p        layer-0 score diff   logits diff   same top-1"]
    for row in rel["rows"]:
        lines.append(f"   {row['offset']:<8} {_g(row['layer0_score_max_abs_diff']):<20} "
                     f"{_g(row['logits_max_abs_diff']):<13} {row['top1_agreement']:.1%}")
    lines += ["", f"3. moving a cached prefix of {mv['tokens']} tokens by delta",
              "   delta    rotate vs recompute: layer 0   all layers   rotate ms   recompute ms  (best of 9 / 3)"]
    for row in mv["rows"]:
        lines.append(f"   {row['delta']:<8} {_g(row['layer0_max_abs_diff']):<29} "
                     f"{_g(row['all_layers_max_abs_diff']):<12} {_g(row['rotate_ms']):<11} {_g(row['recompute_ms'])}")
    d = mv["drop"]
    per = d["k_relative_error_per_layer"]
    picks = sorted({0, 1, len(per) // 2, len(per) - 1})
    lines.append(f"   context shift (keep {d['keep']}, drop {d['dropped']}, rotate the rest back): relative K "
                 f"error vs recompute: " + ", ".join(f"layer {i} {_g(per[i])}" for i in picks))
    lines += ["", "4. the other families (small random models, same weights but the position part)",
              f"   {'':42}{'rope':<18}{'absolute':<18}{'t5 bias':<18}"]

    def row(label, fn):
        lines.append(f"   {label:<42}" + "".join(f"{fn(fam[k]):<18}" for k in FAMILIES))

    row("cache == recompute: max |dK|", lambda f: _g(f["cache_vs_recompute_max_abs_diff_k"]))
    row("cached keys change while appending", lambda f: _g(f["cached_keys_max_change"]))
    for i, p in enumerate(x["offset"] for x in fam["rope"]["relative"]):
        row(f"text at 0 vs {p}: logits diff", lambda f, i=i: _g(f["relative"][i]["logits_max_abs_diff"])
            if f["relative"][i].get("representable", True) else "unrepresentable")
    row(f"move cached prefix by {fam['rope']['move']['delta']}: how",
        lambda f: {"rotate keys": "rotate", "nothing to do": "nothing", }.get(f["move"]["method"], "recompute"))
    row("  continuation logits diff (reusing it)", lambda f: _g(f["move"]["continuation_logits_max_abs_diff"]))
    row("  move ms / recompute ms", lambda f: f"{_g(f['move']['move_ms'])} / {_g(f['move']['recompute_ms'])}")
    steps = r["decode_step_us"]
    for ctx in steps["rope"]:
        row(f"attention step us (best), ctx {ctx}", lambda f, ctx=ctx: _g(steps[f["kind"]][ctx])
            + (f" (bias {_g(steps['t5_bias_only'][ctx])})" if f["kind"] == "t5" else ""))
    t5 = fam["t5"]["t5"]
    row("distances told apart", lambda f: "all" if f["kind"] == "rope" else
        f"< {f['position_table']} (table)" if f["kind"] == "absolute" else f"< {t5['first_distance_in_last_bucket']}")
    lines += ["", "curve spread (max gap between offsets at one distance; 0 = only relative position matters): "
              + ", ".join(f"{k}: {_g(v)}" for k, v in r["curve_spread"].items())]
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    lines.append(f"({r['seconds']:.1f} s)")
    return "\n".join(lines)
