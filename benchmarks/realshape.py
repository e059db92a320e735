"""Shared by the benchmarks: preset models, the measured matmul peak and model FLOPs (for MFU)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch

CACHE = Path(__file__).resolve().parents[1] / "artifacts" / "presets"


def preset_model(name: str) -> str:
    """The preset's random model, built once into artifacts/presets/NAME and reused by later runs."""
    from synpref.presets import build_preset_model

    return str(build_preset_model(name, CACHE / name))


def random_batch(stage: str, pairs_or_rows: int, length: int, vocab: int, prompt_fraction: float = 0.5) -> dict:
    """A full-length batch of random tokens as the modules take it: the first `prompt_fraction` of
    each sequence is prompt (no label); DPO gets chosen and rejected rows and pair indices."""
    rows = pairs_or_rows * (2 if stage == "dpo" else 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : int(length * prompt_fraction)] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "index": torch.arange(pairs_or_rows),
    }


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's matmul FLOP/s in `dtype` now: the best of `repeats` (n, n) @ (n, n) products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (thread pool, kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def shape(model_dir: str) -> dict:
    """What the FLOP count needs: parameters of the body and of the head, layers, attention width."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    layer = (
        c.hidden_size * (c.hidden_size + 2 * kv)
        + c.hidden_size
        + 2 * kv  # q, k, v (with biases)
        + c.hidden_size * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size
        + 2 * c.hidden_size
    )
    return {
        "body": c.num_hidden_layers * layer + c.hidden_size,
        "head": c.vocab_size * c.hidden_size,
        "layers": c.num_hidden_layers,
        "attn_width": c.num_attention_heads * head_dim,
    }


def step_flops(s: dict, lengths: list[int], labelled: int, passes: int = 3) -> float:
    """Matmul FLOPs of `passes` passes (3 = forward + backward, 1 = forward) over sequences of `lengths`.

    Per token 2·N_body (and 2·N_head on the `labelled` tokens only: the LM head runs on nothing else,
    on either side), plus causal attention, 2·layers·width·s² per sequence of s tokens (QKᵀ and AV).
    """
    tokens = sum(lengths)
    forward = (
        2 * s["body"] * tokens
        + 2 * s["head"] * labelled
        + 2 * s["layers"] * s["attn_width"] * sum(x * x for x in lengths)
    )
    return passes * forward


def mfu_line(name: str, flops: float, seconds: float, peak: float) -> str:
    return (
        f"{name}: {flops / seconds / 1e9:.1f} GFLOP/s achieved, matmul peak {peak / 1e9:.1f} GFLOP/s, "
        f"mfu={flops / seconds / peak:.3f}"
    )


class StepMeter:
    """Per collated batch (in training order): token counts, sequence lengths and labelled positions;
    and the time each optimizer step ends. Wraps either framework's collator, so both count alike."""

    def __init__(self):
        self.batches, self.step_ends = [], []

    def wrap(self, collate):
        def counted(rows):
            batch = collate(rows)
            lengths = batch["attention_mask"].sum(1).tolist()
            if "completion_mask" in batch:  # TRL: the loss positions, as a mask over the inputs
                labelled = int(batch["completion_mask"].sum())
            else:  # labels, -100 where no loss (both frameworks' SFT, synpref's DPO)
                labelled = int((batch["labels"][:, 1:] != -100).sum())
            self.batches.append({"lengths": lengths, "labelled": labelled})
            return batch

        return counted

    def step_end(self) -> None:
        self.step_ends.append(time.perf_counter())

    def timed(self, warmup: int, s: dict, passes: int = 3) -> dict:
        """Tokens, seconds and matmul FLOPs of the steps after the first `warmup` ones."""
        n = len(self.step_ends)
        batches = self.batches[warmup:n]
        flops = sum(step_flops(s, b["lengths"], b["labelled"], passes) for b in batches)
        return {
            "tokens": sum(sum(b["lengths"]) for b in batches),
            "labelled": sum(b["labelled"] for b in batches),
            "flops": flops,
            "seconds": self.step_ends[-1] - self.step_ends[warmup - 1],
            "timed_steps": n - warmup,
        }


def check_equal_work(tokens: dict[str, int], tolerance: float = 0.01) -> None:
    """Print each run's timed non-padding tokens; exit non-zero if they differ by more than `tolerance`.

    With a few timed steps, tokens/s and peak memory compare only if both sides trained the same
    sequences: a longer batch costs more time and more activation memory.
    """
    print("equal work: timed non-pad tokens " + ", ".join(f"{k} {v}" for k, v in tokens.items()))
    low, high = min(tokens.values()), max(tokens.values())
    if high > low * (1 + tolerance):
        sys.exit(
            f"unequal work: timed non-pad tokens differ by more than {tolerance:.0%} ({tokens}); figures not comparable"
        )


# -- the memory settings both training benchmarks take ---------------------------------------------
def add_memory_args(p) -> None:
    """--gradient-checkpointing (both sides; TRL 1.16's default is on) and --optimizer-in-backward (synpref)."""
    import argparse

    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute each layer's activations in the backward, on both sides (TRL's default: on)",
    )
    p.add_argument(
        "--optimizer-in-backward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synpref steps each parameter as its gradient completes (TRL has no such setting)",
    )

    p.add_argument(
        "--recompute-attention",
        action="store_true",
        help="synpref's checkpointing recomputes attention too, as TRL's does (default: it keeps its output)",
    )
    p.add_argument("--lora", type=int, help="LoRA rank on every linear layer, both sides (TRL: the same peft config)")
    p.add_argument(
        "--optim",
        choices=["adamw", "adamw_bf16", "adamw_8bit"],
        default="adamw",
        help="synpref's optimizer; TRL gets the same where it has one (TRL_OPTIM)",
    )


# TRL's (transformers') name for the same optimizer; it has no bf16-moment AdamW without torchdistx.
TRL_OPTIM = {"adamw": "adamw_torch_fused", "adamw_bf16": "adamw_torch_fused", "adamw_8bit": "adamw_torch_8bit"}


def memory_argv(a) -> list[str]:
    """The memory settings of `a` as the command-line flags a worker subprocess reads back."""
    return [
        "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing",
        "--optimizer-in-backward" if a.optimizer_in_backward else "--no-optimizer-in-backward",
        *(["--recompute-attention"] if a.recompute_attention else []),
        *(["--lora", str(a.lora)] if a.lora else []),
        "--optim",
        a.optim,
    ]


def worker_env(framework: str, env: dict) -> dict:
    """A benchmark worker's environment: synpref's side starts as the `synpref` command does (torch's
    allocator on 2 MiB pages, synpref.core.host_memory.prefer_huge_pages, read by torch before its first
    allocation, so it must be set before the worker starts); TRL's runs as shipped."""
    return {"THP_MEM_ALLOC_ENABLE": "1", **env} if framework == "synpref" else env


def lora_group(a):
    """synpref's LoRA group for --lora R (alpha 2R, every linear layer), or None."""
    from synpref.core.specs import LoRA

    return LoRA(r=a.lora, alpha=2.0 * a.lora) if a.lora else None


def trl_lean_args(a) -> tuple[dict, dict]:
    """(TrainingArguments fields, trainer kwargs) giving TRL the same optimizer and peft config."""
    group = lora_group(a)
    return {"optim": TRL_OPTIM[a.optim]}, ({"peft_config": group.config()} if group else {})


def floor_bytes(model: str, a, reference: bool) -> float:
    """What a full fine-tune must hold: fp32 weights, the gradients as held (all, or only the tied
    embedding's when stepped in the backward), the optimizer state and a live fp32 reference."""
    from transformers import AutoConfig

    from synpref.reporting.estimate import OPTIM_STATE_BYTES, Shape

    shape = Shape.from_config(AutoConfig.from_pretrained(model))
    grads = 4 * (shape.vocab * shape.hidden if a.optimizer_in_backward else shape.params)
    return (4 + OPTIM_STATE_BYTES[a.optim] + (4 if reference else 0)) * shape.params + grads


def lean_fields(a, floor_ratio: Optional[float]) -> str:
    """The RESULT line's `lora=`, `optim=` and (full fine-tunes) `floor_ratio=` fields."""
    floor = "" if floor_ratio is None else f" floor_ratio={floor_ratio:.2f}"
    recompute = " recompute_attention=1" if a.recompute_attention else ""
    return f" lora={a.lora or 0} optim={a.optim}{floor}{recompute}"
