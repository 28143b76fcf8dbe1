"""Shared by the A/B tests and the clients' A/B tests: a registry with a base and one candidate
(fake weights, files only), and a fake generator per version that an A/B router can load beside
another."""
from __future__ import annotations

from conftest import FakeGenerator, FakeInfo, fake_model

from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.registry import Registry


def two_versions(tmp_path, gate_passed: bool | None = True) -> tuple[Registry, str]:
    registry = Registry(tmp_path / "data")
    registry.ensure_base(fake_model(tmp_path / "base"))
    src = fake_model(tmp_path / "cand", b"weights-1")
    with registry.stage() as stage:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (stage.path / name).write_bytes((tmp_path / "cand" / name).read_bytes())
        gate = None if gate_passed is None else {"passed": gate_passed, "reasons": ["test"]}
        manifest = stage.publish(kind="policy", method="test", parent="v0000", gate=gate)
    assert src
    return registry, manifest.version


def one_answer_each(tmp_path, candidate: str) -> FeedbackStore:
    """An open feedback store under `tmp_path / "data"` holding one answer of each version to
    one prompt: "c" by `candidate`, "k" by v0000 (what compare votes refer to)."""
    store = FeedbackStore(StoreConfig(data_dir=tmp_path / "data"))
    store.record_generation({"response_id": "c", "prompt": "p", "completion": "x",
                             "model_version": candidate})
    store.record_generation({"response_id": "k", "prompt": "p", "completion": "y",
                             "model_version": "v0000"})
    store.flush()
    return store


class VersionedFake(FakeGenerator):
    """A fake generator per version; `load_beside` gives another one (an A/B candidate)."""

    def __init__(self, version: str, word: str) -> None:
        super().__init__(step_s=0.002)
        self.info = FakeInfo(model_version=version)
        self.word = word

    @property
    def active_requests(self) -> int:
        return len(self.running)

    async def load_beside(self, model_dir, version: str):
        return VersionedFake(version, "cand")

    async def stream(self, request_id, prompt_ids, params):
        async for delta in super().stream(request_id, prompt_ids, params):
            delta.text_delta = f" {self.word}{delta.completion_tokens}"
            delta.model_version = self.info.model_version
            yield delta
