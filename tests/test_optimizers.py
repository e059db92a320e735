"""Lean optimizer state: bf16 and 8-bit AdamW moments train like fp32 AdamW, and compose with optimizer_in_backward."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from synpref.core.errors import ConfigError
from synpref.core.optimizers import AdamWBf16Moments, build_optimizer
from tests.test_memory import fit

# The stated tolerance: every step's loss within 1% of fp32 AdamW's over 12 steps of the tiny model
# (measured: bf16 moments < 0.01%, torchao's 8-bit moments 0.05% over 30 steps).
TOLERANCE = 0.01


def test_bf16_moments_follow_adamw_by_hand():
    torch.manual_seed(0)
    start = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(3)]
    ours, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = AdamWBf16Moments([ours], lr=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for g in grads:
        for p, o in ((ours, opt), (ref, reference)):
            p.grad = g.clone()
            o.step()
    assert opt.state[ours]["exp_avg"].dtype == opt.state[ours]["exp_avg_sq"].dtype == torch.bfloat16
    # Only the moments' bf16 rounding (2^-8 relative) separates the two.
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-2 * 3 * 2**-7)
    assert not torch.allclose(ours, start)


class Losses(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("optim", ["adamw_bf16", "adamw_8bit"])
def test_lean_moments_train_like_fp32_adamw_and_compose_with_optimizer_in_backward(
    optim, tiny_model, sample_dir, tmp_path
):
    if optim == "adamw_8bit":
        pytest.importorskip("torchao")
    curves = {}
    for name in ("adamw", optim):
        record = Losses()
        module = fit(tiny_model, sample_dir, tmp_path, steps=12, callbacks=[record])(optim=name)
        curves[name] = record.losses
    assert len(curves[optim]) == 12 and curves["adamw"][-1] < curves["adamw"][0]  # it trains
    for ours, fp32 in zip(curves[optim], curves["adamw"]):
        assert abs(ours - fp32) <= TOLERANCE * fp32
    state = module.trainer.optimizers[0].state[module.model.get_input_embeddings().weight]
    kinds = {type(state["exp_avg"]).__name__, str(getattr(state["exp_avg"], "dtype", ""))}
    assert ("torch.bfloat16" in kinds) if optim == "adamw_bf16" else ("OptimState8bit" in kinds), kinds

    run = fit(tiny_model, sample_dir, tmp_path)
    plain, in_backward = run(optim=optim), run(optim=optim, optimizer_in_backward=True)
    assert in_backward.held == [0, 0, 0]
    for (name, a), b in zip(plain.model.named_parameters(), in_backward.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_optimizer_is_named():
    with pytest.raises(ConfigError, match="model.init_args.optim"):
        build_optimizer(
            "lion", [{"params": [torch.zeros(1, requires_grad=True)]}], 1e-3, (0.9, 0.99), 1e-8, torch.device("cpu")
        )
