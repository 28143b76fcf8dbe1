"""The generated proto modules: up to date with the .proto sources, importable under
prefloop.proto, and with the field semantics the servicers rely on (optional scalars)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prefloop.proto.prefloop.v1 import generation_pb2, models_pb2

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"


@pytest.mark.timeout(120)
def test_generated_modules_are_up_to_date():
    pytest.importorskip("grpc_tools")
    result = subprocess.run([sys.executable, str(PROTO_DIR / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_imports_use_the_installed_package_name():
    for path in (PROTO_DIR / "prefloop" / "v1").glob("*_pb2_grpc.py"):
        text = path.read_text()
        assert "from prefloop.v1 import" not in text
        assert "from prefloop.proto.prefloop.v1 import" in text


def test_optional_scalars_distinguish_zero_from_unset():
    unset = generation_pb2.SamplingParams()
    greedy = generation_pb2.SamplingParams(temperature=0.0, seed=0, max_tokens=0)
    for name in ("temperature", "seed", "max_tokens", "top_p", "top_k", "n",
                 "repetition_penalty", "frequency_penalty", "presence_penalty"):
        assert not unset.HasField(name)
    assert greedy.HasField("temperature") and greedy.HasField("seed")
    decoded = generation_pb2.SamplingParams.FromString(greedy.SerializeToString())
    assert decoded.HasField("temperature") and decoded.temperature == 0.0


def test_every_field_is_documented():
    for source in (PROTO_DIR / "prefloop" / "v1").glob("*.proto"):
        lines = source.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(
                ("//", "syntax", "package", "option", "import"))
            if is_field:
                assert lines[i - 1].strip().startswith("//"), f"{source.name}:{i + 1} {stripped}"


def test_services_exist():
    assert set(generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name) == {
        "Generate", "GenerateStream", "Chat", "ChatStream"}
    assert {"GetModelInfo", "GetEngineStats"} <= set(
        models_pb2.DESCRIPTOR.services_by_name["Models"].methods_by_name)
