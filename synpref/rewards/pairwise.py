"""Pairwise judges: which of two answers is better, asked in both orders of an OpenAI-compatible chat model."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from typing import Optional, Sequence

from synpref.core.metrics import LOSS, TIE, WIN
from synpref.http import Endpoint, HttpSettings, MalformedReply
from synpref.rewards.base import check_lengths, prompt_text

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a careful, impartial judge. You will see a user's question and the answers of two AI "
    "assistants, A and B. Decide which answer serves the user better: consider correctness, helpfulness, "
    "relevance, depth and clarity. The order in which the answers appear must not influence you, nor their "
    "length, nor the assistants' names. Explain your reasoning briefly, then give your verdict on the last "
    'line in exactly this form: "[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" if they are equally good.'
)
TEMPLATE = (
    "[Question]\n{question}\n\n[Answer of assistant A]\n{answer_a}\n[End of answer A]\n\n"
    "[Answer of assistant B]\n{answer_b}\n[End of answer B]"
)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


class PairwiseJudge:
    """A judge that compares two answers directly instead of scoring each: `judge(prompts, policy,
    baseline)` gives one dict per prompt with `outcome` ('win', 'tie' or 'loss' for the policy, or
    None when there is no valid verdict) and anything else worth keeping in eval.jsonl."""

    name: str = "pairwise"

    def judge(self, prompts: Sequence[Sequence[dict]], policy: Sequence[str], baseline: Sequence[str]) -> list[dict]:
        raise NotImplementedError

    def to(self, device) -> "PairwiseJudge":
        return self


def parse_verdict(content: str) -> Optional[str]:
    """'A', 'B' or 'C' (tie) from a judge's reply, or None unless exactly one verdict is given."""
    found = set(_VERDICT.findall(content))
    return found.pop() if len(found) == 1 else None


class PairwiseLLMJudge(PairwiseJudge):
    """An LLM judge in the style of MT-Bench / AlpacaEval, asked in BOTH orders: once with the
    policy's answer as A, once as B. The policy wins only when both orders prefer it, loses only
    when both prefer the baseline; any other pair of verdicts is a tie. A verdict that follows the
    position (A both times, or B both times) is counted in `position_bias` of the record. A reply
    without exactly one `[[A]]`/`[[B]]`/`[[C]]` is never read as a verdict: the prompt gets
    outcome None, the reply is kept in `unparseable`, and a warning names the prompt.

    HTTP goes through synpref.http, EndpointReward's client (concurrency, retries with backoff,
    per-attempt timeouts and a per-request deadline, the key from the variable named by `api_key_env`).

    Args:
        model: the judge model's served name.
        http: the server (`{base_url}/chat/completions`, api_key_env), requests in flight, timeout,
            deadline and retries (synpref.http.HttpSettings).
        system_prompt / template: the instructions and the user message; the template has
            `{question}`, `{answer_a}` and `{answer_b}`.
        temperature / max_tokens: decoding of the verdict (0: greedy).
    """

    def __init__(
        self,
        model: str,
        http: HttpSettings = HttpSettings(
            base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY", deadline=600.0
        ),
        system_prompt: str = SYSTEM_PROMPT,
        template: str = TEMPLATE,
        temperature: float = 0.0,
        max_tokens: int = 512,
    ):
        self.model, self.endpoint = model, Endpoint(http)
        self.url = self.endpoint.url("chat/completions")
        self.system_prompt, self.template, self.temperature, self.max_tokens = (
            system_prompt,
            template,
            temperature,
            max_tokens,
        )
        self.name = f"pairwise:{model}@{http.base_url}"
        #: Retried failures by kind ("timeout", "HTTP 429", ...), over this judge's life.
        self.retries: Counter = Counter()

    def __repr__(self) -> str:
        return f"PairwiseLLMJudge(model={self.model!r}, url={self.url!r}, api_key_env={self.endpoint.settings.api_key_env!r})"

    def _ask(self, job: tuple[str, str, str]) -> tuple[Optional[str], str]:
        """(verdict letter or None, the reply's content or what came instead) for (question, A, B)."""
        question, answer_a, answer_b = job
        user = self.template.format(question=question, answer_a=answer_a, answer_b=answer_b)
        payload = {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}],
        }
        try:
            reply = self.endpoint.post("chat/completions", payload, self.retries)
        except MalformedReply as e:
            return None, str(e)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None, json.dumps(reply)[:500]
        return (parse_verdict(content) if isinstance(content, str) else None), str(content)

    def judge(self, prompts: Sequence[Sequence[dict]], policy: Sequence[str], baseline: Sequence[str]) -> list[dict]:
        check_lengths(prompts, policy)
        check_lengths(prompts, baseline)
        self.endpoint.check_key()  # a missing key fails before any request
        questions = [prompt_text(p) for p in prompts]
        jobs = [(q, p, b) for q, p, b in zip(questions, policy, baseline)] + [
            (q, b, p) for q, p, b in zip(questions, policy, baseline)
        ]
        replies = self.endpoint.map(self._ask, jobs)
        n = len(questions)
        out = [both_orders(replies[i], replies[n + i]) for i in range(n)]
        bad = [i for i, r in enumerate(out) if r["outcome"] is None]
        if bad:
            log.warning(
                "%s: %d of %d prompts without a valid verdict in both orders (not counted): %s",
                self.name,
                len(bad),
                n,
                "; ".join(f"{questions[i][:60]!r}: {out[i]['unparseable'][0][:120]!r}" for i in bad),
            )
        return out


def both_orders(policy_first: tuple[Optional[str], str], policy_second: tuple[Optional[str], str]) -> dict:
    """One prompt's record from the two (verdict, reply) pairs: order 1 has the policy as A, order 2 as B."""
    v1, v2 = policy_first[0], policy_second[0]
    record = {"verdicts": [v1, v2]}
    if v1 is None or v2 is None:
        record.update(
            outcome=None,
            position_bias=None,
            unparseable=[reply for v, reply in (policy_first, policy_second) if v is None],
        )
        return record
    as_policy = [{"A": WIN, "B": LOSS, "C": TIE}[v1], {"A": LOSS, "B": WIN, "C": TIE}[v2]]
    record["outcome"] = as_policy[0] if as_policy[0] == as_policy[1] else TIE
    record["position_bias"] = v1 == v2 and v1 != "C"
    return record
