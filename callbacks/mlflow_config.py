"""Log the resolved LightningCLI config to MLflow as an artifact (no log_dir needed), tag the run and experiment."""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from synpref.core.tracking import mlflow_loggers


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Lightning's SaveConfigCallback writes into `trainer.log_dir` and asserts it is set; an
    MLflow logger on a sqlite or http store has no local save_dir, so the config goes to the run
    as `config.yaml` instead. The CLI passes `save_to_log_dir=False`."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = mlflow_loggers(trainer)
        if not loggers:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / self.config_filename
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
            for logger in loggers:
                client = logger.experiment
                client.log_artifact(logger.run_id, str(path))
                client.set_tag(logger.run_id, "synpref.command", getattr(stage, "value", str(stage)))
                set_experiment_kind(client, logger.experiment_id)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A run that fails in the data module's setup (before this callback's setup) still gets its
        # config and command; Lightning then finalizes it as FAILED.
        if not self.already_saved and trainer.is_global_zero:
            self.save_config(trainer, pl_module, trainer.state.fn)
            self.already_saved = True


# MLflow 3 opens an experiment on the page of its kind; untagged ones with no traces may open on the
# GenAI (traces) page. Training runs belong on the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def set_experiment_kind(client, experiment_id: str) -> None:
    """Tag the experiment as model development (runs table) unless someone already chose its kind."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
