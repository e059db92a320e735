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
    what it holds that way (benchmarks/RESULTS.md). A MALLOC_MMAP_THRESHOLD_ the user set wins; on another
    C library or system, nothing changes.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
