"""The one reward interface: score (prompt, response) pairs, batched."""

from __future__ import annotations

from typing import Sequence


class RewardScorer:
    """Subclasses implement `score`; configs pick one by `class_path` (predict modules' `reward`)."""

    #: What MLflow records as the reward model (a hub id, a URL + model, a function path).
    name: str = "reward"

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        """One float per (prompt conversation, assistant response); higher is better."""
        raise NotImplementedError

    def to(self, device) -> "RewardScorer":
        """Move any local model to `device` (the predict loop's); remote scorers ignore it."""
        return self
