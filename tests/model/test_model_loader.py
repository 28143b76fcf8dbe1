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


def _tiny_with_tokenizer(path):
    d = save_tiny(path)
    src = resolve_model_dir(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, d / name)
    (d / "generation_config.json").unlink(missing_ok=True)
    return d


def test_sampling_defaults_come_from_generation_config(tmp_path):
    from prefloop.server.model.config import read_sampling_defaults
    assert read_sampling_defaults(tmp_path) == {}  # no file
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": True}))
    assert read_sampling_defaults(tmp_path) == {}  # a file without sampling values
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.2, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "max_length": 9}))
    assert read_sampling_defaults(tmp_path) == {"temperature": 0.2, "top_p": 0.9, "top_k": 50,
                                                "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "do_sample": False}))
    assert read_sampling_defaults(tmp_path) == {"temperature": 0.0}  # greedy, as transformers reads it
    # a penalty alone beside do_sample false (as some saved configs carry it) asks for no greedy
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 1.2, "do_sample": False}))
    assert read_sampling_defaults(tmp_path) == {"repetition_penalty": 1.2}


def test_model_info_reports_the_checkpoints_sampling_defaults(tmp_path):
    import asyncio

    from prefloop.server.serving.build import build_generator
    d = _tiny_with_tokenizer(tmp_path / "m")
    kwargs = dict(model=str(d), dtype="float32", kv_cache_tokens=256, attention="sdpa")
    gen = build_generator(**kwargs)
    assert gen.info.sampling_defaults == {}
    asyncio.run(gen.close())
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    gen = build_generator(**kwargs)
    assert gen.info.sampling_defaults == {"temperature": 0.6, "top_p": 0.95}
    assert gen.info.dtype == "float32"
    asyncio.run(gen.close())
