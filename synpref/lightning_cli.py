"""SynprefCLI: LightningCLI with MLflow as the default logger, the config in the run, the export as a group."""

from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from synpref.callbacks import HFExportCallback, MLflowSaveConfigCallback
from synpref.console import verbose
from synpref.tracking import DEFAULT_EXPERIMENT, experiment_id, mlflow_loggers, tracking_uri


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
        super().instantiate_classes()
        if not verbose():  # the parameter table is chatter beside the progress bar (`--verbose` shows it)
            self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, ModelSummary)]
        # Made here, before the logger makes it: a relative store keeps its artifact paths relative.
        for logger in mlflow_loggers(self.trainer):
            experiment_id(logger._mlflow_client, logger._experiment_name, logger._tracking_uri or tracking_uri())
