"""`prefloop logs check`: is anything in a data directory damaged, and what was quarantined?

Reads every Parquet part and WAL segment (server/feedback/integrity.py), the registry pointer
(CURRENT), the served version's checksums (every version's with --all-versions) and the A/B
state. Prints one line per finding and a verdict; exit 0 when nothing is damaged, 1 when
something is, 2 for a usage error. `--repair` quarantines damaged log files, as the server does
when it starts; it is refused while a server holds the log's lock (a live writer's newest
segment is skipped by the check then, since it may be mid-write).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def registry_findings(data_dir: Path, all_versions: bool) -> tuple[dict[str, Any], list[str]]:
    """(summary, problems) of the registry in `data_dir`."""
    from prefloop.server import errors
    from prefloop.server.ab import state as ab_state
    from prefloop.server.registry import Registry

    registry = Registry(data_dir)
    summary: dict[str, Any] = {"current": None, "verified": [], "ab": None}
    problems: list[str] = []
    if not registry.root.is_dir():
        return summary, problems
    try:
        summary["current"] = registry.current()
    except errors.PrefloopError as exc:
        problems.append(str(exc))
    names = registry.list_versions() if all_versions else [summary["current"]]
    for name in [n for n in names if n]:
        result = registry.verify(name)
        summary["verified"].append({"version": name, "ok": result.ok,
                                    "bytes": result.checked_bytes})
        if not result.ok:
            problems.append(f"version {name} failed verification: " + "; ".join(result.problems))
    try:
        state = ab_state.read_state(registry)
        summary["ab"] = None if state is None else ("running" if state.running else "concluded")
    except errors.PrefloopError as exc:  # damaged or hand-edited JSON
        problems.append(str(exc))
    return summary, problems


def run_check(args: argparse.Namespace) -> int:
    from prefloop.server.feedback import schema as logschema
    from prefloop.server.feedback.integrity import check_log
    from prefloop.server.feedback.store import lock_holder
    from prefloop.server.feedback.wal import list_segments

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"prefloop logs: no data directory at {data_dir}", file=sys.stderr)
        return 2
    live, holders = set(), []
    for replica, wal_dir in logschema.wal_dirs(data_dir):  # the lone server's log, each replica's
        holder = lock_holder(data_dir, replica)
        if holder is None:
            continue
        holders.append(holder)
        segments = list_segments(wal_dir)  # the writer's newest segment may be mid-write
        live |= {segments[-1][1]} if segments else set()
    if holders and args.repair:
        who = f"a server (pid {holders[0]}) logs" if len(holders) == 1 else \
            f"{len(holders)} servers (pids {', '.join(holders)}) log"
        print(f"prefloop logs check: {who} to {data_dir}: stop it before --repair (a server "
              "quarantines damaged files itself when it starts)", file=sys.stderr)
        return 2
    live = frozenset(live)
    log_report = check_log(data_dir, repair=args.repair, skip_segments=live)
    registry, registry_problems = registry_findings(data_dir, args.all_versions)
    problems = list(registry_problems)
    for bad in log_report.bad_parts:
        where = f"; quarantined as {bad['moved_to']}" if bad["moved_to"] else ""
        problems.append(f"unreadable Parquet part {bad['path']}: {bad['error']}{where}")
    for bad in log_report.bad_segments:
        where = f"; quarantined as {bad['moved_to']}" if bad["moved_to"] else ""
        problems.append(f"WAL segment without its magic {bad['path']}{where}")
    remaining = log_report.damaged + len(registry_problems)
    if args.json:
        print(json.dumps({"data_dir": str(data_dir), "log": log_report.as_dict(),
                          "registry": registry, "problems": problems, "damaged": remaining,
                          "server_pid": ",".join(holders) or None}, indent=2))
        return 1 if remaining else 0
    print(f"data dir: {data_dir}" + (f" (server pid {', '.join(holders)} is logging to it)"
                                      if holders else ""))
    print(f"log: {log_report.parts} Parquet parts ({log_report.rows.get('generations', 0)} "
          f"generations, {log_report.rows.get('feedback', 0)} feedback rows), "
          f"{log_report.segments} WAL segments ({log_report.wal_records} records)")
    for torn in log_report.torn_segments:
        print(f"note: WAL segment {torn['path']} has {torn['torn_bytes']} bytes after its last "
              f"intact record (a write cut off by a crash; never acked, ignored by recovery)")
    if log_report.quarantined_before:
        print(f"note: {log_report.quarantined_before} file(s) quarantined earlier under "
              f"{data_dir / 'quarantine'}")
    if registry["current"]:
        checked = ", ".join(f"{v['version']} {'ok' if v['ok'] else 'DAMAGED'}"
                            for v in registry["verified"])
        print(f"registry: CURRENT = {registry['current']}; checksums: {checked}"
              + (f"; A/B test {registry['ab']}" if registry["ab"] else ""))
    for problem in problems:
        print(f"problem: {problem}")
    print("verdict: " + ("nothing damaged" if not remaining else
                         f"{remaining} damaged" + ("" if args.repair else
                                                   "; --repair quarantines damaged log files")))
    return 1 if remaining else 0
