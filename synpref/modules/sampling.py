"""`synpref predict` for synthetic pairs: sample K completions per prompt and score them with a reward model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from synpref.callbacks.sampling_stats import GenerationCounters
from synpref.callbacks.shards import OnMismatch
from synpref.core.errors import ConfigError
from synpref.core.fingerprints import file_sha256, model_digest
from synpref.core.lineage import PAIRS_TAG
from synpref.core.models import load_frozen_causal_lm, load_tokenizer
from synpref.core.specs import Decoding, ModelSpec
from synpref.core.tracking import mlflow_loggers
from synpref.generators import Generator, generate_texts
from synpref.modules.base import log_data_lineage, log_run_params, model_name
from synpref.rewards.base import OnBadScore, RewardScorer, score_checked

log = logging.getLogger(__name__)


class SamplingModule(L.LightningModule):
    """K completions per prompt from any HF causal LM, each scored by `reward`.

    `predict_step` returns one record per prompt (`index`, `prompt_id`, `prompt`, `samples` with
    `text`, `score`, `num_tokens`); the SampleWriter callback streams them to disk and builds the
    pairs (best vs worst, kept when the gap ≥ `threshold`). Each batch is seeded with
    `decoding.seed + its first prompt index`, so a batch's samples do not depend on what ran before it
    (resume, DDP).

    Args:
        policy: the model to sample from (base model as in the paper, or an SFT export), a ModelSpec
            (`name_or_path`, `dtype` ('bfloat16' on GPU; None keeps the checkpoint's),
            `attn_implementation`, `trust_remote_code`).
        reward: a RewardScorer by class_path (synpref.rewards.*).
        num_samples: completions per prompt (K; the paper uses 2).
        decoding: a Decoding (`max_new_tokens` 512, `temperature` 0.7 and `top_k` 50 as in the paper,
            `top_p`, `seed` of the per-batch sampling RNG); `do_sample` must stay true.
        threshold: keep a pair only if score_chosen − score_rejected ≥ threshold (ties always dropped).
        on_bad_score: a reward that is not a finite float (NaN, None, a string) is an `error` naming
            the scorer and the prompt, or with `skip` the sample is dropped and counted
            (`sampling/bad_scores`); a prompt left with fewer than 2 samples is dropped.
        output_dir: where the SampleWriter puts samples.jsonl, pairs.jsonl, run.json and parts/.
        overwrite: start afresh instead of resuming what an earlier run left in output_dir.
        on_mismatch: records in output_dir made from another model (by content: weights, config,
            tokenizer), prompts, reward or settings are never resumed: `error` names what changed;
            `set_aside` moves them to output_dir/stale/<time>/ and samples afresh (`synpref
            reproduce` sets it for its stages: the pipeline owns its folders).
        generator: where samples come from: None = in-process (`synpref.generation.generate`, the
            model loaded here); `synpref.generators.OpenAIGenerator` = a serving engine (vLLM,
            SGLang, `transformers serve`) over the OpenAI API, no model loaded here.
    """

    def __init__(
        self,
        policy: ModelSpec,
        reward: RewardScorer,
        num_samples: int = 2,
        decoding: Decoding = Decoding(max_new_tokens=512),
        threshold: float = 0.0,
        on_bad_score: OnBadScore = "error",
        output_dir: str = "artifacts/samples",
        overwrite: bool = False,
        generator: Optional[Generator] = None,
        on_mismatch: OnMismatch = "error",
    ):
        super().__init__()
        if num_samples < 2:
            raise ConfigError(
                "model.init_args.num_samples", f"must be ≥ 2 (a pair needs 2 samples per prompt), got {num_samples}"
            )
        if not decoding.do_sample:
            raise ConfigError(
                "model.init_args.decoding.do_sample", "must be true: a pair needs K different samples per prompt"
            )
        self.save_hyperparameters(ignore=["reward", "generator"], logger=False)  # MLflow params: run_params()
        self.policy, self.decoding = policy, decoding
        self.model_name_or_path = policy.require("model.init_args.policy")
        self.reward, self.threshold = reward, threshold
        self.generator = generator
        self.tokenizer = load_tokenizer(self.model_name_or_path, policy.trust_remote_code)
        self.model: Optional[torch.nn.Module] = None
        # Set by configure_callbacks: it knows which prompts a resumed run already has on disk.
        self.writer = None
        self.generation = GenerationCounters()  # read by the SamplingStatsCallback (configure_callbacks)
        self.score_seconds = 0.0
        self.bad_scores = 0

    def configure_model(self) -> None:
        if self.model is None and self.generator is None:
            self.model = load_frozen_causal_lm(self.policy)

    def configure_callbacks(self) -> list[L.Callback]:
        # The writer and the statistics belong to this module's output; a config's
        # trainer.callbacks of the same types are replaced by these.
        from synpref.callbacks import SampleWriter, SamplingStatsCallback

        hp = self.hparams
        self.writer = SampleWriter(hp.output_dir, self.fingerprint(), hp.threshold, hp.overwrite, hp.on_mismatch)
        return [self.writer, SamplingStatsCallback(self.writer, self.generation, self.reward.name)]

    def on_predict_start(self) -> None:
        self.reward.to(self.device)
        log_run_params(self, n_prompts=len(getattr(self.trainer.datamodule, "prompts", None) or []))
        log_data_lineage(self, context="sampling")

    def run_params(self) -> dict:
        hp, d = self.hparams, self.decoding
        return {
            "policy_name": model_name(self.model_name_or_path),
            "reward": self.reward.name,
            "num_samples": hp.num_samples,
            "threshold": hp.threshold,
            "seed": d.seed,
            "max_new_tokens": d.max_new_tokens,
            "temperature": d.temperature,
            "top_k": d.top_k,
            "top_p": d.top_p,
        }

    def fingerprint(self) -> dict:
        """What fixes the samples, the model and reward by content: a resumed run must match it."""
        d = self.decoding
        served = {"generator": self.generator.name} if self.generator is not None else {}
        return {
            "model_name_or_path": self.model_name_or_path,
            "model_sha256": model_digest(self.model_name_or_path),
            "reward_identity": self.reward.identity(),
            "num_samples": self.hparams.num_samples,
            "temperature": d.temperature,
            "top_k": d.top_k,
            "top_p": d.top_p,
            "max_new_tokens": d.max_new_tokens,
            "seed": d.seed,
            "reward": self.reward.name,
            **served,
        }

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> Optional[list[dict]]:
        if self.writer is not None and self.writer.has_all(batch["index"]):
            return []  # a resumed run: this batch is on disk
        hp = self.hparams
        start = time.perf_counter()
        texts, counts = generate_texts(
            self.generator,
            self.model,
            self.tokenizer,
            self.model_name_or_path,
            batch["prompt"],
            batch["index"],
            self.decoding,
            num_return_sequences=hp.num_samples,
        )
        self.generation.seconds += time.perf_counter() - start
        self.generation.tokens += sum(map(sum, counts))
        start = time.perf_counter()
        flat_prompts = [p for p in batch["prompt"] for _ in range(hp.num_samples)]
        flat_indices = [int(i) for i in batch["index"] for _ in range(hp.num_samples)]
        flat_texts = [t for row in texts for t in row]
        scores = score_checked(self.reward, flat_prompts, flat_texts, hp.on_bad_score, flat_indices)
        self.score_seconds += time.perf_counter() - start
        self.bad_scores += scores.count(None)
        k = hp.num_samples
        records = [
            {
                "index": int(index),
                "prompt_id": pid,
                "prompt": prompt,
                "samples": [
                    {"text": t, "score": s, "num_tokens": int(n)}
                    for t, s, n in zip(texts[j], scores[j * k : (j + 1) * k], counts[j])
                    if s is not None
                ],
            }
            for j, (index, pid, prompt) in enumerate(zip(batch["index"], batch["prompt_id"], batch["prompt"]))
        ]
        return [r for r in records if len(r["samples"]) >= 2]

    def on_predict_end(self) -> None:
        # The pairs by content: a DPO run on them finds this run (synpref.core.lineage), wherever the file went.
        pairs = Path(self.hparams.output_dir) / "pairs.jsonl"
        if self.trainer.is_global_zero and pairs.is_file():
            for logger in mlflow_loggers(self.trainer):
                logger.experiment.set_tag(logger.run_id, PAIRS_TAG, file_sha256(pairs))
        if self.bad_scores:
            log.warning("on_bad_score=skip: %d samples had no finite reward and were dropped", self.bad_scores)
            if self.logger is not None:
                self.logger.log_metrics({"sampling/bad_scores": float(self.bad_scores)})
