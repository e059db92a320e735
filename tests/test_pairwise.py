"""PairwiseLLMJudge against a real HTTP server on 127.0.0.1 whose verdicts prefer the first position."""

import hashlib
import json
import random
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from synpref.http import EndpointError, HttpSettings
from synpref.rewards.pairwise import PairwiseLLMJudge, parse_verdict
from tests.conftest import http_server

KEY = "sk-judge-test"


class BiasedJudge(BaseHTTPRequestHandler):
    """A fake judge model: when exactly one answer says BETTER it names that one, except 40 % of the
    time it names the first position; otherwise it names the first position 70 % of the time. Its
    randomness is a hash of the request, so verdicts do not depend on thread timing. A question
    containing GARBLE gets a reply without a verdict; each distinct request first gets one 503."""

    seen: set = set()
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._reply(401, b'{"error": "bad key"}')
        with self.lock:
            first_time = body not in self.seen
            self.seen.add(body)
        if first_time and b"RETRY" in body:
            return self._reply(503, b"{}")
        user = json.loads(body)["messages"][1]["content"]
        rng = random.Random(hashlib.sha256(body).digest())
        a = user.split("[Answer of assistant A]")[1].split("[End of answer A]")[0]
        b = user.split("[Answer of assistant B]")[1].split("[End of answer B]")[0]
        if "GARBLE" in user:
            content = "Both answers have merit; I will not choose."
        elif ("BETTER" in a) != ("BETTER" in b):
            content = "[[A]]" if rng.random() < 0.4 else ("[[A]]" if "BETTER" in a else "[[B]]")
        else:
            content = "Reasoning... [[A]]" if rng.random() < 0.7 else "Reasoning... [[B]]"
        self._reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def _reply(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge(monkeypatch):
    with http_server(BiasedJudge, monkeypatch, "JUDGE_KEY", KEY) as url:
        yield PairwiseLLMJudge(
            "fake-judge", HttpSettings(base_url=url, api_key_env="JUDGE_KEY", max_concurrency=8, backoff=0.01)
        )


def prompts(n, tag=""):
    return [[{"role": "user", "content": f"Question {i}{tag}?"}] for i in range(n)]


def test_both_orders_cancel_the_first_position_bias(judge):
    n = 200
    qs = prompts(n)
    out = judge.judge(qs, [f"policy answer {i}" for i in range(n)], [f"baseline answer {i}" for i in range(n)])
    first_order = sum(r["verdicts"][0] == "A" for r in out) / n  # policy shown first: the naive judge's "win rate"
    assert first_order == pytest.approx(0.7, abs=0.07)
    wins, losses = sum(r["outcome"] == "win" for r in out), sum(r["outcome"] == "loss" for r in out)
    # Equal answers: a win needs A then B (.7·.3), a loss B then A (.3·.7): the bias cancels.
    assert wins / n == pytest.approx(0.21, abs=0.07) and losses / n == pytest.approx(0.21, abs=0.07)
    assert abs(wins - losses) / n < 0.08
    # Position-driven pairs (A,A or B,B): .7² + .3² = 58 %.
    assert sum(r["position_bias"] for r in out) / n == pytest.approx(0.58, abs=0.07)


def test_a_better_answer_still_wins_and_a_worse_one_never_does(judge):
    n = 100
    better = judge.judge(prompts(n), ["BETTER policy"] * n, ["plain baseline"] * n)
    assert all(r["verdicts"][0] == "A" for r in better)  # first position and better answer agree
    assert sum(r["outcome"] == "win" for r in better) / n == pytest.approx(0.6, abs=0.1)
    assert not any(r["outcome"] == "loss" for r in better)
    worse = judge.judge(prompts(n), ["plain policy"] * n, ["BETTER baseline"] * n)
    # Asked once with the policy first, the bias would hand the worse policy ~40 % wins; both orders give none.
    assert sum(r["verdicts"][0] == "A" for r in worse) / n == pytest.approx(0.4, abs=0.1)
    assert not any(r["outcome"] == "win" for r in worse)


def test_unparseable_replies_are_counted_and_named_never_a_verdict(judge, caplog):
    qs = prompts(3) + [[{"role": "user", "content": "Please GARBLE this"}]]
    out = judge.judge(qs, ["p RETRY"] * 4, ["b"] * 4)  # every request also survives one 503
    assert out[3]["outcome"] is None and out[3]["verdicts"] == [None, None] and len(out[3]["unparseable"]) == 2
    assert all(r["outcome"] in ("win", "tie", "loss") for r in out[:3])
    assert "1 of 4 prompts without a valid verdict" in caplog.text and "Please GARBLE this" in caplog.text
    assert KEY not in caplog.text


def test_parse_verdict_and_key_errors(judge, monkeypatch):
    assert parse_verdict("so [[B]]") == "B" and parse_verdict("[[ C ]]") == "C"
    assert parse_verdict("[[A]] or maybe [[B]]") is None and parse_verdict("A is better") is None
    assert parse_verdict("[[A]] ... final: [[A]]") == "A"
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with pytest.raises(EndpointError, match="HTTP 401"):
        judge.judge(prompts(1), ["p"], ["b"])
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(EndpointError, match="JUDGE_KEY"):
        judge.judge(prompts(1), ["p"], ["b"])
