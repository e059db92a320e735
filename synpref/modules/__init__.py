"""LightningModules: SFT, DPO, sampling, evaluation."""

from synpref.modules.base import CausalLMModule
from synpref.modules.sft import SFTModule

__all__ = ["CausalLMModule", "SFTModule"]
