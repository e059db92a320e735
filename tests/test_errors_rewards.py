"""Bad rewards: a score that is not a float, an unknown function, a refused API key, each named in one line."""

from __future__ import annotations

import json
import math
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from synpref.cli import main
from tests.conftest import http_server
from tests.test_errors import EVAL, SAMPLE, fails, write


# -- rewards -----------------------------------------------------------------------------------
def none_reward(prompt: str, response: str):
    return None


def text_reward(prompt: str, response: str):
    return "good"


def nan_for_colour(prompt: str, response: str):
    return math.nan if "colour" in prompt else 1.0


@pytest.mark.parametrize(
    "fn, shown", [("none_reward", "returned None (NoneType)"), ("text_reward", "returned 'good' (str)")]
)
def test_function_reward_not_a_float_names_the_reward(in_tmp, capsys, fn, shown):
    reward = f"--model.init_args.reward={{class_path: synpref.rewards.FunctionReward, init_args: {{fn: 'tests.test_errors_rewards:{fn}'}}}}"
    line = fails(
        capsys,
        [*SAMPLE, reward],
        f"reward 'tests.test_errors_rewards:{fn}' {shown}",
        "for the prompt '",
        "on_bad_score: skip",
    )
    assert not (in_tmp / "artifacts/tiny/samples/samples.jsonl").exists(), line


def test_unknown_reward_function(in_tmp, capsys):
    reward = "--model.init_args.reward={class_path: synpref.rewards.FunctionReward, init_args: {fn: 'tests.test_errors_rewards:nope'}}"
    fails(capsys, [*SAMPLE, reward], "'reward.init_args.fn'", "has no attribute 'nope'")


def test_nan_reward_in_evaluation(in_tmp, capsys):
    prompts = write(in_tmp / "p.jsonl", [{"prompt": "Name a colour."}, {"prompt": "Name a fruit."}])
    reward = "--model.init_args.reward={class_path: synpref.rewards.FunctionReward, init_args: {fn: 'tests.test_errors_rewards:nan_for_colour'}}"
    args = [*EVAL, f"--data.init_args.path={prompts}", reward, "--model.init_args.output_dir=out"]
    fails(capsys, args, "returned nan (float), not a finite float", "for the prompt 'Name a colour.'")


def test_nan_reward_in_sampling_and_skip(in_tmp, capsys):
    prompts = write(in_tmp / "p.jsonl", [{"prompt": "Name a colour."}, {"prompt": "Name a fruit."}])
    reward = "--model.init_args.reward={class_path: synpref.rewards.FunctionReward, init_args: {fn: 'tests.test_errors_rewards:nan_for_colour'}}"
    args = [
        *SAMPLE,
        f"--data.init_args.path={prompts}",
        reward,
        "--model.init_args.output_dir=out",
        "--model.init_args.threshold=-1",
    ]
    fails(capsys, args, "returned nan (float), not a finite float", "for the prompt 'Name a colour.'")
    assert not Path("out/samples.jsonl").exists()
    main([*args, "--model.init_args.on_bad_score=skip"])  # the NaN samples are dropped and counted
    samples = [json.loads(line) for line in Path("out/samples.jsonl").read_text().splitlines()]
    assert {r["prompt"][0]["content"] for r in samples} == {"Name a fruit."} and len(samples) == 2
    assert all(r["score"] == 1.0 for r in samples)


class RefusesKey(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.dumps({"error": f"invalid key {self.headers['Authorization']}"}).encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_endpoint_refusing_the_key_names_the_variable(in_tmp, capsys, monkeypatch):
    key = "sk-secret-do-not-print"
    with http_server(RefusesKey, monkeypatch, "SYNPREF_TEST_KEY", key) as url:
        reward = (
            "--model.init_args.reward={class_path: synpref.rewards.EndpointReward, init_args: "
            f"{{http: {{base_url: '{url}', api_key_env: SYNPREF_TEST_KEY, max_retries: 0}}}}}}"
        )
        line = fails(capsys, [*SAMPLE, reward], "refused the API key from $SYNPREF_TEST_KEY (HTTP 401", code=1)
    assert key not in line and "***" in line
