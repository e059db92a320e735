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
    assert {
        "synpref/callbacks/win_rate.py",
        "synpref/sample/test_prefs.jsonl",
        "synpref/sample/README.md",
        "synpref/configs/tiny/paper.yaml",
        "synpref/configs/tiny/sft.yaml",
        "synpref/configs/paper.yaml",
    } <= names

    # A fresh venv that holds its own synpref (the wheel) and sees the dependencies this interpreter
    # sees: its site-packages folders, listed in a .pth file. (`--system-site-packages` would show the
    # base interpreter's, which lack them when this test itself runs in a virtualenv.) Plain paths: the
    # .pth files in them, such as this environment's editable synpref, are not read.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    outer = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(purelib.stdout.strip()) / "outer_environment.pth").write_text("\n".join(outer) + "\n")
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

    # The packaged pipeline plans from an empty folder: its stages' configs are found next to it.
    synpref = str(venv / "bin" / "synpref")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    plan = run([synpref, "reproduce", "--config", "synpref://configs/tiny/paper.yaml", "--dry_run", "true"], work, env)
    assert "[1/6] sft … would run (new)" in plan.stdout and "dry run: 6 of 6 stages would run" in plan.stdout

    # build-tiny reads its corpus from the installed sample data; fit reads the installed config.
    run([synpref, "build-tiny"], cwd=work, env=env)
    run(
        [
            synpref,
            "fit",
            "--config",
            "synpref://configs/tiny/sft.yaml",
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
