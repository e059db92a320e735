"""Export the trained policy and tokenizer as an HF model directory at the end of fit."""

from __future__ import annotations

import logging
from typing import Optional

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class HFExportCallback(L.Callback):
    """`save_pretrained` to `dirpath` when fit ends (rank 0); the path is tagged on the MLflow run.

    Registered by the CLI as the top-level `export` group: `synpref fit --export.dirpath DIR`.
    """

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.dirpath or not hasattr(pl_module, "export"):
            return
        if trainer.interrupted:
            log.warning("fit was interrupted: not exporting to %s", self.dirpath)
            return
        out = pl_module.export(self.dirpath)
        log.info("exported %s to %s", type(pl_module).__name__, out)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.set_tag(logger.run_id, "synpref.export_dir", str(out.resolve()))
