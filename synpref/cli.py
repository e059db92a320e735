"""The `synpref` command: LightningCLI (fit/validate/test/predict) plus pipeline subcommands."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from synpref.callbacks import HFExportCallback, MLflowSaveConfigCallback

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "synpref"
# The arguments of the current `main` call (`synpref reproduce` records its config path from them).
INVOCATION: list[str] = []


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class SynprefCLI(LightningCLI):
    """LightningCLI with MLflow as the default logger, the config logged to the MLflow run, the HF
    export as the top-level `export` group, and the model path linked to the data's tokenizer."""

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs):
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
            parser_kwargs={"description": description()},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HFExportCallback, "export")
        # The tokenizer is the policy's: given once, as the model path.
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


def build_tiny(out: str = "artifacts/tiny/base", corpus: Sequence[str] = ("synpref://sample/sft_messages.jsonl",),
               vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> str:
    """Build the tiny offline Qwen2 model (BPE tokenizer trained on `corpus`, ChatML template) at `out`.

    Args:
        out: output HF model directory (kept if it already exists).
        corpus: jsonl files whose messages/prompt text trains the tokenizer.
        vocab_size: BPE vocabulary size.
        hidden_size: model width.
        num_layers: transformer layers.
        seed: weight-initialisation seed.
    """
    from synpref.models import build_tiny_model

    return str(build_tiny_model(out, corpus, vocab_size=vocab_size, hidden_size=hidden_size,
                                num_layers=num_layers, seed=seed))


# name -> (function, one-line help). Each is run with jsonargparse's CLI, so `--help` and
# `--config` work as they do for the Lightning subcommands.
EXTRA_COMMANDS: dict[str, tuple[Callable, str]] = {
    "build-tiny": (build_tiny, "build the tiny offline Qwen2 model used by configs/tiny"),
}



def register(name: str, help_: str) -> Callable[[Callable], Callable]:
    """Add a pipeline subcommand (reproduce, compare, ...) next to fit/validate/test/predict."""

    def wrap(fn: Callable) -> Callable:
        EXTRA_COMMANDS[name] = (fn, help_)
        return fn

    return wrap


def description() -> str:
    other = "; ".join(f"'synpref {k}': {h}" for k, (_, h) in EXTRA_COMMANDS.items())
    return f"synpref: SFT → synthetic preference pairs → DPO → win rates. Other commands: {other}."


def main(args: Optional[Sequence[str]] = None):
    """Entry point of `synpref`; tests call it in-process with a list of arguments."""
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if args is None else args)
    INVOCATION[:] = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _load_extra_commands()
    if argv and argv[0] in EXTRA_COMMANDS:
        fn = EXTRA_COMMANDS[argv[0]][0]
        CLI(fn, args=argv[1:], as_positional=False)
        return
    # Returns None: the console script exits 0, and tests read what the run left on disk/MLflow.
    SynprefCLI(args=None if args is None else argv)


def _load_extra_commands() -> None:
    """Import the modules that register pipeline subcommands (kept out of import of this module)."""
    import importlib

    for module in ("synpref.compare", "synpref.pipeline"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise

