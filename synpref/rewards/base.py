"""The one reward interface: score (prompt, response) pairs, batched."""

from __future__ import annotations

from typing import Iterator, Sequence


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


def score_checked(reward: RewardScorer, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
    """`reward.score` with its contract enforced: one float per response (user scorers included)."""
    scores = reward.score(prompts, responses)
    if len(scores) != len(responses):
        raise ValueError(f"reward {reward.name!r} returned {len(scores)} scores for {len(responses)} responses")
    return [float(s) for s in scores]


def check_lengths(prompts: Sequence, responses: Sequence) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"score() needs one response per prompt: got {len(prompts)} prompts, {len(responses)} responses")


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Positions grouped into batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def prompt_text(prompt: Sequence[dict]) -> str:
    """A conversation as plain text: a single user turn is its content; longer ones are 'role: content' lines."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
