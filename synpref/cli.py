"""The `synpref` command: LightningCLI (fit/validate/test/predict) plus pipeline subcommands."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from synpref.callbacks import HFExportCallback, MLflowSaveConfigCallback
from synpref.errors import find_user_error, user_error_message

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
            parser_kwargs={"description": description(), "exit_on_error": False},  # errors reach main()
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HFExportCallback, "export")
        # The tokenizer is the policy's: given once, as the model path.
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


def build_tiny(
    out: str = "artifacts/tiny/base",
    corpus: Sequence[str] = ("synpref://sample/sft_messages.jsonl",),
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> str:
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

    return str(
        build_tiny_model(out, corpus, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    )


def build_model(
    preset: str,
    out: str,
    corpus: Sequence[str] = ("synpref://sample/sft_messages.jsonl",),
    seed: int = 0,
    dtype: str = "float32",
) -> str:
    """Build a randomly initialised model with a preset's config as an HF directory at `out`.

    Presets (synpref.models.PRESETS): `tiny` (2,048-token vocabulary, 230k parameters),
    `qwen-vocab-small` (Qwen2.5's 151,936-token vocabulary, 4 layers at hidden 256, 43M),
    `qwen-vocab-100m` (6 layers at hidden 512, 101M) and `qwen2.5-0.5b` (Qwen2.5-0.5B's config, 494M).
    The tokenizer is a byte-level BPE trained on `corpus` (2,048 merges' worth of tokens), filled
    with unreachable filler words up to the preset's vocabulary, so every id decodes to text.

    Args:
        preset: tiny, qwen-vocab-small, qwen-vocab-100m or qwen2.5-0.5b.
        out: output HF model directory (kept if it already exists).
        corpus: jsonl files whose messages/prompt text trains the tokenizer.
        seed: weight-initialisation seed.
        dtype: dtype of the saved weights (float32: `dtype: null` in the configs then trains fp32 masters).
    """
    from synpref.models import build_preset_model

    return str(build_preset_model(preset, out, corpus, seed=seed, dtype=dtype))


def estimate(
    stage: str = "dpo",
    preset: Optional[str] = None,
    model: Optional[str] = None,
    max_length: int = 1024,
    batch_size: int = 8,
    precompute_ref_logps: bool = False,
    chunk: int = 256,
    response_fraction: float = 0.5,
    bf16: bool = False,
) -> dict:
    """Print the expected peak memory of one SFT or DPO training step (fp32 master weights, AdamW).

    Built from bytes per parameter and per token (synpref.estimate; calibration in docs/benchmarks.md).

    Args:
        stage: sft or dpo.
        preset: a synpref.models preset (tiny, qwen-vocab-small, qwen-vocab-100m, qwen2.5-0.5b).
        model: an HF model directory or hub id (its config.json is read), instead of a preset.
        max_length: tokens per sequence (every sequence is assumed this long: the padded worst case).
        batch_size: sequences per step (pairs for DPO).
        precompute_ref_logps: DPO without a reference model in memory.
        chunk: logits_chunk_size (0: the LM head over every labelled position at once).
        response_fraction: share of the tokens that are labelled (matters only when chunk is 0).
        bf16: bf16 autocast over fp32 weights.
    """
    from transformers import AutoConfig, Qwen2Config

    from synpref.estimate import Shape, peak_bytes
    from synpref.models import PRESETS

    if (preset is None) == (model is None):
        raise ValueError("give exactly one of --preset or --model")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        tiny = {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        config = Qwen2Config(**{"tie_word_embeddings": True, **(PRESETS[preset] or tiny)})
    else:
        config = AutoConfig.from_pretrained(model)
    shape = Shape.from_config(config)
    terms = peak_bytes(shape, stage, batch_size, max_length, precompute_ref_logps, chunk, response_fraction, bf16)
    print(
        f"{stage} step, {shape.params / 1e6:.0f}M parameters, batch {batch_size} x {max_length} tokens"
        f"{', precomputed reference' if precompute_ref_logps and stage == 'dpo' else ''}, chunk {chunk or 'off'}"
        f"{', bf16 autocast' if bf16 else ''}:"
    )
    for name, value in terms.items():
        print(f"  {name:12s}{value / 1e9:8.2f} GB")
    return {k: round(v / 1e9, 3) for k, v in terms.items()}


# name -> (function, one-line help). Each is run with jsonargparse's CLI, so `--help` and
# `--config` work as they do for the Lightning subcommands.
EXTRA_COMMANDS: dict[str, tuple[Callable, str]] = {
    "build-tiny": (build_tiny, "build the tiny offline Qwen2 model used by configs/tiny"),
    "estimate": (estimate, "expected peak memory of an SFT or DPO step (--preset/--model, --max_length, ...)"),
    "build-model": (build_model, "build a random model with a preset's config (qwen2.5-0.5b, qwen-vocab-small, ...)"),
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
    """Entry point of `synpref`; tests call it in-process with a list of arguments.

    A user error (a SynprefError, or a config jsonargparse rejects) prints one `synpref: error:`
    line and exits 2; `--debug` or SYNPREF_DEBUG=1 shows the traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("SYNPREF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    INVOCATION[:] = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself: without --debug
    try:
        _run(argv, from_sys_argv=args is None)
    except Exception as e:
        message = user_error_message(e)
        if debug or message is None:  # None: not a user error but a bug, whose traceback is wanted
            raise
        print(f"synpref: error: {message}", file=sys.stderr)
        raise SystemExit(getattr(find_user_error(e), "exit_code", 2)) from None


def _run(argv: list[str], from_sys_argv: bool) -> None:
    from jsonargparse import CLI

    _load_extra_commands()
    if argv and argv[0] in EXTRA_COMMANDS:
        fn = EXTRA_COMMANDS[argv[0]][0]
        CLI(fn, args=argv[1:], as_positional=False, exit_on_error=False)
        return
    # Returns None: the console script exits 0, and tests read what the run left on disk/MLflow.
    SynprefCLI(args=None if from_sys_argv else argv)


def _load_extra_commands() -> None:
    """Import the modules that register pipeline subcommands (kept out of import of this module)."""
    import importlib

    for module in ("synpref.compare", "synpref.pipeline", "synpref.pair_stage"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
