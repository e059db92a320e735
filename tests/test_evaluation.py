"""WinRateModule + WinRateRecorder, PeriodicWinRate: eval.jsonl, metrics, params and figures in MLflow (sqlite and a real server)."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader

from synpref.core.specs import Decoding, ModelSpec
from synpref.modules import WinRateModule
from synpref.rewards.base import RewardScorer
from tests.conftest import assert_run_params, read_jsonl


class DistinctWords(RewardScorer):
    """Deterministic test judge: the number of distinct words in the response."""

    name = "distinct-words"

    def score(self, prompts, responses):
        return [float(len(set(r.split()))) for r in responses]


def perturbed_copy(src: str, dst: Path, scale: float = 0.5, seed: int = 1) -> str:
    """The tiny model with noise on its weights: a second, different 'SFT export'."""
    from synpref.core.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(src), load_tokenizer(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def baseline_model(tiny_model, tmp_path_factory) -> str:
    return perturbed_copy(tiny_model, tmp_path_factory.mktemp("baseline") / "sft")


def prompt_batches(sample_dir, n: int, batch_size: int) -> list[dict]:
    rows = [r for r in read_jsonl(sample_dir / "test_prefs.jsonl") if len(r["prompt"]) < 400][:n]
    return [
        {
            "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows[i : i + batch_size]],
            "prompt_id": [r["prompt_id"] for r in rows[i : i + batch_size]],
            "index": list(range(i, min(i + batch_size, n))),
        }
        for i in range(0, n, batch_size)
    ]


def outcome_fractions(rows: list[dict]) -> tuple[float, float, float]:
    n = len(rows)
    return (
        sum(r["policy_reward"] > r["baseline_reward"] for r in rows) / n,
        sum(r["policy_reward"] == r["baseline_reward"] for r in rows) / n,
        sum(r["policy_reward"] < r["baseline_reward"] for r in rows) / n,
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=server_log,
        start_new_session=True,
        # No background job runners (huey consumers): this test needs the REST API only.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("mlflow server did not answer /health within 60 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group it leads
        proc.wait(timeout=30)
        server_log.close()


def get_json(url: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=10) as r:
        return json.loads(r.read())


def test_predict_logs_to_a_real_mlflow_server(mlflow_server, tiny_model, baseline_model, sample_dir, tmp_path):
    out = tmp_path / "eval"
    module = WinRateModule(
        ModelSpec(tiny_model),
        ModelSpec(baseline_model),
        reward=DistinctWords(),
        output_dir=str(out),
        decoding=Decoding(max_new_tokens=24, seed=3),
    )
    logger = MLFlowLogger(experiment_name="server-test", tracking_uri=mlflow_server, run_name="eval")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False)
    trainer.predict(module, DataLoader(prompt_batches(sample_dir, 12, 5), batch_size=None))

    # Back over the REST API: the run's metrics and params ...
    run = get_json(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=logger.run_id)["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["policy_path"] == tiny_model and params["baseline_path"] == baseline_model
    assert params["reward"] == "distinct-words" and params["n_prompts"] == "12" and params["seed"] == "3"
    assert_run_params(params, "eval")
    for key in (
        "win_rate",
        "tie_rate",
        "loss_rate",
        "win_rate_ci_low",
        "win_rate_ci_high",
        "avg_reward_policy",
        "avg_reward_baseline",
        "sign_test_p",
        "avg_length_policy",
        "avg_length_baseline",
        "length_matched_n",
    ):
        assert f"eval/{key}" in metrics, key
    metrics = {k.removeprefix("eval/"): v for k, v in metrics.items()}
    # ... and the artifacts, downloaded through the server's artifact proxy.
    listed = get_json(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=logger.run_id)
    assert {f["path"] for f in listed["files"]} >= {"eval.jsonl", "eval_table.json", "win_rate.png", "avg_reward.png"}
    base = f"{mlflow_server}/get-artifact?run_uuid={logger.run_id}&path="
    rows = [json.loads(line) for line in urllib.request.urlopen(base + "eval.jsonl").read().decode().splitlines()]
    assert [r["index"] for r in rows] == list(range(12))
    win, tie, loss = outcome_fractions(rows)
    assert metrics["win_rate"] == pytest.approx(win)
    assert metrics["tie_rate"] == pytest.approx(tie) and metrics["loss_rate"] == pytest.approx(loss)
    assert metrics["avg_reward_policy"] == pytest.approx(sum(r["policy_reward"] for r in rows) / 12)
    assert metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
    # The records hold what the judge saw: its score of each response, recomputed here.
    assert [r["policy_reward"] for r in rows] == DistinctWords().score(None, [r["policy_response"] for r in rows])
    assert all(r["prompt"][0]["content"] for r in rows)
    for name in ("win_rate.png", "avg_reward.png"):
        assert png_size(urllib.request.urlopen(base + name).read()) == (640, 400)
    assert rows == read_jsonl(out / "eval.jsonl")


def eval_run(experiment: str, run_name=None):
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    return client, [r for r in runs if run_name is None or r.info.run_name == run_name]


def test_cli_predict_logged_win_rate_matches_the_artifact(in_tmp, tiny_model, baseline_model, capsys):
    """configs/tiny/eval.yaml through the CLI, twice (two policies), then `synpref compare`."""
    from synpref.cli import main

    tiny = in_tmp / "artifacts" / "tiny"
    (tiny / "sft").symlink_to(baseline_model)
    (tiny / "dpo_synthetic").symlink_to(tiny_model)
    (tiny / "dpo_ultrafeedback").symlink_to(baseline_model)  # the baseline itself: a tie with SFT
    fast = [
        "--data.init_args.max_prompts=10",
        "--data.init_args.max_prompt_length=160",
        "--model.init_args.decoding.max_new_tokens=16",
    ]
    main(["predict", "--config", "configs/tiny/eval.yaml", *fast])
    client, runs = eval_run("synpref-tiny")
    run = runs[0]
    local = read_jsonl(tiny / "eval" / "dpo_synthetic" / "eval.jsonl")
    artifact = read_jsonl(client.download_artifacts(run.info.run_id, "eval.jsonl", str(in_tmp)))
    assert artifact == local and len(artifact) == 10
    assert sorted(r["index"] for r in artifact) == list(range(10))
    win, tie, loss = outcome_fractions(artifact)
    m, p = {k.removeprefix("eval/"): v for k, v in run.data.metrics.items()}, run.data.params
    assert m["win_rate"] == pytest.approx(win) and m["tie_rate"] == pytest.approx(tie)
    assert m["loss_rate"] == pytest.approx(loss) and m["n"] == 10
    assert m["avg_reward_baseline"] == pytest.approx(sum(r["baseline_reward"] for r in artifact) / 10)
    assert m["avg_length_policy"] == pytest.approx(sum(r["policy_length"] for r in artifact) / 10)
    assert p["policy_path"] == "artifacts/tiny/dpo_synthetic" and p["baseline_name"] == "sft"
    assert p["reward"] == "synpref.rewards.RuleReward" and p["n_prompts"] == "10" and p["seed"] == "0"
    assert run.info.run_name == "synthetic·eval"
    assert_run_params(p, "eval")
    # Outcome, rewards and lengths come before the texts; the same rows are an MLflow table.
    assert list(artifact[0])[:7] == [
        "index",
        "outcome",
        "policy_reward",
        "baseline_reward",
        "policy_length",
        "baseline_length",
        "length_matched",
    ]
    assert list(artifact[0])[-3:] == ["prompt", "policy_response", "baseline_response"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_table.json", str(in_tmp))).read_text())
    assert table["columns"][:4] == ["index", "prompt", "baseline_response", "policy_response"]
    winner = table["columns"].index("RuleReward/winner")
    named = {"win": "policy", "loss": "baseline", "tie": "tie"}
    assert [row[winner] for row in table["data"]] == [named[r["outcome"]] for r in artifact]
    # The judge's scores in the records are its scores of the recorded texts.
    from synpref.rewards import RuleReward

    assert [r["baseline_reward"] for r in artifact] == pytest.approx(
        RuleReward().score([r["prompt"] for r in artifact], [r["baseline_response"] for r in artifact])
    )

    # The second policy is the SFT export itself: same seed, same prompts -> identical responses.
    main(
        [
            "predict",
            "--config",
            "configs/tiny/eval.yaml",
            *fast,
            "--model.init_args.policy.name_or_path=artifacts/tiny/dpo_ultrafeedback",
            "--model.init_args.output_dir=artifacts/tiny/eval/dpo_ultrafeedback",
        ]
    )
    same = read_jsonl(tiny / "eval" / "dpo_ultrafeedback" / "eval.jsonl")
    assert all(r["policy_response"] == r["baseline_response"] and r["outcome"] == "tie" for r in same)
    assert [r["baseline_response"] for r in same] == [r["baseline_response"] for r in local]
    capsys.readouterr()
    main(["compare", "--experiment", "synpref-tiny", "--csv", "table.csv"])
    table = capsys.readouterr().out
    first, judges = table.split("\n\n")[:2]  # Table 1, then one column group per judge
    rows = [line for line in first.splitlines() if line.startswith("| dpo_")]
    assert len(rows) == 2
    assert judges.startswith(
        "| model | RuleReward win rate [95% CI] | RuleReward LC win rate | clarity win rate [95% CI] "
    )
    assert f"| dpo_synthetic | {100 * win:.1f}% [" in judges and "Power (80%" in table
    assert rows[0].startswith(f"| dpo_synthetic | {100 * win:.1f}% [") and rows[0].endswith(
        "| artifacts/tiny/dpo_synthetic |"
    )
    assert rows[1].startswith("| dpo_ultrafeedback | 0.0% [0.0%, ") and "| 100.0% |" in rows[1]
    assert len(read_csv(in_tmp / "table.csv")) == 2


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
