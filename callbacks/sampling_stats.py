"""Log what sampling produced to MLflow: counts, score spread, a gap histogram, pairs kept vs threshold."""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from itertools import groupby
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from synpref.pairs import kept_vs_threshold, select_pair, threshold_grid

log = logging.getLogger(__name__)


def summarize(samples_path: Path, threshold: float) -> tuple[dict[str, float], list[float]]:
    """Counts and score moments from samples.jsonl (streamed, grouped by prompt), and every candidate gap."""
    stats = {"prompts": 0, "samples": 0, "pairs": 0, "dropped_ties": 0, "dropped_below_threshold": 0, "dropped_identical": 0, "dropped_empty": 0}
    total = total_sq = tokens = 0.0
    gaps: list[float] = []
    with open(samples_path, encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip())
        for _, group in groupby(rows, key=lambda r: r["index"]):
            group = list(group)
            scores = [r["score"] for r in group]
            stats["prompts"] += 1
            stats["samples"] += len(group)
            total += sum(scores)
            total_sq += sum(s * s for s in scores)
            tokens += sum(r["num_tokens"] for r in group)
            pair, reason, gap = select_pair([r["response"] for r in group], scores, threshold)
            if pair is not None:
                stats["pairs"] += 1
            else:
                stats[f"dropped_{reason}"] += 1
            if reason not in ("ties", "identical", "empty"):
                gaps.append(gap)
    n = max(1, stats["samples"])
    mean = total / n
    stats.update(score_mean=mean, score_std=math.sqrt(max(0.0, total_sq / n - mean * mean)),
                 mean_new_tokens=tokens / n, threshold=threshold,
                 gap_mean=sum(gaps) / len(gaps) if gaps else 0.0)
    return {k: float(v) for k, v in stats.items()}, gaps


class SamplingStatsCallback(L.Callback):
    """After the SampleWriter has merged, log `sampling/*` metrics and three artifacts to the MLflow run:
    `sampling/gap_histogram.png`, `sampling/pairs_vs_threshold.csv` and `.png`.

    Args:
        output_dir: where samples.jsonl is; None = the SampleWriter's output_dir.
        bins: histogram bins.
    """

    def __init__(self, output_dir: Optional[str] = None, bins: int = 30):
        self.output_dir, self.bins = output_dir, bins

    def _dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        from synpref.callbacks.prediction_writer import SampleWriter

        writers = [c for c in trainer.callbacks if isinstance(c, SampleWriter)]
        if not writers:
            raise ValueError("SamplingStatsCallback needs output_dir or a SampleWriter callback")
        return writers[0].output_dir

    @rank_zero_only
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        threshold = float(getattr(pl_module, "threshold", 0.0))
        stats, gaps = summarize(self._dir(trainer) / "samples.jsonl", threshold)
        if getattr(pl_module, "generate_seconds", 0) > 0:
            # This process's own sampling speed (rank 0; skipped batches of a resumed run excluded).
            stats["generate_tokens_per_sec"] = pl_module.generated_tokens / pl_module.generate_seconds
        # Prompts the data module dropped (too long, duplicates, held out) are counted here too.
        for reason, n in (getattr(trainer.datamodule, "drop_counts", None) or {}).items():
            stats[f"dropped_prompts_{reason.replace(':', '_').replace(' ', '_')}"] = float(n)
        log.info("sampling: %s", {k: round(v, 4) for k, v in stats.items()})
        table = kept_vs_threshold(gaps, threshold_grid(gaps, threshold))
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                client, run_id = logger.experiment, logger.run_id
                for k, v in stats.items():
                    client.log_metric(run_id, f"sampling/{k}", v)
                client.log_param(run_id, "reward", getattr(pl_module.reward, "name", type(pl_module.reward).__name__))
                with tempfile.TemporaryDirectory() as tmp:
                    for path in self.artifacts(Path(tmp), gaps, table, threshold):
                        client.log_artifact(run_id, str(path), "sampling")

    def artifacts(self, out: Path, gaps: list[float], table: list[tuple[float, int]], threshold: float) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(out / "pairs_vs_threshold.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["threshold", "pairs_kept", "fraction_of_prompts_with_gap"])
            for t, kept in table:
                w.writerow([t, kept, kept / len(gaps) if gaps else 0.0])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(gaps, bins=self.bins)
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
        ax.set(xlabel="score gap (best − worst sample)", ylabel="prompts", title="Score gaps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gap_histogram.png", dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([t for t, _ in table], [k for _, k in table], marker=".")
        ax.axvline(threshold, color="red", linestyle="--")
        ax.set(xlabel="gap threshold", ylabel="pairs kept", title="Pairs kept vs threshold")
        fig.tight_layout()
        fig.savefig(out / "pairs_vs_threshold.png", dpi=100)
        plt.close(fig)
        return [out / "gap_histogram.png", out / "pairs_vs_threshold.csv", out / "pairs_vs_threshold.png"]
