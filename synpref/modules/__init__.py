"""LightningModules: SFT, DPO, KTO, sampling, evaluation."""

from synpref.modules.base import CausalLMModule
from synpref.modules.dpo import DPOModule
from synpref.modules.evaluation import WinRateModule
from synpref.modules.kto import KTOModule
from synpref.modules.sampling import SamplingModule
from synpref.modules.sft import SFTModule

__all__ = ["CausalLMModule", "SFTModule", "DPOModule", "KTOModule", "WinRateModule", "SamplingModule"]
