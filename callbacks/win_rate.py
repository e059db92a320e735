"""Win rate against the baseline: per-prompt records to eval.jsonl, metrics, params and figures to MLflow."""

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

from synpref.callbacks.shards import ShardWriter, prompt_settings
from synpref.head_to_head import compare_batch
from synpref.judges import judge_metrics, metric_name
from synpref.metrics import WinRate, length_matched, outcome, plot_average_rewards, plot_win_rates
from synpref.outputs import check_writable
from synpref.rewards.base import OnBadScore, RewardScorer
from synpref.tracking import mlflow_loggers

log = logging.getLogger(__name__)


class WinRateCallback(L.Callback):
    """Streams per-prompt records to `output_dir/eval.jsonl` batch by batch, aggregates a WinRate
    metric, and at the end logs metrics, params, eval.jsonl and two PNGs to the MLflow run.

    Metrics are `eval/win_rate`, `eval/win_rate_ci_low`, ... at both times (one chart section in
    the MLflow UI). Predict time: WinRateModule attaches it and logs the run's params, this adds n_prompts.
    Train time (DPO): set `every_n_steps`, `prompts_path`, `baseline` and `reward`; every N
    optimizer steps and at the end of fit the policy (`pl_module.model`) and the baseline answer
    the prompt set, the metrics are logged at that step, eval.jsonl and figures under artifacts
    `eval/step_<N>/`, and the settings once as `eval/baseline_name`, `eval/reward`, ...
    `on_bad_score` (train time; WinRateModule has its own): `skip` leaves a response pair whose
    reward is not a finite float out of the win rate and counts it (`eval/dropped/bad_scores`).
    Records go through a `ShardWriter` (one fsynced shard per process under `parts/`); rank 0
    merges them into eval.jsonl, ordered by prompt index, so one process and DDP give the same
    file. At predict time a killed run resumes: the prompts already on disk are not generated
    again (`has_all`), provided `settings` and the prompt set are unchanged (`run.json`).
    """

    def __init__(
        self,
        output_dir: Optional[str] = None,
        tie_tolerance: float = 0.0,
        length_match_ratio: float = 0.1,
        figures: bool = True,
        every_n_steps: Optional[int] = None,
        prompts_path: Optional[str] = None,
        prompts_split: str = "test_prefs",
        max_prompts: int = 16,
        max_prompt_length: Optional[int] = 512,
        batch_size: int = 8,
        baseline: Optional[str] = None,
        reward: Optional[RewardScorer] = None,
        max_new_tokens: int = 128,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int = 0,
        prefix: Optional[str] = None,
        settings: Optional[dict] = None,
        overwrite: bool = False,
        on_bad_score: OnBadScore = "error",
    ):
        if every_n_steps is not None and (every_n_steps < 1 or not (prompts_path and baseline and reward)):
            raise ValueError("WinRateCallback(every_n_steps=N) needs N >= 1, prompts_path, baseline and reward")
        self.output_dir = output_dir
        self.metric_args = {"tie_tolerance": tie_tolerance, "length_match_ratio": length_match_ratio}
        self.figures = figures
        self.every_n_steps = every_n_steps
        self.prompts = {
            "path": prompts_path,
            "split": prompts_split,
            "max_prompts": max_prompts,
            "max_prompt_length": max_prompt_length,
            "batch_size": batch_size,
        }
        self.baseline_path = baseline
        self.reward = reward
        self.decoding = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
        }
        self.seed, self.on_bad_score = seed, on_bad_score
        self.prefix = "eval/" if prefix is None else prefix
        # Predict time: what fixes the records (WinRateModule.run_params()); run.json keys resume on it.
        self.settings, self.overwrite = settings or {}, overwrite
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._shards: Optional[ShardWriter] = None
        self._metric: Optional[WinRate] = None
        self._baseline = self._baseline_tokenizer = self._batches = None
        self._last_step = -1
        self._params_logged = False
        self._self_judged: dict = {}
        self._bad_scores = 0  # response pairs this process dropped (on_bad_score=skip)

    # -- shared: records in, metrics and artifacts out -------------------------------------------
    def _dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="synpref-eval-")
        return Path(self._tmp.name)

    def _open(self, trainer: L.Trainer, subdir: str = "", settings: Optional[dict] = None) -> None:
        """Shards under `<dir>/<subdir>`: resumed at predict time (`settings` given), fresh during training."""
        outputs = ("eval.jsonl", "win_rate.png", "avg_reward.png")
        per_index = int(self.settings.get("samples_per_prompt", 1))
        self._shards = ShardWriter(self._dir() / subdir, settings, self.overwrite, outputs, per_index)
        self._shards.open(trainer)
        self._metric = WinRate(**self.metric_args)
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

    def _finish(
        self, trainer: L.Trainer, params: dict, step: int, subdir: str = "", labels: Optional[dict] = None
    ) -> dict:
        """Close the shard, aggregate across processes, merge shards and log (rank 0)."""
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
                **judge_metrics(records, **self.metric_args, self_judged=self._self_judged, seed=self.seed),
            }
            if bad_scores:
                metrics["dropped/bad_scores"] = float(bad_scores)
                log.warning(
                    "%s%d response pairs dropped from the win rate: a reward was not a finite float (on_bad_score=skip)",
                    self.prefix,
                    bad_scores,
                )
            if params or not self.every_n_steps:  # predict time: the module logged the other params at its start
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
            self._log(trainer, metrics, params, step, path, subdir, labels or params)
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
                prefix = self.prefix if self.every_n_steps else ""  # train time: apart from the DPO run's own
                client.log_batch(run_id, params=[Param(prefix + k, str(v)) for k, v in params.items()])
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path=subdir or None)
            # The same records as an MLflow table: the artifact viewer shows them in columns.
            if metrics["n"]:
                client.log_table(
                    run_id, eval_table(jsonl), f"{subdir}/eval_table.json" if subdir else "eval_table.json"
                )

    def _plot(self, metrics: dict, params: dict, out: Path) -> list[Path]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("matplotlib is not installed: win-rate figures skipped (pip install matplotlib)")
            return []
        policy = str(params.get("policy_name", f"step {self._last_step}"))
        baseline = str(params.get("baseline_name", Path(self.baseline_path or "baseline").name))
        plot_win_rates([(policy, metrics)], out / "win_rate.png", baseline)
        plot_average_rewards([(policy, metrics)], out / "avg_reward.png", baseline)
        return [out / "win_rate.png", out / "avg_reward.png"]

    # -- predict time: WinRateModule produces the records ----------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.every_n_steps and self.output_dir:
            check_writable(self.output_dir)  # before the first step, not at the first evaluation
        if stage == "predict":  # before any model is loaded: a bad output_dir fails in seconds
            data = prompt_settings(trainer.datamodule)
            self._open(
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
        self._self_judged = getattr(pl_module, "self_judged", {})
        # WinRateModule logged the run's params at predict start; here they only label the figures.
        names = pl_module.run_params() if hasattr(pl_module, "run_params") else {}
        self._finish(trainer, {}, step=0, labels=names)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._shards is not None:
            self._shards.release()

    # -- train time: the policy being trained vs the baseline, every N steps ---------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps and trainer.global_step != self._last_step and not trainer.interrupted:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Policy (pl_module.model) vs baseline on this process's share of the prompt set."""
        step = self._last_step = trainer.global_step
        policy, device = pl_module.model, pl_module.device
        self._setup_train_eval(trainer, pl_module)
        was_training = policy.training
        policy.eval()
        subdir = f"eval/step_{step:06d}"
        self._open(trainer, subdir)
        self._metric.to(device)
        try:
            for batch in self._batches[trainer.global_rank :: trainer.world_size]:
                records, dropped = compare_batch(
                    policy,
                    pl_module.tokenizer,
                    self._baseline,
                    self._baseline_tokenizer,
                    self.reward,
                    batch["prompt"],
                    self.decoding,
                    seed=self.seed,
                    indices=batch["index"],
                    on_bad_score=self.on_bad_score,
                )
                ids = dict(zip(batch["index"], batch["prompt_id"]))
                self.add([{"prompt_id": ids[r["index"]], "step": step, **r} for r in records], dropped)
        finally:
            policy.train(was_training)
        params = (
            {}
            if self._params_logged
            else {
                "baseline_name": Path(self.baseline_path).name,
                "reward": self.reward.name,
                "seed": self.seed,
                "every_n_steps": self.every_n_steps,
            }
        )
        self._params_logged = True
        return self._finish(trainer, params, step, subdir)

    def _setup_train_eval(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the baseline, the reward and the prompt batches once (plain lists: no DataLoader
        state mixes with training)."""
        if self._baseline is not None:
            return
        from synpref.models import load_frozen_causal_lm, load_tokenizer

        self._baseline = load_frozen_causal_lm(self.baseline_path).to(pl_module.device)
        self._baseline_tokenizer = load_tokenizer(self.baseline_path)
        self.reward = self.reward.to(pl_module.device)
        self._batches = load_prompt_batches(self.baseline_path, **self.prompts)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def load_prompt_batches(
    tokenizer_name_or_path: str,
    path: str,
    split: str,
    max_prompts: int,
    max_prompt_length: Optional[int],
    batch_size: int,
) -> list[dict]:
    """The prompt set as predict batches of PromptDataModule (dicts with prompt, prompt_id, index);
    prompts over `max_prompt_length` tokens are dropped and counted in its log line."""
    from synpref.data import PromptDataModule

    dm = PromptDataModule(
        tokenizer_name_or_path=tokenizer_name_or_path,
        path=path,
        split=split,
        max_prompts=max_prompts,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
    )
    dm.setup("predict")
    batches = []
    for batch in dm.predict_dataloader():
        index = [int(i) for i in batch["index"]]
        batches.append({"prompt": batch["prompt"], "prompt_id": list(batch["prompt_id"]), "index": index})
    return batches


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


def eval_table(jsonl: Path) -> dict:
    """eval.jsonl as columns for `MlflowClient.log_table`; the prompt is its last user message."""
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns: dict[str, list] = {k: [] for k in (rows[0] if rows else {})}
    for r in rows:
        for k in columns:
            v = r.get(k)
            if k == "prompt" and isinstance(v, list):
                v = next((m["content"] for m in reversed(v) if m.get("role") == "user"), "")
            columns[k].append(v)
    return columns
