"""The `synpref` command: LightningCLI (fit/validate/test/predict) plus the extra commands of one table."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from synpref.core.host_memory import prefer_huge_pages, release_freed_memory

prefer_huge_pages()  # before anything imports torch, which reads it once

from synpref.core.console import VERBOSE_ENV, quiet  # noqa: E402
from synpref.core.errors import find_user_error, user_error_message  # noqa: E402
from synpref.core.resources import resolve_config_args  # noqa: E402
from synpref.core.secrets import install as redact_secrets  # noqa: E402
from synpref.core.secrets import redact  # noqa: E402
from synpref.pipeline.invocation import INVOCATION  # noqa: E402

# Imported before main() configures logging, as Lightning expects: it then gives its own loggers a
# handler of their own, so its messages do not go through the root handler main() sets up.
from synpref.pipeline.lightning_cli import SynprefCLI  # noqa: E402

# name -> ("module:function", one-line help). The function is imported only when its command runs
# (nothing here imports a module that imports back), with jsonargparse's CLI, so `--help` and
# `--config` work as they do for the Lightning subcommands.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "build-tiny": ("synpref.presets:build_tiny", "build the tiny offline Qwen2 model used by configs/tiny"),
    "estimate": (
        "synpref.reporting.estimate:estimate",
        "expected peak memory of an SFT or DPO step (--preset/--model, --max_length, ...)",
    ),
    "build-model": (
        "synpref.presets:build_model",
        "build a random model with a preset's config (qwen2.5-0.5b, qwen-vocab-small, ...)",
    ),
    "mirror": (
        "synpref.data.mirror:mirror",
        "write the packaged sample as hub-layout folders (HuggingFaceTB/smoltalk, HuggingFaceH4/ultrafeedback_binarized)",
    ),
    "compare": (
        "synpref.reporting.compare:compare",
        "print the win-rate table (the paper's Table 1) of an MLflow experiment's eval runs",
    ),
    "pairs": (
        "synpref.pipeline.pair_stage:build_pairs",
        "build preference pairs from a sampling run's samples.jsonl by a pair rule (first k samples, max pairs)",
    ),
    "reproduce": (
        "synpref.pipeline.reproduce:reproduce",
        "run a pipeline config (SFT → sample → DPO ×2 → eval → table), rerunning stale stages",
    ),
}


def command(name: str) -> Callable:
    """The function behind an extra command, imported now."""
    module, function = EXTRA_COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def description() -> str:
    other = "; ".join(f"'synpref {k}': {h}" for k, (_, h) in EXTRA_COMMANDS.items())
    return f"synpref: SFT → synthetic preference pairs → DPO → win rates. Other commands: {other}."


def main(args: Optional[Sequence[str]] = None):
    """Entry point of `synpref`; tests call it in-process with a list of arguments.

    A user error (a SynprefError, or a config jsonargparse rejects) prints one `synpref: error:`
    line and exits 2; `--debug` or SYNPREF_DEBUG=1 shows the traceback instead. `--verbose` shows what
    third-party libraries print (synpref.core.console).
    """
    release_freed_memory()  # before any model or batch is allocated
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("SYNPREF_DEBUG", "") not in ("", "0")
    if "--verbose" in argv:  # everything third-party says, here and in a pipeline's stages
        os.environ[VERBOSE_ENV] = "1"
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    INVOCATION[:] = argv
    argv = resolve_config_args(argv)  # `--config synpref://configs/...`: a config shipped in the package
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet()
    # After quiet(), which sets how warnings print: the redaction wraps what is printed last.
    redact_secrets()  # API keys read later are masked in every log record and traceback
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself: without --debug
    try:
        _run(argv, from_sys_argv=args is None)
    except Exception as e:
        message = user_error_message(e)
        if debug or message is None:  # None: not a user error but a bug, whose traceback is wanted
            raise
        print(f"synpref: error: {redact(message)}", file=sys.stderr)
        raise SystemExit(getattr(find_user_error(e), "exit_code", 2)) from None


def _run(argv: list[str], from_sys_argv: bool) -> None:
    from jsonargparse import CLI

    if argv and argv[0] in EXTRA_COMMANDS:
        CLI(command(argv[0]), args=argv[1:], as_positional=False, exit_on_error=False)
        return
    # Returns None: the console script exits 0, and tests read what the run left on disk/MLflow.
    SynprefCLI(args=None if from_sys_argv else argv, description=description())
