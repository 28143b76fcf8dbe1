"""What `prefloop align` prints after a job: the metrics summary of any method (data window,
training, train vs held-out table, the current version, the gate's verdict) and what to do after a
rejection. Reads the job's record (`JobResult.to_record()`); prints nothing itself.
"""
from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(train: dict, held: dict, rows: list[tuple[str, str, int]], width: int, *,
           every_row: bool = False) -> list[str]:
    """A train vs held-out table of the `(label, key, digits)` rows either side has (all of
    them with `every_row`)."""
    lines = [f"{'':{width}}{'train':>10}{'held-out':>10}"]
    for label, key, digits in rows:
        if every_row or key in train or key in held:
            lines.append(f"{label:{width}}{_fmt(train.get(key), digits):>10}"
                         f"{_fmt(held.get(key), digits):>10}")
    return lines


_PREFERENCE_ROWS = [("pairs", "pairs", 0), ("examples", "examples", 0), ("loss", "loss", 4),
                    ("reward accuracy", "reward_accuracy", 3),
                    ("reward margin", "reward_margin", 4), ("label accuracy", "label_accuracy", 3),
                    ("pref accuracy", "pref_accuracy", 3),
                    ("ref pref accuracy", "ref_pref_accuracy", 3),
                    ("KL/token to ref", "kl_per_token", 4), ("KL/sequence", "kl_per_sequence", 4)]
_RM_ROWS = [("pairs", "pairs", 0), ("accuracy", "accuracy", 3), ("margin", "margin", 3),
            ("loss", "loss", 4)]


def format_gate(r: dict[str, Any]) -> list[str]:
    """The gate's verdict and reasons (or why there was no gate)."""
    gate = r.get("gate")
    if gate:
        return ([f"gate: {'PASSED' if gate['passed'] else 'REJECTED'}"]
                + [f"  - {reason}" for reason in gate.get("reasons", [])])
    return [f"reason: {r['reason']}"] if r.get("reason") else []


def format_result(result) -> str:
    """The metrics summary of any align job: data, training, train vs held-out, the current
    version, the gate's reasons."""
    r = result if isinstance(result, dict) else result.to_record()
    method = r.get("method")
    lines = [f"job {r['job_id']}: {r['status']}" + (f" -> {r['version']}" if r.get("version")
                                                     else "") + f" (base {r.get('base')})"]
    metrics, data = r.get("metrics") or {}, r.get("data") or {}
    train, held = metrics.get("train") or {}, metrics.get("heldout") or {}
    if data.get("rows") and any(data["rows"].values()):
        lines.append(f"data: {data.get('since')} .. {data.get('until')}  "
                     f"train {data['rows']['train']}  held-out {data['rows']['heldout']}"
                     f" (from {data.get('heldout_since')})")
    tr = metrics.get("training") or {}
    if tr:
        lines.append(f"training: {tr.get('steps')} steps in {tr.get('runtime_s')} s" +
                     (f", loss {_fmt(tr.get('first_loss'))} -> {_fmt(tr.get('last_loss'))}"
                      if "first_loss" in tr else ""))
    if method == "rm":
        lines += _table(train, held, _RM_ROWS, 18, every_row=True)
    elif method == "ppo":
        first, last = tr.get("first") or {}, tr.get("last") or {}
        if first:
            lines.append(f"rollout reward {_fmt(first.get('reward'))} -> "
                         f"{_fmt(last.get('reward'))}, KL/answer {_fmt(first.get('kl'))} -> "
                         f"{_fmt(last.get('kl'))}")
        cur = metrics.get("current") or {}
        if held:
            lines.append(f"held-out ({held.get('samples')} answers): reward "
                         f"{_fmt(held.get('reward'), 4)} vs {cur.get('version')} "
                         f"{_fmt(cur.get('reward'), 4)}; KL/token "
                         f"{_fmt(held.get('kl_per_token'), 4)}")
        if tr.get("metrics_file"):
            lines.append(f"metrics: {tr['metrics_file']}" +
                         (f"  plot: {tr['plot']}" if tr.get("plot") else ""))
    else:
        if train or held:
            lines += _table(train, held, _PREFERENCE_ROWS, 22)
        sft = held.get("sft") or {}
        if sft:
            lines.append(f"held-out SFT examples {sft.get('examples')}: NLL/token "
                         f"{_fmt(sft.get('nll_per_token'), 4)} (base "
                         f"{_fmt(sft.get('ref_nll_per_token'), 4)})")
        cur = metrics.get("current") or {}
        if cur:
            lines.append(f"current {cur.get('version')}: held-out pref accuracy "
                         f"{_fmt(cur.get('heldout_pref_accuracy'))}; candidate's implicit-reward "
                         f"accuracy vs it {_fmt(held.get('implicit_reward_accuracy_vs_current'))}"
                         f" ({metrics.get('gate_basis')})")
    return "\n".join(lines + format_gate(r) + next_steps(r))


def next_steps(r: dict[str, Any]) -> list[str]:
    """What to do after the gate rejected a candidate (nothing for other outcomes)."""
    if r.get("status") != "rejected":
        return []
    held = ((r.get("data") or {}).get("rows") or {}).get("heldout")
    kept = f" ({r['version']} is kept, marked rejected)" if r.get("version") else ""
    return ["next: collect more votes (the gate judged " + (f"{held} held-out rows" if held else
            "few held-out rows") + "), or lower --heldout-fraction to train on more of them, "
            "or raise --epochs / --lr; run again with --keep-rejected to inspect the candidate"
            + kept + " (`prefloop models show VERSION`)"]
