"""Data modules: SmolTalk conversations, preference pairs, unpaired examples, prompts."""

from synpref.data.preferences import PreferenceDataModule, PreferenceSource
from synpref.data.prompts import PromptDataModule
from synpref.data.smoltalk import SmolTalkDataModule
from synpref.data.unpaired import UnpairedDataModule, UnpairedSource

__all__ = [
    "SmolTalkDataModule",
    "PreferenceDataModule",
    "PreferenceSource",
    "PromptDataModule",
    "UnpairedDataModule",
    "UnpairedSource",
]
