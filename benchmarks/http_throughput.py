"""Requests/s of synpref's HTTP client vs the openai SDK's and a connection-per-request client, 64 in flight.

    python benchmarks/http_throughput.py [--scheme https|http] [--concurrency 64] [--requests 2000] [--repeats 3]

A keep-alive HTTP/1.1 stub server (its own process, threaded, on 127.0.0.1) answers every POST to
/v1/chat/completions with the small reply a reward endpoint sends (`reward:<float>` in the message).
With `--scheme https` (the default: hosted reward and judge APIs are HTTPS) it speaks TLS with a
throwaway self-signed certificate (openssl), which all three clients trust through SSL_CERT_FILE.
Each side scores the same `--requests` conversations with `--concurrency` threads, reads the reward
from each reply, and is timed `--repeats` times, the sides taking turns (each side's best counts; its
first run also opens its connections):
- synpref: `EndpointReward.score` (synpref.http: a pool of keep-alive connections, httpx);
- sdk: `openai.OpenAI(base_url, max_retries=0).chat.completions.create` on a thread pool;
- per-request: `http.client` on a thread pool, a new connection for every request (the old synpref.http).
Last line: `RESULT http speedup_vs_sdk=<synpref/sdk> speedup_vs_per_request=<synpref/per-request>`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import ssl
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import openai

from synpref.http import HttpSettings
from synpref.rewards import EndpointReward

MODEL = "stub-reward"
_REWARD = re.compile(r"reward:(-?[0-9.]+)")


class StubReward(BaseHTTPRequestHandler):
    """A chat-completions reply with the reward as its content; keeps the connection open (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the whole reply goes in one write anyway

    def log_message(self, *args):
        pass

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):  # the handshake in this connection's thread
            self.request.do_handshake()
        super().setup()

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reward = len(request["messages"][-1]["content"]) / 10
        body = json.dumps(
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": 0,
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"reward:{reward}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        self.wfile.write(head.encode() + body)


class StubServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # 64 clients connecting at once must not overflow the listen backlog
    tls: ssl.SSLContext | None = None

    def get_request(self):
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


def serve(port: multiprocessing.Value, cert: str | None) -> None:
    httpd = StubServer(("127.0.0.1", 0), StubReward)
    if cert:
        httpd.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        httpd.tls.load_cert_chain(cert)
    port.value = httpd.server_address[1]
    httpd.serve_forever()


def self_signed(folder: Path) -> str:
    """A PEM file with a P-256 key and a one-day certificate for 127.0.0.1."""
    pem = folder / "stub.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(pem),
            "-out",
            str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    pem.write_text(pem.read_text() + (folder / "cert.pem").read_text())
    return str(pem)


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "x" * (i % 50)}] for i in range(n)]


def synpref_side(base_url: str, concurrency: int) -> Callable[[list], list[float]]:
    reward = EndpointReward(MODEL, HttpSettings(base_url=base_url, max_concurrency=concurrency, max_retries=0))
    prompts: list = []

    def run(convs: list) -> list[float]:
        while len(prompts) < len(convs):
            prompts.append([convs[len(prompts)][0]])
        return reward.score(prompts[: len(convs)], [c[1]["content"] for c in convs])

    return run


def sdk_side(base_url: str, concurrency: int) -> Callable[[list], list[float]]:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    pool = ThreadPoolExecutor(concurrency)

    def one(messages: list[dict]) -> float:
        reply = client.chat.completions.create(model=MODEL, messages=messages)
        return float(_REWARD.search(reply.choices[0].message.content).group(1))

    return lambda convs: list(pool.map(one, convs))


def per_request_side(base_url: str, concurrency: int) -> Callable[[list], list[float]]:
    host, port = base_url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPSConnection if base_url.startswith("https") else http.client.HTTPConnection
    pool = ThreadPoolExecutor(concurrency)

    def one(messages: list[dict]) -> float:
        conn = connection(host, int(port), timeout=60)
        try:
            body = json.dumps({"model": MODEL, "messages": messages}).encode()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return float(_REWARD.search(reply["choices"][0]["message"]["content"]).group(1))

    return lambda convs: list(pool.map(one, convs))


def rate(run: Callable[[list], list[float]], convs: list) -> float:
    """Requests/s of one timed run (the rewards checked)."""
    start = time.perf_counter()
    got = run(convs)
    seconds = time.perf_counter() - start
    assert got == [len(c[1]["content"]) / 10 for c in convs], "a side read the wrong rewards"
    return len(convs) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", choices=["https", "http"], default="https")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000, help="requests per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (the best counts)")
    args = ap.parse_args()
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)  # the stub is on loopback

    cert = self_signed(Path(tempfile.mkdtemp())) if args.scheme == "https" else None
    if cert:
        os.environ["SSL_CERT_FILE"] = cert  # every side verifies the stub's certificate as a CA's
    port = multiprocessing.Value("i", 0)
    server = multiprocessing.Process(target=serve, args=(port, cert), daemon=True)
    server.start()
    while not port.value:
        time.sleep(0.05)
    base_url = f"{args.scheme}://127.0.0.1:{port.value}/v1"
    convs = conversations(args.requests)
    try:
        sides = {"synpref": synpref_side, "sdk": sdk_side, "per-request": per_request_side}
        runs = {name: side(base_url, args.concurrency) for name, side in sides.items()}
        rates = dict.fromkeys(sides, 0.0)
        for _ in range(args.repeats):  # the sides take turns: a change in the machine's load hits all three
            for name, run in runs.items():
                rates[name] = max(rates[name], rate(run, convs))
        for name in sides:
            print(
                f"{name:12s} {rates[name]:8.0f} requests/s  ({args.concurrency} in flight, "
                f"{args.requests} requests, best of {args.repeats}, {args.scheme})",
                flush=True,
            )
    finally:
        server.terminate()
    print(
        f"RESULT http speedup_vs_sdk={rates['synpref'] / rates['sdk']:.2f} "
        f"speedup_vs_per_request={rates['synpref'] / rates['per-request']:.2f}"
    )


if __name__ == "__main__":
    main()
