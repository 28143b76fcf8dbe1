"""--model resolution: HF folders, GGUF files, and clear refusals for everything else."""
import json
import shutil

import pytest
from tiny_models import save_tiny

from prefloop.server.errors import UnsupportedModel
from prefloop.server.model.default_model import default_gguf_path
from prefloop.server.model.loader import load_model, resolve_model_dir


def test_unknown_path_names_what_is_supported(tmp_path):
    with pytest.raises(UnsupportedModel, match="Llama-family"):
        resolve_model_dir(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedModel, match="gguf"):
        resolve_model_dir(tmp_path / "weights.bin")


def test_unsupported_architecture_refused(tmp_path):
    d = save_tiny(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel.*supported"):
        load_model(resolve_model_dir(d))


def test_missing_weight_refused(tmp_path):
    d = save_tiny(tmp_path / "m")
    from safetensors.torch import load_file, save_file
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModel, match="missing weights"):
        load_model(d)


@pytest.mark.slow
def test_gguf_file_is_converted_once_into_the_cache(tmp_path):
    gguf = tmp_path / "copy.gguf"
    shutil.copy(default_gguf_path(), gguf)
    d = resolve_model_dir(gguf, cache_dir=tmp_path / "cache")
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    assert resolve_model_dir(gguf, cache_dir=tmp_path / "cache") == d  # second use: no conversion
    model = load_model(d)
    assert model.config.num_layers == 30 and model.config.num_kv_heads == 3
