"""Argument groups the modules share, as dataclasses jsonargparse reads: Decoding, ModelSpec and LoRA."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from synpref.core.errors import ConfigError


@dataclass(frozen=True)
class Decoding:
    """How completions are generated; the same for every model a module or callback compares.

    Args:
        max_new_tokens: longest completion in tokens.
        temperature: sampling temperature (paper: 0.7).
        top_k: top-k sampling (paper: 50; 0 = off).
        top_p: nucleus sampling (1.0 = off).
        do_sample: sample (True) or decode greedily (False: temperature, top_k, top_p unused).
        seed: base seed; each batch is seeded with `seed` + its first prompt index.
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    do_sample: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        # At construction: settings generate() would reject (or misread) later fail here, by name.
        key = "decoding."  # model.init_args.decoding, or a PeriodicWinRate's decoding
        if self.max_new_tokens < 1:
            raise ConfigError(key + "max_new_tokens", f"must be ≥ 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(
                key + "temperature",
                f"must be > 0 when sampling, got {self.temperature}; "
                "for greedy decoding set do_sample: false where the module allows it",
            )
        if self.do_sample and not 0 < self.top_p <= 1:
            raise ConfigError(key + "top_p", f"must lie in (0, 1], got {self.top_p}")
        if self.do_sample and self.top_k < 0:
            raise ConfigError(key + "top_k", f"must be ≥ 0 (0 = off), got {self.top_k}")

    def without_seed(self) -> dict:
        """The settings but the seed, by name (MLflow params; the seed is logged on its own)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "seed"}


@dataclass(frozen=True)
class ModelSpec:
    """Which HF causal LM to load, and how.

    Args:
        name_or_path: HF directory or hub id (required for a policy or baseline; a DPO reference
            left at None starts from the policy's weights).
        dtype: e.g. 'bfloat16' (None keeps the checkpoint's; a DPO reference: the policy's).
        attn_implementation: e.g. 'sdpa' (None = transformers' default; a DPO reference: the policy's).
        trust_remote_code: allow custom model code from the hub (off by default).
    """

    name_or_path: Optional[str] = None
    dtype: Optional[str] = None
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        # jsonargparse hands a dotted command-line `null` (--model.init_args.ref_model.dtype=null) to a
        # group nested in init_args as the string 'None': read it as the null it was.
        for field in ("name_or_path", "dtype", "attn_implementation"):
            if getattr(self, field) in ("None", "null"):
                object.__setattr__(self, field, None)

    def require(self, key: str) -> str:
        """The path, or a ConfigError naming `key` (e.g. 'model.init_args.policy') when it is unset."""
        if not self.name_or_path:
            raise ConfigError(key + ".name_or_path", "required: an HF model directory or hub id")
        return self.name_or_path

    def following(self, other: "ModelSpec") -> "ModelSpec":
        """This spec with its unset fields taken from `other` (a reference follows its policy);
        remote code runs where either allows it, as the reference always loaded with the policy's flag."""
        return ModelSpec(
            name_or_path=self.name_or_path or other.name_or_path,
            dtype=self.dtype if self.dtype is not None else other.dtype,
            attn_implementation=self.attn_implementation or other.attn_implementation,
            trust_remote_code=self.trust_remote_code or other.trust_remote_code,
        )


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters (peft's LoRA) trained instead of every weight; unset (null) = full fine-tuning.

    Args:
        r: the adapters' rank.
        alpha: scale numerator: an adapter adds (alpha / r) · B·A to its layer's weight.
        dropout: dropout on an adapter's input (0 keeps steps deterministic).
        target_modules: module names (e.g. [q_proj, v_proj]) or 'all-linear', every linear layer
            of the blocks (peft's choice: the LM head stays as it is).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"

    def __post_init__(self) -> None:
        key = "model.init_args.lora."
        if self.r < 1:
            raise ConfigError(key + "r", f"must be ≥ 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(key + "alpha", f"must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(key + "dropout", f"must lie in [0, 1), got {self.dropout}")
        names = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        if not names or "lm_head" in names:
            # The chunked LM head reads the head's weight directly: an adapter there would be skipped.
            raise ConfigError(key + "target_modules", f"name the blocks' layers (not lm_head), got {names}")

    def config(self):
        """peft's LoraConfig for a causal LM."""
        try:
            from peft import LoraConfig
        except ImportError:
            raise ConfigError("model.init_args.lora", "needs peft: pip install 'synpref[lora]'") from None
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )


# Checkpoints keep the modules' hyperparameters, these groups among them; resuming loads them with
# torch.load(weights_only=True), which unpickles only allowlisted classes (plain fields: safe).
torch.serialization.add_safe_globals([Decoding, ModelSpec, LoRA])
