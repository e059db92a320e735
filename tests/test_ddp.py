"""SFT and DPO under Lightning's DDP on 2 CPU processes (gloo) log the losses of one process, same global batch.

Tolerance: 1e-4 relative. With the same global batch the runs differ only in float summation order
(gradients all-reduced across ranks vs summed in one batch). The runs use full global batches only:
DistributedSampler pads an uneven last batch with repeated rows, which one process would not see.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import mlflow
import pytest

from synpref.cli import main

STEPS = 3


def losses(db) -> list[float]:
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("synpref-tiny")
    run = client.search_runs([exp.experiment_id])[0]
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return [m.value for m in history]


def run_both(in_tmp, monkeypatch, config, args, global_batch):
    common = [
        "fit",
        *(a for c in config.split("+") for a in ("--config", c)),
        f"--trainer.max_steps={STEPS}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        *args,
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{in_tmp / 'one.db'}")
    main(common + [f"--data.init_args.batch_size={global_batch}", "--export.dirpath=out_one"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{in_tmp / 'ddp.db'}", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            shutil.which("synpref"),
            *common,
            f"--data.init_args.batch_size={global_batch // 2}",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--export.dirpath=out_ddp",
        ],
        env=env,
        check=True,
        cwd=in_tmp,
        timeout=300,
    )
    one, ddp = losses(in_tmp / "one.db"), losses(in_tmp / "ddp.db")
    assert len(one) == len(ddp) == STEPS
    assert ddp == pytest.approx(one, rel=1e-4)
    assert len(set(one)) == STEPS  # the losses move: the runs really trained
    return one


def test_sft_ddp_matches_one_process(in_tmp, monkeypatch):
    run_both(
        in_tmp,
        monkeypatch,
        "configs/tiny/sft.yaml",
        ["--data.init_args.max_rows=100", "--data.init_args.max_length=128", "--data.init_args.val_fraction=0"],
        8,
    )


def test_dpo_ddp_matches_one_process(in_tmp, monkeypatch, tiny_model):
    (in_tmp / "artifacts" / "tiny" / "sft").symlink_to(tiny_model)
    run_both(
        in_tmp,
        monkeypatch,
        "configs/tiny/dpo.yaml+configs/tiny/dpo_ultrafeedback.yaml",
        [
            "--data.init_args.max_length=128",
            "--data.init_args.val_sources=null",
            "--data.init_args.sources=[{path: synpref://sample/train_prefs.jsonl, "
            "format: ultrafeedback_binarized, max_rows: 100}]",
        ],
        8,
    )
