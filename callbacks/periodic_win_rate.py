"""PeriodicWinRate: the policy being trained (DPO) against a baseline, every N optimizer steps and at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L

from synpref.callbacks.win_rate import WinRateRecorder
from synpref.core.outputs import check_writable
from synpref.core.specs import Decoding, ModelSpec
from synpref.head_to_head import compare_batch
from synpref.rewards.base import OnBadScore, RewardScorer


class PeriodicWinRate(L.Callback):
    """Every `every_n_steps` optimizer steps and at the end of fit, the policy being trained
    (`pl_module.model`, `pl_module.tokenizer`) and the `baseline` answer the prompt set, `reward`
    judges both, and the metrics are logged at that step under the evaluation's names
    (`eval/win_rate`, `eval/win_rate_ci_low`, ...), eval.jsonl and figures under artifacts
    `eval/step_<N>/`, and the settings once as `eval/baseline_name`, `eval/reward`, `eval/seed`,
    `eval/every_n_steps`, `eval/n_prompts`. The generate-and-judge path is WinRateModule's
    (`synpref.head_to_head.compare_batch`); each evaluation is recorded by a WinRateRecorder.

    Args:
        every_n_steps: evaluate every N optimizer steps (≥ 1).
        prompts_path, prompts_split, max_prompts, max_prompt_length, batch_size: the prompt set
            (a PromptDataModule's; prompts over max_prompt_length tokens are dropped and counted).
        baseline: the model to compare against (a ModelSpec; `name_or_path`: an SFT export).
        reward: the judge (a RewardScorer by class_path).
        output_dir: where `eval/step_<N>/eval.jsonl` go (None: a temporary folder).
        decoding: a Decoding, the same for both models (max_new_tokens 128 by default).
        tie_tolerance, length_match_ratio, figures: as WinRateModule's.
        on_bad_score: a reward that is not a finite float is an `error` naming the scorer and the
            prompt, or with `skip` the pair is left out and counted (`eval/dropped/bad_scores`).
    """

    def __init__(
        self,
        every_n_steps: int,
        prompts_path: str,
        baseline: ModelSpec,
        reward: RewardScorer,
        output_dir: Optional[str] = None,
        prompts_split: str = "test_prefs",
        max_prompts: int = 16,
        max_prompt_length: Optional[int] = 512,
        batch_size: int = 8,
        decoding: Decoding = Decoding(max_new_tokens=128),
        tie_tolerance: float = 0.0,
        length_match_ratio: float = 0.1,
        figures: bool = True,
        on_bad_score: OnBadScore = "error",
    ):
        if every_n_steps < 1:
            raise ValueError(f"PeriodicWinRate(every_n_steps={every_n_steps}): evaluate every N ≥ 1 steps")
        self.every_n_steps, self.baseline, self.reward = every_n_steps, baseline, reward
        self.baseline_path = baseline.require("PeriodicWinRate.baseline")
        self.output_dir = output_dir
        self.prompts = {
            "path": prompts_path,
            "split": prompts_split,
            "max_prompts": max_prompts,
            "max_prompt_length": max_prompt_length,
            "batch_size": batch_size,
        }
        self.decoding, self.on_bad_score = decoding, on_bad_score
        self.recorder = WinRateRecorder(
            output_dir, tie_tolerance, length_match_ratio, figures, seed=decoding.seed, param_prefix="eval/"
        )
        self._baseline = self._baseline_tokenizer = self._batches = None
        self._last_step = -1
        self._params_logged = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.output_dir:
            check_writable(self.output_dir)  # before the first step, not at the first evaluation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step and not trainer.interrupted:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Policy (pl_module.model) vs baseline on this process's share of the prompt set."""
        step = self._last_step = trainer.global_step
        policy, device = pl_module.model, pl_module.device
        self._load(device)
        was_training = policy.training
        policy.eval()
        subdir = f"eval/step_{step:06d}"
        self.recorder.open(trainer, subdir, device=device)
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
                    indices=batch["index"],
                    on_bad_score=self.on_bad_score,
                )
                ids = dict(zip(batch["index"], batch["prompt_id"]))
                self.recorder.add([{"prompt_id": ids[r["index"]], "step": step, **r} for r in records], dropped)
        finally:
            policy.train(was_training)
        baseline_name = Path(self.baseline_path).name
        params = None
        if not self._params_logged:  # the settings once, beside the DPO run's own params
            params = {
                "baseline_name": baseline_name,
                "reward": self.reward.name,
                "seed": self.decoding.seed,
                "every_n_steps": self.every_n_steps,
            }
            self._params_logged = True
        labels = {"policy_name": f"step {step}", "baseline_name": baseline_name}
        return self.recorder.finish(trainer, params, step, subdir, labels)

    def _load(self, device) -> None:
        """The baseline, the reward and the prompt batches, once (plain lists: no DataLoader
        state mixes with training)."""
        if self._baseline is not None:
            return
        from synpref.core.models import load_frozen_causal_lm, load_tokenizer

        self._baseline = load_frozen_causal_lm(self.baseline).to(device)
        self._baseline_tokenizer = load_tokenizer(self.baseline_path, self.baseline.trust_remote_code)
        self.reward = self.reward.to(device)
        self._batches = load_prompt_batches(self.baseline_path, **self.prompts)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.recorder.on_exception(trainer, pl_module, exception)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.recorder.teardown(trainer, pl_module, stage)


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
