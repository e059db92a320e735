"""Freed host memory goes back to the OS at once (glibc), so a CPU process peaks at what a step holds."""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def release_freed_memory() -> bool:
    """Give every allocation of 1 MiB or more its own mapping, unmapped when freed. True if set.

    glibc's own threshold starts at 128 KiB and rises to the size of each large block freed, up to
    32 MiB; from then on, the activations, casts and logits chunks of a training step come from the heap,
    and what they free stays resident. A LoRA DPO step at Qwen2.5-1.5B's shape peaked 1.7 GB (38 %) above
    what it holds that way (benchmarks/RESULTS.md). The price is time: see below. A MALLOC_MMAP_THRESHOLD_
    the user set wins (33554432 gives the heap's speed back at the heap's peak); on another C library or
    system, nothing changes.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))


def prefer_huge_pages() -> None:
    """Ask torch's CPU allocator for 2 MiB pages on blocks of 2 MiB or more (THP_MEM_ALLOC_ENABLE).

    With `release_freed_memory` every such block is a fresh mapping, whose pages are faulted in and
    zeroed on first touch, 4 KiB at a time: a LoRA DPO step at the 0.5B shape took 27.9 s that way
    against 15.9 s on glibc's heap; with 2 MiB pages (a 512th of the faults), 22.0 s at the same peak
    (benchmarks/RESULTS.md). torch reads the variable once, at its first allocation: call this before
    torch is imported. A value the user set wins.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
