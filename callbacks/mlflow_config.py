"""Log the resolved LightningCLI config to MLflow as an artifact (no log_dir needed)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Lightning's SaveConfigCallback writes into `trainer.log_dir` and asserts it is set; an
    MLflow logger on a sqlite or http store has no local save_dir, so the config goes to the run
    as `config.yaml` instead. The CLI passes `save_to_log_dir=False`."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / self.config_filename
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
            for logger in loggers:
                logger.experiment.log_artifact(logger.run_id, str(path))
                logger.experiment.set_tag(logger.run_id, "synpref.stage", stage)
