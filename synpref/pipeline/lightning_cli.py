"""SynprefCLI: LightningCLI with MLflow as the default logger, the config in the run, the export as a group."""

from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from synpref.callbacks import HFExportCallback, MLflowSaveConfigCallback
from synpref.core.console import verbose
from synpref.core.tracking import (
    DEFAULT_EXPERIMENT,
    experiment_id,
    mlflow_loggers,
    store_errors,
    tracking_uri,
)


class SynprefCLI(LightningCLI):
    """LightningCLI with MLflow as the default logger, the config logged to the MLflow run, the HF
    export as the top-level `export` group, and the model path linked to the data's tokenizer."""

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, description: str = "", **kwargs):
        logger = {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {"experiment_name": DEFAULT_EXPERIMENT, "tracking_uri": tracking_uri(), "log_model": False},
        }
        kwargs.setdefault("trainer_defaults", {"logger": logger})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=MLflowSaveConfigCallback,
            save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"description": description, "exit_on_error": False},  # errors reach main()
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HFExportCallback, "export")
        # The tokenizer is the policy's: given once, as the model path.
        parser.link_arguments("model.init_args.policy.name_or_path", "data.init_args.tokenizer_name_or_path")

    def instantiate_classes(self) -> None:
        # First contact with the MLflow store here, before any model loads or step runs: an unusable
        # store is one named error, not a traceback from inside the logger's constructor or the run
        # (where Lightning's failure handling would call the same store again).
        hint = "or run without MLflow: --trainer.logger=false"
        for uri in self._mlflow_uris():
            with store_errors(uri, hint):
                from mlflow import MlflowClient

                MlflowClient(uri).search_experiments(max_results=1)  # opens (creates) the store
        super().instantiate_classes()
        if not verbose():  # the parameter table is chatter beside the progress bar (`--verbose` shows it)
            self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, ModelSummary)]
        for logger in mlflow_loggers(self.trainer):
            uri = logger._tracking_uri or tracking_uri()
            with store_errors(uri, hint):
                # Made here, before the logger makes it: a relative store keeps its artifact paths relative.
                experiment_id(logger._mlflow_client, logger._experiment_name, uri)
                _ = logger.run_id  # creates the run as the run's start would: a read-only store fails here

    def _mlflow_uris(self) -> list[str]:
        """The stores of the configured MLflow loggers."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.get("trainer.logger")
        uris = []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("MLFlowLogger"):
                uris.append(logger.get("init_args.tracking_uri") or tracking_uri())
        return uris
