"""Win rate against the SFT model: generate with policy and baseline, score both, one record per prompt."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch

from synpref.callbacks.shards import OnMismatch
from synpref.core.fingerprints import model_digest
from synpref.core.models import load_frozen_causal_lm, load_tokenizer
from synpref.core.specs import Decoding, ModelSpec
from synpref.generators import Generator
from synpref.head_to_head import compare_batch
from synpref.judges import Judge, judge_labels, read_provenance, self_judged
from synpref.modules.base import log_data_drops, log_data_lineage, log_run_params, model_name
from synpref.rewards.base import OnBadScore, RewardScorer, judge_identity


class WinRateModule(L.LightningModule):
    """`synpref predict`: policy vs baseline on held-out prompts, judged by `reward` (and `judges`).

    `policy` and `baseline` are ModelSpecs (`name_or_path`: the candidate and the SFT export;
    `dtype`, `attn_implementation`, `trust_remote_code`). `decoding` (a Decoding) is the same for
    both models and, per batch, so is the seed (`decoding.seed` + the batch's first prompt index),
    so a batch's result does not depend on what ran before it. The default is the paper's
    sampling (top-k 50, temperature 0.7, max_new_tokens 256); `do_sample: false` is greedy.
    predict_step returns one record per prompt; the WinRateRecorder this module attaches writes
    them to `output_dir/eval.jsonl`, aggregates the WinRate metric and logs to MLflow. A killed
    run resumes when rerun (prompts on disk are not generated again); `overwrite: true` starts afresh.
    Records are keyed on both models by content (weights, config, tokenizer: `synpref_digest.json`
    beside an export), every judge's identity and the settings: records of anything else are never
    resumed; `on_mismatch` says what happens to them, an `error` naming what changed, or
    `set_aside` (moved to output_dir/stale/<time>/, evaluated afresh; `synpref reproduce` sets it).

    `generator` (e.g. `synpref.generators.OpenAIGenerator`) serves the policy, and the baseline too
    unless `baseline_generator` is given (one server answering both model names, as
    `transformers serve` does; vLLM serves one model per process: give each its own); a served
    model is not loaded here. None = in-process generation.

    `judges`: more scorers (RewardScorer or PairwiseJudge by class_path); each gets its own win
    rate, interval and averages (`eval/<label>/...`), and every pair of judges its agreement and
    Cohen's κ; `reward` (or, without it, the first judge, which must then be a RewardScorer) stays
    the primary judge of the unprefixed metrics. A judge that is the scorer which labelled the
    policy's training pairs (the export's synpref_provenance.json) is marked self-judged.
    `samples_per_prompt`: n answers per model per prompt (sample k of both models shares its
    random numbers); the interval is then a cluster bootstrap over prompts.
    `on_bad_score`: a reward that is not a finite float (NaN, None, a string) is an `error` naming
    the scorer and the prompt, or with `skip` that response pair is left out of the win rate (not a
    loss, not a tie), counted, logged and recorded as the metric `eval/dropped/bad_scores`.
    """

    def __init__(
        self,
        policy: ModelSpec,
        baseline: ModelSpec,
        reward: Optional[RewardScorer] = None,
        output_dir: Optional[str] = None,
        decoding: Decoding = Decoding(max_new_tokens=256),
        tie_tolerance: float = 0.0,
        length_match_ratio: float = 0.1,
        figures: bool = True,
        overwrite: bool = False,
        generator: Optional[Generator] = None,
        baseline_generator: Optional[Generator] = None,
        judges: Optional[list[Judge]] = None,
        samples_per_prompt: int = 1,
        on_bad_score: OnBadScore = "error",
        on_mismatch: OnMismatch = "error",
    ):
        super().__init__()
        # The reward object is not a hyperparameter (it may hold a model); its name is logged.
        # logger=False: MLflow gets run_params() (stable names), not every argument.
        self.save_hyperparameters(ignore=["reward", "generator", "baseline_generator", "judges"], logger=False)
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt={samples_per_prompt}: at least 1 answer per model per prompt")
        judges = ([reward] if reward is not None else []) + list(judges or [])
        if not judges or not isinstance(judges[0], RewardScorer):
            raise ValueError("WinRateModule needs `reward` (a RewardScorer), or `judges` whose first is a RewardScorer")
        if baseline_generator is None and getattr(generator, "model", None):
            raise ValueError(
                f"generator.model={generator.model!r} names one served model: give the baseline its "
                f"own baseline_generator (or leave generator.model unset to ask by each model's path)"
            )
        self.generators = (generator, baseline_generator or generator)
        self.specs = (policy, baseline)
        self.model_name_or_path = policy.require("model.init_args.policy")
        self.baseline_name_or_path = baseline.require("model.init_args.baseline")
        self.reward = judges[0]
        # One judge keeps the records as they were; several add each judge's verdict by label.
        self.judges = judges if len(judges) > 1 else []
        self.judge_labels = judge_labels(judges)
        self.self_judged = self_judged(judges, self.judge_labels, read_provenance(self.model_name_or_path))
        self.output_dir = output_dir
        self.decoding = decoding
        self.tokenizer = load_tokenizer(self.model_name_or_path, policy.trust_remote_code)
        self.baseline_tokenizer = load_tokenizer(self.baseline_name_or_path, baseline.trust_remote_code)
        self.model: Optional[torch.nn.Module] = None
        self.baseline: Optional[torch.nn.Module] = None
        # Set by configure_callbacks: it knows which prompts a resumed run already has on disk.
        self.recorder = None

    def configure_model(self) -> None:
        # A served model is not loaded here: its server holds it.
        if self.model is None and self.generators[0] is None:
            self.model = load_frozen_causal_lm(self.specs[0])
        if self.baseline is None and self.generators[1] is None:
            self.baseline = load_frozen_causal_lm(self.specs[1])

    def configure_callbacks(self):
        from synpref.callbacks.win_rate import WinRateRecorder

        hp = self.hparams
        self.recorder = WinRateRecorder(
            output_dir=self.output_dir,
            tie_tolerance=hp.tie_tolerance,
            length_match_ratio=hp.length_match_ratio,
            figures=hp.figures,
            settings=self.record_settings(),
            overwrite=hp.overwrite,
            on_mismatch=hp.on_mismatch,
            self_judged=self.self_judged,
            samples_per_prompt=hp.samples_per_prompt,
        )
        return [self.recorder]

    def on_predict_start(self) -> None:
        self.reward = self.reward.to(self.device)
        self.judges = [j.to(self.device) for j in self.judges]
        # Prompts dropped (too long, duplicates, bad rows) shrink N: the run says by how many.
        log_data_drops(self)
        log_run_params(self)  # n_prompts, the number evaluated, comes from the WinRateRecorder at the end
        models = {
            "synpref.policy_run_id": self.model_name_or_path,
            "synpref.baseline_run_id": self.baseline_name_or_path,
        }
        log_data_lineage(self, models, context="evaluation")

    def run_params(self) -> dict:
        """The settings that define this comparison, as MLflow params (no secrets: names and paths)."""
        return {
            "policy_name": model_name(self.model_name_or_path),
            "policy_path": self.model_name_or_path,
            "baseline_name": model_name(self.baseline_name_or_path),
            "baseline_path": self.baseline_name_or_path,
            "reward": self.reward.name,
            "seed": self.decoding.seed,
            "samples_per_prompt": self.hparams.samples_per_prompt,
            "policy_labelled_by": ",".join(read_provenance(self.model_name_or_path)) or "not recorded",
            **{f"judge.{label}": getattr(j, "name", label) for j, label in zip(self.judges, self.judge_labels)},
            **self.decoding.without_seed(),
        }

    def record_settings(self) -> dict:
        """What fixes the records: the settings, and both models and every judge by content."""
        return {
            **self.run_params(),
            "policy_sha256": model_digest(self.model_name_or_path),
            "baseline_sha256": model_digest(self.baseline_name_or_path),
            "judge_identities": [judge_identity(j) for j in [self.reward, *self.judges]],
        }

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """{'records': one per kept response pair, 'bad_scores': pairs dropped for a bad score}."""
        index = [int(i) for i in batch["index"]]
        if self.recorder is not None and self.recorder.has_all(index):
            return {"records": [], "bad_scores": 0}  # a resumed run: this batch is on disk
        records, dropped = compare_batch(
            self.model,
            self.tokenizer,
            self.baseline,
            self.baseline_tokenizer,
            self.reward,
            batch["prompt"],
            self.decoding,
            indices=index,
            generators=self.generators,
            names=(self.model_name_or_path, self.baseline_name_or_path),
            judges=self.judges,
            samples_per_prompt=self.hparams.samples_per_prompt,
            tie_tolerance=self.hparams.tie_tolerance,
            on_bad_score=self.hparams.on_bad_score,
        )
        ids = dict(zip(index, batch.get("prompt_id") or [None] * len(index)))
        return {"records": [{"prompt_id": ids[r["index"]], **r} for r in records], "bad_scores": dropped}
