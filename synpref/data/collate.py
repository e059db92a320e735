"""The SFT collator and a length-grouped sampler that cuts padding without sorting the epoch."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from synpref.core.batching import longest_first, pad
from synpref.core.chat import IGNORE_INDEX


def collate_sft(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    ids = [r["input_ids"] for r in rows]
    input_ids = pad(ids, pad_token_id)
    attention_mask = pad([[1] * len(s) for s in ids], 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad([r["labels"] for r in rows], IGNORE_INDEX),
    }


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices, sorted by length inside mega-batches of `batch_size * group` rows.

    Batches then hold similar lengths (little padding) while the order stays random across the
    epoch. Deterministic for a seed and epoch; Lightning wraps it for DDP and calls set_epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group: int = 50, seed: int = 0, shuffle: bool = True):
        self.lengths, self.batch_size, self.group, self.seed, self.shuffle = (
            list(lengths),
            batch_size,
            group,
            seed,
            shuffle,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        yield from longest_first(order, self.lengths, self.batch_size * self.group)
