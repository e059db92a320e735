"""Chunked LM-head log-probs at Qwen2.5's 151,936-token vocabulary: exact values and gradients, bounded logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from synpref.core.logprobs import head_token_logps
from synpref.presets import QWEN_VOCAB

N, D, CHUNK = 300, 64, 128  # 300 labelled positions: two full chunks and a partial one


def full_logps(hidden, weight, bias, targets):
    """The reference: the whole (n, vocab) logits and log-softmax through plain autograd."""
    return torch.log_softmax(F.linear(hidden, weight, bias), -1).gather(1, targets[:, None]).squeeze(1)


def inputs(bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g, dtype=dtype)
    head = torch.nn.Linear(D, QWEN_VOCAB, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(QWEN_VOCAB, D, generator=g, dtype=dtype) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(QWEN_VOCAB, generator=g, dtype=dtype))
    targets = torch.randint(0, QWEN_VOCAB, (N,), generator=g)
    weights = torch.randn(N, generator=g, dtype=dtype)  # a different incoming gradient per position
    return hidden, head, targets, weights


def grads(fn, hidden, head, targets, weights):
    h = hidden.clone().requires_grad_(True)
    head.zero_grad()
    values = fn(h, head, targets)
    (values * weights).sum().backward()
    out = {"values": values.detach(), "hidden": h.grad, "weight": head.weight.grad.clone()}
    if head.bias is not None:
        out["bias"] = head.bias.grad.clone()
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_values_and_gradients_equal_the_full_logits(bias):
    hidden, head, targets, weights = inputs(bias)
    ref = grads(lambda h, m, t: full_logps(h, m.weight, m.bias, t), hidden, head, targets, weights)
    chunked = grads(lambda h, m, t: head_token_logps(h, m, t, CHUNK), hidden, head, targets, weights)
    assert ref["values"].abs().mean() > 1  # log-probs of a 151,936-way softmax, far from 0
    for key, value in ref.items():
        torch.testing.assert_close(chunked[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_chunked_matches_full_under_bf16_autocast():
    hidden, head, targets, weights = inputs(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(lambda h, m, t: head_token_logps(h, m, t, None), hidden, head, targets, weights)
        chunked = grads(lambda h, m, t: head_token_logps(h, m, t, CHUNK), hidden, head, targets, weights)
    assert chunked["hidden"].dtype == torch.float32 and chunked["weight"].dtype == torch.float32
    for key, value in ref.items():
        # Both multiply in bf16 (8-bit mantissa); only the order of the weight-gradient sum differs.
        torch.testing.assert_close(chunked[key], value, rtol=2e-2, atol=2e-2, msg=key)


def hidden_grads(fn, hidden, head, targets, weights):
    """Values and the hidden states' gradient, with the head frozen (as under LoRA)."""
    h = hidden.clone().requires_grad_(True)
    values = fn(h, head, targets)
    (values * weights).sum().backward()
    return {"values": values.detach(), "hidden": h.grad}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_head_gives_the_hidden_gradient_of_the_full_logits(bias, autocast):
    hidden, head, targets, weights = inputs(bias)
    head.requires_grad_(False)
    # fp32: against the full logits in fp64, since fp32's own full logits are off by ~1e-5 at this
    # vocabulary (the fused gradient is nearer the fp64 values than they are); bf16: against the
    # unchunked head (the full logits through autograd) under the same autocast.
    reference = head if autocast else torch.nn.Linear(D, QWEN_VOCAB, bias=bias, dtype=torch.float64)
    if not autocast:
        reference.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
        reference.requires_grad_(False)
    dtype = torch.float32 if autocast else torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        full = lambda h, m, t: head_token_logps(h, m, t, None)  # noqa: E731
        ref = hidden_grads(full, hidden.to(dtype), reference, targets, weights.to(dtype))
        chunked = hidden_grads(lambda h, m, t: head_token_logps(h, m, t, CHUNK), hidden, head, targets, weights)
    assert chunked["hidden"].dtype == torch.float32
    tol = 2e-2 if autocast else 1e-5  # bf16 matmuls: an 8-bit mantissa
    for key, value in ref.items():
        torch.testing.assert_close(chunked[key].to(dtype), value, rtol=tol, atol=tol, msg=key)


def test_a_frozen_heads_backward_never_touches_the_vocabulary():
    """Its forward already formed each row's gradient: the backward only scales it."""
    hidden, head, targets, weights = inputs(False)
    head.requires_grad_(False)
    h = hidden.clone().requires_grad_(True)
    values = head_token_logps(h, head, targets, CHUNK)
    assert largest_logits(lambda: (values * weights).sum().backward()) == 0
    assert h.grad is not None
    # ... where a trained head's backward recomputes the logits, a chunk at a time.
    head.requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    values = head_token_logps(h, head, targets, CHUNK)
    assert largest_logits(lambda: (values * weights).sum().backward()) == CHUNK * QWEN_VOCAB


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor with a vocabulary-sized last dimension that any op allocates."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view (the head's transpose) allocates nothing
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                    self.largest = max(self.largest, t.numel())
        return out


def largest_logits(fn) -> int:
    with LargestVocabTensor(QWEN_VOCAB) as mode:
        fn()
    return mode.largest


def test_a_step_never_holds_more_than_chunk_by_vocab_logits(qwen_small_model, sample_dir):
    """A whole SFT step and a whole DPO step (live reference), forward and backward, on the real vocabulary."""
    from synpref.core.specs import ModelSpec
    from synpref.data.preferences import PreferenceDataModule, PreferenceSource
    from synpref.modules import DPOModule, SFTModule

    src = PreferenceSource(str(sample_dir / "train_prefs.jsonl"), max_rows=4, format="ultrafeedback_binarized")
    dm = PreferenceDataModule(qwen_small_model, [src], max_length=128, batch_size=4, on_bad_row="skip")
    dm.setup("fit")
    batch = dm.collate([dm.train_set[0]])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    chunk = 64
    assert labelled > 2 * chunk  # several chunks

    for cls in (SFTModule, DPOModule):
        module, sizes = cls(ModelSpec(qwen_small_model)), {}
        module.configure_model()
        step = (lambda: module.sft_loss(batch)[0]) if cls is SFTModule else (lambda: module.dpo_step(batch)["loss"])
        for size in (chunk, None):
            module.hparams.logits_chunk_size = size
            module.model.zero_grad(set_to_none=True)
            sizes[size] = largest_logits(lambda: step().backward())
            assert all(p.grad is not None for p in module.model.parameters())
        assert sizes[chunk] == chunk * QWEN_VOCAB, cls.__name__
        assert sizes[None] == labelled * QWEN_VOCAB, cls.__name__  # what the unchunked head allocates
