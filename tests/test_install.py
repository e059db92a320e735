"""A built wheel, installed into a fresh environment, runs a reduced tiny stage outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_runs_a_stage_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # No build isolation and no index: setuptools and every dependency come from this environment.
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = (tmp_path / "dist").glob("synpref-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"synpref/callbacks/win_rate.py", "synpref/sample/test_prefs.jsonl", "synpref/sample/README.md"} <= names

    # A fresh venv that sees the installed dependencies but holds its own synpref (the wheel).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], cwd=tmp_path, env=env
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(
        [str(python), "-c", "import synpref, synpref.callbacks as c; print(synpref.__file__); print(c.__file__)"],
        cwd=work,
        env=env,
    ).stdout.split()
    assert all(str(venv) in p for p in where), where  # the wheel's code, not the checkout's

    # build-tiny reads its corpus from the installed sample data; fit reads the checkout's config.
    synpref = str(venv / "bin" / "synpref")
    run([synpref, "build-tiny"], cwd=work, env=env)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    run(
        [
            synpref,
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny" / "sft.yaml"),
            "--trainer.max_steps=2",
            "--trainer.max_epochs=1",
            "--data.init_args.max_rows=32",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=work,
        env=env,
    )
    assert (work / "artifacts" / "tiny" / "sft" / "model.safetensors").is_file()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (found,) = client.search_runs([client.get_experiment_by_name("synpref-tiny").experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["policy_name"] == "base"
