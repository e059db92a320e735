"""SmolTalk-schema conversations (`messages`) tokenized for assistant-only SFT."""

from __future__ import annotations

from typing import Optional

import datasets

from synpref.core.chat import IGNORE_INDEX, chat_messages, conversation_field, encode_conversation
from synpref.data.base import TokenizedDataModule
from synpref.data.collate import collate_sft
from synpref.data.io import Dropped, is_local, load_rows, map_rows, source_name


class SmolTalkDataModule(TokenizedDataModule):
    """HuggingFaceTB/smoltalk from the hub, or any local jsonl/parquet with a `messages` column.

    Truncation: a conversation longer than `max_length` tokens keeps its first `max_length`
    tokens (later turns are cut). One whose assistant tokens are all cut is dropped and counted
    (`drop_counts['truncated']`). Validation: `val_split` (a named split of the same source) or
    else a held-out `val_fraction` of the training rows.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        path: str = "HuggingFaceTB/smoltalk",
        config_name: Optional[str] = "all",
        split: str = "train",
        val_split: Optional[str] = None,
        val_fraction: float = 0.0,
        max_length: int = 2048,
        max_rows: Optional[int] = None,
        **loader,
    ):
        """`loader`: TokenizedDataModule's settings (batch_size, on_bad_row, seed, ...)."""
        super().__init__(tokenizer_name_or_path, val_fraction=val_fraction, **loader)
        self.save_hyperparameters(logger=False)  # MLflow params: the module's run_params()
        self.path, self.config_name, self.split, self.val_split = path, config_name, split, val_split
        self.max_length, self.max_rows = max_length, max_rows

    def _encode(self, row: dict) -> dict:
        field = conversation_field(row)
        messages = chat_messages(row.get(field), field)
        enc = encode_conversation(self.tokenizer, messages, self.max_length)
        if all(label == IGNORE_INDEX for label in enc["labels"]):
            raise Dropped("truncated")
        return {**enc, "length": len(enc["input_ids"])}

    def prepare(self, split: str) -> Optional[datasets.Dataset]:
        name = self.split if split == "train" else self.val_split
        if name is None:
            return None
        # A local source's validation split may be another file: `val_split: path/to/val.jsonl`.
        path = name if split == "val" and is_local(name) else self.path
        rows = load_rows(path, name, self.config_name, self.max_rows)
        ds, counts = map_rows(
            rows,
            self._encode,
            source_name(path, name, self.config_name),
            ["input_ids", "labels", "length"],
            self.on_bad_row,
            "conversations",
            self.num_proc,
        )
        for reason, n in counts.items():
            self.drop_counts[f"{split}/{reason}"] = n
        return ds

    def data_inputs(self) -> list[dict]:
        """What it reads, as MLflow dataset inputs (synpref.core.lineage.log_lineage)."""
        out = [{"path": self.path, "context": "training", "split": self.split, "config_name": self.config_name}]
        if self.val_split:
            local = is_local(self.val_split)
            path, split = (self.val_split, None) if local else (self.path, self.val_split)
            out.append({"path": path, "context": "validation", "split": split, "config_name": self.config_name})
        return out

    def collate(self, rows: list[dict]) -> dict:
        return collate_sft(rows, self.tokenizer.pad_token_id)
