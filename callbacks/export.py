"""Export the trained policy and tokenizer as an HF model directory at the end of fit, whole or not at all."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from synpref.core.fingerprints import write_model_digest
from synpref.core.outputs import atomic_dir, check_writable
from synpref.core.tracking import mlflow_loggers

log = logging.getLogger(__name__)


class HFExportCallback(L.Callback):
    """`save_pretrained` to `dirpath` when fit ends (rank 0); its path and content digest are tagged on the MLflow run.

    Before the first step, the folders fit will write are checked (an unwritable one fails in
    seconds, naming it): the export's parent and every ModelCheckpoint folder. A ModelCheckpoint
    without a `dirpath` writes to `<dirpath>_checkpoints/` (without an export:
    `<default_root_dir>/checkpoints/`), not into the logger's folder. The export is written to a
    temporary sibling and renamed into place, replacing an earlier export only once complete.

    Registered by the CLI as the top-level `export` group: `synpref fit --export.dirpath DIR`.
    """

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath = dirpath

    def checkpoint_dir(self, trainer: L.Trainer) -> Path:
        """Where checkpoints go when their callback names no folder."""
        return Path(f"{self.dirpath}_checkpoints") if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Lightning moves checkpoint callbacks last, so their own setup sees the folder set here.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                if callback.dirpath is None:
                    callback.dirpath = str(self.checkpoint_dir(trainer))
                check_writable(callback.dirpath)
        if self.dirpath and hasattr(pl_module, "export"):
            check_writable(Path(self.dirpath).absolute().parent)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.dirpath or not hasattr(pl_module, "export"):
            return
        if trainer.interrupted:
            log.warning("fit was interrupted: not exporting to %s", self.dirpath)
            return
        with atomic_dir(self.dirpath) as tmp:
            pl_module.export(tmp)
            # What the model is, hashed once here: sampling and evaluation key their records on it.
            digest = write_model_digest(tmp)
        out = Path(self.dirpath)
        log.info("exported %s to %s", type(pl_module).__name__, out)
        for logger in mlflow_loggers(trainer):
            logger.experiment.set_tag(logger.run_id, "synpref.export_dir", str(out.resolve()))
            logger.experiment.set_tag(logger.run_id, "synpref.export_sha256", digest)
