"""An API key never leaves the process: not in MLflow params, tags, artifacts, logs, errors, tracebacks or stage logs."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import mlflow
import pytest

from synpref.cli import main
from synpref.core.secrets import MASK, redact, remember, remember_env_keys
from synpref.http import EndpointError, post_json
from synpref.pipeline.stage_process import run_process
from tests.conftest import ROOT, http_server

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
            f"--model.init_args.reward.init_args.http.base_url={server}",
            "--model.init_args.reward.init_args.http.api_key_env=SYNPREF_TEST_KEY",
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


# -- a server that echoes the key back, in any reply ------------------------------------------------
ECHOED = "sk-echoed-back-7731"


class EchoesKey(BaseHTTPRequestHandler):
    """Answers with the bearer key in its body; the status is the number in the path (200: not JSON)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status = int(re.search(r"/(\d{3})(?:/|$)", self.path).group(1))
        body = f"<html>bad key {self.headers['Authorization']} for you</html>".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def echo(monkeypatch):
    with http_server(EchoesKey, monkeypatch, "SYNPREF_ECHO_KEY", ECHOED) as url:
        yield url


@pytest.mark.parametrize("status", [200, 400, 501])
def test_a_reply_echoing_the_key_is_redacted_in_the_error(echo, status):
    with pytest.raises(EndpointError) as error:
        post_json(f"{echo}/{status}", {}, api_key_env="SYNPREF_ECHO_KEY", max_retries=0)
    assert ECHOED not in str(error.value) and f"bad key Bearer {MASK}" in str(error.value)


@pytest.mark.parametrize("status", [200, 400, 501])
def test_an_echoed_key_stays_out_of_predicts_output_and_mlflow(in_tmp, echo, capfd, caplog, status):
    args = [
        "predict",
        "--config",
        "configs/tiny/sample.yaml",
        "--model.init_args.policy.name_or_path=artifacts/tiny/base",
        "--model.init_args.reward=synpref.rewards.EndpointReward",
        f"--model.init_args.reward.init_args.http.base_url={echo}/{status}",
        "--model.init_args.reward.init_args.http.api_key_env=SYNPREF_ECHO_KEY",
        "--model.init_args.reward.init_args.http.max_retries=0",
        "--model.init_args.decoding.max_new_tokens=4",
        "--data.init_args.max_prompts=2",
        "--trainer.enable_progress_bar=false",
    ]
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_:
        main(args)
    output = capfd.readouterr()
    assert exit_.value.code == 1 and f"Bearer {MASK}" in output.err  # the echo is shown, masked
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("synpref-tiny").experiment_id])
    texts = [output.out, output.err, caplog.text, str(run.data.params), str(run.data.tags)]
    for artifact in client.list_artifacts(run.info.run_id):
        if not artifact.is_dir:
            texts.append(Path(client.download_artifacts(run.info.run_id, artifact.path, str(in_tmp))).read_text())
    assert "SYNPREF_ECHO_KEY" in "".join(texts)  # the variable's name is recorded; its value never
    for text in texts:
        assert ECHOED not in text


def test_an_uncaught_traceback_is_redacted(echo):
    code = f"from synpref.http import post_json\npost_json('{echo}/400', {{}}, api_key_env='SYNPREF_ECHO_KEY')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr and "EndpointError" in done.stderr
    assert ECHOED not in done.stderr and f"Bearer {MASK}" in done.stderr


def test_every_log_record_is_redacted_lightnings_own_included(caplog):
    remember("sk-logged-key-9090")
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").warning("using key %s", "sk-logged-key-9090")
        try:
            raise RuntimeError("refused sk-logged-key-9090")
        except RuntimeError:
            logging.getLogger("synpref.test").exception("failed")
    assert "sk-logged-key-9090" not in caplog.text
    assert f"using key {MASK}" in caplog.text and f"RuntimeError: refused {MASK}" in caplog.text


def test_the_stage_log_tee_redacts_a_key_split_across_writes(tmp_path, capfd):
    remember("sk-stage-key-5150")
    code = (
        "import sys, time\n"
        "for out in (sys.stdout, sys.stderr):\n"
        "    out.write('key sk-stage'); out.flush(); time.sleep(0.3); out.write('-key-5150 end\\n'); out.flush()\n"
    )
    assert run_process([sys.executable, "-c", code], tmp_path / "stage.log", dict(os.environ)) == 0
    seen = capfd.readouterr()
    for text in ((tmp_path / "stage.log").read_text(), seen.out, seen.err):
        assert "sk-stage-key-5150" not in text and f"key {MASK} end" in text


def test_remember_env_keys_finds_every_api_key_env(monkeypatch):
    monkeypatch.setenv("SYNPREF_JUDGE_KEY", "sk-judge-key-1234")
    monkeypatch.setenv("SYNPREF_GEN_KEY", "sk-generator-key-5678")
    config = {
        "model": {"init_args": {"reward": {"init_args": {"api_key_env": "SYNPREF_JUDGE_KEY"}}}},
        "judges": [{"class_path": "x", "init_args": {"generator_api_key_env": "SYNPREF_GEN_KEY"}}],
    }
    assert remember_env_keys(config) == ["SYNPREF_JUDGE_KEY", "SYNPREF_GEN_KEY"]
    assert redact("a sk-judge-key-1234 b sk-generator-key-5678") == f"a {MASK} b {MASK}"
    assert redact("short x") == "short x"


def test_a_warning_and_a_thread_traceback_are_redacted():
    code = (
        "import threading, warnings\n"
        "from synpref.core.secrets import remember\n"
        "remember('sk-warned-key-2468')\n"
        "warnings.warn('the key sk-warned-key-2468 looks old')\n"
        "def fail():\n"
        "    raise ValueError('bad sk-warned-key-2468')\n"
        "t = threading.Thread(target=fail)\n"
        "t.start(); t.join()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert f"the key {MASK} looks old" in done.stderr and f"ValueError: bad {MASK}" in done.stderr, done.stderr
    assert "sk-warned-key-2468" not in done.stderr
