"""Preference pairs from scored samples by a pair rule (best-vs-worst and others), and how many survive each gap threshold."""

from __future__ import annotations

import bisect
import random
import statistics
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence

# Why a prompt yields no pair; counted in MLflow as `sampling/dropped_<reason>`.
TIE = "ties"
BELOW = "below_threshold"
IDENTICAL = "identical"
EMPTY = "empty"


@dataclass(frozen=True)
class Pair:
    chosen: int  # sample position of the highest score (first one on equal scores)
    rejected: int  # sample position of the lowest score (first one on equal scores)
    score_chosen: float
    score_rejected: float

    @property
    def gap(self) -> float:
        return self.score_chosen - self.score_rejected


Rule = Literal["best_worst", "best_random", "best_vs_mean_minus_2sigma", "all_above_gap"]
RULES: tuple[str, ...] = Rule.__args__


def _best(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _check(texts: Sequence[str], scores: Sequence[float]) -> None:
    if len(scores) != len(texts) or len(scores) < 2:
        raise ValueError(f"need ≥ 2 scored samples per prompt, got {len(texts)} texts and {len(scores)} scores")


def _verdict(texts: Sequence[str], scores: Sequence[float], i: int, j: int) -> Optional[str]:
    """Why (i chosen, j rejected) is no usable pair, or None when it is one."""
    if scores[i] == scores[j]:
        return TIE
    if texts[i] == texts[j]:
        return IDENTICAL
    if not texts[i].strip() or not texts[j].strip():
        return EMPTY
    return None


def rejected_index(scores: Sequence[float], rule: str, best: int, rng: Optional[random.Random] = None) -> int:
    """The rejected sample of a one-pair rule, given the chosen (best) one.

    best_worst: the lowest score (first on equal scores). best_random: uniform over the other samples
    (HuggingFaceH4's UltraFeedback binarization). best_vs_mean_minus_2sigma: the sample whose score
    is nearest to mean − 2σ of the prompt's scores (population σ; arXiv 2502.16825), first on equal
    distances; with 2 samples it is the worse one, as best_worst.
    """
    others = [i for i in range(len(scores)) if i != best]
    if rule == "best_worst":
        return min(range(len(scores)), key=lambda i: (scores[i], i))
    if rule == "best_random":
        return (rng or random.Random(0)).choice(others)
    if rule == "best_vs_mean_minus_2sigma":
        target = statistics.fmean(scores) - 2 * statistics.pstdev(scores)
        return min(others, key=lambda i: (abs(scores[i] - target), i))
    raise ValueError(f"unknown one-pair rule {rule!r}; rules: {', '.join(RULES)}")


def select_pairs(
    texts: Sequence[str],
    scores: Sequence[float],
    rule: str = "best_worst",
    threshold: float = 0.0,
    max_per_prompt: int = 3,
    rng: Optional[random.Random] = None,
) -> tuple[list[Pair], Optional[str], list[float]]:
    """(pairs kept, why none was kept or None, candidate gaps) for one prompt's scored samples.

    The chosen reply is the best-scored sample for the one-pair rules (`rejected_index`);
    all_above_gap keeps every (i, j) with score_i − score_j ≥ threshold, largest gaps first, at most
    `max_per_prompt`. Candidates are the rule's pairs that are usable: ties (gap 0) teach DPO
    nothing and are always dropped, whatever the threshold; so are identical texts (a stochastic
    scorer can give one text two scores) and empty replies (DPO data rejects empty turns). The
    candidate gaps give the pairs kept at any other threshold (`kept_vs_threshold`).
    """
    _check(texts, scores)
    if rule == "all_above_gap":
        ranked = sorted(
            ((float(scores[i]) - float(scores[j]), i, j) for i in range(len(scores)) for j in range(len(scores))),
            key=lambda g: (-g[0], g[1], g[2]),
        )
        reasons, candidates = [], []
        for gap, i, j in ranked:
            if gap < 0 or (gap == 0 and i >= j):
                continue  # each unordered pair once, from its better side
            why = _verdict(texts, scores, i, j)
            (reasons if why else candidates).append(why or (gap, i, j))
        kept = [Pair(i, j, float(scores[i]), float(scores[j])) for gap, i, j in candidates if gap >= threshold]
        kept = kept[:max_per_prompt]
        gaps = [gap for gap, _, _ in candidates]
        if kept:
            return kept, None, gaps
        return [], BELOW if candidates else (TIE if TIE in reasons or not reasons else reasons[0]), gaps
    best = _best(scores)
    worst = rejected_index(scores, rule, best, rng)
    gap = float(scores[best]) - float(scores[worst])
    why = _verdict(texts, scores, best, worst)
    if why:
        return [], why, []
    if gap < threshold:
        return [], BELOW, [gap]
    return [Pair(best, worst, float(scores[best]), float(scores[worst]))], None, [gap]


def select_pair(
    texts: Sequence[str], scores: Sequence[float], threshold: float = 0.0
) -> tuple[Optional[Pair], Optional[str], float]:
    """The paper's rule, best vs worst: (pair, None, gap) when the gap is ≥ `threshold`, else (None, reason, gap)."""
    pairs, reason, gaps = select_pairs(texts, scores, "best_worst", threshold)
    if reason in (TIE, IDENTICAL, EMPTY):
        gap = float(scores[_best(scores)]) - min(map(float, scores))
        return None, reason, gap
    return (pairs[0] if pairs else None), reason, gaps[0]


def pair_row(prompt_id: str, prompt: list[dict], texts: Sequence[str], pair: Pair) -> dict:
    """A conversational preference row as TRL's DPOTrainer and synpref's DPO data module read it."""
    return {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": texts[pair.chosen]}],
        "rejected": [{"role": "assistant", "content": texts[pair.rejected]}],
        "score_chosen": pair.score_chosen,
        "score_rejected": pair.score_rejected,
        "gap": pair.gap,
    }


def kept_vs_threshold(gaps: Iterable[float], thresholds: Sequence[float]) -> list[tuple[float, int]]:
    """Pairs kept at each threshold; `gaps` are non-tie gaps (> 0), so gap ≥ t is the rule."""
    gaps = sorted(gaps)
    return [(float(t), len(gaps) - bisect.bisect_left(gaps, t)) for t in thresholds]


def kept_vs_threshold_capped(
    prompt_gaps: Iterable[Sequence[float]], thresholds: Sequence[float], cap: int
) -> list[tuple[float, int]]:
    """Pairs kept at each threshold when each prompt keeps at most `cap` of its candidate gaps ≥ t."""
    prompt_gaps = [sorted(g) for g in prompt_gaps if g]
    return [(float(t), sum(min(cap, len(g) - bisect.bisect_left(g, t)) for g in prompt_gaps)) for t in thresholds]


def threshold_grid(gaps: Sequence[float], threshold: float, steps: int = 20) -> list[float]:
    """0 … the largest gap in `steps` even steps, plus the configured threshold."""
    top = max(gaps, default=0.0)
    grid = {round(top * i / steps, 6) for i in range(steps + 1)} | {float(threshold)}
    return sorted(grid)
