"""Versions published as LoRA adapters (server/model/adapters.py): what the native loader, the
trainers' loader and the merged copy make of an adapter chain, checked against PEFT's own
`merge_and_unload` on the same tiny model; the registry's links, protection and refusals."""
from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import publish_random_adapter
from tiny_models import save_tiny

from prefloop.align.train.common import load_causal_lm
from prefloop.server.errors import FailedPrecondition, NotFound, UnsupportedModel
from prefloop.server.model import adapters
from prefloop.server.model.loader import load_model
from prefloop.server.registry import Registry


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """v0000 (a tiny full Llama), v0001 an adapter over it, v0002 an adapter over v0001."""
    tmp = tmp_path_factory.mktemp("adapters")
    registry = Registry(tmp / "data")
    registry.ensure_base(save_tiny(tmp / "tiny", "llama"))
    v1, merged1 = publish_random_adapter(registry, "v0000", seed=1)
    v2, merged2 = publish_random_adapter(registry, v1, seed=2)
    return registry, {v1: merged1, v2: merged2}


def _weights_equal(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        if name in ref:
            torch.testing.assert_close(tensor, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_adapter_version_records_its_base_and_is_much_smaller(chain):
    registry, _ = chain
    m = registry.manifest("v0001")
    assert m.format == "adapter" and m.adapter["base"] == "v0000" == m.parent
    assert "adapter_model.safetensors" in m.files and "model.safetensors" not in m.files
    assert registry.manifest("v0000").format == "full"
    assert registry.verify("v0001").ok
    assert registry.adapter_bases("v0002") == ["v0001", "v0000"]


def test_the_trainers_loader_gives_peft_merge_of_the_whole_chain(chain):
    registry, merged = chain
    for version, reference in merged.items():
        _weights_equal(load_causal_lm(registry.version_dir(version)), reference)


def test_the_native_engine_loads_an_adapter_chain_as_the_merged_model(chain):
    registry, merged = chain
    ours = load_model(registry.version_dir("v0002"), dtype="float32")
    reference = merged["v0002"]
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        want = reference(ids).logits[0, -1]
        full = load_model(registry.version_dir("v0000"), dtype="float32")
        base_logits = _native_logits(full, ids[0])
        got = _native_logits(ours, ids[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - base_logits).abs().max() > 1e-3  # the adapters changed the answer


def _native_logits(model, ids: torch.Tensor) -> torch.Tensor:
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.llm_engine import LLMEngine
    from prefloop.server.engine.sampling_params import SamplingParams

    engine = LLMEngine(model, KVCacheConfig(block_size=4, capacity_tokens=64))
    logits = []
    real = engine.runner.execute

    def execute(batch):
        ordered, out = real(batch)
        logits.append(out.clone())
        return ordered, out
    engine.runner.execute = execute
    engine.generate({"r": (ids.tolist(), SamplingParams(temperature=0, max_tokens=1,
                                                         ignore_eos=True))})
    return logits[0][-1]


def test_the_merged_copy_is_a_plain_folder_of_the_merged_weights(chain, tmp_path):
    from transformers import AutoModelForCausalLM

    registry, merged = chain
    folder = adapters.write_merged(registry.version_dir("v0002"), tmp_path / "merged")
    assert not (folder / "adapter_config.json").exists() and (folder / "config.json").is_file()
    _weights_equal(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                   merged["v0002"])
    again = adapters.full_model_dir(registry.version_dir("v0002"))  # vLLM's cached copy
    assert again.parent.name == "merged" and again == adapters.full_model_dir(
        registry.version_dir("v0002"))
    assert adapters.full_model_dir(registry.version_dir("v0000")) == registry.version_dir("v0000")


def test_a_base_cannot_be_deleted_or_pruned_while_an_adapter_needs_it(chain):
    registry, _ = chain
    with pytest.raises(FailedPrecondition, match="base of adapter v0002"):
        registry.delete_version("v0001")
    assert "v0001" not in registry.prune_plan(keep=1)  # v0002 is kept, so its bases are
    assert "v0000" not in registry.prune_plan(keep=1)


def _fake_version(root, name, *, adapter_of=None, sha=None):
    d = root / name
    d.mkdir(parents=True)
    link = None if adapter_of is None else {"base": adapter_of, "base_manifest_sha256": sha}
    (d / "manifest.json").write_text(json.dumps({"version": name, "adapter": link}))
    if adapter_of is not None:
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return d


def test_a_chain_with_a_missing_or_changed_base_is_refused_by_name(tmp_path):
    base = _fake_version(tmp_path, "v0000")
    good = adapters._sha256(base / "manifest.json")
    assert adapters.adapter_chain(_fake_version(tmp_path, "v0001", adapter_of="v0000",
                                                sha=good)) == (base, [tmp_path / "v0001"])
    with pytest.raises(FailedPrecondition, match="not the version it was trained on"):
        adapters.adapter_chain(_fake_version(tmp_path, "v0002", adapter_of="v0000", sha="0" * 64))
    with pytest.raises(NotFound, match="needs its base version v0009"):
        adapters.adapter_chain(_fake_version(tmp_path, "v0003", adapter_of="v0009", sha=good))


@pytest.mark.parametrize("field,value", [("use_dora", True), ("bias", "all"),
                                         ("modules_to_save", ["score"]), ("peft_type", "IA3")])
def test_adapters_other_than_plain_lora_are_refused_with_the_field(tmp_path, field, value):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, field: value}))
    with pytest.raises(UnsupportedModel, match=field if field != "peft_type" else "IA3"):
        adapters.read_lora_config(tmp_path)


def test_models_export_writes_a_peft_adapter_and_a_merged_folder(chain, tmp_path, capsys):
    from peft import PeftModel

    from prefloop.cli.main import main

    registry, merged = chain
    data = str(registry.data_dir)
    assert main(["models", "export", "v0001", "--adapter", str(tmp_path / "a"),
                 "--data-dir", data]) == 0
    over_base = PeftModel.from_pretrained(load_causal_lm(registry.version_dir("v0000")),
                                          tmp_path / "a").merge_and_unload()
    _weights_equal(over_base, merged["v0001"])  # PEFT itself applies the exported adapter
    assert main(["models", "export", "v0002", "--adapter", str(tmp_path / "b"),
                 "--data-dir", data]) == 0
    assert "v0001 is itself an adapter" in capsys.readouterr().out
    assert main(["models", "export", "v0000", "--adapter", str(tmp_path / "c"),
                 "--data-dir", data]) == 1
    assert "holds full weights" in capsys.readouterr().err
    assert main(["models", "export", "v0000", "--merged", str(tmp_path / "d"),
                 "--data-dir", data]) == 0
    assert (tmp_path / "d" / "model.safetensors").is_file()
    assert main(["models", "list", "--data-dir", data]) == 0
    listing = capsys.readouterr().out
    assert "+v0000" in listing and "+v0001" in listing and "full" in listing
    assert main(["models", "show", "v0002", "--data-dir", data]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["format"], shown["base"], shown["dtype"]) == ("adapter", "v0001", "float32")
    assert 0 < shown["bytes"] < 2**20  # the tiny model's rank-4 adapter


def test_full_weights_over_an_adapter_chain_are_stored_in_the_roots_dtype(tmp_path):
    """A full fine-tune (or the full version after a long chain) is published in the dtype of
    the weights its chain is rooted in, recorded in its manifest; the job's model is untouched."""
    from prefloop.align.jobs.runner import publish
    from prefloop.server.registry import stored_dtype

    root = save_tiny(tmp_path / "tiny", "llama")
    bf16 = load_causal_lm(root).to(torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    registry = Registry(tmp_path / "data")
    registry.ensure_base(tmp_path / "bf16")
    assert registry.manifest("v0000").dtype == "bfloat16"
    v1, _ = publish_random_adapter(registry, "v0000", seed=1)
    assert registry.manifest(v1).dtype == "float32"  # the adapter's own factors
    trained = load_causal_lm(registry.version_dir("v0000")).float()  # trained in float32
    before = {k: t.clone() for k, t in trained.state_dict().items()}
    common = dict(kind="policy", method="dpo", hyperparameters={}, data={}, metrics={},
                  gate=None, job_id="test")
    v2 = publish(registry, trained, registry.version_dir(v1), parent=v1, **common)
    assert registry.manifest(v2).format == "full"
    assert registry.manifest(v2).dtype == "bfloat16" == stored_dtype(registry.version_dir(v2))
    assert json.loads((registry.version_dir(v2) / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(t, before[k]) and t.dtype == torch.float32
               for k, t in trained.state_dict().items())
    served = load_model(registry.version_dir(v2), dtype="float32")
    assert served is not None
    # a float32 root keeps float32
    registry32 = Registry(tmp_path / "data32")
    registry32.ensure_base(root)
    v = publish(registry32, load_causal_lm(root), root, parent="v0000", **common)
    assert registry32.manifest(v).dtype == "float32"
