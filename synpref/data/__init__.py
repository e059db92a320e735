"""Data modules: SmolTalk conversations, preference pairs, prompts."""

from synpref.data.smoltalk import SmolTalkDataModule
from synpref.data.preferences import PreferenceDataModule, PreferenceSource
from synpref.data.prompts import PromptDataModule

__all__ = ["SmolTalkDataModule", "PreferenceDataModule", "PreferenceSource", "PromptDataModule"]
