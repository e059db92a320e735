"""`synpref reproduce` state: fingerprints and rerun reasons, the graph, a failed stage and its parent run
(tests/test_pipeline.py runs the whole pipeline: reruns, --force, SIGTERM, the finished parent run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import yaml

from synpref.cli import main
from synpref.pipeline.stages import ContentHashes, Stage, check_graph, fingerprint, plan, why_stale
from tests.conftest import ROOT


def _stage(**kw) -> Stage:
    return Stage(**{"name": "dpo", "command": "fit", "config": ["x.yaml"], **kw})


def test_why_stale_names_the_changed_key_input_version_or_output(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    stage = _stage(outputs=[str(out)])
    old = fingerprint({"model.init_args.beta": 0.1, "seed_everything": 0}, {"artifacts/sft": "aaa"})
    assert why_stale(stage, old, old, tmp_path) is None
    new = fingerprint({"model.init_args.beta": 0.2, "seed_everything": 0}, {"artifacts/sft": "aaa"})
    assert why_stale(stage, old, new, tmp_path) == "config changed: model.init_args.beta: 0.1 → 0.2"
    added = fingerprint({**old["config"], "trainer.max_steps": 3}, old["inputs"])
    assert why_stale(stage, old, added, tmp_path) == "config changed: trainer.max_steps: <absent> → 3"
    moved = fingerprint(old["config"], {"artifacts/sft": "bbb"})
    assert why_stale(stage, old, moved, tmp_path) == "input changed: artifacts/sft"
    assert why_stale(stage, {**old, "synpref_version": "0.0.1"}, old, tmp_path).startswith(
        "synpref version changed: 0.0.1 → "
    )
    assert why_stale(stage, {"stage": "dpo", "seconds": 3.0}, old, tmp_path).startswith("marker has no fingerprint")
    assert why_stale(stage, None, old, tmp_path) == "new"
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "dpo.log").write_text("killed")
    assert why_stale(stage, None, old, tmp_path) == "last run did not finish"
    out.rmdir()
    assert why_stale(stage, old, old, tmp_path) == f"output missing: {out}"


def test_needs_must_name_an_earlier_stage():
    check_graph([_stage(name="sft"), _stage(needs=["sft"])])
    with pytest.raises(ValueError, match="stage 'dpo' needs 'eval', which is not an earlier stage"):
        check_graph([_stage(needs=["eval"]), _stage(name="eval")])
    with pytest.raises(ValueError, match="two stages are named 'dpo'"):
        check_graph([_stage(), _stage()])


def test_content_digest_follows_content_not_timestamps(tmp_path):
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    hashes = ContentHashes(tmp_path / "cache.json")
    first = hashes.digest(str(folder))
    os.utime(folder / "config.json", ns=(1, 1))  # touched, same bytes
    assert ContentHashes(tmp_path / "cache.json").digest(str(folder)) == first
    (folder / "sub" / "w.bin").write_bytes(b"\x01" * 10)
    assert hashes.digest(str(folder)) != first
    assert hashes.digest(str(tmp_path / "absent")) is None
    hashes.save()
    assert str((folder / "sub" / "w.bin").resolve()) in json.loads((tmp_path / "cache.json").read_text())


@pytest.mark.parametrize("name", ["configs/paper.yaml", "configs/tiny/paper.yaml"])
def test_pipeline_config_stages_resolve_and_form_a_graph(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    stages = [Stage(**s) for s in yaml.safe_load((ROOT / name).read_text())["stages"]]
    steps = plan(stages, tmp_path, ["sft"], ContentHashes(tmp_path / "hashes.json"))
    assert [why for _, why, _ in steps] == ["forced; new"] + ["new"] * 5
    configs = {stage.name: config["config"] for stage, _, config in steps}
    assert configs["eval_dpo_synthetic"]["model.init_args.policy.name_or_path"].endswith("/dpo_synthetic")
    assert "trainer.logger.init_args.run_name" not in configs["sft"]  # where it logs is not what it computes
    needed = {n for s in stages for n in s.needs}
    assert needed <= {"sft", "sample", "dpo_ultrafeedback", "dpo_synthetic"}


# One real stage; it fails at its model path, after the CLI has started.
SFT_ONE_STEP = {
    "name": "sft",
    "command": "fit",
    "config": ["configs/tiny/sft.yaml"],
    "args": ["--trainer.max_steps=1", "--trainer.limit_val_batches=0"],
    "outputs": ["artifacts/tiny/sft"],
}


def _pipeline(in_tmp: Path, stages: list[dict]) -> Path:
    path = in_tmp / "one_stage.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "experiment": "synpref-state",
                "state_dir": "artifacts/tiny/pipeline",
                "run_name": "one-stage",
                "stages": stages,
            }
        )
    )
    return path


def _parent(in_tmp: Path):
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run_id = json.loads((in_tmp / "artifacts/tiny/pipeline/parent_run.json").read_text())["run_id"]
    return client.get_run(run_id)


def test_failed_stage_names_itself_shows_its_log_and_fails_the_parent(in_tmp, capsys):
    bad = {
        **SFT_ONE_STEP,
        "args": SFT_ONE_STEP["args"] + ["--model.init_args.policy.name_or_path=artifacts/tiny/absent"],
    }
    path = _pipeline(in_tmp, [bad])
    with pytest.raises(SystemExit) as failed:
        main(["reproduce", "--config", str(path)])
    message = str(failed.value.code)
    assert message.startswith("synpref: error: stage 'sft' failed (exit 2)\n")
    log = in_tmp / "artifacts/tiny/pipeline/logs/sft.log"
    tail = [line for line in log.read_text().splitlines() if line.strip()][-3:]
    assert all(line.rstrip() in message for line in tail), message
    assert "artifacts/tiny/absent" in message
    assert (
        "rerun it alone:  synpref fit --config configs/tiny/sft.yaml --trainer.max_steps=1 "
        "--trainer.limit_val_batches=0 --model.init_args.policy.name_or_path=artifacts/tiny/absent"
    ) in message
    assert f"synpref reproduce --config {path}" in message
    assert "Traceback" not in message
    assert not (in_tmp / "artifacts/tiny/pipeline/sft.done.json").exists()
    parent = _parent(in_tmp)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["synpref.failed_stage"] == "sft"
    assert parent.data.tags["mlflow.note.content"] == "stage 'sft' failed (exit 2)"
    assert "[1/1] sft … running (new)" in capsys.readouterr().out
