"""The names of the model-loading options, torch-free, so the CLI can build its parser and check
what needs no model before torch is imported: `--dtype`, `--attention`, `--weight-layout`, and the
`--model` path check (`check_model_path`), plus the CPU's native-bf16 test behind `--dtype auto`."""
from __future__ import annotations

import os
from pathlib import Path

from prefloop.server.errors import UnsupportedModel
from prefloop.server.model.config import SUPPORTED_TEXT

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
ATTENTION_CHOICES = ("auto", "native", "sdpa")
LAYOUT_CHOICES = ("auto", "packed", "plain")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bf16 dot products


def check_model_path(model: str | os.PathLike | None) -> Path | None:
    """The `--model` argument as a path (None = the embedded default), or UnsupportedModel naming
    what is wrong: missing, a file that is not .gguf, a folder without config.json or weights."""
    if model is None or str(model) == "":
        return None
    path = Path(model).expanduser()
    if not path.exists():
        raise UnsupportedModel(f"model path {str(path)!r} does not exist; expected {SUPPORTED_TEXT}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnsupportedModel(f"{path} is not a .gguf file or a folder; expected {SUPPORTED_TEXT}")
        return path
    if not (path / "config.json").is_file():
        raise UnsupportedModel(f"{path} has no config.json; expected {SUPPORTED_TEXT}")
    if not list(path.glob("*.safetensors")):
        raise UnsupportedModel(f"{path} has no *.safetensors weights; expected {SUPPORTED_TEXT}")
    return path


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags this CPU reports (empty: bf16 would be emulated, slower than fp32)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]


def auto_dtype(device: str, cuda_available: bool = False,
               cpuinfo: str | None = None) -> tuple[str, str]:
    """What `--dtype auto` means here, and why: bfloat16 on CUDA or on a CPU with native bf16
    (AVX512-BF16 / AMX), float32 elsewhere."""
    if device == "cuda" or cuda_available:
        return "bfloat16", "CUDA device"
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return "bfloat16", f"this CPU has native bf16 ({', '.join(flags)})"
    return "float32", "this CPU has no native bf16 (no avx512_bf16 / amx_bf16)"
