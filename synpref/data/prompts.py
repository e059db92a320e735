"""Prompts to sample from: deduplicated, with held-out prompts excluded, in length-grouped batches."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Optional, Sequence

from torch.utils.data import DataLoader

from synpref.core.batching import length_batches
from synpref.core.chat import chat_messages, conversation_field, encode_prompt
from synpref.core.errors import ConfigError, DataError, FieldError
from synpref.data.base import TokenizedDataModule
from synpref.data.io import Dropped, OnBadRow, load_rows, map_rows, source_name

log = logging.getLogger(__name__)


def row_prompt(row: dict) -> list[dict]:
    """The prompt conversation of a row in any schema the DPO data reads.

    `prompt` as a string (ultrafeedback_binarized, TRL standard) or a message list (TRL
    conversational); else `messages` up to and including its last user turn.
    """
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise FieldError("prompt", "empty content")
        return [{"role": "user", "content": prompt}]
    if prompt is not None:
        return chat_messages(prompt, "prompt", need_assistant=False)
    field = conversation_field(row)
    if row.get(field) is None:
        raise FieldError("prompt", "missing (and no `messages` or `conversations` column to take it from)")
    messages = chat_messages(row[field], field, need_assistant=False)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise FieldError(field, "no user turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]


def text_key(prompt: Sequence[dict]) -> str:
    """Identity of a prompt's text, whatever the schema that carried it."""
    text = "\n".join(m["content"].strip() for m in prompt)
    return hashlib.sha256(text.encode()).hexdigest()


def row_prompt_id(row: dict, prompt: Sequence[dict]) -> str:
    """The row's `prompt_id`, else the sha256 of the prompt text (how ultrafeedback_binarized makes its ids)."""
    pid = row.get("prompt_id")
    return str(pid) if pid not in (None, "") else text_key(prompt)


def prompt_keys(paths: Sequence[str], split: str = "test_prefs", config_name: Optional[str] = None) -> set[str]:
    """The prompt ids and text keys of every row in `paths` (files or hub ids, read at `split`):
    what an `exclude` list bans. A row without a readable prompt is a DataError naming it."""
    keys: set[str] = set()
    for path in paths:
        for i, row in enumerate(load_rows(path, split, config_name)):
            try:
                prompt = row_prompt(row)
            except FieldError as e:
                raise DataError(source_name(path, split, config_name), i, e.field, e.problem) from None
            keys.update((row_prompt_id(row, prompt), text_key(prompt)))
    return keys


class PromptDataModule(TokenizedDataModule):
    """UltraFeedback-style prompts for `synpref predict` (sampling and evaluation).

    Rows keep their source order; duplicates (same `prompt_id` or same text) keep the first; any
    prompt whose id or text appears in an `exclude` file is removed (held-out evaluation prompts
    never enter synthetic training data). `index` is a prompt's position in what remains.
    Batches are planned once, grouped by length, the same for any number of processes, so
    per-batch seeding gives the same samples under DDP and on resume.

    Args:
        tokenizer_name_or_path: linked by the CLI from the model's `model_name_or_path`.
        path: hub dataset id or local jsonl/parquet file or folder.
        split: hub split (`train_prefs`, `test_prefs`); ignored for files.
        config_name: hub dataset config.
        max_prompts: keep the first N prompts after dedup and exclusion (None: all).
        skip_prompts: leave out the first N of those before `max_prompts` counts (iterative rounds
            sample disjoint slices: round r skips the prompts of rounds 1..r-1).
        exclude: files (or hub ids, split `test_prefs`) whose prompts must never be emitted.
        exclude_split: split read from hub ids in `exclude`.
        max_prompt_length: drop (and count) prompts longer than this many tokens.
        on_bad_row: 'error' (DataError naming file, row, field) or 'skip' (counted).
        batch_size: prompts per predict batch.
        group_by_length: sort prompts by length inside windows of 50 batches to cut padding.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        path: str = "HuggingFaceH4/ultrafeedback_binarized",
        split: str = "train_prefs",
        config_name: Optional[str] = None,
        max_prompts: Optional[int] = None,
        skip_prompts: int = 0,
        exclude: Sequence[str] = (),
        exclude_split: str = "test_prefs",
        max_prompt_length: Optional[int] = None,
        on_bad_row: OnBadRow = "error",
        batch_size: int = 8,
        group_by_length: bool = True,
        num_workers: int = 0,
        num_proc: Optional[int] = None,
        trust_remote_code: bool = False,
    ):
        super().__init__(
            tokenizer_name_or_path,
            batch_size,
            group_by_length=group_by_length,
            num_workers=num_workers,
            trust_remote_code=trust_remote_code,
            on_bad_row=on_bad_row,
            num_proc=num_proc,
        )
        if max_prompts is not None and max_prompts < 1:
            raise ConfigError("data.init_args.max_prompts", f"must be ≥ 1 or null (all), got {max_prompts}")
        if skip_prompts < 0:
            raise ConfigError("data.init_args.skip_prompts", f"must be ≥ 0, got {skip_prompts}")
        self.skip_prompts = skip_prompts
        self.save_hyperparameters(logger=False)  # MLflow params: the module's run_params()
        self.path, self.split, self.config_name, self.max_prompts = path, split, config_name, max_prompts
        self.exclude, self.exclude_split = list(exclude or []), exclude_split
        self.max_prompt_length = max_prompt_length
        self.prompts = None
        self.excluded_keys: set[str] = set()

    def data_inputs(self, context: str) -> list[dict]:
        """What it reads, as MLflow dataset inputs (synpref.core.lineage.log_lineage): its prompts under
        `context` (`sampling`, `evaluation`) and the files whose prompts it excludes."""
        prompts = {"path": self.path, "context": context, "split": self.split, "config_name": self.config_name}
        return [prompts] + [{"path": x, "context": "excluded", "split": self.exclude_split} for x in self.exclude]

    def _read(self, path: str, split: str) -> "datasets.Dataset":  # noqa: F821
        def encode(row: dict) -> dict:
            prompt = row_prompt(row)
            length = len(encode_prompt(self.tokenizer, prompt))
            if self.max_prompt_length and length > self.max_prompt_length:
                raise Dropped("too_long")
            return {
                "prompt": prompt,
                "prompt_id": row_prompt_id(row, prompt),
                "text_key": text_key(prompt),
                "length": length,
            }

        rows = load_rows(path, split, self.config_name)
        ds, counts = map_rows(
            rows,
            encode,
            source_name(path, split, self.config_name),
            ["prompt", "prompt_id", "text_key", "length"],
            self.on_bad_row,
            "prompts",
            self.num_proc,
        )
        for reason, n in counts.items():
            self.drop_counts[f"{reason}"] = self.drop_counts.get(reason, 0) + n
        return ds

    def setup(self, stage: str) -> None:
        if self.prompts is not None:
            return
        ds = self._read(self.path, self.split)
        self.excluded_keys = prompt_keys(self.exclude, self.exclude_split, self.config_name)
        seen: set[str] = set()
        keep, dropped = [], Counter()
        for i, (pid, key) in enumerate(zip(ds["prompt_id"], ds["text_key"])):  # columns stream from Arrow
            if pid in self.excluded_keys or key in self.excluded_keys:
                dropped["excluded"] += 1
            elif pid in seen or key in seen:
                dropped["duplicate"] += 1
            else:
                seen.update((pid, key))
                keep.append(i)
            if self.max_prompts is not None and len(keep) >= self.skip_prompts + self.max_prompts:
                break
        if self.skip_prompts:
            dropped["skipped"] = min(self.skip_prompts, len(keep))
            keep = keep[self.skip_prompts :]
        self.drop_counts.update(dropped)
        if dropped:
            log.info("%s: %d prompts kept; dropped %s", self.path, len(keep), dict(dropped))
        if not keep:
            removed = {**self.drop_counts, **dropped}
            raise DataError(
                source_name(self.path, self.split, self.config_name),
                None,
                "*",
                f"no prompts left to use: every usable prompt was removed ({removed}); "
                f"check `exclude` ({', '.join(self.exclude) or 'none'}), `max_prompts` and `max_prompt_length`",
            )
        self.prompts = ds.select(keep)

    def fingerprint(self) -> str:
        """sha256 of the prompt set as sampled: every prompt's index, id and messages, in order.

        A resumed run compares it, so a prompt file changed in place (reordered, edited) is caught.
        """
        h = hashlib.sha256()
        for i, (pid, prompt) in enumerate(zip(self.prompts["prompt_id"], self.prompts["prompt"])):
            h.update(json.dumps([i, pid, prompt], ensure_ascii=False).encode() + b"\n")
        return h.hexdigest()

    def is_excluded(self, prompt_id: str, prompt: Sequence[dict]) -> bool:
        return prompt_id in self.excluded_keys or text_key(prompt) in self.excluded_keys

    def batches(self) -> list[list[int]]:
        """The batch plan: prompt indices per batch, the same for any world size."""
        n, size = len(self.prompts), self.batch_size
        if not self.group_by_length:
            return [list(range(s, min(n, s + size))) for s in range(0, n, size)]
        return length_batches(list(self.prompts["length"]), size, window=size * 50)

    def collate(self, indices: list[int]) -> dict:
        rows = self.prompts.select(indices).to_dict()
        return {"prompt": rows["prompt"], "prompt_id": rows["prompt_id"], "index": list(indices)}

    def predict_dataloader(self) -> DataLoader:
        # Each item is a whole planned batch (batch_size=None), so Lightning's distributed sampler
        # deals out batches, not prompts: rank r gets batches r, r+W, ... of the same plan.
        return DataLoader(
            self.batches(), batch_size=None, shuffle=False, collate_fn=self.collate, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader:
        return self.predict_dataloader()
