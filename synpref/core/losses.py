"""Preference losses on sequence log-probs: TRL 1.16's DPO family (and their MPO mixtures), cDPO, SimPO."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from synpref.core.errors import ConfigError

# TRL 1.16 DPOConfig.loss_type's names, in its order; formulas as its DPOTrainer._compute_loss.
TRL_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
LOSSES = (*TRL_LOSSES, "simpo")
# Losses that need no reference model: with only these (sft is a plain NLL) none is loaded.
REFERENCE_FREE = {"simpo"}
# The f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in the chosen − rejected
# score difference, so TRL accepts another f-divergence for these losses alone.
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# label_smoothing: cDPO for sigmoid (synpref's; TRL 1.16 ignores it there), ε of robust, EXO and AOT.
SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}

KEY = "model.init_args."


@dataclass(frozen=True)
class PreferenceLoss:
    """One loss or a weighted sum of several (TRL's MPO recipe: Σ weight · mean loss), and its settings.

    Every setting is checked here, as a ConfigError naming its config key; the checks TRL makes
    raise for the same reason (a reference-free loss given a reference is the module's check).
    """

    loss_type: Union[str, Sequence[str]] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_weights: Optional[Sequence[float]] = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    gamma: float = 0.5

    def __post_init__(self) -> None:
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", types)
        if not types:
            raise ConfigError(KEY + "loss_type", f"give at least one of {', '.join(LOSSES)}")
        for name in types:
            if name not in LOSSES:
                raise ConfigError(KEY + "loss_type", f"unknown {name!r}; expected one of {', '.join(LOSSES)}")
        if self.reference_free and set(types) - REFERENCE_FREE - {"sft"}:
            raise ConfigError(KEY + "loss_type", f"{types} mixes reference-free losses with losses that need one")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ConfigError(
                KEY + "loss_weights",
                f"must have the same length as loss_type when combining losses: got {len(self.loss_weights)} "
                f"weights for {len(types)} loss types {list(types)}",
            )
        if not self.beta > 0:  # 0 leaves the policy at the reference; < 0 trains the reverse preference
            raise ConfigError(KEY + "beta", f"must be > 0, got {self.beta}")
        if self.label_smoothing and not set(types) & SMOOTHED:
            raise ConfigError(KEY + "label_smoothing", f"applies to {', '.join(sorted(SMOOTHED))} only")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(KEY + "label_smoothing", f"must lie in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in types and self.label_smoothing == 0.0:
            # EXO's target distribution is (1 − ε, ε): log ε is −∞ at 0.
            raise ConfigError(KEY + "label_smoothing", "must be > 0 for exo_pair; the EXO paper recommends 1e-3")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ConfigError(
                KEY + "f_divergence_type", f"unknown {self.f_divergence_type!r}; expected one of {F_DIVERGENCES}"
            )
        if self.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
            raise ConfigError(
                KEY + "f_divergence_type",
                f"{self.f_divergence_type!r} is only supported for the loss types {sorted(F_DIVERGENCE_LOSSES)}; "
                f"got {list(types)}. Use the default 'reverse_kl' with these losses",
            )
        if not self.discopop_tau > 0:
            raise ConfigError(KEY + "discopop_tau", f"must be > 0, got {self.discopop_tau}")
        if self.gamma < 0:  # a negative target margin rewards ranking the rejected reply first
            raise ConfigError(KEY + "gamma", f"must be ≥ 0 (SimPO's target reward margin), got {self.gamma}")

    @property
    def reference_free(self) -> bool:
        """True when no loss compares against a reference model (SimPO, optionally with the SFT term)."""
        return bool(set(self.loss_type) & REFERENCE_FREE)

    def __call__(
        self,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        ref_chosen_logps: Optional[torch.Tensor],
        ref_rejected_logps: Optional[torch.Tensor],
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses (their mean is the loss), chosen rewards and rejected rewards (detached).

        Sequence log-probs are sums over response tokens (LD-DPO's weighted sums when the module
        uses ld_alpha); lengths count response tokens; `chosen_nll` is the mean NLL of every chosen
        token, for `sft`. Rewards are β · log π/π_ref, or β · log π / |y| without a reference.
        """
        beta = self.beta
        if self.reference_free:
            chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)
            rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)
            total = 0.0
            for name, weight in zip(self.loss_type, self.weights):
                if name == "simpo":  # Meng et al. 2024, Eq. 6
                    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - self.gamma)
                else:
                    losses = self._sft(chosen_nll, chosen_logps)
                total = total + weight * losses
            return total, beta * chosen_avg.detach(), beta * rejected_avg.detach()

        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
        chosen_score = f_score(chosen_ratio, self.f_divergence_type, self.f_alpha_divergence_coef)
        rejected_score = f_score(rejected_ratio, self.f_divergence_type, self.f_alpha_divergence_coef)
        total = 0.0
        for name, weight in zip(self.loss_type, self.weights):
            if name == "sft":
                losses = self._sft(chosen_nll, chosen_logps)
            elif name in ("aot", "aot_unpaired"):
                losses = self._aot(name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
            elif name in ("ipo", "sigmoid_norm"):
                # Per-token averages (TRL's IPO, confirmed with the IPO authors; and its sigmoid_norm).
                delta = chosen_score / chosen_lengths.clamp(min=1) - rejected_score / rejected_lengths.clamp(min=1)
                losses = (delta - 1 / (2 * beta)) ** 2 if name == "ipo" else -F.logsigmoid(beta * delta)
            elif name in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down"):
                losses = self._per_response(name, chosen_ratio, rejected_ratio)
            else:
                losses = self._on_margin(name, beta * (chosen_score - rejected_score))
            total = total + weight * losses
        return total, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()

    @property
    def weights(self) -> Sequence[float]:
        return self.loss_weights if self.loss_weights is not None else [1.0] * len(self.loss_type)

    def _on_margin(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Losses of z = β · (score(chosen) − score(rejected))."""
        eps = self.label_smoothing
        if name == "sigmoid":  # DPO; with ε, conservative DPO (Mitchell 2023)
            losses = -F.logsigmoid(z)
            return (1 - eps) * losses - eps * F.logsigmoid(-z) if eps else losses
        if name == "hinge":  # RSO / SLiC
            return torch.relu(1 - z)
        if name == "robust":  # rDPO, Chowdhury et al. 2024: unbiased under label flips with rate ε
            return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        if name == "exo_pair":  # EXO, Ji et al. 2024, Eq. 16: KL(softmax over the pair ‖ (1 − ε, ε))
            log_pw, log_pl = math.log1p(-eps), math.log(eps)
            return torch.sigmoid(z) * (F.logsigmoid(z) - log_pw) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_pl)
        # discopop, Chris Lu et al. 2024, Eq. 5: logistic and exponential losses blended by σ(z/τ)
        mix = torch.sigmoid(z / self.discopop_tau)
        return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix

    def _per_response(self, name: str, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor) -> torch.Tensor:
        """Losses on each response's own log-ratio, not only on their difference."""
        beta, rc, rr = self.beta, self.beta * chosen_ratio, self.beta * rejected_ratio
        if name == "nca_pair":  # NCA, Chen et al. 2024
            return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
        if name == "bco_pair":  # BCO on pairs, Jung et al. 2024 (TRL 1.16 keeps no running reward mean)
            return -F.logsigmoid(rc) - F.logsigmoid(-rr)
        if name == "sppo_hard":  # SPPO with hard win probabilities, Wu et al. 2024, Eq. 4.7
            return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        if name == "apo_zero":  # APO-zero, D'Oosterlinck et al. 2024, Eq. 7
            return 1 - torch.sigmoid(rc) + torch.sigmoid(rr)
        return torch.sigmoid(rc) + 1 - torch.sigmoid(rc - rr)  # apo_down, Eq. 8

    def _aot(self, name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
        """AOT, Melnyk et al. 2024: the sorted batch's quantiles, so the loss is per batch, not per pair."""
        if name == "aot":
            policy = torch.sort(chosen_logps - rejected_logps, dim=0)[0]
            delta = policy - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0]
        else:
            chosen = torch.sort(chosen_logps - ref_chosen_logps, dim=0)[0]
            delta = chosen - torch.sort(rejected_logps - ref_rejected_logps, dim=0)[0]
        z, eps = self.beta * delta, self.label_smoothing
        return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps

    @staticmethod
    def _sft(chosen_nll: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        if chosen_nll is None:
            raise ValueError("the sft loss needs chosen_nll, the mean NLL of the chosen tokens")
        return chosen_nll.expand_as(like)  # one batch-level term; the mean over pairs keeps it


def f_score(logratio: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(π/π_ref) of the f-DPO paper (Wang et al. 2023) from the log-ratio; reverse KL is the log-ratio."""
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:  # f'(t) = (t^(α−1) − 1) / (α − 1)
        t = (alpha - 1.0) * logratio
        # Clamped so exp() stays representable once cast back (TRL's bounds).
        limit = {torch.float16: 11.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=limit)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
    return logratio  # reverse KL, and the α → 1 limit of the α-divergence


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7, as TRL's KTOTrainer): per-example losses, rewards β·ρ, and z₀.

    z₀ = max(0, mean(log π/π_ref) over the batch's mismatched (prompt, completion) sequences), detached:
    desirable examples lose 1 − σ(β(ρ − z₀)), undesirable ones 1 − σ(β(z₀ − ρ)), ρ = log π/π_ref.
    """
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach(), kl
