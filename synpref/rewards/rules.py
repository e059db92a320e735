"""Python-function rewards: any `module:function`, and the built-in rule-based demo reward."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import re
from typing import Callable, Sequence

from synpref.core.errors import ConfigError, SynprefError
from synpref.rewards.base import RewardScorer, ScoreFailed, check_lengths, prompt_text

_WORD = re.compile(r"[a-z0-9']+")
# Frequent function words carry no topic; overlap counts the rest.
STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its me my no not of on or "
    "our so than that the their them then there these they this to was we were what when where which who why will "
    "with would you your".split()
)


def load_function(spec: str) -> Callable:
    """'package.module:function' → the function (ConfigError naming the spec when it is not one)."""
    key = "reward.init_args.fn"
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(key, f"{spec!r}: expected 'module:function', e.g. 'mypkg.rewards:length_reward'")
    try:
        fn = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(key, f"{spec!r}: cannot import {module!r} ({e})") from e
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(key, f"{spec!r}: module {module!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(key, f"{spec!r} is not callable")
    return fn


class FunctionReward(RewardScorer):
    """Any `(prompt: str, response: str) -> float`, named `fn="module:function"`.

    The prompt is passed as text: a single user turn is its content; a longer conversation is
    'role: content' lines.
    """

    def __init__(self, fn: str):
        self.fn_spec = fn
        self.fn = load_function(fn)
        self.name = fn

    def identity(self) -> str:
        # An edited function must not resume records scored by the old one.
        try:
            source = inspect.getsource(self.fn)
        except (OSError, TypeError):  # built-in or generated: the name is all there is
            return self.name
        return f"{self.name}@{hashlib.sha256(source.encode()).hexdigest()[:16]}"

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        # Returned as the function gives them: score_checked names this reward if one is not a float.
        scores = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                scores.append(self.fn(prompt_text(prompt), response))
            except SynprefError:
                raise
            except Exception as e:  # score_checked names the prompt it failed on
                raise ScoreFailed(i) from e
        return scores


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class RuleReward(RewardScorer):
    """A DEMO reward for the offline tiny pipeline, not a measure of quality.

    It exists so that a ~230k-parameter model can be seen to learn from synthetic pairs within
    minutes on a CPU, so every term is smooth and learnable from the prompt alone:

        on_topic × overlap     share of the prompt's content words (non-stopwords) the reply uses
      + formed × ends_well     1 if the reply ends with . ! or ?, else 0
      + formed × starts_well   1 if it starts with a capital letter or a digit
      + diverse × distinct     share of distinct word bigrams (1 = no repetition)
      − length × |ln((n+1)/(target_words+1))|   n = words in the reply

    Two sampled replies almost never tie: overlap, distinct and length all vary continuously.
    """

    def __init__(
        self,
        on_topic: float = 2.0,
        formed: float = 0.5,
        diverse: float = 1.0,
        length: float = 0.5,
        target_words: int = 40,
    ):
        self.on_topic, self.formed, self.diverse, self.length, self.target_words = (
            on_topic,
            formed,
            diverse,
            length,
            target_words,
        )
        self.name = "synpref.rewards.RuleReward"

    def score_one(self, prompt: str, response: str) -> float:
        reply = words(response)
        topic = {w for w in words(prompt) if w not in STOPWORDS and len(w) > 2}
        overlap = len(topic & set(reply)) / len(topic) if topic else 0.0
        text = response.strip()
        ends_well = float(text.endswith((".", "!", "?")))
        starts_well = float(bool(text) and (text[0].isupper() or text[0].isdigit()))
        bigrams = list(zip(reply, reply[1:]))
        distinct = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
        length_penalty = abs(math.log((len(reply) + 1) / (self.target_words + 1)))
        return (
            self.on_topic * overlap
            + self.formed * (ends_well + starts_well)
            + self.diverse * distinct
            - self.length * length_penalty
        )

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        return [self.score_one(prompt_text(p), r) for p, r in zip(prompts, responses)]
