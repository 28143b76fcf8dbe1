"""The HTTP API (FastAPI): OpenAI-compatible routes, feedback routes, admin routes, health,
Prometheus metrics and the web page — one ASGI app beside the gRPC server, same process and loop.

It shares everything with gRPC: the `CompletionRunner` (limits, defaults, admission, generation
log, metrics), the `FeedbackStore` (same validation and durability: a 2xx means fsync'd), the
`ModelSwitcher` (registry, hot-swap) and the bearer tokens (`Authorization: Bearer`; user routes
need a user or admin token, /v1/admin/* an admin token; /health, /metrics and the page are open).
Typed errors become HTTP statuses in `status_mapping.http_status_of`, with OpenAI's error body,
so the `openai` SDK raises its own exceptions. Bodies over `--max-message-bytes` get 413 before
they are read. A client that disconnects aborts its request in the engine.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from prefloop.server.ab import state as ab_state
from prefloop.server.api import openai_compat as oa
from prefloop.server.api.auth import AuthConfig, Role
from prefloop.server.api.completions import Call, CompletionRunner, RequestMeta
from prefloop.server.api.metrics import CONTENT_TYPE, Metrics
from prefloop.server.api.status_mapping import details_of, http_status_of
from prefloop.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PrefloopError,
    Unauthenticated,
)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
OPEN_PATHS = ("/health", "/metrics", "/static/")
MODEL_ALIASES = ("prefloop", "default")


def _json_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(oa.error_body(status, message, code), status_code=status)


class LimitBody:
    """ASGI middleware: 413 for a body over `max_bytes`, before the app reads it (Content-Length
    checked first; a chunked body is read here, up to the limit, and then handed on)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send, f"has {int(length)} bytes")
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:  # no length given: read the chunks here, counting
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(scope, receive, send, f"exceeds {self.max_bytes} bytes")
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, what: str):
        response = _json_error(413, f"the request body {what}; the server limit is "
                                    f"{self.max_bytes} bytes (--max-message-bytes)")
        return await response(scope, receive, send)


class CountRequests:
    """ASGI middleware: every HTTP request counted by route and status in the metrics."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = f"{scope['method']} {path if path.startswith('/v1/') else 'other'}"
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels("http", route, str(status)).inc()


def build_http_app(runner: CompletionRunner, *, auth: AuthConfig, metrics: Metrics,
                   max_body_bytes: int, store=None, switcher=None, data_dir: Path | None = None,
                   state: dict | None = None, ab=None) -> FastAPI:
    """The ASGI app. `state["draining"]` (set at shutdown) turns /health to 503."""
    app = FastAPI(title="prefloop", docs_url="/docs", redoc_url=None)
    state = state if state is not None else {}
    generator = runner.generator

    # ---- cross-cutting: errors, auth, metrics ------------------------------------------------

    @app.exception_handler(PrefloopError)
    async def typed_error(request: Request, exc: PrefloopError):
        return _json_error(http_status_of(exc), details_of(exc), exc.code.lower())

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return _json_error(500, details_of(exc, getattr(request.state, "request_id", None)))

    def role_of(request: Request) -> Role | None:
        """The caller's role (ADMIN when auth is off); Unauthenticated for a missing/bad token."""
        if not auth.enabled:
            return Role.ADMIN
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        role = auth.role_of(token.strip())
        if role is None:
            raise Unauthenticated("invalid token")
        return role

    def require(request: Request, needed: Role) -> Role:
        role = role_of(request)
        if role < needed:
            raise PermissionDenied("this route needs an admin token")
        return role

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None

    def check_model(model: str | None) -> str:
        served = generator.info.model_version
        if model is None or model in MODEL_ALIASES or model == served:
            return model or served
        raise NotFound(f"model {model!r} is not being served (this server serves {served!r}; "
                       "GET /v1/models lists it; promote a version to serve it)")

    # ---- generation --------------------------------------------------------------------------

    async def run_request(request: Request, req: oa.ParsedRequest, route: str, chat: bool):
        model = check_model(req.model)
        meta = RequestMeta(api="http", method=route, session_id=req.session_id,
                           user_id=req.user_id)
        if req.stream:
            return StreamingResponse(stream_events(request, req, meta, model, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with runner.call(meta) as call:
            request.state.request_id = call.request_id
            work = asyncio.ensure_future(collect(call, req))
            watcher = asyncio.ensure_future(cancel_on_disconnect(request, work))
            try:
                await work
            finally:
                watcher.cancel()
            build = oa.chat_response if chat else oa.completion_response
            return build(call.request_id, model, call.model_version, choices_of(call),
                         call.prompt_tokens)

    def prepare(call: Call, req: oa.ParsedRequest):
        runner.route(call, compare=req.compare)
        if req.compare and len(call.generators) == 1:  # no A/B test: two samples of one version
            req.sampling["n"] = 2
        prompt_ids = (runner.chat_ids(call, req.messages) if req.messages is not None
                      else runner.prompt_ids(call, req.prompt))
        params = runner.params(call, prompt_ids, max_tokens=req.max_tokens, stop=req.stop,
                               **req.sampling)
        return runner.run(call, prompt_ids, params, prompt=req.prompt, messages=req.messages)

    async def collect(call: Call, req: oa.ParsedRequest) -> None:
        async for _ in prepare(call, req):
            pass

    async def cancel_on_disconnect(request: Request, work: asyncio.Future) -> None:
        """The body is read: the next ASGI message is the client's disconnect."""
        while not work.done():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                work.cancel()
                return

    def choices_of(call: Call) -> list[dict]:
        return [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                 "response_id": c.response_id, "model_version": c.model_version or call.model_version,
                 "completion_tokens": c.completion_tokens} for c in call.completions]

    async def stream_events(request: Request, req: oa.ParsedRequest, meta: RequestMeta,
                            model: str, chat: bool) -> AsyncIterator[str]:
        created = int(time.time())
        try:
            async with runner.call(meta) as call:
                generation = prepare(call, req)
                started: set[int] = set()
                try:
                    async for state, delta in generation:
                        if chat:
                            body = {"content": delta.text_delta} if delta.text_delta else {}
                            if state.index not in started:
                                body = {"role": "assistant", **body}
                                started.add(state.index)
                            chunk = oa.chat_chunk(call.request_id, model, state.model_version,
                                                  state.index, state.response_id, body,
                                                  delta.finish_reason, created)
                        else:
                            chunk = oa.completion_chunk(call.request_id, model, state.model_version,
                                                        state.index, state.response_id,
                                                        delta.text_delta, delta.finish_reason,
                                                        created)
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                finally:
                    await generation.aclose()  # a disconnect aborts the request in the engine
                if req.include_usage:
                    tokens = sum(c.completion_tokens for c in call.completions)
                    yield "data: " + json.dumps({
                        "id": call.request_id, "object": "chat.completion.chunk" if chat
                        else "text_completion", "created": created, "model": model,
                        "model_version": call.model_version, "choices": [],
                        "usage": oa.usage(call.prompt_tokens, tokens)}) + "\n\n"
        except PrefloopError as exc:  # headers are sent: the error travels as an SSE event
            status = http_status_of(exc)
            yield f"data: {json.dumps(oa.error_body(status, details_of(exc), exc.code.lower()))}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        require(request, Role.USER)
        req = oa.parse_chat(await json_body(request))
        return await run_request(request, req, "POST /v1/chat/completions", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        require(request, Role.USER)
        req = oa.parse_completion(await json_body(request))
        return await run_request(request, req, "POST /v1/completions", chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        require(request, Role.USER)
        info = generator.info
        serving = info.model_version
        versions = [serving]
        current = serving
        if switcher is not None:
            current = switcher.registry.current() or serving
            versions += [v for v in await asyncio.to_thread(switcher.registry.list_versions)
                         if v != serving]
        return {"object": "list", "data": [
            {"id": v, "object": "model", "created": 0, "owned_by": "prefloop",
             "serving": v == serving, "current": v == current,
             **({"context_length": info.context_length, "backend": info.backend,
                 "dtype": info.dtype, "sampling_defaults": runner.defaults.as_dict()}
                if v == serving else {})} for v in versions]}

    @app.get("/v1/whoami")
    async def whoami(request: Request):
        if not auth.enabled:
            return {"role": "anonymous", "auth": False}
        role = role_of(request)
        return {"role": "admin" if role == Role.ADMIN else "user", "auth": True}

    # ---- feedback ------------------------------------------------------------------------------

    def feedback_store():
        if store is None:
            raise FailedPrecondition("this server keeps no feedback log")
        return store

    def fields(body: Any, allowed: tuple[str, ...]) -> dict:
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise InvalidArgument(f"unknown field(s): {', '.join(unknown)}; expected "
                                  f"{', '.join(allowed)}")
        for name, value in body.items():
            if name not in ("score", "prompt_messages") and value is not None and not isinstance(value, str):
                raise InvalidArgument(f"{name} must be a string")
        return {k: v for k, v in body.items() if v is not None}

    @app.post("/v1/feedback/preference")
    async def preference(request: Request):
        require(request, Role.USER)
        body = fields(await json_body(request), (
            "chosen_response_id", "rejected_response_id", "prompt_messages", "chosen_text",
            "rejected_text", "comment", "idempotency_key", "user_id", "session_id"))
        messages = body.pop("prompt_messages", None)
        if messages is not None:
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in messages):
                raise InvalidArgument("prompt_messages must be a list of {role, content} strings")
            body["prompt_messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
        started = time.perf_counter()
        ack = await feedback_store().asubmit_preference(**body)
        metrics.observe_feedback("preference", "http", ack.duplicate, started)
        return {"feedback_id": ack.feedback_id, "duplicate": ack.duplicate}

    @app.post("/v1/feedback/rating")
    async def rating(request: Request):
        require(request, Role.USER)
        body = fields(await json_body(request), (
            "response_id", "score", "scale", "comment", "idempotency_key", "user_id", "session_id"))
        score = body.get("score")
        if isinstance(score, bool) or not isinstance(score, int):
            raise InvalidArgument(f"score must be an integer (-1/+1 thumbs, 1..5 stars), got {score!r}")
        scale = body.pop("scale", None) or None
        if scale not in (None, "thumbs", "stars"):
            raise InvalidArgument(f"scale must be 'thumbs' or 'stars', got {scale!r}")
        started = time.perf_counter()
        ack = await feedback_store().asubmit_rating(scale=scale, **body)
        metrics.observe_feedback("rating", "http", ack.duplicate, started)
        return {"feedback_id": ack.feedback_id, "duplicate": ack.duplicate}

    # ---- admin -----------------------------------------------------------------------------------

    def registry_switcher():
        if switcher is None:
            raise FailedPrecondition("this server has no model registry (--data-dir with registry/)")
        return switcher

    @app.get("/v1/admin/versions")
    async def versions(request: Request):
        require(request, Role.ADMIN)
        sw = registry_switcher()
        rows = await asyncio.to_thread(sw.list_versions)
        test = await asyncio.to_thread(ab_state.read_state, sw.registry)
        versions = []
        for r in rows:
            metrics = json.loads(r["metrics_json"] or "{}")
            if test is not None and test.candidate == r["version"]:  # the live votes' verdict
                votes = test.wins + test.losses
                metrics["ab"] = {"status": test.status, "wins": test.wins, "losses": test.losses,
                                 "win_rate": test.wins / votes if votes else None,
                                 "against": test.control}
            versions.append({**{k: v for k, v in r.items() if not k.endswith("_json")},
                             "metrics": metrics, "gate": json.loads(r["gate_json"] or "{}")})
        return {"current_version": sw.registry.current() or "", "serving_version": sw.serving,
                "versions": versions}

    @app.get("/v1/admin/jobs")
    async def jobs(request: Request):
        require(request, Role.ADMIN)
        path = registry_switcher().registry.root / "jobs.jsonl"
        return {"jobs": await asyncio.to_thread(_read_jsonl, path)}

    @app.post("/v1/admin/promote")
    async def promote(request: Request):
        require(request, Role.ADMIN)
        body = await json_body(request) or {}
        if not isinstance(body, dict) or not isinstance(body.get("version"), str) or not body["version"]:
            raise InvalidArgument("send {\"version\": \"vNNNN\"} (and optionally reason, force)")
        previous, current = await registry_switcher().promote(
            body["version"], reason=str(body.get("reason") or ""), actor="http",
            force=bool(body.get("force")))
        return {"previous_version": previous, "current_version": current}

    @app.post("/v1/admin/rollback")
    async def rollback(request: Request):
        require(request, Role.ADMIN)
        body = await json_body(request) or {}
        previous, current = await registry_switcher().rollback(
            reason=str(body.get("reason") or "") if isinstance(body, dict) else "", actor="http")
        return {"previous_version": previous, "current_version": current}

    def ab_controller():
        if ab is None:
            raise FailedPrecondition("this server runs no A/B tests (it has no model registry)")
        return ab

    @app.get("/v1/admin/ab")
    async def ab_status(request: Request):
        require(request, Role.ADMIN)
        return await ab_controller().status()

    @app.post("/v1/admin/ab/start")
    async def ab_start(request: Request):
        require(request, Role.ADMIN)
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("candidate"), str):
            raise InvalidArgument('send {"candidate": "vNNNN"} and optionally traffic, sticky, '
                                  "min_votes, confidence, max_duration, force")
        allowed = {"candidate", "traffic", "sticky", "min_votes", "confidence", "max_duration", "force"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidArgument(f"unknown field(s): {', '.join(unknown)}")
        for name, kind in (("traffic", (int, float)), ("confidence", (int, float)),
                           ("min_votes", int)):
            if name in body and (isinstance(body[name], bool) or not isinstance(body[name], kind)):
                raise InvalidArgument(f"{name} must be a number")
        return await ab_controller().start_test(
            body["candidate"], traffic=body.get("traffic"), sticky=str(body.get("sticky") or ""),
            min_votes=body.get("min_votes"), confidence=body.get("confidence"),
            max_duration=str(body.get("max_duration") or ""), force=bool(body.get("force")))

    @app.post("/v1/admin/ab/stop")
    async def ab_stop(request: Request):
        require(request, Role.ADMIN)
        body = await json_body(request) or {}
        if not isinstance(body, dict):
            raise InvalidArgument('send {"outcome": "promote" | "reject" | ""}')
        return await ab_controller().stop_test(str(body.get("outcome") or ""),
                                               str(body.get("reason") or ""))

    @app.get("/v1/admin/feedback/daily")
    async def feedback_daily(request: Request):
        require(request, Role.ADMIN)
        if data_dir is None:
            return {"days": []}
        return {"days": await asyncio.to_thread(_feedback_per_day, data_dir)}

    # ---- health, metrics, the page -----------------------------------------------------------------

    @app.get("/health")
    async def health():
        info = generator.info
        if state.get("draining"):
            return _json_error(503, "the server is shutting down")
        if not getattr(generator, "healthy", True):
            return _json_error(503, "the engine cannot serve")
        return {"status": "ok", "model_version": info.model_version}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if (WEB_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(WEB_DIR / "index.html")

    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    return app


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return out


def _feedback_per_day(data_dir: Path) -> list[dict]:
    from prefloop.server.feedback import export

    table = export.load_table(data_dir, "feedback", columns=["kind", "date"])
    counts: dict[str, dict] = {}
    for kind, date in zip(table.column("kind").to_pylist(), table.column("date").to_pylist()):
        day = counts.setdefault(date, {"date": date, "preferences": 0, "ratings": 0})
        day["preferences" if kind == "preference" else "ratings"] += 1
    return [counts[d] for d in sorted(counts)]
