"""Soak: a real server under mixed load, killed again and again, checked after every restart.

    python benchmarks/soak.py [--kills 20] [--seed 0] [--out FILE.json]
    python benchmarks/soak.py --minutes 60 [--action-every 300]    # no kills: RSS over time
    ... [--weights adapter|full]   # what the publisher publishes (default full: a whole copy)

A real `prefloop serve` (default model, bf16) on a data directory with a registry (v0000 = the
default model) serves HTTP and gRPC chat streams to three client threads that vote on what they
get: thumbs, picks between two answers (n=2), and edits (an explicit preference for the user's own
rewrite), each with a fresh idempotency key; every acknowledged vote is remembered. A driver then
takes `--kills` turns, each one of:

- **server**: SIGKILL the server at a random moment under load, restart it;
- **publisher**: run a publisher process that does what an align job does to the registry — take
  the job lock, stage a copy of v0000 (`--weights full`) or a LoRA adapter over it (`--weights
  adapter`, rank 16 on every projection, what an align job publishes by default), publish it,
  promote it (CURRENT moves, the server swaps),
  roll back, delete old versions — and SIGKILL it at a chosen phase (lock held, staging, publish
  rename, promoted, rolled back) plus 0-30 ms;
- **ab**: start an A/B test of the newest published version through the admin API and SIGKILL
  the server while it loads the candidate or serves both, restart it; the next turn stops it.

After every turn, with the load paused, it checks: every acked vote is in the log exactly once
(Parquet + WAL; no idempotency key twice); CURRENT names a version that verifies (sha256 of every
file) and so does every listed version (no half-written version is visible); the job lock can be
taken (a killed job's lock is released); the A/B state reads; the served version equals CURRENT;
no request runs and every KV block is free. It reports kills by target, acked votes, lost,
duplicated, failed requests outside the killed process's in-flight ones (a request counts as in
flight when the server it was sent to died before it finished), the seconds from each restart to
the first answer, and the server's RSS at the first and last check.

`run_soak(work, kills, seed)` is what tests/e2e/test_soak.py runs with a few kills.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process  # noqa: E402

PHASES = ("LOCKED", "STAGED", "PUBLISHING", "PUBLISHED", "PROMOTED", "ROLLED_BACK")
QUESTIONS = ["Name a fruit.", "Say hello.", "What is 2+2?", "Name a colour.", "Say a city."]


# ---- the publisher (a child process: what an align job does to the registry) ----------------

def stage_adapter(stage_path: Path, src: Path, rank: int = 16, seed: int = 0) -> None:
    """A LoRA adapter over `src` in PEFT's format (small random factors on every projection of
    every block) with `src`'s config and tokenizer files, as an align job stages one."""
    import torch

    from prefloop.server.model.adapters import write_peft_adapter

    cfg = json.loads((src / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv),
              "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (q, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    write_peft_adapter({f"model.layers.{layer}.{module}.weight": (
        torch.randn(rank, n_in, generator=gen) * 0.01, torch.randn(n_out, rank, generator=gen) * 0.01)
        for layer in range(cfg["num_hidden_layers"]) for module, (n_in, n_out) in shapes.items()},
        stage_path)
    for f in src.iterdir():
        if f.is_file() and f.name != "manifest.json" and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, stage_path / f.name)


def publisher(data_dir: Path, weights: str = "full") -> None:
    from prefloop.server.ab import state as ab_state
    from prefloop.server.errors import PrefloopError
    from prefloop.server.jobs import job_lock
    from prefloop.server.registry import Registry

    def say(phase: str) -> None:
        print(phase, flush=True)

    registry = Registry(data_dir)
    with job_lock(registry):
        say("LOCKED")
        registry.cleanup_stages()  # what align does first: a killed job's stage goes
        src = registry.version_dir("v0000")
        with registry.stage() as stage:
            if weights == "adapter":
                stage_adapter(stage.path, src)
            else:
                for f in src.iterdir():
                    if f.name != "manifest.json":
                        shutil.copyfile(f, stage.path / f.name)
            say("STAGED")
            say("PUBLISHING")
            manifest = stage.publish(kind="policy", method="soak-copy", parent="v0000",
                                     adapter=weights == "adapter")
        say("PUBLISHED")
        registry.promote(manifest.version, reason="soak", actor="soak", force=True)
        say("PROMOTED")
        registry.rollback(reason="soak", actor="soak")
        say("ROLLED_BACK")
        try:
            test = ab_state.running_state(registry)
        except PrefloopError:
            test = None
        also = {test.candidate: "A/B", test.control: "A/B"} if test else {}
        for version in registry.list_versions()[1:-1]:  # keep v0000 and the newest
            try:
                registry.delete_version(version, also=also)
            except PrefloopError:
                pass  # protected (current, rollback stack, A/B)
        say("DONE")


# ---- the soak ----------------------------------------------------------------------------------

@dataclass
class Report:
    kills: Counter = field(default_factory=Counter)
    publisher_phases: list[str] = field(default_factory=list)
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    requests: int = 0
    failed_in_flight: int = 0  # the server they were sent to was killed
    refused_while_down: int = 0  # sent while no server was up (killed, not yet restarted)
    failed_outside: int = 0
    failures: list[str] = field(default_factory=list)
    serve_again_s: list[float] = field(default_factory=list)
    checks: int = 0
    bad_states: list[str] = field(default_factory=list)
    rss_first_mb: float | None = None
    rss_last_mb: float | None = None
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (minute, MB), steady
    rss_before_actions_mb: float | None = None  # steady: under load, before the first swap
    swaps_and_tests: int = 0  # steady mode: publisher cycles and A/B tests run (no kills)
    wall_s: float = 0.0

    def summary(self) -> dict:
        out = asdict(self)
        out["kills"] = dict(self.kills)
        out["failures"] = self.failures[:10]
        s = self.serve_again_s
        out["serve_again_s"] = {"n": len(s), "median": statistics.median(s) if s else None,
                                "max": max(s) if s else None}
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Soak:
    def __init__(self, work: Path, seed: int, phases: tuple[str, ...] = PHASES,
                 weights: str = "full") -> None:
        import httpx
        self.httpx = httpx
        self.weights = weights  # what the publisher publishes: "full" copies or "adapter"s
        self.work = work
        self.data = work / "data"
        self.rng = random.Random(seed)
        self.report = Report()
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # idempotency key -> feedback_id
        self.epoch = 0  # bumps at every kill: a request of an older epoch was in flight
        self.up = threading.Event()  # set while a started server has not been killed
        self.running = threading.Event()  # load runs while set
        self.in_flight = 0  # rounds started and not finished (under `lock`)
        self.stop = threading.Event()
        self.server = None
        self.url = self.target = ""
        self.ab_running = False
        self.phases = phases

    # -- server --------------------------------------------------------------------------------

    def start_server(self) -> float:
        port = free_port()
        t0 = time.monotonic()
        self.server = start_server_process(self.work, "--http-port", str(port), "--dtype",
                                           "bfloat16", "--registry-poll", "0.5", "--grace", "5")
        self.url, self.target = f"http://127.0.0.1:{port}", self.server.target
        self.chat_http("Are you back?", 4)  # the first answer
        self.up.set()
        return time.monotonic() - t0

    def kill_server(self) -> None:
        with self.lock:
            self.epoch += 1
            self.up.clear()
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(30)

    def headers(self, token: str = USER_TOKEN) -> dict:
        return {"Authorization": f"Bearer {token}"}

    def chat_http(self, question: str, max_tokens: int, n: int = 1) -> list[dict]:
        r = self.httpx.post(self.url + "/v1/chat/completions", headers=self.headers(), timeout=120,
                            json={"messages": [{"role": "user", "content": question}],
                                  "max_tokens": max_tokens, "n": n, "temperature": 0.8})
        r.raise_for_status()
        return r.json()["choices"]

    # -- load ----------------------------------------------------------------------------------

    def vote(self, path: str, body: dict) -> None:
        key = uuid.uuid4().hex
        r = self.httpx.post(self.url + path, headers=self.headers(), timeout=60,
                            json={**body, "idempotency_key": key, "user_id": f"u{key[:2]}"})
        r.raise_for_status()
        with self.lock:
            self.acked[key] = r.json()["feedback_id"]

    def one_round(self, rng: random.Random, use_grpc: bool) -> None:
        question = rng.choice(QUESTIONS)
        if use_grpc:
            from prefloop.clients import Client
            with Client(self.target, token=USER_TOKEN, timeout=120) as client:
                result = client.chat([{"role": "user", "content": question}], max_tokens=8, n=2,
                                     temperature=0.8)
            answers = [(c.response_id, c.text) for c in result.completions]
        else:
            answers = [(c["response_id"], c["message"]["content"])
                       for c in self.chat_http(question, 8, n=2)]
        self.vote("/v1/feedback/rating", {"response_id": answers[0][0],
                                          "score": rng.choice((-1, 1))})
        if rng.random() < 0.7 and answers[0][1] != answers[1][1]:  # a pick
            self.vote("/v1/feedback/preference", {"chosen_response_id": answers[1][0],
                                                  "rejected_response_id": answers[0][0]})
        else:  # an edit: the user's rewrite preferred over the answer
            self.vote("/v1/feedback/preference", {
                "prompt_messages": [{"role": "user", "content": question}],
                "chosen_text": answers[0][1] + " (edited)", "rejected_text": answers[0][1]})

    def load(self, i: int) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            if not self.running.wait(0.2) or not self.up.wait(0.2):
                continue
            with self.lock:
                if not self.running.is_set():  # paused between the wait and here
                    continue
                epoch = self.epoch
                self.in_flight += 1
            try:
                self.one_round(rng, use_grpc=(i == 0))
                with self.lock:
                    self.report.requests += 1
            except Exception as exc:  # noqa: BLE001 - classified below
                with self.lock:
                    self.report.requests += 1
                    if self.epoch != epoch:
                        self.report.failed_in_flight += 1
                    elif not self.up.is_set():
                        self.report.refused_while_down += 1
                    else:
                        self.report.failed_outside += 1
                        self.report.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.2)
            finally:
                with self.lock:
                    self.in_flight -= 1

    # -- checks ----------------------------------------------------------------------------------

    def pause(self, limit_s: float = 180.0) -> None:
        """Stop the load and wait until the rounds in flight finish (a vote acked after the
        check read the log would count as lost): a fixed second was too short on a slow machine,
        where the chat of one round (then two votes) took up to 1.9 s."""
        with self.lock:
            self.running.clear()
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.in_flight == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"soak: {self.in_flight} round(s) still in flight after {limit_s:.0f} s")

    def check(self, label: str) -> None:
        from prefloop.server.ab import state as ab_state
        from prefloop.server.feedback import schema as logschema
        from prefloop.server.feedback.export import load_table
        from prefloop.server.jobs import job_lock
        from prefloop.server.registry import Registry
        rep, bad = self.report, self.report.bad_states
        rep.checks += 1
        rows = load_table(self.data, logschema.FEEDBACK, columns=["feedback_id",
                                                                  "idempotency_key"]).to_pylist()
        ids = Counter(r["feedback_id"] for r in rows)
        keys = Counter(r["idempotency_key"] for r in rows)
        with self.lock:
            acked = dict(self.acked)
        rep.acked = len(acked)
        rep.lost = sum(1 for fid in acked.values() if ids[fid] == 0)
        rep.duplicated = sum(1 for n in ids.values() if n > 1) + sum(
            1 for k, n in keys.items() if k and n > 1)
        registry = Registry(self.data)
        try:
            current = registry.current()
            for version in registry.list_versions():
                result = registry.verify(version)
                if not result.ok:
                    bad.append(f"{label}: {version} does not verify: {result.problems}")
            if ab_state.read_state(registry) is None and self.ab_running:
                bad.append(f"{label}: the A/B state is gone")
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{label}: registry: {exc}")
            return
        try:
            with job_lock(registry):
                pass
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{label}: the job lock is still held: {exc}")
        deadline = time.monotonic() + 60
        served = None
        while time.monotonic() < deadline:
            served = self.httpx.get(self.url + "/health", timeout=10).json().get("model_version")
            if served == current:
                break
            time.sleep(0.5)
        if served != current:
            bad.append(f"{label}: serves {served}, CURRENT is {current}")
        from prefloop.clients import Client
        with Client(self.target, token=ADMIN_TOKEN, timeout=30) as admin:
            deadline = time.monotonic() + 30
            while True:
                stats = admin.engine_stats()
                if stats.running == 0 and stats.free_blocks == stats.total_blocks:
                    break
                if time.monotonic() > deadline:
                    bad.append(f"{label}: idle engine holds blocks: {stats}")
                    break
                time.sleep(0.5)
        rss = rss_mb(self.server.proc.pid)
        rep.rss_first_mb = rep.rss_first_mb or rss
        rep.rss_last_mb = rss

    # -- turns ---------------------------------------------------------------------------------

    def turn_server(self) -> None:
        time.sleep(self.rng.uniform(2.0, 8.0))
        self.kill_server()
        self.report.kills["server"] += 1
        self.report.serve_again_s.append(self.start_server())

    def turn_publisher(self) -> None:
        phase = self.rng.choice(self.phases)
        proc = subprocess.Popen([sys.executable, __file__, "--publisher", str(self.data),
                                 "--weights", self.weights],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            if line.strip() == phase:
                time.sleep(self.rng.uniform(0, 0.03))
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(60)
        self.report.kills["publisher"] += 1
        self.report.publisher_phases.append(phase)

    def turn_ab(self) -> None:
        from prefloop.server.registry import Registry
        if self.ab_running:  # stop the test the last ab turn left running
            self.httpx.post(self.url + "/v1/admin/ab/stop", headers=self.headers(ADMIN_TOKEN),
                            json={}, timeout=60)
            self.ab_running = False
        registry = Registry(self.data)
        candidates = [v for v in registry.list_versions() if v != registry.current()]
        if not candidates:
            return self.turn_server()
        threading.Timer(self.rng.uniform(0.05, 3.0), self.kill_server).start()
        try:
            r = self.httpx.post(self.url + "/v1/admin/ab/start", headers=self.headers(ADMIN_TOKEN),
                                json={"candidate": candidates[-1], "force": True}, timeout=60)
            self.ab_running = r.status_code == 200
        except self.httpx.HTTPError:
            self.ab_running = True  # it may have been recorded before the kill
        time.sleep(3.2)  # the kill has happened
        self.report.kills["server during A/B"] += 1
        self.report.serve_again_s.append(self.start_server())

    def begin(self) -> list[threading.Thread]:
        """v0000 in the registry, the server up, the three load threads started (paused)."""
        from prefloop.server.model.loader import resolve_model_dir
        from prefloop.server.registry import Registry
        Registry(self.data).ensure_base(resolve_model_dir(None))
        self.start_server()
        threads = [threading.Thread(target=self.load, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        return threads

    def end(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        self.running.set()
        for t in threads:
            t.join(30)
        self.server.terminate()

    def run_steady(self, minutes: float, action_every_s: float = 300.0) -> Report:
        """Mixed load for `minutes` without kills: every `action_every_s` a publisher cycle
        (promote and roll back: two swaps under load) or an A/B test started and stopped; the
        server's RSS sampled every 30 s while no A/B test runs (a running test holds a second
        engine), all checks at the end."""
        t0 = time.monotonic()
        threads = self.begin()
        self.running.set()
        next_action, next_sample, k = t0 + action_every_s, t0, 0
        warm_index = None
        try:
            while time.monotonic() - t0 < minutes * 60:
                now = time.monotonic()
                if now >= next_sample and not self.ab_running:
                    self.report.rss_samples.append((round((now - t0) / 60, 2),
                                                    rss_mb(self.server.proc.pid)))
                    next_sample = now + 30
                if now >= next_action:
                    if k == 0:  # the last sample before any swap or A/B load: the cold baseline
                        self.report.rss_before_actions_mb = next(
                            (mb for _, mb in reversed(self.report.rss_samples) if mb), None)
                    self.steady_action(k)
                    k += 1
                    next_action = time.monotonic() + action_every_s
                    if k == 3:  # publisher cycle, A/B start, A/B stop: warm
                        warm_index = len(self.report.rss_samples)
                time.sleep(1.0)
            if self.ab_running:
                self.steady_action(1)  # stops it
            self.pause()
            self.check("end of the steady run")
        finally:
            self.end(threads)
        # the baseline: the first sample after one whole cycle (a publisher cycle: two swaps;
        # an A/B start and stop), when every kind of allocation has happened once
        samples = [mb for _, mb in self.report.rss_samples[warm_index or 0:] if mb]
        self.report.rss_first_mb = samples[0] if samples else None
        self.report.rss_last_mb = samples[-1] if samples else None
        self.report.wall_s = round(time.monotonic() - t0, 1)
        return self.report

    def steady_action(self, k: int) -> None:
        """Even k: a publisher cycle run to the end; odd k: start an A/B test, or stop it."""
        self.report.swaps_and_tests += 1
        if self.ab_running:
            self.httpx.post(self.url + "/v1/admin/ab/stop", headers=self.headers(ADMIN_TOKEN),
                            json={}, timeout=120).raise_for_status()
            self.ab_running = False
        elif k % 2 == 0:
            subprocess.run([sys.executable, __file__, "--publisher", str(self.data),
                            "--weights", self.weights],
                           stdout=subprocess.DEVNULL, check=True, timeout=600)
        else:
            from prefloop.server.registry import Registry
            registry = Registry(self.data)
            candidates = [v for v in registry.list_versions() if v != registry.current()]
            if candidates:
                self.httpx.post(self.url + "/v1/admin/ab/start",
                                headers=self.headers(ADMIN_TOKEN), timeout=120,
                                json={"candidate": candidates[-1], "force": True}
                                ).raise_for_status()
                self.ab_running = True

    def run(self, kills: int) -> Report:
        t0 = time.monotonic()
        threads = self.begin()
        turns = ["server", "publisher", "ab"]
        try:
            for k in range(kills):
                kind = turns[k % 3] if k < 3 else self.rng.choice(turns)
                self.running.set()
                getattr(self, f"turn_{kind}")()
                time.sleep(1.0)
                self.pause()
                self.check(f"turn {k + 1} ({kind})")
                print(f"soak: turn {k + 1}/{kills} ({kind}): {self.report.acked} acked, "
                      f"{self.report.lost} lost, {self.report.duplicated} duplicated, "
                      f"{self.report.failed_outside} failed outside kills, "
                      f"{len(self.report.bad_states)} bad states", file=sys.stderr, flush=True)
        finally:
            self.end(threads)
        self.report.wall_s = round(time.monotonic() - t0, 1)
        return self.report


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_soak(work: Path, kills: int, seed: int = 0, phases: tuple[str, ...] = PHASES,
             weights: str = "full") -> Report:
    """`kills` turns (the first three: server, publisher, A/B; then random); the publisher is
    killed at one of `phases`."""
    return Soak(work, seed, phases, weights).run(kills)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="turns, one kill each (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="instead of kills: this many minutes of mixed load with a publisher "
                         "cycle or an A/B start/stop every --action-every seconds, RSS sampled "
                         "(default: off)")
    ap.add_argument("--action-every", type=float, default=300.0,
                    help="steady mode: seconds between actions (default %(default)s)")
    ap.add_argument("--work", type=Path, default=None,
                    help="working folder (default: a temporary one, removed after)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    ap.add_argument("--weights", choices=["full", "adapter"], default="full",
                    help="what the publisher publishes: a whole copy of v0000 (an A/B candidate "
                         "loads a second engine) or a LoRA adapter over it (what align jobs "
                         "publish by default: served on the same engine) (default %(default)s)")
    ap.add_argument("--publisher", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publisher is not None:
        publisher(args.publisher, args.weights)
        return 0
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.minutes:
            print(f"soak: {args.minutes:g} minutes of steady mixed load in {work}",
                  file=sys.stderr)
            report = Soak(work, args.seed, weights=args.weights).run_steady(
                args.minutes, args.action_every).summary()
            report["weights"] = args.weights
            first, last = report["rss_first_mb"], report["rss_last_mb"]
            report["rss_growth"] = (last / first - 1) if first and last else None
            cold = report.get("rss_before_actions_mb")
            report["rss_growth_vs_cold"] = (last / cold - 1) if cold and last else None
            mbs = [mb for _, mb in report.get("rss_samples") or [] if mb]
            report["rss_max_vs_cold"] = (max(mbs) / cold - 1) if cold and mbs else None
            report["minutes"] = args.minutes
        else:
            print(f"soak: {args.kills} kills in {work}", file=sys.stderr)
            report = run_soak(work, args.kills, args.seed, weights=args.weights).summary()
    if not args.minutes:
        report["kills_asked"] = args.kills
    report.update(seed=args.seed, date=time.strftime("%Y-%m-%d"),
                  command=" ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = not (report["lost"] or report["duplicated"] or report["failed_outside"]
              or report["bad_states"])
    print(f"soak: {'PASSED' if ok else 'FAILED'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
