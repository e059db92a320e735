"""EndpointReward against a real HTTP server on 127.0.0.1: rewards, 429/500 retries, timeouts, malformed replies."""

import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest

from synpref.http import HttpSettings
from synpref.rewards import EndpointError, EndpointReward
from tests.conftest import http_server

KEY = "sk-test-secret-123"


class FakeNemotron(BaseHTTPRequestHandler):
    """Answers like NVIDIA's nemotron-70b-reward; the assistant reply's text picks a behaviour."""

    attempts: Counter = Counter()
    lock = threading.Lock()
    in_flight = 0
    max_in_flight = 0
    auth: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _done(self):
        """Leave the in-flight count BEFORE answering: a client that got its answer may send the next
        request before this thread would reach a `finally` (seen on a loaded machine)."""
        cls = type(self)
        with cls.lock:
            if getattr(self, "_counted", False):
                cls.in_flight -= 1
                self._counted = False

    def _send(self, status, body, headers=()):
        self._done()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drip(self):
        """Headers at once, then the body one byte a second: every read succeeds, the reply never ends."""
        self._done()
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:  # the client hung up: what the deadline is for
            pass

    def _drip_headers(self):
        """The status line, then the headers one byte a second: the reply never gets past its headers."""
        self._done()
        try:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"x" * 1000:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(1.0 if byte == ord("x") else 0)
        except OSError:
            pass

    def do_POST(self):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            self._counted = True
        try:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            cls.auth.append(self.headers.get("Authorization"))
            assert self.path == "/v1/chat/completions" and request["model"] == "nvidia/llama-3.1-nemotron-70b-reward"
            reply = request["messages"][-1]["content"]
            kind, _, value = reply.partition(":")
            with cls.lock:
                cls.attempts[reply] += 1
                first = cls.attempts[reply] == 1
            if kind == "r429" and first:
                return self._send(429, {"error": "rate limited"}, [("Retry-After", "0")])
            if kind == "r500" and first:
                return self._send(500, {"error": "oops"})
            if kind == "always503":
                return self._send(503, {"error": "down"})
            if kind == "bad400":
                return self._send(400, {"error": "bad request"})
            if kind == "slow" and first:
                time.sleep(1.0)
            if kind == "drip" and (first or value == "always"):
                return self._drip()
            if kind == "dripheaders" and first:
                return self._drip_headers()
            if kind == "garbage":
                return self._send(200, b"<html>not json</html>")
            if kind == "nocontent":
                return self._send(200, {"choices": [{"message": {"role": "assistant", "content": "hello"}}]})
            time.sleep(0.02)  # lets concurrent requests overlap
            reward = float(value) if value else float(len(request["messages"]))
            self._send(
                200,
                {
                    "choices": [
                        {
                            "message": {"role": "assistant", "content": f"reward:{reward}"},
                            "logprobs": {"content": [{"token": "reward", "logprob": reward - 100}]},
                        }
                    ]
                },
            )
        finally:
            self._done()


@pytest.fixture
def server(monkeypatch):
    FakeNemotron.attempts = Counter()
    FakeNemotron.auth = []
    FakeNemotron.max_in_flight = 0
    with http_server(FakeNemotron, monkeypatch, "SYNPREF_TEST_KEY", KEY) as url:
        yield url


def reward(url, **kw):
    source = kw.pop("source", "content")
    kw = {"base_url": url, "api_key_env": "SYNPREF_TEST_KEY", "timeout": 0.5, "max_retries": 2, "backoff": 0.01, **kw}
    return EndpointReward(http=HttpSettings(**kw), source=source)


PROMPT = [{"role": "user", "content": "Say hi"}]


def test_rewards_in_order_bounded_concurrency_and_key_sent(server, caplog):
    replies = [f"ok:{i / 4}" for i in range(12)]
    with caplog.at_level(logging.DEBUG):
        scores = reward(server, max_concurrency=3).score([PROMPT] * 12, replies)
    assert scores == [i / 4 for i in range(12)]
    assert 1 < FakeNemotron.max_in_flight <= 3
    assert set(FakeNemotron.auth) == {f"Bearer {KEY}"}
    assert KEY not in caplog.text and KEY not in repr(reward(server))


def test_logprob_source(server):
    assert reward(server, source="logprob").score([PROMPT], ["ok:2.5"]) == [2.5 - 100]


def test_retries_429_500_and_timeouts(server, caplog):
    with caplog.at_level(logging.WARNING):
        scores = reward(server).score([PROMPT] * 3, ["r429:1.5", "r500:-2", "slow:3"])
    assert scores == [1.5, -2.0, 3.0]
    assert FakeNemotron.attempts == Counter({"r429:1.5": 2, "r500:-2": 2, "slow:3": 2})
    assert "HTTP 429" in caplog.text and "HTTP 500" in caplog.text and "timed out" in caplog.text
    assert KEY not in caplog.text


def test_gives_up_after_retries_and_never_retries_400(server):
    with pytest.raises(EndpointError, match=r"giving up after 3 attempts; last error HTTP 503"):
        reward(server).score([PROMPT], ["always503"])
    assert FakeNemotron.attempts["always503"] == 3
    with pytest.raises(EndpointError, match="HTTP 400"):
        reward(server).score([PROMPT], ["bad400"])
    assert FakeNemotron.attempts["bad400"] == 1


@pytest.mark.parametrize("reply, expected", [("garbage", "not json"), ("nocontent", "hello")])
def test_malformed_reply_is_a_clear_error(server, reply, expected):
    with pytest.raises(EndpointError, match=rf"malformed reply \(expected choices\[0\]\.message\.content.*{expected}"):
        reward(server).score([PROMPT], [reply])
    assert FakeNemotron.attempts[reply] == 1


def test_missing_key_names_the_variable(server, monkeypatch):
    monkeypatch.delenv("SYNPREF_TEST_KEY")
    with pytest.raises(EndpointError, match="SYNPREF_TEST_KEY"):
        reward(server).score([PROMPT], ["ok:1"])
    assert not FakeNemotron.attempts


def test_dripping_reply_fails_at_the_timeout_and_is_retried_like_one(server, caplog):
    """A body dripped at 1 byte/s never trips a per-read socket timeout of 1.5 s; the attempt's
    wall-clock bound does, and the retry (answered normally) gives the reward."""
    scorer = reward(server, timeout=1.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert scorer.score([PROMPT], ["drip:4.5"]) == [4.5]
    assert 1.5 <= time.monotonic() - start < 3.5
    assert FakeNemotron.attempts["drip:4.5"] == 2
    assert scorer.retries == Counter({"timeout": 1}) and "timed out after 1.5 s" in caplog.text


def test_deadline_bounds_the_request_across_retries(server):
    scorer = reward(server, timeout=1.5, deadline=2.0, max_retries=10)
    start = time.monotonic()
    with pytest.raises(EndpointError, match=r"deadline of 2 s passed; last error timed out"):
        scorer.score([PROMPT], ["drip:always"])
    assert 2.0 <= time.monotonic() - start < 3.0
    assert FakeNemotron.attempts["drip:always"] == 2 and scorer.retries["timeout"] == 2


def test_headers_dripped_byte_by_byte_fail_at_the_timeout_too(server, caplog):
    """Every read of a header dripped at 1 byte/s succeeds; the attempt still ends at its 1.5 s."""
    scorer = reward(server, timeout=1.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert scorer.score([PROMPT], ["dripheaders:2.5"]) == [2.5]
    assert 1.5 <= time.monotonic() - start < 3.5
    assert FakeNemotron.attempts["dripheaders:2.5"] == 2 and scorer.retries == Counter({"timeout": 1})
