"""`synpref reproduce`: run the paper's stages in order through the same CLI, skipping finished ones."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from synpref.cli import register, tracking_uri as default_tracking_uri
from synpref.services import Service, for_stages

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One `synpref <command> --config ...` run.

    Args:
        name: stage name; also its MLflow run name.
        command: the LightningCLI subcommand.
        config: config files, composed in order.
        args: extra command-line overrides (`--trainer.max_steps=10`).
        outputs: files that exist only once the stage has completed (e.g. the export's
            config.json); the stage is skipped when they all exist and its done-marker does.
    """

    name: str
    command: Literal["fit", "validate", "test", "predict"]
    config: list[str]
    args: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _marker(state_dir: Path, stage: Stage) -> Path:
    return state_dir / f"{stage.name}.done.json"


def is_done(state_dir: Path, stage: Stage) -> bool:
    """Finished: its marker was written after a zero exit and every declared output still exists."""
    return _marker(state_dir, stage).exists() and all(Path(p).exists() for p in stage.outputs)


def _parent_run(client, experiment: str, state_dir: Path, run_name: str) -> str:
    """The pipeline's parent MLflow run: created once, reused when the command runs again."""
    saved = state_dir / "parent_run.json"
    if saved.exists():
        return json.loads(saved.read_text())["run_id"]
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name=run_name, tags={"synpref.stage": "pipeline"}).info.run_id
    saved.write_text(json.dumps({"run_id": run_id, "experiment": experiment}))
    return run_id


def run_stage(stage: Stage, experiment: str, uri: str, parent_run_id: str) -> float:
    """Run a stage in its own process (a clean torch/Lightning state, any strategy); seconds taken."""
    cmd = [sys.executable, "-m", "synpref", stage.command]
    for cfg in stage.config:
        cmd += ["--config", cfg]
    cmd += [
        f"--trainer.logger.init_args.experiment_name={experiment}",
        f"--trainer.logger.init_args.tracking_uri={uri}",
        f"--trainer.logger.init_args.run_name={stage.name}",
        "--trainer.logger.init_args.tags=" + json.dumps({"mlflow.parentRunId": parent_run_id, "synpref.pipeline_stage": stage.name}),
        *stage.args,
    ]
    log.info("stage %s: %s", stage.name, " ".join(cmd[2:]))
    start = time.perf_counter()
    result = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    if result.returncode != 0:
        raise SystemExit(f"stage {stage.name!r} failed with exit code {result.returncode}; rerun the same "
                         f"command to resume (finished stages are skipped)")
    return time.perf_counter() - start


@register("reproduce", "run a pipeline config (SFT → sample → DPO ×2 → eval → table), skipping finished stages")
def reproduce(
    stages: list[Stage],
    experiment: str = "synpref",
    tracking_uri: Optional[str] = None,
    state_dir: str = "artifacts/pipeline",
    run_name: str = "pipeline",
    comparison_csv: Optional[str] = None,
    force: list[str] = [],
    build_tiny_model: Optional[str] = None,
    services: list[Service] = [],
) -> str:
    """Run `stages` in order; each is its own MLflow run, all children of one parent run.

    Args:
        stages: the stages, in order (see configs/paper.yaml).
        experiment: MLflow experiment holding every run of the pipeline.
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db.
        state_dir: where done-markers and the parent run id live.
        run_name: the parent run's name.
        comparison_csv: where the final table is written as CSV (default: state_dir/comparison.csv).
        force: stage names to run again even if finished.
        build_tiny_model: for the offline tiny configs: build the tiny model at this path first
            (skipped when it exists).
        services: servers some stages need (e.g. `transformers serve` for served generation):
            started before the first stage needing one runs, stopped after the last, and on
            failure, Ctrl-C or SIGTERM (synpref.services).
    """
    import mlflow

    from synpref.compare import compare

    if build_tiny_model:
        from synpref.cli import build_tiny

        build_tiny(build_tiny_model)
    uri = tracking_uri or default_tracking_uri()
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    parent = _parent_run(client, experiment, state, run_name)
    with for_stages(services, [s.name for s in stages], state) as servers:
        for stage in stages:
            if is_done(state, stage) and stage.name not in force:
                log.info("stage %s: already complete, skipped", stage.name)
                continue
            servers.need(stage.name)
            seconds = run_stage(stage, experiment, uri, parent)
            _marker(state, stage).write_text(json.dumps({"stage": stage.name, "seconds": round(seconds, 1)}))
            client.log_metric(parent, f"stage_seconds/{stage.name}", seconds)
            log.info("stage %s: done in %.0f s", stage.name, seconds)
    csv = comparison_csv or str(state / "comparison.csv")
    # compare() logs the table (win_rates.md), the CSV and the figures to the parent run.
    table = compare(experiment, tracking_uri=uri, csv=csv, parent_run_id=parent, figures_dir=str(state))
    figures = sorted({str(png) for stage in stages for out in stage.outputs for png in Path(out).parent.glob("*.png")})
    figures += sorted(str(p) for p in state.glob("*.png"))
    print("figures:\n" + "\n".join(f"  {p}" for p in figures))
    print(f"MLflow: mlflow ui --backend-store-uri {uri}  (experiment {experiment!r}, parent run {parent})")
    return table
