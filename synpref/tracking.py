"""MLflow at the bottom of the stack: the tracking URI, the run's MLflow loggers, artifact logging."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "synpref"
# On a pipeline's parent run: {stage: run id} of the earlier runs it reuses (stages that were up to
# date). They stay children of the parent that made them: history is never re-parented.
REUSED_RUNS_TAG = "synpref.reused_runs"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def mlflow_loggers(trainer) -> list:
    """The trainer's MLflow loggers ([] when the run logs elsewhere or not at all)."""
    # Imported here: the commands that only read MLflow (compare) need no Lightning.
    from lightning.pytorch.loggers import MLFlowLogger

    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def log_artifacts(trainer, paths: Iterable[str | Path], artifact_path: Optional[str] = None) -> None:
    """Each file into every MLflow run of the trainer, under `artifact_path` (None: the run's root)."""
    paths = list(paths)
    for logger in mlflow_loggers(trainer):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


@dataclass
class RunTracking:
    """Where a plain-function command (`synpref pairs`) logs its MLflow run; `synpref reproduce` fills it in.

    Args:
        experiment: MLflow experiment name.
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db.
        run_name: the run's name.
        tags: run tags (the pipeline's parent run id and stage name).
    """

    experiment: str = "synpref"
    tracking_uri: Optional[str] = None
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)

    def start(self, client) -> str:
        """Create the run (and the experiment if new); its id."""
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
        return client.create_run(exp_id, run_name=self.run_name, tags=self.tags).info.run_id


def pipeline_runs(client, parent_run_id: str, query: str = "") -> list:
    """A pipeline's runs, oldest first: the parent's children and the earlier runs it reuses
    (REUSED_RUNS_TAG), those matching `query` (an MLflow filter string) where one is given."""
    import json

    parent = client.get_run(parent_run_id)
    own = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and {query}" if query else "")
    runs = client.search_runs([parent.info.experiment_id], own, max_results=5000)
    reused = list(json.loads(parent.data.tags.get(REUSED_RUNS_TAG, "{}")).values())
    if reused:
        ids = ", ".join(f"'{r}'" for r in reused)
        filter_ = f"attributes.run_id IN ({ids})" + (f" and {query}" if query else "")
        runs += client.search_runs([parent.info.experiment_id], filter_, max_results=5000)
    return sorted(runs, key=lambda r: r.info.start_time)
