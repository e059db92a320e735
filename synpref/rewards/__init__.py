"""Reward models behind one interface, `RewardScorer.score(prompts, responses)`."""

from synpref.rewards.base import RewardScorer
from synpref.rewards.endpoint import EndpointError, EndpointReward
from synpref.rewards.hf import HFRewardModel, NemotronReward
from synpref.rewards.rules import FunctionReward, RuleReward

__all__ = [
    "RewardScorer",
    "EndpointError",
    "EndpointReward",
    "HFRewardModel",
    "NemotronReward",
    "FunctionReward",
    "RuleReward",
]
