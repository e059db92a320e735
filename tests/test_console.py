"""What `synpref` prints: the tiny SFT stage through the command line, without third-party chatter unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

# What a user should not have to read past: Lightning's advertisements, internal HF progress bars,
# warnings pointing into site-packages, accelerator and seed notices, the parameter table.
NOISE = (
    "💡",
    "litlogger",
    "litmodels",
    "site-packages",
    "Loading weights",
    "Filter",
    "Writing model shards",
    "Generating train split",
    "GPU available",
    "Seed set to",
    "Trainable params",
    "INFO mlflow",
    "Token indices sequence length",
)


def sft(cwd, *extra: str) -> str:
    cmd = [sys.executable, "-m", "synpref", "fit", "--config", "configs/tiny/sft.yaml", "--trainer.max_steps=2"]
    cmd += ["--trainer.max_epochs=1", "--data.init_args.max_rows=48", "--trainer.limit_val_batches=1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SYNPREF_VERBOSE", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_stage_prints_its_progress_and_what_matters_and_verbose_brings_the_rest_back(in_tmp):
    out = sft(in_tmp)
    assert [p for p in NOISE if p in out] == []
    assert "Epoch 0/0" in out and "train/loss" in out  # the training progress bar stays
    assert "dropped {'truncated'" in out  # a warning that matters: rows left out, counted
    assert "exported SFTModule to artifacts/tiny/sft" in out

    loud = sft(in_tmp, "--verbose")
    assert {"💡", "litlogger", "Loading weights", "Filter", "Trainable params"} <= {p for p in NOISE if p in loud}
