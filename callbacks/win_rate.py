"""Win rate against the baseline: per-prompt records to eval.jsonl, metrics, params and figures to MLflow."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from synpref.callbacks.shards import ShardWriter, prompt_settings
from synpref.metrics import WinRate, length_matched, outcome, plot_average_rewards, plot_win_rates
from synpref.outputs import check_writable
from synpref.rewards.base import RewardScorer

log = logging.getLogger(__name__)


class WinRateCallback(L.Callback):
    """Streams per-prompt records to `output_dir/eval.jsonl` batch by batch, aggregates a WinRate
    metric, and at the end logs metrics, params, eval.jsonl and two PNGs to the MLflow run.

    Predict time: WinRateModule attaches it (its records and params); metrics are unprefixed
    (`win_rate`, ...). Train time (DPO): set `every_n_steps`, `prompts_path`, `baseline` and
    `reward`; every N optimizer steps and at the end of fit the policy (`pl_module.model`) and the
    baseline answer the prompt set and the same metrics are logged at that step as `eval/win_rate`,
    ... with eval.jsonl and figures under artifacts `eval/step_<N>/`.
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
    ):
        if every_n_steps is not None and (every_n_steps < 1 or not (prompts_path and baseline and reward)):
            raise ValueError("WinRateCallback(every_n_steps=N) needs N >= 1, prompts_path, baseline and reward")
        self.output_dir = output_dir
        self.metric_args = {"tie_tolerance": tie_tolerance, "length_match_ratio": length_match_ratio}
        self.figures = figures
        self.every_n_steps = every_n_steps
        self.prompts = {"path": prompts_path, "split": prompts_split, "max_prompts": max_prompts,
                        "max_prompt_length": max_prompt_length, "batch_size": batch_size}
        self.baseline_path = baseline
        self.reward = reward
        self.decoding = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                         "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.prefix = prefix if prefix is not None else ("eval/" if every_n_steps else "")
        # Predict time: what fixes the records (WinRateModule.eval_params()), also logged as params.
        self.settings, self.overwrite = settings or {}, overwrite
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._shards: Optional[ShardWriter] = None
        self._metric: Optional[WinRate] = None
        self._baseline = self._baseline_tokenizer = self._batches = None
        self._last_step = -1
        self._params_logged = False

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
        self._shards = ShardWriter(self._dir() / subdir, settings, self.overwrite, outputs)
        self._shards.open(trainer)
        self._metric = WinRate(**self.metric_args)

    def has_all(self, indices) -> bool:
        """Every prompt of a batch is on disk already (a resumed run skips it)."""
        return self._shards is not None and self._shards.has_all(indices)

    def add(self, records: list[dict]) -> None:
        """Write a batch's records (outcome and length match added, fsynced) and update the metric."""
        ratio, tol = self.metric_args["length_match_ratio"], self.metric_args["tie_tolerance"]
        for r in records:
            r["outcome"] = outcome(r["policy_reward"], r["baseline_reward"], tol)
            r["length_matched"] = length_matched(r["policy_length"], r["baseline_length"], ratio)
        self._update(self._shards.write(records))

    def _update(self, records: list[dict]) -> None:
        if records:
            self._metric.update([r["policy_reward"] for r in records], [r["baseline_reward"] for r in records],
                                [r["policy_length"] for r in records], [r["baseline_length"] for r in records])

    def _finish(self, trainer: L.Trainer, params: dict, step: int, subdir: str = "") -> dict:
        """Close the shard, aggregate across processes, merge shards and log (rank 0)."""
        self._shards.close()
        metrics = self._metric.compute()  # all ranks: torchmetrics all-reduces the sum states
        if params:
            params = {**params, "n_prompts": int(metrics["n"])}
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            path, _ = self._shards.merge("eval.jsonl")
            log.info("%swin rate %.3f [%.3f, %.3f] over %d prompts (%s)", self.prefix, metrics["win_rate"],
                     metrics["win_rate_ci_low"], metrics["win_rate_ci_high"], int(metrics["n"]), path)
            self._log(trainer, metrics, params, step, path, subdir)
        trainer.strategy.barrier()
        self._shards.release()
        return metrics

    def _log(self, trainer: L.Trainer, metrics: dict, params: dict, step: int, jsonl: Path, subdir: str) -> None:
        from mlflow.entities import Metric, Param

        files = [jsonl]
        if self.figures and metrics["n"]:
            files += self._plot(metrics, params, jsonl.parent)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            log.warning("no MLFlowLogger on the trainer: win-rate metrics only in the log and %s", jsonl.parent)
        for logger in loggers:
            client, run_id = logger.experiment, logger.run_id
            stamp = int(1000 * time.time())
            values = [Metric(self.prefix + k, float(v), stamp, step) for k, v in metrics.items() if math.isfinite(v)]
            client.log_batch(run_id, metrics=values)
            if params:
                client.log_batch(run_id, params=[Param(self.prefix + k, str(v)) for k, v in params.items()])
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path=subdir or None)

    def _plot(self, metrics: dict, params: dict, out: Path) -> list[Path]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("matplotlib is not installed: win-rate figures skipped (pip install matplotlib)")
            return []
        policy = Path(str(params.get("policy", f"step {self._last_step}"))).name
        baseline = Path(str(params.get("baseline", self.baseline_path or "baseline"))).name
        plot_win_rates([(policy, metrics)], out / "win_rate.png", baseline)
        plot_average_rewards([(policy, metrics)], out / "avg_reward.png", baseline)
        return [out / "win_rate.png", out / "avg_reward.png"]

    # -- predict time: WinRateModule produces the records ----------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.every_n_steps and self.output_dir:
            check_writable(self.output_dir)  # before the first step, not at the first evaluation
        if stage == "predict":  # before any model is loaded: a bad output_dir fails in seconds
            data = prompt_settings(trainer.datamodule)
            self._open(trainer, settings=None if data is None else {"module": {**self.settings, **self.metric_args},
                                                                    "data": data})

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metric.to(pl_module.device)
        if trainer.is_global_zero:  # a resumed run's records count once, on rank 0
            self._update(list(self._shards.records()))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs:
            self.add(outputs)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, self.settings, step=0)

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
        from synpref.modules.evaluation import compare_batch

        step = self._last_step = trainer.global_step
        policy, device = pl_module.model, pl_module.device
        self._setup_train_eval(trainer, pl_module)
        was_training = policy.training
        policy.eval()
        subdir = f"eval/step_{step:06d}"
        self._open(trainer, subdir)
        self._metric.to(device)
        try:
            for batch in self._batches[trainer.global_rank::trainer.world_size]:
                records = compare_batch(policy, pl_module.tokenizer, self._baseline, self._baseline_tokenizer,
                                        self.reward, batch["prompt"], self.decoding, seed=self.seed, indices=batch["index"])
                self.add([{"index": i, "prompt_id": pid, "step": step, **r}
                          for i, pid, r in zip(batch["index"], batch["prompt_id"], records)])
        finally:
            policy.train(was_training)
        params = {} if self._params_logged else {"baseline": self.baseline_path, "reward_model": self.reward.name,
                                                 "seed": self.seed, "every_n_steps": self.every_n_steps}
        self._params_logged = True
        return self._finish(trainer, params, step, subdir)

    def _setup_train_eval(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the baseline, the reward and the prompt batches once (plain lists: no DataLoader
        state mixes with training)."""
        if self._baseline is not None:
            return
        from synpref.models import load_tokenizer
        from synpref.models import load_frozen_causal_lm

        self._baseline = load_frozen_causal_lm(self.baseline_path).to(pl_module.device)
        self._baseline_tokenizer = load_tokenizer(self.baseline_path)
        self.reward = self.reward.to(pl_module.device)
        self._batches = load_prompt_batches(self.baseline_path, **self.prompts)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def load_prompt_batches(tokenizer_name_or_path: str, path: str, split: str, max_prompts: int,
                        max_prompt_length: Optional[int], batch_size: int) -> list[dict]:
    """The prompt set as predict batches of PromptDataModule (dicts with prompt, prompt_id, index);
    prompts over `max_prompt_length` tokens are dropped and counted in its log line."""
    from synpref.data import PromptDataModule

    dm = PromptDataModule(tokenizer_name_or_path=tokenizer_name_or_path, path=path, split=split,
                          max_prompts=max_prompts, max_prompt_length=max_prompt_length, batch_size=batch_size)
    dm.setup("predict")
    batches = []
    for batch in dm.predict_dataloader():
        index = [int(i) for i in batch["index"]]
        batches.append({"prompt": batch["prompt"], "prompt_id": list(batch["prompt_id"]), "index": index})
    return batches
