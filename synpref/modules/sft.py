"""Supervised fine-tuning with the loss on assistant tokens only."""

from __future__ import annotations

import torch

from synpref.core.logprobs import token_logps
from synpref.modules.base import CausalLMModule


class SFTModule(CausalLMModule):
    """Mean next-token NLL over assistant tokens (labels != -100), as TRL's SFTTrainer with
    `assistant_only_loss`/`completion_only_loss` computes it. All arguments: CausalLMModule."""

    def sft_loss(self, batch):
        logps, _ = token_logps(self.model, batch, self.hparams.logits_chunk_size)
        return -logps.mean(), logps.numel()

    def training_step(self, batch, batch_idx):
        loss, n = self.sft_loss(batch)
        if self.trainer.world_size > 1:
            # DDP averages gradients over ranks: weight each rank's token mean by its share of the
            # global tokens, so the step is the global token mean, as on one device.
            total = self.trainer.strategy.reduce(torch.tensor(float(n), device=loss.device), reduce_op="sum")
            loss = loss * (n * self.trainer.world_size / total)
        # sync_dist: the logged value is the mean over ranks (= the global token mean), not rank 0's.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = self.sft_loss(batch)
        # Weighted by assistant tokens so the epoch value is the token-level mean NLL.
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        return loss
