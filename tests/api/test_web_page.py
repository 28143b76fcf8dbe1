"""The web page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright's
Python API) against a real `prefloop serve --http-port` on free loopback ports.

The server serves a registry of two tiny random versions (2 layers, hidden 32, the default model's
tokenizer: gibberish text, fast) with user and admin tokens. Every test drives the page the way a
person would (type, click) and checks the outcome where it lands: the feedback log (WAL + Parquet,
read live, and once more from Parquet only after a clean stop), the generation log (an aborted
answer) and the registry (a promote from the models view).

Screenshots of the main views (chat, compare, models; desktop and phone widths) go to a temporary
folder, or to $PREFLOOP_WEB_SCREENSHOTS (e.g. docs/screenshots) when set.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from align_helpers import TOKENIZER_FILES
from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until
from registry_helpers import publish_perturbed
from tiny_models import save_tiny

from prefloop.server.ab import state as ab_state
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table
from prefloop.server.jobs import record_job
from prefloop.server.registry import Registry

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
ANSWER_TOKENS = "24"

playwright_sync = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):  # .ci/run and the README's test command install it
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)", allow_module_level=True)

pytestmark = pytest.mark.timeout(600)

# what the page sent, checked once more in Parquet after the clean stop at the end
SENT: dict[str, list] = {"ratings": [], "preferences": []}


# ---- the server and the browser --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_chat_model(path: Path) -> Path:
    """A 2-layer random Llama with the default model's tokenizer and chat template and a 4096-token
    context (long enough to stop an answer in the middle)."""
    from prefloop.server.model.loader import resolve_model_dir
    save_tiny(path, vocab_size=49152, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
    src = resolve_model_dir(None)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, path / name)
    return path


def publish_measured(registry: Registry, source: str, *, passed: bool, accuracy: float,
                     current: float, win_rate: float | None = None) -> str:
    """A copy of `source`'s weights published with the metrics and gate decision of a DPO job."""
    with registry.stage() as stage:
        for f in registry.version_dir(source).iterdir():
            if f.name != "manifest.json":
                stage.path.joinpath(f.name).write_bytes(f.read_bytes())
        metrics = {"heldout": {"pairs": 40, "pref_accuracy": accuracy, "kl_per_token": 0.031,
                               "kl_to_root_per_token": 0.045, "root_version": "v0000"},
                   "current": {"version": source, "heldout_pref_accuracy": current}}
        gate = {"passed": passed, "candidate_accuracy": accuracy, "current_accuracy": current,
                "current_version": source, "kl_per_token": 0.031, "max_kl": 0.5,
                "reasons": [f"held-out preference accuracy {accuracy:.3f} vs {current:.3f}"]}
        if win_rate is not None:  # the gate's paired win rate (GateDecision.to_record)
            gate.update(win_rate=win_rate, wins=round(40 * win_rate), losses=40 - round(40 * win_rate))
        return stage.publish(kind="policy", method="dpo", parent=source, metrics=metrics,
                             gate=gate).version


def shot(page, path: Path, bottom: bool = True) -> None:
    """The window at the newest messages (a full-page shot would misplace the sticky composer), or
    the whole page from its top."""
    if bottom:
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.screenshot(path=str(path))
    else:  # the whole page, from the top
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(path), full_page=True)


def http_get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


class WebServer:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.data = tmp / "data"
        self.registry = Registry(self.data)
        self.registry.ensure_base(tiny_chat_model(tmp / "tiny"))
        self.v1 = publish_perturbed(self.registry, "v0000")
        # two versions as a training job would leave them: one passed its gate, one failed
        publish_measured(self.registry, self.v1, passed=True, accuracy=0.62, current=0.55, win_rate=0.57)
        publish_measured(self.registry, self.v1, passed=False, accuracy=0.53, current=0.62)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_server_process(tmp, "--http-port", str(self.port), "--registry-poll", "0.5",
                                         "--max-n", "4", "--grace", "5")

        def healthy() -> bool:
            try:
                return http_get(f"{self.url}/health")[0] == 200
            except OSError:
                return False

        assert wait_until(healthy, timeout=60), self.proc.log_text()

    def feedback(self) -> list[dict]:
        return load_table(self.data, logschema.FEEDBACK).to_pylist()

    def generations(self) -> list[dict]:
        return load_table(self.data, logschema.GENERATIONS).to_pylist()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = WebServer(tmp_path_factory.mktemp("web"))
    yield srv
    srv.proc.terminate()


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PREFLOOP_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def open_page(browser, server):
    """Opens the page (token entered if given). `page.errors`: uncaught exceptions; every console
    error (a failed load: a 404, a 401, ...) fails the test at teardown unless the test declared it
    with `page.expected_errors.append("401")` (matched as a substring of "text (url)")."""
    contexts, pages = [], []

    def opener(token: str | None, viewport: dict = DESKTOP):
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        console_errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: console_errors.append(
            f"{msg.text} ({msg.location.get('url', '')})") if msg.type == "error" else None)
        page.errors, page.console_errors, page.expected_errors = errors, console_errors, []
        pages.append(page)
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        if token:  # entered once in the page, kept in sessionStorage
            page.get_by_test_id("token-input").fill(token)
            page.get_by_test_id("token-save").click()
            role = "admin" if token == ADMIN_TOKEN else "user"
            page.wait_for_function(f"document.querySelector('[data-testid=role]').textContent === '{role}'")
        return page

    yield opener
    try:
        unexpected = [m for p in pages for m in p.console_errors
                      if not any(e in m for e in p.expected_errors)]
        assert unexpected == [], "the page logged console errors"
    finally:
        for c in contexts:
            c.close()


def settings(page, **values: str) -> None:
    """Open the Settings drawer, fill the fields (by test id), close it again."""
    drawer = page.locator("details.settings")
    drawer.locator("summary").click()
    for test_id, value in values.items():
        page.get_by_test_id(test_id.replace("_", "-")).fill(value)
    drawer.locator("summary").click()


def say(page, text: str, max_tokens: str = ANSWER_TOKENS) -> None:
    settings(page, max_tokens=max_tokens)
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("send").click()


def last_answer(page):
    return page.get_by_test_id("answer").last


def wait_done(answer) -> None:
    answer.and_(answer.page.locator("[data-state]")).wait_for()
    assert answer.get_attribute("data-state") == "done", answer.inner_text()


def rows_where(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


# ---- the tests -------------------------------------------------------------------------------------

def test_chat_streams_and_thumbs_are_logged(server, open_page, shots):
    page = open_page(USER_TOKEN)
    assert page.get_by_test_id("nav-models").is_hidden()
    # every change of the answer's text, as the page renders it
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const a = document.querySelector('[data-testid=answer]');
            if (a) window.__lengths.push([a.querySelector('.text').textContent.length,
                                          a.classList.contains('streaming')]);
        }).observe(document.querySelector('[data-testid=messages]'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    say(page, "Hello there, who are you?", max_tokens="200")
    answer = last_answer(page)
    wait_done(answer)
    # streamed: text was on screen while the answer was still coming, and more came after it
    renders = page.evaluate("window.__lengths")
    partial = [n for n, streaming in renders if streaming and n > 0]
    final = len(answer.locator(".text").text_content())
    assert partial and partial[0] < final, renders
    assert [n for n, _ in renders] == sorted(n for n, _ in renders), renders
    response_id = answer.get_attribute("data-response-id")
    assert response_id and answer.get_attribute("data-model-version") == "v0000"
    assert answer.get_by_test_id("answer-version").inner_text() == "v0000"
    text = answer.locator(".text").text_content()
    assert text

    answer.get_by_test_id("thumbs-up").click()
    answer.get_by_test_id("vote-saved").wait_for()
    assert answer.get_by_test_id("thumbs-up").get_attribute("aria-pressed") == "true"
    assert wait_until(lambda: len(rows_where(server.feedback(), response_id=response_id)) == 1)
    (row,) = rows_where(server.feedback(), response_id=response_id)
    assert row["kind"] == "rating" and row["score"] == 1 and row["scale"] == "thumbs"
    assert row["idempotency_key"] and row["session_id"]
    SENT["ratings"].append((response_id, 1))

    # a second click takes it back: the opposite score, which cancels the first in averages
    answer.get_by_test_id("thumbs-up").click()
    answer.get_by_test_id("vote-saved").filter(has_text="taken back").wait_for()
    assert answer.get_by_test_id("thumbs-up").get_attribute("aria-pressed") == "false"
    assert wait_until(lambda: len(rows_where(server.feedback(), response_id=response_id)) == 2)
    scores = sorted(r["score"] for r in rows_where(server.feedback(), response_id=response_id))
    assert scores == [-1, 1]
    SENT["ratings"].append((response_id, -1))

    # multi-turn: the second request carries the first exchange
    answer.get_by_test_id("thumbs-down").click()
    answer.get_by_test_id("vote-saved").wait_for()
    SENT["ratings"].append((response_id, -1))
    # the drawer's fields reach the engine
    settings(page, repetition_penalty="1.3", frequency_penalty="0.4")
    say(page, "And what else?")
    second = last_answer(page)
    wait_done(second)
    rid2 = second.get_attribute("data-response-id")
    assert rid2 != response_id
    assert wait_until(lambda: rows_where(server.generations(), response_id=rid2))
    (gen,) = rows_where(server.generations(), response_id=rid2)
    assert gen["sampling"]["repetition_penalty"] == 1.3
    assert (gen["sampling"]["frequency_penalty"], gen["sampling"]["presence_penalty"]) == (0.4, 0.0)
    (first,) = rows_where(server.generations(), response_id=response_id)
    assert first["sampling"]["repetition_penalty"] == 1.0  # left empty: the server's default
    contents = [m["content"] for m in gen["messages"]]
    assert "Hello there, who are you?" in contents and text in contents and contents[-1] == "And what else?"
    shot(page, shots / "chat-desktop.png")

    # out of range: sent as typed, so the user reads the server's message (no silent clamp)
    settings(page, frequency_penalty="5")
    page.expected_errors.append("400")
    say(page, "One more thing?")
    refused = last_answer(page).get_by_test_id("chat-error")
    refused.wait_for()
    assert "frequency_penalty must be in [-2, 2]" in refused.inner_text()

    page.get_by_test_id("new-chat").click()
    assert page.get_by_test_id("answer").count() == 0
    assert page.errors == []


def test_edit_records_the_users_text_as_preferred(server, open_page):
    page = open_page(USER_TOKEN)
    say(page, "Tell me about rivers.")
    answer = last_answer(page)
    wait_done(answer)
    model_text = answer.locator(".text").text_content()
    mine = "Rivers carry water from the hills to the sea. (edited by a person)"
    answer.get_by_test_id("edit").click()
    answer.get_by_test_id("edit-text").fill(mine)
    answer.get_by_test_id("edit-save").click()
    answer.get_by_test_id("vote-saved").wait_for()
    assert answer.locator(".text").text_content() == mine

    def pref():
        return rows_where(server.feedback(), kind="preference", chosen_text=mine)

    assert wait_until(lambda: len(pref()) == 1)
    (row,) = pref()
    assert row["rejected_text"] == model_text
    assert row["prompt_messages"][-1] == {"role": "user", "content": "Tell me about rivers."}
    SENT["preferences"].append(mine)
    assert page.errors == []


def test_compare_pick_b_prefers_bs_response(server, open_page, shots):
    page = open_page(USER_TOKEN)
    page.get_by_test_id("compare-toggle").check()
    settings(page, temperature="1.0")
    say(page, "Name a colour.")
    block = page.get_by_test_id("compare").last
    a = block.locator("[data-testid=answer][data-slot=A]")
    b = block.locator("[data-testid=answer][data-slot=B]")
    wait_done(a)
    wait_done(b)
    rid_a, rid_b = a.get_attribute("data-response-id"), b.get_attribute("data-response-id")
    assert rid_a and rid_b and rid_a != rid_b
    # blind until the vote
    assert a.get_attribute("data-model-version") is None and b.get_attribute("data-model-version") is None
    assert a.get_by_test_id("answer-version").inner_text() == ""
    shot(page, shots / "compare-desktop.png")

    block.get_by_test_id("pick-b").click()
    block.get_by_test_id("vote-saved").wait_for()
    assert a.get_attribute("data-model-version") == "v0000" == b.get_attribute("data-model-version")

    def pref():
        return rows_where(server.feedback(), kind="preference", chosen_response_id=rid_b)

    assert wait_until(lambda: len(pref()) == 1)
    assert pref()[0]["rejected_response_id"] == rid_a
    SENT["preferences"].append(rid_b)

    # both bad: a thumbs-down on each; tie: nothing sent
    say(page, "Name a fruit.")
    block2 = page.get_by_test_id("compare").last
    for slot in "AB":
        wait_done(block2.locator(f"[data-testid=answer][data-slot={slot}]"))
    ids = [block2.locator(f"[data-testid=answer][data-slot={s}]").get_attribute("data-response-id")
           for s in "AB"]
    block2.get_by_test_id("pick-bad").click()
    block2.get_by_test_id("vote-saved").wait_for()
    for rid in ids:
        assert wait_until(lambda rid=rid: rows_where(server.feedback(), response_id=rid, score=-1))
        SENT["ratings"].append((rid, -1))
    assert page.errors == []


def test_feedback_is_retried_with_its_key_and_errors_are_shown(server, open_page):
    page = open_page(USER_TOKEN)
    say(page, "One more question.")
    answer = last_answer(page)
    wait_done(answer)
    rid = answer.get_attribute("data-response-id")
    bodies: list[dict] = []

    def flaky(route):  # the first try dies on the network; the retry goes through
        bodies.append(json.loads(route.request.post_data))
        route.abort() if len(bodies) == 1 else route.continue_()

    page.expected_errors += ["net::ERR_FAILED", "401"]  # the aborted try, the refused token
    page.route("**/v1/feedback/rating", flaky)
    answer.get_by_test_id("thumbs-up").click()
    answer.get_by_test_id("vote-saved").wait_for()
    page.unroute("**/v1/feedback/rating")
    assert len(bodies) == 2 and bodies[0]["idempotency_key"] == bodies[1]["idempotency_key"]
    assert wait_until(lambda: len(rows_where(server.feedback(), response_id=rid)) == 1)
    SENT["ratings"].append((rid, 1))

    # a refused vote shows the server's message
    page.evaluate("sessionStorage.setItem('prefloop.token', 'not-a-token')")
    answer.get_by_test_id("thumbs-down").click()
    error = answer.get_by_test_id("vote-error")
    error.wait_for()
    assert "not saved" in error.inner_text() and "token" in error.inner_text()
    assert len(rows_where(server.feedback(), response_id=rid)) == 1
    assert page.errors == []


def test_stop_mid_answer_aborts_the_request(server, open_page):
    page = open_page(USER_TOKEN)
    for attempt in range(3):  # a random model may end early with EOS: then try again
        say(page, f"Count to one thousand, attempt {attempt}.", max_tokens="3500")
        answer = last_answer(page)
        page.wait_for_function("""() => {
            const a = [...document.querySelectorAll('[data-testid=answer]')].pop();
            return a && (a.dataset.state || a.querySelector('.text').textContent.length > 0);
        }""")
        page.get_by_test_id("stop").click()
        answer.and_(page.locator("[data-state]")).wait_for()
        if answer.get_attribute("data-state") == "stopped":
            break
    assert answer.get_attribute("data-state") == "stopped"
    assert answer.get_by_test_id("answer-state").inner_text() == "stopped"
    rid = answer.get_attribute("data-response-id")
    shown = answer.locator(".text").text_content()
    time.sleep(1.0)
    assert answer.locator(".text").text_content() == shown  # nothing arrives after the stop
    assert page.get_by_test_id("send").is_enabled() and page.get_by_test_id("stop").is_disabled()

    def aborted():
        return rows_where(server.generations(), response_id=rid)

    assert wait_until(lambda: aborted(), timeout=30)
    (gen,) = aborted()
    assert gen["finish_reason"] == "abort"
    assert gen["completion_tokens"] < 3500
    assert page.errors == []


def test_user_token_cannot_see_the_models_view(server, open_page):
    page = open_page(USER_TOKEN)
    assert page.get_by_test_id("nav-models").is_hidden()
    assert page.get_by_test_id("models-view").is_hidden()
    assert page.get_by_test_id("versions-table").is_hidden()
    page.expected_errors.append("403")
    status = page.evaluate("""async (token) => (await fetch('/v1/admin/versions',
        {headers: {Authorization: 'Bearer ' + token}})).status""", USER_TOKEN)
    assert status == 403
    # no token at all: the page asks for one and shows no models view either
    anon = open_page(None)
    assert anon.get_by_test_id("token-form").is_visible()
    assert anon.get_by_test_id("nav-models").is_hidden()
    assert page.errors == [] and anon.errors == []


def test_models_view_promotes_a_version_and_the_next_answer_names_it(server, open_page, shots):
    # the job history as align leaves it: a finished job (two events) and one that died running
    record_job(server.registry, {"job_id": "job-pub", "status": "running", "pid": 999999999,
                                 "command": "dpo", "method": "dpo",
                                 "started_at": "2025-01-01T00:00:00Z"})
    record_job(server.registry, {"job_id": "job-pub", "status": "published", "base": "v0000",
                                 "version": server.v1, "finished_at": "2025-01-01T00:04:00Z",
                                 "gate": {"passed": True, "reasons": ["accuracy 0.62 vs 0.55"]},
                                 "data": {"rows": {"train": 120, "heldout": 40}}})
    record_job(server.registry, {"job_id": "job-dead", "status": "running", "pid": 999999999,
                                 "command": "run", "method": "dpo",
                                 "started_at": "2025-01-02T00:00:00Z"})
    page = open_page(ADMIN_TOKEN)
    page.get_by_test_id("nav-models").click()
    jobs = page.get_by_test_id("jobs-table")
    jobs.locator("tr[data-job-id=job-pub]").wait_for()
    assert jobs.locator("tbody tr").count() == 2  # one row per job, not one per event
    published = jobs.locator("tr[data-job-id=job-pub]")
    assert published.get_by_test_id("job-status").inner_text() == "published"
    assert f"v0000 → {server.v1}" in published.inner_text()
    assert "passed" in published.inner_text() and "120 / 40" in published.inner_text()
    dead = jobs.locator("tr[data-job-id=job-dead]")
    assert dead.get_by_test_id("job-status").inner_text() == "crashed"
    assert jobs.locator("tbody tr").first.get_attribute("data-job-id") == "job-dead"  # newest first
    table = page.get_by_test_id("versions-table")
    promote = table.locator(f"[data-testid=promote][data-version={server.v1}]")
    promote.wait_for()
    assert table.locator("tr[data-version=v0000].current").count() == 1
    page.get_by_test_id("chart-votes").locator("svg rect").first.wait_for()  # votes from earlier tests
    page.get_by_test_id("ab-status").get_by_text("No A/B test is running").wait_for()
    assert page.get_by_test_id("ab-last").count() == 0  # no test has ever run
    # the chart: a point per measured promoted version (accuracy and win rate of the passed one)
    assert page.get_by_test_id("chart-quality").locator("circle").count() == 2
    assert table.locator("tr td.pass").count() == 1 and table.locator("tr td.fail").count() == 1
    root_kl = table.get_by_test_id("root-kl").all_inner_texts()
    assert root_kl.count("0.0450") == 2 and "–" in root_kl  # measured versions; v0000 has none
    shot(page, shots / "models-desktop.png", bottom=False)

    page.get_by_test_id("action-reason").fill("web test")
    promote.click()
    page.get_by_test_id("models-msg").filter(has_text=f"→ {server.v1}").wait_for()
    table.locator(f"tr[data-version={server.v1}].current").wait_for()
    assert server.registry.current() == server.v1

    page.get_by_test_id("nav-chat").click()
    say(page, "Which version are you?")
    answer = last_answer(page)
    wait_done(answer)
    assert answer.get_attribute("data-model-version") == server.v1
    assert answer.get_by_test_id("answer-version").inner_text() == server.v1

    page.get_by_test_id("nav-models").click()
    page.get_by_test_id("rollback").click()
    page.get_by_test_id("models-msg").filter(has_text="rolled back").wait_for()
    table.locator("tr[data-version=v0000].current").wait_for()
    assert server.registry.current() == "v0000"

    # an A/B test that ended: the page says how and which evidence decided
    ab_file = server.registry.root / ab_state.AB_FILE
    ab_file.write_text(json.dumps(ab_state.ABState(
        server.v1, "v0000", started_at="2025-01-03T00:00:00Z", status=ab_state.REJECTED,
        decided_at="2025-01-04T00:00:00Z",
        reason="candidate worse by ratings (thumbs / stars): ...").as_dict()))
    try:
        page.get_by_test_id("nav-chat").click()
        page.get_by_test_id("nav-models").click()
        last = page.get_by_test_id("ab-last")
        last.wait_for()
        assert f"Last test: {server.v1} vs v0000, rejected 2025-01-04" in last.inner_text()
        assert "candidate worse by ratings (thumbs / stars)" in last.inner_text()
    finally:
        ab_file.unlink()
    assert page.errors == []


def test_phone_width(server, open_page, shots):
    page = open_page(ADMIN_TOKEN, viewport=PHONE)
    say(page, "Hi from a phone.")
    wait_done(last_answer(page))
    last_answer(page).get_by_test_id("thumbs-up").click()
    last_answer(page).get_by_test_id("vote-saved").wait_for()
    SENT["ratings"].append((last_answer(page).get_attribute("data-response-id"), 1))
    no_overflow = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(no_overflow)
    shot(page, shots / "chat-phone.png")

    page.get_by_test_id("compare-toggle").check()
    say(page, "Name an animal.")
    block = page.get_by_test_id("compare").last
    a = block.locator("[data-testid=answer][data-slot=A]")
    b = block.locator("[data-testid=answer][data-slot=B]")
    wait_done(a)
    wait_done(b)
    box_a, box_b = a.bounding_box(), b.bounding_box()
    assert box_b["y"] >= box_a["y"] + box_a["height"] - 1  # stacked, not side by side
    assert page.evaluate(no_overflow)
    block.get_by_test_id("pick-tie").click()
    block.get_by_test_id("vote-saved").wait_for()  # a tie sends nothing
    shot(page, shots / "compare-phone.png")

    page.get_by_test_id("nav-models").click()
    page.get_by_test_id("versions-table").locator("tbody tr").first.wait_for()
    assert page.evaluate(no_overflow)
    shot(page, shots / "models-phone.png", bottom=False)
    for name in ("chat-desktop", "compare-desktop", "models-desktop", "chat-phone", "compare-phone",
                 "models-phone"):
        assert (shots / f"{name}.png").stat().st_size > 5000, name
    assert page.errors == []


def test_clean_stop_keeps_every_vote_in_parquet(server):
    assert server.proc.terminate() == 0
    rows = load_table(server.data, logschema.FEEDBACK, include_wal=False).to_pylist()
    ratings = sorted((r["response_id"], r["score"]) for r in rows if r["kind"] == "rating")
    assert ratings == sorted(SENT["ratings"])
    # form 1 (compare) by the chosen response, form 2 (edit) by the user's text
    prefs = sorted(r["chosen_response_id"] or r["chosen_text"] for r in rows if r["kind"] == "preference")
    assert prefs == sorted(SENT["preferences"])
    keys = [r["idempotency_key"] for r in rows]
    assert all(keys) and len(set(keys)) == len(keys)
