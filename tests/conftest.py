"""Shared fixtures: the tiny offline model (built once per session) and the packaged sample data."""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

# `datasets` gives its logger a handler on the sys.stderr of the moment it is first imported:
# imported here, that is the session's stream, not one test's capsys stream that closes after it.
import datasets  # noqa: F401
import pytest

from synpref.core.resources import sample

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(sample("README.md")).parent

# pytest-xdist (`-n 2` in pyproject's addopts) runs two workers on a 2-core machine: each worker, and
# the synpref processes its tests start, gets one torch thread. Two workers of two threads each
# oversubscribe the cores, and torch's thread pool then waits on descheduled threads (a tiny model's
# matmul measured 50-200x slower); with one thread each, the tiny models lose nothing (measured idle).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The longest files first, so that under xdist they do not start last and leave one worker running
# alone at the end (files are handed to workers in collection order).
SLOW_FIRST = ("test_scaling.py", "test_pipeline.py", "test_rehearsal.py", "test_served.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the serial order stays the plain one
        rank = {name: i for i, name in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert SAMPLE.is_dir(), f"packaged sample data not found at {SAMPLE}"
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_dir) -> str:
    """The tiny Qwen2 model + BPE tokenizer as an HF directory, built by the library's own builder."""
    from synpref.presets import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "base"
    return str(build_tiny_model(out, [sample_dir / "sft_messages.jsonl"]))


@pytest.fixture(scope="session")
def qwen_small_model(tmp_path_factory, sample_dir) -> str:
    """The `qwen-vocab-small` preset: a 43M-parameter random Qwen2 with Qwen2.5's 151,936-token vocabulary."""
    from synpref.presets import build_preset_model

    out = tmp_path_factory.mktemp("qwen-vocab-small") / "base"
    return str(build_preset_model("qwen-vocab-small", out, [sample_dir / "sft_messages.jsonl"]))


@pytest.fixture(autouse=True)
def no_global_tracking_uri(monkeypatch):
    """Each test starts, as a new process does, with no MLflow tracking URI set in-process (MLflow
    then reads MLFLOW_TRACKING_URI): Lightning's MLFlowLogger sets the global one when it makes its
    run, and MLflow's fluent calls (`mlflow.search_runs`, used by `MlflowClient.load_table`) would
    otherwise read an earlier test's store."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, tiny_model) -> Path:
    """cwd = a fresh folder laid out like the repo root (configs/, artifacts/tiny/base),
    with its own MLflow store, so configs/tiny/*.yaml run unmodified."""
    work = tmp_path / "repo"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "artifacts" / "tiny").mkdir(parents=True)
    (work / "artifacts" / "tiny" / "base").symlink_to(tiny_model)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    return work


@contextmanager
def http_server(handler, monkeypatch, key_env: str, key: str):
    """A real HTTP server on 127.0.0.1 (a free port) running `handler`; yields its /v1 base URL.
    The API key goes into `key_env`, and proxies are cleared so requests stay on loopback."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv(key_env, key)
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# The MLflow params of each run type: the settings that define the run, under stable names (every
# argument is in the run's config.yaml artifact). A param missing here, or one not listed, fails.
DECODING = {"max_new_tokens", "temperature", "top_k", "top_p"}
RUN_PARAMS = {
    "sft": {"policy_name", "lr", "batch_size", "seed"},
    "dpo": {"policy_name", "lr", "batch_size", "seed", "pairs", "beta", "loss_type", "labelled_by"},
    "sample": {"policy_name", "reward", "num_samples", "threshold", "seed", "n_prompts"} | DECODING,
    "eval": {
        "policy_name",
        "policy_path",
        "baseline_name",
        "baseline_path",
        "reward",
        "seed",
        "n_prompts",
        "do_sample",
        "samples_per_prompt",
        "policy_labelled_by",
    }
    | DECODING,
}
# DPO with PeriodicWinRate: its settings, once.
TRAINING_EVAL_PARAMS = {"eval/baseline_name", "eval/reward", "eval/seed", "eval/every_n_steps", "eval/n_prompts"}


def assert_run_params(params: dict, kind: str, extra: set = frozenset()) -> None:
    """`params` are exactly the run type's (training runs: + max_epochs or max_steps)."""
    expected = RUN_PARAMS[kind] | set(extra)
    if kind == "eval":  # one `judge.<label>` per judge of the evaluation
        expected |= {k for k in params if k.startswith("judge.")}
    if kind in ("sft", "dpo"):
        expected |= {"max_steps"} if "max_steps" in params else {"max_epochs"}
    assert set(params) == expected, f"{kind} run: unknown {set(params) - expected}, missing {expected - set(params)}"
    assert not any(k.startswith("_") or v in ("", "None") for k, v in params.items()), params
