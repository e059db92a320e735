"""SIGTERM ends an HTTP retry wait at once, even under a handler that only records it (Lightning's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from synpref.http import post_json
from tests.conftest import ROOT, http_server


class RateLimited(BaseHTTPRequestHandler):
    """Every request: 429 with Retry-After: 60. Counts requests (the test waits for them)."""

    requests = 0
    arrived = threading.Condition()

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"error": "slow down"}'
        self.send_response(429)
        self.send_header("Retry-After", "60")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with RateLimited.arrived:
            RateLimited.requests += 1
            RateLimited.arrived.notify_all()


@pytest.fixture
def limited(monkeypatch):
    RateLimited.requests = 0
    with http_server(RateLimited, monkeypatch, "SYNPREF_TEST_KEY", "sk-interrupt-test-1") as url:
        yield url


# A handler like Lightning's during fit/predict: it records SIGTERM and returns.
RECORDS_ONLY = "import signal\nsignal.signal(signal.SIGTERM, lambda signum, frame: print('recorded', flush=True))\n"
CALLS = {
    "post_json": "from synpref.http import post_json\npost_json(URL + '/chat/completions', {}, max_retries=3)\n",
    "map_concurrent": (  # two worker threads, each waiting out a Retry-After
        "from synpref.http import HttpSettings\nfrom synpref.rewards import EndpointReward\n"
        "EndpointReward(http=HttpSettings(base_url=URL, api_key_env='SYNPREF_TEST_KEY', max_concurrency=2))"
        ".score([[{'role': 'user', 'content': 'hi'}]] * 2, ['a', 'b'])\n"
    ),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("handler", ["records_only", "default"])
def test_sigterm_during_a_retry_after_wait_exits_at_once(limited, call, handler):
    code = (RECORDS_ONLY if handler == "records_only" else "") + f"URL = {limited!r}\n" + CALLS[call]
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        expected = 2 if call == "map_concurrent" else 1
        with RateLimited.arrived:
            assert RateLimited.arrived.wait_for(lambda: RateLimited.requests >= expected, timeout=120)
        time.sleep(0.5)  # now in the 60 s backoff
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - start < 5
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert RateLimited.requests == expected  # no retry was sent after the signal
    assert ("recorded" in out) == (handler == "records_only")  # the previous handler still ran


def test_handlers_are_restored_after_a_call(limited):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Exception, match="giving up after 1 attempts"):
        post_json(limited + "/chat/completions", {}, max_retries=0)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigterm_ends_a_predict_run_waiting_out_a_retry_after(in_tmp, limited):
    """`synpref predict` scoring through a rate-limited endpoint: Lightning's own SIGTERM handler is
    in place; the run still ends within seconds, with 143, not after the 60 s Retry-After."""
    args = [
        "predict",
        "--config",
        "configs/tiny/sample.yaml",
        "--model.init_args.policy.name_or_path=artifacts/tiny/base",
        "--model.init_args.reward=synpref.rewards.EndpointReward",
        f"--model.init_args.reward.init_args.http.base_url={limited}",
        "--model.init_args.reward.init_args.http.api_key_env=SYNPREF_TEST_KEY",
        "--model.init_args.reward.init_args.http.max_concurrency=2",
        "--model.init_args.decoding.max_new_tokens=4",
        "--data.init_args.max_prompts=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "synpref", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with RateLimited.arrived:
            assert RateLimited.arrived.wait_for(lambda: RateLimited.requests >= 2, timeout=300)
        time.sleep(0.5)
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - start < 5, err[-2000:]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
