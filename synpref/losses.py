"""Preference losses on sequence log-probs: sigmoid DPO, conservative (label-smoothed) DPO, IPO."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (rewards = β · log π/π_ref, detached).

    sigmoid (Rafailov et al. 2023): -log σ(β·Δ), Δ = (log π/π_ref)(chosen) - (log π/π_ref)(rejected).
    With label_smoothing ε it is conservative DPO (Mitchell 2023): the preference label is
    assumed flipped with probability ε: -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ).
    ipo (Azar et al. 2023, Eq. 17, τ = β): (Δ' - 1/(2β))², where Δ' uses log-ratios divided by
    the response lengths in tokens (as TRL does, following the IPO authors), so lengths are required.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        delta = beta * (chosen_logratios - rejected_logratios)
        losses = -F.logsigmoid(delta)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the IPO loss needs chosen_lengths and rejected_lengths (response tokens)")
        delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
