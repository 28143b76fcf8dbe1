"""`prefloop models`: the model registry — list, show, verify, promote, roll back, prune.

    prefloop models list     [--data-dir DIR | --target HOST:PORT] [--json]
    prefloop models show     VERSION [--verify] [--data-dir DIR | --target HOST:PORT] [--json]
    prefloop models promote  VERSION [--force] [--reason TEXT] [--data-dir DIR | --target ...]
    prefloop models rollback [--reason TEXT] [--data-dir DIR | --target HOST:PORT]
    prefloop models verify   VERSION [--data-dir DIR]         recompute every sha256
    prefloop models history  [--data-dir DIR] [--json]         promotions and rollbacks
    prefloop models trend    [--plot PNG] [--data-dir DIR]     promoted versions over time
    prefloop models init     [--model PATH] [--data-dir DIR]   create v0000 (the base) now
    prefloop models prune    --keep N [--dry-run] [--data-dir DIR]   free disk: older versions
    prefloop models delete   VERSION [--dry-run] [--data-dir DIR]
    prefloop models export   VERSION --merged DIR | --adapter DIR    plain HF folder / PEFT adapter
    prefloop models ab start CANDIDATE [--traffic 0.2] [--sticky user|session|request]
                             [--min-votes 20] [--confidence 0.95] [--max-duration 7d] [--force]
    prefloop models ab status | ab stop [--promote | --reject]   online A/B test (docs/ab.md)

Offline (the default) these work on `<data-dir>/registry` directly (server/registry.py); a
server following the registry picks a promotion up from the CURRENT pointer. With `--target`
they go through the server's Models RPCs (ListVersions, Promote, Rollback; an admin token), so
the server switches at once and answers for the outcome. A CLI subcommand module
(`add_arguments(parser)`, `run(args) -> int`, registered in cli/main.py).
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from prefloop.server.ab import allowance
from prefloop.server.registry import DATA_DIR_ENV
from prefloop.server.version_summary import VersionSummary

if TYPE_CHECKING:
    from prefloop.align.gate import GateDecision


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True,
                                metavar="{list,show,promote,rollback,verify,history,trend,init,"
                                        "prune,delete,export,ab}")

    def described(subparsers, name: str, help: str) -> argparse.ArgumentParser:
        """A subcommand whose --help opens with what it does (the one line `-h` of the parent
        lists)."""
        return subparsers.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")

    def where(p: argparse.ArgumentParser, remote: bool = True) -> None:
        p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV, "data"),
                       help=f"the server's data directory (default ${DATA_DIR_ENV} or ./data)")
        if remote:
            p.add_argument("--target", default=None, metavar="HOST:PORT",
                           help="act through a running server's Models RPCs instead")
            p.add_argument("--token", default=None,
                           help="admin bearer token for --target (default $PREFLOOP_TOKEN)")
            p.add_argument("--tls-root-cert", default=None, help="PEM root certificate (TLS)")
            p.add_argument("--tls", action="store_true", help="TLS with the system's roots")
            p.add_argument("--timeout", type=float, default=600.0,
                           help="seconds to wait for the server's answer (default %(default)s)")
        p.add_argument("--json", action="store_true", help="print JSON")

    where(described(sub, "list", "all versions, the current one marked"))
    show = described(sub, "show", "one version's manifest")
    show.add_argument("version", help="registry version, e.g. v0001")
    show.add_argument("--verify", action="store_true", help="also recompute the checksums")
    where(show)
    promote = described(sub, "promote", "make VERSION the served version")
    promote.add_argument("version", help="registry version to serve, e.g. v0002")
    promote.add_argument("--force", action="store_true",
                         help="promote even though the eval gate rejected it")
    promote.add_argument("--reason", default="", help="recorded in the history")
    where(promote)
    rollback = described(sub, "rollback", "back to the version served before the last "
                                               "promotion still in effect")
    rollback.add_argument("--reason", default="", help="recorded in the history")
    where(rollback)
    verify = described(sub, "verify", "recompute the sha256 of every file of VERSION")
    verify.add_argument("version", nargs="?", default=None, help="default: every version")
    where(verify, remote=False)
    where(described(sub, "history", "promotions and rollbacks, oldest first"), remote=False)
    trend = described(sub, "trend", "the promoted versions over time: gate win rate with "
                                         "its interval, held-out accuracy, A/B win rate")
    trend.add_argument("--plot", default=None, metavar="PNG", help="also draw it to this file")
    where(trend, remote=False)
    init = described(sub, "init", "create v0000 from --model (or the default model)")
    init.add_argument("--model", default=None, metavar="PATH",
                      help="HF folder or .gguf (default: the embedded default model)")
    init.add_argument("--cache-dir", default=None,
                      help="where the converted default model is cached (default "
                           "$PREFLOOP_CACHE_DIR or ~/.cache/prefloop)")
    where(init, remote=False)
    keep_note = ("never the current version, a version on its rollback stack, or one in a "
                 "running A/B test")
    prune = described(sub, "prune", f"delete all but the newest N versions of each kind ("
                                         f"{keep_note})")
    prune.add_argument("--keep", type=int, required=True, metavar="N",
                       help="newest versions of each kind (policy, reward) to keep")
    prune.add_argument("--dry-run", action="store_true",
                       help="show what would be deleted and how many bytes, delete nothing")
    where(prune, remote=False)
    delete = described(sub, "delete", f"delete one version ({keep_note})")
    delete.add_argument("version", help="registry version to delete, e.g. v0003")
    delete.add_argument("--dry-run", action="store_true",
                        help="show what would be deleted and how many bytes, delete nothing")
    where(delete, remote=False)
    export = described(sub, "export", "write VERSION as a plain Hugging Face folder (--merged) "
                                           "or, for an adapter version, as a PEFT adapter "
                                           "(--adapter)")
    export.add_argument("version", help="registry version, e.g. v0003")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", metavar="DIR",
                      help="full weights (adapters merged) + config + tokenizer, loadable by "
                           "transformers, vLLM or `prefloop serve --model DIR`")
    what.add_argument("--adapter", metavar="DIR",
                      help="adapter_model.safetensors + adapter_config.json, for "
                           "PeftModel.from_pretrained over the base version")
    where(export, remote=False)
    ab = described(sub, "ab", "an online A/B test between the current version and a "
                                   "candidate, decided by live votes (docs/ab.md)")
    ab_sub = ab.add_subparsers(dest="ab_command", required=True, metavar="{start,status,stop}")
    start = described(ab_sub, "start", "serve CANDIDATE to a share of users beside the "
                                            "current version")
    start.add_argument("candidate", help="registry version to test (passed the offline gate)")
    start.add_argument("--traffic", type=float, default=0.2,
                       help="share of requests served by the candidate (default %(default)s)")
    start.add_argument("--sticky", choices=("user", "session", "request"), default="user",
                       help="what keeps a user on one version (default %(default)s)")
    start.add_argument("--min-votes", type=int, default=20,
                       help="head-to-head votes and blocks of ratings (about one per candidate "
                            "user who rated), together, needed before a "
                            "promotion (default %(default)s)")
    start.add_argument("--confidence", type=float, default=0.95,
                       help="the test promotes a candidate that users neither prefer head to "
                            "head nor rate higher than the current version with probability at "
                            "most 1 - this, however often it looks (default %(default)s)")
    start.add_argument("--max-duration", default="7d",
                       help="reject the candidate if still undecided after this (default "
                            "%(default)s)")
    start.add_argument("--futility-win", type=float, default=None, metavar="P",
                       help="also end the test, rejected, once its head-to-head votes are 10 "
                            "times likelier at a win rate of 1/2 than at P while the ratings do "
                            "not lean the candidate's way; a candidate that wins at least P of "
                            "the votes is ended so with probability <= 0.1 (default: never; the "
                            "tests align jobs start use 0.7, docs/ab.md)")
    start.add_argument("--force", action="store_true",
                       help="start even if the candidate did not pass the offline gate")
    where(start)
    where(described(ab_sub, "status", "votes, win rate with its interval, decision"))
    stop = described(ab_sub, "stop", "end the test now (default: keep the current version)")
    outcome = stop.add_mutually_exclusive_group()
    outcome.add_argument("--promote", action="store_true", help="promote the candidate")
    outcome.add_argument("--reject", action="store_true", help="reject the candidate")
    stop.add_argument("--reason", default="", help="recorded in the history")
    where(stop)


# ---------------------------------------------------------------------------------------------
# Formatting


def verdict_of(gate: dict[str, Any] | None) -> GateDecision | None:
    """The gate verdict (align/gate.py GateDecision) of a manifest's or job's `gate` record;
    None when the version or job was not gated."""
    if not gate:
        return None
    from prefloop.align.gate import GateDecision
    return GateDecision.from_record(gate)


def _gate_passed(gate: dict[str, Any] | None) -> bool | None:
    verdict = verdict_of(gate)
    return None if verdict is None else verdict.passed


def _gate_text(info: dict[str, Any]) -> str:
    passed = _gate_passed(info["gate"]) if "gate" in info else info.get("gate_passed")
    return {True: "passed", False: "rejected", None: "-"}[passed]


def format_list(infos: list[dict[str, Any]]) -> str:
    if not infos:
        return "no versions yet (`prefloop models init` or an align job creates v0000)"
    lines = [f"  {'version':8} {'parent':7} {'kind':7} {'weights':8} {'size':>8} {'method':7} {'gate':9} "
             f"{'gate win rate [interval] n':>28} {'held-out acc':>12} {'KL/tok':>8} "
             f"{'root KL':>8}  created"]
    for i in infos:
        summary = VersionSummary.of(i.get("metrics"), i.get("gate"))
        acc, kl, root = summary.heldout_accuracy, summary.kl_per_token, summary.kl_to_root
        lines.append(
            f"{'*' if i.get('current') else ' '} {i['version']:8} {i.get('parent') or '-':7} "
            f"{i['kind']:7} {_weights_text(i):8} {_size(i['bytes']) if i.get('bytes') else '-':>8} "
            f"{i['method']:7} {_gate_text(i):9} {gate_numbers(i.get('gate')):>28} "
            f"{'-' if acc is None else f'{acc:.3f}':>12} {'-' if kl is None else f'{kl:.4f}':>8} "
            f"{'-' if root is None else f'{root:.4f}':>8}  {i['created_at']}")
    return "\n".join(lines)


def _weights_text(info: dict[str, Any]) -> str:
    """"full", or "+v0003" for a LoRA adapter applied to v0003."""
    return f"+{info['base']}" if info.get("format") == "adapter" else (info.get("format") or "-")


def gate_numbers(gate: dict | None) -> str:
    """'0.800 [0.62, 0.93] 20': the gate's win rate, its interval and how many it judged (the
    units that differ), from a `gate` record."""
    verdict = verdict_of(gate)
    paired = None if verdict is None else verdict.paired
    if paired is None:
        return "-"
    return _numbers_text(paired.win_rate, [paired.lower, paired.upper], paired.n)


def _numbers_text(win_rate: float | None, interval: list | None, n: int | None) -> str:
    if win_rate is None:
        return "-"
    low, high = (interval or [None, None])[:2]
    span = f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else "[-]"
    return f"{win_rate:.3f} {span} {n}"


def trend_rows(registry) -> list[dict[str, Any]]:
    """The chain of promoted versions, oldest first: when, which, and how each was judged."""
    from prefloop.server.ab import state as ab_state
    test = ab_state.read_state(registry)
    rows = []
    for entry in registry.history():
        if entry.action not in ("init", "promote"):
            continue
        m = registry.manifest(entry.version)
        verdict = verdict_of(m.gate)
        paired = None if verdict is None else verdict.paired
        ab = None
        if test is not None and test.candidate == entry.version and test.wins + test.losses:
            ab = test.wins / (test.wins + test.losses)
        rows.append({"at": entry.at, "version": entry.version, "method": m.method,
                     "gate_win_rate": None if paired is None else paired.win_rate,
                     "gate_interval": None if paired is None or paired.lower is None
                     else [paired.lower, paired.upper],
                     "gate_n": 0 if paired is None else paired.n,
                     "heldout_accuracy": VersionSummary.of(m.metrics, m.gate).heldout_accuracy,
                     "ab_win_rate": ab})
    return rows


def format_trend(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no promoted versions yet"
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"{'promoted at':27} {'version':8} {'method':7} {'gate win rate [interval] n':>28} "
             f"{'held-out acc':>12} {'A/B win rate':>12}"]
    for r in rows:
        numbers = _numbers_text(r["gate_win_rate"], r["gate_interval"], r["gate_n"])
        lines.append(f"{r['at']:27} {r['version']:8} {r['method']:7} {numbers:>28} "
                     f"{f(r['heldout_accuracy']):>12} {f(r['ab_win_rate']):>12}")
    return "\n".join(lines)


def plot_trend(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = list(range(len(rows)))
    for key, label in (("gate_win_rate", "gate win rate vs previous"),
                       ("heldout_accuracy", "held-out preference accuracy"),
                       ("ab_win_rate", "A/B win rate (live votes)")):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for x, r in zip(xs, rows):
        if r["gate_interval"] and r["gate_win_rate"] is not None:
            ax.vlines(x, *r["gate_interval"][:2], alpha=0.4)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs, [r["version"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# Offline


def _offline(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from prefloop.server import registry as reg

    registry = reg.Registry(args.data_dir)
    cmd = args.models_command
    actor = f"cli:{getpass.getuser()}"
    if cmd == "list":
        infos = [reg.version_info(registry, v) for v in registry.list_versions()]
        print(json.dumps(infos, indent=2) if args.json else format_list(infos))
    elif cmd == "show":
        info = reg.version_info(registry, args.version)
        manifest = asdict(registry.manifest(args.version))
        manifest.update(format=info["format"], base=info["base"], dtype=info["dtype"],
                        bytes=info["bytes"])
        manifest["current"] = registry.current() == args.version
        manifest["path"] = str(registry.version_dir(args.version))
        if args.verify:
            manifest["verify"] = asdict(registry.verify(args.version))
        print(json.dumps(manifest, indent=2))
        if args.verify and not manifest["verify"]["ok"]:
            return 1
    elif cmd == "promote":
        entry = registry.promote(args.version, reason=args.reason, actor=actor, force=args.force)
        _print_entry(entry, args.json)
    elif cmd == "rollback":
        entry = registry.rollback(reason=args.reason, actor=actor)
        _print_entry(entry, args.json)
    elif cmd == "export":
        return _export(registry, args)
    elif cmd == "verify":
        versions = [args.version] if args.version else registry.list_versions()
        results = [registry.verify(v) for v in versions]
        if args.json:
            print(json.dumps([asdict(r) for r in results], indent=2))
        for r in results if not args.json else []:
            print(f"{r.version}: {'ok' if r.ok else 'FAILED'} ({r.checked_bytes} bytes checked)"
                  + "".join(f"\n  - {p}" for p in r.problems))
        return 0 if all(r.ok for r in results) else 1
    elif cmd == "history":
        entries = [asdict(e) for e in registry.history()]
        if args.json:
            print(json.dumps(entries, indent=2))
        else:
            for e in entries:
                print(f"{e['at']}  {e['action']:8} {e['previous'] or '-':>6} -> {e['version']}"
                      f"  {e['actor']}  {e['reason']}")
    elif cmd in ("prune", "delete"):
        return _remove(registry, args)
    elif cmd == "trend":
        rows = trend_rows(registry)
        print(json.dumps(rows, indent=2) if args.json else format_trend(rows))
        if args.plot:
            plot_trend(rows, args.plot)
            print(f"plot: {args.plot}", file=sys.stderr)
    elif cmd == "init":
        from prefloop.server.model.loader import resolve_model_dir
        version = registry.ensure_base(resolve_model_dir(args.model, args.cache_dir))
        print(f"{version}: {registry.version_dir(version)} (current: {registry.current()})")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _export(registry, args: argparse.Namespace) -> int:
    """`models export VERSION --merged DIR | --adapter DIR`."""
    import shutil
    from pathlib import Path

    from prefloop.server.errors import FailedPrecondition
    from prefloop.server.model import adapters

    source, manifest = registry.version_dir(args.version), registry.manifest(args.version)
    if args.merged:
        target = adapters.write_merged(source, Path(args.merged))
        print(f"{args.version}: merged full weights in {target}")
        return 0
    if manifest.adapter is None:
        raise FailedPrecondition(f"{args.version} holds full weights, not an adapter; export it "
                                 "with --merged")
    target = Path(args.adapter)
    if target.exists() and any(target.iterdir()):
        raise FailedPrecondition(f"{target} exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    base = manifest.adapter["base"]
    config = json.loads((source / adapters.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(registry.version_dir(base))
    shutil.copyfile(source / adapters.ADAPTER_WEIGHTS, target / adapters.ADAPTER_WEIGHTS)
    (target / adapters.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    print(f"{args.version}: LoRA adapter over {base} in {target}")
    if registry.adapter_base(base) is not None:
        print(f"note: its base {base} is itself an adapter; load this one over "
              f"`prefloop models export {base} --merged DIR`")
    return 0


def _remove(registry, args: argparse.Namespace) -> int:
    """`models prune` / `models delete` under the align job lock (a job may be training from a
    version); what a running A/B test uses is kept too."""
    from prefloop.server.ab.state import running_state
    from prefloop.server.errors import FailedPrecondition
    from prefloop.server.jobs import job_lock

    if not registry.exists():
        print(f"prefloop models: no registry in {args.data_dir}", file=sys.stderr)
        return 1
    with job_lock(registry):
        state = running_state(registry)
        also = ({state.candidate: "in the running A/B test (candidate)",
                 state.control: "in the running A/B test (control)"} if state else {})
        if args.models_command == "delete":
            registry.version_dir(args.version)  # NotFound first
            why = registry.protected_versions(also).get(args.version)
            if not why and (users := registry.adapters_on(args.version)):
                why = f"the base of adapter {', '.join(users)} (delete those first)"
            if why:
                raise FailedPrecondition(f"{args.version} cannot be deleted: it is {why}")
            doomed = [args.version]
        else:
            doomed = registry.prune_plan(args.keep, also)
        sizes = {v: registry.version_bytes(v) for v in doomed}
        kept = {v: why for v, why in registry.protected_versions(also).items()
                if v in registry.list_versions()}
        if not args.dry_run:
            for v in reversed(doomed):  # adapters before the bases they were applied to
                registry.delete_version(v, also=also)
    total = sum(sizes.values())
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "deleted": [] if args.dry_run else doomed,
                          "would_delete": doomed if args.dry_run else [], "bytes": total,
                          "protected": kept}, indent=2))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for v in doomed:
        print(f"{verb} {v} ({_size(sizes[v])})")
    print(f"{verb} {len(doomed)} version{'s' * (len(doomed) != 1)}, {_size(total)}"
          + (" (dry run: nothing deleted)" if args.dry_run else ""))
    if args.models_command == "prune" and kept:
        print("kept: " + ", ".join(f"{v} ({why})" for v, why in sorted(kept.items())))
    return 0


def _print_entry(entry, as_json: bool) -> None:
    from dataclasses import asdict
    if as_json:
        print(json.dumps(asdict(entry), indent=2))
    else:
        print(f"{entry.action}: {entry.previous or '-'} -> {entry.version} (at {entry.at})")


# ---------------------------------------------------------------------------------------------
# Through a server


def _remote(args: argparse.Namespace) -> int:
    """Through the Models RPCs (the server verifies, hot-swaps, then moves the pointer)."""
    from dataclasses import asdict

    from prefloop.clients import Client
    with Client(args.target, token=args.token, root_certificates=args.tls_root_cert,
                tls=args.tls, timeout=args.timeout) as client:
        if args.models_command in ("list", "show"):
            listing = client.list_versions()
            infos = [dict(asdict(v), parent=v.parent or None,
                          gate_passed=_gate_passed(v.gate))
                     for v in listing.versions]
            if args.models_command == "show":
                infos = [i for i in infos if i["version"] == args.version]
                if not infos:
                    print(f"prefloop models: no version {args.version} on {args.target}",
                          file=sys.stderr)
                    return 1
                print(json.dumps(infos[0], indent=2))
            elif args.json:
                print(json.dumps({"versions": infos, "current_version": listing.current_version,
                                  "serving_version": listing.serving_version}, indent=2))
            else:
                print(format_list(infos))
                print(f"registry pointer: {listing.current_version or '-'}; "
                      f"{args.target} serves {listing.serving_version or '-'}")
        else:
            if args.models_command == "promote":
                previous, current = client.promote(args.version, force=args.force,
                                                   reason=args.reason)
            else:
                previous, current = client.rollback(reason=args.reason)
            if args.json:
                print(json.dumps({"action": args.models_command, "previous": previous,
                                  "version": current}))
            else:
                print(f"{args.models_command}: {previous or '-'} -> {current} "
                      f"(served by {args.target})")
    return 0


def format_ab(status: dict) -> str:
    if not status.get("candidate"):
        return "no A/B test has run"
    lines = [f"A/B test {status['candidate']} (candidate) vs {status['control']}: {status['status']}"
             f" (started {status['started_at']}, traffic {status['traffic']:.0%}, sticky "
             f"{status['sticky']}, min votes {status['min_votes']}, confidence "
             f"{status['confidence']}"
             + (f", ends for futility below win rate {status['futility_win']:g}"
                if status.get("futility_win") else "") + ")"]
    wins, losses = status.get("wins", 0), status.get("losses", 0)
    if status.get("running"):
        low, high = status["interval"]
        rate = "-" if status.get("win_rate") is None else f"{status['win_rate']:.3f}"
        head = status.get("head_to_head") or {}
        lines.append(f"  head-to-head: {wins} wins, {losses} losses; candidate win rate {rate}, "
                     f"one-sided {status['confidence'] * 100:g}% always-valid bounds "
                     f"[{low:.3f}, {high:.3f}]; e-value {head.get('e_better', 1.0):.3g}")
        over = (status.get("evidence") or {}).get("over_cap")
        if over:
            lines.append(f"  {over} more head-to-head votes not counted: past their rater's "
                         f"allowance ({allowance.FLOOR}, then at most {allowance.SHARE:.0%} of "
                         f"the votes and {allowance.FACTOR:g}x the median rater's)")
        for version, rate in (status.get("evidence", {}).get("thumbs_up_rate") or {}).items():
            lines.append(f"  thumbs-up rate {version}: {'-' if rate is None else f'{rate:.2f}'}")
        r = status.get("ratings") or {}
        if r.get("blocks"):
            lines.append(f"  ratings: {r['candidate_users']} / {r['control_users']} users rated "
                         f"candidate / control (first rating each); {r['blocks']} "
                         f"block{'s' * (r['blocks'] != 1)} of users who rated at about the same "
                         f"time, mean difference "
                         f"{r['mean_difference']:+.3f}, e-value {r['e_better']:.3g}")
        lines.append(f"  together (head-to-head x ratings): e-value "
                     f"{status.get('e_better', 1.0):.3g}, promotes at "
                     f"{1 / (1 - status['confidence']):.4g}")
        if status.get("futility"):
            f = status["futility"]
            lines.append(f"  futility: the head-to-head votes are {f['ratio']:.3g} times likelier "
                         f"at a win rate of 1/2 than at {f['win']:g}; ends at {f['ends_at']:g} "
                         "while the ratings do not lean the candidate's way")
        by = f", by {status['decided_by']}" if status.get("decided_by") else ""
        lines.append(f"  decision now: {status['decision']}{by} ({status['decision_reason']})")
    else:
        lines.append(f"  {wins} wins, {losses} losses; concluded {status.get('decided_at')}: "
                     f"{status.get('reason')}")
    return "\n".join(lines)


def _ab(args: argparse.Namespace) -> int:
    """`models ab start|status|stop`, through a server (--target) or on the data dir."""
    stop_outcome = "promote" if getattr(args, "promote", False) else \
        "reject" if getattr(args, "reject", False) else ""
    if args.target:
        from prefloop.clients import Client
        with Client(args.target, token=args.token, root_certificates=args.tls_root_cert,
                    tls=args.tls, timeout=args.timeout) as client:
            if args.ab_command == "start":
                status = client.ab_start(args.candidate, traffic=args.traffic, sticky=args.sticky,
                                         min_votes=args.min_votes, confidence=args.confidence,
                                         max_duration=args.max_duration, force=args.force,
                                         futility_win=args.futility_win)
            elif args.ab_command == "status":
                status = client.ab_status()
            else:
                status = client.ab_stop(stop_outcome, reason=args.reason)
    else:  # offline: the servers on this data dir follow <registry>/AB.json
        from pathlib import Path

        from prefloop.server.ab import state as ab_state
        from prefloop.server.ab.evidence import status as ab_status
        from prefloop.server.ab.evidence import tally
        from prefloop.server.registry import Registry
        registry = Registry(args.data_dir)
        if args.ab_command == "start":
            ab_state.start(registry, args.candidate, force=args.force, traffic=args.traffic,
                           sticky=args.sticky, min_votes=args.min_votes,
                           confidence=args.confidence,
                           max_duration_s=ab_state.parse_duration(args.max_duration),
                           futility_win=args.futility_win)
        elif args.ab_command == "stop":
            running = ab_state.running_state(registry)
            counts = tally(Path(args.data_dir), running) if running else None
            ab_state.conclude(registry, {"promote": ab_state.PROMOTED, "reject": ab_state.REJECTED,
                                         "": ab_state.STOPPED}[stop_outcome],
                              args.reason or f"stopped by {getpass.getuser()} (cli)",
                              actor=f"cli:{getpass.getuser()}",
                              wins=counts.wins if counts else None,
                              losses=counts.losses if counts else None)
        status = ab_status(registry, Path(args.data_dir))
    print(json.dumps(status, indent=2, default=str) if args.json else format_ab(status))
    return 0


def run(args: argparse.Namespace) -> int:
    from prefloop.server.errors import PrefloopError
    try:
        if args.models_command == "ab":
            return _ab(args)
        if getattr(args, "target", None):
            return _remote(args)
        return _offline(args)
    except PrefloopError as exc:  # the registry's API wording "pass force" is a flag here
        print(f"prefloop models: {str(exc).replace('pass force', 'pass --force')}", file=sys.stderr)
        return 1
    except Exception as exc:  # client errors (prefloop.clients.errors) and I/O problems
        if type(exc).__module__.startswith("prefloop.clients"):
            print(f"prefloop models: {exc}", file=sys.stderr)
            return 1
        raise
