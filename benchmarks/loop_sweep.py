"""Which `align run` settings make votes change the served answers? One set of votes per
preference, then one job per setting on a copy of that log, each candidate's held-out answers
judged against the base version's: the tuning sweep behind the defaults
(docs/loop_benchmark.md).

Votes are cast once per preference exactly as in benchmarks/loop_quality.py (simulated users on
a real `prefloop serve`, n=2 answers at the server's default sampling, concurrent users) and kept
under --work, so later runs reuse them. Each setting then runs
`prefloop align run --auto-promote --promote-via gate --keep-rejected --json <flags>` on a hard-linked copy of that
data dir, and the candidate (promoted or not: the sweep measures training, the gate is reported
beside it) answers the held-out prompts in-process at the server's default sampling with the
same seeds as the base. After the votes: the ceiling of the gate's rating test on them (the
users' own preference scoring the held-out answers; benchmarks/gate_power.py). Printed per
setting, side by side: the gate's outcome and held-out
implicit-reward win rate, KL per token, the served win rate vs base, the preferred property's
mean, training steps, training and whole-job seconds, pairs per second. The served win is judged
on 168 answers by default: each of the 24 held-out topics (nobody voted on them) asked in all 7
templates, one answer each, with a 95 % interval that resamples topics (or Wilson's where wider);
`--heldout-templates 1 --heldout-samples 2` is the 48-answer design of the runs before
2026-12-07, whose ±0.15 intervals could not tell settings apart (docs/loop_benchmark.md, "168
held-out answers").

    python benchmarks/loop_sweep.py --preference short_sentences --votes 200 \\
        --setting defaults= --setting lr1.5e-4=--lr=1.5e-4 --setting "full=--no-lora --lr=2e-5"
    python benchmarks/loop_sweep.py --preference friendly_opening --votes 300 --feedback population \\
        --noise 0.2 --max-tokens 0 --temperature 0.7 --setting default= --setting dpo=dpo
    python benchmarks/loop_sweep.py --preference plain_words --method ppo \\
        --rm-flags "--epochs 3 --lr 5e-5"      # RM + PPO: the reward model first, then PPO
    python benchmarks/loop_sweep.py ... --rejudge   # the kept candidates (--keep) judged again

A setting's flags may start with a method word (dpo, kto, sft, ppo): that setting runs `align run
METHOD`, the others `--method` (default: none, the product's default). `--feedback`, `--noise`,
`--up-rate` and `--users` shape the simulated users as in benchmarks/loop_quality.py; votes are
kept per (preference, feedback, noise, temperature, length, seed).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_quality import Users, add_user_arguments, judge, run_job, start_server, user_name, vote_round  # noqa: E402
from loop_users import TEMPLATES, prompts, up_bar, user_kinds  # noqa: E402

from prefloop.clients import Client  # noqa: E402


def collect_votes(work: Path, preference: str, votes: int, users: Users, seed: int,
                  concurrency: int, base: list[str], up_rate: float,
                  repetition_penalty: float | None = None) -> Path:
    """A data dir with v0000 and `votes` prompts voted on by `users` (reused when already
    there); a thumbs user's bar comes from the base's held-out answers `base`. The server
    answers at `repetition_penalty` as its default (None: the model's)."""
    data = work / "data"
    done = work / "votes.json"
    if done.exists():
        print(f"  reusing the votes in {data}: {done.read_text().strip()}", flush=True)
        return data
    users = dataclasses.replace(users, bar=up_bar(preference, base, up_rate))
    vote_prompts, _ = prompts(seed=seed)
    extra = () if repetition_penalty is None else ("--default-repetition-penalty",
                                                   str(repetition_penalty))
    proc, target = start_server(data, work / "server.log", extra)
    try:
        t = time.perf_counter()
        with Client(target, timeout=600) as client:
            cast = vote_round(client, preference, vote_prompts[:votes], users, seed, concurrency,
                              crowd=len(users.kinds))
        cast["seconds"] = round(time.perf_counter() - t, 1)
    finally:
        proc.terminate()
        proc.wait(60)
    done.write_text(json.dumps(cast) + "\n")
    print(f"  votes cast: {cast}", flush=True)
    return data


def init_data(work: Path) -> Path:
    """`work`/data with v0000 (kept when it is already there)."""
    data = work / "data"
    if (work / "votes.json").exists():
        return data
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "prefloop.cli", "models", "init", "--data-dir",
                    str(data)], check=True, capture_output=True)
    return data


def held_out_answers_in_process(model_dir: Path, held: list[str], max_tokens: int | None,
                                samples: int, temperature: float | None = None,
                                repetition_penalty: float | None = None) -> list[str]:
    """The version's answers to the held-out prompts at the server's default sampling (or
    `temperature` / `repetition_penalty`, and the default length when `max_tokens` is None), seeded as
    loop_quality.held_out_answers seeds them (in-process Generator, all at once)."""
    from prefloop.server.api.completions import SamplingDefaults
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.serving.build import build_generator

    async def run() -> list[str]:
        gen = build_generator(str(model_dir))
        defaults = SamplingDefaults.resolve(gen.info.sampling_defaults, temperature=temperature,
                                            repetition_penalty=repetition_penalty)
        await gen.start()
        try:
            async def one(i: int, s: int, prompt: str) -> str:
                ids = gen.chat_ids([{"role": "user", "content": prompt}])
                length = {} if max_tokens is None else {"max_tokens": max_tokens}
                # up to 100 prompts the seeds of loop_quality.held_out_answers (kept answers
                # stay comparable); beyond, seeds that no two (prompt, sample) share
                seed = 1000 + 100 * s + i if len(held) <= 100 else 1000 + samples * i + s
                params = SamplingParams(temperature=defaults.temperature, top_p=defaults.top_p,
                                        top_k=defaults.top_k, seed=seed,
                                        repetition_penalty=defaults.repetition_penalty, **length)
                return "".join([d.text_delta async for d in gen.stream(uuid.uuid4().hex, ids, params)])
            return list(await asyncio.gather(*(one(i, s, p) for i, p in enumerate(held)
                                               for s in range(samples))))
        finally:
            await gen.close()
    return asyncio.run(run())


METHODS = ("dpo", "kto", "sft", "ppo")
BAR_SAMPLES = 2  # base answers per held-out prompt that a thumbs user's bar comes from


def _flag(flags: str, name: str, default: float) -> float:
    for item in shlex.split(flags):
        if item.startswith(name + "="):
            return float(item.split("=", 1)[1])
    return default


def link_copy(src: Path, dst: Path) -> None:
    """A copy of a data dir whose files are hard links (versions are immutable; the log is only
    read by a job), so every setting starts from the same votes at no disk cost."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link)


def train_reward_model(data_dir: Path, flags: list[str]) -> dict:
    """`prefloop align rm --json FLAGS` on the copy: the judge PPO optimizes (published even when
    its own gate rejects it, so the sweep measures what PPO makes of it)."""
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "prefloop.cli", "align", "rm", "--data-dir",
                          str(data_dir), "--json", *flags],
                         capture_output=True, text=True)
    out = {"seconds": time.perf_counter() - start}
    try:
        out.update(json.loads(res.stdout[res.stdout.index("{"):]))
    except ValueError:
        out["stderr"] = res.stderr[-2000:]
    return out


def run_setting(name: str, flags: str, data: Path, work: Path, base: list[str], held: list[str],
                args) -> dict:
    copy = work / f"run-{name}"
    link_copy(data, copy)
    words = shlex.split(flags)
    method = words.pop(0) if words and words[0] in METHODS else args.method
    extra, rm = [], {}
    if method == "ppo":  # RM + PPO: the reward model is trained on the same votes first
        rm = train_reward_model(copy, shlex.split(args.rm_flags))
        if not rm.get("version"):
            shutil.rmtree(copy, ignore_errors=True)
            return {"setting": name, "flags": flags, "error": f"reward model: {rm.get('status')} "
                    f"{(rm.get('gate') or {}).get('reasons') or rm.get('stderr')}"}
        extra = ["--rm", rm["version"]]
    job = run_job(copy, method, ["--keep-rejected", *extra, *words])
    row = {"setting": name, "flags": flags, "status": job.get("status"),
           "reasons": (job.get("gate") or {}).get("reasons"), "job_s": round(job["seconds"], 1)}
    if rm:
        held_rm = (rm.get("metrics") or {}).get("heldout") or {}
        row.update(rm_version=rm["version"], rm_s=round(rm["seconds"], 1),
                   rm_accuracy=held_rm.get("accuracy"), rm_status=rm.get("status"))
    metrics = job.get("metrics") or {}
    training = metrics.get("training") or {}
    heldout = metrics.get("heldout") or {}
    gate = job.get("gate") or {}
    if gate.get("margin_parts"):  # the midpoint test's parts (align/train/midpoint.py)
        row["midpoint"] = dict(gate["margin_parts"], joined_p_value=gate.get("margin_p_value"),
                               **(metrics.get("midpoint") or {}))
    row.update(steps=training.get("steps"), train_s=training.get("runtime_s"),
               score_s=(metrics.get("seconds") or {}).get("score"),
               kl=heldout.get("kl_per_token"),
               train_pairs=((job.get("data") or {}).get("rows") or {}).get("train"),
               epochs=_flag(flags, "--epochs", 1.0))
    version = job.get("version")
    if version is None:
        row["error"] = job.get("stderr") or job.get("reason")
        shutil.rmtree(copy, ignore_errors=True)
        return row
    t = time.perf_counter()
    served = held_out_answers_in_process(copy / "registry" / "versions" / version, held,
                                         args.max_tokens, args.heldout_samples, args.temperature,
                                         args.repetition_penalty)
    row["measure_s"] = round(time.perf_counter() - t, 1)
    (copy / served_name(args)).write_text(json.dumps(served))  # --rejudge reads it
    row.update(judge(args.preference, base, served, random.Random(args.seed),
                     args.heldout_samples, held, args.heldout_samples * args.heldout_templates))
    row["examples"] = [{"prompt": held[i // args.heldout_samples], "base": base[i], "served": served[i]}
                       for i in range(0, len(served), max(1, len(served) // 3))][:3]
    if not args.keep:
        shutil.rmtree(copy, ignore_errors=True)
    return row


def rejudge_setting(name: str, work: Path, base: list[str], held: list[str], args) -> dict:
    """The served judgement again, without training: the kept candidate of `run-NAME` (its
    served.json, or its answers generated anew with the run's seeds when an older run kept
    none), judged by the users as they are now (loop_users.choose)."""
    copy = work / f"run-{name}"
    versions = sorted(p.name for p in (copy / "registry" / "versions").glob("v*")
                      if p.name != "v0000")
    if not versions:
        return {"setting": name, "error": f"no kept candidate in {copy} (run it with --keep first)"}
    saved = copy / served_name(args)
    if saved.exists():
        served = json.loads(saved.read_text())
    else:
        served = held_out_answers_in_process(copy / "registry" / "versions" / versions[-1], held,
                                             args.max_tokens, args.heldout_samples,
                                             args.temperature, args.repetition_penalty)
        saved.write_text(json.dumps(served))
    if len(served) != len(base):
        return {"setting": name, "error": f"{saved} holds {len(served)} answers, the design "
                f"{design_suffix(args)} has {len(base)}"}
    row = {"setting": name, "version": versions[-1]}
    row.update(judge(args.preference, base, served, random.Random(args.seed), args.heldout_samples,
                     held, args.heldout_samples * args.heldout_templates))
    return row


def base_answers(work: Path, data: Path, held: list[str], args, samples: int, suffix: str
                 ) -> list[str]:
    """The base version's `samples` answers to each of `held` (kept in `work`/base-SUFFIX.json
    between runs)."""
    path = work / f"base-{suffix}.json"
    if not path.exists():
        path.write_text(json.dumps(held_out_answers_in_process(
            data / "registry" / "versions" / "v0000", held, args.max_tokens, samples,
            args.temperature, args.repetition_penalty)))
    return json.loads(path.read_text())


def design_suffix(args) -> str:
    """The held-out design in file names: "2" (24 prompts, 2 answers each; the design before
    2026-12-07) or "1x7" (1 answer each of 7 templates per topic)."""
    return f"{args.heldout_samples}" + ("" if args.heldout_templates == 1
                                        else f"x{args.heldout_templates}")


def old_design(args) -> bool:
    """The design before 2026-12-07: 24 prompts, BAR_SAMPLES answers each."""
    return args.heldout_templates == 1 and args.heldout_samples == BAR_SAMPLES


def served_name(args) -> str:
    """A kept candidate's held-out answers for this design (served.json: the old design's, as
    runs before 2026-12-07 kept them)."""
    return "served.json" if old_design(args) else f"served-{design_suffix(args)}.json"


def served_text(row: dict) -> str:
    """"served win 0.77 [0.65, 0.87] (36-11) property … looping …": the judgement of a row."""
    rate = "-" if row["win_rate"] is None else f"{row['win_rate']:.2f}"
    return (f"served win {rate} [{row['interval'][0]:.2f}, {row['interval'][1]:.2f}] "
            f"({row['wins']}-{row['losses']}) property {row['base_property']:.1f} -> "
            f"{row['served_property']:.1f}"
            + (f" (median {row['base_property_median']:.1f} -> {row['served_property_median']:.1f})"
               if "served_property_median" in row else "")
            + f", looping {row['base_repetitive']:.0%} -> "
            f"{row['served_repetitive']:.0%}"
            + (f", off topic {row['base_off_topic']:.0%} -> {row['served_off_topic']:.0%}"
               if "served_off_topic" in row else ""))


def format_rejudged(row: dict) -> str:
    if "win_rate" not in row:
        return f"{row['setting']:>14} FAILED {row.get('error')}"
    return f"{row['setting']:>14} {row['version']} re-judged | {served_text(row)}"


def format_row(row: dict) -> str:
    if "win_rate" not in row:
        return f"{row['setting']:>14} FAILED {row.get('error')!s:.300}"
    kl = "-" if row["kl"] is None else f"{row['kl']:.4f}"
    pairs_s = (f"{row['train_pairs'] * row['epochs'] / row['train_s']:.2f} pairs/s"
               if row.get("train_s") and row.get("train_pairs") and not row.get("rm_version")
               else "-")  # PPO's steps are rollouts of prompts, not passes over pairs
    rm = (f"\n{'':>16}reward model {row['rm_version']} ({row['rm_status']}): held-out accuracy "
          f"{row['rm_accuracy'] or float('nan'):.3f}, {row['rm_s']}s" if row.get("rm_version") else "")
    mid = row.get("midpoint")
    rm += (f"\n{'':>16}rating test: held-out answers alone p {mid['heldout_p_value']:.4f}; the "
           f"{mid['midpoint_answers']} newer training answers scored at step {mid.get('step')} "
           f"p {mid['midpoint_p_value']:.4f} (AUC {mid['midpoint_auc'] or float('nan'):.3f}, "
           f"{mid.get('seconds')}s); joined p {mid['joined_p_value']:.4f}" if mid else "")
    return (f"{row['setting']:>14} {row['status'] or 'failed':>9} KL {kl} "
            f"| {served_text(row)} | steps {row['steps']} train {row['train_s']}s "
            + (f"score {row['score_s']}s " if row.get("score_s") else "") +
            f"job {row['job_s']}s, {pairs_s}\n{'':>16}gate: {'; '.join(row['reasons'] or [])}{rm}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preference", default="short_sentences", help="loop_users preference (default %(default)s)")
    ap.add_argument("--votes", type=int, default=200, help="prompts voted on (default %(default)s)")
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=FLAGS",
                    help="a named set of `align run` flags (repeatable; default: defaults=)")
    ap.add_argument("--method", default="", choices=("",) + METHODS,
                    help="align run METHOD of every setting whose flags do not start with a method "
                         "word (default: none, the product's default)")
    ap.add_argument("--rm-flags", default="",
                    help="with --method ppo: `align rm` flags of the reward model trained first on the "
                         "same votes (default: its defaults)")
    add_user_arguments(ap)
    ap.add_argument("--users", type=int, default=20, help="simulated users (default %(default)s)")
    ap.add_argument("--heldout-samples", type=int, default=1,
                    help="answers per held-out prompt (default %(default)s; 2 with "
                         "--heldout-templates 1 is the design before 2026-12-07)")
    ap.add_argument("--heldout-templates", type=int, default=7, metavar="K",
                    help="prompts per held-out topic of the 24, each in its own template (1-7; "
                         "default %(default)s: 168 answers, an interval that resamples topics; "
                         "docs/loop_benchmark.md, \"168 held-out answers\")")
    ap.add_argument("--repetition-penalty", type=float, default=None, metavar="P",
                    help="the loop server's `--default-repetition-penalty`, also for the base's and "
                         "candidates' held-out answers (default: the model's, 1); the gate's "
                         "degeneration check samples without it")
    ap.add_argument("--concurrency", type=int, default=8, help="users voting at a time (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="prompt split and user randomness (default %(default)s)")
    ap.add_argument("--work", default="/tmp/prefloop-loop-sweep",
                    help="votes and base answers are kept here between runs (default %(default)s)")
    ap.add_argument("--json", default=None, help="append every row to this JSON-lines file")
    ap.add_argument("--keep", action="store_true",
                    help="keep each setting's data dir (run-NAME under --work) with its candidate")
    ap.add_argument("--rejudge", action="store_true",
                    help="train nothing: judge each setting's kept candidate (an earlier --keep "
                         "run's run-NAME) again by the users as they are now")
    args = ap.parse_args()
    if not 0 <= args.noise < 0.5 or not 0 < args.up_rate < 1 or args.users < 1:
        ap.error("--noise must be in [0, 0.5), --up-rate in (0, 1) and --users >= 1")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        ap.error("--repetition-penalty must be > 0")
    if not 1 <= args.heldout_templates <= len(TEMPLATES) or args.heldout_samples < 1:
        ap.error(f"--heldout-templates must be in 1..{len(TEMPLATES)} and --heldout-samples >= 1")
    settings = [s.split("=", 1) for s in (args.setting or ["defaults="])]
    args.max_tokens = args.max_tokens or None
    work = Path(args.work) / (f"{args.preference}-{args.feedback}-noise{args.noise}-"
                              f"t{args.temperature}-m{args.max_tokens}-seed{args.seed}"
                              + ("" if args.repetition_penalty is None
                                 else f"-rp{args.repetition_penalty}"))
    print(f"loop_sweep: {args.preference}, {args.votes} prompts, {args.feedback} feedback "
          f"({args.noise:.0%} flipped), {len(settings)} setting(s), method "
          f"{args.method or '(default)'}", flush=True)
    if args.rejudge and not (work / "votes.json").exists():
        ap.error(f"--rejudge needs an earlier run's votes and kept candidates in {work}")
    data = init_data(work)
    _, held = prompts(seed=args.seed, templates=args.heldout_templates)
    base = base_answers(work, data, held, args, args.heldout_samples, design_suffix(args))
    kinds = user_kinds(args.users, args.feedback)
    users = Users({user_name(i): k for i, k in enumerate(kinds)}, noise=args.noise,
                  up_rate=args.up_rate, max_tokens=args.max_tokens, temperature=args.temperature)
    if args.rejudge:
        for name, _ in settings:
            print(format_rejudged(rejudge_setting(name, work, base, held, args)), flush=True)
        print("loop_sweep: done")
        return 0
    # a thumbs user's bar comes from the base's answers in the design before 2026-12-07 (24
    # prompts, 2 answers each) whatever the judgement's design, so the votes do not depend on
    # how the candidates are judged
    bar_base = base if old_design(args) or (work / "votes.json").exists() else base_answers(
        work, data, prompts(seed=args.seed)[1], args, BAR_SAMPLES, f"{BAR_SAMPLES}")
    data = collect_votes(work, args.preference, args.votes, users, args.seed, args.concurrency,
                         bar_base, args.up_rate, args.repetition_penalty)
    if args.preference != "random":
        from gate_power import events_for_level, heldout_ceiling, midpoint_ceiling
        c = heldout_ceiling(data, args.preference)
        need = events_for_level(c["p"], c["events"])
        print(f"  ceiling: the users' own preference ranks the {c['answers']} held-out answers of a "
              f"default job at AUC {c['auc']:.3f}, randomization p {c['p']:.3g} (no candidate's "
              f"statistic can beat this but by chance; each of the gate's two tests needs p < "
              f"0.0125 at a season's first decision); at this much evidence per event a perfect "
              f"candidate needs {'at most ' if c['at_floor'] else ''}about "
              f"{need if need is not None else 'unboundedly many'} events (now {c['events']}"
              f"{'; p is the randomization floor, 1/(1 + draws)' if c['at_floor'] else ''})",
              flush=True)
        m = midpoint_ceiling(data, args.preference)
        need = events_for_level(m["joined_p"], m["events"])
        print(f"  with the midpoint test: the {m['answers']} newer training answers at AUC "
              f"{m['auc']:.3f}, p {m['p']:.3g}; joined with the held-out ones p "
              f"{m['joined_p']:.3g}: a perfect candidate needs about "
              f"{need if need is not None else 'unboundedly many'} events", flush=True)
    for name, flags in settings:
        row = run_setting(name, flags, data, work, base, held, args)
        print(format_row(row), flush=True)
        for ex in row.get("examples", []):
            print(f"{'':>16}{ex['prompt']}\n{'':>18}base:   {ex['base'][:160]!r}\n"
                  f"{'':>18}served: {ex['served'][:160]!r}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(row, preference=args.preference, votes=args.votes,
                                        feedback=args.feedback, noise=args.noise)) + "\n")
    print("loop_sweep: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
