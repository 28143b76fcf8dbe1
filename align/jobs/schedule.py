"""`prefloop align schedule METHOD --every 6h [run options]`: run `prefloop align run METHOD` on a
timer.

Each job is a subprocess (`python -m prefloop.cli align run METHOD ...` with the same run
options), so a crash or a memory peak of one job never takes the timer down, and the job
lock still keeps a manual job and a scheduled one apart (a tick that finds
the lock held is logged and skipped; the lock is server/jobs.py's). Ticks are anchored to the start time: a job longer than the
interval makes the next tick start right after it, never two at once. SIGTERM / SIGINT stop the loop; a job in
progress is asked to stop with SIGTERM (it records itself as failed and leaves no partial
version).
"""
from __future__ import annotations

import argparse
import logging
import re
import signal
import subprocess
import sys
import threading
import time

from prefloop.server.errors import InvalidArgument

log = logging.getLogger("prefloop.align.jobs.schedule")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SCHEDULE_ONLY = {"every", "max_runs", "no_initial_run"}


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "30m", "6h", "1d" or a sum like "1h30m"."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise InvalidArgument(f"{text!r} is not a duration (e.g. 90s, 30m, 6h, 1d, 1h30m)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise InvalidArgument(f"duration {text!r} must be positive")
    return seconds


def run_argv(args: argparse.Namespace, add_run_arguments) -> list[str]:
    """`align run` flags equal to the parsed schedule's (only those that differ from defaults);
    `add_run_arguments(parser)` declares them (the align command passes its own)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_run_arguments(parser)
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in _SCHEDULE_ONLY:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if isinstance(action, argparse.BooleanOptionalAction) \
            else action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(f"--{action.dest.replace('_', '-')}" if value
                        else f"--no-{action.dest.replace('_', '-')}")
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.child: subprocess.Popen | None = None

    def __call__(self, signum, frame) -> None:
        log.info("signal %d: stopping the schedule", signum)
        self.event.set()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def run_schedule(args: argparse.Namespace, add_run_arguments) -> int:
    try:
        every = parse_duration(args.every)
    except InvalidArgument as exc:
        print(f"prefloop align schedule: {exc}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "prefloop.cli", "--log-level",
           str(getattr(args, "log_level", "INFO")), "align", "run", args.method, *run_argv(args, add_run_arguments)]
    stop = _Stop()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    print(f"prefloop align schedule: every {every:g} s: {' '.join(cmd[3:])}", flush=True)
    runs = 0
    next_at = time.monotonic() + (every if args.no_initial_run else 0.0)
    while not stop.event.is_set():
        if stop.event.wait(max(0.0, next_at - time.monotonic())):
            break
        started = time.monotonic()
        log.info("starting align job %d", runs + 1)
        stop.child = subprocess.Popen(cmd)
        rc = stop.child.wait()
        stop.child = None
        runs += 1
        outcome = {0: "done", 3: "skipped: another job holds the lock"}.get(rc, f"failed (exit {rc})")
        print(f"prefloop align schedule: job {runs} {outcome} after "
              f"{time.monotonic() - started:.1f} s", flush=True)
        if args.max_runs is not None and runs >= args.max_runs:
            break
        next_at += every * max(1, int((time.monotonic() - next_at) // every) + 1)
    return 0
