"""Data modules: SmolTalk conversations, preference pairs, prompts."""

from synpref.data.preferences import PreferenceDataModule, PreferenceSource
from synpref.data.prompts import PromptDataModule
from synpref.data.smoltalk import SmolTalkDataModule

__all__ = ["SmolTalkDataModule", "PreferenceDataModule", "PreferenceSource", "PromptDataModule"]
