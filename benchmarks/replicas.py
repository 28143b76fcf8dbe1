"""Replicas behind nginx (`prefloop cluster up`): feedback acks/s through nginx with 1 and with N
replicas, and how long a vote on another replica's answer takes compared with a vote on the
replica that answered.

For each replica count (`--replicas 1,3`), on a fresh data root with v0000 (the default model):
`prefloop cluster up`, then `--chats` chats through nginx (n=2, one token each) to have answers
to vote on, then `--votes` preferences sent through nginx by `--clients` threads as fast as they
are acknowledged (each fsync'd before its ack); acks/s = votes / wall seconds. With two or more
replicas, `--lookups` times: a chat through nginx (its `X-Prefloop-Replica` header names who
answered), then at once a vote sent straight to the replica that answered ("local") and one to
another replica ("remote"), alternating which goes first; the remote vote waits until the other
replica's log shows the answer (the WAL's 50 ms linger + the 100 ms poll, at most --peer-wait).
Latencies are from the chat's end to the ack; median and p95.

    python benchmarks/replicas.py [--replicas 1,3] [--votes 2000] [--clients 16] [--lookups 50]

The two cores of the reference machine bound every number here: three replicas and nginx share
them, so the ratio says what the shared log costs, not what more machines would give.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from prefloop.cli.cluster import free_port_block


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefloop.cli", *args], check=True,
                   capture_output=True, text=True)


class Cluster:
    def __init__(self, data: Path, replicas: int) -> None:
        base = free_port_block(2 + 2 * replicas)
        self.front = f"http://127.0.0.1:{base}"
        self.replicas = {f"r{i}": f"http://127.0.0.1:{base + 2 + i}" for i in range(replicas)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefloop.cli", "cluster", "up", "--replicas", str(replicas),
             "--data-dir", str(data), "--http-port", str(base), "--port", str(base + 1),
             "--replica-http-port", str(base + 2), "--replica-grpc-port", str(base + 2 + replicas),
             "--", "--votes-per-minute", "0", "--token-votes-per-minute", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            if "ready in" in line:
                break
        else:
            raise RuntimeError("cluster up failed")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(120)


def chat(client: httpx.Client, url: str) -> tuple[list[str], str]:
    r = client.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1, "n": 2,
        "temperature": 1.0})
    r.raise_for_status()
    return [c["response_id"] for c in r.json()["choices"]], r.headers["x-prefloop-replica"]


def vote(client: httpx.Client, url: str, ids: list[str]) -> None:
    r = client.post(url + "/v1/feedback/preference", timeout=60, json={
        "chosen_response_id": ids[1], "rejected_response_id": ids[0],
        "idempotency_key": os.urandom(12).hex()})
    r.raise_for_status()


def acks_per_second(cluster: Cluster, chats: int, votes: int, clients: int) -> float:
    with httpx.Client() as c:
        answers = [chat(c, cluster.front)[0] for _ in range(chats)]
    todo = iter(range(votes))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client() as c:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                vote(c, cluster.front, answers[i % len(answers)])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return votes / (time.perf_counter() - t0)


def lookups(cluster: Cluster, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"local": [], "remote": []}
    with httpx.Client() as c:
        for i in range(n):
            ids, answered = chat(c, cluster.front)
            done = time.perf_counter()
            other = random.choice([r for r in cluster.replicas if r != answered])
            order = [("local", answered), ("remote", other)]
            for kind, target in (order if i % 2 else order[::-1]):
                vote(c, cluster.replicas[target], ids)
                out[kind].append(time.perf_counter() - done)
                done = time.perf_counter()
    return out


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--replicas", default="1,3", help="replica counts to compare")
    ap.add_argument("--chats", type=int, default=100, help="answers to vote on")
    ap.add_argument("--votes", type=int, default=2000, help="votes per replica count")
    ap.add_argument("--clients", type=int, default=16, help="voting threads")
    ap.add_argument("--lookups", type=int, default=50, help="local/remote vote pairs")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    counts = [int(x) for x in args.replicas.split(",")]
    results: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                     "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for k in counts:
            data = Path(tmp) / f"data-{k}"
            cli("models", "init", "--data-dir", str(data))
            print(f"replicas.py: {k} replica(s): starting the cluster", flush=True)
            cluster = Cluster(data, k)
            try:
                rate = acks_per_second(cluster, args.chats, args.votes, args.clients)
                run = {"acks_per_s": rate}
                if k > 1:
                    lat = lookups(cluster, args.lookups)
                    run.update({f"{kind}_ms": {"median": 1000 * statistics.median(v),
                                               "p95": 1000 * p95(v)} for kind, v in lat.items()})
            finally:
                cluster.stop()
            results["runs"][k] = run
            print(f"replicas.py: {k} replica(s): {json.dumps(run)}", flush=True)
    first = results["runs"][counts[0]]["acks_per_s"]
    print("\nreplicas  acks/s  ratio   vote on the answering replica  on another (median / p95 ms)")
    for k, run in results["runs"].items():
        lat = (f"{run['local_ms']['median']:.0f} / {run['local_ms']['p95']:.0f}      "
               f"{run['remote_ms']['median']:.0f} / {run['remote_ms']['p95']:.0f}"
               if "local_ms" in run else "-")
        print(f"{k:>8}  {run['acks_per_s']:6.0f}  {run['acks_per_s'] / first:5.2f}x  {lat}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
