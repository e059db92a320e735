"""Results a researcher can trust: records keyed on what a model is, not its path; pipeline files checked before anything runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from synpref.cli import main
from synpref.core import fingerprints
from synpref.core.fingerprints import DIGEST_FILE, model_digest
from tests.conftest import ROOT, read_jsonl
from tests.test_faults import sample_args, user_error, write_jsonl


def test_model_digest_is_stored_once_and_follows_the_content(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    first = model_digest(str(model))
    assert json.loads((model / DIGEST_FILE).read_text())["sha256"] == first
    hashed = []
    real = fingerprints.file_sha256
    monkeypatch.setattr(fingerprints, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    assert model_digest(str(model)) == first and hashed == []  # read back, not hashed again
    (model / "model.safetensors").write_bytes(b"\x01" * 64)  # retrained: same size, other bytes
    second = model_digest(str(model))
    assert second != first and "model.safetensors" in hashed
    (model / "tokenizer.json").write_text("{}")  # a tokenizer added beside the same weights
    assert model_digest(str(model)) not in (first, second)
    assert model_digest("Qwen/Qwen2.5-0.5B") == "hub:Qwen/Qwen2.5-0.5B"  # offline, nothing cached: the name


def _retrain(model: Path) -> None:
    """Other weights at the same path, as a rerun of SFT leaves them."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    lm.save_pretrained(model)


def test_sampling_never_resumes_the_records_of_another_model_at_the_same_path(in_tmp, sample_dir, tiny_model, capsys):
    rows = [r for r in read_jsonl(sample_dir / "train_prefs.jsonl") if len(r["prompt"]) < 150][:4]
    write_jsonl(in_tmp / "prompts.jsonl", [{"prompt": r["prompt"], "prompt_id": r["prompt_id"]} for r in rows])
    shutil.copytree(tiny_model, in_tmp / "sft")
    args = sample_args("run", model="sft", n=4)
    main(args)
    old = (in_tmp / "run" / "samples.jsonl").read_bytes()
    _retrain(in_tmp / "sft")
    # Standalone: a named error saying what changed; nothing is appended to the old records.
    err = user_error(capsys, args)
    assert "holds records made from other inputs or settings (module.model_sha256:" in err
    assert (in_tmp / "run" / "samples.jsonl").read_bytes() == old
    # What `synpref reproduce` passes: the old records are moved aside whole and sampled afresh.
    main([*args, "--model.init_args.on_mismatch=set_aside"])
    (aside,) = (in_tmp / "run" / "stale").iterdir()
    assert (aside / "samples.jsonl").read_bytes() == old
    new = read_jsonl(in_tmp / "run" / "samples.jsonl")
    assert [r["response"] for r in new] != [r["response"] for r in read_jsonl(aside / "samples.jsonl")]
    assert len(new) == 4 * 2


def _pipeline(in_tmp: Path, stages: list[dict], **extra) -> Path:
    path = in_tmp / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {"experiment": "synpref-trust", "state_dir": "artifacts/tiny/pipeline", "stages": stages, **extra}
        )
    )
    return path


SFT = {
    "name": "sft",
    "command": "fit",
    "config": ["configs/tiny/sft.yaml"],
    "args": ["--trainer.max_steps=1", "--trainer.limit_val_batches=0"],
    "outputs": ["artifacts/tiny/sft"],
}


def test_a_stage_that_does_not_write_its_declared_outputs_fails_naming_them(in_tmp, capsys):
    import mlflow

    path = _pipeline(in_tmp, [{**SFT, "outputs": ["artifacts/tiny/sft", "artifacts/tiny/sft/absent.json"]}])
    err = user_error(capsys, ["reproduce", "--config", str(path)])
    assert "stage 'sft' exited 0 but did not write its declared outputs ['artifacts/tiny/sft/absent.json']" in err
    assert not (in_tmp / "artifacts/tiny/pipeline/sft.done.json").exists()  # not marked done
    run_id = json.loads((in_tmp / "artifacts/tiny/pipeline/parent_run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status == "FAILED"


def test_pipeline_names_and_numbers_are_checked_before_anything_runs(in_tmp, capsys):
    path = _pipeline(in_tmp, [SFT])
    err = user_error(capsys, ["reproduce", "--config", str(path), "--force", "[stf]"])
    assert "config key 'force': names unknown stages ['stf']; the stages are ['sft']" in err
    path = _pipeline(in_tmp, [{**SFT, "needs": ["base"]}])
    assert "config key 'stages[0].needs': stage 'sft' needs 'base'" in user_error(
        capsys, ["reproduce", "--config", str(path)]
    )
    # A grid arm taking more samples per prompt than its sampling stage draws: refused by the dry run.
    config = yaml.safe_load((ROOT / "configs/tiny/scaling.yaml").read_text())
    study = {**config["study"], "sweeps": [], "head_to_head": [], "defaults": {"k": 8, "threshold": 0.1}}
    path = _pipeline(in_tmp, config["stages"], study=study)
    err = user_error(capsys, ["reproduce", "--config", str(path), "--dry_run", "true"])
    assert "takes k=8 samples per prompt, but stage 'sample' draws K=4" in err
    assert not (in_tmp / "artifacts/tiny/pipeline/logs").exists()


@pytest.mark.parametrize(
    ("defaults", "key"),
    [({"threshold": "high"}, "threshold"), ({"k": True}, "k"), ({"pairs": 2.5}, "pairs"), ({"rounds": "2"}, "rounds")],
)
def test_malformed_grid_values_are_named(defaults, key):
    from synpref.core.errors import ConfigError
    from synpref.pipeline.grid import Study, arms

    config = yaml.safe_load((ROOT / "configs/tiny/scaling.yaml").read_text())
    study = Study(**{**config["study"], "sweeps": [], "head_to_head": [], "defaults": defaults})
    with pytest.raises(ConfigError, match=rf"study.defaults.{key}': must be"):
        arms(study)


def test_a_moved_project_folder_reads_and_writes_its_own_artifacts(tmp_path, monkeypatch):
    import mlflow

    from synpref.core.tracking import RunTracking, keep_artifacts_relative

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.chdir(old)
    uri = "sqlite:///mlflow.db"
    legacy = mlflow.MlflowClient(uri)  # a store MLflow made alone: absolute paths into `old`
    legacy_run = legacy.create_run(legacy.create_experiment("made-by-mlflow")).info.run_id
    legacy.log_text(legacy_run, "before", "a.txt")
    client = mlflow.MlflowClient(uri)
    run = RunTracking(experiment="made-by-synpref", tracking_uri=uri).start(client)
    assert client.get_run(run).info.artifact_uri == f"mlruns/{client.get_run(run).info.experiment_id}/{run}/artifacts"
    client.log_text(run, "before", "a.txt")
    old.rename(new)
    monkeypatch.chdir(new)
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()  # as in a new process: MLflow caches each run's artifact place
    keep_artifacts_relative(uri)  # what every synpref command does before it logs
    client = mlflow.MlflowClient(uri)
    for run_id in (run, legacy_run):
        assert (
            client.download_artifacts(run_id, "a.txt", str(tmp_path)) and (tmp_path / "a.txt").read_text() == "before"
        )
        client.log_text(run_id, "after", "b.txt")
        assert (new / client.get_run(run_id).info.artifact_uri / "b.txt").read_text() == "after"
    assert not old.exists()  # nothing was written to where the folder used to be


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--samples", "absent.jsonl"], "absent.jsonl: no such file"),
        (["--threshold", "-1"], "config key 'threshold': must be a score gap ≥ 0, got -1"),
        (["--max_pairs_per_prompt", "0"], "config key 'max_pairs_per_prompt': must be ≥ 1"),
        (["--first_prompt", "-1"], "config key 'first_prompt': needs first_prompt ≥ 0"),
    ],
)
def test_pairs_stage_arguments_are_checked(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {"index": 0, "prompt_id": "p", "sample": j, "prompt": [{"role": "user", "content": "q"}], "response": r}
            | {"score": s}
            for j, (r, s) in enumerate([("a", 1.0), ("b", 0.0)])
        ],
    )
    err = user_error(capsys, ["pairs", "--samples", "samples.jsonl", "--output_dir", "out", *args])
    assert expected in err
