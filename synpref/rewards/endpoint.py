"""A reward model behind an OpenAI-compatible chat-completions endpoint (NVIDIA's hosted Nemotron-70B reward)."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Literal, Optional, Sequence, Union

from synpref.http import EndpointError, MalformedReply, auth_headers, map_concurrent, post_json, snippet
from synpref.rewards.base import RewardScorer, check_lengths

__all__ = ["EndpointError", "EndpointReward"]

_REWARD = re.compile(r"reward\s*:\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)")


class EndpointReward(RewardScorer):
    """POST `{base_url}/chat/completions` with the conversation (prompt + assistant reply); the reward
    is the reply's message content `reward:<float>` (NVIDIA's nemotron-70b-reward) or, with
    `source: logprob`, the first token's logprob.

    Args:
        model: the served model name.
        base_url: the OpenAI-compatible API root.
        api_key_env: NAME of the environment variable holding the API key (the key itself is
            never an argument, so it never reaches configs, MLflow params or logs).
        source: where the reward is read: 'content' ("reward:<float>") or 'logprob'.
        timeout: seconds one attempt may take end to end (connect, send, every byte of the reply);
            a slower or dripping reply counts as a timeout and is retried.
        deadline: seconds one request may take across all attempts and backoff (None: no cap
            beyond `max_retries`).
        max_concurrency: requests in flight at once (a thread pool).
        max_retries: retries after a 429, a 5xx, a timeout or a connection error.
        backoff: first retry delay in seconds; doubles each retry (with jitter), capped at
            `max_backoff`; a `Retry-After` header wins when present.
        max_backoff: longest delay between retries.
    """

    def __init__(
        self,
        model: str = "nvidia/llama-3.1-nemotron-70b-reward",
        base_url: str = "https://integrate.api.nvidia.com/v1",
        api_key_env: Optional[str] = "NVIDIA_API_KEY",
        source: Literal["content", "logprob"] = "content",
        timeout: float = 60.0,
        deadline: Optional[float] = 600.0,
        max_concurrency: int = 8,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ):
        self.model, self.url, self.api_key_env, self.source = (
            model,
            base_url.rstrip("/") + "/chat/completions",
            api_key_env,
            source,
        )
        self.max_concurrency = max_concurrency
        self.http = {
            "api_key_env": api_key_env,
            "timeout": timeout,
            "deadline": deadline,
            "max_retries": max_retries,
            "backoff": backoff,
            "max_backoff": max_backoff,
        }
        self.name = f"{model}@{base_url}"
        #: Retried failures by kind ("timeout", "HTTP 429", ...), over this scorer's life.
        self.retries: Counter = Counter()

    def __repr__(self) -> str:
        return f"EndpointReward(model={self.model!r}, url={self.url!r}, api_key_env={self.api_key_env!r})"

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        auth_headers(self.api_key_env, self.url)  # a missing key fails before any request
        jobs = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return map_concurrent(self._score_one, jobs, self.max_concurrency)

    def _score_one(self, messages: list[dict]) -> float:
        try:
            reply = post_json(self.url, {"model": self.model, "messages": messages}, retries=self.retries, **self.http)
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
