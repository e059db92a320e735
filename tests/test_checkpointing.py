"""Activation checkpointing keeps the attention outputs: same gradients, attention run once per layer, the rest recomputed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from synpref.core.checkpointing import attention_kernels
from synpref.core.specs import LoRA, ModelSpec
from synpref.modules import SFTModule


class OpCounts(TorchDispatchMode):
    """How many times each aten op runs."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def batch(module) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, module.model.config.vocab_size, (2, 48))
    labels = ids.clone()
    labels[:, :16] = -100  # a prompt, unlabelled
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step(tiny_model, checkpointing: bool, lora, recompute_attention: bool = False):
    torch.manual_seed(0)
    module = SFTModule(
        ModelSpec(tiny_model, dtype="float32"),
        gradient_checkpointing=checkpointing,
        recompute_attention=recompute_attention,
        lora=lora,
    )
    module.configure_model()
    with OpCounts() as ops:
        loss, _ = module.sft_loss(batch(module))
        loss.backward()
    grads = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, ops.counts, module.model.config.num_hidden_layers


@pytest.mark.parametrize("lora", [None, LoRA(r=4, alpha=8.0)], ids=["full", "lora"])
def test_checkpointing_recomputes_the_layers_but_not_their_attention(tiny_model, lora):
    loss, grads, plain, layers = step(tiny_model, False, lora)
    loss_ckpt, grads_ckpt, ckpt, _ = step(tiny_model, True, lora)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert set(grads_ckpt) == set(grads) and grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-7, msg=name)
    attention = sum(ckpt[op] for op in attention_kernels())
    assert sum(plain[op] for op in attention_kernels()) == attention == layers  # one forward per layer
    # Checkpointing is on: each layer's projections run again in the backward.
    mm = torch.ops.aten.mm.default
    addmm = torch.ops.aten.addmm.default
    assert ckpt[mm] + ckpt[addmm] > plain[mm] + plain[addmm]


def test_recompute_attention_runs_it_again_in_the_backward_for_the_same_gradients(tiny_model):
    _, grads, _, layers = step(tiny_model, False, None)
    _, grads_ckpt, ckpt, _ = step(tiny_model, True, None, recompute_attention=True)
    assert sum(ckpt[op] for op in attention_kernels()) == 2 * layers
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_the_planner_counts_the_kept_attention_outputs():
    from transformers import Qwen2Config

    from synpref.presets import PRESETS
    from synpref.reporting.estimate import Shape, peak_bytes

    shape = Shape.from_config(Qwen2Config(tie_word_embeddings=True, **PRESETS["qwen2.5-0.5b"]))
    plan = dict(stage="dpo", batch_size=2, max_length=1024, bf16=True, gradient_checkpointing=True)
    kept = peak_bytes(shape, **plan)["activations"]
    recomputed = peak_bytes(shape, **plan, recompute_attention=True)["activations"]
    assert kept - recomputed == 2 * 2 * 1024 * 24 * 896 * 2  # tokens x layers x hidden x 2 bytes (bf16)
