"""DPO configs and CLI: the data arms set only their data; the tiny config runs and exports."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from synpref.core.models import load_tokenizer
from tests.conftest import ROOT, assert_run_params, read_jsonl


# -- configs and CLI ---------------------------------------------------------------------------
def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("folder", ["configs", "configs/tiny"])
def test_data_arms_set_only_their_data(folder):
    """The paper's "identical except the data": each arm file composed over dpo.yaml sets nothing else."""
    base = flat(yaml.safe_load((ROOT / folder / "dpo.yaml").read_text()))
    for arm in ("dpo_ultrafeedback.yaml", "dpo_synthetic.yaml"):
        keys = set(flat(yaml.safe_load((ROOT / folder / arm).read_text())))
        assert keys == {"data.init_args.sources", "trainer.logger.init_args.run_name", "export.dirpath"}, arm
        assert not keys & set(base), arm
    assert base["model.init_args.loss_type"] == "sigmoid" and base["model.class_path"] == "synpref.modules.DPOModule"


def test_tiny_synthetic_config_runs_and_exports(in_tmp, tiny_model, sample_dir):
    """configs/tiny/dpo.yaml + dpo_synthetic.yaml unmodified, on a pairs.jsonl as `synpref predict` writes it."""
    import mlflow

    from synpref.cli import main

    (in_tmp / "artifacts" / "tiny" / "sft").symlink_to(tiny_model)
    rows = read_jsonl(sample_dir / "train_prefs.jsonl")[:40]
    pairs = in_tmp / "artifacts" / "tiny" / "samples" / "pairs.jsonl"
    pairs.parent.mkdir(parents=True)
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": r["chosen"][:-1],
                    "chosen": r["chosen"][-1:],
                    "rejected": r["rejected"][-1:],
                    "score_chosen": r["score_chosen"],
                    "score_rejected": r["score_rejected"],
                    "prompt_id": r["prompt_id"],
                }
            )
            + "\n"
            for r in rows
        )
    )
    main(
        [
            "fit",
            "--config",
            "configs/tiny/dpo.yaml",
            "--config",
            "configs/tiny/dpo_synthetic.yaml",
            "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.max_length=128",
            "--trainer.log_every_n_steps=1",
        ]
    )
    export = in_tmp / "artifacts" / "tiny" / "dpo_synthetic"
    assert (export / "config.json").exists() and load_tokenizer(str(export)) is not None
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("synpref-tiny").experiment_id])[0]
    assert run.info.run_name == "synthetic·dpo" and run.data.params["pairs"] == "synthetic"
    assert_run_params(run.data.params, "dpo")
    metrics = run.data.metrics
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert f"train/{name}" in metrics and f"val/{name}" in metrics
    assert metrics["zz_data/dropped/train/tie"] == sum(r["score_chosen"] == r["score_rejected"] for r in rows)
