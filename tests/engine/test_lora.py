"""Per-request LoRA adapters in the native engine (server/model/lora.py): in one batch, a
sequence on an adapter decodes exactly what the merged model decodes alone, a sequence on the
base what the base decodes alone; the prefix cache never shares blocks across adapters."""
from __future__ import annotations

import pytest
from adapter_helpers import publish_random_adapter
from tiny_models import save_tiny

from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import InvalidArgument, UnsupportedModel
from prefloop.server.model import adapters, lora
from prefloop.server.model.loader import load_model
from prefloop.server.registry import Registry

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 5, 9, 3, 7, 2, 11, 4, 6], [8, 3, 3, 1, 12, 40], [2, 2, 7]]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    registry = Registry(tmp / "data")
    registry.ensure_base(save_tiny(tmp / "tiny", "llama"))
    v1, _ = publish_random_adapter(registry, "v0000", seed=1)
    return registry, v1


def _engine(model) -> LLMEngine:
    return LLMEngine(model, KVCacheConfig(block_size=4, capacity_tokens=512))


def _alone(model_dir) -> list[list[int]]:
    engine = _engine(load_model(model_dir))
    out = engine.generate({str(i): (p, GREEDY) for i, p in enumerate(PROMPTS)})
    return [out[str(i)][0] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("path", ["native", "torch"])
def test_mixed_batch_decodes_each_sequence_as_its_own_model(versions, path):
    registry, v1 = versions
    base_alone = _alone(registry.version_dir("v0000"))
    merged_alone = _alone(registry.version_dir(v1))  # the loader merges the adapter
    assert base_alone != merged_alone  # the adapter changes the answers
    engine = _engine(load_model(registry.version_dir("v0000")))
    lora.enable(engine.model, use_kernel=path == "native")  # the update path of these steps
    adapter = engine.add_adapter(adapters.adapter_factors(registry.version_dir(v1)))
    for i, prompt in enumerate(PROMPTS):  # every prompt twice in one batch: base and adapter
        engine.add_request(f"base-{i}", prompt, GREEDY)
        engine.add_request(f"lora-{i}", prompt, GREEDY, adapter=adapter)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [done[f"base-{i}"] for i in range(len(PROMPTS))] == base_alone
    assert [done[f"lora-{i}"] for i in range(len(PROMPTS))] == merged_alone


def test_prefix_cache_blocks_are_not_shared_between_base_and_adapter(versions):
    registry, v1 = versions
    engine = _engine(load_model(registry.version_dir("v0000")))
    adapter = engine.add_adapter(adapters.adapter_factors(registry.version_dir(v1)))
    prompt = PROMPTS[0]  # two full blocks of 4 tokens
    first = engine.generate({"a": (prompt, GREEDY)})["a"][0]
    hits = engine.blocks.stats.prefix_cache_hit_tokens
    engine.add_request("b", prompt, GREEDY, adapter=adapter)
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert engine.blocks.stats.prefix_cache_hit_tokens == hits  # no base blocks reused
    assert tokens == _alone(registry.version_dir(v1))[0] != first
    engine.add_request("c", prompt, GREEDY, adapter=adapter)  # same adapter: reused
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.stats.prefix_cache_hit_tokens == hits + 8


def test_an_unknown_or_removed_adapter_is_refused_and_compiled_models_cannot_take_one(versions):
    registry, v1 = versions
    model = load_model(registry.version_dir("v0000"))
    engine = _engine(model)
    adapter = engine.add_adapter(adapters.adapter_factors(registry.version_dir(v1)))
    engine.remove_adapter(adapter)
    with pytest.raises(InvalidArgument, match="not loaded"):
        engine.add_request("x", PROMPTS[0], GREEDY, adapter=adapter)
    assert engine.add_adapter(adapters.adapter_factors(registry.version_dir(v1))) != adapter
    model._step = object()  # as compile_step() leaves it
    with pytest.raises(UnsupportedModel, match="without --compile"):
        lora.enable(model)


def test_two_adapters_and_the_base_in_one_batch_each_decode_as_their_own_model(versions):
    registry, v1 = versions
    v2, _ = publish_random_adapter(registry, "v0000", seed=2)
    alone = {v: _alone(registry.version_dir(v)) for v in ("v0000", v1, v2)}
    assert alone[v1] != alone[v2]
    engine = _engine(load_model(registry.version_dir("v0000")))
    ids = {"v0000": 0, v1: engine.add_adapter(adapters.adapter_factors(registry.version_dir(v1))),
           v2: engine.add_adapter(adapters.adapter_factors(registry.version_dir(v2)))}
    for i, prompt in enumerate(PROMPTS):
        for version, adapter in ids.items():
            engine.add_request(f"{version}-{i}", prompt, GREEDY, adapter=adapter)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    for version in ids:
        assert [done[f"{version}-{i}"] for i in range(len(PROMPTS))] == alone[version], version
    if lora.native_kernel("cpu") is not None:  # these steps ran the native update
        wrapped = [m for m in engine.model.modules() if isinstance(m, lora.LoraLinear)]
        assert wrapped and all(m.kernel is not None for m in wrapped)


def test_adding_an_adapter_builds_its_kernel_stacks_and_rows_in_any_order_share_them(versions):
    """The native update's stacked factors are made when an adapter is added (alone, and beside
    each adapter already loaded: an A/B test of two adapter versions), not on the first step that
    uses them; a step's adapters are a set, so rows [v2, v1] use the stack of [v1, v2]."""
    _update_path("native")
    registry, v1 = versions
    v2, _ = publish_random_adapter(registry, "v0000", seed=3)
    engine = _engine(load_model(registry.version_dir("v0000")))
    a1, a2 = (engine.add_adapter(adapters.adapter_factors(registry.version_dir(v))) for v in (v1, v2))
    assert lora.StepAdapters.of([a2, 0, a1]).ids == lora.StepAdapters.of([a1, a2]).ids == (a1, a2)
    wrapped = [m for m in engine.model.modules() if isinstance(m, lora.LoraLinear)]
    expected = {((a1,), False), ((a2,), False), ((a1, a2), False)}  # float32 model: no bf16 pairs
    assert wrapped and all(set(m._kernel_stacks) == expected for m in wrapped)
    built = {id(m): {k: v[0] for k, v in m._kernel_stacks.items()} for m in wrapped}
    for i, prompt in enumerate(PROMPTS):  # v2's rows first: the same set of adapters
        engine.add_request(f"b-{i}", prompt, GREEDY, adapter=a2)
        engine.add_request(f"a-{i}", prompt, GREEDY, adapter=a1)
    while engine.has_unfinished():
        engine.step()
    for m in wrapped:  # the steps used the stacks made at add time, made nothing new
        assert set(m._kernel_stacks) == expected
        assert all(m._kernel_stacks[k][0] is t for k, t in built[id(m)].items())


def _update_path(name: str):
    """The kernel argument of a LoraLinear for one update path: torch ops, or the native kernel
    (skipped where it cannot be built)."""
    if name == "torch":
        return None
    kernel = lora.native_kernel("cpu")
    if kernel is None:
        pytest.skip("the native kernel library cannot be built here")
    return kernel


@pytest.mark.parametrize("path", ["torch", "native"])
def test_the_masked_update_of_mixed_rows_equals_each_rows_own_low_rank_update(path):
    """Rows on three adapters of different ranks and on none: the update of the stacked factors
    (torch: one masked matmul; native: one kernel call over column ranges) gives every row
    exactly x @ A_i.T @ B_i.T of its own adapter (closed form, per row)."""
    import torch

    from prefloop.server.model.attention import AttentionMetadata
    from prefloop.server.model.step_context import step_context

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=False)
    layer = lora.LoraLinear(base, _update_path(path))
    factors = {7: (torch.randn(2, 16), torch.randn(24, 2)), 9: (torch.randn(4, 16), torch.randn(24, 4)),
               11: (torch.randn(1, 16), torch.randn(24, 1))}
    for i, f in factors.items():
        layer.set_adapter(i, f)
    row_adapters = [7, 0, 9, 9, 11, 7, 0, 42]  # 42: not loaded in this layer: the plain weights
    x = torch.randn(len(row_adapters), 16)
    meta = AttentionMetadata(slot_mapping=None, num_decode=0, decode_block_tables=None,
                             decode_ctx_lens=None, decode_mask=None, prefills=[],
                             adapter_rows=lora.StepAdapters.of(row_adapters))
    with step_context([], meta):
        y = layer(x)
    expected = base(x)
    for row, adapter in enumerate(row_adapters):
        if adapter in factors:
            a, b = factors[adapter]
            expected[row] += x[row] @ a.T @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert lora.StepAdapters.of([0, 0]) is None
    assert lora.StepAdapters.of([7, 7]).every_row == 7


@pytest.mark.parametrize("path", ["torch", "native"])
def test_a_bfloat16_projection_adds_the_update_of_its_rows_and_stays_bfloat16(path):
    import torch

    from prefloop.server.model.attention import AttentionMetadata
    from prefloop.server.model.step_context import step_context

    torch.manual_seed(1)
    base = torch.nn.Linear(16, 24, bias=False).to(torch.bfloat16)
    layer = lora.LoraLinear(base, _update_path(path))
    a, b = torch.randn(4, 16), torch.randn(24, 4)
    layer.set_adapter(3, (a, b))
    for rows in ([3] * 5, [3, 0, 3, 0, 0], [3] * 20, [3, 0] * 10):  # float32 / bfloat16 update
        x = torch.randn(len(rows), 16).to(torch.bfloat16)
        meta = AttentionMetadata(slot_mapping=None, num_decode=0, decode_block_tables=None,
                                 decode_ctx_lens=None, decode_mask=None, prefills=[],
                                 adapter_rows=lora.StepAdapters.of(rows))
        with step_context([], meta):
            y = layer(x)
        assert y.dtype == torch.bfloat16 and layer.adapters[3][0].dtype == torch.float32
        update = (x.float() @ a.T @ b.T) * torch.tensor(rows, dtype=torch.float32)[:, None] / 3
        expected = base(x).float() + update  # bfloat16 rounding of sums of this size: ~1 %
        torch.testing.assert_close(y.float(), expected, rtol=2e-2,
                                   atol=0.01 * float(expected.abs().max()))


@pytest.mark.parametrize("form", ["float32", "bfloat16", "bfloat16 pairs"])
@pytest.mark.parametrize("rows,features,ranks", [
    (1, (16, 24), [3]),  # one row, outputs not a whole vector, an odd rank (padded for pairs)
    (3, (15, 40), [4]),  # odd inputs: no rank pairs (the float32 form instead)
    (40, (300, 200), [70, 33]),  # a rank over 64 columns, two output blocks and a tail
    (64, (576, 960), [48, 16]),  # the default model's fused q/k/v at the kernel's row limit
    (64, (1536, 3072), [64, 64]),  # enough work for both phases to run on several threads
])
def test_the_native_update_equals_the_float_reference_at_odd_shapes(form, rows, features, ranks):
    """A LoraLinear on the native kernel against float64 arithmetic: every row gets
    x @ A_i.T @ B_i.T of its own adapter, rows on none unchanged; B has whole zero blocks (as the
    fused q/k/v's block-diagonal B has, which the kernel skips). float32 exact to rounding;
    bfloat16 (float32 factors, or bfloat16 rank pairs) within bfloat16 rounding."""
    import random

    import torch

    from prefloop.server.model.attention import AttentionMetadata
    from prefloop.server.model.step_context import step_context

    kernel = _update_path("native")
    dt = torch.float32 if form == "float32" else torch.bfloat16
    torch.manual_seed(rows)
    rng = random.Random(rows)
    fin, fout = features
    base = torch.nn.Linear(fin, fout, bias=False).to(dt)
    layer = lora.LoraLinear(base, kernel)
    layer.pairs = layer.pairs and form == "bfloat16 pairs"
    if form == "bfloat16 pairs" and not layer.pairs:
        pytest.skip("this CPU has no AVX512_BF16")
    factors = {}
    for k, rank in enumerate(ranks, start=1):  # updates about as large as the base output
        a, b = torch.randn(rank, fin), torch.randn(fout, rank) / (fin * rank) ** 0.5
        b[: min(128, fout // 2), : rank // 2] = 0  # zero blocks of B.T rows
        factors[k] = (a, b)
        layer.set_adapter(k, (a, b))
    owner = [rng.randrange(len(ranks) + 1) for _ in range(rows)]  # 0: the plain weights
    owner[0] = 1  # at least one row on an adapter
    x = torch.randn(rows, fin).to(dt)
    meta = AttentionMetadata(slot_mapping=None, num_decode=0, decode_block_tables=None,
                             decode_ctx_lens=None, decode_mask=None, prefills=[],
                             adapter_rows=lora.StepAdapters.of(owner))
    with step_context([], meta):
        out = layer(x)
    plain = base(x)
    expected = plain.double().clone()
    for i, o in enumerate(owner):
        if o:
            a, b = factors[o]
            expected[i] += x[i].double() @ a.T.double() @ b.T.double()
    assert out.dtype == dt
    unchanged = [i for i, o in enumerate(owner) if o == 0]
    assert torch.equal(out[unchanged], plain[unchanged])
    scale = float(expected.abs().max())
    tol = {"float32": 1e-6, "bfloat16": 0.008, "bfloat16 pairs": 0.02}[form] * scale
    assert tol < 0.5 * float(plain.abs().mean())  # losing the base output would show
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


def test_the_native_update_refuses_a_column_range_outside_the_stacked_factors():
    import torch

    kernel = _update_path("native")
    y, x = torch.zeros(2, 8), torch.zeros(2, 4)
    at, bt = torch.zeros(4, 3), torch.zeros(3, 8)
    with pytest.raises(RuntimeError, match="not a range"):
        kernel(y, x, at, bt, torch.tensor([[0, 3], [2, 4]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="do not map"):
        kernel(y, x, torch.zeros(5, 3), bt, torch.tensor([[0, 3], [0, 0]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="live must be"):
        kernel(y, x, at, bt, torch.tensor([[0, 3], [0, 0]], dtype=torch.int32),
               torch.ones(3, 2, dtype=torch.uint8))  # 8 outputs: one block, not two


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_an_adapter_over_a_quantized_projection_adds_its_update_to_the_quantized_output(quantize):
    """`--quantize` and adapter versions together: the update goes on top of whatever the
    quantized base computes (its integer-dot kernel where the CPU has one), rows without an
    adapter get exactly the quantized base's output."""
    import torch

    from prefloop.server.model.attention import AttentionMetadata
    from prefloop.server.model.int4 import Int4Linear
    from prefloop.server.model.quantize import Int8Linear
    from prefloop.server.model.step_context import step_context

    torch.manual_seed(2)
    base = (Int4Linear if quantize == "int4" else Int8Linear)(
        torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16))
    layer = lora.LoraLinear(base, _update_path("native"))
    a, b = torch.randn(4, 64), torch.randn(48, 4)
    layer.set_adapter(5, (a, b))
    rows = [5, 0, 5]
    x = torch.randn(len(rows), 64).to(torch.bfloat16)
    meta = AttentionMetadata(slot_mapping=None, num_decode=0, decode_block_tables=None,
                             decode_ctx_lens=None, decode_mask=None, prefills=[],
                             adapter_rows=lora.StepAdapters.of(rows))
    with step_context([], meta):
        y = layer(x)
    plain = base(x)
    assert torch.equal(y[1], plain[1])  # the row on the plain weights
    update = (x.float() @ a.T @ b.T)[[0, 2]]
    torch.testing.assert_close(y[[0, 2]].float(), plain[[0, 2]].float() + update, rtol=2e-2,
                               atol=0.01 * float(update.abs().max()))
