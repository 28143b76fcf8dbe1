"""Hot-swap with real processes: a server on a registry, 16 streaming clients during a Promote and
during a Rollback, a pointer moved offline, and a corrupt version refused while the old one serves."""
import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until
from prefloop.clients import Client
from prefloop.clients.errors import ClientError
from prefloop.server.model_loader import resolve_model_dir
from prefloop.server.registry import Registry

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 12


def publish_perturbed(registry: Registry, parent: str) -> str:
    """A new policy version whose greedy answers differ from the parent's (scaled final norm)."""
    src = registry.version_dir(parent)
    with registry.stage() as stage:
        for f in src.iterdir():
            if f.name not in ("manifest.json", "model.safetensors"):
                stage.path.joinpath(f.name).write_bytes(f.read_bytes())
        tensors = load_file(src / "model.safetensors")
        torch.manual_seed(0)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * (
            1 + 0.5 * torch.randn_like(tensors["model.norm.weight"]))
        save_file(tensors, stage.path / "model.safetensors", metadata={"format": "pt"})
        manifest = stage.publish(kind="policy", method="test-perturbed", parent=parent)
    return manifest.version


def cli_generate(model_dir) -> str:
    out = subprocess.run([sys.executable, "-m", "prefloop.server.cli", "generate", QUESTION[0]["content"],
                          "--chat", "--max-tokens", str(MAX_TOKENS), "--model", str(model_dir), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["text"]


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


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hot-swap")
    registry = Registry(tmp / "data")
    registry.ensure_base(resolve_model_dir(None))
    v1 = publish_perturbed(registry, "v0000")
    expected = {v: cli_generate(registry.version_dir(v)) for v in ("v0000", v1)}
    assert expected["v0000"] != expected[v1], "the perturbed version must answer differently"
    server = start_server_process(tmp, "--registry-poll", "0.5", "--max-concurrent", "16")
    yield server, registry, v1, expected
    assert server.terminate() == 0


def test_promote_and_rollback_under_load_drop_nothing(registry_server):
    server, registry, v1, expected = registry_server
    with Client(server.target, token=ADMIN_TOKEN) as admin:
        assert admin.model_info().model_version == "v0000"
        with Streamers(server.target) as load:
            assert wait_until(lambda: len(load.results) >= 16, timeout=120)
            assert admin.promote(v1, reason="test") == ("v0000", v1)
            n_at_promote = len(load.results)
            assert wait_until(lambda: len(load.results) >= n_at_promote + 16, timeout=120)
        assert load.failures == []
        for version, text in load.results:
            assert text == expected[version], version  # each output came from the version it names
        assert {v for v, _ in load.results} == {"v0000", v1}
        assert load.results[-1][0] == v1
        assert registry.current() == v1 and admin.model_info().model_version == v1

        with Streamers(server.target) as load:
            assert wait_until(lambda: len(load.results) >= 16, timeout=120)
            assert admin.rollback(reason="test") == (v1, "v0000")
            n_at_rollback = len(load.results)
            assert wait_until(lambda: len(load.results) >= n_at_rollback + 16, timeout=120)
        assert load.failures == []
        assert all(text == expected[version] for version, text in load.results)
        assert {v for v, _ in load.results} == {"v0000", v1} and load.results[-1][0] == "v0000"
        versions = admin.list_versions()
        assert [v.version for v in versions.versions] == ["v0000", v1]
        assert versions.current_version == versions.serving_version == "v0000"


def test_pointer_moved_offline_is_followed(registry_server):
    server, registry, v1, expected = registry_server
    registry.promote(v1, reason="offline promote")  # what `prefloop models promote` does
    with Client(server.target, token=USER_TOKEN) as client:
        assert wait_until(lambda: client.model_info().model_version == v1, timeout=60)
        answer = client.chat(QUESTION, max_tokens=MAX_TOKENS, temperature=0)
        assert answer.model_version == v1 and answer.completions[0].text == expected[v1]


def test_corrupt_version_refused_and_old_keeps_serving(registry_server):
    server, registry, v1, expected = registry_server
    bad = publish_perturbed(registry, "v0000")
    weights = registry.version_dir(bad) / "model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as f:  # flip bytes inside the tensor data
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00\x01\x02\x03")
    with Client(server.target, token=ADMIN_TOKEN) as admin:
        serving = admin.model_info().model_version
        with pytest.raises(ClientError) as err:
            admin.promote(bad)
        assert err.value.code == "FAILED_PRECONDITION" and "sha256" in str(err.value).lower()
        assert admin.model_info().model_version == serving
        answer = admin.chat(QUESTION, max_tokens=MAX_TOKENS, temperature=0)
        assert answer.completions[0].text == expected[serving]
        with pytest.raises(ClientError) as err:
            admin.promote("v0099")
        assert err.value.code == "NOT_FOUND"
    with Client(server.target, token=USER_TOKEN) as user, pytest.raises(ClientError) as err:
        user.promote(v1)
    assert err.value.code == "PERMISSION_DENIED"
