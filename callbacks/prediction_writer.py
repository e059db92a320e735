"""Stream sampled-and-scored prompts to per-process shards, resume from them, merge them into samples/pairs jsonl."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from synpref.pairs import pair_row, select_pair

log = logging.getLogger(__name__)

DATA_KEYS = ("path", "split", "config_name", "exclude", "max_prompts", "max_prompt_length", "batch_size", "group_by_length")


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(byte offset, record) for every complete line of a shard; a torn last line is ignored."""
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if line.endswith(b"\n"):
                try:
                    yield offset, json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s: unreadable line at byte %d ignored", path, offset)
            offset += len(line)


def repair_tail(path: Path) -> None:
    """Cut a line torn by a kill, so appending continues on a line boundary."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)


class SampleWriter(BasePredictionWriter):
    """Writes `SamplingModule` records batch by batch and builds `samples.jsonl` and `pairs.jsonl`.

    Each process appends whole records (one line per prompt, flushed and fsynced per batch) to its
    own shard `<output_dir>/parts/part-<world>-<rank>.jsonl`. A restarted run with the same settings
    reads every shard, tells the module which prompts are done (their batches are skipped) and
    writes only what is missing; when prediction ends, rank 0 merges the shards, ordered by prompt
    index, into `samples.jsonl` (every sample with its score) and `pairs.jsonl` (TRL's
    conversational preference rows with `score_chosen`, `score_rejected`, `gap`). Nothing is kept
    in memory: `return_predictions` is switched off. `parts/` stays as the resumable record.

    Args:
        output_dir: where samples.jsonl, pairs.jsonl, run.json and parts/ go.
        overwrite: start afresh, deleting what an earlier run left in output_dir.
    """

    def __init__(self, output_dir: str, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir, self.overwrite = Path(output_dir), overwrite
        self._file = None
        self._written: set[int] = set()

    @property
    def parts(self) -> Path:
        return self.output_dir / "parts"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        # Lightning would otherwise keep every record in RAM until the loop ends.
        trainer.predict_loop.return_predictions = False
        settings = {"module": pl_module.fingerprint(), "data": self._data_settings(trainer)}
        if trainer.is_global_zero:
            if self.overwrite:
                for name in ("parts", "samples.jsonl", "pairs.jsonl", "run.json"):
                    target = self.output_dir / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            self.parts.mkdir(parents=True, exist_ok=True)
            if not (self.output_dir / "run.json").exists():
                (self.output_dir / "run.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
        trainer.strategy.barrier()
        saved = json.loads((self.output_dir / "run.json").read_text())
        if saved != json.loads(json.dumps(settings)):
            diff = {k: (saved.get(g, {}).get(k), v) for g in settings for k, v in settings[g].items() if saved.get(g, {}).get(k) != v}
            raise ValueError(f"{self.output_dir} holds samples made with other settings (saved, now): {diff}; "
                             f"use another output_dir or set overwrite: true")
        own = self.parts / f"part-{trainer.world_size:03d}-{trainer.global_rank:03d}.jsonl"
        repair_tail(own)
        trainer.strategy.barrier()
        self._written = {rec["index"] for shard in sorted(self.parts.glob("part-*.jsonl")) for _, rec in read_records(shard)}
        pl_module.completed = set(self._written)
        if self._written:
            log.info("resuming: %d prompts already in %s", len(self._written), self.parts)
        self._file = open(own, "a", encoding="utf-8")

    @staticmethod
    def _data_settings(trainer: L.Trainer) -> dict:
        hp = getattr(trainer.datamodule, "hparams", {}) or {}
        return {k: hp[k] for k in DATA_KEYS if k in hp}

    def write_on_batch_end(self, trainer, pl_module, prediction: Optional[list[dict]], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        if not prediction:
            return
        # A batch cut short by a kill is regenerated whole (its seed depends on the whole batch);
        # only its missing prompts are written.
        new = [rec for rec in prediction if rec["index"] not in self._written]
        self._file.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in new))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._written.update(rec["index"] for rec in new)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.merge(getattr(pl_module, "threshold", 0.0), trainer.datamodule)
        trainer.strategy.barrier()

    def merge(self, threshold: float, datamodule=None) -> tuple[int, int]:
        """Shards → samples.jsonl and pairs.jsonl in prompt order, each prompt once; (prompts, pairs)."""
        shards = sorted(self.parts.glob("part-*.jsonl"))
        # Only (index, shard, offset) is held per prompt, so memory stays small as the run grows.
        where = sorted({rec["index"]: (rec["index"], s, off) for s, shard in enumerate(shards)
                        for off, rec in read_records(shard)}.values())
        is_excluded = getattr(datamodule, "is_excluded", None)
        handles = [open(shard, "rb") for shard in shards]
        tmp = {name: self.output_dir / f"{name}.tmp" for name in ("samples.jsonl", "pairs.jsonl")}
        n_pairs = 0
        try:
            with open(tmp["samples.jsonl"], "w", encoding="utf-8") as samples, open(tmp["pairs.jsonl"], "w", encoding="utf-8") as pairs:
                for index, s, off in where:
                    handles[s].seek(off)
                    rec = json.loads(handles[s].readline())
                    if is_excluded is not None and is_excluded(rec["prompt_id"], rec["prompt"]):
                        raise RuntimeError(f"prompt {rec['prompt_id']} (index {index}) is in an exclude file but was sampled")
                    texts = [x["text"] for x in rec["samples"]]
                    for j, x in enumerate(rec["samples"]):
                        row = {"index": index, "prompt_id": rec["prompt_id"], "sample": j, "prompt": rec["prompt"],
                               "response": x["text"], "score": x["score"], "num_tokens": x["num_tokens"]}
                        samples.write(json.dumps(row, ensure_ascii=False) + "\n")
                    pair, _, _ = select_pair(texts, [x["score"] for x in rec["samples"]], threshold)
                    if pair is not None:
                        pairs.write(json.dumps(pair_row(rec["prompt_id"], rec["prompt"], texts, pair), ensure_ascii=False) + "\n")
                        n_pairs += 1
        finally:
            for h in handles:
                h.close()
        for name, path in tmp.items():
            os.replace(path, self.output_dir / name)
        log.info("wrote %d prompts' samples and %d pairs to %s", len(where), n_pairs, self.output_dir)
        return len(where), n_pairs
