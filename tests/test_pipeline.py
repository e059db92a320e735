"""`synpref reproduce` on configs/tiny/paper.yaml, reduced: files, MLflow runs, metrics, no redo."""

from __future__ import annotations

import json
import os

import mlflow
import pytest
import yaml

from tests.conftest import ROOT, read_jsonl
from synpref.cli import main
from synpref.pipeline import Stage, is_done

# Fewer steps and prompts than the quick start so the suite stays short; the stages, configs and
# the command are the real ones.
REDUCED = {
    "sft": ["--trainer.max_steps=4", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1"],
    "sample": ["--data.init_args.max_prompts=12", "--model.init_args.max_new_tokens=12"],
    "dpo_ultrafeedback": ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1"],
    "dpo_synthetic": ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1"],
    "eval_dpo_ultrafeedback": ["--data.init_args.max_prompts=6", "--model.init_args.max_new_tokens=12"],
    "eval_dpo_synthetic": ["--data.init_args.max_prompts=6", "--model.init_args.max_new_tokens=12"],
}


@pytest.fixture
def reduced_pipeline(in_tmp):
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "paper.yaml").read_text())
    assert [s["name"] for s in config["stages"]] == list(REDUCED)
    for stage in config["stages"]:
        stage["args"] = stage.get("args", []) + REDUCED[stage["name"]]
    path = in_tmp / "paper_reduced.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def _runs(experiment: str):
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_reproduce_runs_every_stage_once_and_skips_on_rerun(reduced_pipeline, in_tmp, capsys):
    path, config = reduced_pipeline
    main(["reproduce", "--config", str(path)])
    first = capsys.readouterr().out

    state = in_tmp / config["state_dir"]
    for stage in config["stages"]:
        assert is_done(state, Stage(**stage)), stage["name"]
    for model in ("sft", "dpo_ultrafeedback", "dpo_synthetic"):
        assert (in_tmp / "artifacts" / "tiny" / model / "model.safetensors").exists()
    pairs = read_jsonl(in_tmp / "artifacts/tiny/samples/pairs.jsonl")
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    for name in ("dpo_ultrafeedback", "dpo_synthetic"):
        rows = read_jsonl(in_tmp / f"artifacts/tiny/eval/{name}/eval.jsonl")
        assert len(rows) == 6

    client, runs = _runs(config["experiment"])
    parent = json.loads((state / "parent_run.json").read_text())["run_id"]
    children = {r.data.tags.get("mlflow.runName"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert set(children) == set(REDUCED)
    assert "train/loss" in children["sft"].data.metrics
    assert "train/rewards/accuracies" in children["dpo_synthetic"].data.metrics
    for name in ("eval_dpo_ultrafeedback", "eval_dpo_synthetic"):
        assert 0.0 <= children[name].data.metrics["eval/win_rate"] <= 1.0
    # RuleReward labelled the synthetic pairs (sampling's run.json -> DPO param and export -> eval):
    # judging dpo_synthetic with it is self-judged; dpo_ultrafeedback's pairs came from UltraFeedback.
    assert children["dpo_synthetic"].data.params["labelled_by"] == "synpref.rewards.RuleReward"
    synthetic, ultrafeedback = children["eval_dpo_synthetic"].data.metrics, children["eval_dpo_ultrafeedback"].data.metrics
    assert synthetic["eval/RuleReward/self_judged"] == 1.0 and synthetic["eval/clarity/self_judged"] == 0.0
    assert ultrafeedback["eval/self_judged"] == 0.0 and "eval/agreement/RuleReward/clarity" in ultrafeedback
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"win_rates.md", "comparison.csv"} <= artifacts
    assert "| model" in first.lower() and "figures:" in first

    # Second run: every stage is complete, nothing is redone, no new MLflow runs appear.
    markers = {p.name: p.stat().st_mtime_ns for p in state.glob("*.done.json")}
    main(["reproduce", "--config", str(path)])
    _, runs_again = _runs(config["experiment"])
    assert len(runs_again) == len(runs)
    assert markers == {p.name: p.stat().st_mtime_ns for p in state.glob("*.done.json")}


def test_stage_with_missing_output_is_not_done(tmp_path):
    stage = Stage(name="sft", command="fit", config=["x.yaml"], outputs=[str(tmp_path / "model" / "config.json")])
    (tmp_path / "sft.done.json").write_text("{}")
    assert not is_done(tmp_path, stage)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert is_done(tmp_path, stage)
