"""A second demo judge for the offline tiny pipeline, independent of RuleReward: `FunctionReward(fn="synpref.rewards.heuristics:clarity")`."""

from __future__ import annotations

import math
import re

_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def clarity(prompt: str, response: str) -> float:
    """A DEMO judge, not a measure of quality, built on other evidence than RuleReward (which rewards
    topic overlap, a ~40-word length and distinct bigrams). Higher is better:

        variety        distinct words / words over the first 60 words (no repetition loops)
      − shape          |ln((words per sentence + 1) / 16)|  (sentences of ~15 words read best)
      − echo           share of the reply's word trigrams copied verbatim from the prompt

    An empty reply scores −3. Length is not rewarded or penalised as such.
    """
    reply = [w.lower() for w in _WORD.findall(response)]
    if not reply:
        return -3.0
    head = reply[:60]
    variety = len(set(head)) / len(head)
    sentences = max(1, len(_SENTENCE_END.findall(response.strip())))
    shape = abs(math.log((len(reply) / sentences + 1) / 16))
    asked = [w.lower() for w in _WORD.findall(prompt)]
    prompt_trigrams = set(zip(asked, asked[1:], asked[2:]))
    trigrams = list(zip(reply, reply[1:], reply[2:]))
    echo = sum(t in prompt_trigrams for t in trigrams) / len(trigrams) if trigrams else 0.0
    return variety - shape - echo
