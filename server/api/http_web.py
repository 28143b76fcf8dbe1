"""The open HTTP routes: GET /health (503 while draining or when the engine cannot serve; 200 with
`feedback.status` "unavailable" and its reason when only the feedback log cannot take votes, e.g.
a full disk: chat still works, so a balancer keeps the replica),
GET /metrics (Prometheus text), and the web page — `/` (index.html), `/favicon.ico` (the page's
SVG icon) and `/static/*` (server/api/web/, shipped as package data).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from prefloop.server.api.http_deps import Ctx, json_error
from prefloop.server.api.metrics import CONTENT_TYPE

WEB_DIR = Path(__file__).parent / "web"

router = APIRouter()


@router.get("/health")
async def health(ctx: Ctx):
    generator = ctx.generator
    info = generator.info
    if ctx.state.get("draining"):
        return json_error(503, "the server is shutting down")
    if not getattr(generator, "healthy", True):
        return json_error(503, "the engine cannot serve")
    out = {"status": "ok", "model_version": info.model_version}
    if ctx.state.get("replica"):
        out["replica"] = ctx.state["replica"]
    if ctx.store is not None:  # chat still serves when the log cannot: 200, with the reason
        out["feedback"] = ctx.store.health()
    return out


@router.get("/metrics")
async def prometheus(ctx: Ctx):
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


page_router = APIRouter(include_in_schema=False)


@page_router.get("/")
async def page():
    return FileResponse(WEB_DIR / "index.html")


@page_router.get("/favicon.ico")
async def favicon():  # browsers ask for it whatever the page links
    return FileResponse(WEB_DIR / "icon.svg", media_type="image/svg+xml")


def add_web(app: FastAPI) -> None:
    """/health and /metrics; the page, its icon and /static when the page is installed."""
    app.include_router(router)
    if (WEB_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
        app.include_router(page_router)
