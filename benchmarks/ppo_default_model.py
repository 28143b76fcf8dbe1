"""PPO on the default model (SmolLM2-135M), through the CLI: `align rm` (TRL) on the model's own
answers, then `align ppo` against that reward model, the gate, publish and promote.

The log holds the default model's answers (`benchmarks/data/smollm2_fruit_answers.json`: 4
answers at T = 0.7, 12 tokens, to each of 24 fruit questions with the system prompt "Answer in a
few words.") and a clear synthetic preference over them: of two answers to one question, the one
that does not repeat the word "fruit" wins (56 pairs, by response id, as a server logs them).
8 more questions are logged last, so they are the held-out prompts.

    python benchmarks/ppo_default_model.py [--out-dir DIR]

Prints one JSON line (RM held-out accuracy, held-out reward before and after, KL, wall and CPU
seconds) and checks what the flow promises: reward up on held-out prompts, KL bounded, the
candidate promoted, the rollouts' reward rising. Exit status 1 when a check fails. About 3-4
minutes on a 2-core CPU; results in docs/ppo.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

FRUIT_DATA = Path(__file__).resolve().parent / "data" / "smollm2_fruit_answers.json"
HELDOUT_QUESTIONS = ["Name a fruit that is orange.", "Which fruit do you eat in summer?",
                     "What fruit is good for a cake?", "Name a fruit with a hard shell.",
                     "What fruit is juicy?", "Which fruit is purple?", "Name a fruit for a salad.",
                     "What fruit is popular in Spain?"]


def avoids_fruit(text: str) -> bool:
    """The synthetic preference: answers that do not repeat the word "fruit" win."""
    return "fruit" not in text.lower()


def fruit_log(data_dir: Path) -> int:
    """The model's answers to 24 questions as served generations, then preferences between
    answers to the same question (by response id; every pair where exactly one avoids "fruit",
    shuffled in time), then the 8 held-out questions as the newest generations. Returns the
    pair count."""
    from prefloop.server.feedback.store import FeedbackStore, StoreConfig
    from prefloop.server.feedback.wal import WalConfig
    doc = json.loads(FRUIT_DATA.read_text())
    system = {"role": "system", "content": doc["system"]}
    rows = [(r["question"], r["answer"]) for r in doc["answers"]] + \
        [(q, "(not used)") for q in HELDOUT_QUESTIONS]
    by_question = defaultdict(list)
    with FeedbackStore(StoreConfig(data_dir=data_dir, wal=WalConfig(linger_s=0.0005))) as store:
        def log_answer(i, question, answer):
            store.record_generation({
                "response_id": f"resp-{i}", "request_id": f"req-{i}",
                "created_at": dt.datetime.now(dt.timezone.utc), "model_version": "v0000",
                "backend": "native", "messages": [system, {"role": "user", "content": question}],
                "completion": answer, "finish_reason": "length", "prompt_tokens": 1,
                "completion_tokens": 12, "sampling": {"temperature": 0.7, "n": 1},
                "latency_ms": 1.0})
            return f"resp-{i}"

        for i, (q, a) in enumerate(rows[:len(doc["answers"])]):
            by_question[q].append((log_answer(i, q, a), a))
        store.flush()
        pairs = [(good, bad) for answers in by_question.values()
                 for good, good_text in answers if avoids_fruit(good_text)
                 for bad, bad_text in answers if not avoids_fruit(bad_text)]
        random.Random(0).shuffle(pairs)
        for good, bad in pairs:
            store.submit_preference(chosen_response_id=good, rejected_response_id=bad)
        for i, (q, a) in enumerate(rows[len(doc["answers"]):], start=len(doc["answers"])):
            log_answer(i, q, a)
    return len(pairs)


def align(argv: list[str]) -> tuple[int, str]:
    """`prefloop align ARGV...` in-process; (exit code, stdout)."""
    from prefloop import cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["align", *argv])
    return rc, buf.getvalue()


def run(work: Path) -> tuple[dict, list[str]]:
    """The whole flow in `work`; (summary, failed checks)."""
    from prefloop.align.train import ppo as P
    from prefloop.server import registry as reg
    started, cpu = time.monotonic(), time.process_time()
    data = work / "data"
    n_pairs = fruit_log(data)
    print(f"ppo benchmark: {n_pairs} preference pairs logged in {data}; training the reward model",
          file=sys.stderr)
    rc, text = align(["rm", "--data-dir", str(data), "--min-heldout-pairs", "8", "--epochs", "2",
                      "--batch-size", "8", "--lr", "5e-4", "--train-layers", "4",
                      "--max-length", "128", "--max-train-eval", "0", "--json"])
    if rc != 0:
        return {"stage": "rm", "output": text}, ["align rm failed"]
    rm = json.loads(text)
    print("ppo benchmark: reward model done; PPO (10 steps)", file=sys.stderr)
    out = work / "run"
    rc, text = align(["ppo", "--data-dir", str(data), "--rm", rm["version"], "--steps", "10",
                      "--batch-size", "8", "--mini-batch-size", "4", "--lr", "1e-4",
                      "--train-layers", "4", "--max-new-tokens", "12", "--temperature", "0.7",
                      "--beta", "0.05", "--heldout-fraction", "0.25", "--eval-samples", "3",
                      "--max-kl", "1.0", "--min-heldout-pairs", "8", "--plot",
                      "--out-dir", str(out),
                      # 8 held-out prompts: at 0.7, 6 wins of 8 is enough (interval
                      # [0.504, 0.913]) per job (a season's spending would halve the level)
                      "--gate-confidence", "0.7", "--season-spending", "none",
                      "--promote", "--json"])
    if rc != 0:
        return {"stage": "ppo", "output": text}, ["align ppo failed"]
    result = json.loads(text)
    held, base = result["metrics"]["heldout"], result["metrics"]["current"]
    history = P.read_metrics(out / "ppo_metrics.jsonl")
    first, last = (sum(h["reward"] for h in history[s]) / 3
                   for s in (slice(0, 3), slice(-3, None)))
    summary = {"pairs": n_pairs, "rm_version": rm["version"],
               "rm_heldout_accuracy": rm["metrics"]["heldout"]["accuracy"],
               "reward_before": base["reward"], "reward_after": held["reward"],
               "kl_per_token": held["kl_per_token"], "kl_per_answer": held["kl_per_sequence"],
               "rollout_reward_steps_1_3": first, "rollout_reward_steps_8_10": last,
               "status": result["status"], "version": result.get("version"),
               "plot": str(out / "ppo_curves.png"),
               "wall_s": round(time.monotonic() - started, 1),
               "cpu_s": round(time.process_time() - cpu, 1)}
    checks = {
        "the RM ranks >= 75% of its held-out pairs right": summary["rm_heldout_accuracy"] >= 0.75,
        "held-out rows are the 8 newest questions": result["data"]["rows"] == {"train": 24,
                                                                               "heldout": 8},
        "held-out reward rises by > 0.3": held["reward"] > base["reward"] + 0.3,
        "KL per token in (0, 1)": 0.0 < held["kl_per_token"] < 1.0,
        "the candidate is promoted and CURRENT": result["status"] == "promoted"
        and reg.Registry(data).current() == result["version"],
        "10 steps logged, KL 0 at the first": len(history) == 10
        and abs(history[0]["kl"]) < 1e-3,
        "rollout reward rises": last > first,
    }
    return summary, [name for name, ok in checks.items() if not ok]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="keep the data directory and plot here (default: a temporary folder)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        work = args.out_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        summary, failed = run(work)
        print("PPO on SmolLM2-135M:", json.dumps(summary))
    for name in failed:
        print(f"ppo benchmark: check failed: {name}", file=sys.stderr)
    print(f"ppo benchmark: {'FAILED' if failed else 'all checks passed'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
