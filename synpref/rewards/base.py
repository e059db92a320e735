"""The one reward interface: score (prompt, response) pairs, batched."""

from __future__ import annotations

import logging
import math
from typing import Literal, Optional, Sequence

from synpref.errors import SynprefError

log = logging.getLogger(__name__)


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

    def identity(self) -> str:
        """What the scores depend on, for resume keys: the name, or more where the scorer can
        tell (a local model's content digest, a function's source)."""
        return self.name


def judge_identity(judge) -> str:
    """A judge's identity() where it has one (reward scorers), else its name (pairwise judges)."""
    return judge.identity() if hasattr(judge, "identity") else str(getattr(judge, "name", type(judge).__name__))


OnBadScore = Literal["error", "skip"]


class RewardError(SynprefError):
    """A scorer broke the reward contract (one finite float per response), named with the prompt."""


def score_checked(
    reward: RewardScorer,
    prompts: Sequence[Sequence[dict]],
    responses: Sequence[str],
    on_bad_score: OnBadScore = "error",
) -> list[Optional[float]]:
    """`reward.score` with its contract enforced: one finite float per response (user scorers included).

    A NaN, an infinity, None or a non-number is a RewardError naming the scorer and the prompt, or
    with on_bad_score='skip' a None in its place (the caller drops and counts it) and a warning.
    """
    scores = reward.score(prompts, responses)
    if len(scores) != len(responses):
        raise RewardError(f"reward {reward.name!r} returned {len(scores)} scores for {len(responses)} responses")
    out = []
    for prompt, score in zip(prompts, scores):
        value = _finite_float(score)
        if value is not None:
            out.append(value)
            continue
        problem = (
            f"reward {reward.name!r} returned {score!r:.40} ({type(score).__name__}), not a finite float, "
            f"for the prompt {prompt_text(prompt)[:80]!r}"
        )
        if on_bad_score == "error":
            raise RewardError(f"{problem}; fix the scorer, or set on_bad_score: skip to drop and count such samples")
        log.warning("skipped (on_bad_score=skip): %s", problem)
        out.append(None)
    return out


def _finite_float(score) -> Optional[float]:
    """The score as a float if it is a finite number (Python, numpy or a 0-dim tensor); else None."""
    if score is None or isinstance(score, (str, bytes, bool)):
        return None
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_lengths(prompts: Sequence, responses: Sequence) -> None:
    if len(prompts) != len(responses):
        raise ValueError(
            f"score() needs one response per prompt: got {len(prompts)} prompts, {len(responses)} responses"
        )


def prompt_text(prompt: Sequence[dict]) -> str:
    """A conversation as plain text: a single user turn is its content; longer ones are 'role: content' lines."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
