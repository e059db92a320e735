"""Generation backends for sampling and evaluation; `OpenAIGenerator` asks a serving engine over the OpenAI API."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import zlib
from collections import Counter
from typing import Literal, Optional, Sequence

from synpref.core.chat import render
from synpref.core.models import end_of_turn_ids
from synpref.core.specs import Decoding
from synpref.http import Endpoint, HttpSettings, MalformedReply

log = logging.getLogger(__name__)


def request_seed(seed: int, index: int, sample: int = 0) -> int:
    """The seed of one request: a stable 31-bit hash of (run seed, prompt index, sample number), so a
    prompt's samples do not depend on batching, concurrency, sharding or what ran before (resume)."""
    return zlib.crc32(f"{seed}:{index}:{sample}".encode()) & 0x7FFFFFFF


class Generator:
    """A generation backend: `generate` returns K texts and K generated-token counts per prompt.

    SamplingModule and WinRateModule take one by `class_path` (`generator:`); without one they
    generate in-process with `synpref.generation.generate` (the default).
    """

    #: What the sampling fingerprint records: a resumed run must use the same kind of backend.
    name: str = "generator"

    def generate(
        self,
        model: str,
        tokenizer,
        prompts: Sequence[Sequence[dict]],
        indices: Sequence[int],
        decoding: Decoding,
        *,
        num_return_sequences: int,
    ) -> tuple[list[list[str]], list[list[int]]]:
        raise NotImplementedError


class OpenAIGenerator(Generator):
    """Samples from an OpenAI-compatible server: `vllm serve`, SGLang, TGI, `transformers serve`.

    One request per prompt asks for all K samples (`n`); a server that ignores `n` (one choice back)
    is asked K times, once per sample, and later prompts go straight to K requests. Each request's
    `seed` is `request_seed(decoding.seed, prompt index, sample)`, so a rerun asks for the same samples:
    byte-identical where the server honours per-request seeds. Counts are the reply's tokens without
    the end token: `usage` (one choice per reply; less the end token when it stopped) or, when one
    reply holds K choices, each text re-tokenized with the policy's tokenizer. Replies cut by
    `max_tokens` (`finish_reason: length`) are counted (`stats["truncated"]`) and logged per batch.

    Args:
        http: the server (base_url, e.g. http://127.0.0.1:8000/v1; api_key_env), requests in flight
            (max_concurrency), timeout, deadline and retries (synpref.http.HttpSettings).
        model: the served model name; None = the module's model path (what `vllm serve <path>` and
            `transformers serve` answer to).
        api: 'chat' (`/chat/completions`, the server applies the chat template) or 'completions'
            (`/completions` with the prompt rendered here by the policy's chat template).
        server: how decoding settings the OpenAI schema lacks are sent. 'vllm' and 'sglang':
            `top_k` as a top-level field. 'transformers': a `generation_config` JSON (transformers
            serve rejects unknown fields and decodes greedily unless told to sample). 'openai':
            `top_k` is not sent.
        use_n: ask for K samples in one request (`n`).
        extra_body: more request fields, e.g. {"min_p": 0.05} or {"repetition_penalty": 1.1}.
    """

    def __init__(
        self,
        http: HttpSettings = HttpSettings(timeout=600.0, max_concurrency=32),
        model: Optional[str] = None,
        api: Literal["chat", "completions"] = "chat",
        server: Literal["vllm", "sglang", "transformers", "openai"] = "vllm",
        use_n: bool = True,
        extra_body: Optional[dict] = None,
    ):
        self.endpoint, self.model, self.api, self.server = Endpoint(http), model, api, server
        self.path = "chat/completions" if api == "chat" else "completions"
        self.url = self.endpoint.url(self.path)
        self.use_n, self.extra_body = use_n, dict(extra_body or {})
        # Not the URL (a restarted server may listen elsewhere): what decides the samples' distribution.
        self.name = f"openai:{api}:{server}:n={'K' if use_n else 1}"
        self.stats: Counter = Counter()  # requests, replies, truncated, completion_tokens, retries by kind
        self._n_honoured: Optional[bool] = None if use_n else False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIGenerator(url={self.url!r}, model={self.model!r}, server={self.server!r})"

    def generate(
        self,
        model,
        tokenizer,
        prompts,
        indices,
        decoding,
        *,
        num_return_sequences,
    ):
        name = self.model or model
        before = self.stats["truncated"]
        rows = self.endpoint.map(
            lambda job: self._samples(name, tokenizer, job[0], job[1], num_return_sequences, decoding),
            list(zip(prompts, indices)),
        )
        cut = self.stats["truncated"] - before
        if cut:
            log.info(
                "%s: %d of %d replies cut at max_tokens=%d (finish_reason: length)",
                self.url,
                cut,
                len(prompts) * num_return_sequences,
                decoding.max_new_tokens,
            )
        return [[t for t, _ in row] for row in rows], [[n for _, n in row] for row in rows]

    def _samples(self, model, tokenizer, prompt, index, k, decoding) -> list[tuple[str, int]]:
        seed = decoding.seed
        got: list[tuple[str, int]] = []
        if k > 1 and self._n_honoured is not False:
            got = self._request(model, tokenizer, prompt, decoding, request_seed(seed, index, 0), n=k)
            if len(got) == k:
                self._n_honoured = True
                return got
            if len(got) != 1:
                raise MalformedReply(f"{self.url}: asked for n={k} choices, got {len(got)} (prompt index {index})")
            with self._lock:
                if self._n_honoured is None:
                    log.warning("%s ignores n=%d (1 choice back): asking once per sample", self.url, k)
                self._n_honoured = False
        for j in range(len(got), k):
            got += self._request(model, tokenizer, prompt, decoding, request_seed(seed, index, j), n=1)
        return got

    def _request(self, model, tokenizer, prompt, decoding, seed, n) -> list[tuple[str, int]]:
        payload = {
            "model": model,
            "max_tokens": decoding.max_new_tokens,
            "seed": seed,
            **self._sampling(decoding, tokenizer),
        }
        if self.api == "chat":
            payload["messages"] = [dict(m) for m in prompt]
        else:
            payload["prompt"] = render(tokenizer, prompt, add_generation_prompt=True)
        if n > 1:
            payload["n"] = n
        payload.update(self.extra_body)
        retries: Counter = Counter()
        reply = self.endpoint.post(self.path, payload, retries)
        choices = self._parse(reply, n, tokenizer)
        with self._lock:
            self.stats.update(
                {
                    "requests": 1,
                    "replies": len(choices),
                    **{f"retries/{k}": v for k, v in retries.items()},
                    "truncated": sum(c[2] == "length" for c in choices),
                    "completion_tokens": sum(c[1] for c in choices),
                }
            )
        return [(text, count) for text, count, _ in choices]

    def _sampling(self, decoding: Decoding, tokenizer) -> dict:
        greedy = not decoding.do_sample
        fields = {
            "temperature": 0.0 if greedy else decoding.temperature,
            "top_p": 1.0 if greedy else decoding.top_p,
        }
        if self.server in ("vllm", "sglang") and not greedy:
            fields["top_k"] = decoding.top_k
        elif self.server == "transformers":
            config = {
                "do_sample": not greedy,
                "max_new_tokens": decoding.max_new_tokens,
                "eos_token_id": end_of_turn_ids(tokenizer),
                "pad_token_id": tokenizer.pad_token_id,
            }
            if not greedy:
                config.update(temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)
            return {"generation_config": json.dumps(config)}
        return fields

    def _parse(self, reply: dict, n: int, tokenizer) -> list[tuple[str, int, str]]:
        """(text, generated tokens, finish_reason) per choice, in `index` order; MalformedReply naming the field."""
        field = "message.content" if self.api == "chat" else "text"
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            if not choices:
                raise ValueError("no choices")
            texts = [c["message"]["content"] if self.api == "chat" else c["text"] for c in choices]
            if not all(isinstance(t, str) for t in texts):
                raise TypeError(f"choices[].{field} is not a string")
            if len(choices) == 1:
                used = int(reply["usage"]["completion_tokens"])
                # A server counts the end-of-turn token it stopped at (vLLM, transformers serve); the
                # counts are the reply's own tokens, as in-process generate() and re-tokenizing give.
                counts = [used - 1 if choices[0].get("finish_reason") == "stop" and used > 0 else used]
            else:
                counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            return [(t.strip(), c, ch.get("finish_reason")) for t, c, ch in zip(texts, counts, choices)]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise MalformedReply(
                f"{self.url}: malformed reply (expected choices[].{field} and usage.completion_tokens; "
                f"{type(e).__name__}: {e}): {str(reply)[:200]!r}"
            ) from None


def generate_texts(
    generator: Optional[Generator],
    model,
    tokenizer,
    name: str,
    prompts: Sequence[Sequence[dict]],
    indices: Sequence[int],
    decoding: Decoding,
    num_return_sequences: int = 1,
):
    """K texts and generated-token counts per prompt: from `generator`, or in-process (`synpref.generation.generate`,
    the batch seeded with `decoding.seed` + its first prompt index) when it is None. `name` is the model's path."""
    indices = [int(i) for i in indices]
    if generator is None:
        from synpref.generation import generate

        batch_seed = dataclasses.replace(decoding, seed=decoding.seed + indices[0])
        return generate(model, tokenizer, prompts, batch_seed, num_return_sequences=num_return_sequences)
    return generator.generate(name, tokenizer, prompts, indices, decoding, num_return_sequences=num_return_sequences)
