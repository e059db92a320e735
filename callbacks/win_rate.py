"""WinRateRecorder: per-prompt records to eval.jsonl, win-rate metrics, params and figures to MLflow."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from synpref.callbacks.shards import OnMismatch, ShardWriter, prompt_settings
from synpref.core.chat import last_user_message
from synpref.core.metrics import WinRate, length_matched, outcome, plot_average_rewards, plot_win_rates
from synpref.core.tracking import mlflow_loggers
from synpref.judges import judge_metrics, metric_name, short_label

log = logging.getLogger(__name__)


class WinRateRecorder(L.Callback):
    """Streams what WinRateModule's predict_step yields to `output_dir/eval.jsonl` batch by batch,
    aggregates a WinRate metric, and at the end logs metrics, n_prompts, eval.jsonl and two PNGs
    to the MLflow run (WinRateModule attaches it and logs the run's other params itself).

    Metrics are `eval/win_rate`, `eval/win_rate_ci_low`, ... (one chart section in the MLflow UI,
    the same names as PeriodicWinRate's during training, which records each of its evaluations
    through a recorder of its own: `open`, `add`, `finish`). Records go through a `ShardWriter`
    (one fsynced shard per process under `parts/`); rank 0 merges them into eval.jsonl, ordered
    by prompt index, so one process and DDP give the same file. A killed run resumes: the prompts
    already on disk are not generated again (`has_all`), provided `settings` and the prompt set
    are unchanged (`run.json`).

    Args:
        output_dir: where eval.jsonl, parts/ and run.json go (None: a temporary folder).
        tie_tolerance, length_match_ratio: the WinRate metric's (synpref.core.metrics).
        figures: log win_rate.png and avg_reward.png.
        settings: what fixes the records (WinRateModule.run_params()); run.json keys resume on it,
            and its policy_name and baseline_name label the figures.
        overwrite: start afresh instead of resuming.
        on_mismatch: records of other settings or prompts: `error`, or `set_aside` (see ShardWriter).
        self_judged: judge label -> True when that judge labelled the policy's training pairs.
        samples_per_prompt: records per prompt index (a prompt is done once all are on disk).
        seed: the seed of the bootstrap intervals computed from the merged records.
        prefix: of the metric names; param_prefix: of the param names.
    """

    def __init__(
        self,
        output_dir: Optional[str] = None,
        tie_tolerance: float = 0.0,
        length_match_ratio: float = 0.1,
        figures: bool = True,
        settings: Optional[dict] = None,
        overwrite: bool = False,
        on_mismatch: OnMismatch = "error",
        self_judged: Optional[dict] = None,
        samples_per_prompt: int = 1,
        seed: int = 0,
        prefix: str = "eval/",
        param_prefix: str = "",
    ):
        self.output_dir = output_dir
        self.metric_args = {"tie_tolerance": tie_tolerance, "length_match_ratio": length_match_ratio}
        self.figures = figures
        self.settings, self.overwrite, self.on_mismatch = settings or {}, overwrite, on_mismatch
        self.self_judged = self_judged or {}
        self.samples_per_prompt, self.seed = samples_per_prompt, seed
        self.prefix, self.param_prefix = prefix, param_prefix
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._shards: Optional[ShardWriter] = None
        self._metric: Optional[WinRate] = None
        self._bad_scores = 0  # response pairs this process dropped (on_bad_score=skip)

    # -- records in, metrics and artifacts out ---------------------------------------------------
    def _dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="synpref-eval-")
        return Path(self._tmp.name)

    def open(self, trainer: L.Trainer, subdir: str = "", settings: Optional[dict] = None, device=None) -> None:
        """Shards under `<dir>/<subdir>`, resumed when `settings` (what fixes the records) match, else
        fresh; the metric on `device` (None: moved at predict start)."""
        outputs = ("eval.jsonl", "win_rate.png", "avg_reward.png")
        self._shards = ShardWriter(
            self._dir() / subdir, settings, self.overwrite, outputs, self.samples_per_prompt, self.on_mismatch
        )
        self._shards.open(trainer)
        self._metric = WinRate(**self.metric_args)
        if device is not None:
            self._metric.to(device)
        self._bad_scores = 0

    def has_all(self, indices) -> bool:
        """Every prompt of a batch is on disk already (a resumed run skips it)."""
        return self._shards is not None and self._shards.has_all(indices)

    def add(self, records: list[dict], bad_scores: int = 0) -> None:
        """Write a batch's records (outcome and length match added, fsynced) and update the metric;
        `bad_scores` response pairs of the batch were dropped for a reward that was not a finite float."""
        self._bad_scores += bad_scores
        ratio, tol = self.metric_args["length_match_ratio"], self.metric_args["tie_tolerance"]
        for r in records:
            r["outcome"] = outcome(r["policy_reward"], r["baseline_reward"], tol)
            r["length_matched"] = length_matched(r["policy_length"], r["baseline_length"], ratio)
        self._update(self._shards.write([readable_order(r) for r in records]))

    def _update(self, records: list[dict]) -> None:
        if records:
            self._metric.update(
                [r["policy_reward"] for r in records],
                [r["baseline_reward"] for r in records],
                [r["policy_length"] for r in records],
                [r["baseline_length"] for r in records],
            )

    def finish(
        self, trainer: L.Trainer, params: Optional[dict], step: int, subdir: str = "", labels: Optional[dict] = None
    ) -> dict:
        """Close the shard, aggregate across processes, merge shards and log (rank 0): the metrics
        at `step`, and `params` (None: none) with n_prompts added; `labels` name the figures' models."""
        self._shards.close()
        metrics = self._metric.compute()  # all ranks: torchmetrics all-reduces the sum states
        bad = torch.tensor(float(self._bad_scores), device=self._metric.device)
        bad_scores = int(trainer.strategy.reduce(bad, reduce_op="sum").item())
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            path, _ = self._shards.merge("eval.jsonl")
            # Length control, clustering by prompt and further judges need every record: read them back.
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            metrics = {
                **metrics,
                **judge_metrics(records, **self.metric_args, self_judged=self.self_judged, seed=self.seed),
            }
            if bad_scores:
                metrics["dropped/bad_scores"] = float(bad_scores)
                log.warning(
                    "%sdropped/bad_scores: %d response pairs left out of the win rate, a reward was not a finite float (on_bad_score=skip)",
                    self.prefix,
                    bad_scores,
                )
            if params is not None:
                params = {**params, "n_prompts": int(metrics["n_prompts"])}
            log.info(
                "%swin rate %.3f [%.3f, %.3f] over %d prompts (%s)",
                self.prefix,
                metrics["win_rate"],
                metrics["win_rate_ci_low"],
                metrics["win_rate_ci_high"],
                int(metrics["n"]),
                path,
            )
            self._log(trainer, metrics, params or {}, step, path, subdir, labels or {})
        trainer.strategy.barrier()
        self._shards.release()
        return metrics

    def _log(
        self, trainer: L.Trainer, metrics: dict, params: dict, step: int, jsonl: Path, subdir: str, labels: dict
    ) -> None:
        from mlflow.entities import Metric, Param

        files = [jsonl]
        if self.figures and metrics["n"]:
            files += self._plot(metrics, labels, jsonl.parent)
        loggers = mlflow_loggers(trainer)
        if not loggers:
            log.warning("no MLFlowLogger on the trainer: win-rate metrics only in the log and %s", jsonl.parent)
        for logger in loggers:
            client, run_id = logger.experiment, logger.run_id
            stamp = int(1000 * time.time())
            values = [
                Metric(metric_name(self.prefix, k), float(v), stamp, step)
                for k, v in metrics.items()
                if math.isfinite(v)
            ]
            client.log_batch(run_id, metrics=values)
            if params:
                client.log_batch(run_id, params=[Param(self.param_prefix + k, str(v)) for k, v in params.items()])
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path=subdir or None)
            # The same records as an MLflow table: the artifact viewer shows them in columns.
            if metrics["n"]:
                table = eval_table(jsonl, short_label(str(self.settings.get("reward") or "reward")))
                client.log_table(run_id, table, f"{subdir}/eval_table.json" if subdir else "eval_table.json")

    def _plot(self, metrics: dict, labels: dict, out: Path) -> list[Path]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("matplotlib is not installed: win-rate figures skipped (pip install matplotlib)")
            return []
        policy, baseline = str(labels.get("policy_name", "policy")), str(labels.get("baseline_name", "baseline"))
        # One group of bars per judge when there are several, a self-judged one hatched and labelled so.
        labels = [
            k.split("/")[1] for k in metrics if k.count("/") == 2 and k.startswith("eval/") and k.endswith("/win_rate")
        ]
        judged = [
            (f"{policy}\n{label}", {k.split("/")[2]: v for k, v in metrics.items() if k.startswith(f"eval/{label}/")})
            for label in labels
        ]
        marked = [bool(self.self_judged.get(label)) for label in labels]
        plot_win_rates(judged or [(policy, metrics)], out / "win_rate.png", baseline, marked if judged else None)
        plot_average_rewards([(policy, metrics)], out / "avg_reward.png", baseline)
        return [out / "win_rate.png", out / "avg_reward.png"]

    # -- predict time: WinRateModule produces the records ----------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":  # before any model is loaded: a bad output_dir fails in seconds
            data = prompt_settings(trainer.datamodule)
            self.open(
                trainer,
                settings=None if data is None else {"module": {**self.settings, **self.metric_args}, "data": data},
            )

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metric.to(pl_module.device)
        if trainer.is_global_zero:  # a resumed run's records count once, on rank 0
            self._update(list(self._shards.records()))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs:
            self.add(outputs["records"], outputs["bad_scores"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # WinRateModule logged the run's params at predict start; n_prompts is known only now.
        self.finish(trainer, {}, step=0, labels=self.settings)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._shards is not None:
            self._shards.release()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# eval.jsonl's field order: the outcome, rewards and lengths first, the long texts last.
FIRST_FIELDS = (
    "index",
    "sample",
    "outcome",
    "policy_reward",
    "baseline_reward",
    "policy_length",
    "baseline_length",
    "length_matched",
    "step",
    "prompt_id",
)
LAST_FIELDS = ("prompt", "policy_response", "baseline_response")


def readable_order(record: dict) -> dict:
    middle = {k: v for k, v in record.items() if k not in FIRST_FIELDS and k not in LAST_FIELDS}
    return {
        **{k: record[k] for k in FIRST_FIELDS if k in record},
        **middle,
        **{k: record[k] for k in LAST_FIELDS if k in record},
    }


WINNER = {"win": "policy", "loss": "baseline", "tie": "tie"}


def verdicts(record: dict, primary: str) -> dict[str, dict]:
    """label → {policy_reward, baseline_reward, outcome} of every judge of a record (the primary alone
    when it was the only judge, under the label `primary`)."""
    return record.get("judges") or {primary: record}


def eval_table(jsonl: Path, primary: str = "reward") -> dict:
    """eval.jsonl as columns for `MlflowClient.log_table`, read side by side: the prompt (its last
    user message), the baseline's reply, the policy's, then per judge its two scores and its winner
    (`policy`, `baseline`, `tie`; `–` where it gave no verdict), the lengths and the ids."""
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = list(dict.fromkeys(label for r in rows for label in verdicts(r, primary)))
    columns: dict[str, list] = {"index": [], "prompt": [], "baseline_response": [], "policy_response": []}
    columns.update({f"{label}/{k}": [] for label in labels for k in ("baseline", "policy", "winner")})
    tail = [
        k
        for k in ("baseline_length", "policy_length", "length_matched", "sample", "prompt_id")
        if rows and k in rows[0]
    ]
    columns.update({k: [] for k in tail})
    for r in rows:
        for k in ("index", "baseline_response", "policy_response", *tail):
            columns[k].append(r.get(k))
        columns["prompt"].append(last_user_message(r.get("prompt")))
        judged = verdicts(r, primary)
        for label in labels:
            v = judged.get(label) or {}
            columns[f"{label}/baseline"].append(v.get("baseline_reward"))
            columns[f"{label}/policy"].append(v.get("policy_reward"))
            columns[f"{label}/winner"].append(WINNER.get(v.get("outcome"), "–"))
    return columns
