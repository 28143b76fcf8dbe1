"""How long one `align run` job takes from this checkout and from an earlier revision, on the same
kept votes, alternating.

Each run is `prefloop align run --auto-promote --promote-via gate --keep-rejected --json` (the
loop benchmark's job) on a hard-linked copy of a kept loop run's data dir (`loop_sweep.py --keep`:
WORK/<preference>-<kind>-...-seed<S>/data), once with this checkout's code and once with
`--baseline`'s (a git revision exported to a temporary folder), both imported the same way (a
`prefloop` package of links to the exported folders, first on PYTHONPATH), `--repeats` times
each, alternating so that the machine's drift falls on both. Per run it prints the job's wall
time, the job record's parts (training, scoring, and of the scoring the degeneration check's
sampling), the steps and KL checks, training tokens/s beside rows/s, the KL and the verdict; at
the end the mean job time of each code and their ratio. The candidates may differ: anything the
revisions changed about training changes them.

    python benchmarks/job_time.py --data /tmp/fresh19/short_sentences/short_sentences-population-noise0.2-t0.7-m256-seed19/data --baseline 7359dfa
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_quality import run_job  # noqa: E402
from loop_sweep import link_copy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "server", "proto", "align", "clients")  # pyproject's package-dir


def code_tree(source: Path, into: Path) -> Path:
    """A folder holding a `prefloop` package whose subpackages link to `source`'s folders: put it
    first on PYTHONPATH to import that code instead of the installed checkout."""
    package = into / "prefloop"
    package.mkdir(parents=True)
    for name in PACKAGES:
        (package / name).symlink_to(source / name, target_is_directory=True)
    return into


def export_revision(rev: str, into: Path) -> Path:
    """`git archive` of `rev` unpacked into `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def job_of(code: Path, data: Path, work: Path, flags: list[str]) -> dict:
    """The loop benchmark's job (loop_quality.run_job) with `code` imported, on a copy of `data`."""
    copy = work / "data"
    link_copy(data, copy)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(code), *filter(None, [os.environ.get("PYTHONPATH")])]))
    job = run_job(copy, "", ["--keep-rejected", *flags], env=env)
    if "stderr" in job:
        job["error"] = job.pop("stderr")
    return job


def summary(job: dict) -> str:
    if "error" in job:
        return f"FAILED: {job['error']}"
    metrics = job.get("metrics") or {}
    training = metrics.get("training") or {}
    parts = metrics.get("seconds") or {}
    runtime = training.get("runtime_s") or 0.0
    tokens = (training.get("last_log") or {}).get("num_tokens")
    rows = ((job.get("data") or {}).get("rows") or {}).get("train")
    checks = len((training.get("kl_stop") or {}).get("checks") or [])
    rate = (f"{tokens / runtime:.0f} tokens/s, " if tokens and runtime else "") + \
        (f"{rows / runtime:.2f} rows/s" if rows and runtime else "")
    kl = (metrics.get("heldout") or {}).get("kl_per_token")
    return (f"job {job['seconds']:.0f} s = train {parts.get('load_and_train', 0):.0f} s + score "
            f"{parts.get('score', 0):.0f} s (degeneration {parts.get('degeneration', 0):.0f} s); "
            f"{training.get('steps')} steps, {checks} KL checks, {rate}; KL "
            f"{kl if kl is None else round(kl, 4)}, {job.get('status')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, required=True,
                    help="a kept loop run's data dir (loop_sweep.py --keep)")
    ap.add_argument("--baseline", required=True, help="the git revision to compare with")
    ap.add_argument("--repeats", type=int, default=1, help="jobs of each code, alternating")
    ap.add_argument("--flags", default="", help="extra `align run` flags for both")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="job-time-") as tmp:
        tmp = Path(tmp)
        codes = {"this checkout": code_tree(ROOT, tmp / "current"),
                 args.baseline: code_tree(export_revision(args.baseline, tmp / "baseline-src"),
                                          tmp / "baseline")}
        print(f"job_time: {args.repeats} job(s) each of this checkout and {args.baseline} on "
              f"{args.data}", flush=True)
        seconds: dict[str, list[float]] = {name: [] for name in codes}
        for repeat in range(args.repeats):
            for name, code in codes.items():
                work = tmp / f"run-{len(seconds[name])}-{name.replace(' ', '-')}"
                work.mkdir()
                job = job_of(code, args.data, work, args.flags.split())
                print(f"  {name:>13} #{repeat + 1}: {summary(job)}", flush=True)
                if "error" not in job:
                    seconds[name].append(job["seconds"])
    means = {name: statistics.mean(s) for name, s in seconds.items() if s}
    line = ", ".join(f"{name} {m:.0f} s" for name, m in means.items())
    if len(means) == 2:
        line += f"; this checkout / {args.baseline}: {means['this checkout'] / means[args.baseline]:.3f}"
    print(f"job_time: mean job {line} ({args.repeats} each)")


if __name__ == "__main__":
    main()
