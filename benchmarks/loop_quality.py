"""Does the loop keep its promise? Simulated users with a hidden, consistent preference talk to a
real `prefloop serve` over gRPC, vote on n=2 answers exactly as a UI would, the scheduled job runs
as users run it (`prefloop align run --auto-promote`, defaults), the live server swaps, and the
served answers on held-out prompts nobody voted on are judged against the base version's.

Users have ids (`--users`, default 20, each voting on an equal share of the prompts), so the
job's per-voter cap sees an ordinary crowd. `--flooder-share S` adds one more user who casts a
share S of all votes for the opposite of what the crowd prefers (the worse answer of each pair),
as fast as the server takes them: the case "one user tries to steer the model" (docs/reliability.md).
`--align-arg=--voter-cap=0` runs the same without the cap, for comparison.

Per round (votes -> retrain -> swap -> measure) it prints and records: votes cast, the job's
outcome and gate reasons, the simulated user's win rate of served vs base on held-out prompts
(pairwise, 95% Wilson interval; ties excluded), the preferred property's mean for base and
served, the job's KL per token, and the wall time of each phase. A PNG of win rate vs votes
goes to --plot.

    python benchmarks/loop_quality.py [--preferences short_sentences,plain_words,friendly_opening,random]
        [--rounds 2] [--votes-per-round 100] [--method dpo] [--max-tokens 64] [--plot docs/loop_quality.png]
        [--users 20] [--flooder-share 0.5] [--json out.json] [--align-arg=--lr=5e-6 ...]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_users import REWRITES, choose, prompts, property_value, repetitive  # noqa: E402

from prefloop.clients import Client  # noqa: E402


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def start_server(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "prefloop.cli", "serve", "--port", "0",
                             "--http-port", "0", "--data-dir", str(data_dir), "--registry-poll", "0.5",
                             # simulated users vote faster than people: no per-voter limit
                             "--votes-per-minute", "0", "--token-votes-per-minute", "0"],
                            stdout=subprocess.PIPE, stderr=open(log_path, "wb"), text=True)
    line = ""
    while "listening on" not in line:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start; see {log_path}")
    return proc, line.split("listening on", 1)[1].split()[0]


def held_out_answers(client: Client, held: list[str], max_tokens: int, samples: int = 2,
                     concurrency: int = 8) -> tuple[list[str], str]:
    """`samples` answers per held-out prompt at the server's default sampling (seeded per prompt
    and sample, so base and served answers are paired), `concurrency` requests at a time."""
    jobs = [(i, s, prompt) for i, prompt in enumerate(held) for s in range(samples)]

    def one(job):
        i, s, prompt = job
        result = client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                             seed=1000 + 100 * s + i)
        return result.completions[0].text, result.model_version

    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, jobs))
    return [text for text, _ in out], (out[-1][1] if out else "")


FLOODER = "flooder"


def vote_one(client: Client, preference: str, prompt: str, max_tokens: int, seed: int,
             user_id: str = "") -> str:
    """One simulated user's turn: two sampled answers, then a preference (or a rewrite, or
    nothing on a tie), as a UI would send it. Returns "vote", "rewrite" or "tie". The flooder
    picks the answer the crowd would reject and never rewrites."""
    messages = [{"role": "user", "content": prompt}]
    a, b = client.chat(messages, n=2, max_tokens=max_tokens, user_id=user_id).completions
    pick = choose(preference, a.text, b.text, random.Random(seed))
    if pick is None:
        if user_id != FLOODER and preference in REWRITES and property_value(preference, a.text) == 0:
            # neither answer has it: this user rewrites one, as the web page's "edit" does
            client.submit_preference(prompt_messages=messages, rejected_text=a.text,
                                     chosen_text=REWRITES[preference](a.text), user_id=user_id)
            return "rewrite"
        return "tie"
    if user_id == FLOODER:
        pick = 1 - pick
    chosen, rejected = (a, b) if pick == 0 else (b, a)
    client.submit_preference(chosen_response_id=chosen.response_id,
                             rejected_response_id=rejected.response_id, user_id=user_id)
    return "vote"


def turns_of(vote_prompts: list[str], users: int, flooder_share: float,
             rng: random.Random) -> list[tuple[str, str]]:
    """(user id, prompt) turns of one round: the crowd's users take the prompts in turn; the
    flooder takes share/(1-share) as many turns on the same prompts; all shuffled together, so
    the flooder's votes fall through the whole round (training and held-out rows alike)."""
    turns = [(f"user-{i % users:02d}", prompt) for i, prompt in enumerate(vote_prompts)]
    flood = round(len(vote_prompts) * flooder_share / (1 - flooder_share)) if flooder_share else 0
    turns += [(FLOODER, vote_prompts[i % len(vote_prompts)]) for i in range(flood)]
    rng.shuffle(turns)
    return turns


def vote_round(client: Client, preference: str, vote_prompts: list[str], max_tokens: int,
               seed: int, concurrency: int = 8, users: int = 20, flooder_share: float = 0.0
               ) -> dict:
    """Users vote on `vote_prompts`, `concurrency` at a time (as a live server sees them)."""
    turns = turns_of(vote_prompts, users, flooder_share, random.Random(seed))
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda it: vote_one(client, preference, it[1][1], max_tokens,
                                                     seed * 100003 + it[0], user_id=it[1][0]),
                                 enumerate(turns)))
    crowd = [o for (user, _), o in zip(turns, outcomes) if user != FLOODER]
    rewrites = crowd.count("rewrite")
    return {"votes": crowd.count("vote") + rewrites, "ties": crowd.count("tie"),
            "rewrites": rewrites,
            "flooder_votes": sum(o == "vote" for (user, _), o in zip(turns, outcomes) if user == FLOODER)}


def run_job(data_dir: Path, method: str, extra: list[str]) -> dict:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "prefloop.cli", "align", "run", "--data-dir",
                          str(data_dir), "--method", method, "--auto-promote", "--json", *extra],
                         capture_output=True, text=True)
    out = {"seconds": time.perf_counter() - start, "returncode": res.returncode}
    try:
        out.update(json.loads(res.stdout[res.stdout.index("{"):]))
    except ValueError:
        out["stderr"] = res.stderr[-2000:]
    return out


def judge(preference: str, base: list[str], served: list[str], rng: random.Random) -> dict:
    wins = losses = 0
    for old, new in zip(base, served):
        pick = choose(preference, new, old, rng)
        if pick == 0:
            wins += 1
        elif pick == 1:
            losses += 1
    low, high = wilson(wins, wins + losses)
    return {"wins": wins, "losses": losses, "win_rate": wins / (wins + losses) if wins + losses else None,
            "interval": [low, high],
            "base_property": sum(property_value(preference, a) for a in base) / len(base),
            "served_property": sum(property_value(preference, a) for a in served) / len(served),
            "base_repetitive": sum(map(repetitive, base)) / len(base),
            "served_repetitive": sum(map(repetitive, served)) / len(served)}


def run_preference(preference: str, args, work: Path) -> list[dict]:
    data = work / preference / "data"
    data.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "prefloop.cli", "models", "init", "--data-dir", str(data)],
                   check=True, capture_output=True)
    vote_prompts, held = prompts(seed=args.seed)
    rng = random.Random(args.seed)
    proc, target = start_server(data, work / f"{preference}-server.log")
    rows = []
    try:
        with Client(target, timeout=600) as client:
            t = time.perf_counter()
            base, _ = held_out_answers(client, held, args.max_tokens, args.heldout_samples,
                                       args.concurrency)
            measure_base = time.perf_counter() - t
            total_votes = total_flood = 0
            for r in range(args.rounds):
                batch = vote_prompts[r * args.votes_per_round:(r + 1) * args.votes_per_round]
                t = time.perf_counter()
                votes = vote_round(client, preference, batch, args.max_tokens, args.seed + r,
                                   args.concurrency, args.users, args.flooder_share)
                vote_s = time.perf_counter() - t
                total_votes += votes["votes"]
                total_flood += votes["flooder_votes"]
                job = run_job(data, args.method, args.align_arg)
                t = time.perf_counter()
                deadline = time.time() + 300
                version = job.get("version") if job.get("status") == "promoted" else None
                while version and client.model_info().model_version != version and time.time() < deadline:
                    time.sleep(0.5)
                swap_s = time.perf_counter() - t
                t = time.perf_counter()
                served, served_version = held_out_answers(client, held, args.max_tokens,
                                                          args.heldout_samples, args.concurrency)
                measure_s = time.perf_counter() - t
                row = {"preference": preference, "round": r + 1, "votes_total": total_votes,
                       "flooder_votes_total": total_flood, **votes,
                       "job_status": job.get("status"), "job_reason": job.get("reason"),
                       "served_version": served_version,
                       "kl_per_token": (job.get("gate") or {}).get("kl_per_token"),
                       "seconds": {"vote": vote_s, "job": job["seconds"], "swap": swap_s,
                                   "measure": measure_s, "measure_base": measure_base},
                       **judge(preference, base, served, rng)}
                rows.append(row)
                print(format_row(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


def format_row(row: dict) -> str:
    rate = "-" if row["win_rate"] is None else f"{row['win_rate']:.2f}"
    kl = "-" if row["kl_per_token"] is None else f"{row['kl_per_token']:.4f}"
    s = row["seconds"]
    flood = f" +{row['flooder_votes_total']} flooder" if row.get("flooder_votes_total") else ""
    return (f"{row['preference']:>16} r{row['round']} votes {row['votes_total']:4d}{flood} "
            f"job {row['job_status'] or 'failed':>9} served {row['served_version']:>5} "
            f"win {rate} [{row['interval'][0]:.2f}, {row['interval'][1]:.2f}] "
            f"property {row['base_property']:.2f} -> {row['served_property']:.2f} looping "
            f"{row['base_repetitive']:.0%} -> {row['served_repetitive']:.0%} KL {kl} "
            f"| vote {s['vote']:.0f}s job {s['job']:.0f}s swap {s['swap']:.0f}s measure {s['measure']:.0f}s")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for pref in sorted({r["preference"] for r in rows}):
        pts = [r for r in rows if r["preference"] == pref]
        # no decisive comparison (still the base version, or only ties): 0.5 with no interval
        judged = [r["win_rate"] is not None for r in pts]
        xs = [0] + [r["votes_total"] for r in pts]
        ys = [0.5] + [r["win_rate"] if ok else 0.5 for r, ok in zip(pts, judged)]
        lo = [0.5] + [r["interval"][0] if ok else 0.5 for r, ok in zip(pts, judged)]
        hi = [0.5] + [r["interval"][1] if ok else 0.5 for r, ok in zip(pts, judged)]
        line, = ax.plot(xs, ys, marker="o", label=pref)
        ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        for r, x, y in zip(pts, xs[1:], ys[1:]):
            if r.get("job_status") == "promoted":
                ax.annotate(r["served_version"], (x, y), textcoords="offset points", xytext=(4, -12),
                            fontsize=7, color=line.get_color())
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.axhline(0.65, color="green", lw=0.8, ls=":", label="target 0.65")
    ax.set_xlabel("votes")
    ax.set_ylabel("held-out win rate, served vs base")
    ax.set_title("votes -> align run --auto-promote (defaults) -> served answers, 95% Wilson", fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preferences", default="short_sentences,plain_words,friendly_opening,random",
                    help="comma-separated (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="vote -> retrain -> swap rounds (default %(default)s)")
    ap.add_argument("--votes-per-round", type=int, default=100, help="prompts voted on per round (default %(default)s)")
    ap.add_argument("--method", default="dpo", help="align run --method (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64, help="answer length (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="prompt split and user randomness (default %(default)s)")
    ap.add_argument("--heldout-samples", type=int, default=2,
                    help="answers per held-out prompt, paired by seed (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="users voting / measured at a time (default %(default)s)")
    ap.add_argument("--users", type=int, default=20,
                    help="simulated users (ids) sharing the crowd's votes (default %(default)s)")
    ap.add_argument("--flooder-share", type=float, default=0.0,
                    help="share of all votes cast by one more user, for the opposite of the "
                         "crowd's preference (default %(default)s: none)")
    ap.add_argument("--align-arg", action="append", default=[], help="extra `align run` flag (repeatable)")
    ap.add_argument("--plot", default=None, help="PNG of win rate vs votes")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()
    if not 0 <= args.flooder_share < 1 or args.users < 1:
        ap.error("--flooder-share must be in [0, 1) and --users >= 1")
    prefs = args.preferences.split(",")
    flood = f", a flooder casting {args.flooder_share:.0%} of the votes" if args.flooder_share else ""
    print(f"loop_quality: {prefs}, {args.rounds} round(s) of {args.votes_per_round} votes from "
          f"{args.users} users{flood}, align run --method {args.method} {' '.join(args.align_arg)}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pref in prefs:  # JSON and plot after each preference, so a long run keeps its part
            rows += run_preference(pref, args, Path(tmp))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
            if args.plot:
                plot(rows, Path(args.plot))
    print(f"loop_quality: done ({len(rows)} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
