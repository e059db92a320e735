"""OpenAIGenerator against a stub OpenAI server on 127.0.0.1: n honoured or ignored, seeds, 429, dripping, malformed choices."""

import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest

from synpref.core.models import end_of_turn_ids, load_tokenizer
from synpref.core.specs import Decoding
from synpref.generators import OpenAIGenerator, request_seed
from synpref.http import EndpointError, HttpSettings, MalformedReply
from tests.conftest import http_server

PROMPTS = [[{"role": "user", "content": "Say hi"}], [{"role": "user", "content": "Name a colour"}]]
DECODING = Decoding(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, seed=3)


class StubServer(BaseHTTPRequestHandler):
    """Replies `seed=<seed> choice=<i>`; the requested model name picks a behaviour."""

    requests: list = []
    auth: set = set()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.requests.append((self.path, body))
            self.auth.add(self.headers.get("Authorization"))
            tries = sum(1 for _, b in self.requests if b == body)
        kind = body["model"]
        if kind == "r429" and tries == 1:
            return self._send(429, {"error": "slow down"}, [("Retry-After", "1")])
        if kind == "drip" and tries == 1:
            self.send_response(200)
            self.send_header("Content-Length", "500")
            self.end_headers()
            try:
                for _ in range(500):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        if kind == "bad-choices":
            return self._send(200, {"choices": [{"message": {"role": "assistant"}}], "usage": {"completion_tokens": 1}})
        n = body.get("n", 1) if kind != "ignores-n" else 1
        n = 3 if kind == "wrong-n" else n
        text = lambda i: f"seed={body['seed']} choice={i}"  # noqa: E731
        choices = [
            {
                "index": i,
                "finish_reason": "length" if kind == "length" else "stop",
                **(
                    {"message": {"role": "assistant", "content": text(i)}}
                    if self.path.endswith("chat/completions")
                    else {"text": text(i)}
                ),
            }
            for i in reversed(range(n))
        ]
        self._send(200, {"choices": choices, "usage": {"completion_tokens": 5 * n}})


@pytest.fixture
def server(monkeypatch):
    StubServer.requests, StubServer.auth = [], set()
    with http_server(StubServer, monkeypatch, "SYNPREF_GEN_KEY", "sk-gen") as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def sample(url, tokenizer, model, k=2, **kw):
    http = HttpSettings(
        base_url=url, api_key_env="SYNPREF_GEN_KEY", backoff=0.01, max_concurrency=2, timeout=kw.pop("timeout", 600.0)
    )
    gen = OpenAIGenerator(http, **kw)
    return gen, gen.generate(model, tokenizer, PROMPTS, [4, 9], DECODING, num_return_sequences=k)


def test_n_honoured_one_request_per_prompt_choices_in_index_order(server, tokenizer):
    gen, (texts, counts) = sample(server, tokenizer, "honours-n")
    seeds = [request_seed(3, 4), request_seed(3, 9)]
    assert texts == [[f"seed={s} choice=0", f"seed={s} choice=1"] for s in seeds]
    # K choices in one reply: counts are the texts re-tokenized (usage only has the total).
    assert counts == [[len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in row] for row in texts]
    assert len(StubServer.requests) == 2 and gen.stats["requests"] == 2
    path, body = StubServer.requests[0]
    assert path == "/v1/chat/completions" and body["n"] == 2 and body["top_k"] == 50 and body["top_p"] == 0.9
    assert body["messages"] == PROMPTS[0] or body["messages"] == PROMPTS[1]


def test_n_ignored_falls_back_to_one_request_per_sample(server, tokenizer, caplog):
    gen, (texts, counts) = sample(server, tokenizer, "ignores-n", k=3)
    assert texts == [[f"seed={request_seed(3, i, j)} choice=0" for j in range(3)] for i in (4, 9)]
    assert counts == [[4, 4, 4]] * 2  # usage.completion_tokens of one-choice replies, less the end token
    # The first request of each prompt asked for n=3; after the first one-choice reply the
    # generator stops asking (two prompts in flight may both have asked).
    assert len(StubServer.requests) == 6 and "ignores n=3" in caplog.text
    again, _ = sample(server, tokenizer, "ignores-n", k=3)
    assert gen._n_honoured is False and again.stats["requests"] == 6


def test_transformers_server_gets_a_generation_config_and_text_completions_the_template(server, tokenizer):
    from synpref.core.chat import render

    sample(server, tokenizer, "plain", server="transformers", api="completions")
    path, body = StubServer.requests[0]
    assert path == "/v1/completions" and "top_k" not in body and body["max_tokens"] == 7
    assert json.loads(body["generation_config"]) == {
        "do_sample": True,
        "max_new_tokens": 7,
        "temperature": 0.7,
        "top_k": 50,
        "top_p": 0.9,
        "eos_token_id": end_of_turn_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    assert body["prompt"] in {render(tokenizer, p, add_generation_prompt=True) for p in PROMPTS}


def test_truncated_replies_are_counted(server, tokenizer, caplog):
    with caplog.at_level(logging.INFO):
        gen, _ = sample(server, tokenizer, "length")
    assert gen.stats["truncated"] == 4 and "4 of 4 replies cut at max_tokens=7" in caplog.text


def test_429_retry_after_and_dripping_reply_are_retried(server, tokenizer, caplog):
    start = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        gen, (texts, _) = sample(server, tokenizer, "r429", k=1)
    assert time.monotonic() - start >= 1.0  # Retry-After: 1 won over backoff=0.01
    assert gen.stats["retries/HTTP 429"] == 2 and len(texts) == 2
    gen, (texts, _) = sample(server, tokenizer, "drip", k=1, timeout=0.5)
    assert gen.stats["retries/timeout"] == 2 and texts[0] == [f"seed={request_seed(3, 4)} choice=0"]
    # The key went to the server as a bearer token, and nowhere else.
    assert StubServer.auth == {"Bearer sk-gen"} and "sk-gen" not in caplog.text + repr(gen)


@pytest.mark.parametrize(
    "model, error",
    [("bad-choices", r"expected choices\[\]\.message\.content.*KeyError"), ("wrong-n", "asked for n=2 choices, got 3")],
)
def test_malformed_choices_are_named_errors(server, tokenizer, model, error):
    with pytest.raises(MalformedReply, match=error):
        sample(server, tokenizer, model)


def test_missing_key_is_named(server, tokenizer, monkeypatch):
    monkeypatch.delenv("SYNPREF_GEN_KEY")
    with pytest.raises(EndpointError, match="SYNPREF_GEN_KEY"):
        sample(server, tokenizer, "plain")
    assert Counter(p for p, _ in StubServer.requests) == Counter()
