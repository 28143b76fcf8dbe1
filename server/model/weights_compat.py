"""check_compatible_weights: may version B's weights be loaded into an engine built for version A?

An in-place reload (vLLM's `reload_weights`) writes into the tensors the engine already holds, so a
version with another architecture or other shapes must be refused *before* the engine is touched.
The check reads config.json and the safetensors headers only (no tensor data), so it is cheap.
"""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from prefloop.server.errors import FailedPrecondition
from prefloop.server.model.config import ModelConfig

_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias")


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} over every *.safetensors file in `model_dir` (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_compatible_weights(serving_dir: Path, new_dir: Path) -> None:
    """Raise FailedPrecondition naming the first difference that makes `new_dir` unloadable into
    an engine serving `serving_dir`."""
    try:
        old_cfg, new_cfg = ModelConfig.from_dir(serving_dir), ModelConfig.from_dir(new_dir)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot read the model config of {new_dir}: {exc}") from exc
    for field in _SHAPE_FIELDS:
        old, new = getattr(old_cfg, field), getattr(new_cfg, field)
        if old != new:
            raise FailedPrecondition(
                f"{new_dir} has {field}={new!r} but the served model has {old!r}; only versions "
                "of the same architecture can be swapped in")
    old_shapes, new_shapes = tensor_shapes(serving_dir), tensor_shapes(new_dir)
    if not new_shapes:
        raise FailedPrecondition(f"{new_dir} has no *.safetensors weights")
    optional = {"lm_head.weight"} if old_cfg.tie_word_embeddings else set()  # tied: may be omitted
    missing = sorted(set(old_shapes) - set(new_shapes) - optional)
    if missing:
        raise FailedPrecondition(f"{new_dir} lacks {len(missing)} weight(s), e.g. {missing[0]!r}")
    for name, shape in new_shapes.items():
        if name in old_shapes and old_shapes[name] != shape:
            raise FailedPrecondition(
                f"{new_dir}: weight {name!r} has shape {list(shape)}, the served model "
                f"{list(old_shapes[name])}")
