"""A reward model behind an OpenAI-compatible chat-completions endpoint (NVIDIA's hosted Nemotron-70B reward)."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Literal, Sequence, Union

from synpref.http import Endpoint, EndpointError, HttpSettings, MalformedReply, snippet
from synpref.rewards.base import RewardScorer, check_lengths

__all__ = ["EndpointError", "EndpointReward"]

_REWARD = re.compile(r"reward\s*:\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)")


class EndpointReward(RewardScorer):
    """POST `{base_url}/chat/completions` with the conversation (prompt + assistant reply); the reward
    is the reply's message content `reward:<float>` (NVIDIA's nemotron-70b-reward) or, with
    `source: logprob`, the first token's logprob.

    Args:
        model: the served model name.
        http: the server (base_url, api_key_env: NAME of the variable holding the key), requests in
            flight, per-attempt timeout, per-request deadline and retries (synpref.http.HttpSettings).
        source: where the reward is read: 'content' ("reward:<float>") or 'logprob'.
    """

    def __init__(
        self,
        model: str = "nvidia/llama-3.1-nemotron-70b-reward",
        http: HttpSettings = HttpSettings(
            base_url="https://integrate.api.nvidia.com/v1", api_key_env="NVIDIA_API_KEY", deadline=600.0
        ),
        source: Literal["content", "logprob"] = "content",
    ):
        self.model, self.endpoint, self.source = model, Endpoint(http), source
        self.url = self.endpoint.url("chat/completions")
        self.name = f"{model}@{http.base_url}"
        #: Retried failures by kind ("timeout", "HTTP 429", ...), over this scorer's life.
        self.retries: Counter = Counter()

    def __repr__(self) -> str:
        return f"EndpointReward(model={self.model!r}, url={self.url!r}, api_key_env={self.endpoint.settings.api_key_env!r})"

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        self.endpoint.check_key()  # a missing key fails before any request
        jobs = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return self.endpoint.map(self._score_one, jobs)

    def _score_one(self, messages: list[dict]) -> float:
        try:
            reply = self.endpoint.post("chat/completions", {"model": self.model, "messages": messages}, self.retries)
        except MalformedReply as e:
            raise EndpointError(
                f"{self.url}: malformed reply (expected {self._field()} with the reward; {e})"
            ) from None
        return self.parse(reply)

    def _field(self) -> str:
        return "choices[0].logprobs.content[0].logprob" if self.source == "logprob" else "choices[0].message.content"

    def parse(self, reply: Union[dict, bytes]) -> float:
        """The reward in a chat-completions reply; EndpointError naming what is missing otherwise."""
        try:
            if isinstance(reply, bytes):
                reply = json.loads(reply)
            message = reply["choices"][0]
            if self.source == "logprob":
                return float(message["logprobs"]["content"][0]["logprob"])
            match = _REWARD.search(message["message"]["content"])
            if match is None:
                raise ValueError("content has no 'reward:<float>'")
            return float(match.group(1))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            shown = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
            raise EndpointError(
                f"{self.url}: malformed reply (expected {self._field()} with the reward; "
                f"{type(e).__name__}: {e}): {snippet(shown)}"
            ) from None
