"""A stand-in reward server for rehearsals: Nemotron-70B-Reward's reply format on 127.0.0.1, the rule reward's scores."""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence

from synpref.rewards.rules import RuleReward


def reply(body: dict, scorer: RuleReward) -> dict:
    """The chat-completions reply NVIDIA's nvidia/llama-3.1-nemotron-70b-reward gives (build.nvidia.com's
    API reference for the model): the reward as message content `reward:<float>` and as the logprob of
    the single token `reward`; the conversation's last message is the assistant reply it scores."""
    messages = body["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant reply to score")
    score = round(scorer.score([messages[:-1]], [messages[-1]["content"]])[0], 4)
    return {
        "id": f"chatcmpl-standin-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"reward:{score}"},
                "logprobs": {"content": [{"token": "reward", "logprob": score, "bytes": None, "top_logprobs": []}]},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
    }


class Handler(BaseHTTPRequestHandler):
    scorer = RuleReward()

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self._send(200, reply(body, self.scorer))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._send(400, {"error": {"message": f"{type(e).__name__}: {e}"}})

    def log_message(self, format, *args):  # one line per request would drown the stage logs
        pass


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"stand-in reward server on http://{args.host}:{args.port}/v1 (rule reward)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
