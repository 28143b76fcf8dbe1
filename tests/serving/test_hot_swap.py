"""Hot-swap with real processes: a server on a registry, 16 streaming clients during a Promote and
during a Rollback, a pointer moved offline, and a corrupt version refused while the old one serves."""
import json
import subprocess
import sys

import pytest
from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until
from registry_helpers import (
    MAX_TOKENS,
    QUESTION,
    assert_each_answer_from_its_version,
    publish_perturbed,
    swap_under_load,
    two_version_registry,
)

from prefloop.clients import Client
from prefloop.clients.errors import ClientError

pytestmark = pytest.mark.slow


def cli_generate(model_dir) -> str:
    out = subprocess.run([sys.executable, "-m", "prefloop.cli", "generate", QUESTION[0]["content"],
                          "--chat", "--max-tokens", str(MAX_TOKENS), "--model", str(model_dir), "--json",
                          "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["text"]


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hot-swap")
    registry, v1 = two_version_registry(tmp)
    expected = {v: cli_generate(registry.version_dir(v)) for v in ("v0000", v1)}
    assert expected["v0000"] != expected[v1], "the perturbed version must answer differently"
    server = start_server_process(tmp, "--registry-poll", "0.5", "--max-concurrent", "16")
    yield server, registry, v1, expected
    assert server.terminate() == 0


def test_promote_and_rollback_under_load_drop_nothing(registry_server):
    server, registry, v1, expected = registry_server
    with Client(server.target, token=ADMIN_TOKEN) as admin:
        assert admin.model_info().model_version == "v0000"
        switched, load = swap_under_load(server.target, lambda: admin.promote(v1, reason="test"))
        assert switched == ("v0000", v1)
        assert_each_answer_from_its_version(load, expected, final=v1)
        assert registry.current() == v1 and admin.model_info().model_version == v1

        switched, load = swap_under_load(server.target, lambda: admin.rollback(reason="test"))
        assert switched == (v1, "v0000")
        assert_each_answer_from_its_version(load, expected, final="v0000")
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


def test_an_adapter_version_promoted_under_load_serves_at_once_then_merges_and_rolls_back(
        registry_server):
    """A LoRA adapter version over the served one is promoted while 8 clients stream: the server
    serves it at once on the engine it had (an adapter view, nothing loaded), then moves to its
    merged weights loaded in the background while the clients keep streaming, then rolls back.
    No request fails and every answer is its version's (the merged weights' answer, from a
    separate process)."""
    from adapter_helpers import publish_random_adapter

    server, registry, _, expected = registry_server
    with Client(server.target, token=ADMIN_TOKEN) as admin:
        if admin.model_info().model_version != "v0000":  # the perturbed v0001 babbles
            admin.promote("v0000", reason="test")
        served = "v0000"
        adapter, _ = publish_random_adapter(registry, served, seed=5, scale=0.5)
        answers = {served: expected[served], adapter: cli_generate(registry.version_dir(adapter))}
        assert answers[adapter] != answers[served], "the adapter must change the answer"
        merged = f"now serving {adapter} from its merged weights"

        def promote_and_merge():
            switched = admin.promote(adapter)
            assert wait_until(lambda: merged in server.log_text(), timeout=120)
            return switched

        switched, load = swap_under_load(server.target, promote_and_merge, n=8)
        assert switched == (served, adapter)
        assert_each_answer_from_its_version(load, answers, final=adapter)
        switched, load = swap_under_load(server.target, lambda: admin.rollback(), n=8)
        assert switched == (adapter, served)
        assert_each_answer_from_its_version(load, answers, final=served)
    log = server.log_text()
    view = log.index(f"now serving {adapter} (an adapter on the engine of {served})")
    # the rollback leaves the merged engine: v0000's weights are loaded again
    assert view < log.index(merged) < log.rindex(f"now serving {served} (")
