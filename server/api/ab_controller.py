"""ABController: runs the registry's A/B test on this server — follows its state, counts the live
votes, applies the decision rule, and concludes the test.

On each poll of the `RegistryWatcher` it subscribes to (`watch`) it reads `<registry>/AB.json` (so
a test started by the CLI, another server or an align job is picked up, and survives restarts),
lets the `ABRouter` load or retire the candidate, and tallies the evidence from the feedback log
since the test started: head-to-head preferences between an answer of each version (a win when the
candidate's answer was chosen), and thumbs / stars per version. `server/ab/decision.py` decides; a
promotion moves CURRENT (the switcher then serves the candidate on the main engine), a rejection
leaves it; both are registry history lines naming the evidence. Counting reads the log (Parquet +
WAL) incrementally: each look reads what the log gained since the last (server/ab/evidence.py).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from prefloop.server.ab import decision
from prefloop.server.ab import state as ab_state
from prefloop.server.ab.evidence import EvidenceReader, verdict
from prefloop.server.ab.evidence import status as ab_status
from prefloop.server.errors import FailedPrecondition, InvalidArgument, NotFound
from prefloop.server.registry import Registry
from prefloop.server.serving.ab_router import ABRouter
from prefloop.server.serving.registry_watcher import RegistryWatcher

log = logging.getLogger(__name__)


class ABController:
    def __init__(self, registry: Registry, router: ABRouter, data_dir: Path,
                 poll_s: float = 2.0, switcher=None) -> None:
        """`poll_s` > 0: `watch` runs `check` on every poll of the watcher (whose own interval
        sets how often); 0: only `start` and the admin operations look."""
        self.registry = registry
        self.switcher = switcher  # ModelSwitcher: serves the promoted candidate on the main engine
        self.router = router
        self.data_dir = Path(data_dir)
        self.evidence = EvidenceReader(self.data_dir)  # reads only what the log gained per look
        self.poll_s = poll_s
        self._damage_logged = ""

    def watch(self, watcher: RegistryWatcher) -> None:
        """Run `check` on each poll of `watcher` (unless poll_s is 0); the watcher logs a failed
        look and keeps polling."""
        if self.poll_s > 0:
            watcher.subscribe(self.check)

    async def start(self) -> None:
        """The first look: resumes a running A/B test (loads its candidate)."""
        await self.check()

    async def close(self) -> None:
        await self.router.close()

    async def check(self) -> ab_state.ABState | None:
        """One look: follow the state, decide on the votes so far, conclude if decided. A damaged
        state file serves CURRENT alone (logged once per distinct damage)."""
        try:
            state = await asyncio.to_thread(ab_state.read_state, self.registry)
        except FailedPrecondition as exc:
            if str(exc) != self._damage_logged:
                log.error("%s", exc)
                self._damage_logged = str(exc)
            state = None
        if state is not None and state.running:
            counts = await asyncio.to_thread(self.evidence.tally, state)
            now = verdict(state, counts)
            if now.outcome == decision.RUNNING:
                await asyncio.to_thread(ab_state.record_tally, self.registry, counts.wins,
                                        counts.losses)
            else:
                outcome = ab_state.PROMOTED if now.outcome == decision.PROMOTE else ab_state.REJECTED
                try:
                    state = await asyncio.to_thread(
                        ab_state.conclude, self.registry, outcome, now.reason,
                        wins=counts.wins, losses=counts.losses)
                    log.info("A/B test concluded: %s %s (%s)", state.candidate, outcome,
                             now.reason)
                    if outcome == ab_state.PROMOTED and self.switcher is not None:
                        await self.switcher.follow_now()  # before the candidate's engine goes
                except Exception as exc:  # noqa: BLE001 - e.g. another server concluded it first
                    log.info("A/B conclusion by this server skipped: %s", exc)
                    state = await asyncio.to_thread(ab_state.read_state, self.registry)
        await self.router.sync(state)
        return state

    # ---- admin operations (Models RPCs, HTTP admin routes) -------------------------------------

    async def start_test(self, candidate: str, *, traffic: float | None = None, sticky: str = "",
                         min_votes: int | None = None, confidence: float | None = None,
                         max_duration: str = "", force: bool = False,
                         futility_win: float | None = None) -> dict:
        control = self.router.control
        if getattr(control, "reloads_in_place", False) \
                and not getattr(control, "supports_adapters", False):  # refused before any write
            raise FailedPrecondition(
                f"the {control.info.backend} backend holds one set of weights: an A/B candidate "
                "must be a LoRA adapter version over the served one, served with --enable-lora "
                "(or serve with --backend native, which loads a second engine)")
        settings: dict = {}
        if traffic is not None:
            settings["traffic"] = traffic
        if sticky:
            settings["sticky"] = sticky
        if min_votes is not None:
            settings["min_votes"] = min_votes
        if confidence is not None:
            settings["confidence"] = confidence
        if max_duration:
            settings["max_duration_s"] = ab_state.parse_duration(max_duration)
        if futility_win is not None:
            settings["futility_win"] = futility_win
        await asyncio.to_thread(ab_state.start, self.registry, candidate, force=force, **settings)
        try:
            await self.check()  # loads the candidate beside the current version
        except Exception as exc:
            await asyncio.to_thread(ab_state.conclude, self.registry, ab_state.STOPPED,
                                    f"the candidate could not be loaded: {exc}")
            raise
        return await self.status()

    async def stop_test(self, outcome: str = "", reason: str = "") -> dict:
        outcomes = {"": ab_state.STOPPED, "stop": ab_state.STOPPED, "promote": ab_state.PROMOTED,
                    "reject": ab_state.REJECTED}
        if outcome not in outcomes:
            raise InvalidArgument(f"outcome must be promote, reject or empty (stop), got {outcome!r}")
        state = await asyncio.to_thread(ab_state.running_state, self.registry)
        if state is None:
            raise NotFound("no A/B test is running")
        counts = await asyncio.to_thread(self.evidence.tally, state)
        text = (reason or f"{outcomes[outcome]} by an admin") + f" ({counts.wins} wins, " \
                                                               f"{counts.losses} losses)"
        await asyncio.to_thread(ab_state.conclude, self.registry, outcomes[outcome], text,
                                actor="admin", wins=counts.wins, losses=counts.losses)
        if outcomes[outcome] == ab_state.PROMOTED and self.switcher is not None:
            await self.switcher.follow_now()
        await self.check()
        return await self.status()

    async def status(self) -> dict:
        return await asyncio.to_thread(ab_status, self.registry, self.data_dir)
