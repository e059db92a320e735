"""Best-vs-worst preference pairs from scored samples, and how many survive each gap threshold."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

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


def select_pair(
    texts: Sequence[str], scores: Sequence[float], threshold: float = 0.0
) -> tuple[Optional[Pair], Optional[str], float]:
    """(pair, None, gap) when the best-vs-worst gap is ≥ `threshold`, else (None, reason, gap).

    Ties (all scores equal, gap 0) are always dropped, whatever the threshold: a pair with no
    preference teaches DPO nothing. Identical texts are dropped too (a stochastic scorer can give
    the same text two scores), and so are pairs with an empty reply (DPO data rejects empty turns).
    """
    if len(scores) != len(texts) or len(scores) < 2:
        raise ValueError(f"need ≥ 2 scored samples per prompt, got {len(texts)} texts and {len(scores)} scores")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    gap = float(scores[best]) - float(scores[worst])
    if gap == 0:
        return None, TIE, 0.0
    if texts[best] == texts[worst]:
        return None, IDENTICAL, gap
    if not texts[best].strip() or not texts[worst].strip():
        return None, EMPTY, gap
    if gap < threshold:
        return None, BELOW, gap
    return Pair(best, worst, float(scores[best]), float(scores[worst])), None, gap


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


def threshold_grid(gaps: Sequence[float], threshold: float, steps: int = 20) -> list[float]:
    """0 … the largest gap in `steps` even steps, plus the configured threshold."""
    top = max(gaps, default=0.0)
    grid = {round(top * i / steps, 6) for i in range(steps + 1)} | {float(threshold)}
    return sorted(grid)
