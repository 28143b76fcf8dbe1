"""Does the loop keep its promise? Simulated users with a hidden, consistent preference talk to a
real `prefloop serve` over gRPC, give feedback exactly as a UI would, the scheduled job runs
as users run it (`prefloop align run --auto-promote`, defaults), the live server swaps, and the
served answers on held-out prompts nobody voted on are judged against the base version's.

Users have ids (`--users`, default 20, each voting on an equal share of the prompts), so the
job's per-voter cap sees an ordinary crowd. `--flooder-share S` adds one more user who casts a
share S of all votes for the opposite of what the crowd prefers (the worse answer of each pair),
as fast as the server takes them: the case "one user tries to steer the model" (docs/reliability.md).
`--align-arg=--voter-cap=0` runs the same without the cap, for comparison.

`--feedback` says how they give it: `pairs` (each compares two answers, the default), `thumbs`
(each gets one answer and presses 👍 or 👎; 👍 when the answer is as good as the best `--up-rate`
share of the base's answers), or `population` (70 % thumbs users, 25 % compare, 5 % edit an
answer into what they wanted); `--noise` flips that share of every user's votes. `--max-tokens 0`
and `--temperature 0.7` answer at the server's default length and the web page's temperature.

Per round (votes -> retrain -> swap -> measure) it prints and records: votes cast, the job's
outcome and gate reasons, the simulated user's win rate of served vs base on held-out prompts
(pairwise, ties excluded; 95% interval: a bootstrap over prompts when each prompt has several
answers, else Wilson), the preferred property's mean for base and
served, the job's KL per token, and the wall time of each phase. A PNG of win rate vs votes
goes to --plot.

    python benchmarks/loop_quality.py [--preferences short_sentences,plain_words,friendly_opening,random]
        [--rounds 2] [--votes-per-round 100] [--method dpo|kto] [--max-tokens 64] [--temperature 0.7]
        [--feedback pairs|thumbs|population] [--noise 0.2] [--up-rate 0.3]
        [--plot docs/loop_quality.png] [--users 20] [--flooder-share 0.5] [--json out.json]
        [--promote-via gate|auto]
        [--align-arg=--lr=5e-6 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_users import (  # noqa: E402
    MIXES,
    REWRITES,
    choose,
    noisy,
    off_topic,
    prompts,
    property_value,
    rate,
    repetitive,
    up_bar,
    user_kinds,
)

from prefloop.clients import Client  # noqa: E402
from prefloop.server.ab import evidence as ab_evidence  # noqa: E402
from prefloop.server.ab import state as ab_state  # noqa: E402
from prefloop.server.registry import Registry  # noqa: E402


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def start_server(data_dir: Path, log_path: Path, extra: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, str]:
    """A real `prefloop serve` on `data_dir` with `extra` serve flags; (process, gRPC target)."""
    proc = subprocess.Popen([sys.executable, "-m", "prefloop.cli", "serve", "--port", "0",
                             "--http-port", "0", "--data-dir", str(data_dir), "--registry-poll", "0.5",
                             # simulated users vote faster than people: no per-voter limit
                             "--votes-per-minute", "0", "--token-votes-per-minute", "0", *extra],
                            stdout=subprocess.PIPE, stderr=open(log_path, "wb"), text=True)
    line = ""
    while "listening on" not in line:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server did not start; see {log_path}")
    return proc, line.split("listening on", 1)[1].split()[0]


def held_out_answers(client: Client, held: list[str], max_tokens: int | None, samples: int = 2,
                     concurrency: int = 8, temperature: float | None = None
                     ) -> tuple[list[str], str]:
    """`samples` answers per held-out prompt (seeded per prompt and sample, so base and served
    answers are paired), `concurrency` requests at a time; `max_tokens` / `temperature` None:
    the server's defaults. Also the versions that answered (with counts when an A/B test sent
    some requests, which carry no user id, to its candidate)."""
    jobs = [(i, s, prompt) for i, prompt in enumerate(held) for s in range(samples)]

    def one(job):
        i, s, prompt = job
        result = client.chat([{"role": "user", "content": prompt}], seed=1000 + 100 * s + i,
                             **sampling(max_tokens, temperature))
        return result.completions[0].text, result.model_version

    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, jobs))
    counts = Counter(version for _, version in out)  # during an A/B test: both versions
    return [text for text, _ in out], " + ".join(
        v if len(counts) == 1 else f"{v} ({n})" for v, n in counts.most_common())


def sampling(max_tokens: int | None, temperature: float | None) -> dict:
    """The chat call's sampling fields; None leaves a field to the server's default."""
    return {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature))
            if v is not None}


FLOODER = "flooder"


@dataclass(frozen=True)
class Users:
    """How the simulated users give feedback: each user's kind (loop_users.MIXES: "pick" of two
    answers, "thumbs" on one, "edit" of one), the share of votes each flips (`noise`), and a thumbs
    user's bar (`up_bar`, about `up_rate` of the base's answers reach it)."""

    kinds: dict[str, str]
    noise: float = 0.0
    bar: float = 0.0
    up_rate: float = 0.3
    max_tokens: int | None = 64
    temperature: float | None = None
    compare: bool = False  # an A/B test runs: pickers ask for a blind pair (one per version)

    def kind(self, user_id: str) -> str:
        return self.kinds.get(user_id, "pick")


def vote_one(client: Client, preference: str, prompt: str, users: Users, seed: int,
             user_id: str = "") -> str:
    """One simulated user's turn, as a UI would send it. A "pick" user gets two answers and
    prefers one (or, on a tie, rewrites one when neither has the property and the preference has
    a rewrite, else nothing); a "thumbs" user gets one answer and presses 👍 or 👎; an "edit" user
    gets one answer and rewrites it when it lacks the property (else 👍; a preference without a
    rewrite: 👍 / 👎 as a thumbs user). While an A/B test runs (`users.compare`) a pick user's two
    answers are a blind compare pair, one from each version, as the web page's compare mode asks
    for them. Votes flip with probability `users.noise`. Returns "vote",
    "thumb", "rewrite" or "tie". The flooder picks the answer the crowd would reject and never
    rewrites."""
    messages = [{"role": "user", "content": prompt}]
    rng = random.Random(seed)
    kind = "pick" if user_id == FLOODER else users.kind(user_id)
    opts = sampling(users.max_tokens, users.temperature)
    if kind in ("thumbs", "edit"):
        a = client.chat(messages, user_id=user_id, **opts).completions[0]
        if kind == "edit" and preference in REWRITES and property_value(preference, a.text) == 0:
            client.submit_preference(prompt_messages=messages, rejected_text=a.text,
                                     chosen_text=REWRITES[preference](a.text), user_id=user_id)
            return "rewrite"
        up = noisy(rate(preference, a.text, users.bar, users.up_rate, rng, prompt), users.noise,
                   rng)
        client.submit_rating(a.response_id, 1 if up else -1, scale="thumbs", user_id=user_id)
        return "thumb"
    pair = (client.chat(messages, compare=True, user_id=user_id, **opts).completions
            if users.compare else ())
    if len(pair) != 2:  # no A/B test (or it ended): two answers of the served version
        pair = client.chat(messages, n=2, user_id=user_id, **opts).completions
    a, b = pair
    pick = choose(preference, a.text, b.text, rng, prompt)
    if pick is None:
        if user_id != FLOODER and preference in REWRITES and property_value(preference, a.text) == 0:
            # neither answer has it: this user rewrites one, as the web page's "edit" does
            client.submit_preference(prompt_messages=messages, rejected_text=a.text,
                                     chosen_text=REWRITES[preference](a.text), user_id=user_id)
            return "rewrite"
        return "tie"
    pick = 1 - pick if user_id == FLOODER else noisy(pick, users.noise, rng)
    chosen, rejected = (a, b) if pick == 0 else (b, a)
    client.submit_preference(chosen_response_id=chosen.response_id,
                             rejected_response_id=rejected.response_id, user_id=user_id)
    return "vote"


def turns_of(vote_prompts: list[str], users: int, flooder_share: float,
             rng: random.Random) -> list[tuple[str, str]]:
    """(user id, prompt) turns of one round: the crowd's users take the prompts in turn; the
    flooder takes share/(1-share) as many turns on the same prompts; all shuffled together, so
    the flooder's votes fall through the whole round (training and held-out rows alike)."""
    turns = [(user_name(i % users), prompt) for i, prompt in enumerate(vote_prompts)]
    flood = round(len(vote_prompts) * flooder_share / (1 - flooder_share)) if flooder_share else 0
    turns += [(FLOODER, vote_prompts[i % len(vote_prompts)]) for i in range(flood)]
    rng.shuffle(turns)
    return turns


def user_name(i: int) -> str:
    return f"user-{i:02d}"


def vote_round(client: Client, preference: str, vote_prompts: list[str], users: Users,
               seed: int, concurrency: int = 8, crowd: int = 20, flooder_share: float = 0.0
               ) -> dict:
    """Users vote on `vote_prompts`, `concurrency` at a time (as a live server sees them)."""
    turns = turns_of(vote_prompts, crowd, flooder_share, random.Random(seed))
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda it: vote_one(client, preference, it[1][1], users,
                                                     seed * 100003 + it[0], user_id=it[1][0]),
                                 enumerate(turns)))
    mine = [o for (user, _), o in zip(turns, outcomes) if user != FLOODER]
    rewrites, thumbs = mine.count("rewrite"), mine.count("thumb")
    return {"votes": mine.count("vote") + rewrites + thumbs, "ties": mine.count("tie"),
            "rewrites": rewrites, "thumbs": thumbs,
            "flooder_votes": sum(o == "vote" for (user, _), o in zip(turns, outcomes) if user == FLOODER)}


def run_job(data_dir: Path, method: str, extra: list[str], promote_via: str = "gate",
            env: dict[str, str] | None = None) -> dict:
    """`align run [METHOD] --auto-promote --promote-via ROUTE`; method "" is the product's default
    (no method). The benchmark's default route is `gate` (the offline gate decides, as when the
    tables in docs/loop_benchmark.md were measured); `auto` (the product's default) lets an undecided
    candidate go to an A/B test that the next rounds' users decide."""
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "prefloop.cli", "align", "run",
                          *([method] if method else []), "--data-dir", str(data_dir),
                          "--auto-promote", "--promote-via", promote_via,
                          "--json", *extra], capture_output=True, text=True, env=env)
    out = {"seconds": time.perf_counter() - start, "returncode": res.returncode}
    try:
        out.update(json.loads(res.stdout[res.stdout.index("{"):]))
    except ValueError:
        out["stderr"] = res.stderr[-2000:]
    return out


def cluster_interval(per_prompt: list[tuple[int, int]], draws: int = 4000, seed: int = 0
                     ) -> tuple[float, float]:
    """95 % percentile bootstrap of the win rate wins / (wins + losses) resampling prompts, not
    answers: the samples of one prompt are not independent observations."""
    rng = random.Random(seed)
    rates = []
    for _ in range(draws):
        pick = [per_prompt[rng.randrange(len(per_prompt))] for _ in per_prompt]
        w, n = sum(p[0] for p in pick), sum(p[0] + p[1] for p in pick)
        if n:
            rates.append(w / n)
    if not rates:
        return 0.0, 1.0
    rates.sort()
    return rates[int(0.025 * len(rates))], rates[min(len(rates) - 1, int(0.975 * len(rates)))]


def judge(preference: str, base: list[str], served: list[str], rng: random.Random,
          samples: int = 1, held: list[str] | None = None, cluster: int | None = None) -> dict:
    """The user's verdict on each (served, base) answer pair. Answers come `samples` per prompt,
    consecutively, and `cluster` (default `samples`) consecutive answers share a topic: with
    more than one, the interval spans both a cluster bootstrap over topics (`cluster_interval`)
    and Wilson's (a bootstrap of a few dozen topics can come out narrower than independent
    answers would allow), else it is Wilson's. `held`: the prompts, one per `samples` answers, so the users see which answers
    leave their topic (loop_users.off_topic) and the shares are reported."""
    cluster = cluster or samples
    asked = [held[i // samples] for i in range(len(served))] if held is not None else \
        [None] * len(served)
    outcomes = [choose(preference, new, old, rng, q) for old, new, q in zip(base, served, asked)]
    wins, losses = outcomes.count(0), outcomes.count(1)
    if cluster > 1:
        per_topic = [(outcomes[i:i + cluster].count(0), outcomes[i:i + cluster].count(1))
                     for i in range(0, len(outcomes), cluster)]
        low, high = cluster_interval(per_topic)
        w_low, w_high = wilson(wins, wins + losses)
        low, high = min(low, w_low), max(high, w_high)
    else:
        low, high = wilson(wins, wins + losses)
    return {"wins": wins, "losses": losses, "win_rate": wins / (wins + losses) if wins + losses else None,
            "interval": [low, high], "interval_kind": (
                "Wilson" if cluster == 1 else "cluster bootstrap by prompt, or Wilson where wider"
                if cluster == samples else "cluster bootstrap by topic, or Wilson where wider"),
            "base_property": sum(property_value(preference, a) for a in base) / len(base),
            "served_property": sum(property_value(preference, a) for a in served) / len(served),
            # the median too: one collapsed answer ("Mmmm…", 255 letters in one word) moved the
            # mean letters per word of 168 answers from 4.7 to 6.1 on 2026-12-07
            "base_property_median": statistics.median(property_value(preference, a) for a in base),
            "served_property_median": statistics.median(property_value(preference, a) for a in served),
            "base_repetitive": sum(map(repetitive, base)) / len(base),
            "served_repetitive": sum(map(repetitive, served)) / len(served),
            **({} if held is None else {
                "base_off_topic": sum(map(off_topic, asked, base)) / len(base),
                "served_off_topic": sum(map(off_topic, asked, served)) / len(served)})}


def run_preference(preference: str, args, work: Path) -> list[dict]:
    data = work / preference / "data"
    data.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "prefloop.cli", "models", "init", "--data-dir", str(data)],
                   check=True, capture_output=True)
    vote_prompts, held = prompts(seed=args.seed)
    rng = random.Random(args.seed)
    extra = () if args.repetition_penalty is None else ("--default-repetition-penalty",
                                                        str(args.repetition_penalty))
    proc, target = start_server(data, work / f"{preference}-server.log", extra)
    registry = Registry(data)
    rows = []
    try:
        with Client(target, timeout=600) as client:
            t = time.perf_counter()
            base, _ = held_out_answers(client, held, args.max_tokens, args.heldout_samples,
                                       args.concurrency, args.temperature)
            measure_base = time.perf_counter() - t
            kinds = user_kinds(args.users, args.feedback)
            users = Users({user_name(i): k for i, k in enumerate(kinds)}, noise=args.noise,
                          bar=up_bar(preference, base, args.up_rate), up_rate=args.up_rate,
                          max_tokens=args.max_tokens, temperature=args.temperature)
            total_votes = total_flood = 0
            for r in range(args.rounds):
                batch = [vote_prompts[i % len(vote_prompts)]  # past the last prompt: again
                         for i in range(r * args.votes_per_round, (r + 1) * args.votes_per_round)]
                t = time.perf_counter()
                ab_before = ab_state.running_state(registry)
                votes = vote_round(client, preference, batch,
                                   dataclasses.replace(users, compare=ab_before is not None),
                                   args.seed + r, args.concurrency, args.users,
                                   args.flooder_share)
                vote_s = time.perf_counter() - t
                total_votes += votes["votes"]
                total_flood += votes["flooder_votes"]
                ab_after_votes = ab_state.read_state(registry)
                evidence = evidence_line(registry, data) if ab_after_votes is not None \
                    and ab_after_votes.running else ""
                job = run_job(data, args.method, args.align_arg, args.promote_via)
                t = time.perf_counter()
                deadline = time.time() + 300
                version = job.get("version") if job.get("status") == "promoted" else None
                while version and client.model_info().model_version != version and time.time() < deadline:
                    time.sleep(0.5)
                swap_s = time.perf_counter() - t
                t = time.perf_counter()
                served, served_version = held_out_answers(client, held, args.max_tokens,
                                                          args.heldout_samples, args.concurrency,
                                                          args.temperature)
                measure_s = time.perf_counter() - t
                ab = ab_state.read_state(registry)
                row = {"preference": preference, "feedback": args.feedback, "noise": args.noise,
                       "round": r + 1, "votes_total": total_votes, "current": registry.current(),
                       "ab_during_votes": ab_summary(ab_before, ab_after_votes),
                       "ab_evidence": evidence,
                       "ab_after_job": ab_summary(ab, ab) if ab is not None and ab.running else "",
                       "flooder_votes_total": total_flood, **votes,
                       "job_status": job.get("status"), "job_reason": job.get("reason"),
                       "served_version": served_version,
                       "kl_per_token": (job.get("gate") or {}).get("kl_per_token"),
                       "training": (job.get("metrics") or {}).get("training"),
                       "seconds": {"vote": vote_s, "job": job["seconds"], "swap": swap_s,
                                   "measure": measure_s, "measure_base": measure_base},
                       **judge(preference, base, served, rng, args.heldout_samples, held)}
                rows.append(row)
                print(format_row(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


def ab_summary(before, after) -> str:
    """What happened to the A/B test over a phase: "" (none ran), "running vX", or how the test
    that ran ended ("vX promoted: reason")."""
    if before is None:
        return ""
    if after is not None and after.started_at == before.started_at and not after.running:
        return f"{after.candidate} {after.status}: {after.reason}"
    now = after if after is not None and after.started_at == before.started_at else before
    return (f"{now.candidate} running ({now.traffic:.0%} traffic, confidence "
            f"{now.confidence:.4g}; head-to-head {now.wins}-{now.losses} so far)")


def evidence_line(registry: Registry, data: Path) -> str:
    """The running test's evidence as `ab status` computes it: the product's e-value against its
    threshold, and each kind's factor."""
    shown = ab_evidence.status(registry, data)
    if not shown.get("running"):
        return ""
    r = shown["ratings"]
    return (f"e-value {shown['e_better']:.3g} of {1 / (1 - shown['confidence']):.4g} to promote "
            f"(head-to-head {shown['wins']}-{shown['losses']}: "
            f"{shown['head_to_head']['e_better']:.3g}; ratings of {r['candidate_users']} / "
            f"{r['control_users']} candidate / control users in {r['blocks']} blocks: "
            f"{r['e_better']:.3g})")


def format_row(row: dict) -> str:
    win = "-" if row["win_rate"] is None else f"{row['win_rate']:.2f}"
    kl = "-" if row["kl_per_token"] is None else f"{row['kl_per_token']:.4f}"
    s = row["seconds"]
    flood = f" +{row['flooder_votes_total']} flooder" if row.get("flooder_votes_total") else ""
    kinds = f" ({row['thumbs']} thumbs, {row['rewrites']} edits)" if row.get("thumbs") else ""
    return (f"{row['preference']:>16} r{row['round']} events {row['votes_total']:4d}{kinds}{flood} "
            f"job {row['job_status'] or 'failed':>9} served {row['served_version']:>5} "
            f"win {win} [{row['interval'][0]:.2f}, {row['interval'][1]:.2f}] "
            f"property {row['base_property']:.2f} -> {row['served_property']:.2f} looping "
            f"{row['base_repetitive']:.0%} -> {row['served_repetitive']:.0%} off topic "
            f"{row['base_off_topic']:.0%} -> {row['served_off_topic']:.0%} KL {kl} "
            f"| vote {s['vote']:.0f}s job {s['job']:.0f}s swap {s['swap']:.0f}s measure {s['measure']:.0f}s"
            + (f"\n{'':>16} A/B during the votes: {row['ab_during_votes']}" if row.get("ab_during_votes") else "")
            + (f"\n{'':>16} A/B evidence after the votes: {row['ab_evidence']}" if row.get("ab_evidence") else "")
            + (f"\n{'':>16} A/B after the job: {row['ab_after_job']}" if row.get("ab_after_job") else ""))


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


def add_user_arguments(ap: argparse.ArgumentParser) -> None:
    """How the simulated users give feedback and see answers (also loop_sweep.py's flags)."""
    ap.add_argument("--feedback", default="pairs", choices=sorted(MIXES),
                    help="how users give feedback: pairs (everyone compares two answers), thumbs "
                         "(everyone rates one), population (70%% thumbs, 25%% compare, 5%% edit) "
                         "(default %(default)s)")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="share of each user's votes flipped (default %(default)s)")
    ap.add_argument("--up-rate", type=float, default=0.3,
                    help="share of the base's answers a thumbs user rates up (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64,
                    help="answer length; 0: the server's default (default %(default)s)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature of every answer (default: the server's; the web "
                         "page sends 0.7)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preferences", default="short_sentences,plain_words,friendly_opening,random",
                    help="comma-separated (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="vote -> retrain -> swap rounds (default %(default)s)")
    ap.add_argument("--votes-per-round", type=int, default=100, help="prompts voted on per round (default %(default)s)")
    ap.add_argument("--method", default="", choices=("", "dpo", "kto", "sft"),
                    help="align run METHOD (default: none, the product's default)")
    add_user_arguments(ap)
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
    ap.add_argument("--promote-via", choices=("gate", "auto"), default="gate",
                    help="the jobs' route: gate (the offline gate alone, as docs/loop_benchmark.md's tables) "
                         "or auto (the product's default: an undecided but safe candidate is A/B "
                         "tested at 10%% traffic and the next rounds' users decide; pickers then "
                         "get blind compare pairs) (default %(default)s)")
    ap.add_argument("--align-arg", action="append", default=[], help="extra `align run` flag (repeatable)")
    ap.add_argument("--repetition-penalty", type=float, default=None, metavar="P",
                    help="the server's `--default-repetition-penalty`: every answer users vote on "
                         "and every held-out answer is sampled at it (default: the model's, 1); "
                         "the gate's degeneration check samples without it")
    ap.add_argument("--plot", default=None, help="PNG of win rate vs votes")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()
    if not 0 <= args.flooder_share < 1 or args.users < 1:
        ap.error("--flooder-share must be in [0, 1) and --users >= 1")
    if not 0 <= args.noise < 0.5 or not 0 < args.up_rate < 1:
        ap.error("--noise must be in [0, 0.5) and --up-rate in (0, 1)")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        ap.error("--repetition-penalty must be > 0")
    args.max_tokens = args.max_tokens or None
    prefs = args.preferences.split(",")
    flood = f", a flooder casting {args.flooder_share:.0%} of the votes" if args.flooder_share else ""
    print(f"loop_quality: {prefs}, {args.rounds} round(s) of {args.votes_per_round} votes from "
          f"{args.users} users ({args.feedback} feedback, {args.noise:.0%} flipped){flood}, "
          f"align run {args.method or '(default method)'} {' '.join(args.align_arg)}"
          + ("" if args.repetition_penalty is None
             else f", server repetition penalty {args.repetition_penalty}"),
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
