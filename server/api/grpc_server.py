"""Builds and runs the grpc.aio server: prefloop services, health, reflection, shutdown.

`PrefloopServer` wires the Generation and Models servicers (plus any extra services such as
Feedback, given as `ServiceRegistration`s) onto one grpc.aio server with the auth interceptor,
the message-size limit, optional TLS, `grpc.health.v1` (aio) and server reflection; and, with
`http_port` set, the HTTP app (server/api/http_app.py) on uvicorn in the same loop, sharing the
same `CompletionRunner`, feedback store, switcher, auth and metrics.

Graceful shutdown (`shutdown`, or SIGTERM/SIGINT under `serve_until_signal`): servicers stop
accepting (UNAVAILABLE), health turns NOT_SERVING (HTTP /health 503), then both fronts stop
while in-flight calls get `grace` seconds to finish; a second signal cancels them at once.
The server does not own the generator: whoever built it closes it after shutdown.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prefloop.proto.prefloop.v1 import (
    feedback_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from prefloop.server.api.auth import AuthConfig, AuthInterceptor
from prefloop.server.api.completions import CompletionRunner, Recorder, SamplingDefaults
from prefloop.server.api.generation import GenerationService
from prefloop.server.api.limits import Admission, Limits
from prefloop.server.api.metrics import Metrics
from prefloop.server.api.models import ModelsService

FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
MODELS_SERVICE = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 / :: to expose
    port: int = 50051  # 0 picks a free port (see PrefloopServer.port)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key enables TLS
    tls_key: str | None = None
    grace_s: float = 30.0  # how long in-flight calls may run after shutdown starts
    limits: Limits = field(default_factory=Limits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    data_dir: Path | None = None  # for services that keep files (feedback log)
    reflection: bool = True
    http_port: int | None = None  # the HTTP API's port (0 = any free port); None = no HTTP
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    replica: str | None = None  # this server's replica id on a shared data root (docs/scaling.md)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"HTTP port must be in [0, 65535], got {self.http_port}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceRegistration:
    """An extra service to serve, e.g. `ServiceRegistration("prefloop.v1.Feedback",
    feedback_pb2_grpc.add_FeedbackServicer_to_server, FeedbackService(...))`."""

    name: str  # full service name, for health and reflection
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    on_shutdown: Callable[[], Any] | None = None  # sync or async; called after the server stopped


class PrefloopServer:
    def __init__(self, generator, config: ServerConfig, *, recorder: Recorder | None = None,
                 services: Sequence[ServiceRegistration] = (), switcher=None,
                 feedback_store=None, metrics: Metrics | None = None, router=None,
                 ab=None) -> None:
        self.generator = generator
        self.config = config
        self.metrics = metrics or Metrics()
        self.admission = Admission(config.limits.max_concurrent, config.limits.max_queued)
        self.runner = CompletionRunner(generator, config.limits, self.admission, recorder,
                                       config.defaults, self.metrics, router)
        self.ab = ab  # ABController, when the server runs A/B tests
        self.generation = GenerationService(self.runner)
        self.models = ModelsService(generator, self.admission, switcher, ab,
                                    defaults=self.runner.defaults)
        self.extra_services = list(services)
        self.health = health.aio.HealthServicer()
        self.switcher = switcher
        self.feedback_store = feedback_store
        self.http = None  # HttpServer once started
        self.http_state: dict = {"draining": False, "replica": config.replica}
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None

    @property
    def service_names(self) -> list[str]:
        return [GENERATION_SERVICE, MODELS_SERVICE] + [s.name for s in self.extra_services]

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        limits = self.config.limits
        options = [
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing
        ]
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.config.auth)], options=options,
            # A backstop above admission's own queue, so floods of cheap calls stay bounded too.
            maximum_concurrent_rpcs=limits.max_concurrent + limits.max_queued + 64)
        generation_pb2_grpc.add_GenerationServicer_to_server(self.generation, server)
        models_pb2_grpc.add_ModelsServicer_to_server(self.models, server)
        for extra in self.extra_services:
            extra.add_to_server(extra.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.config.reflection:
            reflection.enable_server_reflection(
                self.service_names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        if self.config.tls_cert:
            credentials = grpc.ssl_server_credentials([(
                Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())])
            self.port = server.add_secure_port(self.config.address, credentials)
        else:
            self.port = server.add_insecure_port(self.config.address)
        if not self.port:
            raise OSError(f"could not bind {self.config.address}")
        http_sock = self._bind_http()  # before the gRPC server starts: a taken port fails cleanly
        await server.start()
        self._server = server
        if http_sock is not None:
            await self._start_http(http_sock)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._watch_engine(), name="engine-health")
        return self.port

    def _bind_http(self):
        if self.config.http_port is None:
            return None
        from prefloop.server.api.http_server import bind
        return bind(self.config.host, self.config.http_port)

    async def _start_http(self, sock) -> None:
        from prefloop.server.api.http_app import build_http_app
        from prefloop.server.api.http_server import HttpServer

        info = self.generator.info
        self.metrics.set_model(info.model_version, info.backend, info.dtype)
        self.metrics.watch_engine(self.generator.stats, self.admission)
        if self.switcher is not None:
            def on_swap(version: str, seconds: float) -> None:
                info = self.generator.info
                self.metrics.observe_swap(version, seconds)
                self.metrics.set_model(info.model_version, info.backend, info.dtype)
            self.switcher.on_swap = on_swap
        app = build_http_app(self.runner, auth=self.config.auth, metrics=self.metrics,
                             max_body_bytes=self.config.limits.max_message_bytes,
                             store=self.feedback_store, switcher=self.switcher,
                             data_dir=self.config.data_dir, state=self.http_state, ab=self.ab)
        self.http = HttpServer(app, sock, tls_cert=self.config.tls_cert, tls_key=self.config.tls_key)
        await self.http.start()

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def _set_health(self, status) -> None:
        for name in self.service_names + [""]:  # "" = the server as a whole
            await self.health.set(name, status)

    async def _watch_engine(self, interval_s: float = 1.0) -> None:
        """NOT_SERVING while the generator's engine cannot serve (e.g. vLLM's worker died), so a
        supervisor polling grpc.health.v1 restarts the server; SERVING again if it recovers.
        The Feedback service alone turns NOT_SERVING while the feedback log cannot take votes
        (a full disk, an unusable directory: `FeedbackStore.health()`), chat staying SERVING."""
        healthy, feedback_ok = True, True
        SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                                health_pb2.HealthCheckResponse.NOT_SERVING)
        while True:
            await asyncio.sleep(interval_s)
            if self._stopping is not None:
                continue
            now = bool(getattr(self.generator, "healthy", True))
            if now != healthy:
                healthy = now
                if not now:
                    log.error("the engine can no longer serve: health is NOT_SERVING")
                await self._set_health(SERVING if now else NOT_SERVING)
                feedback_ok = True  # _set_health set Feedback too: its own state is set again
            log_ok = self._feedback_log_ok()
            if log_ok != feedback_ok and FEEDBACK_SERVICE in self.service_names:
                feedback_ok = log_ok
                await self.health.set(FEEDBACK_SERVICE,
                                      SERVING if healthy and log_ok else NOT_SERVING)

    def _feedback_log_ok(self) -> bool:
        store = self.feedback_store
        if store is None or not hasattr(store, "health"):
            return True
        try:
            return store.health()["status"] == "ok"
        except Exception:  # noqa: BLE001 - a health probe must not stop the watcher
            log.exception("feedback log health probe failed")
            return False

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully (idempotent); in-flight calls get `grace` seconds (config default)."""
        if self._server is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown(
                self.config.grace_s if grace is None else grace))
        elif grace is not None and not self._stopping.done():
            await self._server.stop(grace)  # a second, shorter stop wins
        await asyncio.shield(self._stopping)

    async def _shutdown(self, grace: float) -> None:
        log.info("shutting down: new requests get UNAVAILABLE, in-flight requests have %.1f s",
                 grace)
        self.runner.accepting = False
        self.http_state["draining"] = True
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        stops = [self._server.stop(grace)]
        if self.http is not None:
            stops.append(self.http.stop(grace))
        await asyncio.gather(*stops)
        for extra in self.extra_services:
            if extra.on_shutdown is not None:
                result = extra.on_shutdown()
                if asyncio.iscoroutine(result):
                    await result
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.wait_for_termination()

    async def serve_until_signal(self, on_ready=None, relay=None) -> None:
        """Serve until SIGTERM/SIGINT, then shut down gracefully (a second signal: at once).

        `on_ready()` runs once the signal handlers are in place, so a supervisor that signals
        right after the ready line never hits the default (fatal) SIGTERM action. A loop that is
        not on the main thread gets its signals through `relay` (server/api/signal_relay.py)."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)

        def on_signal(signum: int) -> None:
            if signalled.is_set():
                log.warning("second %s: cancelling in-flight requests",
                            signal.Signals(signum).name)
                asyncio.ensure_future(self.shutdown(grace=0))
            else:
                log.info("%s received", signal.Signals(signum).name)
                signalled.set()

        if relay is not None:
            relay.connect(loop, on_signal)
        else:
            for sig in signals:
                loop.add_signal_handler(sig, on_signal, sig)
        try:
            if on_ready is not None:
                on_ready()
            await signalled.wait()
            await self.shutdown()
        finally:
            if relay is not None:
                relay.disconnect()
            else:
                for sig in signals:
                    loop.remove_signal_handler(sig)
