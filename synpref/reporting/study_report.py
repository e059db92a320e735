"""The scaling study's answers: win rate against synthetic pairs and rounds, and paired head-to-head comparisons of arms."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from statistics import NormalDist, fmean, stdev
from typing import Optional, Sequence

from synpref.core.errors import ConfigError
from synpref.core.stats import PREFERENCE

# arm.* params that are not a curve's series: the x axes, and what every row has.
NOT_SERIES = ("pairs", "synthetic_pairs", "round", "rounds", "label", "reference")


def prompts_to_resolve(difference: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Prompts a paired two-sided test at level `alpha` needs to detect `difference` with `power`:
    n = ((z₁₋α/₂ + z_power) · sd / |difference|)², sd the standard deviation of the per-prompt
    differences (normal approximation), rounded up; inf when the difference is 0."""
    if difference == 0 or not math.isfinite(sd):
        return math.inf
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return float(math.ceil((z * sd / abs(difference)) ** 2))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of aᵢ − bᵢ over prompts with its paired interval, mean ± z·sd/√n (normal approximation,
    sd with n − 1), and the prompts needed to resolve a difference of that size (`prompts_to_resolve`)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs ≥ 2 prompts judged in both arms, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean, sd = fmean(d), stdev(d)
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(len(d))
    return {
        "difference": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "sd": sd,
        "n": len(d),
        "prompts_needed": prompts_to_resolve(mean, sd),
    }


def _prompt(record: dict) -> str:
    return str(record.get("prompt_id", record["index"]))


def prompt_preferences(records: Sequence[dict]) -> dict[str, float]:
    """Per prompt: the mean preference for the policy over the baseline (win 1, tie ½, loss 0) of its answers."""
    by_prompt: dict[str, list[float]] = {}
    for r in records:
        by_prompt.setdefault(_prompt(r), []).append(PREFERENCE[r["outcome"]])
    return {k: fmean(v) for k, v in by_prompt.items()}


def compare_arms(a: Sequence[dict], b: Sequence[dict]) -> dict:
    """Arm A against arm B on the same prompts (eval.jsonl records of each against the same
    baseline): their win rates, A − B with a paired interval, and how often the baseline replies
    were the same text (same seeds give the same SFT replies, which is what makes it paired)."""
    pa, pb = prompt_preferences(a), prompt_preferences(b)
    if set(pa) != set(pb):
        raise ConfigError("head_to_head", f"the two arms were judged on different prompts ({len(pa)} vs {len(pb)})")
    keys = sorted(pa)
    result = paired_difference([pa[k] for k in keys], [pb[k] for k in keys])
    baseline_b = {(_prompt(r), r.get("sample", 0)): r["baseline_response"] for r in b}
    same = [baseline_b.get((_prompt(r), r.get("sample", 0))) == r["baseline_response"] for r in a]
    return {
        "win_rate_a": fmean(pa.values()),
        "win_rate_b": fmean(pb.values()),
        **result,
        "same_baseline_replies": fmean(same),
    }


def _pct(x: Optional[float]) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def scaling_table(rows: list[dict]) -> str:
    """One line per arm: its variables, the synthetic pairs it trained on, its win rate vs the baseline."""
    lines = [
        "| arm | data | k | rule | gap | synthetic pairs | round | win rate [95% CI] | avg reward | N |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["arm"]
        ci = f"{_pct(r.get('win_rate'))} [{_pct(r.get('win_rate_ci_low'))}, {_pct(r.get('win_rate_ci_high'))}]"
        reward = r.get("avg_reward_policy")
        lines.append(
            f"| {a.get('label', r['model'])} | {a.get('data', '')} | {a.get('k', '–')} | {a.get('rule', '–')} "
            f"| {a.get('threshold', '–')} | {a.get('synthetic_pairs', '0')} | {a.get('round', '1')}/{a.get('rounds', '1')} "
            f"| {ci} | {'–' if reward is None else f'{reward:.3f}'} | {r['n']} |"
        )
    return "\n".join(lines)


def head_to_head_table(results: list[tuple[str, str, dict]]) -> str:
    lines = [
        "| A | B | win rate A | win rate B | A − B [paired 95% CI] | N | prompts to resolve | same SFT replies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, b, h in results:
        diff = f"{100 * h['difference']:+.1f} pts [{100 * h['ci_low']:+.1f}, {100 * h['ci_high']:+.1f}]"
        need = "∞" if math.isinf(h["prompts_needed"]) else f"{h['prompts_needed']:.0f}"
        lines.append(
            f"| {a} | {b} | {_pct(h['win_rate_a'])} | {_pct(h['win_rate_b'])} | {diff} | {h['n']} | {need} "
            f"| {_pct(h['same_baseline_replies'])} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    keys = sorted({k for r in rows for k in r["arm"]})
    metrics = ["win_rate", "win_rate_ci_low", "win_rate_ci_high", "avg_reward_policy", "n", "run_id"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model"] + keys + metrics)
        for r in rows:
            writer.writerow([r["model"]] + [r["arm"].get(k, "") for k in keys] + [r.get(m, "") for m in metrics])
    return path


def _series(arm: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(arm.items()) if k not in NOT_SERIES)


def plot_curves(rows: list[dict], out: Path) -> list[Path]:
    """win_rate_vs_pairs.png (log x, one line per arm setting, 95% band; UltraFeedback arms as
    horizontal bands) and, when an arm has rounds, win_rate_per_round.png."""
    from synpref.core.metrics import _pyplot

    plt = _pyplot()
    written = []
    single = [r for r in rows if r["arm"].get("rounds", "1") == "1"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in single:
        if r["arm"].get("data") != "ultrafeedback":
            groups.setdefault(_series(r["arm"]), []).append(r)
    for name, group in groups.items():
        group.sort(key=lambda r: float(r["arm"].get("synthetic_pairs", 0)))
        x = [max(1.0, float(r["arm"].get("synthetic_pairs", 0))) for r in group]
        ax.plot(x, [r["win_rate"] for r in group], marker="o", label=name)
        ax.fill_between(x, [r["win_rate_ci_low"] for r in group], [r["win_rate_ci_high"] for r in group], alpha=0.15)
    for r in single:
        if r["arm"].get("data") == "ultrafeedback":
            line = ax.axhline(
                r["win_rate"], linestyle="--", color="gray", label=f"{r['arm'].get('label')} (all its pairs)"
            )
            ax.axhspan(r["win_rate_ci_low"], r["win_rate_ci_high"], color=line.get_color(), alpha=0.1)
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.set(xscale="log", xlabel="synthetic pairs (log)", ylabel="win rate vs baseline", ylim=(0, 1))
    ax.set_title("Win rate vs synthetic pairs (95% interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "win_rate_vs_pairs.png", dpi=110)
    plt.close(fig)
    written.append(out / "win_rate_vs_pairs.png")
    rounds: dict[str, list[dict]] = {}
    for r in rows:
        if r["arm"].get("rounds", "1") != "1":
            rounds.setdefault(_series(r["arm"]) + f" ref={r['arm'].get('reference')}", []).append(r)
    if rounds:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, group in rounds.items():
            group.sort(key=lambda r: int(r["arm"]["round"]))
            x = [int(r["arm"]["round"]) for r in group]
            y = [r["win_rate"] for r in group]
            err = [
                [v - r["win_rate_ci_low"] for v, r in zip(y, group)],
                [r["win_rate_ci_high"] - v for v, r in zip(y, group)],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=name)
        ax.axhline(0.5, color="black", linewidth=0.8)
        ax.set(xlabel="round", ylabel="win rate vs baseline", ylim=(0, 1), title="Win rate per round (95% interval)")
        ax.set_xticks(sorted({int(r["arm"]["round"]) for g in rounds.values() for r in g}))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "win_rate_per_round.png", dpi=110)
        plt.close(fig)
        written.append(out / "win_rate_per_round.png")
    return written


def eval_records(client, run_id: str) -> list[dict]:
    """The eval.jsonl an evaluation run logged as an artifact."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "eval.jsonl", tmp)
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def study_report(
    client, rows: list[dict], head_to_heads: Sequence[Sequence[str]], out: Optional[Path]
) -> tuple[str, list[Path]]:
    """The scaling table, the head-to-head table (arms named by their label or model name), and,
    when `out` is given, scaling.csv and the curves written there."""
    study = [r for r in rows if r.get("arm")]
    by_name = {r["arm"].get("label", r["model"]): r for r in study} | {r["model"]: r for r in rows}
    parts, files = [scaling_table(study)] if study else [], []
    results = []
    for pair in head_to_heads:
        if len(pair) != 2:
            raise ConfigError("head_to_head", f"each entry names two arms, got {list(pair)}")
        missing = [name for name in pair if name not in by_name]
        if missing:
            raise ConfigError("head_to_head", f"no evaluated arm named {missing}; arms: {sorted(by_name)}")
        a, b = (by_name[name] for name in pair)
        results.append(
            (pair[0], pair[1], compare_arms(eval_records(client, a["run_id"]), eval_records(client, b["run_id"])))
        )
    if results:
        parts.append(head_to_head_table(results))
    if out is not None and study:
        out.mkdir(parents=True, exist_ok=True)
        files = [write_csv(study, out / "scaling.csv"), *plot_curves(study, out)]
    return "\n\n".join(parts), files
