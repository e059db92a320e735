"""Activation checkpointing that keeps each layer's attention output, so the backward recomputes matmuls, not attention."""

from __future__ import annotations

import functools

import torch

# The fused attention kernels behind torch's scaled_dot_product_attention (CPU, flash, memory-efficient,
# cuDNN). Their outputs (the attention output and its log-sum-exp) are 2 bytes per hidden unit per token
# and layer under bf16 (half what the checkpointed block input costs), while recomputing them costs a
# whole attention forward: on a 2-core CPU a fifth of a LoRA step at 1,024 tokens. On a GPU at 7B+ the
# recompute is a few % and the memory may matter more: `recompute_attention`. Everything else in a
# layer (projections, MLP, norms) is recomputed.
ATTENTION_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def attention_kernels() -> list:
    """The attention kernels this torch build has, as op overloads."""
    return [getattr(torch.ops.aten, name).default for name in ATTENTION_KERNELS if hasattr(torch.ops.aten, name)]


def enable_checkpointing(model: torch.nn.Module, recompute_attention: bool = False) -> None:
    """Checkpoint every block of an HF model (non-reentrant), keeping the attention kernels' outputs
    unless `recompute_attention` (the least memory: only each block's input is kept).

    Non-reentrant checkpointing also passes gradients through blocks whose inputs need none, as they
    do behind LoRA's frozen embeddings. A model without the fused kernels (eager attention) is
    checkpointed as usual.
    """
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs = {"use_reentrant": False}
    if not recompute_attention:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, attention_kernels())
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
