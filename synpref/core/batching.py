"""Padding and length-ordered batch plans: one implementation for training, generation, rewards and reference caches."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack int lists into a (batch, longest) tensor, padded right (training) or left (generation)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s) :] = torch.as_tensor(s)
            else:
                out[i, : len(s)] = torch.as_tensor(s)
    return out


def longest_first(order: Iterable[int], lengths: Sequence[int], window: Optional[int] = None) -> list[int]:
    """`order` sorted longest first inside consecutive windows of `window` entries (None: one
    window); equal lengths keep their order, so a plan depends only on `order` and `lengths`."""
    order = list(order)
    window = window or max(len(order), 1)
    out: list[int] = []
    for start in range(0, len(order), window):
        out += sorted(order[start : start + window], key=lambda i: -lengths[i])
    return out


def length_batches(lengths: Sequence[int], batch_size: int, window: Optional[int] = None) -> list[list[int]]:
    """Positions 0..n-1 in batches of `batch_size`, longest first (within windows of `window`
    positions, a multiple of `batch_size`), so each batch holds similar lengths and pads little."""
    order = longest_first(range(len(lengths)), lengths, window)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
