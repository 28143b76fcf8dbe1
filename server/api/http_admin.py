"""The HTTP admin routes (admin token): GET /v1/admin/versions (the registry, each version's
metrics and gate, the live A/B verdict), GET /v1/admin/jobs (one `JobRecord` per align job, newest
last), POST /v1/admin/{promote,rollback}, the A/B test (GET /v1/admin/ab, POST .../ab/start,
.../ab/stop) and GET /v1/admin/feedback/daily (votes per day).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Request

from prefloop.server.ab import state as ab_state
from prefloop.server.api.auth import Role
from prefloop.server.api.http_deps import Ctx, json_body
from prefloop.server.errors import InvalidArgument
from prefloop.server.jobs import job_history
from prefloop.server.version_summary import VersionSummary

router = APIRouter()

AB_START_FIELDS = {"candidate", "traffic", "sticky", "min_votes", "confidence", "max_duration",
                   "futility_win", "force"}


@router.get("/v1/admin/versions")
async def versions(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    sw = ctx.registry_switcher()
    rows = await asyncio.to_thread(sw.list_versions)
    test = await asyncio.to_thread(ab_state.read_state, sw.registry)
    out = []
    for r in rows:
        metrics = json.loads(r["metrics_json"] or "{}")
        gate = json.loads(r["gate_json"] or "{}")
        ab_win_rate = None
        if test is not None and test.candidate == r["version"]:  # the live votes' verdict
            votes = test.wins + test.losses
            ab_win_rate = test.wins / votes if votes else None
            metrics["ab"] = {"status": test.status, "wins": test.wins, "losses": test.losses,
                             "win_rate": ab_win_rate, "against": test.control}
        out.append({**{k: v for k, v in r.items() if not k.endswith("_json")},
                    "metrics": metrics, "gate": gate,
                    "summary": VersionSummary.of(metrics, gate, ab_win_rate).to_dict()})
    return {"current_version": sw.registry.current() or "", "serving_version": sw.serving,
            "versions": out}


@router.get("/v1/admin/jobs")
async def jobs(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    records = await asyncio.to_thread(job_history, ctx.registry_switcher().registry)
    return {"jobs": [dict(record.to_dict(),  # newest last
                          summary=VersionSummary.of(record.metrics, record.gate).to_dict())
                     for record in records]}


@router.post("/v1/admin/promote")
async def promote(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    body = await json_body(request) or {}
    if not isinstance(body, dict) or not isinstance(body.get("version"), str) or not body["version"]:
        raise InvalidArgument("send {\"version\": \"vNNNN\"} (and optionally reason, force)")
    previous, current = await ctx.registry_switcher().promote(
        body["version"], reason=str(body.get("reason") or ""), actor="http",
        force=bool(body.get("force")))
    return {"previous_version": previous, "current_version": current}


@router.post("/v1/admin/rollback")
async def rollback(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    body = await json_body(request) or {}
    previous, current = await ctx.registry_switcher().rollback(
        reason=str(body.get("reason") or "") if isinstance(body, dict) else "", actor="http")
    return {"previous_version": previous, "current_version": current}


@router.get("/v1/admin/ab")
async def ab_status(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    return await ctx.ab_controller().status()


@router.post("/v1/admin/ab/start")
async def ab_start(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("candidate"), str):
        raise InvalidArgument('send {"candidate": "vNNNN"} and optionally traffic, sticky, '
                              "min_votes, confidence, max_duration, futility_win, force")
    unknown = sorted(set(body) - AB_START_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown field(s): {', '.join(unknown)}")
    for name, kind in (("traffic", (int, float)), ("confidence", (int, float)),
                       ("min_votes", int), ("futility_win", (int, float))):
        if name in body and (isinstance(body[name], bool) or not isinstance(body[name], kind)):
            raise InvalidArgument(f"{name} must be a number")
    return await ctx.ab_controller().start_test(
        body["candidate"], traffic=body.get("traffic"), sticky=str(body.get("sticky") or ""),
        min_votes=body.get("min_votes"), confidence=body.get("confidence"),
        max_duration=str(body.get("max_duration") or ""), force=bool(body.get("force")),
        futility_win=body.get("futility_win"))


@router.post("/v1/admin/ab/stop")
async def ab_stop(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    body = await json_body(request) or {}
    if not isinstance(body, dict):
        raise InvalidArgument('send {"outcome": "promote" | "reject" | ""}')
    return await ctx.ab_controller().stop_test(str(body.get("outcome") or ""),
                                               str(body.get("reason") or ""))


@router.get("/v1/admin/feedback/daily")
async def feedback_daily(request: Request, ctx: Ctx):
    ctx.require(request, Role.ADMIN)
    if ctx.data_dir is None:
        return {"days": []}
    return {"days": await asyncio.to_thread(feedback_per_day, ctx.data_dir)}


def feedback_per_day(data_dir: Path) -> list[dict]:
    from prefloop.server.feedback import export

    table = export.load_table(data_dir, "feedback", columns=["kind", "date"])
    counts: dict[str, dict] = {}
    for kind, date in zip(table.column("kind").to_pylist(), table.column("date").to_pylist()):
        day = counts.setdefault(date, {"date": date, "preferences": 0, "ratings": 0})
        day["preferences" if kind == "preference" else "ratings"] += 1
    return [counts[d] for d in sorted(counts)]
