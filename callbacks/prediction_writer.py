"""Stream sampled-and-scored prompts to per-process shards, resume from them, merge them into samples/pairs jsonl."""

from __future__ import annotations

import json
import logging
from typing import Optional, Sequence

import lightning as L

from synpref.callbacks.sampling_stats import PairStats
from synpref.callbacks.shards import OnMismatch, ShardWriter, prompt_settings
from synpref.core.outputs import atomic_file
from synpref.core.pairs import pair_row

log = logging.getLogger(__name__)


def sample_rows(rec: dict) -> list[dict]:
    """samples.jsonl's rows for one prompt's record: one row per scored sample, in sampling order."""
    common = {"index": rec["index"], "prompt_id": rec["prompt_id"]}
    return [
        {
            **common,
            "sample": j,
            "prompt": rec["prompt"],
            "response": x["text"],
            "score": x["score"],
            "num_tokens": x["num_tokens"],
        }
        for j, x in enumerate(rec["samples"])
    ]


class SampleWriter(L.Callback):
    """Writes `SamplingModule` records batch by batch and builds `samples.jsonl` and `pairs.jsonl`.

    Records go through a `ShardWriter` (one fsynced shard per process under `<output_dir>/parts/`,
    a lock naming the writing PID, `run.json` with the settings and the prompt set's sha256). A
    restarted run with the same settings and prompts writes only what is missing (`has_all` tells
    the module which batches to skip); other prompts or settings are a `ResumeMismatchError`.
    When prediction ends, rank 0 merges the shards, ordered by prompt index, into `samples.jsonl`
    (every sample with its score) and `pairs.jsonl` (TRL's conversational preference rows with
    `score_chosen`, `score_rejected`, `gap`), each written whole or not at all, and keeps the pair
    statistics in `stats` for the SamplingStatsCallback. `return_predictions` is switched off.

    Args:
        output_dir: where samples.jsonl, pairs.jsonl, run.json and parts/ go.
        settings: what fixes the samples (the module's fingerprint); a resumed run must match it.
        threshold: keep a pair when score_chosen − score_rejected ≥ threshold.
        overwrite: start afresh, deleting what an earlier run left in output_dir.
        on_mismatch: records of other settings or prompts: `error`, or `set_aside` (see ShardWriter).
    """

    def __init__(
        self,
        output_dir: str,
        settings: Optional[dict] = None,
        threshold: float = 0.0,
        overwrite: bool = False,
        on_mismatch: OnMismatch = "error",
    ):
        self.output_dir, self.settings, self.threshold = output_dir, settings or {}, threshold
        self.overwrite, self.on_mismatch = overwrite, on_mismatch
        self.shards: Optional[ShardWriter] = None
        self.stats: Optional[tuple[dict[str, float], list[float]]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        # Lightning would otherwise keep every record in RAM until the loop ends.
        trainer.predict_loop.return_predictions = False
        data = prompt_settings(trainer.datamodule)
        settings = None if data is None else {"module": self.settings, "data": data}
        outputs = ("samples.jsonl", "pairs.jsonl")
        self.shards = ShardWriter(self.output_dir, settings, self.overwrite, outputs, on_mismatch=self.on_mismatch)
        self.shards.open(trainer)

    def has_all(self, indices: Sequence[int]) -> bool:
        """Every prompt of a batch is on disk already (a resumed run skips it)."""
        return self.shards is not None and self.shards.has_all(indices)

    # A plain callback, not a BasePredictionWriter: that one asks the loop for batch indices, which
    # a loader of planned batches (batch_size=None) cannot give, and this writer does not need.
    def on_predict_batch_end(
        self, trainer, pl_module, prediction: list[dict], batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # A batch cut short by a kill is regenerated whole (its seed depends on the whole batch);
        # only its missing prompts are written.
        if prediction:
            self.shards.write(prediction)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shards.close()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.stats = self.merge(trainer.datamodule.is_excluded)
        trainer.strategy.barrier()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.shards is not None:
            self.shards.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "predict")

    def merge(self, is_excluded=None) -> tuple[dict[str, float], list[float]]:
        """Shards → samples.jsonl and pairs.jsonl in prompt order, each prompt once; the pair statistics."""
        out, stats = self.shards.output_dir, PairStats(self.threshold)
        with atomic_file(out / "samples.jsonl") as samples, atomic_file(out / "pairs.jsonl") as pairs:
            for rec in self.shards.records():
                index = rec["index"]
                if is_excluded is not None and is_excluded(rec["prompt_id"], rec["prompt"]):
                    raise RuntimeError(
                        f"prompt {rec['prompt_id']} (index {index}) is in an exclude file but was sampled"
                    )
                texts = [x["text"] for x in rec["samples"]]
                for row in sample_rows(rec):
                    samples.write(json.dumps(row, ensure_ascii=False) + "\n")
                pair = stats.add(texts, [x["score"] for x in rec["samples"]], [x["num_tokens"] for x in rec["samples"]])
                if pair is not None:
                    pairs.write(
                        json.dumps(pair_row(rec["prompt_id"], rec["prompt"], texts, pair), ensure_ascii=False) + "\n"
                    )
        result = stats.result()
        log.info("wrote %d prompts' samples and %d pairs to %s", result[0]["prompts"], result[0]["pairs"], out)
        return result
