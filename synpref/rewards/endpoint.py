"""A reward model behind an OpenAI-compatible chat-completions endpoint (NVIDIA's hosted Nemotron-70B reward)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional, Sequence

from synpref.rewards.base import RewardScorer, check_lengths

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_REWARD = re.compile(r"reward\s*:\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)")


class EndpointError(RuntimeError):
    """The endpoint failed for good: a non-retryable status, retries exhausted, or a malformed reply."""


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
        timeout: seconds per request before it counts as failed (and is retried).
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
        max_concurrency: int = 8,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ):
        self.model, self.url, self.api_key_env, self.source = model, base_url.rstrip("/") + "/chat/completions", api_key_env, source
        self.timeout, self.max_concurrency, self.max_retries = timeout, max_concurrency, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.name = f"{model}@{base_url}"

    def __repr__(self) -> str:
        return f"EndpointReward(model={self.model!r}, url={self.url!r}, api_key_env={self.api_key_env!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EndpointError(f"environment variable {self.api_key_env} (api_key_env) is not set; "
                                    f"export it with the API key for {self.url}")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        headers = self._headers()
        jobs = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
            return list(pool.map(lambda m: self._score_one(m, headers), jobs))

    def _score_one(self, messages: list[dict], headers: dict) -> float:
        body = json.dumps({"model": self.model, "messages": messages}).encode()
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return self.parse(reply.read())
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS:
                    raise EndpointError(f"{self.url} answered HTTP {e.code}: {_snippet(e.read())}") from None
                problem, retry_after = f"HTTP {e.code}", e.headers.get("Retry-After")
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == self.max_retries:
                raise EndpointError(f"{self.url}: giving up after {attempt + 1} attempts; last error {problem}")
            delay = self._delay(attempt, retry_after)
            log.warning("%s: %s; retry %d/%d in %.1fs", self.url, problem, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, float(retry_after))
            except ValueError:
                pass
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)

    def parse(self, raw: bytes) -> float:
        """The reward in a chat-completions reply; EndpointError naming what is missing otherwise."""
        try:
            reply = json.loads(raw)
            message = reply["choices"][0]
            if self.source == "logprob":
                return float(message["logprobs"]["content"][0]["logprob"])
            match = _REWARD.search(message["message"]["content"])
            if match is None:
                raise ValueError("content has no 'reward:<float>'")
            return float(match.group(1))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            field = "choices[0].logprobs.content[0].logprob" if self.source == "logprob" else "choices[0].message.content"
            raise EndpointError(f"{self.url}: malformed reply (expected {field} with the reward; "
                                f"{type(e).__name__}: {e}): {_snippet(raw)}") from None


def _snippet(raw: bytes, n: int = 200) -> str:
    text = raw.decode("utf-8", "replace")
    return repr(text[:n] + ("…" if len(text) > n else ""))
