"""`prefloop cluster up`: several `prefloop serve --replica` processes on one data root behind a
real nginx, on this machine — the one-command way to try replicas (docs/scaling.md).

    prefloop models init --data-dir data            # optional: every replica serves v0000
    prefloop cluster up --replicas 3 --data-dir data [-- SERVE FLAGS...]

Replica i (r0, r1, ...) listens on HTTP `--replica-http-port + i` and gRPC `--replica-grpc-port +
i`; nginx listens on `--http-port` (HTTP: the OpenAI API, feedback routes, the web page,
round-robin) and `--port` (gRPC, `grpc_pass`). The nginx configuration is `render_nginx_conf`,
written to `<data-dir>/cluster/nginx.conf` (`deploy/nginx.conf` is the same for three replicas):
nginx passes a request to the next replica when one refuses the connection or answers 502/503 (a
replica that is down or draining; a vote only when no replica received it), and leaves a failed
replica out for `fail_timeout`. Open-source
nginx has no active health checks; /health answers 503 while a replica drains, which the passive
check sees on the next request. A replica that dies is started again (its log recovers on start);
one that exits with status 2 (a flag it refuses) stops the cluster. `<data-dir>/cluster/
replicas.json` names each replica's pid and ports; their output goes to `cluster/<id>.log`.
A replica that exits is started again after 1 s (doubling up to 30 s while it keeps dying within a
minute); a replica that cannot start at all the first time (status 2: a flag it refuses, a port
taken) stops the cluster. Ctrl-C (or SIGTERM) stops nginx (it finishes open requests), then the
replicas (each drains and compacts its log), and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from prefloop.server.registry import DATA_DIR_ENV

CLUSTER_DIR = "cluster"


@dataclass(slots=True)
class Replica:
    id: str
    http_port: int
    grpc_port: int
    pid: int = 0
    starts: int = 0


def render_nginx_conf(replicas: list[tuple[str, int, int]], *, http_port: int = 8000,
                      grpc_port: int = 50051, host: str = "127.0.0.1",
                      max_body: str = "8m") -> str:
    """nginx.conf for `replicas` [(host, http port, grpc port)], paths relative to nginx's
    prefix (`nginx -p DIR`)."""
    http_servers = "".join(f"        server {h}:{p} max_fails=1 fail_timeout=2s;\n"
                           for h, p, _ in replicas)
    grpc_servers = "".join(f"        server {h}:{g} max_fails=1 fail_timeout=2s;\n"
                           for h, _, g in replicas)
    return f"""# prefloop replicas behind nginx (written by `prefloop cluster up`; docs/scaling.md).
# Run: nginx -p DIR -c nginx.conf   (paths below are relative to DIR)
worker_processes 1;
error_log error.log warn;
pid nginx.pid;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    client_max_body_size {max_body};

    upstream prefloop_http {{
{http_servers}        keepalive 32;
    }}

    upstream prefloop_grpc {{
{grpc_servers}    }}

    # HTTP: the OpenAI-compatible API (streams unbuffered), feedback routes, /health, the page.
    server {{
        listen {host}:{http_port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_buffering off;
        proxy_read_timeout 600s;
        proxy_next_upstream_tries 3;
        location / {{
            proxy_pass http://prefloop_http;
            # down (connection refused) or draining (503: nothing started): the next replica,
            # even for a POST - a chat asked twice is answered twice, nothing is logged twice
            proxy_next_upstream error http_502 http_503 non_idempotent;
        }}
        location /v1/feedback/ {{
            proxy_pass http://prefloop_http;
            # a vote goes to another replica only when none received it: one that died after
            # logging it must not see it logged again (the client retries, with its key)
            proxy_next_upstream error;
        }}
    }}

    # gRPC: Generation, Feedback, Models (HTTP/2 to the replicas). A draining replica answers
    # UNAVAILABLE inside HTTP 200, which nginx cannot see: gRPC clients retry it.
    server {{
        listen {host}:{grpc_port} http2;
        grpc_read_timeout 600s;
        grpc_send_timeout 600s;
        grpc_next_upstream_tries 3;
        location / {{
            grpc_pass grpc://prefloop_grpc;
            grpc_next_upstream error non_idempotent;
        }}
        location /prefloop.v1.Feedback/ {{
            grpc_pass grpc://prefloop_grpc;
            grpc_next_upstream error;
        }}
    }}
}}
"""


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A base port with `n` free ports from it on (for tests and benchmarks that start a cluster
    beside other servers)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        base, socks = rng.randrange(20000, 40000), []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind((host, port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on {host}")


def find_nginx(path: str | None) -> str | None:
    if path:
        return path if Path(path).is_file() else None
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start replicas and nginx; Ctrl-C stops them",
                        description=__doc__.split("\n\n")[0])
    up.add_argument("--replicas", type=int, default=3, help="how many (default %(default)s)")
    up.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                    help=f"the shared data root (default ${DATA_DIR_ENV} or ./data)")
    up.add_argument("--host", default="127.0.0.1",
                    help="address nginx and the replicas bind (default %(default)s)")
    up.add_argument("--http-port", type=int, default=8000,
                    help="nginx's HTTP port (default %(default)s)")
    up.add_argument("--port", type=int, default=50051, help="nginx's gRPC port (default %(default)s)")
    up.add_argument("--replica-http-port", type=int, default=8100,
                    help="HTTP port of replica r0; r1 takes the next (default %(default)s)")
    up.add_argument("--replica-grpc-port", type=int, default=50100,
                    help="gRPC port of replica r0; r1 takes the next (default %(default)s)")
    up.add_argument("--nginx", default=None, metavar="PATH",
                    help="the nginx binary (default: nginx on PATH, else /usr/sbin/nginx)")
    up.add_argument("--ready-timeout", type=float, default=600.0, metavar="SECONDS",
                    help="how long to wait for each replica's /health (default %(default)s)")
    up.add_argument("serve_args", nargs="*", metavar="-- SERVE FLAGS",
                    help="flags passed to every `prefloop serve` (after --), e.g. -- --dtype "
                         "bfloat16 --registry-poll 1")


def run(args: argparse.Namespace) -> int:
    return _up(args)


def _say(text: str) -> None:
    print(f"prefloop cluster: {text}", flush=True)


def _fail(text: str) -> int:
    print(f"prefloop cluster: {text}", file=sys.stderr, flush=True)
    return 2


def _ports_taken(host: str, ports: list[int]) -> str | None:
    from prefloop.server.api.http_server import bind

    for port in ports:
        try:
            bind(host, port).close()
        except OSError:
            return f"{host}:{port} is in use"
    return None


def _healthy(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Cluster:
    """The replica processes and nginx, started, watched and stopped."""

    def __init__(self, args: argparse.Namespace, nginx: str, work: Path) -> None:
        self.args, self.nginx, self.work = args, nginx, work
        self.replicas = [Replica(f"r{i}", args.replica_http_port + i, args.replica_grpc_port + i)
                         for i in range(args.replicas)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        self.nginx_proc: subprocess.Popen | None = None
        self.stopping = False

    def start_replica(self, r: Replica) -> None:
        cmd = [sys.executable, "-m", "prefloop.cli", "serve", "--data-dir", self.args.data_dir,
               "--replica", r.id, "--host", self.args.host, "--http-port", str(r.http_port),
               "--port", str(r.grpc_port), *self.args.serve_args]
        with open(self.work / f"{r.id}.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[r.id] = proc  # own session: a terminal's Ctrl-C reaches only `cluster up`,
        r.pid, r.starts = proc.pid, r.starts + 1  # which stops the children in order
        self.started_at[r.id] = time.monotonic()
        self.write_state()

    def write_state(self) -> None:
        state = {"nginx": {"http_port": self.args.http_port, "grpc_port": self.args.port,
                           "pid": self.nginx_proc.pid if self.nginx_proc else 0},
                 "replicas": [asdict(r) for r in self.replicas]}
        tmp = self.work / "replicas.json.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.work / "replicas.json")

    def wait_ready(self, r: Replica) -> str | None:
        deadline = time.monotonic() + self.args.ready_timeout
        while time.monotonic() < deadline and not self.stopping:
            code = self.procs[r.id].poll()
            if code is not None:
                return f"replica {r.id} exited with status {code} (see {self.work / (r.id + '.log')})"
            if _healthy(self.args.host, r.http_port):
                return None
            time.sleep(0.25)
        if self.stopping:
            return None
        return f"replica {r.id} was not healthy after {self.args.ready_timeout:g} s"

    def start_nginx(self) -> str | None:
        base = [self.nginx, "-p", str(self.work), "-c", "nginx.conf"]
        test = subprocess.run([*base, "-t"], capture_output=True, text=True)
        if test.returncode != 0:
            return "nginx rejected its configuration: " + test.stderr.strip().splitlines()[-1]
        self.nginx_proc = subprocess.Popen([*base, "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        self.write_state()
        return None

    def stop(self) -> None:
        """nginx first (SIGQUIT: it finishes the requests it has open), then the replicas
        (SIGTERM: each drains, finishes its requests and compacts its log)."""
        if self.nginx_proc is not None and self.nginx_proc.poll() is None:
            self.nginx_proc.send_signal(signal.SIGQUIT)
            _wait(self.nginx_proc, 60)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            _wait(proc, 90)


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _up(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        return _fail(f"--replicas must be >= 1, got {args.replicas}")
    nginx = find_nginx(args.nginx)
    if nginx is None:
        return _fail("nginx not found: install it (Debian/Ubuntu: apt-get install nginx) or pass "
                     "--nginx PATH")
    ports = [args.http_port, args.port, *(args.replica_http_port + i for i in range(args.replicas)),
             *(args.replica_grpc_port + i for i in range(args.replicas))]
    if len(set(ports)) != len(ports):
        return _fail("the nginx ports and the replicas' port ranges overlap")
    taken = _ports_taken(args.host, ports)
    if taken:
        return _fail(f"{taken}: pass other ports")
    work = Path(args.data_dir) / CLUSTER_DIR
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args, nginx, work)
    (work / "nginx.conf").write_text(render_nginx_conf(
        [(args.host, r.http_port, r.grpc_port) for r in cluster.replicas],
        http_port=args.http_port, grpc_port=args.port, host=args.host))

    def on_signal(signum, frame):
        cluster.stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    _say(f"starting {args.replicas} replicas on {args.data_dir} and nginx (logs in {work})")
    try:
        for r in cluster.replicas:
            cluster.start_replica(r)
        for r in cluster.replicas:
            problem = cluster.wait_ready(r)
            if problem:
                return _fail(problem)
            if cluster.stopping:
                return 0
            _say(f"replica {r.id} ready on HTTP {args.host}:{r.http_port}, gRPC "
                 f"{args.host}:{r.grpc_port}")
        problem = cluster.start_nginx()
        if problem:
            return _fail(problem)
        _say(f"ready in {time.monotonic() - t0:.0f} s: HTTP http://{args.host}:{args.http_port} "
             f"(OpenAI API, web page), gRPC {args.host}:{args.port}; Ctrl-C stops all")
        backoff: dict[str, float] = {}  # a replica that keeps dying waits longer each time
        restart_at: dict[str, float] = {}
        while True:
            time.sleep(0.2)
            if cluster.stopping:
                return 0
            if cluster.nginx_proc.poll() is not None:
                return _fail(f"nginx exited with status {cluster.nginx_proc.returncode} (see "
                             f"{work / 'error.log'})")
            now = time.monotonic()
            for r in cluster.replicas:
                code = cluster.procs[r.id].poll()
                if code is None:
                    continue
                if r.id not in restart_at:
                    lived = now - cluster.started_at[r.id]
                    backoff[r.id] = 1.0 if lived > 60 else min(30.0, 2 * backoff.get(r.id, 0.5))
                    restart_at[r.id] = now + backoff[r.id]
                    _say(f"replica {r.id} exited with status {code}; starting it again in "
                         f"{backoff[r.id]:g} s (see {work / (r.id + '.log')})")
                elif now >= restart_at[r.id]:
                    del restart_at[r.id]
                    cluster.start_replica(r)
    finally:
        cluster.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
        _say("stopped")
