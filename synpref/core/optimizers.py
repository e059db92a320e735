"""Lean optimizer state: AdamW with bf16 moments (our own), or 8-bit moments (torchao's AdamW8bit)."""

from __future__ import annotations

from typing import Literal

import torch

from synpref.core.errors import ConfigError

Optim = Literal["adamw", "adamw_bf16", "adamw_8bit"]


class AdamWBf16Moments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) whose two moments are stored in bf16: 4 bytes of
    state a parameter instead of 8. Each step reads them into fp32, updates in fp32, stores them back."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1**t))
        return loss


def build_optimizer(name: Optim, groups: list[dict], lr: float, betas, eps: float, fused: bool = False):
    """The AdamW of `name` over the parameter groups (their own weight decay); `fused`: torch's
    fused AdamW kernel for `adamw` (one kernel per parameter, no parameter-sized temporaries)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
    if name == "adamw_bf16":
        return AdamWBf16Moments(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw_8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise ConfigError(
                "model.init_args.optim", "adamw_8bit needs torchao: pip install 'synpref[lean]'"
            ) from None
        return AdamW8bit(groups, lr=lr, betas=tuple(betas), eps=eps)
    raise ConfigError("model.init_args.optim", f"unknown optimizer {name!r}; choose adamw, adamw_bf16 or adamw_8bit")
