"""KTO on unpaired examples against a frozen reference model, with the batch's mismatched-pair KL estimate."""

from __future__ import annotations

import torch

from synpref.core.errors import ConfigError
from synpref.core.logprobs import sequence_logps
from synpref.core.losses import kto_loss
from synpref.core.specs import ModelSpec
from synpref.modules.dpo import DPOModule


class KTOModule(DPOModule):
    """Kahneman-Tversky optimisation of the policy on `synpref.data.UnpairedDataModule` batches.

    The reference is DPOModule's (frozen, outside the optimizer and checkpoints, loaded live; no
    precomputation). Each step also scores, without gradients, the batch's mismatched sequences
    (prompt i + completion i−1) under policy and reference: their mean log-ratio, floored at 0, is
    KTO's reference point z₀ (TRL's KTOTrainer estimate; under DDP it is each rank's, not gathered).

    Args:
        policy: the policy's ModelSpec (its `name_or_path`: the SFT export).
        ref_model: the reference's ModelSpec; unset fields follow the policy's.
        beta: β of the KTO value function.
        desirable_weight: λ_D, the weight of desirable examples' losses.
        undesirable_weight: λ_U, the weight of undesirable examples' losses (KTO's paper: keep
            λ_D·n_D / (λ_U·n_U) within [1, 4/3]).
        **kwargs: CausalLMModule's arguments (lr, scheduler, warmup, ...).
    """

    def __init__(
        self,
        policy: ModelSpec,
        ref_model: ModelSpec = ModelSpec(),
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(policy, ref_model, beta=beta, **kwargs)
        # DPOModule's loss settings arrive here when a KTO config composes over a DPO one: only defaults.
        if (
            self.loss.loss_type != ("sigmoid",)
            or self.hparams.precompute_ref_logps
            or self.hparams.ld_alpha is not None
        ):
            raise ConfigError("model.init_args.loss_type", "KTOModule has its own loss; DPO loss settings do not apply")
        for key, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not value > 0:
                raise ConfigError(f"model.init_args.{key}", f"must be > 0, got {value}")

    def run_params(self) -> dict:
        return {**super().run_params(), "loss_type": "kto"}

    def dpo_step(self, batch: dict) -> dict[str, torch.Tensor]:
        chunk, hp = self.hparams.logits_chunk_size, self.hparams
        main = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        mismatched = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            ref = self.reference()
            ref_logps = sequence_logps(ref, main, chunk)[0]
            ref_kl = sequence_logps(ref, mismatched, chunk)[0]
            kl_logps = sequence_logps(self.model, mismatched, chunk)[0]
        logps = sequence_logps(self.model, main, chunk)[0]
        desirable = batch["label"]
        losses, rewards, kl = kto_loss(
            logps, ref_logps.to(logps.dtype), kl_logps, ref_kl.to(logps.dtype), desirable, hp.beta,
            hp.desirable_weight, hp.undesirable_weight,
        )  # fmt: skip
        metrics = {"loss": losses.mean(), "kl": kl}
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if rows.any():  # a batch may hold only one kind
                metrics[f"rewards/{name}"] = rewards[rows].mean()
                metrics[f"logps/{name}"] = logps[rows].detach().mean()
        return metrics
