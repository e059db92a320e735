"""The parts of `synpref compare` beyond Table 1: one column group per judge, self-judged warnings, power."""

from __future__ import annotations

import logging
import math
import re
from itertools import combinations
from pathlib import Path
from typing import Optional

from synpref.core.stats import prompts_for_power

log = logging.getLogger(__name__)

_JUDGE_METRIC = re.compile(r"^eval/([^/]+)/([^/]+)$")
_PAIR = re.compile(r"^eval/(agreement|kappa)/([^/]+)/([^/]+)$")
SELF_JUDGED = "**self-judged**"


def judge_fields(metrics: dict) -> dict:
    """From an eval run's metrics: `judges` {label: {metric: value}} and `agreement` {"a~b": {agreement, kappa}}."""
    judges: dict[str, dict] = {}
    pairs: dict[str, dict] = {}
    for key, value in metrics.items():
        pair = _PAIR.match(key)
        if pair:
            pairs.setdefault(f"{pair.group(2)}~{pair.group(3)}", {})[pair.group(1)] = value
            continue
        m = _JUDGE_METRIC.match(key)
        if m:
            judges.setdefault(m.group(1), {})[m.group(2)] = value
    return {"judges": {k: v for k, v in judges.items() if "win_rate" in v}, "agreement": pairs}


def judge_label(name: str) -> str:
    """A judge's short label, as synpref.judges.judge_labels makes it: `synpref.rewards.RuleReward` → RuleReward."""
    from synpref.judges import short_label  # here: `synpref compare` imports torch only if it needs to

    return short_label(name or "judge")


def judge_results(row: dict) -> dict[str, dict]:
    """label → metrics of every judge of an eval row; the primary alone when it was the only judge."""
    return row.get("judges") or {judge_label(row.get("reward_model", "")): row}


def judge_columns(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """CSV columns `<label>/<metric>` and `agreement/<a>~<b>`, `kappa/<a>~<b>`, and the rows with them filled in."""
    flat = []
    for r in rows:
        extra = {f"{label}/{k}": v for label, m in r.get("judges", {}).items() for k, v in m.items()}
        extra.update({f"{k}/{pair}": v for pair, m in r.get("agreement", {}).items() for k, v in m.items()})
        flat.append({**r, **extra})
    columns = list(dict.fromkeys(k for r, f in zip(rows, flat) for k in f if k not in r))
    return columns, flat


def _pct(x: Optional[float]) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def model_cell(row: dict) -> str:
    return f"{row['model']} {SELF_JUDGED}" if row.get("self_judged") else row["model"]


def judges_table(rows: list[dict]) -> str:
    """Per model, one column group per judge (win rate [95% CI], length-controlled win rate), and
    each pair of judges' agreement (share of prompts with the same outcome) and Cohen's κ; '' when
    no run had more than one judge."""
    labels = list(dict.fromkeys(label for r in rows for label in r.get("judges", {})))
    if not labels:
        return ""
    pairs = [f"{a}~{b}" for a, b in combinations(labels, 2)]
    head = ["model"] + [h for label in labels for h in (f"{label} win rate [95% CI]", f"{label} LC win rate")]
    head += [f"agreement {p} (κ)" for p in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]]
        for label in labels:
            m = r.get("judges", {}).get(label, {})
            mark = f" {SELF_JUDGED}" if m.get("self_judged") else ""
            cells.append(
                f"{_pct(m.get('win_rate'))} [{_pct(m.get('win_rate_ci_low'))}, {_pct(m.get('win_rate_ci_high'))}]{mark}"
                if m
                else "–"
            )
            cells.append(_pct(m.get("length_controlled_win_rate")))
        for p in pairs:
            a = r.get("agreement", {}).get(p, {})
            kappa = a.get("kappa")
            cells.append(f"{_pct(a.get('agreement'))} ({'–' if kappa is None else f'{kappa:.2f}'})")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"{r['model']}: {label} position bias {_pct(m['position_bias_rate'])} of prompts, "
        f"{int(m.get('unparseable', 0))} without a valid verdict"
        for r in rows
        for label, m in r.get("judges", {}).items()
        if "position_bias_rate" in m
    ]
    return "\n".join(lines + [""] + notes if notes else lines)


def self_judged_warnings(rows: list[dict]) -> list[str]:
    """One line per (model, judge) whose judge is the scorer that labelled the model's training pairs."""
    out = []
    for r in rows:
        judged = [label for label, m in r.get("judges", {}).items() if m.get("self_judged")]
        if not judged and r.get("self_judged"):
            judged = [r.get("reward_model") or "its judge"]
        for label in judged:
            out.append(
                f"WARNING: {r['model']} is {SELF_JUDGED} by {label}, the scorer that labelled its training "
                f"pairs (it was trained to please this judge): trust an independent judge's win rate."
            )
    return out  # printed once, with the table (a log line too would say it twice)


def power_lines(rows: list[dict], alpha: float = 0.05, power: float = 0.8) -> list[str]:
    """For each arm: prompts needed to tell its win rate from 50 % and from each other arm's
    (synpref.core.stats.prompts_for_power), at `power` with a two-sided test at level `alpha`."""
    arms = [(Path(r["model"]).name or r["model"], r["win_rate"]) for r in rows if r.get("win_rate") is not None]
    if not arms:
        return []
    fmt = lambda n: "∞" if math.isinf(n) else f"{int(n):,}"
    lines = [f"Power ({100 * power:.0f}%, two-sided α = {alpha:g}; n = [z₁₋α/₂·σ₀ + z_power·σ₁]² / Δ²): prompts needed"]
    for name, p in arms:
        others = "; ".join(
            f"from {o} ({_pct(q)}): {fmt(prompts_for_power(p, q, alpha, power))} per arm" for o, q in arms if o != name
        )
        lines.append(
            f"- {name} ({_pct(p)}) from 50%: {fmt(prompts_for_power(p, None, alpha, power))}"
            + (f"; {others}" if others else "")
        )
    return lines
