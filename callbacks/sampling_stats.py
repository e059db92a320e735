"""Log what sampling produced to MLflow: counts, score spread, a gap histogram, pairs kept vs threshold."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from synpref.core.pairs import kept_vs_threshold, select_pair, threshold_grid
from synpref.core.tracking import log_artifacts, mlflow_loggers

log = logging.getLogger(__name__)


@dataclass
class GenerationCounters:
    """What this process generated: tokens and seconds (the SamplingModule adds each batch's;
    skipped batches of a resumed run are not counted)."""

    tokens: int = 0
    seconds: float = 0.0


class PairStats:
    """Counts, score moments and candidate gaps of the prompts a merge writes (one select_pair per prompt)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.counts = {
            "prompts": 0,
            "samples": 0,
            "pairs": 0,
            "dropped_ties": 0,
            "dropped_below_threshold": 0,
            "dropped_identical": 0,
            "dropped_empty": 0,
        }
        self.total = self.total_sq = self.tokens = 0.0
        self.gaps: list[float] = []

    def add(self, texts: list[str], scores: list[float], num_tokens: list[int]) -> Optional[tuple[int, int]]:
        """Count one prompt's samples; its (chosen, rejected) sample indices, or None when dropped."""
        self.counts["prompts"] += 1
        self.counts["samples"] += len(scores)
        self.total += sum(scores)
        self.total_sq += sum(s * s for s in scores)
        self.tokens += sum(num_tokens)
        pair, reason, gap = select_pair(texts, scores, self.threshold)
        self.counts["pairs" if pair is not None else f"dropped_{reason}"] += 1
        if reason not in ("ties", "identical", "empty"):
            self.gaps.append(gap)
        return pair

    def result(self) -> tuple[dict[str, float], list[float]]:
        n = max(1, self.counts["samples"])
        mean = self.total / n
        stats = {
            **self.counts,
            "score_mean": mean,
            "score_std": math.sqrt(max(0.0, self.total_sq / n - mean * mean)),
            "mean_new_tokens": self.tokens / n,
            "threshold": self.threshold,
            "gap_mean": sum(self.gaps) / len(self.gaps) if self.gaps else 0.0,
        }
        return {k: float(v) for k, v in stats.items()}, list(self.gaps)


class SamplingStatsCallback(L.Callback):
    """After the SampleWriter has merged, log its pair statistics as `sampling/*` metrics and three
    artifacts to the MLflow run: `sampling/gap_histogram.png`, `sampling/pairs_vs_threshold.csv` and `.png`.

    Args:
        writer: the SampleWriter whose merge produced the statistics.
        generation: the sampling module's GenerationCounters, for `generate_tokens_per_sec`.
        reward: the reward's name, logged as the run's `reward` param.
        bins: histogram bins.
    """

    def __init__(self, writer: "SampleWriter", generation: GenerationCounters, reward: str, bins: int = 30):  # noqa: F821
        self.writer, self.generation, self.reward, self.bins = writer, generation, reward, bins

    @rank_zero_only
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats, gaps = self.writer.stats
        stats = dict(stats)
        threshold = self.writer.threshold
        if self.generation.seconds > 0:
            # This process's own sampling speed (rank 0; skipped batches of a resumed run excluded).
            stats["generate_tokens_per_sec"] = self.generation.tokens / self.generation.seconds
        # Prompts the data module dropped (too long, duplicates, held out) are counted here too.
        for reason, n in trainer.datamodule.drop_counts.items():
            stats[f"dropped_prompts_{reason.replace(':', '_').replace(' ', '_')}"] = float(n)
        log.info("sampling: %s", {k: round(v, 4) for k, v in stats.items()})
        table = kept_vs_threshold(gaps, threshold_grid(gaps, threshold))
        loggers = mlflow_loggers(trainer)
        for logger in loggers:
            client, run_id = logger.experiment, logger.run_id
            for k, v in stats.items():
                client.log_metric(run_id, f"sampling/{k}", v)
            client.log_param(run_id, "reward", self.reward)
        if loggers:
            with tempfile.TemporaryDirectory() as tmp:
                log_artifacts(trainer, self.artifacts(Path(tmp), gaps, table, threshold), "sampling")

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
