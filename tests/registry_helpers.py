"""Helpers for tests that swap registry versions under load (native and vLLM hot-swap tests)."""
from __future__ import annotations

import threading

import torch
from conftest import USER_TOKEN, wait_until
from safetensors.torch import load_file, save_file

from prefloop.clients import Client
from prefloop.clients.errors import ClientError
from prefloop.server.model.loader import resolve_model_dir
from prefloop.server.registry import Registry

QUESTION = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 12


def two_version_registry(tmp) -> tuple[Registry, str]:
    """A registry in `tmp/data` with the default model as v0000 and a perturbed child of it."""
    registry = Registry(tmp / "data")
    registry.ensure_base(resolve_model_dir(None))
    return registry, publish_perturbed(registry, "v0000")


def publish_perturbed(registry: Registry, parent: str) -> str:
    """A new policy version whose greedy answers differ from the parent's (perturbed final norm
    and embedding)."""
    src = registry.version_dir(parent)
    with registry.stage() as stage:
        for f in src.iterdir():
            if f.name not in ("manifest.json", "model.safetensors"):
                stage.path.joinpath(f.name).write_bytes(f.read_bytes())
        tensors = load_file(src / "model.safetensors")
        torch.manual_seed(0)
        # the final norm and the (tied) embedding: a swap must carry both into the LM head
        for name, scale in (("model.norm.weight", 0.5), ("model.embed_tokens.weight", 0.3)):
            tensors[name] = tensors[name] * (1 + scale * torch.randn_like(tensors[name]))
        save_file(tensors, stage.path / "model.safetensors", metadata={"format": "pt"})
        manifest = stage.publish(kind="policy", method="test-perturbed", parent=parent)
    return manifest.version


class Streamers:
    """16 clients streaming greedy chats back to back until stopped; every outcome is kept."""

    def __init__(self, target: str, n: int = 16):
        self.target, self.n = target, n
        self.results: list[tuple[str, str]] = []  # (model_version, text)
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        with Client(self.target, token=USER_TOKEN, timeout=120) as client:
            while not self.stop.is_set():
                try:
                    text, version = [], set()
                    for chunk in client.chat_stream(QUESTION, max_tokens=MAX_TOKENS, temperature=0):
                        text.append(chunk.text_delta)
                        version.add(chunk.model_version)
                    assert len(version) == 1, f"one request named several versions: {version}"
                    self.results.append((version.pop(), "".join(text)))
                except (ClientError, AssertionError) as exc:
                    self.failures.append(repr(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def swap_under_load(target: str, swap, n: int = 16, timeout: float = 120.0):
    """Stream with `n` clients; once `n` answers are in call `swap()`, then keep streaming until
    `n` more are. Returns (what swap() returned, the Streamers with every outcome)."""
    with Streamers(target, n) as load:
        assert wait_until(lambda: len(load.results) >= n, timeout=timeout)
        out = swap()
        at_swap = len(load.results)
        assert wait_until(lambda: len(load.results) >= at_swap + n, timeout=timeout)
    return out, load


def assert_each_answer_from_its_version(load: Streamers, expected: dict[str, str], final: str) -> None:
    """No request failed, every answer equals the oracle's answer for the version it names, both
    versions answered and the last answer came from `final`."""
    assert load.failures == []
    for version, text in load.results:
        assert text == expected[version], version
    assert len({v for v, _ in load.results}) == 2 and load.results[-1][0] == final
