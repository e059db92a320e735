"""`synpref reproduce` on configs/tiny/paper.yaml, reduced: files, MLflow runs, the parent run, and
what reruns after an edit or a --force (by the dependency graph)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from synpref.cli import main
from synpref.pipeline.reproduce import Stage, is_done
from tests.conftest import ROOT, read_jsonl
from tests.test_faults import user_error

# Fewer steps, prompts, pairs per step and tokens than the quick start so the suite stays short; the
# stages, configs and the command are the real ones. (A tiny DPO step at the config's 16 pairs of 512
# tokens takes seconds on a CPU; nothing below depends on the batch's size or length.)
SMALL_BATCHES = ["--data.init_args.batch_size=4", "--data.init_args.max_length=128"]
REDUCED = {
    "sft": ["--trainer.max_steps=4", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", *SMALL_BATCHES],
    "sample": ["--data.init_args.max_prompts=12", "--model.init_args.decoding.max_new_tokens=12"],
    "dpo_ultrafeedback": [
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        *SMALL_BATCHES,
    ],
    "dpo_synthetic": [
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        *SMALL_BATCHES,
    ],
    "eval_dpo_ultrafeedback": ["--data.init_args.max_prompts=6", "--model.init_args.decoding.max_new_tokens=12"],
    "eval_dpo_synthetic": ["--data.init_args.max_prompts=6", "--model.init_args.decoding.max_new_tokens=12"],
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


def _markers(state):
    return {p.name: p.stat().st_mtime_ns for p in state.glob("*.done.json")}


def test_reproduce_runs_every_stage_once_and_reruns_only_what_is_stale(reduced_pipeline, in_tmp, capsys):
    path, config = reduced_pipeline
    main(["reproduce", "--config", str(path)])
    first = capsys.readouterr().out

    state = in_tmp / config["state_dir"]
    for stage in config["stages"]:
        assert is_done(state, Stage(**stage)), stage["name"]
        assert (state / "logs" / f"{stage['name']}.log").stat().st_size > 0
    for i, name in enumerate(REDUCED, 1):
        assert f"[{i}/6] {name} … running (" in first and f"[{i}/6] {name} … done in " in first
    for model in ("sft", "dpo_ultrafeedback", "dpo_synthetic"):
        assert (in_tmp / "artifacts" / "tiny" / model / "model.safetensors").exists()
    pairs = read_jsonl(in_tmp / "artifacts/tiny/samples/pairs.jsonl")
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    for name in ("dpo_ultrafeedback", "dpo_synthetic"):
        rows = read_jsonl(in_tmp / f"artifacts/tiny/eval/{name}/eval.jsonl")
        assert len(rows) == 6

    client, runs = _runs(config["experiment"])
    parent_id = json.loads((state / "parent_run.json").read_text())["run_id"]
    children = {
        r.data.tags.get("synpref.pipeline_stage"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id
    }
    assert set(children) == set(REDUCED)
    assert "train/loss" in children["sft"].data.metrics
    assert "train/rewards/accuracies" in children["dpo_synthetic"].data.metrics
    for name in ("eval_dpo_ultrafeedback", "eval_dpo_synthetic"):
        assert 0.0 <= children[name].data.metrics["eval/win_rate"] <= 1.0
    # RuleReward labelled the synthetic pairs (sampling's run.json -> DPO param and export -> eval):
    # judging dpo_synthetic with it is self-judged; dpo_ultrafeedback's pairs came from UltraFeedback.
    assert children["dpo_synthetic"].data.params["labelled_by"] == "synpref.rewards.RuleReward"
    synthetic, ultrafeedback = (
        children["eval_dpo_synthetic"].data.metrics,
        children["eval_dpo_ultrafeedback"].data.metrics,
    )
    assert synthetic["eval/RuleReward/self_judged"] == 1.0 and synthetic["eval/clarity/self_judged"] == 0.0
    assert ultrafeedback["eval/self_judged"] == 0.0 and "eval/agreement/RuleReward/clarity" in ultrafeedback
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"win_rates.md", "comparison.csv"} <= artifacts
    assert "| model" in first.lower() and "figures:" in first

    # The parent run alone answers the question: status, params, per-arm metrics, the verdict.
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {
        "pipeline_config": str(path),
        "seed": "0",
        "base_model": "artifacts/tiny/base",
        "reward": "RuleReward",
        "n_prompts": "6",
    }
    for arm in ("dpo_synthetic", "dpo_ultrafeedback"):
        child = children[f"eval_{arm}"].data.metrics
        for name in ("win_rate", "win_rate_ci_low", "win_rate_ci_high"):
            assert parent.data.metrics[f"{name}/{arm}"] == pytest.approx(child[f"eval/{name}"])
        assert parent.data.metrics[f"avg_reward/{arm}"] == pytest.approx(child["eval/avg_reward_policy"])
    # The verdict leads with the independent judge (clarity) and names the self-judged one (RuleReward).
    judged = lambda arm, label: children[f"eval_{arm}"].data.metrics[f"eval/{label}/win_rate"]
    order = sorted(("dpo_synthetic", "dpo_ultrafeedback"), key=lambda arm: -judged(arm, "clarity"))
    cells = lambda label: " vs ".join(
        f"{arm[4:]} {100 * judged(arm, label):.0f}% [{100 * children[f'eval_{arm}'].data.metrics[f'eval/{label}/win_rate_ci_low']:.0f}, "
        f"{100 * children[f'eval_{arm}'].data.metrics[f'eval/{label}/win_rate_ci_high']:.0f}]"
        for arm in order
    )
    assert parent.data.tags["mlflow.note.content"] == (
        f"clarity (independent): {cells('clarity')} vs sft; "
        f"RuleReward (self-judged for synthetic): {cells('RuleReward')}, N = 6"
    )

    # Second run: every stage is up to date, nothing is redone, no new MLflow runs appear, and the
    # finished parent is only read (the same table and verdict, its status and end time unchanged).
    markers = _markers(state)
    main(["reproduce", "--config", str(path)])
    again = capsys.readouterr().out
    assert again.count("… skipped (up to date)") == 6
    assert "verdict: " + parent.data.tags["mlflow.note.content"] in again
    _, runs_again = _runs(config["experiment"])
    assert len(runs_again) == len(runs)
    assert markers == _markers(state)
    assert (client.get_run(parent_id).info.status, client.get_run(parent_id).info.end_time) == (
        "FINISHED",
        parent.info.end_time,
    )

    # SIGTERM to reproduce while a forced stage runs: forwarded, waited for, no orphan, no marker.
    proc = subprocess.Popen(
        [sys.executable, "-m", "synpref", "reproduce", "--config", str(path), "--force", "[dpo_ultrafeedback]"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (stage_pids := _children(proc.pid)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert stage_pids, "the stage process never started"
    assert not (state / "dpo_ultrafeedback.done.json").exists()  # a forced stage loses its marker first
    # One pipeline per state folder: a second one is refused, naming the holder; nothing of it runs.
    assert re.search(
        rf"artifacts/tiny/pipeline is in use by synpref reproduce, process {proc.pid} on ",
        user_error(capsys, ["reproduce", "--config", str(path)]),
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "synpref: interrupted by SIGTERM: stage 'dpo_ultrafeedback' stopped" in err
    assert [pid for pid in stage_pids if Path(f"/proc/{pid}").exists()] == [], "a stage process outlived reproduce"
    # The finished parent is history: the forced run got a parent of its own, which links the runs it
    # reuses without taking them from the parent that made them.
    killed_id = json.loads((state / "parent_run.json").read_text())["run_id"]
    assert killed_id != parent_id and client.get_run(parent_id).info.status == "FINISHED"
    killed = client.get_run(killed_id)
    assert (killed.info.status, killed.data.tags["synpref.failed_stage"]) == ("KILLED", "dpo_ultrafeedback")
    reused = json.loads(killed.data.tags["synpref.reused_runs"])
    kept = ("sft", "sample", "dpo_synthetic", "eval_dpo_synthetic")
    assert reused == {name: children[name].info.run_id for name in kept}
    assert all(client.get_run(r).data.tags["mlflow.parentRunId"] == parent_id for r in reused.values())
    assert [r.info.run_name for r in _runs(config["experiment"])[1] if r.info.status == "RUNNING"] == []

    # What runs next: the killed stage and its evaluation; an edited stage arg: that stage and its
    # dependents; nothing else (a dry run plans only).
    stages = {s["name"]: s for s in config["stages"]}
    stages["dpo_synthetic"]["args"][0] = "--trainer.max_steps=2"
    path.write_text(yaml.safe_dump(config))
    main(["reproduce", "--config", str(path), "--dry_run", "true"])
    assert capsys.readouterr().out.splitlines()[-7:] == [
        "[1/6] sft … up to date",
        "[2/6] sample … up to date",
        "[3/6] dpo_ultrafeedback … would run (last run did not finish)",
        "[4/6] dpo_synthetic … would run (config changed: trainer.max_steps: 3 → 2)",
        "[5/6] eval_dpo_ultrafeedback … would run (last run did not finish; downstream of dpo_ultrafeedback)",
        "[6/6] eval_dpo_synthetic … would run (downstream of dpo_synthetic)",
        "dry run: 4 of 6 stages would run",
    ]

    # For real: a forced DPO arm that completes reruns its evaluation, and nothing of the other arm
    # (listed after it).
    stages["dpo_synthetic"]["args"][0] = "--trainer.max_steps=3"
    path.write_text(yaml.safe_dump(config))
    main(["reproduce", "--config", str(path), "--force", "[dpo_ultrafeedback]"])
    out = capsys.readouterr().out
    assert "[3/6] dpo_ultrafeedback … running (forced; last run did not finish)" in out
    assert "[5/6] eval_dpo_ultrafeedback … running (last run did not finish; downstream of dpo_ultrafeedback)" in out
    assert "[4/6] dpo_synthetic … skipped (up to date)" in out and "[6/6] eval_dpo_synthetic … skipped" in out
    after = _markers(state)
    assert {name for name in after if after[name] != markers[name]} == {
        "dpo_ultrafeedback.done.json",
        "eval_dpo_ultrafeedback.done.json",
    }
    _, runs_third = _runs(config["experiment"])
    latest = {r.data.tags.get("synpref.pipeline_stage"): r for r in sorted(runs_third, key=lambda r: r.info.start_time)}
    assert latest["eval_dpo_ultrafeedback"].info.run_id != children["eval_dpo_ultrafeedback"].info.run_id
    assert latest["eval_dpo_synthetic"].info.run_id == children["eval_dpo_synthetic"].info.run_id
    third_id = json.loads((state / "parent_run.json").read_text())["run_id"]
    assert third_id not in (parent_id, killed_id) and client.get_run(killed_id).info.status == "KILLED"
    parent = client.get_run(third_id)
    assert parent.info.status == "FINISHED" and "synpref.failed_stage" not in parent.data.tags
    assert (
        parent.data.metrics["win_rate/dpo_ultrafeedback"]
        == latest["eval_dpo_ultrafeedback"].data.metrics["eval/win_rate"]
    )
    # ... and its table holds the arm it reused (dpo_synthetic's evaluation, a child of the first parent).
    assert parent.data.metrics["win_rate/dpo_synthetic"] == children["eval_dpo_synthetic"].data.metrics["eval/win_rate"]

    # The issue-22 scenario: a changed DPO setting retrains that arm, and its evaluation is computed
    # afresh for the new model (the old records set aside, never resumed); a forced sampling stage
    # recomputes its samples the same way.
    eval_dir = in_tmp / "artifacts/tiny/eval/dpo_synthetic"
    old_records = json.loads((eval_dir / "run.json").read_text())
    stages["dpo_synthetic"]["args"].append("--model.init_args.beta=0.25")
    path.write_text(yaml.safe_dump(config))
    main(["reproduce", "--config", str(path), "--force", "[sample]"])
    out = capsys.readouterr().out
    assert "[2/6] sample … running (forced)" in out
    assert (
        "[4/6] dpo_synthetic … running (config changed: model.init_args.beta: 0.1 → 0.25; downstream of sample)" in out
    )
    assert "[6/6] eval_dpo_synthetic … running (downstream of dpo_synthetic)" in out
    new_records = json.loads((eval_dir / "run.json").read_text())
    assert new_records["module"]["policy_sha256"] != old_records["module"]["policy_sha256"]
    for folder, merged, stage in (
        (eval_dir, "eval.jsonl", "eval_dpo_synthetic"),
        (in_tmp / "artifacts/tiny/samples", "samples.jsonl", "sample"),
    ):
        (aside,) = (folder / "stale").iterdir()
        assert (aside / merged).exists() and (aside / "run.json").exists() and (folder / merged).exists()
        log = (state / "logs" / f"{stage}.log").read_text()
        assert "resuming" not in log and "computing afresh" in log
    (eval_aside,) = (eval_dir / "stale").iterdir()
    assert json.loads((eval_aside / "run.json").read_text()) == old_records


def _children(pid: int) -> list[int]:
    """`synpref fit` stage processes whose parent is `pid`, from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes() if int(fields[1]) == pid else b""
        except OSError:
            continue
        if b"synpref\0fit" in cmdline:  # the stage, not a helper process an import may start
            kids.append(int(stat.parent.name))
    return kids


def test_stage_with_missing_output_is_not_done(tmp_path):
    stage = Stage(name="sft", command="fit", config=["x.yaml"], outputs=[str(tmp_path / "model" / "config.json")])
    (tmp_path / "sft.done.json").write_text("{}")
    assert not is_done(tmp_path, stage)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert is_done(tmp_path, stage)
