"""Supervised fine-tuning with the loss on assistant tokens only."""

from __future__ import annotations

import torch.nn.functional as F

from synpref.modules.base import CausalLMModule, loss_token_logits


class SFTModule(CausalLMModule):
    """Mean next-token NLL over assistant tokens (labels != -100), as TRL's SFTTrainer with
    `assistant_only_loss`/`completion_only_loss` computes it. All arguments: CausalLMModule."""

    def sft_loss(self, batch):
        logits, targets, _ = loss_token_logits(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return F.cross_entropy(logits, targets), targets.numel()

    def training_step(self, batch, batch_idx):
        loss, n = self.sft_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = self.sft_loss(batch)
        # Weighted by assistant tokens so the epoch value is the token-level mean NLL.
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        return loss
