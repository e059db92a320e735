"""An API key used by a real `synpref predict` run never reaches MLflow params, tags, artifacts or logs."""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import mlflow
import pytest

from synpref.cli import main
from tests.conftest import http_server

KEY = "sk-never-log-me-42"


class LengthReward(BaseHTTPRequestHandler):
    """An OpenAI-compatible reward endpoint: reward = length of the reply; checks the bearer key."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.headers.get("Authorization") == f"Bearer {KEY}"
        reward = float(len(request["messages"][-1]["content"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"reward:{reward}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    with http_server(LengthReward, monkeypatch, "SYNPREF_TEST_KEY", KEY) as url:
        yield url


def test_endpoint_key_stays_out_of_mlflow_and_logs(in_tmp, server, capfd, caplog):
    main(
        [
            "predict",
            "--config",
            "configs/tiny/sample.yaml",
            "--model.init_args.policy.name_or_path=artifacts/tiny/base",
            "--model.init_args.reward=synpref.rewards.EndpointReward",
            f"--model.init_args.reward.init_args.base_url={server}",
            "--model.init_args.reward.init_args.api_key_env=SYNPREF_TEST_KEY",
            "--model.init_args.decoding.max_new_tokens=8",
            "--data.init_args.max_prompts=4",
            "--trainer.enable_progress_bar=false",
        ]
    )
    output = capfd.readouterr()
    assert (in_tmp / "artifacts/tiny/samples/samples.jsonl").exists()

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("synpref-tiny")
    (run,) = client.search_runs([exp.experiment_id])
    # The run did record which variable holds the key, so the check below can fail for real.
    texts = [str(run.data.params), str(run.data.tags)]
    assert (
        "SYNPREF_TEST_KEY"
        in "".join(texts) + Path(client.download_artifacts(run.info.run_id, "config.yaml", str(in_tmp))).read_text()
    )
    for artifact in client.list_artifacts(run.info.run_id):
        if not artifact.is_dir:
            texts.append(
                Path(client.download_artifacts(run.info.run_id, artifact.path, str(in_tmp))).read_text(errors="replace")
            )
    texts += [output.out, output.err, caplog.text]
    for text in texts:
        assert KEY not in text
