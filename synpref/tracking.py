"""MLflow at the bottom of the stack: the tracking URI, the run's MLflow loggers, artifact logging."""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "synpref"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
