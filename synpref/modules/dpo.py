"""DPO and its loss family against a frozen reference model (live or precomputed and cached), or SimPO without one."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from synpref.core.batching import length_batches
from synpref.core.errors import ConfigError
from synpref.core.logprobs import row_sums, sequence_logps, token_logps
from synpref.core.losses import PreferenceLoss
from synpref.core.models import check_same_tokenizer, load_frozen_causal_lm, load_tokenizer
from synpref.core.outputs import check_writable
from synpref.core.specs import ModelSpec
from synpref.modules.base import CausalLMModule

log = logging.getLogger(__name__)


def fingerprint(model: torch.nn.Module, datasets_: list, extra: str = "") -> str:
    """sha256 of the reference weights (names, dtypes, bytes) and of every pair's index and tokens."""
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for ds in datasets_:
        for rows in ds.select_columns(["index", "prompt_ids", "chosen_ids", "rejected_ids"]).iter(batch_size=1024):
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                h.update(np.asarray([len(x) for x in rows[key]], dtype=np.int64))
                h.update(np.concatenate([np.asarray(x, dtype=np.int64) for x in rows[key]]))
            h.update(np.asarray(rows["index"], dtype=np.int64))
    return h.hexdigest()[:32]


class DPOModule(CausalLMModule):
    """Direct preference optimisation of the policy (`policy.name_or_path`, the SFT export).

    The reference is a frozen model loaded as `ref_model` says; its unset fields follow the
    policy's (`name_or_path` None = the policy's starting weights, `dtype` None = the dtype the
    policy trains in, so `ref_model: {dtype: bfloat16}` is a bf16 copy of the policy's start;
    remote code runs if either allows it): eval mode, no gradients, outside the optimizer and outside checkpoints (it is held in a
    plain list, not registered as a submodule), rebuilt from its path on resume. With
    `precompute_ref_logps`, the reference log-probs of every train and val pair are computed once
    before training (sharded over ranks), cached in `ref_cache_dir` under a fingerprint of the
    reference weights and the tokenized pairs (a later run with the same ones reuses the file),
    and the reference model is freed. A reference-free loss (`simpo`) loads no reference at all.

    Args:
        policy: the policy's ModelSpec (its `name_or_path`: the SFT export).
        ref_model: the reference's ModelSpec; unset fields follow the policy's.
        beta: β, the KL-penalty strength (τ for IPO; SimPO's reward scale).
        loss_type: a loss name or a list of them (TRL 1.16's 15 and `simpo`); see `synpref.core.losses`.
        label_smoothing: ε of conservative DPO (sigmoid), robust, exo_pair, aot; 0 = none.
        loss_weights: one weight per loss_type entry (default 1.0 each): Σ weight · loss (MPO).
        ld_alpha: LD-DPO's α in [0, 1]: weight of reply tokens beyond the pair's shared length.
        f_divergence_type: f-DPO's regulariser: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence.
        f_alpha_divergence_coef: α of the alpha_divergence.
        discopop_tau: τ of the discopop loss.
        gamma: SimPO's target reward margin γ ≥ 0 (simpo only).
        precompute_ref_logps: compute the reference log-probs once before training.
        ref_cache_dir: where precomputed reference log-probs are cached.
        **kwargs: CausalLMModule's arguments (lr, scheduler, warmup, ...).
    """

    def __init__(
        self,
        policy: ModelSpec,
        ref_model: ModelSpec = ModelSpec(),
        beta: float = 0.1,
        loss_type: Union[str, list[str]] = "sigmoid",
        label_smoothing: float = 0.0,
        loss_weights: Optional[list[float]] = None,
        ld_alpha: Optional[float] = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        gamma: float = 0.5,
        precompute_ref_logps: bool = False,
        ref_cache_dir: str = "artifacts/cache/ref_logps",
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        self.loss = PreferenceLoss(
            loss_type,
            beta,
            label_smoothing,
            loss_weights,
            f_divergence_type,
            f_alpha_divergence_coef,
            discopop_tau,
            gamma,
        )
        if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
            raise ConfigError("model.init_args.ld_alpha", f"must lie in [0, 1] (1 = plain DPO), got {ld_alpha}")
        if self.loss.reference_free and ref_model.name_or_path:
            raise ConfigError(
                "model.init_args.ref_model.name_or_path",
                f"loss_type {loss_type!r} is reference-free: no reference model is used; remove the path",
            )
        if self.loss.reference_free and precompute_ref_logps:
            raise ConfigError(
                "model.init_args.precompute_ref_logps",
                f"loss_type {loss_type!r} is reference-free: nothing to precompute",
            )
        self.ref_model, self.ref_spec = ref_model, ref_model.following(policy)
        self.ref_path = self.ref_spec.name_or_path
        if self.lora is not None and (ref_model.name_or_path not in (None, policy.name_or_path) or ref_model.dtype):
            # As TRL with peft: the reference is the policy's own base, adapters off. A second copy
            # (another path or dtype) would cost the memory LoRA is there to save: refused, not guessed.
            raise ConfigError(
                "model.init_args.ref_model",
                f"with lora the reference is the policy's base model with its adapters switched off; "
                f"drop ref_model ({ref_model}), or drop lora to train against a separate reference",
            )
        if self.ref_path != self.model_name_or_path and not self.loss.reference_free:
            # Here, not at the first step: the path must exist and score the policy's token ids.
            check_same_tokenizer(
                self.tokenizer,
                self.model_name_or_path,
                load_tokenizer(self.ref_path, self.ref_spec.trust_remote_code),
                self.ref_path,
            )
        self._ref: list[torch.nn.Module] = []  # a list, not an attribute: kept out of state_dict and .to()
        self._ref_table: Optional[torch.Tensor] = None  # (pairs, 2) reference log-probs by pair index
        self.labelled_by: list[str] = []  # the scorers that labelled the training pairs (record_labellers)

    def run_params(self) -> dict:
        hp = self.hparams
        return {
            **super().run_params(),
            "pairs": pairs_kind(self.trainer.datamodule),
            "beta": self.hparams.beta,
            "loss_type": "+".join(self.loss.loss_type),
            # The settings that define a loss where they apply (None: left out of the params).
            "loss_weights": None if hp.loss_weights is None else ",".join(map(str, hp.loss_weights)),
            "gamma": hp.gamma if "simpo" in self.loss.loss_type else None,
            "ld_alpha": hp.ld_alpha,
            "f_divergence_type": None if hp.f_divergence_type == "reverse_kl" else hp.f_divergence_type,
        }

    # -- reference -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The reference for the duration of the block: the frozen copy, or with LoRA the policy
        with its adapters switched off (no second model in memory)."""
        if self.lora is not None:
            with self.adapters_off() as base:
                yield base
        else:
            yield self.reference()

    def reference(self) -> torch.nn.Module:
        """The frozen reference model, loaded on first use on the policy's device, in `ref_model.dtype`
        or else the dtype the policy trains in."""
        if not self._ref:
            ref = load_frozen_causal_lm(self.ref_spec)
            dtype = None
            if self.ref_model.dtype is None and self.model is not None:
                dtype = next(self.model.parameters()).dtype
            self._ref.append(ref.to(device=self.device, dtype=dtype))
        ref = self._ref[0]
        if ref.device != self.device:
            ref.to(self.device)
        return ref

    def free_reference(self) -> None:
        self._ref.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def ref_logps(self, batch: dict) -> torch.Tensor:
        if self._ref_table is not None:
            table = self._ref_table[batch["index"].cpu()]
            if torch.isnan(table).any():
                raise RuntimeError(
                    "some pairs have no precomputed reference log-probs (data changed since precompute?)"
                )
            return torch.cat([table[:, 0], table[:, 1]]).to(self.device)
        with torch.no_grad(), self.reference_model() as ref:
            return sequence_logps(ref, batch, self.hparams.logits_chunk_size, self.hparams.ld_alpha)[0]

    # -- precomputation ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.precompute_ref_logps:
            check_writable(self.hparams.ref_cache_dir)  # before any model loads: fail in seconds

    lineage_starts_from_sft = True

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.record_labellers()
        if self.hparams.precompute_ref_logps:
            self.precompute_reference()

    def record_labellers(self) -> None:
        """Which scorers labelled the training pairs (a sampling run's run.json): an MLflow param
        `labelled_by` now, synpref_provenance.json in the export later, so that evaluation can mark
        a judge that is the same scorer as self-judged."""
        from synpref.judges import labellers

        sources = getattr(getattr(self.trainer, "datamodule", None), "sources", None) or []
        self.labelled_by = labellers(sources)
        if self.logger is not None:
            self.logger.log_hyperparams({"labelled_by": ",".join(self.labelled_by) or "not recorded"})

    def export(self, dirpath):
        from synpref.judges import write_provenance

        out = super().export(dirpath)
        write_provenance(out, self.labelled_by)
        return out

    def on_validation_start(self) -> None:
        if self.hparams.precompute_ref_logps and self._ref_table is None:
            self.precompute_reference()

    def precompute_reference(self) -> None:
        """Fill the (pairs, 2) reference table from the cache file or one pass over train+val."""
        dm = self.trainer.datamodule
        sets = [s for s in (dm.train_set, dm.val_set) if s is not None]
        ld = self.hparams.ld_alpha  # the table holds LD-weighted sums when it is set
        with self.reference_model() as ref:
            key = fingerprint(ref, sets, extra=str(self.trainer.precision) + ("" if ld is None else f":ld_alpha={ld}"))
            path = Path(self.hparams.ref_cache_dir) / f"ref_logps-{key}.pt"
            hit = self.trainer.strategy.broadcast(path.exists())
            if not hit:
                table = self._compute_table(ref, sets, dm)
        if hit:
            log.info("reusing cached reference log-probs from %s", path)
            self._ref_table = torch.load(path, weights_only=True)
        else:
            self._ref_table = table
            if self.trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(self._ref_table, tmp)
                tmp.replace(path)  # atomic: a crashed run never leaves a half-written cache
                log.info("cached reference log-probs of %d pairs at %s", len(self._ref_table), path)
            self.trainer.strategy.barrier()
        self.free_reference()

    @torch.no_grad()
    def _compute_table(self, ref, sets, dm) -> torch.Tensor:
        n = sum(len(s) for s in sets)
        table = torch.zeros(n, 2, device=self.device)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        size = dm.eval_batch_size
        for ds in sets:
            # Longest first, so each batch pads little; batches are split round-robin over ranks.
            for indices in length_batches(list(ds["length"]), size)[rank::world]:
                batch = dm.collate([ds[i] for i in indices])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.trainer.precision_plugin.forward_context():
                    logps = sequence_logps(ref, batch, self.hparams.logits_chunk_size, self.hparams.ld_alpha)[0]
                logps = logps.float()
                b = batch["index"].numel()
                table[batch["index"], 0] = logps[:b]
                table[batch["index"], 1] = logps[b:]
        # Each pair was filled by exactly one rank; summing the tables gathers them all.
        table = self.trainer.strategy.reduce(table, reduce_op="sum") if world > 1 else table
        return table.cpu()

    # -- steps ---------------------------------------------------------------------------------
    def dpo_step(self, batch: dict) -> dict[str, torch.Tensor]:
        b = batch["index"].numel()
        # Reference first: its no-grad temporaries are freed before the policy's activations exist,
        # so the two never add up in the peak. A reference-free loss has none.
        ref = None if self.loss.reference_free else self.ref_logps(batch)
        per_token, rows = token_logps(self.model, batch, self.hparams.logits_chunk_size)
        logps, lengths = row_sums(per_token, rows, 2 * b, self.hparams.ld_alpha)
        # The sft term: the mean NLL over every chosen token (unweighted by ld_alpha, as TRL's).
        chosen_nll = -per_token[rows < b].mean() if "sft" in self.loss.loss_type else None
        ref_chosen, ref_rejected = (None, None) if ref is None else ref.to(logps.dtype).chunk(2)
        losses, chosen_rewards, rejected_rewards = self.loss(
            logps[:b], logps[b:], ref_chosen, ref_rejected, lengths[:b], lengths[b:], chosen_nll
        )
        return {
            "loss": losses.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps[:b].detach().mean(),
            "logps/rejected": logps[b:].detach().mean(),
        }

    def training_step(self, batch, batch_idx):
        metrics = self.dpo_step(batch)
        b = batch["index"].numel()
        # sync_dist: the logged step value is the mean over all ranks' pairs, not rank 0's share.
        for name, value in metrics.items():
            self.log(
                f"train/{name}",
                value,
                prog_bar=name == "loss",
                on_step=True,
                on_epoch=False,
                batch_size=b,
                sync_dist=True,
            )
        return metrics["loss"]

    def validation_step(self, batch, batch_idx):
        metrics = self.dpo_step(batch)
        b = batch["index"].numel()
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", on_epoch=True, batch_size=b, sync_dist=True)
        return metrics["loss"]


# Source format -> which pairs they are, for the `pairs` param.
PAIR_KINDS = {"synpref": "synthetic", "ultrafeedback_binarized": "ultrafeedback"}


def pairs_kind(datamodule) -> str:
    """`synthetic`, `ultrafeedback` or `both` (else the formats joined by `+`) of the training sources."""
    kinds = sorted({PAIR_KINDS.get(s.format, s.format) for s in getattr(datamodule, "sources", [])})
    return "both" if kinds == ["synthetic", "ultrafeedback"] else "+".join(kinds)
