"""Lightning callbacks, installed as `synpref.callbacks`: HF export, config and win rates to MLflow."""

from synpref.callbacks.export import HFExportCallback
from synpref.callbacks.mlflow_config import MLflowSaveConfigCallback
from synpref.callbacks.periodic_win_rate import PeriodicWinRate
from synpref.callbacks.prediction_writer import SampleWriter
from synpref.callbacks.sampling_stats import SamplingStatsCallback
from synpref.callbacks.win_rate import WinRateRecorder

__all__ = [
    "HFExportCallback",
    "MLflowSaveConfigCallback",
    "WinRateRecorder",
    "PeriodicWinRate",
    "SampleWriter",
    "SamplingStatsCallback",
]
