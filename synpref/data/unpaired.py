"""Unpaired examples for KTO: every scored sample labelled by a rule, or both replies of a preference pair."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Literal, Optional

import datasets
import torch

from synpref.core.batching import pad
from synpref.core.chat import IGNORE_INDEX, encode_prompt_response
from synpref.core.errors import ConfigError, DataError, FieldError
from synpref.data.base import TokenizedDataModule
from synpref.data.io import Dropped, require, samples_by_prompt
from synpref.data.preferences import _as_messages, to_pair

UnpairedFormat = Literal["samples", "kto", "ultrafeedback_binarized", "openbmb", "synpref", "trl"]
COLUMNS = ["prompt_ids", "completion_ids", "label", "length"]


@dataclass
class UnpairedSource:
    """One source of unpaired `{prompt, completion, label}` examples.

    Args:
        path: hub dataset id or local jsonl/parquet file or folder.
        format: `samples`: `synpref predict`'s samples.jsonl (one row per sample: index, prompt,
            response, score), every scored sample an example labelled by `label_rule`; `kto`: TRL's unpaired rows (`prompt`, `completion`, boolean `label`);
            a preference format (`ultrafeedback_binarized`, `openbmb`, `synpref`, `trl`, as
            PreferenceSource reads them): each pair gives its chosen reply as desirable and its
            rejected reply as undesirable (a tie is dropped and counted).
        label_rule: for `samples`: `median`: a sample scored above its prompt's median is desirable,
            below it undesirable, at it dropped and counted (`at_median`); `threshold`: a score ≥
            `threshold` is desirable, else undesirable.
        threshold: the score of `label_rule: threshold`.
        split, config_name, weight, max_rows, binarize: as in PreferenceSource.
    """

    path: str
    format: UnpairedFormat = "samples"
    label_rule: Literal["median", "threshold"] = "median"
    threshold: float = 0.0
    split: str = "train"
    config_name: Optional[str] = None
    weight: float = 1.0
    max_rows: Optional[int] = None
    binarize: Literal["random", "lowest"] = "random"


def sample_labels(scores: list[float], rule: str, threshold: float) -> list[Optional[bool]]:
    """Desirable (True), undesirable (False) or dropped (None) for each of one prompt's sample scores."""
    if rule == "threshold":
        return [s >= threshold for s in scores]
    median = statistics.median(scores)
    return [None if s == median else s > median for s in scores]


class UnpairedDataModule(TokenizedDataModule):
    """Tokenized examples (prompt_ids, completion_ids, label, index) from one or more `sources`.

    Tokens come from `encode_prompt_response`, as for DPO. Prompt + completion is cut to its first
    `max_length` tokens; an example whose prompt fills `max_length` is dropped and counted. A batch
    also carries KTO's mismatched sequences: example i's prompt with example i−1's completion (the
    completions rotated by one within the batch, as TRL's KTOTrainer builds them), so `batch_size`
    must be ≥ 2. Drops are counted in `drop_counts` as for preference pairs.
    """

    numbered = True

    def __init__(
        self,
        tokenizer_name_or_path: str,
        sources: list[UnpairedSource],
        val_sources: Optional[list[UnpairedSource]] = None,
        max_length: int = 1024,
        drop_ties: bool = True,
        **loader,
    ):
        """`loader`: TokenizedDataModule's settings (batch_size ≥ 2, val_fraction, on_bad_row, seed, ...)."""
        super().__init__(tokenizer_name_or_path, **loader)
        if self.batch_size < 2:  # the KL estimate of a one-example batch is its own reward
            raise ConfigError("data.init_args.batch_size", f"must be ≥ 2 for KTO's KL estimate, got {self.batch_size}")
        self.save_hyperparameters(logger=False)
        self.keep_sources(UnpairedSource, sources, val_sources)
        self.max_length, self.drop_ties = max_length, drop_ties

    # -- one row -------------------------------------------------------------------------------
    def examples(self, row: dict, src: UnpairedSource) -> list[tuple[list[dict], str, bool]]:
        """(prompt messages, completion text, desirable) of every example one raw row holds."""
        if src.format == "samples":
            require(row, ["prompt", "samples"])
            prompt = _as_messages(row["prompt"], "prompt", "user")
            samples = [s for s in row["samples"] if isinstance(s, dict) and s.get("text")]
            labels = sample_labels([s["score"] for s in samples], src.label_rule, src.threshold)
            kept = [(prompt, s["text"], label) for s, label in zip(samples, labels) if label is not None]
            if not kept:
                raise Dropped("at_median")
            return kept
        if src.format == "kto":
            require(row, ["prompt", "completion"])
            if not isinstance(row.get("label"), bool):
                raise FieldError("label", f"must be true or false, got {row.get('label')!r}")
            completion = _as_messages(row["completion"], "completion", "assistant")[-1]["content"]
            return [(_as_messages(row["prompt"], "prompt", "user"), completion, row["label"])]
        prompt, chosen, rejected, s_c, s_r = to_pair(row, src.format, src.binarize, self.seed)
        if self.drop_ties and s_c is not None and s_r is not None and s_c == s_r:
            raise Dropped("tie")
        return [(prompt, chosen, True), (prompt, rejected, False)]

    def encode(self, row: dict, src: UnpairedSource) -> dict:
        out = {c: [] for c in COLUMNS}
        for prompt, completion, label in self.examples(row, src):
            prompt_ids, completion_ids = encode_prompt_response(self.tokenizer, prompt, completion)
            room = self.max_length - len(prompt_ids)
            if room <= 0:
                raise Dropped("truncated")
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(completion_ids[:room])
            out["label"].append(label)
            out["length"].append(len(prompt_ids) + min(len(completion_ids), room))
        return out

    # -- data sets -----------------------------------------------------------------------------
    def rows_of(self, src: UnpairedSource) -> datasets.Dataset:
        """A `samples` source (samples.jsonl: one row per sample) as one row per prompt, its samples in
        a list: the median rule labels each sample against the others of its prompt. Row numbers in
        errors and drop counts are then prompts, in the file's order."""
        rows = super().rows_of(src)
        if src.format != "samples":
            return rows
        need = ["index", "sample", "prompt", "response", "score"]
        missing = [c for c in need if c not in rows.column_names]
        if missing:
            problem = (
                f"missing: format `samples` reads {', '.join(need)} (samples.jsonl as `synpref predict` writes it)"
            )
            raise DataError(src.path, 0, missing[0], problem)
        prompts = samples_by_prompt(rows.select_columns(need))
        return datasets.Dataset.from_list(
            [
                {
                    "prompt": p["prompt"],
                    "samples": [{"text": t, "score": s} for _, (t, s) in sorted(p["samples"].items())],
                }
                for p in prompts.values()
            ]
        )

    def prepare(self, split: str) -> Optional[datasets.Dataset]:
        sources = self.sources if split == "train" else self.val_sources
        if not sources:
            return None
        # A row holds a list of examples per column: one example per output row.
        flat = lambda ds: ds.map(lambda b: {c: sum(b[c], []) for c in COLUMNS}, batched=True, desc="unpairing")  # noqa: E731
        return self.mix(sources, split, self.encode, COLUMNS, "examples", reshape=flat)

    def collate(self, rows: list[dict]) -> dict:
        """The examples, and under `kl_` the mismatched sequences: prompt i + completion i−1 (cut to max_length)."""
        batch = self._sequences([(r["prompt_ids"], r["completion_ids"]) for r in rows])
        shifted = [rows[-1]["completion_ids"]] + [r["completion_ids"] for r in rows[:-1]]
        kl = self._sequences([(r["prompt_ids"], c) for r, c in zip(rows, shifted)])
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        return batch

    def _sequences(self, parts: list[tuple[list[int], list[int]]]) -> dict:
        seqs = [(p + c)[: self.max_length] for p, c in parts]
        labels = [([IGNORE_INDEX] * len(p) + c)[: self.max_length] for p, c in parts]
        return {
            "input_ids": pad(seqs, self.tokenizer.pad_token_id),
            "attention_mask": pad([[1] * len(s) for s in seqs], 0),
            "labels": pad(labels, IGNORE_INDEX),
        }
