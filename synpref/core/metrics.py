"""Win rate of a policy against a baseline, with a Wilson interval, a sign test and length control."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional, Sequence

import torch
from torchmetrics import Metric

WIN, TIE, LOSS = "win", "tie", "loss"


def outcome(policy_reward: float, baseline_reward: float, tie_tolerance: float = 0.0) -> str:
    """'win' when reward(policy) > reward(baseline) by more than `tie_tolerance` (the paper: 0),
    'loss' when lower by more, else 'tie'."""
    diff = policy_reward - baseline_reward
    return WIN if diff > tie_tolerance else LOSS if diff < -tie_tolerance else TIE


def length_matched(policy_length: int, baseline_length: int, ratio: float = 0.1) -> bool:
    """Two responses are length-matched when their token counts differ by at most `ratio` of the
    longer one (0.1: 100 vs 91 tokens is matched, 100 vs 89 is not; two empty responses are)."""
    return abs(policy_length - baseline_length) <= ratio * max(policy_length, baseline_length)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (no continuity correction). Unlike the
    normal approximation it stays inside [0, 1] and is sensible at 0 %, 100 % and small n."""
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 and n the bound is exactly 0 or 1; the formula leaves rounding dust there.
    return (0.0 if successes == 0 else center - half), (1.0 if successes == n else center + half)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test of P(win) = 1/2, ties excluded: 2 · P(X ≤ min(wins, losses)) for
    X ~ Binomial(wins + losses, 1/2), capped at 1. No scipy: exact integers up to n = 2000, log
    space (lgamma) above."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    if n <= 2000:
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in logs))


class WinRate(Metric):
    """Pairwise comparison of policy and baseline rewards over prompts.

    All states are sums (`dist_reduce_fx="sum"`), so under DDP each process updates with its own
    prompts and `compute()` sees the totals. `compute()` returns a dict of floats:
    win/tie/loss rates (share of all N prompts), the Wilson interval of the win rate, the exact
    sign test p-value against 50 % (ties excluded), average reward and its standard error per
    model, mean response length per model (tokens), and the win rate over length-matched pairs.
    """

    full_state_update = False
    higher_is_better = True
    _SUMS = (
        "wins",
        "ties",
        "losses",
        "matched",
        "matched_wins",
        "matched_ties",
        "reward_policy",
        "reward_baseline",
        "reward_sq_policy",
        "reward_sq_baseline",
        "length_policy",
        "length_baseline",
        "with_lengths",
    )

    def __init__(self, tie_tolerance: float = 0.0, length_match_ratio: float = 0.1, confidence: float = 0.95, **kwargs):
        super().__init__(**kwargs)
        self.tie_tolerance = tie_tolerance
        self.length_match_ratio = length_match_ratio
        self.confidence = confidence
        for name in self._SUMS:
            # float64: reward sums over many prompts keep their precision; counts stay exact.
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        policy_rewards: Sequence[float],
        baseline_rewards: Sequence[float],
        policy_lengths: Optional[Sequence[int]] = None,
        baseline_lengths: Optional[Sequence[int]] = None,
    ) -> None:
        p = torch.as_tensor(policy_rewards, dtype=torch.float64, device=self.device).flatten()
        b = torch.as_tensor(baseline_rewards, dtype=torch.float64, device=self.device).flatten()
        if p.shape != b.shape:
            raise ValueError(f"{p.numel()} policy rewards but {b.numel()} baseline rewards")
        if not (torch.isfinite(p).all() and torch.isfinite(b).all()):
            raise ValueError("rewards must be finite numbers (got NaN or inf)")
        diff = p - b
        win, loss = diff > self.tie_tolerance, diff < -self.tie_tolerance
        tie = ~(win | loss)
        self.wins += win.sum()
        self.ties += tie.sum()
        self.losses += loss.sum()
        self.reward_policy += p.sum()
        self.reward_baseline += b.sum()
        self.reward_sq_policy += (p * p).sum()
        self.reward_sq_baseline += (b * b).sum()
        if policy_lengths is not None and baseline_lengths is not None:
            lp = torch.as_tensor(policy_lengths, dtype=torch.float64, device=self.device).flatten()
            lb = torch.as_tensor(baseline_lengths, dtype=torch.float64, device=self.device).flatten()
            if lp.shape != p.shape or lb.shape != p.shape:
                raise ValueError("one length per response is needed for policy and baseline")
            matched = (lp - lb).abs() <= self.length_match_ratio * torch.maximum(lp, lb)
            self.length_policy += lp.sum()
            self.length_baseline += lb.sum()
            self.with_lengths += lp.numel()
            self.matched += matched.sum()
            self.matched_wins += (matched & win).sum()
            self.matched_ties += (matched & tie).sum()

    def compute(self) -> dict[str, float]:
        wins, ties, losses = int(self.wins), int(self.ties), int(self.losses)
        n = wins + ties + losses
        rate = lambda k, m: k / m if m else math.nan
        low, high = wilson_interval(wins, n, self.confidence)
        matched, with_lengths = int(self.matched), int(self.with_lengths)
        out = {
            "win_rate": rate(wins, n),
            "tie_rate": rate(ties, n),
            "loss_rate": rate(losses, n),
            "win_rate_ci_low": low,
            "win_rate_ci_high": high,
            "sign_test_p": sign_test_p(wins, losses),
            "n": float(n),
            "wins": float(wins),
            "ties": float(ties),
            "losses": float(losses),
            "length_matched_n": float(matched),
            "length_matched_win_rate": rate(int(self.matched_wins), matched),
            "length_matched_tie_rate": rate(int(self.matched_ties), matched),
        }
        for side in ("policy", "baseline"):
            total, sq = float(getattr(self, f"reward_{side}")), float(getattr(self, f"reward_sq_{side}"))
            mean = rate(total, n)
            var = (sq - n * mean * mean) / (n - 1) if n > 1 else math.nan
            out[f"avg_reward_{side}"] = mean
            out[f"reward_stderr_{side}"] = math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan
            out[f"avg_length_{side}"] = rate(float(getattr(self, f"length_{side}")), with_lengths)
        return out


FIGSIZE, DPI = (6.4, 4.0), 100  # every figure is 640 x 400 pixels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(
    rows: Sequence[tuple[str, dict]], path, baseline: str = "SFT", self_judged: Optional[Sequence[bool]] = None
) -> None:
    """Win / tie / loss share of each policy against the baseline, with the win rate's interval
    as an error bar (the paper's Figure 1); `rows` = (policy label, WinRate.compute() dict).
    A row marked in `self_judged` (judged by the scorer that labelled its pairs) is hatched and labelled so."""
    plt = _pyplot()
    marked = list(self_judged or [False] * len(rows))
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    width = 0.8 / 3
    for j, (key, colour) in enumerate([("win_rate", "#2a9d8f"), ("tie_rate", "#adb5bd"), ("loss_rate", "#e76f51")]):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        values = [100 * m[key] for _, m in rows]
        bars = ax.bar(xs, values, width, label=key.split("_")[0], color=colour)
        for bar, hatched in zip(bars, marked):
            if hatched:
                bar.set_hatch("//")
        tops = values
        if key == "win_rate":
            err = [
                [100 * (m[key] - m["win_rate_ci_low"]) for _, m in rows],
                [100 * (m["win_rate_ci_high"] - m[key]) for _, m in rows],
            ]
            ax.errorbar(xs, values, yerr=err, fmt="none", ecolor="black", capsize=4)
            tops = [v + e for v, e in zip(values, err[1])]
        # Labels sit above the error bar's cap, not on it.
        for x, v, top in zip(xs, values, tops):
            ax.annotate(
                f"{v:.0f}%", (x, top), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8
            )
    ax.axhline(50, color="black", linestyle=":", linewidth=1)
    names = [
        f"{label}{' (self-judged)' if hatched else ''}\n(N={int(m['n'])})" for (label, m), hatched in zip(rows, marked)
    ]
    ax.set_xticks(range(len(rows)), names, fontsize=8 if len(rows) > 3 else None)
    ax.set_ylim(0, 112)  # room for a label above a 100 % interval
    ax.set_ylabel(f"% of prompts vs {baseline}")
    ax.set_title(f"Win rate against {baseline} (95% Wilson interval)")
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE x DPI
    plt.close(fig)


def plot_average_rewards(rows: Sequence[tuple[str, dict]], path, baseline: str = "SFT") -> None:
    """Average reward of the baseline and of each policy, ± one standard error (the paper's Figure 2)."""
    plt = _pyplot()
    first = rows[0][1]
    labels = [baseline] + [label for label, _ in rows]
    means = [first["avg_reward_baseline"]] + [m["avg_reward_policy"] for _, m in rows]
    errs = [first["reward_stderr_baseline"]] + [m["reward_stderr_policy"] for _, m in rows]
    errs = [0.0 if math.isnan(e) else e for e in errs]
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color=["#adb5bd"] + ["#264653"] * len(rows))
    # Labels beyond the error bar's end (below it for a negative mean), not on it.
    for x, mean, err in zip(range(len(labels)), means, errs):
        up = mean >= 0
        ax.annotate(
            f"{mean:.3g}",
            (x, mean + err if up else mean - err),
            xytext=(0, 3 if up else -3),
            textcoords="offset points",
            ha="center",
            va="bottom" if up else "top",
            fontsize=8,
        )
    ax.margins(y=0.15)  # room for the labels
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("average reward (± s.e.)")
    ax.set_title("Average reward per model")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
