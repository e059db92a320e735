"""Lightning callbacks, installed as `synpref.callbacks`: HF export, config and win rates to MLflow."""

from synpref.callbacks.export import HFExportCallback
from synpref.callbacks.mlflow_config import MLflowSaveConfigCallback

__all__ = ["HFExportCallback", "MLflowSaveConfigCallback"]
