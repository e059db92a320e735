"""Base LightningModule for HF causal LMs: loading, optimizer + schedule, throughput, HF export."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Iterator, Literal, Optional

import lightning as L
import torch

from synpref.core.checkpointing import enable_checkpointing
from synpref.core.errors import ConfigError
from synpref.core.models import end_of_turn_ids, load_causal_lm, load_tokenizer
from synpref.core.optimizers import Optim, build_optimizer
from synpref.core.specs import LoRA, ModelSpec

# Drop counts sort after every other metric section in the MLflow UI (the results come first).
DROPPED_PREFIX = "zz_data/dropped/"


def log_data_drops(module: L.LightningModule) -> None:
    """Log the data module's counted drops as `zz_data/dropped/<reason>` metrics of the run: every
    dropped row is counted somewhere a user looks."""
    counts = getattr(module.trainer.datamodule, "drop_counts", None)
    if counts and module.logger is not None:
        module.logger.log_metrics({DROPPED_PREFIX + k.replace(":", "_"): float(v) for k, v in counts.items()})


def log_data_lineage(module: L.LightningModule, models: dict[str, str] = {}, context: Optional[str] = None) -> None:
    """The data module's inputs as the run's MLflow dataset inputs, and tags naming the runs that made
    them and the `models` (tag → path) it starts from (synpref.core.lineage)."""
    from synpref.core.lineage import log_lineage
    from synpref.core.tracking import mlflow_loggers

    datamodule = getattr(module.trainer, "datamodule", None)
    if not hasattr(datamodule, "data_inputs") or not module.trainer.is_global_zero:
        return
    data = datamodule.data_inputs(context) if context else datamodule.data_inputs()
    for logger in mlflow_loggers(module.trainer):
        log_lineage(logger.experiment, logger.run_id, data, models)


def model_name(name_or_path: str) -> str:
    """The short name of a model: its folder (`artifacts/tiny/dpo_synthetic` -> `dpo_synthetic`) or hub id."""
    path = Path(name_or_path)
    return (
        path.name
        if path.exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1
        else name_or_path
    )


def log_run_params(module: L.LightningModule, **extra) -> None:
    """Log `module.run_params()` (+ extra) as the run's MLflow params: the settings that define the run,
    under stable names. Every argument is in the config.yaml artifact; the modules and data modules
    save their hyperparameters with logger=False so Lightning does not log them all."""
    if module.logger is not None:
        # Unknown settings (no data module, no global seed) are left out rather than logged as "None".
        params = {k: v for k, v in {**module.run_params(), **extra}.items() if v not in (None, "")}
        module.logger.log_hyperparams(params)


def global_seed() -> Optional[int]:
    """The seed of `seed_everything` (the config's top-level seed_everything), if one was set."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


def step_in_backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """Step each parameter as soon as its gradient is complete, then free that gradient: a backward
    never holds every gradient at once (4 bytes per fp32 parameter). Returns the hook handles."""

    def step(param: torch.Tensor) -> None:
        # Only `param` holds a gradient now: those before it were stepped and freed, those after it
        # are not computed yet, so the optimizer steps `param` alone.
        optimizer.step()
        param.grad = None

    return [p.register_post_accumulate_grad_hook(step) for p in model.parameters() if p.requires_grad]


class CausalLMModule(L.LightningModule):
    """Owns `self.model` (policy) and `self.tokenizer`; subclasses write `training_step`/`validation_step`.

    `policy` (a ModelSpec: `name_or_path`, `dtype`, `attn_implementation`, `trust_remote_code`) is
    the model trained, loaded from its starting weights.

    The LM head and log-softmax run over `logits_chunk_size` labelled positions at a time, so a step
    never holds more than (chunk, vocab) logits (`synpref.core.logprobs`); None or 0 runs them all at once.

    Optimizer: AdamW (`optim`: `adamw` fused fp32 moments, `adamw_bf16` bf16 moments, `adamw_8bit`
    torchao's 8-bit moments; synpref.core.optimizers), no weight decay on biases and norms. Schedule: linear warmup (`warmup_steps`,
    else `warmup_ratio` of all optimizer steps) then cosine, linear or constant decay, stepped per
    optimizer step. AdamW is fused on CPU and CUDA. `optimizer_in_backward` steps each parameter as its
    gradient completes and frees it (as torchtune's `optimizer_in_bwd`): a step never holds all
    gradients (−4 bytes per parameter at the peak); one device, no accumulation, no gradient clipping.

    `gradient_checkpointing` recomputes each block in the backward from its input, except its attention
    kernel, whose output is kept (synpref.core.checkpointing); `recompute_attention: true` recomputes
    that too, for the least memory (2 bytes per hidden unit, token and layer less under bf16).

    `lora` (a LoRA group; null = full fine-tuning): peft adapters are added to the loaded model and
    only they train. `self.model` stays the HF model (its layers now carry adapters), so every code
    path reads it as before; checkpoints hold only the adapters (and the optimizer state of them),
    and the export is the merged model plus the adapter alone in `adapter/`.
    """

    def __init__(
        self,
        policy: ModelSpec,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_ratio: float = 0.1,
        warmup_steps: Optional[int] = None,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        recompute_attention: bool = False,
        logits_chunk_size: Optional[int] = 256,
        optimizer_in_backward: bool = False,
        lora: Optional[LoRA] = None,
        optim: Optim = "adamw",
    ):
        super().__init__()
        # Collects the arguments of every __init__ in the chain; MLflow gets run_params() instead.
        self.save_hyperparameters(logger=False)
        self.policy = policy
        self.model_name_or_path = policy.require("model.init_args.policy")
        self.model: Optional[torch.nn.Module] = None
        self.tokenizer = load_tokenizer(self.model_name_or_path, policy.trust_remote_code)
        self._step_started = 0.0
        self._step_tokens = 0
        self._step_lr = 0.0
        self._in_backward_hooks: list = []  # optimizer_in_backward's, removed when fit ends
        self.lora = lora
        self._peft: list = []  # the PeftModel around self.model (a list: not a second registered copy)
        # A checkpoint holds the adapters only: the base weights come from policy.name_or_path.
        self.strict_loading = lora is None

    # -- models --------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        spec = self.policy
        self.model = load_causal_lm(spec.name_or_path, spec.dtype, spec.trust_remote_code, spec.attn_implementation)
        if self.lora is not None:
            from peft import get_peft_model

            self._peft = [get_peft_model(self.model, self.lora.config())]
            self.model = self._peft[0].get_base_model()  # the HF model, its layers carrying adapters
        self.model.train()  # from_pretrained returns eval mode; Lightning toggles from here
        if self.hparams.gradient_checkpointing:
            enable_checkpointing(self.model, self.hparams.recompute_attention)

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[torch.nn.Module]:
        """The policy with its LoRA adapters switched off: the base model it started from."""
        with self._peft[0].disable_adapter():
            yield self.model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.lora is not None:
            trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # Fused where it runs (the for-loop AdamW makes 0.5 GB temporaries for a 0.5B model's
        # embedding; TRL's default `adamw_torch_fused` too), but not with an fp16 loss scaler and
        # clipping: a fused step unscales internally, after the clip.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        fused = self.device.type in ("cpu", "cuda") and not (scaled and self.trainer.gradient_clip_val)
        optimizer = build_optimizer(hp.optim, groups, hp.lr, hp.betas, hp.eps, fused)
        if hp.optimizer_in_backward:
            self._step_in_backward(optimizer)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps if hp.warmup_steps is not None else math.ceil(hp.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if hp.scheduler == "constant":
                return 1.0
            decayed = 0.5 * (1 + math.cos(math.pi * progress)) if hp.scheduler == "cosine" else 1 - progress
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * decayed

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, also for the fused AdamW under bf16 autocast: Lightning's mixed-precision
        plugin refuses to clip for any optimizer that unscales itself, which matters only with an fp16
        loss scaler; bf16 has none, so the gradients are true-scale and are clipped directly."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and getattr(plugin, "scaler", False) is None:
            if gradient_clip_algorithm == "value":
                plugin.clip_grad_by_value(optimizer, gradient_clip_val)
            else:
                plugin.clip_grad_by_norm(optimizer, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _step_in_backward(self, optimizer: torch.optim.Optimizer) -> None:
        """`step_in_backward`, after checking the trainer's settings allow it. Lightning's own
        `optimizer.step()` after the backward then finds no gradient left and does nothing."""
        trainer, key = self.trainer, "model.init_args.optimizer_in_backward"
        # Each of these needs every gradient at once, or (DDP) reduced after this hook has run.
        for clash, setting in (
            (trainer.accumulate_grad_batches > 1, f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}"),
            (bool(trainer.gradient_clip_val), f"trainer.gradient_clip_val={trainer.gradient_clip_val}"),
            (trainer.world_size > 1, f"{trainer.world_size} processes"),
            (str(trainer.precision).startswith("16"), f"trainer.precision={trainer.precision} (loss scaling)"),
        ):
            if clash:
                raise ConfigError(key, f"steps each parameter during the backward, which cannot work with {setting}")

        self._in_backward_hooks = step_in_backward(self.model, optimizer)

    def on_fit_end(self) -> None:
        for handle in self._in_backward_hooks:
            handle.remove()
        self._in_backward_hooks = []

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes gradients inside the next step's closure, after that step's forward: the spent
        # gradients (4 bytes per fp32 parameter, 2 GB at 0.5B) would sit beside its activations, at the
        # step's peak. Freed here instead, as the HF Trainer does right after optimizer.step().
        optimizer.zero_grad(set_to_none=True)

    # -- throughput ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()
        self._step_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        # The rate this step trains with (the scheduler has moved on by on_train_batch_end).
        self._step_lr = self.trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_started
        if elapsed > 0 and self._step_tokens:
            tokens = self._step_tokens * self.trainer.world_size
            self.log("train/tokens_per_sec", tokens / elapsed, on_step=True, on_epoch=False)
        self.log("train/learning_rate", self._step_lr, on_step=True, on_epoch=False)

    def on_fit_start(self) -> None:
        log_data_drops(self)
        log_run_params(self)
        log_data_lineage(self, {"synpref.sft_run_id": self.model_name_or_path} if self.lineage_starts_from_sft else {})

    # A DPO run starts from an SFT export: its run is named in the tag `synpref.sft_run_id`.
    lineage_starts_from_sft = False

    def run_params(self) -> dict:
        """The settings that define a training run (subclasses add theirs)."""
        trainer, data = self.trainer, self.trainer.datamodule
        length = {"max_steps": trainer.max_steps} if trainer.max_steps != -1 else {"max_epochs": trainer.max_epochs}
        return {
            "policy_name": model_name(self.model_name_or_path),
            "lr": self.hparams.lr,
            "batch_size": getattr(data, "batch_size", None),
            **length,
            "seed": global_seed(),
        }

    # -- export --------------------------------------------------------------------------------
    def export(self, dirpath: str | Path) -> Path:
        """save_pretrained the policy and tokenizer: an HF directory that DPO, sampling and any HF tool load."""
        out = Path(dirpath)
        out.mkdir(parents=True, exist_ok=True)
        # Generation must stop at the end of an assistant turn (<|im_end|>), not only at eos.
        self.model.generation_config.eos_token_id = end_of_turn_ids(self.tokenizer)
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if self.lora is None:
            self.model.save_pretrained(out)
        else:
            # A plain HF model for sampling, evaluation and servers, and the adapter alone beside it;
            # merged in place and back, so no second copy of the weights is ever held.
            self._peft[0].save_pretrained(out / "adapter")
            self._peft[0].merge_adapter()
            try:
                weights = self.model.state_dict()
                plain = {k.replace(".base_layer.", "."): v for k, v in weights.items() if "lora_" not in k}
                self.model.save_pretrained(out, state_dict=plain)
            finally:
                self._peft[0].unmerge_adapter()
        self.tokenizer.save_pretrained(out)
        return out
