"""`prefloop logs`: look at the generation / feedback log and export training tables.

    prefloop logs stats  [--data-dir DIR] [--since DATE] [--voter-cap F] [--json]
    prefloop logs export --format dpo|kto|rm [--data-dir DIR] [--since DATE] [--voter-cap F]
                         --out FILE.parquet
    prefloop logs check  [--data-dir DIR] [--repair] [--all-versions] [--json]

A CLI subcommand module (`add_arguments(parser)`, `run(args) -> int`, registered in
cli/main.py). It only reads files (Parquet parts and uncompacted WAL segments), so it is safe
beside a running server. The work is in `server/feedback/export.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prefloop.server.registry import DATA_DIR_ENV  # same default as `prefloop serve --data-dir`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="logs_command", metavar="{stats,export,check}",
                                required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                       help=f"the server's data directory (default ${DATA_DIR_ENV} or ./data)")
        p.add_argument("--since", default=None, metavar="YYYY-MM-DD",
                       help="only rows on or after this UTC date")
        p.add_argument("--voter-cap", type=float, default=4.0, metavar="FACTOR",
                       help="training rows: no voter (user or session id) keeps more than "
                            "FACTOR x the median voter's rows (at least 20); 0: no cap "
                            "(default %(default)s, what align uses)")

    stats = sub.add_parser("stats", help="counts by day, model version and kind; training rows",
                           description="Counts by day, model version and kind, and how many "
                                       "training rows each export format would produce.")
    common(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    export = sub.add_parser("export", help="write a deduplicated training table (Parquet)",
                            description="dpo / rm: prompt, chosen, rejected as chat messages; "
                                        "kto: prompt, completion, label.")
    common(export)
    export.add_argument("--format", required=True, choices=["dpo", "kto", "rm"])
    export.add_argument("--out", required=True, help="output .parquet file")
    export.add_argument("--pairs-from-ratings", action=argparse.BooleanOptionalAction,
                        default=None, help="also pair differently rated answers to the same "
                                           "prompt (default: on for rm, off for dpo)")


    check = sub.add_parser("check", help="find damaged log files and registry state",
                           description="Reads every Parquet part and WAL segment of the log, the "
                                       "registry pointer, the served version's checksums and the "
                                       "A/B state. Exit 0 when nothing is damaged, 1 otherwise. "
                                       "--repair moves damaged log files to <data-dir>/"
                                       "quarantine/ (the server does the same when it starts).")
    check.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                       help=f"the server's data directory (default ${DATA_DIR_ENV} or ./data)")
    check.add_argument("--repair", action="store_true",
                       help="quarantine damaged Parquet parts and WAL segments (refused while a "
                            "server logs to the directory)")
    check.add_argument("--all-versions", action="store_true",
                       help="verify the checksums of every version, not only the served one")
    check.add_argument("--json", action="store_true", help="print JSON instead of lines")


def run(args: argparse.Namespace) -> int:
    if args.logs_command == "check":
        from prefloop.cli.logs_check import run_check
        return run_check(args)
    from prefloop.server.feedback import export as log_export  # pyarrow: imported when used
    from prefloop.server.feedback.voter_caps import cap_of_factor

    data_dir = Path(args.data_dir)
    try:
        voter_cap = cap_of_factor(args.voter_cap)
    except ValueError as exc:
        print(f"prefloop logs: {exc}", file=sys.stderr)
        return 2
    if not data_dir.is_dir():
        print(f"prefloop logs: no data directory at {data_dir}", file=sys.stderr)
        return 2
    try:
        if args.logs_command == "stats":
            stats = log_export.log_stats(data_dir, since=args.since, voter_cap=voter_cap)
            print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
            return 0
        kwargs = {}
        if args.pairs_from_ratings is not None:
            if args.format == "kto":
                print("prefloop logs: --pairs-from-ratings applies to dpo and rm only",
                      file=sys.stderr)
                return 2
            kwargs["pairs_from_ratings"] = args.pairs_from_ratings
        table = log_export.export(data_dir, args.format, since=args.since,
                                  voter_cap=voter_cap, **kwargs)
        write_table(Path(args.out), table)
        print(f"prefloop logs: wrote {table.num_rows} {args.format} rows to {args.out}")
        return 0
    except ValueError as exc:  # e.g. a bad --since
        print(f"prefloop logs: {exc}", file=sys.stderr)
        return 2


def write_table(path: Path, table) -> None:
    """Write the export atomically (temp name, fsync, rename)."""
    from prefloop.server.feedback.compactor import write_parquet_atomic

    write_parquet_atomic(path.resolve(), table)


def format_stats(stats: dict) -> str:
    lines = [f"data dir: {stats['data_dir']}", ""]
    columns = (("date", "date"), ("model_version", "model version"), ("kind", "kind"),
               ("count", "count"))
    cells = [[header for _, header in columns]]
    cells += [[str(r[key]) for key, _ in columns] for r in stats["rows"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    if not stats["rows"]:
        lines.append("(no rows)")
    t, tr, wal = stats["totals"], stats["training"], stats["wal"]
    lines += ["",
              f"totals: {t['generation']} generations, {t['preference']} preferences, "
              f"{t['rating']} ratings",
              f"training rows: dpo {tr['dpo_pairs']} pairs, rm {tr['rm_pairs']} pairs, "
              f"kto {tr['kto_examples']} examples ({tr['kto_desirable']} desirable, "
              f"{tr['kto_undesirable']} undesirable)",
              f"not yet compacted: {wal['segments']} WAL segments, {wal['bytes']} bytes"]
    if stats.get("replicas"):
        lines.append("replicas: " + ", ".join(
            f"{rid} ({r['parts']} parts, {r['wal_segments']} WAL segments)"
            for rid, r in stats["replicas"].items()))
    voters = stats["voters"]
    if voters["heaviest"]:
        lines += ["", f"heaviest voters ({voters['with_id']} with a user or session id; "
                      f"{voters['rows_without_id']} rows without one):"]
        lines += [f"  {v['voter']}: {v['rows']} rows ({v['share']:.0%})" for v in voters["heaviest"]]
        if voters["cap"] is None:
            lines.append("voter cap: off")
        else:
            capped = ", ".join(f"{c['voter']} {c['rows']} -> {c['kept']}"
                               for c in voters["capped"]) or "nobody is over it"
            lines.append(f"voter cap: {voters['cap']} rows per voter (median voter: "
                         f"{voters['median_rows']:g}); {capped}")
    return "\n".join(lines)
