"""Model versions published as LoRA adapters, and the weights they stand for.

A LoRA align job publishes its adapter (`adapter_model.safetensors` + `adapter_config.json`, PEFT's
format) instead of a merged copy of the whole model: a few MB per version instead of the model's
size. The version folder also holds the parent's config.json and tokenizer files, so everything
that reads a model folder's config or tokenizer works unchanged. Its manifest (server/registry.py)
names the version it was trained on and the sha256 of that version's manifest.json (which holds the
sha256 of every file): `{"adapter": {"base": "v0003", "base_manifest_sha256": "..."}}`. The base
may itself be an adapter, so a version is a chain: a full version (the root) and the adapters
trained one on top of the other.

What this module gives each reader of weights:

- `adapter_chain(dir)`: (root folder, adapter folders oldest first), every link checked (the base
  exists beside the adapter, its manifest has the recorded hash) — a clear error otherwise;
- `hf_tensors(dir)`: the (name, tensor) pairs of the full model the folder stands for — the
  root's tensors with every adapter's `scale * B @ A` added in float32 (the native loader);
- `merge_into(model, dir)`: the same deltas added in place to a loaded transformers model of the
  root (align's trainers and evaluation load versions this way);
- `chain_factors(dir, over)`: the chain's adapters after version `over`, as one set of LoRA
  factors (per-request serving on an engine that holds `over`: server/model/lora.py), and
  `write_peft_adapter` to write such factors as a PEFT folder (vLLM's LoRARequests);
- `write_merged(dir, target)`: a plain HF folder with the merged weights (vLLM, `models export
  --merged`).

Merging in order is exact: the adapter k was trained on the merged weights of the chain before it,
so the weights are W_root + sum_k scale_k B_k A_k. Only plain LoRA on linear layers is accepted
(no DoRA, no bias, no modules_to_save, no per-module rank patterns): anything else is refused
with the field that is not supported.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prefloop.server.errors import FailedPrecondition, NotFound, UnsupportedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"  # the registry's manifest file (server/registry.py MANIFEST_FILE)
PEFT_PREFIX = "base_model.model."


def is_adapter_dir(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def base_version(model_dir: str | os.PathLike) -> str | None:
    """The version an adapter version was trained on (None for full weights); not verified:
    `adapter_chain` checks the link."""
    return _adapter_link(Path(model_dir))["base"] if is_adapter_dir(model_dir) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adapter_link(model_dir: Path) -> dict:
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"adapter {model_dir} has no readable {MANIFEST} naming its base: "
                                 f"{exc}") from None
    link = manifest.get("adapter")
    if not isinstance(link, dict) or not link.get("base") or not link.get("base_manifest_sha256"):
        raise FailedPrecondition(f"adapter {model_dir}: its {MANIFEST} does not name its base "
                                 "version and that version's manifest hash")
    return link


def adapter_chain(model_dir: str | os.PathLike, max_depth: int = 1000) -> tuple[Path, list[Path]]:
    """(the full version at the root, the adapter folders from the root's child to `model_dir`)."""
    here = Path(model_dir)
    adapters: list[Path] = []
    while is_adapter_dir(here):
        if len(adapters) >= max_depth:
            raise FailedPrecondition(f"adapter chain of {model_dir} is longer than {max_depth}")
        link = _adapter_link(here)
        base = here.parent / link["base"]
        if not (base / MANIFEST).is_file():
            raise NotFound(f"adapter {here.name} needs its base version {link['base']}, which is "
                           f"not in {here.parent} (deleted?)")
        if _sha256(base / MANIFEST) != link["base_manifest_sha256"]:
            raise FailedPrecondition(f"adapter {here.name}: its base {link['base']} is not the "
                                     "version it was trained on (manifest hash differs)")
        adapters.append(here)
        here = base
    return here, adapters[::-1]


def read_lora_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked to be plain LoRA this module can merge."""
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"{adapter_dir / ADAPTER_CONFIG}: {exc}") from None
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r}")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            problems.append(key)
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg.get('bias')!r}")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if cfg.get(key):
            problems.append(key)
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        problems.append(f"r {cfg.get('r')!r}")
    if problems:
        raise UnsupportedModel(f"adapter {adapter_dir.name}: only plain LoRA on linear layers can be "
                               f"served; not supported: {', '.join(problems)}")
    return cfg


def lora_scale(cfg: dict) -> float:
    alpha, r = float(cfg.get("lora_alpha", cfg["r"])), cfg["r"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def adapter_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF weight name ("model.layers.0.self_attn.q_proj.weight") -> (A [r, in], scale * B
    [out, r]) in float32: the adapter's update is B @ A (per-request serving: server/model/lora.py)."""
    adapter_dir = Path(adapter_dir)
    scale = lora_scale(read_lora_config(adapter_dir))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            module, _, rest = key.removeprefix(PEFT_PREFIX).partition(".lora_")
            if rest not in ("A.weight", "B.weight"):
                raise UnsupportedModel(f"adapter {adapter_dir.name}: unexpected tensor {key!r}")
            pairs.setdefault(module, {})[rest[0]] = f.get_tensor(key).float()
    factors = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UnsupportedModel(f"adapter {adapter_dir.name}: {module} lacks lora_A or lora_B")
        if ab["B"].shape[1] != ab["A"].shape[0]:
            raise UnsupportedModel(f"adapter {adapter_dir.name}: {module} has lora_A "
                                   f"{tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}")
        factors[f"{module}.weight"] = (ab["A"], ab["B"] * scale)
    return factors


def chain_factors(model_dir: str | os.PathLike, over: str
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The factors that turn the weights of version `over` into those of `model_dir`, for
    serving `model_dir` as one per-request adapter on an engine holding `over`: the adapters of
    the chain after `over`, concatenated along the rank (B1 A1 + B2 A2 = [B1 B2] [A1; A2], exact).
    {} when `model_dir` is `over` itself; None when `over` is not in its chain (another base)."""
    model_dir = Path(model_dir)
    if model_dir.name == over:
        return {}
    root, adapters = adapter_chain(model_dir)
    names = [root.name] + [a.name for a in adapters]
    if over not in names:
        return None
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for adapter_dir in adapters[names.index(over):]:
        for name, ab in adapter_factors(adapter_dir).items():
            parts.setdefault(name, []).append(ab)
    return {name: (torch.cat([a for a, _ in ab]), torch.cat([b for _, b in ab], dim=1))
            for name, ab in parts.items()}


def write_peft_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], folder: Path,
                       dtype: str = "float32") -> None:
    """{HF weight name: (A [r, in], B * scale [out, r])} (`adapter_factors`, `chain_factors`)
    as a PEFT LoRA folder (created if missing) in `dtype` with scale 1 (lora_alpha = r), every
    module padded to one rank with zero rows / columns (exact): what vLLM loads as a LoRARequest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, dtype)
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors, modules = {}, set()
    for name, (a, b) in factors.items():
        module = name.removesuffix(".weight")
        modules.add(module.rsplit(".", 1)[-1])
        short = rank - a.shape[0]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = \
            torch.nn.functional.pad(a, (0, 0, 0, short)).to(target).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = \
            torch.nn.functional.pad(b, (0, short)).to(target).contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(modules),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False}))


def adapter_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """HF weight name -> scale * B @ A in float32."""
    return {name: b @ a for name, (a, b) in adapter_factors(adapter_dir).items()}


def chain_deltas(adapters: list[Path]) -> dict[str, torch.Tensor]:
    """The summed deltas of a chain (float32)."""
    total: dict[str, torch.Tensor] = {}
    for adapter_dir in adapters:
        for name, delta in adapter_deltas(adapter_dir).items():
            total[name] = total[name] + delta if name in total else delta
    return total


def _root_tensors(root: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def hf_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the full model `model_dir` stands for (a full folder: its own tensors)."""
    root, adapters = adapter_chain(model_dir)
    deltas = chain_deltas(adapters)
    for name, tensor in _root_tensors(root):
        delta = deltas.pop(name, None)
        if delta is not None:
            if tuple(delta.shape) != tuple(tensor.shape):
                raise UnsupportedModel(f"adapter delta of {name} has shape {tuple(delta.shape)}, "
                                       f"the base weight {tuple(tensor.shape)}")
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield name, tensor
    if deltas:
        raise UnsupportedModel(f"adapters of {Path(model_dir).name} change weights the base "
                               f"{root.name} does not have: {sorted(deltas)[:3]}")


def merge_into(model: torch.nn.Module, model_dir: str | os.PathLike) -> torch.nn.Module:
    """Add the deltas of `model_dir`'s adapter chain to `model` (loaded from the chain's root)."""
    _, adapters = adapter_chain(model_dir)
    if not adapters:
        return model
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in chain_deltas(adapters).items():
            param = weights.get(name)
            if param is None or tuple(param.shape) != tuple(delta.shape):
                raise UnsupportedModel(f"adapter of {Path(model_dir).name} does not fit the model: "
                                       f"{name}")
            param.add_(delta.to(param.dtype))
    return model


def root_dir(model_dir: str | os.PathLike) -> Path:
    """The folder whose weights a transformers model is loaded from before `merge_into`."""
    return adapter_chain(model_dir)[0]


def write_merged(model_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A plain HF folder at `target` (created whole or not at all; it must not exist yet) with the
    merged weights, the version's config and tokenizer files; no manifest and no adapter files."""
    model_dir, target = Path(model_dir), Path(target)
    if target.exists():
        raise FailedPrecondition(f"{target} already exists")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({name: t.contiguous() for name, t in hf_tensors(model_dir)},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for p in model_dir.iterdir():
            if p.is_file() and p.name not in _NOT_MERGED and not p.name.endswith(".safetensors"):
                shutil.copyfile(p, tmp / p.name)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_NOT_MERGED = (ADAPTER_CONFIG, MANIFEST, "model.safetensors.index.json")
MERGED_DIR = "merged"  # <registry>/merged/<version>-<manifest hash>: merged copies for vLLM


def full_model_dir(model_dir: str | os.PathLike) -> Path:
    """`model_dir` itself when it holds full weights; for an adapter version, a merged copy
    beside the registry's versions (`<registry>/merged/vNNNN-<hash>`, written once, reused; removed
    with the version) — for readers that need a plain folder (vLLM loads weights from a path)."""
    model_dir = Path(model_dir)
    if not is_adapter_dir(model_dir):
        return model_dir
    key = _sha256(model_dir / MANIFEST)[:12]
    target = model_dir.parent.parent / MERGED_DIR / f"{model_dir.name}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_merged(model_dir, target)
    except FailedPrecondition:
        if (target / "model.safetensors").is_file():  # another process wrote it meanwhile
            return target
        raise
