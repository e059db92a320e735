"""The one reward interface: score (prompt, response) pairs, batched."""

from __future__ import annotations

import logging
import math
from typing import Literal, Optional, Sequence

from synpref.core.errors import SynprefError

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


class ScoreFailed(Exception):
    """A scorer that scores one response at a time failed on the one at `position` (the cause)."""

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


def score_checked(
    reward: RewardScorer,
    prompts: Sequence[Sequence[dict]],
    responses: Sequence[str],
    on_bad_score: OnBadScore = "error",
    indices: Optional[Sequence[int]] = None,
) -> list[Optional[float]]:
    """`reward.score` with its contract enforced: one finite float per response (user scorers included).

    A NaN, an infinity, None or a non-number is a RewardError naming the scorer and the prompt, or
    with on_bad_score='skip' a None in its place (the caller drops and counts it) and a warning.
    A scorer that raises (other than a SynprefError, already a message) is a RewardError naming it,
    the prompt (its index in `indices`, one per prompt, where the caller gives them) and the exception.
    """
    try:
        scores = reward.score(prompts, responses)
    except SynprefError:
        raise
    except Exception as e:
        raise _raised(reward, prompts, indices, e) from (e.__cause__ if isinstance(e, ScoreFailed) else e)
    if len(scores) != len(responses):
        raise RewardError(f"reward {reward.name!r} returned {len(scores)} scores for {len(responses)} responses")
    out = []
    for j, (prompt, score) in enumerate(zip(prompts, scores)):
        value = _finite_float(score)
        if value is not None:
            out.append(value)
            continue
        problem = (
            f"reward {reward.name!r} returned {score!r:.40} ({type(score).__name__}), not a finite float, "
            f"for the prompt {prompt_text(prompt)[:80]!r}" + (f" (index {indices[j]})" if indices is not None else "")
        )
        if on_bad_score == "error":
            raise RewardError(f"{problem}; fix the scorer, or set on_bad_score: skip to drop and count such samples")
        log.warning("skipped (on_bad_score=skip): %s", problem)
        out.append(None)
    return out


def _raised(reward: RewardScorer, prompts, indices, error: Exception) -> RewardError:
    if isinstance(error, ScoreFailed) and error.__cause__ is not None:
        i, error = error.position, error.__cause__
        index = f" {indices[i]}" if indices is not None else ""
        where = f"prompt{index} ({prompt_text(prompts[i])[:80]!r})"
    elif indices is not None:
        shown = list(dict.fromkeys(int(i) for i in indices))
        where = f"a batch of prompts {', '.join(map(str, shown[:10]))}{', …' if len(shown) > 10 else ''}"
    else:
        where = f"a batch of {len(prompts)} responses"
    return RewardError(
        f"reward {reward.name!r} raised {type(error).__name__}: {error} on {where}; "
        "fix the scorer (--debug shows the traceback)"
    )


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
