"""What a synpref command prints: its own lines, training/sampling/evaluation progress and the warnings that matter; `--verbose` adds the rest."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

VERBOSE_ENV = "SYNPREF_VERBOSE"  # set by `--verbose`; a pipeline's stage processes inherit it

# Third-party warnings a user can do nothing about, each with why it is filtered (message regex, category).
THIRD_PARTY_WARNINGS = [
    # Lightning's pytree helper uses torch's deprecated LeafSpec: Lightning's to fix, harmless here.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # jsonargparse 4.49+ deprecated APIs that Lightning's CLI calls (and first says it warns once per type).
    (r"\s*By default only one JsonargparseDeprecationWarning per type is shown", DeprecationWarning),
    (
        r"\s*(skip_none parameter|``ArgumentParser.add_instantiator``|``instantiate_classes``) was deprecated",
        DeprecationWarning,
    ),
    # MLflow's sqlite store configures SQLAlchemy with the deprecated `noload` loader.
    (r"The ``noload`` loader strategy is deprecated", Warning),
    # MLflow's log_table calls select_dtypes(include=['object']), which pandas 3 warns about.
    (r"For backward compatibility, 'str' dtypes are included by select_dtypes", Warning),
    # Lightning's advice on the logging interval: the tiny stages have fewer batches than it on purpose,
    # and it changes no result (metrics are still logged at the end of each step).
    (r"The number of training batches .* is smaller than the logging interval", UserWarning),
]
# Loggers whose INFO lines are chatter here: Lightning's tips (💡 litlogger, litmodels), accelerator
# and seed notices; MLflow's database set-up.
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic")
# Third-party warnings through logging, and why they are not synpref's to show: torchao, which
# transformers imports when it is installed, reports kernels it cannot load on this machine (synpref
# uses none) and registers enums that torch's pytree now warns about.
UNUSED_LOGGERS = ("torchao", "torch.utils._pytree")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _short_warning(message, category, filename, lineno, line=None) -> str:
    """`warning: <Category>: <message> (<package>)`: no site-packages path, no source line."""
    parts = Path(filename).parts
    where = parts[parts.index("site-packages") + 1] if "site-packages" in parts else Path(filename).stem
    return f"warning: {category.__name__}: {message} ({where})\n"


def quiet() -> None:
    """Unless verbose: third-party chatter off, progress bars of internal steps (HF's `Map`,
    `Filter`, `Loading weights`, `Writing model shards`) off, known third-party warnings filtered,
    other warnings shown without their file path. Lightning's own progress bars (training,
    sampling, scoring, evaluation) stay."""
    if verbose():
        return
    # MLflow sets its logger's level when first imported, from this variable (stages inherit it).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # its artifact downloads: internal
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in UNUSED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message, category in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    warnings.formatwarning = _short_warning
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # "Token indices sequence length is longer than ...": synpref truncates long texts on purpose and
    # counts them (`zz_data/dropped/*`); transformers' other warnings (unused weights, ...) stay.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
