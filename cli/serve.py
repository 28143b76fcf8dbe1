"""`prefloop serve`: load a model and serve it over gRPC and HTTP until SIGTERM/SIGINT.

A CLI subcommand module (`add_arguments(parser)`, `run(args) -> int`, registered in
cli/main.py). It builds the generator, the `Limits`, `AuthConfig` and `ServerConfig` from flags,
adds the extra services from `build_extensions` (the feedback log plugs in there), prints one
ready line (`prefloop serve: listening on HOST:PORT ...`) to stdout once it accepts calls, and
exits 0 after a graceful shutdown.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prefloop.cli.model_args import add_model_arguments, generator_kwargs
from prefloop.server import errors
from prefloop.server.api.ab_controller import ABController
from prefloop.server.api.auth import AuthConfig
from prefloop.server.api.completions import SamplingDefaults
from prefloop.server.api.grpc_server import PrefloopServer, ServerConfig, ServiceRegistration
from prefloop.server.api.limits import Limits
from prefloop.server.api.metrics import Metrics
from prefloop.server.api.signal_relay import SignalRelay
from prefloop.server.engine.driver import MainThreadDriver
from prefloop.server.registry import DATA_DIR_ENV, Registry
from prefloop.server.serving.ab_router import ABRouter
from prefloop.server.serving.hot_swap import ModelSwitcher
from prefloop.server.serving.registry_watcher import RegistryWatcher

log = logging.getLogger("prefloop.server.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    limits = Limits()
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="HTTP port: OpenAI-compatible API, feedback routes, /metrics, /health "
                             "and the web page (0 = off; same --host, TLS and tokens as gRPC)")
    parser.add_argument("--default-temperature", type=float, default=None,
                        help="temperature of requests that leave it unset (default: the model's "
                             "generation_config.json, else 0.3)")
    parser.add_argument("--default-top-p", type=float, default=None,
                        help="top_p of requests that leave it unset (default: the model's "
                             "generation_config.json, else 0.9)")
    parser.add_argument("--default-repetition-penalty", type=float, default=None,
                        help="repetition_penalty of requests that leave it unset (> 1 makes "
                             "tokens already in the prompt or answer less likely; default: the "
                             "model's generation_config.json, else 1 = off)")
    parser.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                        help=f"where logs and feedback are written (default ${DATA_DIR_ENV} "
                             "or ./data)")
    parser.add_argument("--no-feedback-log", action="store_true",
                        help="serve without the feedback log: no generation rows, and the "
                             "Feedback service answers UNAVAILABLE (e.g. a second server on a "
                             "data dir another server logs to)")
    parser.add_argument("--replica", default=None, metavar="ID",
                        help="serve as one of several replicas sharing --data-dir behind a load "
                             "balancer: its own WAL, Parquet parts and lock under this id (letters, "
                             "digits, _ . -; 'auto': <hostname>-<http port>), votes accepted for "
                             "answers any replica served, every replica following CURRENT and the "
                             "A/B test (docs/scaling.md; default: alone on the data dir)")
    parser.add_argument("--peer-wait", type=float, default=2.0, metavar="SECONDS",
                        help="with --replica: how long a vote naming a response id this replica "
                             "does not know waits for another replica's log to show it before "
                             "404 / NOT_FOUND (default %(default)s)")
    parser.add_argument("--votes-per-minute", type=float, default=60.0, metavar="N",
                        help="feedback each voter (a token's user_id, else session_id) may send "
                             "per minute, in bursts of up to N; more gets 429 / "
                             "RESOURCE_EXHAUSTED; 0: no limit (default %(default)s)")
    parser.add_argument("--token-votes-per-minute", type=float, default=1200.0, metavar="N",
                        help="feedback one bearer token may send per minute, all its voters "
                             "together; 0: no limit (default %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=limits.max_concurrent,
                        help="requests generating at once (default %(default)s)")
    parser.add_argument("--max-queued", type=int, default=limits.max_queued,
                        help="requests waiting beyond --max-concurrent before new ones get "
                             "RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens,
                        help="longest prompt in tokens (default %(default)s; prompt + "
                             "max_tokens beyond the context follows --context-overflow)")
    parser.add_argument("--max-tokens-limit", type=int, default=limits.max_max_tokens,
                        help="largest max_tokens a request may ask for (default %(default)s)")
    parser.add_argument("--default-max-tokens", type=int, default=limits.default_max_tokens,
                        help="max_tokens of requests that leave it unset (default %(default)s)")
    parser.add_argument("--max-n", type=int, default=limits.max_n,
                        help="most completions per request (default %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=limits.max_message_bytes,
                        help="largest request message (default %(default)s)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    parser.add_argument("--auth-tokens", default=None, metavar="FILE",
                        help="bearer tokens, one '<user|admin> <token>' per line; also read "
                             "from $PREFLOOP_USER_TOKENS / $PREFLOOP_ADMIN_TOKENS "
                             "(comma-separated). No tokens: authentication off")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds in-flight requests may run after SIGTERM (default "
                             "%(default)s)")
    parser.add_argument("--no-reflection", action="store_true",
                        help="do not serve gRPC server reflection")
    parser.add_argument("--no-merge-adapters", action="store_true",
                        help="keep a version published as a LoRA adapter (align's default) as a "
                             "per-request adapter on the engine it was trained over after a "
                             "hot-swap (decode about 0.6-0.9x) instead of loading its merged "
                             "weights in the background and moving to them (the default; native "
                             "backend; the load briefly holds a second copy of the weights and KV "
                             "cache)")
    parser.add_argument("--registry-poll", type=float, default=2.0, metavar="SECONDS",
                        help="how often to check <data-dir>/registry/CURRENT and hot-swap to a newly "
                             "promoted version (0 = only through Models.Promote; the A/B test "
                             "state is then still checked every 2 s; default %(default)s)")
    parser.add_argument("--engine-thread", default="main", choices=["main", "own"],
                        help="which thread steps the native engines: the process's main thread, "
                             "with the servers on a second one, or a thread of each engine's own "
                             "(an engine stepped from a worker thread ran at 0.43x on an AMX Xeon "
                             "and 0.88x on an AVX2 EPYC; docs/performance.md; default "
                             "%(default)s)")
    parser.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                        help="the gRPC and HTTP servers' event loop: uvloop (libuv, in C) or "
                             "asyncio's own; auto takes uvloop where it is installed. On a 2-core "
                             "VM the loop shares the cores with the engine, and uvloop's cheaper "
                             "per-token work gave HTTP streaming at 32 streams 3-5 %% more tokens/s "
                             "(docs/performance.md; default %(default)s)")
    add_model_arguments(parser)


def _loop_factory(choice: str):
    """The event loop factory for `--event-loop` (None: asyncio's default loop)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop, or "
                             "--event-loop asyncio)") from None
        return None
    return uvloop.new_event_loop


def _run_loop(main, factory):
    """Run the coroutine `main` to its end on a new event loop made by `factory`."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


@dataclass
class Extensions:
    """What optional subsystems add to the server: a generation recorder and extra services."""

    recorder: object | None = None  # has record_generation(row: dict) -> None
    services: list[ServiceRegistration] = field(default_factory=list)


def build_extensions(args: argparse.Namespace, data_dir: Path, metrics: Metrics | None = None
                     ) -> Extensions:
    """The place optional subsystems hook into `serve` (the feedback log plugs in here: it
    returns its recorder and its Feedback ServiceRegistration, with an on_shutdown that flushes
    it)."""
    if getattr(args, "no_feedback_log", False):
        return Extensions()
    from prefloop.server.api.feedback import feedback_extension, store_config_from_env

    config = store_config_from_env(data_dir)
    config.replica = getattr(args, "replica", None)
    config.peer_wait_s = getattr(args, "peer_wait", config.peer_wait_s)
    config.votes_per_minute = getattr(args, "votes_per_minute", 0.0)
    config.caller_votes_per_minute = getattr(args, "token_votes_per_minute", 0.0)
    store, registration = feedback_extension(data_dir, config, metrics=metrics)
    return Extensions(recorder=store, services=[registration])


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def resolve_replica(args: argparse.Namespace) -> str | None:
    """--replica as an id ('auto': <hostname>-<http port>, the same at every restart); ValueError
    for one that cannot name files."""
    from prefloop.server.feedback.schema import check_replica_id

    replica = getattr(args, "replica", None)
    if replica is None:
        return None
    if replica == "auto":
        host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
        replica = f"{host.strip('-.') or 'host'}-{args.http_port or args.port}"
    if getattr(args, "peer_wait", 0.0) < 0:
        raise ValueError(f"--peer-wait must be >= 0, got {args.peer_wait}")
    return check_replica_id(replica)


def _config_from_args(args: argparse.Namespace) -> ServerConfig:
    args.replica = resolve_replica(args)
    for flag in ("votes_per_minute", "token_votes_per_minute"):
        if getattr(args, flag, 0.0) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (0: no limit), got "
                             f"{getattr(args, flag)}")
    limits = Limits(
        max_prompt_tokens=args.max_prompt_tokens, max_max_tokens=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        max_n=args.max_n, max_message_bytes=args.max_message_bytes,
        max_concurrent=args.max_concurrent, max_queued=args.max_queued,
        max_grammar_size=args.max_grammar_size)
    SamplingDefaults.resolve({}, temperature=args.default_temperature, top_p=args.default_top_p,
                             repetition_penalty=args.default_repetition_penalty
                             )  # checked before the model loads
    return ServerConfig(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        grace_s=args.grace, limits=limits, auth=AuthConfig.load(args.auth_tokens),
        data_dir=Path(args.data_dir), reflection=not args.no_reflection,
        http_port=args.http_port or None, replica=args.replica)


def _ports_free(config: ServerConfig) -> str | None:
    """A one-line message when a port to listen on is taken (checked before the model loads)."""
    from prefloop.server.api.http_server import bind

    for port, flag in ((config.port, "--port"), (config.http_port, "--http-port")):
        if not port:
            continue
        try:
            bind(config.host, port).close()
        except OSError:
            return f"{config.host}:{port} is in use: pass {flag}"
    return None


def _log_in_use(args: argparse.Namespace, data_dir: Path) -> str | None:
    """A one-line refusal when another process holds the feedback log of `data_dir` (checked
    before the model loads; without it the server would start and log nothing)."""
    if getattr(args, "no_feedback_log", False):
        return None
    from prefloop.server.feedback.store import lock_holder

    replica = getattr(args, "replica", None)
    pid = lock_holder(data_dir, replica)
    if pid is None:
        return None
    if replica is not None:
        return (f"replica {replica} of {data_dir} is already running (pid {pid}): give this one "
                "another --replica id")
    return (f"the feedback log in {data_dir} is in use by another process (pid {pid}, "
            "probably another prefloop serve): stop it, pass another --data-dir, pass "
            "--replica ID to run several servers on it (docs/scaling.md), or pass "
            "--no-feedback-log to serve without logging")


def run(args: argparse.Namespace) -> int:
    try:
        config = _config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"prefloop serve: {exc}", file=sys.stderr)
        return 2
    try:
        loop_factory = _loop_factory(args.event_loop)
    except ValueError as exc:
        print(f"prefloop serve: {exc}", file=sys.stderr)
        return 2
    taken = _ports_free(config) or _log_in_use(args, config.data_dir)
    if taken:
        print(f"prefloop serve: {taken}", file=sys.stderr)
        return 2
    from prefloop.server.serving.build import build_generator  # heavy (torch): imported only when serving
    from prefloop.server.serving.memory import limit_malloc_arenas, limit_shape_caches

    limit_malloc_arenas()  # before the server's threads (server/serving/memory.py)
    limit_shape_caches()  # before the first matmul (same module)

    registry = Registry(config.data_dir)
    kwargs = generator_kwargs(args)
    kwargs["merge_adapters"] = not args.no_merge_adapters
    driver = None
    if args.backend == "native" and args.engine_thread == "main":
        driver = kwargs["driver"] = MainThreadDriver()
    try:
        current = registry.current()
        if current is not None:  # a registry exists: it decides what is served
            if args.model:
                log.warning("--model %s ignored: the registry in %s serves %s", args.model,
                            config.data_dir, current)
            registry.check(current)
            kwargs.update(model=str(registry.version_dir(current)), model_version=current)
        generator = build_generator(**kwargs)
    except (errors.PrefloopError, FileNotFoundError) as exc:
        print(f"prefloop serve: cannot load the model: {exc}", file=sys.stderr)
        return 2
    config.defaults = SamplingDefaults.resolve(
        getattr(generator.info, "sampling_defaults", None), temperature=args.default_temperature,
        top_p=args.default_top_p, repetition_penalty=args.default_repetition_penalty)
    switcher = ModelSwitcher(generator, registry, poll_interval_s=args.registry_poll)
    if driver is None:
        return _run_loop(_serve(generator, config, args, switcher, registry), loop_factory)
    log.info("the native engines step on the main thread; gRPC and HTTP run on a second one "
             "(--engine-thread main)")
    relay = SignalRelay()  # the servers' loop is not on the main thread: signals reach it here
    try:
        return driver.run_beside(
            lambda: _run_loop(_serve(generator, config, args, switcher, registry, relay),
                              loop_factory),
            on_failure=relay.raise_signal)
    finally:
        relay.restore()


async def _serve(generator, config: ServerConfig, args: argparse.Namespace,
                 switcher: ModelSwitcher, registry: Registry, relay: SignalRelay | None = None
                 ) -> int:
    await generator.start()
    router = ABRouter(generator, registry.version_dir)
    ab = ABController(registry, router, config.data_dir, poll_s=args.registry_poll or 2.0,
                      switcher=switcher)
    watcher = RegistryWatcher(poll_s=args.registry_poll or 2.0)  # one task polls both
    switcher.watch(watcher)  # CURRENT (not when --registry-poll is 0)
    ab.watch(watcher)  # AB.json
    metrics = Metrics()
    extensions = build_extensions(args, config.data_dir, metrics)
    server = PrefloopServer(generator, config, recorder=extensions.recorder,
                            services=extensions.services, switcher=switcher,
                            feedback_store=extensions.recorder, metrics=metrics, router=router,
                            ab=ab)
    try:
        try:
            port = await server.start()
        except (OSError, RuntimeError) as exc:
            print(f"prefloop serve: cannot listen on {config.address}: {exc}", file=sys.stderr)
            return 2
        info = generator.info
        ready = (f"prefloop serve: listening on {config.host}:{port} "
                 f"(model {info.model_version}, {info.backend} {info.dtype}, "
                 f"tls {'on' if config.tls_cert else 'off'}, "
                 f"auth {'on' if config.auth.enabled else 'off'}, "
                 f"sampling defaults temperature {config.defaults.temperature} top_p "
                 f"{config.defaults.top_p} repetition_penalty "
                 f"{config.defaults.repetition_penalty})")
        if server.http_port is not None:
            scheme = "https" if config.tls_cert else "http"
            ready += f"; HTTP on {scheme}://{config.host}:{server.http_port} (chat page at /)"
        try:
            await ab.start()  # resumes a running A/B test (loads its candidate)
        except Exception as exc:  # noqa: BLE001 - serve the current version anyway
            log.error("cannot resume the A/B test: %s", exc)
        await watcher.start()
        await server.serve_until_signal(on_ready=lambda: print(ready, flush=True), relay=relay)
    finally:
        await watcher.close()
        await ab.close()
        await server.shutdown(grace=0)  # no-op after a graceful shutdown
        await generator.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `serve` on its own: `python -m prefloop.cli.serve --port 0`."""
    parser = argparse.ArgumentParser(prog="prefloop serve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_arguments(parser)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
